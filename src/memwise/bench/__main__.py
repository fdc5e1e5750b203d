"""`python -m memwise.bench [flags]` is `memwise bench [flags]`."""
import sys

from memwise.bench.cli import main

sys.exit(main())

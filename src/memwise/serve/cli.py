"""`memwise serve MODEL`: load the model, then run the app on uvicorn until SIGINT / SIGTERM."""
from __future__ import annotations

import argparse
import sys

from memwise.errors import MemwiseError


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from memwise.serve.app import ServeConfig, create_app
    except ImportError as e:
        raise MemwiseError(f"memwise serve needs the serve extra (pip install 'memwise[serve]'): {e}") from None
    import torch
    import memwise
    from memwise.serve.chat import load_chat_template
    from memwise.source import resolve_model
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise MemwiseError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = memwise.load(args.source, dtype=args.dtype, device=args.device, revision=args.revision,
                         quantize=args.quantize)
    template = load_chat_template(resolve_model(args.source, args.revision).directory)
    config = ServeConfig(args.served_name or args.source, args.max_batch, args.max_queue, args.api_key, template)
    if model.synthetic:
        print(f"[{args.source}: synthetic random weights, the text is meaningless]", file=sys.stderr)
    # uvicorn handles SIGINT and SIGTERM: it stops accepting, then runs the lifespan's shutdown,
    # which stops the engine after its current step.
    uvicorn.run(create_app(model, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0

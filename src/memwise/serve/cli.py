"""`memwise serve MODEL`: load the model, then run the app on uvicorn until SIGINT / SIGTERM (or,
with --ray, run it as N Ray Serve replicas: memwise.serve.ray_serve)."""
from __future__ import annotations

import argparse

from memwise.errors import MemwiseError


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import importlib
        import uvicorn
        importlib.import_module("memwise.serve.app")    # the serve extra's imports, checked before the model loads
    except ImportError as e:
        raise MemwiseError(f"memwise serve needs the serve extra (pip install 'memwise[serve]'): {e}") from None
    for name in ("max_batch", "max_queue", "replicas"):
        if getattr(args, name) < 1:
            raise MemwiseError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_step_tokens < 0:
        raise MemwiseError(f"--max-step-tokens must be >= 0 (0: no limit), got {args.max_step_tokens}")
    from memwise.serve.factory import APP_OPTIONS, build_app
    options = {name: getattr(args, name) for name in APP_OPTIONS}
    if args.ray:
        from memwise.serve.ray_serve import serve_on_ray
        return serve_on_ray(options, args.replicas, args.host, args.port)
    if args.replicas != 1:
        raise MemwiseError("--replicas needs --ray (one process serves one replica)")
    # uvicorn handles SIGINT and SIGTERM: it stops accepting, then runs the lifespan's shutdown,
    # which stops the engine after its current step.
    uvicorn.run(build_app(options), host=args.host, port=args.port, log_level=args.log_level)
    return 0

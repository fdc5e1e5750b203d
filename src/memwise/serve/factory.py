"""Build the serve app from plain options, in this process or in a Ray Serve replica."""
from __future__ import annotations

import sys
from typing import Any

# The flags a replica needs to build the same app in another process (plain data: it is pickled).
APP_OPTIONS = ("source", "dtype", "device", "revision", "quantize", "threads", "served_name", "max_batch",
               "max_queue", "api_key", "max_step_tokens")


def build_app(options: dict[str, Any]) -> Any:
    """Load the model and build the app from `options` (APP_OPTIONS' values)."""
    import torch
    import memwise
    from memwise.serve.app import DEFAULT_STEP_TOKENS, ServeConfig, create_app
    from memwise.serve.chat import load_chat_template
    from memwise.source import resolve_model
    if options.get("threads") is not None:
        torch.set_num_threads(options["threads"])
    source = options["source"]
    model = memwise.load(source, dtype=options["dtype"], device=options["device"], revision=options["revision"],
                         quantize=options["quantize"])
    template = load_chat_template(resolve_model(source, options["revision"]).directory)
    step_tokens = options.get("max_step_tokens", DEFAULT_STEP_TOKENS)
    config = ServeConfig(options["served_name"] or source, options["max_batch"], options["max_queue"],
                         options["api_key"], template, step_tokens or None)
    if model.synthetic:
        print(f"[{source}: synthetic random weights, the text is meaningless]", file=sys.stderr)
    return create_app(model, config)

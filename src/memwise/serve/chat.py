"""Chat templates: the model's tokenizer_config.json template, rendered with jinja2 as transformers does."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memwise.errors import MemwiseError
from memwise.serve.protocol import ApiError


class ChatTemplate:
    def __init__(self, template: str, special: dict[str, str]):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        # transformers' settings: a sandbox (a template comes with a download), trimmed blocks, and
        # raise_exception for templates that refuse a conversation (e.g. roles out of order).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise MemwiseError(f"tokenizer_config.json: chat_template does not parse ({e})") from None
        self._special = special

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2.exceptions import TemplateError
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except TemplateError as e:
            raise ApiError(400, f"the model's chat template refused the messages: {e}", "messages") from None


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def load_chat_template(directory: Path | None) -> ChatTemplate | None:
    """The template in directory/tokenizer_config.json, or None when there is none (presets, base models)."""
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        return None
    path = directory / "tokenizer_config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MemwiseError(f"{path}: not readable JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):      # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise MemwiseError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    return ChatTemplate(template, special)

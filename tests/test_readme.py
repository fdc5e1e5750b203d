"""The README is documentation that stays true: its API example runs, its quickstart is the real one."""
import re
from pathlib import Path

import torch

import memwise

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

QUICKSTART = [
    "pip install torch==2.13.0 && pip install -e '.[bench]' && memwise bench",
    "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest tests",
]


def section(heading: str) -> str:
    """The README's text under `## heading`, up to the next level-2 heading."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block in text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)]


def test_api_example_runs():
    blocks = [code for lang, code in code_blocks(section("Python API")) if lang == "python"]
    assert blocks, "no ```python block under '## Python API'"
    ns = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md (Python API)", "exec"), ns)

    model, prompt, out = ns["model"], ns["prompt"], ns["out"]
    assert isinstance(model, memwise.LanguageModel) and model.synthetic
    n_prompt = prompt.shape[1]
    assert out.shape == (1, n_prompt + 8) and out.dtype == torch.long
    assert torch.equal(out[:, :n_prompt], prompt)
    generated = out[0, n_prompt:].tolist()
    assert ns["steps"] == generated                                    # stream yields what generate returns
    logits = ns["logits"]
    assert logits.shape == (1, n_prompt, model.spec.vocab_size) and logits.dtype == torch.float32
    assert int(logits[0, -1].argmax()) == generated[0]                 # the first greedy token
    # The prompt is "Hello" in the byte tokenizer, so generate_text produced the same tokens, as text.
    assert model.tokenizer.encode("Hello") == prompt[0].tolist()
    decoded = model.tokenizer.decode(generated)
    assert ns["text"] == decoded
    streamed = "".join(ns["pieces"])                                   # a split last character waits
    assert streamed == decoded or streamed + "\ufffd" == decoded


def test_quickstart_is_the_two_setup_commands():
    blocks = code_blocks(section("Quickstart"))
    assert [(lang, code.strip()) for lang, code in blocks] == [("bash", cmd) for cmd in QUICKSTART]


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines; results and long explanations belong in docs/"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    """Every relative link of README.md and docs/ points at a file or folder that exists, and at a heading
    of it where the link names one."""
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            if re.match(r"[a-z]+:", path):
                continue
            linked = page.parent / path if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken

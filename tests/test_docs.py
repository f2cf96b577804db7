"""Every code example in README.md and docs/*.md runs, so a documented option that raises cannot ship.

- A ```python block is executed in a fresh namespace with a temp dir as the working directory. A block
  that needs what a test cannot start (vLLM, a server, a model download) opts out with the comment
  `# doc: no-run (why)` in its first lines; it must still compile.
- In a ```bash block, every line that starts with `kvtier ` must parse with kvtier's own argument
  parser (options and sub-commands as documented). When the line before the fence is the HTML comment
  `<!-- doc: run -->`, the block's `kvtier` lines are also run, in a temp dir, and must exit 0 (keep
  such blocks few and fast).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvtier.scheduler.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = "# doc: no-run"
RUN_MARK = "<!-- doc: run -->"
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    lang: str
    source: str
    run: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of `path`, with the line number of each opening fence."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        run = start > 0 and lines[start - 1].strip() == RUN_MARK
        found.append(Block(path, start + 1, match.group(1), "\n".join(body) + "\n", run))
        i += 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]
PYTHON = [b for b in ALL if b.lang == "python"]
BASH = [b for b in ALL if b.lang in ("bash", "sh", "shell")]


def kvtier_commands(source: str) -> list[list[str]]:
    """The `kvtier ...` command lines of a shell block, split into arguments (continuations joined,
    comments and redirections dropped)."""
    commands = []
    for line in source.replace("\\\n", " ").splitlines():
        if not line.startswith("kvtier "):
            continue
        words = shlex.split(line, comments=True)
        for stop, word in enumerate(words):
            if word in (">", ">>", "|", "2>", "&&", ";"):
                words = words[:stop]
                break
        commands.append(words[1:])
    return commands


def test_the_docs_have_examples():
    """The README and the design doc carry runnable examples (the extraction found them)."""
    names = {b.path.name for b in PYTHON if NO_RUN not in b.source}
    assert {"README.md", "design.md"} <= names, names
    assert any(b.run for b in BASH), "no `<!-- doc: run -->` shell block left"


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_example_runs(block: Block, tmp_path, monkeypatch):
    code = compile(block.source, block.id, "exec")
    head = block.source.splitlines()[:3]
    if any(line.strip().startswith(NO_RUN) for line in head):
        return  # compiled above; it needs vLLM, a server or a download to run
    if "engines.hf" in block.source:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVTIER_MODELS_DIR", str(tmp_path / "models"))
    exec(code, {"__name__": "__doc_example__"})


@pytest.mark.parametrize("block", BASH, ids=lambda b: b.id)
def test_kvtier_command_lines_parse(block: Block, capsys):
    parser = build_parser()
    for argv in kvtier_commands(block.source):
        try:
            args = parser.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"{block.id}: `kvtier {' '.join(argv)}` does not parse (exit {err.code}): "
                        f"{capsys.readouterr().err.strip()}")
        assert getattr(args, "run", None), f"{block.id}: `kvtier {' '.join(argv)}` names no command"


@pytest.mark.parametrize("block", [b for b in BASH if b.run], ids=lambda b: b.id)
def test_runnable_kvtier_commands_succeed(block: Block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = kvtier_commands(block.source)
    assert commands, f"{block.id}: marked runnable but has no kvtier command"
    for argv in commands:
        assert main(argv) == 0, f"{block.id}: `kvtier {' '.join(argv)}` failed: {capsys.readouterr().err}"


#: docs that other branches add (remove a name once its file has landed)
PENDING_DOCS: set[str] = set()
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    """Every relative link names a file of the repository and, with #anchor, one of its headings."""
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        name, _, anchor = target.partition("#")
        dest = (path.parent / name).resolve() if name else path
        if not dest.exists():
            assert dest.name in PENDING_DOCS, f"{path.name}: link to {target!r}: no such file"
            continue
        if anchor and dest.suffix == ".md":
            headings = {slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
            assert anchor in headings, f"{path.name}: link to {target!r}: no heading with that anchor"

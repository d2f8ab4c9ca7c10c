"""The Python code blocks of ``README.md`` and ``docs/*.md``, run as written.

The convention, for whoever writes a page:

- Every fenced block whose info string is ``python`` (or ``py``, ``python3``) runs. The blocks
  of one page run in order in one namespace of their own, as in a doctest session: a block may
  use what an earlier block of the same page defined. Write them to run top to bottom on a CPU
  with no network: build models with ``lazytensor.tiny.cached_tiny_lm()``, not a hub id.
- A block that cannot run here (it needs a GPU, a hub model, a server elsewhere) starts with
  the line ``# not run: <reason>``; it is reported as skipped with that reason. Later blocks
  must not need what it defines.
- Other fences (``bash``, ``text``, none) are never run.
- Remote blocks: ``LAZYTENSOR_SERVER`` points to a server embedded in this process that serves
  the model of ``cached_tiny_lm()`` as ``"llama"``, so ``remote=True``, ``lt.connect()`` and
  ``client.model("llama")`` work; a literal address such as ``"tcp://gpu-host:5555"`` does not.

A block is compiled with its page as the file name and its own line numbers, so a traceback,
or a lazytensor error naming the user's line, points into the page.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm
from servers import MODEL, embedded

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
NOT_RUN = re.compile(r"#\s*not run:\s*(\S.*)")
#: A fence opens with 3+ backticks or tildes and an optional info string (CommonMark).
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int  # of the block's first line of code in the page, counting from 1
    info: str
    source: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """The reason given on a first line ``# not run: <reason>``, if there is one."""
        first = self.source.lstrip("\n").partition("\n")[0].strip()
        match = NOT_RUN.fullmatch(first)
        return match.group(1) if match else None


def blocks(page: pathlib.Path) -> list[Block]:
    """Every fenced block of ``page``, in order; raises on a fence that is never closed."""
    return parse(page, page.read_text(encoding="utf-8"))


def parse(page: pathlib.Path, text: str) -> list[Block]:
    """The fenced blocks of ``text``, the contents of ``page``; each without the fence's indent."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{page.name}:{i + 1}: the code fence {fence!r} is never closed")
        found.append(Block(page, i + 2, opening["info"].lower(), "\n".join(body) + "\n"))
        i = j + 1
    return found


def python_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page) if block.info in PYTHON]


@dataclass
class Session:
    """One page's namespace, and the line of a block of it that failed, if one did."""

    namespace: dict
    failed: int | None = None


@pytest.fixture(scope="module")
def sessions() -> Iterator[dict[pathlib.Path, Session]]:
    made: dict[pathlib.Path, Session] = {}
    yield made
    for session in made.values():  # close what the blocks opened
        for value in session.namespace.values():
            if isinstance(value, lt.Client):
                value.close()


@pytest.fixture(scope="module")
def docs_server() -> Iterator[str]:
    """An embedded server of the tiny Llama of ``cached_tiny_lm()``, as :data:`MODEL`."""
    from lazytensor_server.registry import load
    from lazytensor_server.service import Service

    with embedded(Service([load(str(cached_tiny_lm()), MODEL)])) as app:
        yield app.endpoint


def test_pages_are_found_and_parse() -> None:
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/architecture.md", "docs/protocol.md"} <= names
    for page in PAGES:
        blocks(page)  # raises on an unclosed fence
    assert any(block.page.name == "README.md" for block in python_blocks())


def test_block_parsing() -> None:
    """Fences of either kind and any indent; the line numbers are the page's."""
    text = (
        "intro\n```python\nif x:\n    y = 1\n```\n- item\n\n  ~~~~py\n"
        "  # not run: needs a GPU\n  ~~~\n  z\n  ~~~~\n```bash\nls\n```\n"
    )
    found = parse(ROOT / "sample.md", text)
    assert [(b.line, b.info, b.source, b.not_run) for b in found] == [
        (3, "python", "if x:\n    y = 1\n", None),
        (9, "py", "# not run: needs a GPU\n~~~\nz\n", "needs a GPU"),
        (14, "bash", "ls\n", None),
    ]
    with pytest.raises(ValueError, match="sample.md:2: the code fence '```' is never closed"):
        parse(ROOT / "sample.md", "text\n```python\nx = 1\n")


@pytest.mark.parametrize("block", python_blocks(), ids=lambda block: block.name)
def test_block_runs(
    block: Block,
    sessions: dict[pathlib.Path, Session],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if block.not_run is not None:
        pytest.skip(f"marked '# not run': {block.not_run}")
    session = sessions.setdefault(block.page, Session({"__name__": "__main__"}))
    if session.failed is not None:
        pytest.skip(f"an earlier block of this page failed (line {session.failed})")
    if re.search(r"\bremote\s*=|\bconnect\(", block.source):
        monkeypatch.setenv("LAZYTENSOR_SERVER", request.getfixturevalue("docs_server"))
        monkeypatch.delenv("LAZYTENSOR_API_KEY", raising=False)
    code = compile("\n" * (block.line - 1) + block.source, str(block.page), "exec")
    session.failed = block.line  # until it has run
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
        exec(code, session.namespace)
    session.failed = None

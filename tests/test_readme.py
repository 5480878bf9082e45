"""Every ```python block of README.md runs as written.

The blocks are run in the order of the document, in one shared namespace, as a reader who pastes
them one after the other into one session would (the residual-VQ block uses the ``x`` of the first
example). One test per block, so a failure names the block and its line in the README; a block
that is added to the README is picked up without touching this file. Blocks assert what their
comments claim where a claim can be checked (shapes, equalities).

Blocks run in a temporary working directory, so a snippet that saves a file leaves nothing in
the checkout.
"""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# an opening fence ```python (alone on its line), the code, the closing fence ```
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)


class Block(NamedTuple):
    line: int  # line of the opening fence in the document, 1-based
    code: str


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order, with the line of each opening fence."""
    return [Block(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


class Session:
    """One namespace in which the blocks run in document order, each at most once.

    ``run(i)`` runs the blocks before ``i`` that have not run yet, then block ``i``. Asking for
    a block at or before the last one run starts a new namespace (a test process that receives
    the tests out of order still runs each block after the ones before it).
    """

    def __init__(self, blocks: list[Block], workdir: Path):
        self.blocks, self.workdir = blocks, workdir
        self.namespace: dict = {}
        self.done = -1

    def _exec(self, i: int) -> None:
        block = self.blocks[i]
        code = compile(block.code, f"README.md, block at line {block.line}", "exec")
        exec(code, self.namespace)

    def run(self, i: int) -> None:
        if i <= self.done:
            self.namespace, self.done = {}, -1
        old = Path.cwd()
        os.chdir(self.workdir)
        try:
            for j in range(self.done + 1, i):
                try:
                    self._exec(j)
                except Exception as exc:  # the earlier block has its own failing test
                    self.done = -1
                    pytest.fail(f"an earlier README block (line {self.blocks[j].line}) failed: {exc!r}")
            self.done = i  # also when block i fails: the next block then runs after it, as a reader's would
            self._exec(i)
        finally:
            os.chdir(old)


BLOCKS = python_blocks(README.read_text())


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session(BLOCKS, tmp_path_factory.mktemp("readme"))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, [b.line for b in BLOCKS]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_block_runs(index, session):
    session.run(index)


# -- the extraction and the session, on small documents ------------------------------------------

DOC = """# Title

```bash
make test
```

```python
a = 1
```

text with ```python inline``` fences

```python
b = a + 1
assert b == 2
```

```py
not_python_fenced = 1
```
"""


def test_python_blocks_finds_python_fences_only_with_their_lines():
    blocks = python_blocks(DOC)
    assert blocks == [Block(7, "a = 1\n"), Block(13, "b = a + 1\nassert b == 2\n")]
    assert DOC.splitlines()[blocks[1].line - 1] == "```python"


def test_session_runs_blocks_in_order_in_one_namespace(tmp_path):
    s = Session(python_blocks(DOC), tmp_path)
    s.run(1)  # runs block 0 first: b = a + 1 needs a
    assert s.namespace["b"] == 2
    s.run(0)  # out of order: a fresh namespace
    assert "b" not in s.namespace and s.namespace["a"] == 1


def test_session_reports_a_failing_block_with_its_line(tmp_path):
    doc = DOC.replace("assert b == 2", "assert b == 3")
    s = Session(python_blocks(doc), tmp_path)
    with pytest.raises(AssertionError) as info:
        s.run(1)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == "README.md, block at line 13" and frames[-1].lineno == 2


def test_session_names_the_earlier_block_that_failed(tmp_path):
    doc = DOC.replace("a = 1", "a = undefined_name")
    s = Session(python_blocks(doc), tmp_path)
    with pytest.raises(pytest.fail.Exception, match="earlier README block \\(line 7\\) failed"):
        s.run(1)


def test_blocks_run_in_a_scratch_directory(tmp_path):
    s = Session([Block(1, "import pathlib\npathlib.Path('out.txt').write_text('x')\n")], tmp_path)
    s.run(0)
    assert (tmp_path / "out.txt").exists() and not (Path.cwd() / "out.txt").exists()

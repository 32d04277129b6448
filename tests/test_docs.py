"""Every ```python block of README.md and docs/*.md runs as written (issue 16), and every
relative link between those pages resolves (issue 22: the README is a front page linking to docs/).

The blocks of one file run in order in one namespace (a later block may use
an earlier one's names, as a reader following the page would), in a fresh
Python process in a temporary folder. Blocks that are not meant to run
(signatures, shell sessions) use another fence (```text, ```bash).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_work, subprocess_result, popen

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Runs the blocks given as JSON [(line, code), ...] in one namespace; names the failing block.
RUNNER = """
import json, sys
ns = {"__name__": "__main__"}
blocks = json.loads(sys.argv[2])
for line, code in blocks:
    try:
        exec(compile(code, f"{sys.argv[1]}:{line}", "exec"), ns)
    except BaseException:
        print(f"the python block at {sys.argv[1]} line {line} failed", file=sys.stderr)
        raise
print(f"ran {len(blocks)} blocks")
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` of every ```python block of ``path``."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            start, i = i + 1, i + 1
            while not lines[i].strip().startswith("```"):
                i += 1
            blocks.append((start, "\n".join(lines[start:i])))
        i += 1
    return blocks


def test_the_pages_hold_python_blocks():
    """The test below is not vacuous: README has its two library blocks, architecture.md one."""
    counts = {p.name: len(python_blocks(p)) for p in PAGES}
    assert counts["README.md"] >= 2 and counts["architecture.md"] >= 1, counts


@subprocess_work("python_block_runs")
def _python_block_runs(tmp):
    """Every page's blocks, one fresh process per page (subprocess work, see conftest.py):
    ``{page name: (return code, stdout, stderr)}``."""
    out = {}
    for page in PAGES:
        blocks = python_blocks(page)
        if blocks:
            proc = popen([sys.executable, "-c", RUNNER, str(page.relative_to(ROOT)), json.dumps(blocks)],
                         cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = proc.communicate(timeout=900)
            out[page.name] = (proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def python_block_runs(request):
    return subprocess_result(request)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs_as_written(page, python_block_runs):
    returncode, stdout, stderr = python_block_runs[page.name]
    assert returncode == 0, stderr[-4000:]
    assert stdout.strip().endswith(f"ran {len(python_blocks(page))} blocks"), stdout[-2000:]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of ``path`` (lower case, punctuation dropped, spaces as -)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#+\s+(.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    """Each ``[text](target)`` outside code fences names a file that exists, and a ``#anchor`` a heading of it."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"

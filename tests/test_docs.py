"""The project's documents stay true: every Python block of the README runs as written, the docs
cite only documents that ship with the project, and the documented ``-m slow`` selects tests."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    """The fenced ```python blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


README_BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_readme_has_python_blocks():
    assert len(README_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_python_block_runs_on_its_own(index, tmp_path):
    """Each block in a fresh interpreter (so none leans on another's names), in a scratch
    folder (so none writes into the checkout)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", README_BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"README python block {index + 1} failed:\n"
                                  f"{README_BLOCKS[index]}\n--- stderr ---\n{proc.stderr[-3000:]}")


# Documents a user of the project does not have: internal design notes and the issue tracker.
FOREIGN = re.compile(r"\bDESIGN\b|\b[Ii]ssue'?s?\b|[Cc]losing note")
SHIPPED = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "csm_ext").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
           *sorted((ROOT / "benchmarks").glob("*.sh")), *sorted((ROOT / "scripts").glob("*.sh")),
           *sorted((ROOT / "csrc").rglob("*.[ch]*"))]


def test_docs_cite_only_shipped_documents():
    hits = []
    for path in SHIPPED:
        for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if FOREIGN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "references to documents users do not have:\n" + "\n".join(hits)


def test_documented_markers_select_tests():
    """`scripts/test.sh -m slow` (documented in the README) must run something."""
    for marker in ("slow", "cuda"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m",
                               marker, str(ROOT / "tests")], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        collected = [line for line in proc.stdout.splitlines() if "::" in line]
        assert collected, f"-m {marker} selects no test"

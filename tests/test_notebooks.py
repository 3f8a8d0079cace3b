"""Every notebook runs top to bottom (they are walkthroughs, kept small enough for CI).

The lab-course notebooks (02-04) load the trained demo chain when runs/demo/ holds one; here they
are pointed at an empty folder, so CI always runs them on tiny untrained models (a few seconds each).
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_lab_course_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_corpus.ipynb",
        "02_speech_input.ipynb",
        "03_speech_output.ipynb",
        "04_duplex.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FREEZE_OMNI_RUNS", str(tmp_path / "runs"))  # no trained chain: the tiny untrained models
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # Every cell that draws a figure shows it (a backend that renders nothing would pass silently).
    shows = re.compile(r"^(plt\.show\(\)|show\(fig\))|; plt\.show\(\)", re.M)
    drawing = [c for c in nb.cells if c.cell_type == "code" and shows.search(c.source)]
    assert drawing
    assert all(any("image/png" in o.get("data", {}) for o in c.outputs) for c in drawing), "a figure was not shown"

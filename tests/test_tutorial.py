"""docs/tutorial.py (a jupytext percent script) runs as a notebook: every cell, in a fresh kernel."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_tutorial_notebook_runs_every_cell(tmp_path):
    jupytext = pytest.importorskip("jupytext", reason="the test extra (pip install -e '.[test]') brings jupytext")
    nbclient = pytest.importorskip("nbclient", reason="the test extra brings nbclient and ipykernel")
    notebook = jupytext.read(ROOT / "docs" / "tutorial.py")
    assert not any(cell.get("outputs") for cell in notebook.cells)  # the repository holds no outputs
    # Raises CellExecutionError, naming the cell, if any cell raises.
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 5, text  # the trace, the chains, the curves, the reconstructions, the samples
    assert "resumed parameters equal the uninterrupted run's: True" in text
    assert "accept decisions equal: True" in text
    assert "0 of 20 moves accepted" in text  # the sweep's largest scale is rejected every step

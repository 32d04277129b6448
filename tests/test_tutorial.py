"""docs/tutorial.py (a jupytext percent script) runs as a notebook: every cell, in a fresh kernel."""

import json
import textwrap
from pathlib import Path

import pytest

from conftest import background, background_result, run_script

ROOT = Path(__file__).resolve().parents[1]

# Executes the notebook in a fresh kernel (in a subprocess, as background work: see conftest.py)
# and writes its code cells' outputs as JSON to argv[1]. Raises CellExecutionError, naming the
# cell, if any cell raises.
EXECUTE = textwrap.dedent("""
    import json, sys
    import jupytext, nbclient
    notebook = jupytext.read("docs/tutorial.py")
    stored = [cell.get("outputs") for cell in notebook.cells]
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": sys.argv[2]}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    with open(sys.argv[1], "w") as f:
        json.dump({"stored": any(stored), "outputs": outputs}, f)
""")


@background("tutorial_run")
def _tutorial_run(tmp):
    result = tmp / "outputs.json"
    run_script("-c", EXECUTE, result, tmp, timeout=900)
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def tutorial_run(request):
    return background_result(request)


def test_the_tutorial_notebook_runs_every_cell(tutorial_run):
    pytest.importorskip("jupytext", reason="the test extra (pip install -e '.[test]') brings jupytext")
    pytest.importorskip("nbclient", reason="the test extra brings nbclient and ipykernel")
    assert not tutorial_run["stored"]  # the repository holds no outputs
    outputs = tutorial_run["outputs"]
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 5, text  # the trace, the chains, the curves, the reconstructions, the samples
    assert "resumed parameters equal the uninterrupted run's: True" in text
    assert "accept decisions equal: True" in text
    assert "0 of 20 moves accepted" in text  # the sweep's largest scale is rejected every step

"""docs/tutorial.py (a jupytext percent script) runs as a notebook: every cell, in a fresh kernel."""

import ast
import json
import textwrap
from pathlib import Path

import pytest

from conftest import subprocess_work, subprocess_result, run_script

ROOT = Path(__file__).resolve().parents[1]

# Executes the notebook in a fresh kernel (in a subprocess, as subprocess work: see conftest.py)
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


@subprocess_work("tutorial_run")
def _tutorial_run(tmp):
    result = tmp / "outputs.json"
    run_script("-c", EXECUTE, result, tmp, timeout=900)
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def tutorial_run(request):
    return subprocess_result(request)


def test_the_tutorial_draws_its_figures_with_the_package_s_functions():
    """The tutorial imports the figures `savae compare` writes (issue 22) instead of re-implementing
    them: read from its source, so the default run checks it without executing the notebook."""
    tree = ast.parse((ROOT / "docs" / "tutorial.py").read_text())
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert ("savae_jax.experiments", "figures") in imported
    called = {f"{node.func.value.id}.{node.func.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name)}
    assert {"figures.traces_figure", "figures.histories_figure", "figures.grid_figures"} <= called, called
    defined = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert not [name for name in defined if any(word in name for word in ("figure", "plot", "grid", "image"))], defined


# Slow tier: the notebook run (about a minute of one core in a fresh kernel); the default run checks
# its figures' source above and runs the docs' code blocks (test_docs.py).
@pytest.mark.slow
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

"""SA as a global optimiser: 10-D Rastrigin and Ackley, vmapped chains (issues 3 and 13).

The cheap version of the claim of experiments/dual_annealing.py, through the
script's own ``run_sa``: 32 chains instead of 64, the script's defaults
otherwise (K = 16 Cauchy proposals of scale 2 relative to the box (2 on
Rastrigin's, 12.8 on Ackley's) that each move a coordinate with probability
1/D, 1000 steps, temperature 1 -> 1e-3, an L-BFGS polish of 20 steps every
100, the search kept to the box), so 18,000 function evaluations per chain, fewer than scipy's
dual_annealing uses by itself on these problems (about 21,000 and 22,500).
Against it, the annealer as it was before: every coordinate moved at once
(``fraction=1``), by Cauchy jumps of relative scale 0.1.

Bounds were set from runs with seeds 0, 1, 2 (measured, 32 chains each; below),
with margin; the test runs seed 0.
"""


import json
import textwrap

import numpy as np
import pytest

from conftest import subprocess_work, subprocess_result, run_script

DIM, CHAINS, K, STEPS = 10, 32, 16, 1000

# Measured (bounded, issue 26): fraction of 32 chains within 1e-2 of the global minimum, seeds 0, 1, 2.
#   one coordinate per proposal (scale 2):  Rastrigin 1.0, 1.0, 1.0;       Ackley 1.0, 1.0, 1.0
#   every coordinate at once (scale 0.1):   Rastrigin 0.031, 0.062, 0.062; Ackley 1.0, 1.0, 1.0
# (T0 = 1 and scale 2, the defaults since issue 26; an empty coordinate mask moves one coordinate.
# At scale 1, the default before, the sparse rates were 1.0 as well.)
# (Before the scale was relative to the box, Ackley's full moves of absolute scale 0.1 found it in
# 0.53-0.78: relative to Ackley's wide box, full moves are not what fails there.)

# The four runs (two problems, sparse and full moves), in a subprocess (subprocess work, see
# conftest.py): about a minute of one core.
RUNS = textwrap.dedent(f"""
    import json
    from savae_jax.experiments import dual_annealing as D
    from savae_jax.experiments import problems

    out = {{}}
    for problem in ("rastrigin", "ackley"):
        for label, fraction, scale in (("sparse", 1.0 / {DIM}, D.DEFAULT_SCALE), ("full", 1.0, 0.1)):
            best, points, _ = D.run_sa(problems.PROBLEMS[problem], {CHAINS}, {STEPS}, {K}, {DIM}, 0, polish_steps=20,
                                       polish_every=100, scale=scale, fraction=fraction)
            out[problem + "/" + label] = best.tolist()
            out[problem + "/" + label + "/inside"] = bool(abs(points).max() <= problems.PROBLEMS[problem].upper)
    print("RESULT " + json.dumps(out))
""")


@subprocess_work("optimisation_runs")
def _optimisation_runs(tmp):
    log = run_script("-c", RUNS)
    line = [ln for ln in log.splitlines() if ln.startswith("RESULT ")][-1]
    return {k: np.asarray(v) for k, v in json.loads(line[len("RESULT "):]).items()}


@pytest.fixture(scope="module")
def optimisation_runs(request):
    return subprocess_result(request)


@pytest.mark.experiment
@pytest.mark.parametrize("problem", ["rastrigin", "ackley"])
def test_coordinate_moves_with_polish_find_the_global_minimum(problem, optimisation_runs):
    sparse, full = optimisation_runs[f"{problem}/sparse"], optimisation_runs[f"{problem}/full"]
    assert optimisation_runs[f"{problem}/sparse/inside"] and optimisation_runs[f"{problem}/full/inside"]
    assert sparse.shape == full.shape == (CHAINS,)
    assert np.all(np.isfinite(sparse)) and np.all(sparse >= -1e-5)  # f >= 0 up to float32 rounding
    assert float(np.mean(sparse < 1e-2)) >= 0.9  # measured 1.0
    assert float(np.median(sparse)) < 1e-4
    if problem == "rastrigin":  # moving every coordinate at once wastes the budget (measured 0.03-0.06)
        assert float(np.mean(full < 1e-2)) <= float(np.mean(sparse < 1e-2)) - 0.5

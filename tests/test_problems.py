"""The test-function registry of `savae dual-annealing` (issue 26): each formula, box and minimum."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from savae_jax.experiments import dual_annealing as D
from savae_jax.experiments.problems import PROBLEMS, STYBLINSKI_TANG_MIN

from conftest import subprocess_work, subprocess_result, run_script

# The known minimisers (Surjanovic & Bingham's Virtual Library of Simulation Experiments), per coordinate.
ARGMIN = {"rastrigin": 0.0, "ackley": 0.0, "griewank": 0.0, "levy": 1.0, "rosenbrock": 1.0,
          "styblinski_tang": -2.903534027771177, "zakharov": 0.0, "alpine": 0.0, "schwefel": 420.968746}


def test_the_registry_holds_at_least_eight_functions_and_one_optimum_near_the_edge():
    assert len(PROBLEMS) >= 8 and set(ARGMIN) == set(PROBLEMS)
    schwefel = PROBLEMS["schwefel"]
    assert (schwefel.upper - ARGMIN["schwefel"]) / (schwefel.upper - schwefel.lower) < 0.1


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("dim", [2, 10])
def test_each_function_takes_its_minimum_at_its_known_minimiser_inside_the_box(name, dim):
    problem = PROBLEMS[name]
    x_star = np.full(dim, ARGMIN[name])
    assert problem.lower <= ARGMIN[name] <= problem.upper
    f_star = problem.minimum(dim)
    # float64 at a minimiser given to 7-10 digits: Schwefel's 420.968746 is off by ~1e-7 in x, which
    # costs ~1e-10 in f; 1e-6 max(1, |f*|) is far above that and far below any other basin.
    assert abs(problem.numpy(x_star) - f_star) <= 1e-6 * max(1.0, abs(f_star))
    assert bool(problem.success(np.array([f_star, f_star + 0.02 * max(1.0, abs(f_star))]), dim).tolist() == [True, False])
    # Random points of the box are never below the minimum.
    points = np.random.default_rng(0).uniform(problem.lower, problem.upper, (256, dim))
    assert min(problem.numpy(p) for p in points) >= f_star


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_the_jax_and_numpy_versions_agree(name):
    problem = PROBLEMS[name]
    points = np.random.default_rng(1).uniform(problem.lower, problem.upper, (8, 10))
    for p in points:
        want = problem.numpy(p)
        got = float(problem.loss(jnp.asarray(p, jnp.float32)))
        # float32 against float64: the input rounded to float32 (relative 6e-8) and ~10-40 float32
        # operations; Zakharov's fourth power of a sum reaches 1e10, Schwefel's 4190 - sum cancels:
        # 1e-5 relative to the terms' scale.
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5 * (1.0 + abs(want)) + 1e-3), (p, got, want)


def test_styblinski_tang_minimum_scales_with_the_dimension():
    assert PROBLEMS["styblinski_tang"].minimum(10) == pytest.approx(10 * STYBLINSKI_TANG_MIN)


@subprocess_work("dual_table_run")
def _dual_table_run(tmp):
    """A tiny `savae dual-annealing` on two problems, in a subprocess (subprocess work, see conftest.py):
    (its --json numbers, its output)."""
    log = run_script("-m", "savae_jax.cli", "dual-annealing", "--runs", "4", "--steps", "60", "--proposals", "4",
                     "--dim", "3", "--polish-steps", "0", "--problems", "levy", "schwefel", "--json", tmp / "out.json")
    return json.loads((tmp / "out.json").read_text()), log


@pytest.fixture(scope="module")
def dual_table_run(request):
    return subprocess_result(request)


# Slow tier: a dual-annealing comparison end to end; the default tier keeps the problems and the
# bounded optimizers in-process.
@pytest.mark.slow
def test_the_comparison_table_scores_success_inside_the_box(dual_table_run):
    """A tiny `savae dual-annealing` on two problems: ours beside scipy, every best point inside."""
    out, log = dual_table_run
    assert [(r["problem"], r["method"]) for r in out] == [
        ("levy", "savae_jax SA"), ("levy", "scipy dual_annealing"),
        ("schwefel", "savae_jax SA"), ("schwefel", "scipy dual_annealing")]
    assert all(r["inside"] == 1.0 for r in out)
    assert all(0.0 <= r["success"] <= 1.0 and r["median_gap"] >= -1e-3 for r in out)
    assert "success: best - f* < 1e-2 max(1, |f*|) at a point inside the box" in log


@pytest.mark.parametrize("flags, message", [
    (["--t0", "-1"], "--t0 must be a positive number"),
    (["--scale", "0"], "--scale must be a positive number"),
    (["--problems", "sphere"], "invalid choice: 'sphere'"),
])
def test_bad_flags_of_the_comparison_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        D.main(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err

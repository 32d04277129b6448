"""experiments/compare.py: outputs, fair budgets, exact resume from a damaged checkpoint, bad input.

Killing a run (SIGKILL) and resuming it, including mid-way through a two-phase method
(sa-refine), is tested in tests/test_faults.py, which shares one reference run between
the SIGKILL and determinism tests.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
from savae_jax.experiments import compare, figures, registry, report  # noqa: E402
from savae_jax.experiments import workdir as workdir_lib  # noqa: E402
from conftest import subprocess_work, subprocess_result, run_script, small_vae, without_seconds  # noqa: E402


SMALL = ["--hidden", "32", "--latents", "4", "--batch-size", "100",
         "--set", "sa.proposals=8", "--set", "sa-refine.proposals=8", "--set", "sa-refine-naive.proposals=8", "--set", "sa-pt.proposals=4",
         "--set", "langevin-sa.proposals=4", "--set", "es.pairs=4", "--set", "es-refine.pairs=4", "--quiet"]


# The README's comparison with every default but the budget: 3000 evaluations per method instead
# of 15000 (the same code paths at a fifth of the training; 64 s instead of 110 s on 2 cores).
DEFAULT_FLAGS = ["--quiet", "--budget-evals", "3000"]
BUDGET = 3000


def step_cost(name: str, flags=SMALL) -> int:
    """Evaluations per step of a method's last phase at the settings of ``flags``."""
    config = compare.resolve_config(compare.build_parser().parse_args(["--workdir", "unused", *flags]))
    return registry.build_phases(name, config.method_config[name], small_vae(config.hidden, config.latents)[1],
                                 batch_size=config.batch_size)[-1].optimizer.cost


def test_compare_writes_every_output_with_fair_budgets(digits_comparison):
    """The README's `savae compare` (every method, every default but the budget: the pinned run below): its files."""
    tmp_path, results = digits_comparison
    assert list(results) == list(registry.METHODS)
    # Every file written is one of the comparison's own (those --overwrite may delete): the
    # performance profile once was not, and --overwrite then refused every finished run.
    assert (tmp_path / "performance_profile.png").is_file()
    assert workdir_lib.foreign_files(tmp_path, compare.OUTPUTS) == []
    for name, entry in results.items():
        assert list(entry["seeds"]) == ["0"]
        r = entry["seeds"]["0"]
        # Every method spends the budget to within one step's cost, never more.
        cost = step_cost(name, DEFAULT_FLAGS)
        assert BUDGET - cost < r["evals"] <= BUDGET, (name, r["evals"], cost)
        # The validation gate (on by default) returns the best-validation parameters: their test
        # score is the score of the row (or the initial parameters) it names.
        rows = r["history"]
        assert r["best_step"] == min([(row["val_neg_elbo"], row["step"]) for row in rows])[1] or (
            r["best_step"] == 0 and all(row["best_step"] == 0 for row in rows))
        if r["best_step"]:
            kept_row = next(row for row in rows if row["step"] == r["best_step"])
            assert r["test_neg_elbo"] == kept_row["test_neg_elbo"]
        assert r["last_test_neg_elbo"] == rows[-1]["test_neg_elbo"]
        assert 20 < r["test_neg_elbo"] < 80
        # IWAE-100 (the default final evaluation) is the tighter bound. Its gap is the posterior's
        # misfit: below 2 nats for the methods that take gradient steps here (measured 0.32-0.87);
        # sa and es from the random init train little (measured 6.09 and 3.01).
        assert 0.0 <= r["elbo_iwae_gap"] < (2.0 if name not in ("sa", "es") else 10.0)
        assert r["test_neg_iwae"] == pytest.approx(r["test_neg_elbo"] - r["elbo_iwae_gap"])
        assert 0 <= r["active_units"] <= 20 and len(r["diagnostics"]["kl_per_dim"]) == 20
        assert [row["evals"] for row in rows] == sorted(row["evals"] for row in rows)
        if name == "sa-pt":  # a replica exchange logs the coldest replica's and the swap rate
            assert {"temperature", "acceptance_rate", "swap_rate"} <= set(rows[-1])
        elif name.startswith(("sa", "langevin")):
            assert {"temperature", "radius", "acceptance_rate"} <= set(rows[-1])
        # One seed: the summary is that seed's numbers, with no sd.
        assert entry["summary"]["test_neg_elbo"] == {"mean": r["test_neg_elbo"], "sd": None, "n": 1}
    # The refinements run Adam first, then annealing from Adam's parameters; the noise-aware one
    # decides on 512 other examples, the naive one on its selection batch.
    for name in registry.REFINEMENTS:
        rows = results[name]["seeds"]["0"]["history"]
        assert rows[0]["phase"] == "adam" and rows[-1]["phase"] == ("es" if name == "es-refine" else "sa")
        assert results[name]["seeds"]["0"]["phase_ends"]["adam"] == [
            row for row in rows if row["phase"] == "adam"][-1]["test_neg_elbo"]
    # Its decision costs 2 + 2 * 512 / 128 = 10 evaluations a step on top (counted in the budget).
    assert step_cost("sa-refine", DEFAULT_FLAGS) == step_cost("sa-refine-naive", DEFAULT_FLAGS) + 10
    saved = json.loads((tmp_path / "results.json").read_text())
    assert without_seconds(saved) == without_seconds(json.loads(json.dumps(results)))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["budget_evals"] == BUDGET and config["backend"] == "cpu"
    assert "jax" in config["versions"]
    summary = (tmp_path / "summary.md").read_text()
    # The ranked table, the refinements' table, the time-to-result table.
    assert summary.count("\n| ") == 1 + len(registry.METHODS) + 1 + len(registry.REFINEMENTS) + 1 + len(registry.METHODS)
    for name in registry.METHODS:
        assert (tmp_path / f"history_{name}_seed0.csv").read_text().startswith("phase,step,evals")
        assert (tmp_path / f"reconstructions_{name}.png").stat().st_size > 0
    for png in ("test_neg_elbo_vs_seconds.png", "test_neg_elbo_vs_evals.png", "sa_traces.png", "performance_profile.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    check_curves_start_at_the_start(results)
    check_traces(tmp_path, results)
    check_report(tmp_path, results)


def check_curves_start_at_the_start(results):
    """Every method's history begins with the step-0 row of the shared initial parameters: evaluations
    0, no training loss, and one test (and validation) -ELBO for all methods."""
    firsts = [entry["seeds"]["0"]["history"][0] for entry in results.values()]
    assert all((f["step"], f["evals"], f["seconds"], f["train_loss"], f["best_step"]) == (0, 0, 0.0, None, 0)
               for f in firsts)
    assert len({f["test_neg_elbo"] for f in firsts}) == 1 and len({f["val_neg_elbo"] for f in firsts}) == 1
    assert 40 < firsts[0]["test_neg_elbo"] < 80  # untrained (digits, 64 pixels; measured 50.65)
    assert all(entry["seeds"]["0"]["history"][1]["step"] > 0 for entry in results.values())
    # So every plotted curve starts at (0 evaluations, that value), on a log-scaled axis too.
    fig = figures.curves_figure(results, "evals", log_scale=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and len(ax.get_lines()) == len(results)
    assert {(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()} == {
        (0.0, firsts[0]["test_neg_elbo"])}


def check_traces(workdir, results):
    """trace_<method>_seed0.csv has one row per step, and sa_traces.png plots one point per annealing step."""
    traces = {}
    for name, entry in results.items():
        run = entry["seeds"]["0"]
        trace = traces[name] = report.read_trace(workdir / f"trace_{name}_seed0.csv")
        assert trace["step"].tolist() == list(range(1, run["steps"] + 1)), name
        adam_steps = max([row["step"] for row in run["history"] if row["phase"] == "adam"], default=0)
        annealing = report.annealing_steps(trace)
        expected = 0 if name in ("adam", "rmsprop", "sgd") else run["steps"] - adam_steps
        assert len(annealing.get("step", [])) == expected, name
        if expected:
            assert annealing["step"].tolist() == list(range(adam_steps + 1, run["steps"] + 1))
            # The last traced step's cumulative acceptance rate is the last history row's.
            assert annealing["acceptance_rate"][-1] == pytest.approx(run["history"][-1]["acceptance_rate"], rel=1e-6)
    fig = figures.traces_figure(traces)
    titles = [ax.get_title() for ax in fig.axes[::3]]
    annealers = [n for n in results if n not in ("adam", "rmsprop", "sgd")]
    assert [t.split(":")[0] for t in titles] == annealers
    for row, name in enumerate(annealers):
        n = len(report.annealing_steps(traces[name])["step"])
        for ax in fig.axes[3 * row: 3 * row + 3]:  # temperature, acceptance, dL
            if not ax.get_lines():  # a constant temperature (ES decides at T = 0) is written, not drawn
                assert name.startswith("es") and "at every step" in ax.texts[0].get_text(), name
                continue
            assert len(ax.get_lines()[0].get_xdata()) == n, (name, ax.get_ylabel())


def check_report(workdir, results):
    """report.html embeds every figure (base64 PNG) and the ranked table; summary.md links them."""
    import base64
    import re

    page = (workdir / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    names = report.figure_files(workdir, results)
    assert len(names) == 4 + 2 * len(results) and len(embedded) == len(names)
    assert base64.b64decode(embedded[0]) == (workdir / names[0]).read_bytes()
    assert page.count("<tr>") == (1 + len(results)) + (1 + len(registry.REFINEMENTS)) + (1 + len(results))
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    summary = (workdir / "summary.md").read_text()
    assert all(f"]({name})" in summary for name in names)


# Slow tier: --seeds end to end; the default tier keeps the statistics' unit tests and the README's
# comparison.
@pytest.mark.slow
def test_seeds_give_mean_and_sd_and_each_seed_equals_its_own_run(tmp_path):
    """--seeds 0,1: every method runs once per seed; a seed's run equals a one-seed run with that
    seed (bitwise: the seeds share nothing), and the summary is their mean and sample sd."""
    flags = ["--methods", "adam", "--budget-evals", "60", "--eval-every", "5", "--eval-iwae", "0", *SMALL]
    both = compare.main(["--workdir", str(tmp_path / "both"), "--seeds", "0,1", *flags])["adam"]
    one = compare.main(["--workdir", str(tmp_path / "one"), "--seed", "1", *flags])["adam"]
    assert without_seconds(both["seeds"]["1"]) == without_seconds(one["seeds"]["1"])
    values = [both["seeds"][s]["test_neg_elbo"] for s in ("0", "1")]
    assert values[0] != values[1]
    stat = both["summary"]["test_neg_elbo"]
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
    assert stat["sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, rel=1e-12)
    assert " ± " in (tmp_path / "both" / "summary.md").read_text()
    # The curve is the mean over the seeds, with a min-to-max band.
    ax = figures.curves_figure({"adam": both}, "evals").axes[0]
    curves = np.array([[row["test_neg_elbo"] for row in both["seeds"][s]["history"]] for s in ("0", "1")])
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), curves.mean(axis=0), rtol=1e-12)
    assert len(ax.collections) == 1  # the band
    for seed in (0, 1):
        assert (tmp_path / "both" / "params" / "adam" / f"seed{seed}").is_dir()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--methods", "adam", "--budget-evals", "90", "--eval-every", "5",
            "--checkpoint-every", "5", *SMALL]
    first = compare.main(args)
    folder = tmp_path / "checkpoints" / "adam" / "seed0"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    assert len(steps) == 2
    # Damage the newest checkpoint's array store: the run restarts from the one before.
    newest = folder / str(steps[-1]) / "state"
    for path in newest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    again = compare.main([*args, "--resume"])
    assert "unreadable" in capsys.readouterr().out
    assert without_seconds(again) == without_seconds(first)


@pytest.mark.parametrize("flags, needle", [
    (["--methods", "adam,newton"], "--methods"),
    (["--budget-evals", "0"], "--budget-evals"),
    (["--budget-seconds", "-1"], "--budget-seconds"),
    (["--set", "sa.scale"], "--set"),
    (["--set", "bfgs.lr=1"], "--set"),
    (["--set", "adam.lr=-1"], "adam.lr"),
    (["--set", "sa.proposal=quantum"], "proposal"),
    (["--eval-iwae", "-3"], "--eval-iwae"),
    (["--beta", "-1"], "--beta"),
    (["--model", "transformer"], "--model"),
    (["--dataset", "svhn"], "--dataset"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--eval-every", "10", "--checkpoint-every", "15"], "--checkpoint-every"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--seeds", "0", "--seed", "1"], "--seed"),
    (["--validation", "1.5"], "--validation"),
    (["--set", "sa-refine.decision_size=1"], "sa-refine.decision_size"),
    (["--set", "sa-refine.acceptance=confident", "--set", "sa-refine.level=0.7"], "level"),
])
def test_bad_input_is_refused_before_training(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--workdir", str(tmp_path / "w"), *SMALL, *flags])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_resume_with_a_different_config_is_refused_and_shows_the_difference(tmp_path, capsys):
    compare.main(["--workdir", str(tmp_path), "--methods", "adam", "--budget-evals", "30", *SMALL])
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(SystemExit):
        compare.main(["--workdir", str(tmp_path), "--methods", "adam", "--budget-evals", "60",
                      *SMALL, "--resume"])
    err = capsys.readouterr().err
    assert "--resume" in err and "budget_evals: saved 30, now 60" in err
    with pytest.raises(SystemExit):  # and without --resume the old run is not overwritten
        compare.main(["--workdir", str(tmp_path), "--methods", "adam", "--budget-evals", "30", *SMALL])
    assert "--workdir" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_bytes() == before


def test_unwritable_workdir_is_refused(tmp_path, capsys):
    if os.geteuid() == 0:
        target = tmp_path / "file"  # root can write anywhere: use a path under a file instead
        target.write_text("x")
        workdir = target / "sub"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        workdir = locked / "sub"
    with pytest.raises(SystemExit):
        compare.main(["--workdir", str(workdir), *SMALL])
    assert "--workdir" in capsys.readouterr().err


# The README's digits comparison (`python experiments/compare.py`, every default but the budget,
# 3000 evaluations: DEFAULT_FLAGS), per method: (test -ELBO at the kept best-validation parameters,
# test -ELBO at the last parameters, test -IWAE-100, evals, steps). Re-pinned in issue 23 at 3000
# evaluations (it pinned the 15000 of the README's command before; the same code paths at a fifth
# of the training) on an AMD EPYC with AVX-512, with the sa-pt method added. A change that moves any
# of them is seen here. The runs are bitwise reproducible on one machine; the tolerances only admit
# another CPU's rounding (docs/distributed.md). evals and steps are compared exactly everywhere.
PINNED_DIGITS = {
    "adam": (22.87918472290039, 22.87918472290039, 22.552289962768555, 3000, 1000),
    "rmsprop": (22.923973083496094, 22.923973083496094, 22.511741638183594, 3000, 1000),
    "sgd": (23.830032348632812, 23.830032348632812, 23.401241302490234, 3000, 1000),
    "sa": (41.849876403808594, 41.849876403808594, 35.75657653808594, 2990, 46),
    "sa-refine": (23.250431060791016, 23.250431060791016, 22.92885398864746, 3000, 520),
    "sa-refine-naive": (23.256893157958984, 23.256893157958984, 22.93231964111328, 2995, 523),
    "sa-pt": (23.270870208740234, 23.26348304748535, 22.92964744567871, 2940, 520),
    "langevin-sa": (25.42746925354004, 25.42746925354004, 24.56188201904297, 3000, 100),
    "es": (44.949615478515625, 44.949615478515625, 41.94355392456055, 2960, 40),
    "es-refine": (23.25847625732422, 23.25847625732422, 22.93039894104004, 2980, 520),
}
# Relative tolerance per method. 1e-6 (about 8 float32 ulps of these ~20-50 nat values) for the
# annealing and ES methods: on the three CPUs measured (AMD EPYC with AVX-512, Intel Xeon Sapphire
# Rapids, AMD EPYC with AVX2 only) they ended within 2.5e-7 of the pins, their decisions unchanged.
# The three pure gradient methods take 1000 steps whose every update feeds the next: a last-bit
# difference in one step's gradient is carried and amplified to the end. An AVX2-only CPU runs the
# matmuls with other vector kernels than an AVX-512 one, so its dot products add in another order:
# measured on the AVX2 EPYC (2026-12-07, the code of issue 25), adam ended 1.9e-5 and sgd 8.7e-6
# from the AVX-512 pins. GRADIENT_ACROSS_CPUS admits that drift with a factor 5 of margin, and is
# 20x under the distance between the adam and rmsprop pins (2.0e-3), two runs that differ only in
# the update rule: a change of behaviour still shows.
GRADIENT_ACROSS_CPUS = 1e-4
# rmsprop drifts more: optax.rmsprop scales by jax.lax.rsqrt(nu + eps), which XLA's CPU backend
# computes from the processor's approximate reciprocal square root instruction and a Newton step;
# AMD's and Intel's approximations differ in the last bits (14 % of random inputs give another
# float32 than the correctly rounded 1/sqrt), on top of the matmul order above. Measured: Intel
# against AMD (AVX-512 both) 2e-4 at 15000 evaluations with the code of issue 14; the AVX2 EPYC
# against the AVX-512 pins 4.4e-4 at 3000 evaluations (2026-12-07).
RMSPROP_ACROSS_CPUS = 1e-3
TOLERANCE = {"adam": GRADIENT_ACROSS_CPUS, "sgd": GRADIENT_ACROSS_CPUS, "rmsprop": RMSPROP_ACROSS_CPUS}


@subprocess_work("digits_comparison")
def _digits_comparison(tmp):
    """`python experiments/compare.py` with every default, in a subprocess: ``(workdir, results.json)``.

    One run serves the pinned numbers and every check of the comparison's outputs (files, budgets,
    the gate, traces, report.html), so CI runs the README's command once.
    """
    workdir = tmp / "w"
    run_script(ROOT / "experiments" / "compare.py", "--workdir", workdir, *DEFAULT_FLAGS, timeout=1800)
    return workdir, json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def digits_comparison(request):
    return subprocess_result(request)


def test_the_digits_comparison_keeps_its_pinned_numbers(digits_comparison):
    _, results = digits_comparison
    assert list(results) == list(PINNED_DIGITS)
    for name, pin in PINNED_DIGITS.items():
        r = results[name]["seeds"]["0"]
        got = (r["test_neg_elbo"], r["last_test_neg_elbo"], r["test_neg_iwae"], r["evals"], r["steps"])
        rel = TOLERANCE.get(name, 1e-6)
        assert got[3:] == pin[3:] and got[:3] == pytest.approx(pin[:3], rel=rel, abs=0.0), \
            f"{name}: got {got}, pinned {pin}"


def test_refinements_with_the_same_adam_half_compute_it_once(digits_comparison):
    """sa-refine, sa-refine-naive, sa-pt and es-refine share adam_lr and adam_share: the first computes
    the Adam half, the others start from its end (driver.run(start=...)); their Adam rows are its rows,
    seconds included. The pinned numbers above, measured with every method computing its own half,
    are what shows the shared runs are the same runs."""
    _, results = digits_comparison
    rows = {m: [r for r in results[m]["seeds"]["0"]["history"] if r["phase"] == "adam"]
            for m in ("sa-refine", "sa-refine-naive", "sa-pt", "es-refine")}
    assert len(rows["sa-refine"]) > 1
    for method, mine in rows.items():
        assert mine == rows["sa-refine"], method


def _mnist_dir():
    path = os.environ.get("SAVAE_DATA_DIR")
    if not path:
        pytest.skip("real MNIST unavailable: $SAVAE_DATA_DIR is not set (e.g. /path/to/mnist-idx)")
    if not any((Path(path) / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
        pytest.skip(f"real MNIST unavailable: no IDX files in $SAVAE_DATA_DIR={path}")
    return path


@subprocess_work("mnist_comparison")
def _mnist_comparison(tmp):
    """Issue 12's MNIST comparison (seed 0), `savae compare` in a subprocess; its results.json.

    Background work (see conftest.py): the two-minute run overlaps the tests before it.
    """
    workdir = tmp / "w"
    run_script(ROOT / "experiments" / "compare.py", "--dataset", "mnist", "--data-dir", _mnist_dir(), "--methods",
               "sa-refine,sa-refine-naive", "--seed", "0", "--eval-iwae", "0", "--quiet", "--workdir", workdir,
               timeout=1800)
    return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def mnist_comparison(request):
    _mnist_dir()  # skips, with its reason, where real MNIST is absent
    return subprocess_result(request)


@pytest.mark.experiment
def test_on_mnist_noise_aware_refinement_does_no_harm_where_the_naive_rule_does(mnist_comparison):
    """Issue 12's acceptance check at compare.py's default budget (seed 0; README: seeds 0, 1, 2):
    after the same Adam half, noise-aware annealing ends at most 0.05 nats above the Adam phase's
    test -ELBO, while the seed's rule (best of 64 on one batch, Metropolis) ends worse, and the
    validation gate then keeps parameters that are not."""
    results = mnist_comparison
    aware, naive = (results[m]["seeds"]["0"] for m in ("sa-refine", "sa-refine-naive"))
    start = aware["phase_ends"]["adam"]
    # The same Adam half: computed once, by sa-refine, and shared (driver.run(start=...); that a shared
    # half equals one computed alone is tests/test_driver.py's and the pinned digits numbers' check).
    assert naive["phase_ends"]["adam"] == start
    # Measured (2 CPU cores, jax 0.10.2): Adam half 104.681, noise-aware last 104.619 (-0.06),
    # naive last 106.418 (+1.74; seeds 1 and 2: +1.35, +1.42), naive kept 104.681 (the gate chose
    # the Adam phase's end, step 2500). The 0.05 is the allowance; the 0.5 is far below
    # the naive rule's smallest measured harm.
    assert aware["last_test_neg_elbo"] <= start + 0.05
    assert aware["test_neg_elbo"] <= start + 0.05
    assert naive["last_test_neg_elbo"] > start + 0.5
    assert naive["test_neg_elbo"] <= start + 0.05 and naive["best_step"] <= 2500

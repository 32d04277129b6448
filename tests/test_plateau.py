"""experiments/plateau.py: Adam to a validation plateau, then five arms with equal further budgets."""


import json

import pytest

import savae_jax as sv
from savae_jax.experiments import plateau
from savae_jax.experiments import workdir as workdir_lib

from conftest import subprocess_work, subprocess_result, run_script, without_seconds

TINY = ["--dataset", "digits", "--hidden", "32", "--latents", "4", "--batch-size", "100",
        "--eval-every", "5", "--eval-iwae", "0"]


@subprocess_work("plateau_run")
def _plateau_run(tmp):
    """`savae plateau` at a tiny scale, in a subprocess (subprocess work, see conftest.py): its workdir."""
    run_script("-m", "savae_jax.cli", "plateau", *TINY, "--seeds", "0", "--max-epochs", "3", "--patience", "1",
               "--extra-evals", "300", "--workdir", tmp / "w")
    return tmp / "w"


@pytest.fixture(scope="module")
def plateau_run(request):
    return subprocess_result(request)


# Slow tier: a plateau run end to end; the default tier keeps plateau's workdir policy and resume
# in-process.
@pytest.mark.slow
def test_every_arm_starts_from_the_plateau_point_and_never_ends_worse_on_validation(plateau_run):
    workdir = plateau_run
    assert workdir_lib.foreign_files(workdir, plateau.OUTPUTS) == []  # every file its own (--overwrite's)
    r = json.loads((workdir / "results.json").read_text())["0"]
    args = plateau.build_parser().parse_args(TINY)
    loss_fn = sv.make_loss(sv.MLPVAE(hidden=32, latents=4))
    p = r["plateau"]
    assert 1 <= p["best_epoch"] <= p["epochs"] <= 3 and len(p["val_curve"]) == p["epochs"]
    assert r["x_star"]["val_neg_elbo"] == min(p["val_curve"])
    assert list(r["arms"]) == list(plateau.ARMS)
    for arm, a in r["arms"].items():
        # Equal budgets: each arm spends the 300 evaluations to within one step's cost.
        cost = plateau.arm_phase(arm, loss_fn, None, args).optimizer.cost
        assert 300 - cost < a["evals"] <= 300, (arm, a["evals"])
        # The validation gate: the kept parameters are x* (best_step 0) or a row that beat it.
        vals = [row["val_neg_elbo"] for row in a["history"]]
        if a["best_step"] == 0:
            assert min(vals) >= r["x_star"]["val_neg_elbo"]
        else:
            assert min(vals) < r["x_star"]["val_neg_elbo"]
    # "More Adam" continues x*'s Adam state: its first row is not a fresh Adam's.
    assert r["arms"]["adam"]["history"][0]["test_neg_elbo"] != r["arms"]["adam-decayed"]["history"][0]["test_neg_elbo"]
    summary = (workdir / "summary.md").read_text()
    assert all(f"| {arm} |" in summary for arm in plateau.ARMS)
    assert (workdir / "plateau.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flags, needle", [
    (["--seeds", "a"], "--seeds"), (["--arms", "adam,newton"], "--arms"), (["--patience", "0"], "--patience"),
    (["--validation", "2.0"], "validation")])
def test_bad_flags_are_refused_before_training(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as info:
        plateau.main([*TINY, *flags, "--workdir", str(tmp_path / "w")])
    assert info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_plateau_follows_the_workdir_policy_and_resumes_the_seeds_left(tmp_path, capsys):
    """Issue 23: a second run into the same --workdir overwrote the first one's results.json. Now it
    is refused; --resume keeps the finished seeds and runs the rest (a run killed during seed 1 ends
    with the results of an uninterrupted run); --overwrite replaces the run."""
    import json

    flags = [*TINY, "--seeds", "0,1", "--max-epochs", "1", "--extra-evals", "40", "--arms", "adam",
             "--workdir", str(tmp_path)]
    full = plateau.main(flags)
    saved = json.loads((tmp_path / "results.json").read_text())
    with pytest.raises(SystemExit) as info:
        plateau.main(flags)
    assert info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text()) == saved  # nothing overwritten
    # As if killed during seed 1: only seed 0 was saved.
    (tmp_path / "results.json").write_text(json.dumps({"0": saved["0"]}))
    resumed = plateau.main([*flags, "--resume"])
    assert without_seconds(json.loads(json.dumps(resumed))) == without_seconds(json.loads(json.dumps(full)))
    assert resumed["0"] == saved["0"]  # the finished seed is kept as it was, not rerun
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        plateau.main([*flags, "--overwrite"])
    assert "notes.txt" in capsys.readouterr().err and (tmp_path / "results.json").exists()


"""Scale-out: proposals sharded over devices, data-parallel Optax, two processes on loopback.

Multi-device checks run in a subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
JAX starts); one subprocess computes every comparison and the tests read its
JSON report.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import annealing, checkpoint, distributed

from conftest import subprocess_work, subprocess_result, popen

ROOT = Path(__file__).resolve().parents[1]



def _eight_devices(part: str):
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = popen([sys.executable, "-m", "sharding_worker", part], env=env, cwd=ROOT / "tests", stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@subprocess_work("eight_devices")
def _eight_devices_run(tmp):
    return _eight_devices("core")


@subprocess_work("eight_devices_extended")
def _eight_devices_extended_run(tmp):
    return _eight_devices("extended")


@pytest.fixture(scope="module")
def eight_devices(request):
    """sharding_worker's ``core`` report: annealing with two proposals and a padded mesh (its
    subprocess work, see conftest.py)."""
    return subprocess_result(request)


@pytest.fixture(scope="module")
def eight_devices_extended(request):
    """sharding_worker's ``extended`` report (the slow tier): ES, data-parallel Adam, ``fit`` with a
    sharded annealer, the noise-aware rules, the lattice optimizers, replica exchange, dual
    annealing's chains and a tuning group."""
    return subprocess_result(request)


@pytest.mark.parametrize("proposal, num_proposals",
                         [("low_rank", 7), ("gaussian", 10)])
def test_sharded_annealing_equals_one_device(eight_devices, proposal, num_proposals):
    r = eight_devices[f"sa/{proposal}/{num_proposals}"]
    # The same proposals are drawn (member j uses keys[j] either way) and the
    # same one wins: parameters are bitwise equal. Each member's loss is
    # computed by a vmap of another width on each device, which XLA may round
    # differently in the last bit (measured: gaussian, 1 ulp), so losses are
    # compared to 1e-6 relative.
    assert r["params"]["bitwise"], r
    assert r["best_params"]["bitwise"], r
    assert r["accepted"], r
    assert r["loss"]["max_abs"] <= 1e-6 * 100, r  # losses are ~50 nats
    assert r["proposal_loss_mean"]["max_abs"] <= 1e-6 * 100, r
    # Padding members (K + 1 = 11 -> 16, 2 -> 8) never count as proposals.
    assert r["num_nonfinite"] == [0, 0, 0]
    if num_proposals > 1:
        assert r["num_accepted"] > 0  # the comparison covers accepted moves


@pytest.mark.slow
def test_a_tuning_group_sharded_over_devices_keeps_each_trials_result(eight_devices_extended):
    """savae tune --devices: a group of 3 Adam trials on 1, 3 and 8 devices (padded with
    copies of the last trial). Where each device runs one trial (3 and 8 devices) the trials are
    bitwise equal: neither the device count nor the padding changes a trial."""
    r = eight_devices_extended["tune"]
    rows = r["rows"]
    assert len(rows["one"]) == len(rows["mesh8"]) == 3 and r["kept_shape"][0] == 3  # the copies dropped
    assert rows["mesh8"] == rows["mesh3"] and r["mesh8_vs_mesh3"]["bitwise"], r
    assert len({row["val_neg_elbo"] for row in rows["one"]}) == 3  # three different trials compared
    for mine, alone in zip(rows["mesh8"], rows["one"]):
        assert (mine["best_step"], mine["evals"], mine["steps"]) == (alone["best_step"], alone["evals"], alone["steps"])
        # Against ONE device running the three as one vmap: each Adam gradient is a dot batched over
        # three trials there and over one here, which XLA accumulates in another order (the same
        # drift as a vmapped group against its trials run alone, tests/test_tuning.py): parameters
        # to 1e-6, scores (means over 180 examples, 30-50 nats) to 8 float32 ulps.
        assert abs(mine["val_neg_elbo"] - alone["val_neg_elbo"]) <= 8 * float(np.spacing(np.float32(alone["val_neg_elbo"])))
    assert r["mesh8_vs_one"]["max_abs"] <= 1e-6, r


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["penalty", "confident"])
def test_noise_aware_sharded_annealing_equals_one_device(eight_devices_extended, rule):
    """decision_batch + a noise-aware rule on 8 devices: the same decisions and parameters."""
    r = eight_devices_extended[f"noise_aware/{rule}"]
    assert r["params"]["bitwise"], r
    assert r["best_params"]["bitwise"], r
    accepted, mesh_accepted = r["accepted"]
    assert accepted == mesh_accepted, r
    assert any(accepted) and not all(accepted), r  # both outcomes compared, not a trivial equality
    sizes, mesh_sizes = r["decision_size"]
    assert sizes == mesh_sizes, r
    assert sizes == ([32] * 6 if rule == "penalty" else [24, 28, 32, 32, 32, 32]), r
    # The incumbent's loss comes from the sharded member evaluation (other vmap widths): 1e-6
    # relative, as above. The paired differences and their standard errors are means over
    # per-example losses of ~50 nats computed outside it (measured bitwise equal); the same 1e-4.
    for name in ("loss", "delta", "stderr", "delta_selection", "stderr_selection"):
        assert r[name]["max_abs"] <= 1e-6 * 100, (name, r)


@pytest.mark.slow
def test_sharded_lattice_annealing_equals_one_device(eight_devices_extended):
    """Lattice moves of a 3-bit model (issue 25) on 8 devices: the same proposals win, so the codes
    are bitwise equal and stay in range; member losses are vmaps of another width per device
    (1e-6 relative, as for the float annealer's members)."""
    r = eight_devices_extended["lattice"]
    assert r["codes"]["bitwise"] and r["valid"], r
    accepted, mesh_accepted = r["accepted"]
    assert accepted == mesh_accepted and any(accepted), r
    assert r["loss"]["max_abs"] <= 1e-6 * 100, r  # losses are ~50 nats


@pytest.mark.slow
def test_sharded_lattice_es_equals_one_device(eight_devices_extended):
    """lattice_es(mesh=...) (issue 25): the members' losses on their devices rank the same, so the
    rounded step, the decision and the codes are bitwise those of one device, and stay in range."""
    r = eight_devices_extended["lattice_es"]
    assert r["codes"]["bitwise"] and r["valid"], r
    accepted, mesh_accepted = r["accepted"]
    assert accepted == mesh_accepted and any(accepted), r
    assert r["member_loss_mean"]["max_abs"] <= 1e-6 * 100, r  # losses are ~50 nats


@pytest.mark.slow
def test_sharded_es_equals_one_device(eight_devices_extended):
    """evolution_strategy(mesh=...): each member's loss on one device, the rest replicated. The
    fitness ranks, hence the gradient estimate, the candidate and the decision, are the same, so
    the parameters are bitwise equal; member losses are vmaps of another width per device
    (1e-6 relative, as for the annealer's members)."""
    r = eight_devices_extended["es"]
    assert r["params"]["bitwise"], r
    accepted, mesh_accepted = r["accepted"]
    assert accepted == mesh_accepted and any(accepted), r
    assert r["grad_norm"]["bitwise"] and r["delta"]["bitwise"], r
    assert r["member_loss_mean"]["max_abs"] <= 1e-6 * 100, r  # losses are ~50 nats


@pytest.mark.slow
def test_sharded_replica_exchange_equals_one_device(eight_devices_extended):
    """replica_exchange(mesh=...): one replica per device, the swap round replicated. The same
    moves and swaps are made, so every replica's parameters are bitwise equal; the shared-batch
    losses come from per-example losses of ~50 nats (1e-6 relative, as above)."""
    r = eight_devices_extended["replica_exchange"]
    assert r["params"]["bitwise"], r
    swapped, mesh_swapped = r["swapped"]
    assert swapped == mesh_swapped and any(any(s) for s in swapped), r
    assert r["accepted"][0] == r["accepted"][1], r
    assert r["losses"]["max_abs"] <= 1e-6 * 100, r


def test_padding_to_a_device_count_that_does_not_divide(eight_devices):
    assert eight_devices["sa/gaussian/10/mesh3"]["params"]["bitwise"]


@pytest.mark.slow
def test_optax_data_parallel_equals_one_device(eight_devices_extended):
    r = eight_devices_extended["optax"]
    # Gradients are means over a batch split in 8: a different summation
    # order, so equal to 1e-6, not bitwise (measured max |diff| ~1e-7).
    assert r["params"]["max_abs"] <= 1e-6, r
    assert abs(r["train_loss"][0] - r["train_loss"][1]) <= 1e-4, r
    assert r["replicated"]  # params replicated over the mesh


@pytest.mark.slow
def test_dual_annealing_chains_sharded_equal_one_device(eight_devices_extended):
    r = eight_devices_extended["dual_annealing"]
    assert r["best"]["bitwise"], r  # each chain runs whole on one device: same arithmetic
    assert len(set(r["values"])) == 16  # 16 distinct chains were compared


@pytest.mark.slow
def test_fit_on_a_mesh_with_an_annealer_built_on_it_equals_one_device(eight_devices_extended):
    r = eight_devices_extended["fit_sa"]
    assert r["params"]["bitwise"], r
    assert r["train_loss"][0] == pytest.approx(r["train_loss"][1], rel=1e-6)


def test_no_mesh_is_the_single_device_code():
    # mesh=None traces no shard_map and no sharding constraint: the old step.
    model = sv.MLPVAE(hidden=8, latents=2)
    images = sv.load("digits", "train").images[:8]
    params = sv.models.init(jax.random.key(0), model, images[:1])
    sa = annealing.simulated_annealing(sv.make_loss(model), 3, annealing.gaussian(0.1), 1.0,
                                       annealing.metropolis())
    jaxpr = str(jax.make_jaxpr(sa.step)(jax.random.key(0), sa.init(params), images))
    assert "shard_map" not in jaxpr and "sharding_constraint" not in jaxpr


def test_a_step_built_without_a_mesh_never_shards_under_a_mesh_context():
    """Documented in docs/distributed.md: only ``mesh=`` shards; no ambient mesh is read, so a step
    jitted outside JAX's mesh context and called inside one computes the same thing, and so does a
    step traced inside it."""
    model = sv.MLPVAE(hidden=8, latents=2)
    images = sv.load("digits", "train").images[:8]
    params = sv.models.init(jax.random.key(0), model, images[:1])
    loss_fn = sv.make_loss(model)
    sa = annealing.simulated_annealing(loss_fn, 3, annealing.gaussian(0.1), 1.0, annealing.metropolis())
    step = jax.jit(sa.step)
    outside = step(jax.random.key(0), sa.init(params), images)
    mesh = distributed.make_mesh(1)
    with jax.set_mesh(mesh):
        inside = step(jax.random.key(0), sa.init(params), images)
        traced_inside = str(jax.make_jaxpr(lambda *a: sa.step(*a))(jax.random.key(0), sa.init(params), images))
    chex.assert_trees_all_equal(outside, inside)
    assert "shard_map" not in traced_inside
    # Built with mesh=, it shards (its members over the mesh axis).
    sharded = annealing.simulated_annealing(loss_fn, 3, annealing.gaussian(0.1), 1.0, annealing.metropolis(),
                                            mesh=mesh)
    assert "shard_map" in str(jax.make_jaxpr(sharded.step)(jax.random.key(0), sharded.init(params), images))
    # The driver runs an optimizer that does not shard itself data parallel on its mesh (the batch
    # sharded), and one built on the mesh with its own sharding (no batch constraint).
    jaxpr = lambda opt: str(jax.make_jaxpr(sv.driver.make_train_step(opt, mesh=mesh))(  # noqa: E731
        opt.init(params), jax.random.key(0), jax.numpy.asarray(images), jax.numpy.arange(4)))
    assert "sharding_constraint" in jaxpr(sa) and "shard_map" not in jaxpr(sa)
    assert "sharding_constraint" not in jaxpr(sharded) and "shard_map" in jaxpr(sharded)


def test_process_helpers_are_the_identity_in_one_process():
    """host_local/agree/barrier change nothing in one process (the multi-process
    behaviour is exercised by the two-process tests below)."""
    tree = {"w": jax.numpy.ones(3)}
    assert distributed.host_local(tree) is tree
    assert distributed.is_primary()
    assert distributed.agree(True) is True and distributed.agree(2.25) == 2.25
    distributed.barrier("nothing to wait for")


def test_bad_mesh_arguments():
    loss = lambda p, k, b: p  # noqa: E731
    mesh = distributed.make_mesh(1, axis_name="proposals")
    with pytest.raises(ValueError, match="axis_name"):
        annealing.simulated_annealing(loss, 3, annealing.gaussian(0.1), 1.0, annealing.metropolis(),
                                      axis_name="proposals")
    with pytest.raises(ValueError, match="axis_name 'data' is not an axis"):
        annealing.simulated_annealing(loss, 3, annealing.gaussian(0.1), 1.0, annealing.metropolis(),
                                      mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        annealing.simulated_annealing(loss, 3, annealing.gaussian(0.1), 1.0, annealing.metropolis(),
                                      mesh="cpu")
    with pytest.raises(ValueError, match="devices must be between 1 and"):
        distributed.make_mesh(0)
    with pytest.raises(ValueError, match="devices must be between 1 and"):
        distributed.make_mesh(jax.device_count() + 1)


def test_script_flags_need_distributed():
    import argparse

    from savae_jax.experiments import flags as common

    parser = argparse.ArgumentParser()
    common.add_scale_out_flags(parser)
    with pytest.raises(ValueError, match="--coordinator needs --distributed"):
        common.mesh_from_args(parser.parse_args(["--coordinator", "127.0.0.1:1234"]))
    with pytest.raises(ValueError, match="--devices: must be a number or 'all'"):
        common.mesh_from_args(parser.parse_args(["--devices", "many"]))
    assert common.mesh_from_args(parser.parse_args([])) is None
    assert common.mesh_from_args(parser.parse_args(["--devices", "1"])).devices.size == 1
    with pytest.raises(ValueError, match="process_id must be in"):
        distributed.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(script: str, args: list[str], own=lambda i: []) -> list[subprocess.Popen]:
    """Start ``script`` as processes 0 and 1 of a --distributed run on loopback, 4 CPU devices each.

    ``own(i)``: extra arguments of process ``i`` only.
    """
    port = _free_port()
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
                        "PYTHONFAULTHANDLER": "1"}
    return [popen(
        [sys.executable, script, *args, *own(i), "--distributed", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def _finish(procs, timeout=300) -> list[str]:
    """Wait for every process; their output; a hung run is killed (and fails the test)."""
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        # SIGABRT first: with PYTHONFAULTHANDLER set (see _two_processes) each process prints
        # where its threads are stuck (e.g. which collective it waits in) before it dies.
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGABRT)
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=20)[0])
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs.append(proc.communicate()[0])
        pytest.fail(f"still running after {timeout} s:\n" + "\n".join(
            f"--- process {i}:\n{out[-6000:]}" for i, out in enumerate(outputs)))
    finally:
        for proc in procs:
            proc.kill()
    return logs


def _single(script: str, args: list[str]) -> str:
    """Run the same script as one process on one device (the reference); its output."""
    proc = popen([sys.executable, script, *args], env=os.environ | {"JAX_PLATFORMS": "cpu"},
                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = _finish([proc])[0]
    assert proc.returncode == 0, log[-4000:]
    return log


# The one-device reference runs of the two-process tests below are subprocess work (see
# conftest.py): each is one process, run before the test's own two processes start, so that
# those two do not share the cores with a third.

TRAIN_ARGS = ["experiments/train.py", "--dataset", "digits", "--optimizer", "adam", "--lr", "3e-3",
              "--epochs", "1", "--batch-size", "64", "--hidden", "32", "--latents", "4", "--quiet"]
COMPARE_ARGS = ["experiments/compare.py", "--dataset", "digits", "--methods", "adam,sa",
                "--budget-evals", "600", "--eval-every", "10", "--checkpoint-every", "20",
                "--batch-size", "64", "--hidden", "32", "--latents", "4", "--eval-iwae", "5",
                "--set", "sa.proposals=7", "--quiet"]
DUAL_ARGS = ["experiments/dual_annealing.py", "--runs", "8", "--steps", "30", "--proposals", "7",
             "--problems", "rastrigin"]

# The saved initial parameters of the train.py runs (MLPVAE(32, 4), init key 7), written in a
# subprocess like the other reference runs.
SAVE_INIT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    import savae_jax as sv

    model = sv.MLPVAE(hidden=32, latents=4)
    sv.checkpoint.save_params(sys.argv[1], sv.models.init(jax.random.key(7), model,
                                                          np.zeros((1, 8, 8, 1), np.float32)))
    """
)


@subprocess_work("train_single")
def _train_single(tmp):
    init = tmp / "init"
    _single("-c", [SAVE_INIT, str(init)])
    args = TRAIN_ARGS[1:] + ["--init-from", str(init), "--workdir", str(tmp / "single")]
    _single(TRAIN_ARGS[0], args)
    return tmp


@pytest.fixture(scope="module")
def train_single(request):
    """The saved initial parameters (``init``) and train.py from them on one device (``single``)."""
    return subprocess_result(request)


@subprocess_work("compare_single")
def _compare_single(tmp):
    _single(COMPARE_ARGS[0], COMPARE_ARGS[1:] + ["--workdir", str(tmp / "single")])
    return tmp / "single"


@pytest.fixture(scope="module")
def compare_single(request):
    """The workdir of COMPARE_ARGS run on one device."""
    return subprocess_result(request)


@subprocess_work("dual_single")
def _dual_single(tmp):
    _single(DUAL_ARGS[0], DUAL_ARGS[1:] + ["--json", str(tmp / "single.json")])
    return tmp / "single.json"


@pytest.fixture(scope="module")
def dual_single(request):
    """The JSON report of DUAL_ARGS run on one device."""
    return subprocess_result(request)


@pytest.mark.slow
def test_two_processes_on_loopback_agree(tmp_path, train_single):
    """experiments/train.py --distributed: 2 processes x 4 CPU devices, Adam data parallel, one
    workdir, starting from saved parameters (--init-from, read by every process)."""
    args = TRAIN_ARGS[1:] + ["--init-from", str(train_single / "init")]
    procs = _two_processes(TRAIN_ARGS[0], args + ["--workdir", str(tmp_path / "both")])
    logs = _finish(procs)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    # Process 0 alone prints and writes; process 1 computes silently.
    assert "final test negative ELBO" in logs[0] and "final test negative ELBO" not in logs[1]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "both", train_single / "single")]
    assert len(metrics[0]["config"]["devices"]) == 8  # the global devices
    p0 = sv.checkpoint.load_params(tmp_path / "both" / "params")
    ps = sv.checkpoint.load_params(train_single / "single" / "params")
    for a, c in zip(jax.tree.leaves(p0), jax.tree.leaves(ps)):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)  # data parallel vs one device
    assert metrics[0]["final"]["test_neg_elbo"] == pytest.approx(metrics[1]["final"]["test_neg_elbo"],
                                                                 abs=1e-4)


@subprocess_work("two_process_killed")
def _two_process_killed(tmp):
    """Two processes of COMPARE_ARGS SIGKILLed after the first annealing checkpoint, then resumed with two
    (subprocess work): ``(workdir, what was seen)``."""
    args = COMPARE_ARGS
    both = tmp / "both"
    procs = _two_processes(args[0], args[1:] + ["--workdir", str(both)])
    committed = lambda: [p for p in (both / "checkpoints" / "sa" / "seed0").glob("*") if p.name.isdigit()]  # noqa: E731
    deadline = time.monotonic() + 300
    while not committed() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for proc in procs:
        proc.kill()
    killed_logs = _finish(procs)
    seen = {"committed": bool(committed()), "killed_log": killed_logs[0][-4000:],
            "sa_done_before_kill": (both / "results.json").exists()
            and "sa" in json.loads((both / "results.json").read_text())}
    procs = _two_processes(args[0], args[1:] + ["--workdir", str(both), "--resume"])
    seen["logs"] = _finish(procs)
    seen["returncodes"] = [proc.returncode for proc in procs]
    return both, seen


@pytest.fixture(scope="module")
def two_process_killed(request):
    return subprocess_result(request)


@pytest.mark.slow
def test_two_process_compare_killed_and_resumed_equals_one_device(two_process_killed, compare_single):
    """compare.py --distributed on one shared --workdir: SIGKILL both processes after the first
    annealing checkpoint, --resume with two processes, and the results equal a one-device run
    (annealing bitwise, data-parallel Adam to 1e-4 nats)."""
    both, seen = two_process_killed
    ref = compare_single
    assert seen["committed"], "no annealing checkpoint before the kill:\n" + seen["killed_log"]
    assert not seen["sa_done_before_kill"]
    logs = seen["logs"]
    for rc, log in zip(seen["returncodes"], logs):
        assert rc == 0, log[-4000:]
    assert "| adam |" in logs[0] and logs[1].count("nats") == 0  # one writer: process 0
    config = json.loads((both / "config.json").read_text())
    assert len(config["devices"]) == 8
    got, want = ({m: r["seeds"]["0"] for m, r in json.loads((d / "results.json").read_text()).items()}
                 for d in (both, ref))
    # What docs/distributed.md guarantees across device counts: the annealer's decisions and
    # parameters are bitwise equal, so everything computed from the parameters alone (the test
    # -ELBO rows, IWAE) is too. Its training losses are each member's loss computed by a vmap of
    # another width on each device, which XLA may round differently in the last bits (seen: 2
    # float32 ulps of a 50-nat loss on one 2-core AMD EPYC machine, 0 on another): 8 ulps allowed.
    # Data-parallel Adam sums its gradients in another order: its parameters drift by ~1e-7,
    # so its numbers are compared to 1e-4 nats.
    ulp = lambda x: float(np.spacing(np.float32(x)))  # noqa: E731
    # Row 0 scores the initial parameters (the same on every device count, bitwise); the trained rows follow.
    for method in ("sa", "adam"):
        assert got[method]["history"][0] == want[method]["history"][0]
        assert got[method]["history"][0]["step"] == 0
        got[method]["history"], want[method]["history"] = got[method]["history"][1:], want[method]["history"][1:]
    for a, b in zip(got["sa"]["history"], want["sa"]["history"], strict=True):
        assert (a["step"], a["evals"], a["acceptance_rate"]) == (b["step"], b["evals"], b["acceptance_rate"])
        assert a["test_neg_elbo"] == b["test_neg_elbo"]
        assert abs(a["train_loss"] - b["train_loss"]) <= 8 * ulp(b["train_loss"]), (a, b)
    assert got["sa"]["test_neg_iwae"] == want["sa"]["test_neg_iwae"]
    for a, b in zip(got["adam"]["history"], want["adam"]["history"], strict=True):
        assert a["step"] == b["step"] and a["evals"] == b["evals"]
        assert a["test_neg_elbo"] == pytest.approx(b["test_neg_elbo"], abs=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    assert got["adam"]["test_neg_iwae"] == pytest.approx(want["adam"]["test_neg_iwae"], abs=1e-4)
    for method in ("sa", "adam"):  # final parameters: bitwise for the annealer, 1e-6 for Adam
        ckpt = [checkpoint.load_params(d / "params" / method / "seed0") for d in (both, ref)]
        chex.assert_trees_all_close(*ckpt, atol=0.0 if method == "sa" else 1e-6, rtol=0.0)
    for name in ("summary.md", "history_sa_seed0.csv", "samples_sa.png", "test_neg_elbo_vs_evals.png"):
        assert (both / name).is_file(), name


@subprocess_work("two_process_time_budget")
def _two_process_time_budget(tmp):
    """Two processes of `savae compare --budget-seconds 1.5` (subprocess work): ``(workdir, rcs, logs)``."""
    args = ["experiments/compare.py", "--dataset", "digits", "--methods", "sa,adam",
            "--budget-evals", "100000", "--budget-seconds", "1.5", "--eval-every", "5",
            "--batch-size", "64", "--hidden", "32", "--latents", "4", "--eval-iwae", "0",
            "--set", "sa.proposals=7", "--quiet", "--workdir", str(tmp)]
    procs = _two_processes(args[0], args[1:])
    logs = _finish(procs)
    return tmp, [proc.returncode for proc in procs], logs


@pytest.fixture(scope="module")
def two_process_time_budget(request):
    return subprocess_result(request)


@pytest.mark.slow
def test_two_process_compare_with_a_time_budget_stops_together(two_process_time_budget):
    """--budget-seconds across processes: process 0's clock decides, so both take the same
    steps (a process that stopped alone would leave the other waiting in a collective)."""
    workdir, returncodes, logs = two_process_time_budget
    for rc, log in zip(returncodes, logs):
        assert rc == 0, log[-4000:]
    results = json.loads((workdir / "results.json").read_text())
    for method, cost in (("sa", 8), ("adam", 3)):
        last = results[method]["seeds"]["0"]["history"][-1]
        assert 1.5 - 1e-3 <= last["seconds"] < 60  # stopped by the clock (float32 sums), not by evals
        assert last["evals"] == cost * last["step"] < 100000


@pytest.mark.slow
def test_two_process_dual_annealing_equals_one_process(tmp_path, dual_single):
    """experiments/dual_annealing.py --distributed: chains on both processes' devices, gathered."""
    procs = _two_processes(DUAL_ARGS[0], DUAL_ARGS[1:] + ["--json", str(tmp_path / "both.json")])
    logs = _finish(procs)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    assert "savae_jax SA" in logs[0] and "savae_jax SA" not in logs[1]  # process 0 prints
    both, one = (json.loads(path.read_text()) for path in (tmp_path / "both.json", dual_single))
    for a, b in zip(both, one, strict=True):
        for key in ("success", "median_gap", "max_gap", "inside", "evals_per_run"):
            assert a[key] == b[key], (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["compare.py"])
def test_two_processes_with_different_workdirs_are_refused(tmp_path, script):
    """Separate folders would hang in Orbax's first collective save: both processes stop at once
    with a usage error naming --workdir, and nothing is written. (compare.py only: every subcommand
    runs the same check, workdir.prepare -> check_same_workdir, before anything else.)"""
    args = [f"experiments/{script}", "--dataset", "digits", "--hidden", "8", "--latents", "2", "--quiet",
            *(["--methods", "adam"] if script == "compare.py" else [])]
    procs = _two_processes(args[0], args[1:], own=lambda i: ["--workdir", str(tmp_path / f"p{i}")])
    logs = _finish(procs, timeout=120)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 2, log[-4000:]
        assert "--workdir: every process of a --distributed run must pass the same folder" in log
    assert not any(tmp_path.iterdir())


def test_dual_annealing_refuses_runs_not_divisible_by_the_devices():
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "experiments/dual_annealing.py", "--runs", "5", "--devices", "2"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--runs: the chains are sharded over 2 devices, so --runs must be a multiple of 2, got 5" \
        in proc.stderr

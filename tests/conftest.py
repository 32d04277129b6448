"""Shared test helpers: a session-wide JAX compilation cache, subprocess work started in the
background, the TFDS mock fixture and result comparison without wall-clock fields."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole test session, in a temporary folder removed
# at the end. Many tests compile the same programs: every `compare.py` / `train.py` subprocess
# (the SIGKILL, disk-full, determinism and two-process runs start the same script again and
# again) and every in-process run that rebuilds the same step from new closures. Set through the
# environment, so subprocesses share it too. A cached executable is the one XLA compiled for the
# same program, so results are unchanged; only the time to compile is saved. An existing
# JAX_COMPILATION_CACHE_DIR is respected; SAVAE_TEST_COMPILATION_CACHE=0 turns this off.
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("SAVAE_TEST_COMPILATION_CACHE") != "0":
    _CACHE_DIR = tempfile.mkdtemp(prefix="savae-jax-compilation-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    # Cache every program, however quick to compile (JAX's default keeps only those over 1 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if "jax" in sys.modules:  # imported before this file (e.g. by a plugin): set it there too
        import jax

        jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# ------------------------------------------------------------------ background subprocess work
#
# A few module fixtures are one long single-process subprocess each (the --quick benchmark, the
# 8-device comparisons, the reference runs of the SIGKILL and determinism tests). The README's test
# command runs the tests in pytest-xdist workers, one per core (at most 4), file by file: there a
# fixture runs its work when a test asks for it, and the files with such work go first (see
# pytest_collection_modifyitems). Run in one process (``-p no:xdist`` or ``-n 0``), the tests
# mostly keep one core busy, so the work runs in one background thread, one job after another,
# from the moment the tests are collected; its fixture then only waits for the result (or runs
# the work itself if the thread has not reached it yet). Only the work of fixtures that a selected
# test uses is started.


class _Job:
    def __init__(self, fixture: str, fn):
        self.fixture, self.fn = fixture, fn
        self.lock = threading.Lock()
        self.done, self.result, self.error, self.seconds = False, None, None, 0.0

    def run(self, config):
        """The work's result, computed once (by whichever thread asks first; the other waits)."""
        with self.lock:
            if not self.done:
                start = time.perf_counter()
                try:
                    factory = getattr(config, "_tmp_path_factory", None)
                    tmp = (factory.mktemp(self.fixture) if factory is not None
                           else Path(tempfile.mkdtemp(prefix=f"{self.fixture}-")))
                    self.result = self.fn(tmp)
                except BaseException as err:  # re-raised in the fixture that needs it
                    self.error = err
                self.done, self.seconds = True, time.perf_counter() - start
        if self.error is not None:
            raise self.error
        return self.result


_JOBS: dict[str, _Job] = {}
_CHILDREN: list[subprocess.Popen] = []
# Seconds from the start of the tests to the end of the background thread and to the first test that
# waits on it: which of the two paths sets the suite's wall time (printed in the terminal summary).
_CLOCK = {"start": None, "background done": None, "first waiting test": None}


def background(fixture: str):
    """Register ``fn(tmp_path) -> result``, the subprocess work of the fixture named ``fixture``.

    The fixture returns ``background_result(request)``. ``fn`` starts its subprocesses with
    :func:`popen` (so that they are stopped if the session ends first) and raises (e.g. an
    AssertionError with the log) when they fail.
    """

    def register(fn):
        _JOBS[fixture] = _Job(fixture, fn)
        return fn

    return register


def background_result(request):
    """The result of the background work registered for ``request``'s fixture."""
    return _JOBS[request.fixturename].run(request.config)


def popen(cmd, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` whose process is killed at the end of the session if still running."""
    proc = subprocess.Popen(cmd, **kwargs)
    _CHILDREN.append(proc)
    return proc


def run_script(*args, env=None, timeout: float = 900) -> str:
    """Run ``python *args`` in the repository root to the end (see :func:`popen`); its output,
    stdout and stderr together. Fails with the output's tail when the script exits non-zero."""
    proc = popen([sys.executable, *map(str, args)], cwd=Path(__file__).resolve().parents[1], env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, log[-4000:]
    return log


def _waits(item) -> bool:
    """Whether ``item`` uses the result of background work."""
    return any(job.fixture in getattr(item, "fixturenames", ()) for job in _JOBS.values())


def _xdist_worker() -> bool:
    """Whether this process is a pytest-xdist worker (the README's test command runs two)."""
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_collection_modifyitems(session, config, items):
    """Order the tests so that the background work overlaps the rest.

    In one process: the tests that wait on background work run last, in their order, every other
    test first. Their jobs start when the tests are collected and run one after another on the
    second core while the other tests keep the first busy, so by the time a waiting test runs its
    result is (mostly) there: the foreground does not sit idle waiting for it (it did: 40 s for
    the MNIST comparison, run early among test_compare.py's tests).

    Under pytest-xdist (``--dist loadfile``, files handed out in this order): the files that hold
    such tests go first, each worker running their work when one of its tests asks for it, so the
    long subprocess runs start early and the many short files fill the other worker around them
    (longest first, as a scheduler of jobs of unequal length should).
    """
    if _xdist_worker():
        heavy = {item.path for item in items if _waits(item)}
        items.sort(key=lambda item: item.path not in heavy)  # stable: each file keeps its order
        return
    waiting = [item for item in items if _waits(item)]
    if waiting:
        items[:] = [item for item in items if not _waits(item)] + waiting


def pytest_collection_finish(session):
    # An xdist worker collects every test but runs only the files it is handed: its fixtures run
    # their background work when a test asks (a thread here would start every job in every worker).
    if session.config.option.collectonly or _xdist_worker():
        return
    _CLOCK["start"] = time.perf_counter()
    needed = []
    for item in session.items:  # in the order the tests will need them
        for job in _JOBS.values():
            if job.fixture in getattr(item, "fixturenames", ()) and job not in needed:
                needed.append(job)
    if needed:
        # Create the session's temporary root here, in the main thread: pytest's TempPathFactory
        # is not thread-safe, and two threads creating it at once make two roots.
        factory = getattr(session.config, "_tmp_path_factory", None)
        if factory is not None:
            factory.getbasetemp()

        def work():
            for job in needed:
                try:
                    job.run(session.config)
                except BaseException:  # reported by the fixture
                    pass
            _CLOCK["background done"] = time.perf_counter()

        threading.Thread(target=work, name="background-fixtures", daemon=True).start()


def pytest_runtest_setup(item):
    if _CLOCK["first waiting test"] is None and _waits(item):
        _CLOCK["first waiting test"] = time.perf_counter()


def pytest_terminal_summary(terminalreporter):
    """The wall time of each background job (they overlap the tests, so --durations does not show them),
    and when the background thread ended against when the foreground reached the tests that wait on it."""
    done = [job for job in _JOBS.values() if job.done]
    if done:
        terminalreporter.write_line("background jobs: " + ", ".join(
            f"{job.fixture} {job.seconds:.1f} s" for job in done))
    if _CLOCK["start"] is not None:
        terminalreporter.write_line("from the start of the tests: " + ", ".join(
            f"{name} at {value - _CLOCK['start']:.0f} s" for name, value in _CLOCK.items()
            if name != "start" and value is not None))


def pytest_unconfigure(config):
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


# ------------------------------------------------------------------ fixtures and helpers
def slow_after_first(cases):
    """Parametrize cases with every case but the first in the ``slow`` tier: for a property test
    whose later cases repeat the first one's mechanism with other values (tuples are unpacked as
    ``pytest.param`` arguments)."""
    def param(case, marks=()):
        return pytest.param(*case if isinstance(case, tuple) else (case,), marks=marks)
    return [param(cases[0]), *(param(case, pytest.mark.slow) for case in cases[1:])]




@pytest.fixture
def tfds_mock(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    # tfds 4.9.x's mock installs `__getitems__` as a plain instance attribute
    # (MagicMock does not treat it as a magic method), so it is called without
    # `self` and fails; accept either calling convention.
    def _getitems(*args, generator, serialized=False):
        return [generator[k] for k in args[-1]]

    monkeypatch.setattr(mocking, "_getitems", _getitems)
    return tfds


def without_seconds(obj):
    """Results with the wall-clock fields removed (time is never reproducible)."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def vae():
    """(training digits, initial params, loss) of a small MLP VAE (hidden 16, 3 latents, init key 0)."""
    import jax

    import savae_jax as sv

    train = sv.load("digits", "train")
    model, loss_fn = small_vae(16, 3)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    return train.images, params, loss_fn


def nan_after(loss_fn, bad_step):
    """Adam whose reported loss turns NaN from step ``bad_step`` (counted from 1) on: a fault injection."""
    import jax.numpy as jnp
    import optax

    import savae_jax as sv

    adam = sv.from_optax(loss_fn, optax.adam(1e-3))

    def step(key, state, x):
        state, info = adam.step(key, state, x)
        return state, info._replace(loss=jnp.where(state.count >= bad_step, jnp.nan, info.loss))

    return adam._replace(step=step)


@functools.cache
def small_vae(hidden: int = 16, latents: int = 3):
    """``(model, loss_fn)`` of a small MLP VAE, built once per shape for the whole session.

    Every test that asks for the same shape gets the same model and loss objects, so functions
    jitted over them are traced once, and the tests read the shape they use in one call.
    """
    import savae_jax as sv

    model = sv.MLPVAE(hidden=hidden, latents=latents)
    return model, sv.make_loss(model)

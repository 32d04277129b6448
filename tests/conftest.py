"""Shared test helpers: a session-wide JAX compilation cache, the long subprocess runs of module
fixtures (their files first), the TFDS mock fixture and result comparison without wall-clock fields."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

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


# ------------------------------------------------------------------ subprocess work
#
# A few module fixtures are one long subprocess run each (the README's comparison, the SIGKILL
# sequence, the 8-device comparisons, the docs' blocks). The README's test command runs the tests
# in pytest-xdist workers, one per core (at most 4), a file at a time; the files that hold such
# fixtures are handed out first (pytest_collection_modifyitems), so the long runs start early and
# the many short files fill the other workers around them (longest first, as a scheduler of jobs
# of unequal length should).

_SUBPROCESS_WORK: dict[str, Callable] = {}
_CHILDREN: list[subprocess.Popen] = []


def subprocess_work(fixture: str):
    """Register ``fn(tmp_path) -> result``, the subprocess work of the module fixture ``fixture``.

    The fixture returns ``subprocess_result(request)``. ``fn`` starts its subprocesses with
    :func:`popen` (so that they are stopped if the session ends first) and raises (e.g. an
    AssertionError with the log) when they fail.
    """

    def register(fn):
        _SUBPROCESS_WORK[fixture] = fn
        return fn

    return register


def subprocess_result(request):
    """The result of the subprocess work registered for ``request``'s fixture, run in a fresh
    temporary folder of its own."""
    tmp = request.getfixturevalue("tmp_path_factory").mktemp(request.fixturename)
    return _SUBPROCESS_WORK[request.fixturename](tmp)


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


@pytest.hookimpl(trylast=True)  # after -m has deselected: a file whose long runs are all `slow` is not heavy
def pytest_collection_modifyitems(session, config, items):
    """The files whose selected tests use subprocess work first, each file's tests in their order
    (under pytest-xdist's ``--dist loadfile`` the files are handed to the workers in this order)."""
    heavy = {item.path for item in items if set(getattr(item, "fixturenames", ())) & set(_SUBPROCESS_WORK)}
    items.sort(key=lambda item: item.path not in heavy)  # stable: each file keeps its order


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

"""Timing and memory helpers of the benchmark: AOT compile, interleaved median timing, the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import jax

from savae_jax import driver

MIB = 2.0**20


def machine_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "memory_source": "compiled.memory_analysis().temp_size_in_bytes (scratch beyond args/outputs)",
    }
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover - jaxlib always ships with jax
        pass
    stats = _memory_stats()
    if stats is not None:
        info["memory_stats"] = "device.memory_stats() peak_bytes_in_use also reported per section"
    return info


def _memory_stats() -> dict | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return stats or None


def peak_mb() -> float | None:
    stats = _memory_stats()
    if stats is None or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / MIB


def compile_fn(fn: Callable, *args):
    """AOT-compile ``fn`` for ``args``; returns (compiled, seconds to compile)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def memory(compiled) -> dict:
    """Temp / argument / output sizes (MiB) of a compiled executable (NaN if unknown)."""
    ma = driver.memory_analysis(compiled)
    if ma is None:
        return {"temp_mb": float("nan"), "arg_mb": float("nan"), "out_mb": float("nan")}
    return {"temp_mb": ma.temp_size_in_bytes / MIB, "arg_mb": ma.argument_size_in_bytes / MIB,
            "out_mb": ma.output_size_in_bytes / MIB}


def time_interleaved(fns: dict[str, tuple[Callable, tuple]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each ``(f, args)``, run in interleaved rounds after one warm-up."""
    for f, args in fns.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (f, args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


"""Saving results and parameters so that a killed run never leaves half a file.

Text and images are written to a temporary file in the same folder and renamed
into place (``os.replace`` is atomic on POSIX); parameter pytrees go through
orbax-checkpoint, which commits a finished checkpoint by renaming it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def atomic_write_bytes(path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is refused)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def save_params(path, params) -> Path:
    """Save a parameter pytree to the orbax checkpoint folder ``path`` (replaced if present)."""
    path = Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    return path


def load_params(path, like=None, name: str = "path"):
    """Restore a parameter pytree saved by ``save_params``.

    Args:
      path: the checkpoint folder.
      like: optional pytree of the expected structure, shapes and dtypes
        (e.g. a freshly initialised model's params); a mismatch is a ValueError.
      name: the argument or flag to name in errors (e.g. "--init-from").
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise ValueError(f"{name}: no parameter checkpoint at {path}")
    try:
        restored = ocp.StandardCheckpointer().restore(path)
    except Exception as err:  # orbax raises many kinds; the user needs one message
        raise ValueError(f"{name}: could not read a checkpoint at {path}: {err}") from err
    if like is not None:
        expected = jax.tree.map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)), like)
        got = jax.tree.map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)), restored)
        if expected != got:
            raise ValueError(
                f"{name}: checkpoint at {path} holds parameters of another model shape "
                f"(expected {expected}, found {got})"
            )
    return restored

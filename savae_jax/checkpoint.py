"""Saving results and parameters so that a killed run never leaves half a file.

Text and images are written to a temporary file in the same folder and renamed
into place (``os.replace`` is atomic on POSIX); parameter pytrees go through
orbax-checkpoint, which commits a finished checkpoint by renaming it too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from savae_jax import distributed


def atomic_write_bytes(path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode an ordinary open() would (0644 under umask 022).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is refused)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None, so it can be written as JSON.

    A diverged run's history (a NaN loss) is then still a valid JSON file, with
    ``null`` where a number could not be computed.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


# A file Orbax writes into every checkpoint folder: what marks a folder as one of ours.
_CHECKPOINT_MARKER = "_CHECKPOINT_METADATA"


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a parameter checkpoint folder written by :func:`save_params` (Orbax)."""
    return (Path(path) / _CHECKPOINT_MARKER).is_file()


def check_parents(path, name: str = "path") -> Path:
    """``path`` made absolute; ValueError naming ``name`` if a folder above it is an ordinary file.

    Orbax would fail on such a path from deep inside, and then wait ~300 s at
    exit for its background threads: the check runs before Orbax is called.
    """
    path = Path(path).absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}: cannot save a checkpoint at {path}: {parent} is a file, not a folder")
            break
    return path


def check_writable_checkpoint_path(path, name: str = "path") -> Path:
    """Refuse a ``path`` that :func:`save_params` must not write: ValueError naming ``name`` and the path.

    Allowed: a path that does not exist (under folders, or under nothing yet),
    an empty folder, or an earlier checkpoint (replaced). Refused: an ordinary
    file, a folder holding anything else (it would be deleted), and a path
    under an ordinary file (Orbax would fail deep inside and then hang at exit).
    """
    path = check_parents(path, name)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{name}: {path} is an ordinary file, not a checkpoint folder; "
                             "refusing to replace it (choose another path)")
        if any(path.iterdir()) and not is_checkpoint(path):
            raise ValueError(f"{name}: {path} is a folder that holds other files, not a checkpoint; "
                             "refusing to replace its contents (choose another path)")
    return path


def save_params(path, params, name: str = "path") -> Path:
    """Save a parameter pytree to the orbax checkpoint folder ``path``.

    An earlier checkpoint at ``path`` is replaced; anything else (a file, a
    folder of other files, a path under a file) is refused before anything is
    written (:func:`check_writable_checkpoint_path`).

    Args:
      path: the checkpoint folder.
      params: the pytree to save.
      name: the argument or flag to name in errors.
    """
    path = check_writable_checkpoint_path(path, name)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    return path


def load_params(path, like=None, name: str = "path"):
    """Restore a parameter pytree saved by ``save_params``, onto this process's first device.

    Works the same in every process of a multi-process run (each reads the
    whole tree; the saved topology does not matter).

    Args:
      path: the checkpoint folder.
      like: optional pytree of the expected structure, shapes and dtypes
        (e.g. a freshly initialised model's params); a mismatch is a ValueError.
      name: the argument or flag to name in errors (e.g. "--init-from").
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise ValueError(f"{name}: no parameter checkpoint at {path}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = checkpointer.metadata(path).item_metadata.tree
    except Exception as err:  # orbax raises many kinds; the user needs one message
        raise ValueError(f"{name}: could not read a checkpoint at {path}: {err}") from err
    if like is not None:
        expected = jax.tree.map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)), like)
        got = jax.tree.map(lambda m: (tuple(m.shape), str(m.dtype)), saved)
        if expected != got:
            raise ValueError(
                f"{name}: checkpoint at {path} holds parameters of another model shape "
                f"(expected {expected}, found {got})"
            )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    try:
        return checkpointer.restore(path, target)
    except Exception as err:
        raise ValueError(f"{name}: could not read a checkpoint at {path}: {err}") from err


class RunCheckpointer:
    """Whole-run checkpoints: a state pytree plus JSON metadata, every few steps.

    Orbax writes each checkpoint into a temporary folder and renames it when
    complete, so a process killed mid-write leaves the previous checkpoints
    intact. ``restore`` walks back from the newest step and skips (and
    reports) any checkpoint it cannot read.

    Args:
      directory: folder holding one sub-folder per saved step.
      max_to_keep: how many recent checkpoints survive (>= 2 so a damaged
        newest one still has a predecessor).
    """

    def __init__(self, directory, max_to_keep: int = 2):
        if max_to_keep < 2:
            raise ValueError(f"max_to_keep must be >= 2, got {max_to_keep}")
        self.directory = check_parents(directory, "checkpoint_dir")
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir: {self.directory} is an ordinary file, not a folder")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps with a committed checkpoint, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``; blocks until committed.

        Saving a step that exists replaces it (the older checkpoints stay as
        the fallback while the new one is written).
        """
        # Across processes the delete is a collective, so every process must take the same branch:
        # process 0's view decides (another process may not see process 0's newest commit yet).
        if distributed.agree(step in self.steps()):
            self._manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, like, log=None):
        """The newest readable checkpoint as ``(step, state, meta)``, or None if there is none.

        Args:
          like: a pytree with the saved state's structure, shapes and dtypes,
            or a function ``meta -> pytree`` when the structure depends on the
            metadata (e.g. which phase of a run was saved).
          log: called with a message for every checkpoint that had to be skipped.
        """
        for step in reversed(self.steps()):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                template = like(meta) if callable(like) else like
                target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
                state = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
            except Exception as err:  # a damaged checkpoint: report it, use the one before
                if log is not None:
                    log(f"checkpoint {self.directory / str(step)} is unreadable "
                        f"({type(err).__name__}: {str(err)[:200]}); trying the previous one")
                continue
            return step, state, meta
        return None

    def close(self) -> None:
        self._manager.close()

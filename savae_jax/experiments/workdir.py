"""The workdir policy of every subcommand: refuse an existing run, ``--resume`` continues it, ``--overwrite``
deletes only the subcommand's own files; and the atomic CSV writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from savae_jax import checkpoint, distributed


def write_csv(path, rows: list[dict]) -> None:
    """Write ``rows`` (history or trace rows) as CSV, atomically; the columns are every key in order of first use."""
    import csv
    import io



    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(path, buf.getvalue())


def check_same_workdir(workdir) -> None:
    """Across processes (--distributed), refuse a --workdir that differs between processes.

    Process 0 writes the files and Orbax's checkpoints synchronise every
    process on one folder: separate folders would hang in the first save.
    """
    import zlib

    path = str(Path(workdir).absolute())
    if not distributed.same_everywhere(zlib.crc32(path.encode())):
        raise ValueError(f"--workdir: every process of a --distributed run must pass the same folder "
                         f"(one all processes see); this process has {path}, another has a different one")


def prepare(workdir: Path, config: dict, args, outputs, not_compared, may_grow=(), defaults=None) -> None:
    """The one workdir policy of every subcommand, applied before anything is written.

    A folder that holds a run is refused; ``--resume`` continues it (the
    saved config must match, :func:`check_workdir`), and is refused where
    there is no run; ``--overwrite`` first deletes the subcommand's own
    ``outputs`` of an earlier run (:func:`clear_run`), never other files.
    Across processes (--distributed) every process must name the same folder.
    """
    check_same_workdir(workdir)
    if args.overwrite and args.resume:
        raise ValueError("--overwrite: give either --resume (continue the run) or --overwrite (replace it)")
    if args.resume and not (workdir / "config.json").is_file():
        raise ValueError(f"--resume: {workdir} holds no run to continue (no config.json); "
                         "drop --resume to start one there")
    if args.overwrite:
        if distributed.is_primary():
            clear_run(workdir, outputs)
        distributed.barrier("earlier run cleared")
    check_workdir(workdir, config, args.resume, not_compared, may_grow, defaults)


def check_workdir(workdir: Path, config: dict, resume: bool, not_compared=("resume", "quiet", "workdir"),
                  may_grow=(), defaults=None) -> None:
    """Refuse an unusable --workdir before any training (errors name --workdir / --resume).

    The folder must be writable (probed); one that holds a run (its
    config.json) is refused unless ``resume``, and then its saved config must
    equal ``config`` except for the keys in ``not_compared``, and the keys in
    ``may_grow`` (a budget such as ``epochs``), which may be larger than saved.
    ``defaults`` (the subcommand's default settings): a setting added after the
    run was saved, so missing from its config.json, counts as saved at its default.
    """
    import jax



    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir: {workdir} exists and is not a folder")
    probe = workdir / f".write-test-{jax.process_index()}"  # one per process: they may share workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_bytes(probe, b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--workdir: cannot write to {workdir}: {err}") from err
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    if not resume:
        raise ValueError(f"--workdir: {workdir} already holds a run; pass --resume to continue it, --overwrite "
                         "to replace it, or choose another --workdir (nothing was overwritten)")
    saved = read_saved_config(saved_path)
    saved = {k: v for k, v in (defaults or {}).items() if k in config} | saved  # settings added since

    def grown(k):
        return k in may_grow and isinstance(saved.get(k), int) and isinstance(config.get(k), int) \
            and config[k] >= saved[k]

    diffs = [f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}"
             + (" (it may only grow)" if k in may_grow else "")
             for k in sorted(set(saved) | set(config))
             if k not in not_compared and saved.get(k) != config.get(k) and not grown(k)]
    if diffs:
        raise ValueError("--resume: the run in --workdir has a different config:\n  " + "\n  ".join(diffs))



def read_saved_config(path: Path) -> dict:
    """The ``"config"`` of a run's config.json; ValueError naming the file if it is unreadable or has none."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume: cannot read {path} ({type(err).__name__}: {err}); it may be truncated. "
                         "Restore it, or start the run again in another --workdir") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"--resume: {path} has no \"config\" object (not a config.json written by this "
                         "script?); restore it, or start the run again in another --workdir")
    return saved["config"]


def clear_run(workdir: Path, outputs) -> None:
    """Delete an earlier run's outputs from ``workdir`` (--overwrite); ValueError if it holds anything else.

    ``outputs`` names every file and folder the subcommand writes, as names
    or ``fnmatch`` patterns (``history_*_seed*.csv``). Only those (and our own
    temporary files) are removed, and only when nothing else is there, so no
    file the user did not ask the subcommand to write is ever deleted.
    """
    if not (workdir / "config.json").is_file():
        return  # no run to replace
    foreign = foreign_files(workdir, outputs)
    if foreign:
        raise ValueError(f"--overwrite: {workdir} holds files this subcommand did not write ({', '.join(foreign)}); "
                         "refusing to delete anything (move them, or choose another --workdir)")
    if (workdir / "params").exists() and not _only_checkpoints(workdir / "params"):
        raise ValueError(f"--overwrite: {workdir / 'params'} is not a parameter checkpoint; refusing to delete it")
    for path in sorted(workdir.iterdir()):
        if not _ours(path.name, outputs):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _ours(name: str, outputs) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in outputs)


def foreign_files(workdir: Path, outputs) -> list[str]:
    """The names in ``workdir`` that are none of ``outputs`` (names or patterns) nor our hidden temporary files."""
    return sorted(p.name for p in workdir.iterdir() if not _ours(p.name, outputs) and not p.name.startswith("."))


def _only_checkpoints(path: Path) -> bool:
    """Whether ``path`` is a parameter checkpoint or a folder of them (compare's params/<method>/seed<s>)."""
    return checkpoint.is_checkpoint(path) or (path.is_dir() and all(_only_checkpoints(p) for p in path.iterdir()))

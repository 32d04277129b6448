"""Command-line plumbing shared by the subcommands: help formatting, the model and scale-out flags, the mesh."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import savae_jax as sv
from savae_jax import distributed
from savae_jax.experiments.settings import BETA_SCHEDULES, MODELS


def positive(kind):
    """argparse type: a number > 0 of type ``kind``."""

    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default (unless its help already says it or it has none); epilog kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)"


def show_defaults(parser, defaults: dict) -> None:
    """Append "(default X)" to the help of the flags whose default lives in ``defaults`` (argparse's is None)."""
    for action in parser._actions:
        value = defaults.get(action.dest)
        if action.default is None and value is not None and "default" not in (action.help or ""):
            action.help = f"{action.help} (default {value})" if action.help else f"default {value}"


@contextlib.contextmanager
def disk_errors(prog: str, workdir):
    """Turn an OSError while a subcommand writes --workdir (a full disk, a folder removed under it)
    into one clear exit (status 1) instead of a traceback: every file is written atomically, so what
    was written before is intact and ``--resume`` continues the run."""
    try:
        yield
    except OSError as err:
        sys.exit(f"{prog}: cannot write to --workdir {workdir}: {err}. Files written before this error are "
                 "intact; fix the disk and rerun with --resume.")


def comma_list(text: str, flag: str, convert=str, example: str = "") -> list:
    """``"a,b,c"`` as a list of ``convert``-ed items; ValueError naming ``flag`` on an empty entry
    (``0,,1``), an item ``convert`` refuses, or an item given twice (``adam,adam``)."""
    items = [item.strip() for item in str(text).split(",")]
    hint = f", e.g. {example}" if example else ""
    if not all(items):
        raise ValueError(f"{flag}: expected a comma-separated list without empty entries{hint}, got {text!r}")
    try:
        values = [convert(item) for item in items]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated {getattr(convert, '__name__', 'value')}s{hint}, "
                         f"got {text!r}") from None
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{flag}: {', '.join(repeated)} given more than once in {text!r}; give each once")
    return values


def methods_list(text: str, flag: str = "--methods") -> list[str]:
    """The registry's methods named in ``text`` (``"adam,sa-refine"``); ValueError naming ``flag``."""
    from savae_jax.experiments.registry import METHODS

    methods = comma_list(text, flag, example="adam,sa-refine")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"{flag}: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def workdir_path(text: str) -> str:
    """--workdir's type: a non-empty path (an empty one would scatter the run's files over the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a folder path, got an empty string (the run's files would be "
                                         "written into the current folder); e.g. --workdir runs/mine")
    return text


def add_workdir_flags(parser, default: str, add=None) -> None:
    """--workdir, --resume and --overwrite: the one workdir policy of every subcommand (``workdir.prepare``).

    ``add``: the parser's ``add_argument`` or a wrapper of it (compare's, which records defaults)."""
    add = add or parser.add_argument
    add("--workdir", default=default, type=workdir_path,
        help="folder of every output (refused if it holds a run, unless --resume or --overwrite)")
    add("--resume", action="store_true", help="continue the run in --workdir exactly where it stopped")
    add("--overwrite", action="store_true",
        help="replace the run in --workdir: delete the files an earlier run of this subcommand wrote there "
             "(refused if the folder holds anything else)")


def add_gated_run_flags(parser, defaults, validation_help: str) -> None:
    """--validation, --batch-size, --eval-every, --hidden, --latents: the runs of a subcommand that scores
    them on a validation split (tune, quantize); ``defaults`` holds the five fields."""
    parser.add_argument("--validation", type=float, default=defaults.validation, help=validation_help)
    parser.add_argument("--batch-size", type=positive(int), default=defaults.batch_size)
    parser.add_argument("--eval-every", type=positive(int), default=defaults.eval_every,
                        help="steps between validation checks of the gate")
    parser.add_argument("--hidden", type=positive(int), default=defaults.hidden)
    parser.add_argument("--latents", type=positive(int), default=defaults.latents)


def add_config_flag(parser) -> None:
    """--config FILE: a JSON object of settings by flag name (read by :func:`parse_with_config`)."""
    parser.add_argument("--config", default=None,
                        help='JSON file of settings by flag name, e.g. {"lr": 0.003, "sa-t0": 0.5} '
                             "(the flags given on the command line win over it)")


def read_json_object(path, flag: str = "--config") -> dict:
    """The JSON object in ``path``; ValueError naming ``flag`` if it is unreadable or not an object."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag}: cannot read {path}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{flag}: {path} must hold a JSON object of settings, got {type(values).__name__}")
    return values


def _file_value(action, key: str, value):
    """``value`` for ``key`` of a --config file, parsed and checked as the flag's own text would be."""
    name = f"--config {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: must be true or false, got {value!r}")
        return value
    if value is None and action.default is None:
        return None
    if value is None or isinstance(value, (bool, list, dict)):
        raise ValueError(f"{name}: must be a value such as --{key.replace('_', '-')} takes, got {value!r}")
    try:
        parsed = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{name}: {err}") from None
    if action.choices is not None and parsed not in action.choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return parsed


def parse_with_config(parser, argv):
    """``parser.parse_args(argv)``, where a --config FILE's settings replace the defaults (flags still win).

    The file's keys are flag names without the dashes (``"sa-t0"``, or ``"sa_t0"``);
    each value is checked as the flag's own text would be. A bad file is a usage
    error naming --config and the key.
    """
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    flags = {a.option_strings[-1][2:]: a for a in parser._actions
             if a.option_strings and a.dest not in ("help", "config")}
    try:
        defaults = {}
        for key, value in read_json_object(args.config).items():
            action = flags.get(str(key).replace("_", "-"))
            if action is None:
                raise ValueError(f"--config: unknown setting {key!r}; known: {', '.join(flags)}")
            defaults[action.dest] = _file_value(action, key, value)
    except ValueError as err:
        parser.error(str(err))
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def parse_args(parser, argv, config_file: bool = False):
    """Parse ``argv`` and set up --distributed / --devices before any other JAX call.

    Args:
      parser: the subcommand's parser (with the scale-out flags).
      argv: the arguments.
      config_file: read --config FILE as settings by flag name (:func:`parse_with_config`).
    Returns ``(args, mesh)``; a bad distributed setting is a usage error (exit 2).
    """
    args = parse_with_config(parser, argv) if config_file else parser.parse_args(argv)
    try:
        return args, mesh_from_args(args)
    except ValueError as err:
        parser.error(str(err))


def backend_line() -> str:
    """One line saying where JAX runs: the backend, how many devices of which kind, the processes.

    On CPU it also says how to get an accelerator, so a GPU machine that
    silently runs on CPU (jaxlib without CUDA) is noticed at the first line.
    """
    import jax

    devices = jax.devices()
    line = (f"JAX {jax.__version__} backend {jax.default_backend()}: {len(devices)} device(s), "
            f"{devices[0].device_kind}")
    if jax.process_count() > 1:
        line += f", {jax.process_count()} processes ({jax.local_device_count()} local devices)"
    if jax.default_backend() == "cpu":
        line += " (no accelerator in use; on a GPU machine: pip install -e \".[cuda12]\")"
    return line

def make_log():
    """``log(line)``: print (flushed) in process 0, nothing in the others (--distributed)."""
    if distributed.is_primary():
        return lambda line: print(line, flush=True)
    return lambda line: None


def add_scale_out_flags(parser) -> None:
    """Add the scale-out flags of the experiment scripts to an argparse parser.

    --distributed, --coordinator, --num-processes, --process-id (see
    ``distributed.initialize_distributed``) and --devices (the mesh; see ``mesh_from_args``).
    """
    group = parser.add_argument_group("scale-out (docs/distributed.md)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (multi-process/multi-host) "
                            "and run on a mesh of every process's devices")
    group.add_argument("--coordinator", default=None,
                       help="with --distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS "
                            "or auto-detected)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="with --distributed: number of processes (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="with --distributed: this process's index (default: $JAX_PROCESS_ID)")
    add_devices_flag(group)


def add_devices_flag(parser, what: str = "shard over") -> None:
    """--devices N|all: the mesh of ``mesh_from_args`` (alone, for a subcommand that runs in one process)."""
    parser.add_argument("--devices", default=None,
                        help=f"{what} a mesh of this many devices, or 'all' (default: one device; "
                             "with --distributed: all devices of all processes)")


def mesh_from_args(args):
    """Initialise ``jax.distributed`` if ``args.distributed``, then the mesh ``--devices`` asks for.

    Call it before any other JAX call of the script. Returns None (one
    device, the default code path) unless --devices or --distributed is given.
    """
    distributed_run = getattr(args, "distributed", False)  # absent where only --devices is offered
    for flag in ("coordinator", "num_processes", "process_id"):
        if getattr(args, flag, None) is not None and not distributed_run:
            raise ValueError(f"--{flag.replace('_', '-')} needs --distributed")
    if distributed_run:
        try:
            distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except ValueError as err:
            raise ValueError(f"--distributed: {err}") from err
    devices = args.devices
    if devices is None and not distributed_run:
        return None
    if devices is None or devices == "all":
        return distributed.make_mesh()
    try:
        count = int(devices)
    except ValueError:
        raise ValueError(f"--devices: must be a number or 'all', got {devices!r}") from None
    try:
        return distributed.make_mesh(count)
    except ValueError as err:
        raise ValueError(f"--devices: {err}") from err


def add_model_flags(parser) -> None:
    """--model, --hidden, --latents, --likelihood and the beta/free-bits flags."""
    group = parser.add_argument_group("model and objective")
    group.add_argument("--model", choices=MODELS, default=None, help="mlp (default) or conv")
    group.add_argument("--hidden", type=int, default=None, help="MLP hidden width / conv dense width")
    group.add_argument("--latents", type=int, default=None, help="latent dimensions")
    group.add_argument("--likelihood", choices=sv.models.LIKELIHOODS, default=None,
                       help="bernoulli (default; binarised data), gaussian, logistic (8-bit data, bits/dim)")
    group.add_argument("--beta", type=float, default=None, help="KL weight (default 1)")
    group.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=None,
                       help="constant (default), warmup (0 -> beta over --beta-steps), cyclical")
    group.add_argument("--beta-steps", type=int, default=None, help="warm-up length or cyclical total steps")
    group.add_argument("--beta-cycles", type=int, default=None, help="cyclical: number of cycles")
    group.add_argument("--free-bits", type=float, default=None, help="minimum KL per latent dimension (nats)")
    group.add_argument("--eval-iwae", type=int, default=None, help="k of the final IWAE-k evaluation (0: skip)")



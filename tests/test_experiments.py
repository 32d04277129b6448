"""The experiment layer as a library: typed configs, the `savae` command, no matplotlib on import."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from savae_jax.experiments import builders, compare, settings
from savae_jax.experiments.settings import AnnealerConfig, ESConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_from_dict_fills_defaults_and_keeps_the_given_values():
    config = AnnealerConfig.from_dict({"proposals": 8, "scale": 0.05, "t_min": 0.1}, "--sa-", "annealing")
    assert (config.proposals, config.scale, config.t_min) == (8, 0.05, 0.1)
    assert config.decay == 0.995 and config.patience is None  # the defaults
    assert AnnealerConfig.from_dict({"proposals": 8.0}).proposals == 8  # an integral float is an integer
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scale = 1.0


@pytest.mark.parametrize("values, message", [
    ({"lrr": 1e-3}, r"^--sa-\*: unknown annealing settings \['lrr'\]; known: proposals, proposal, "),
    ({"proposals": "8"}, r"^--sa-proposals: must be an integer, got '8'$"),
    ({"proposals": 8.5}, r"^--sa-proposals: must be an integer, got 8.5$"),
    ({"scale": True}, r"^--sa-scale: must be a number, got True$"),
    ({"t_min": "low"}, r"^--sa-t-min: must be a number or null, got 'low'$"),
    ({"scale_by_rms": 1}, r"^--sa-scale-by-rms: must be true or false, got 1$"),
])
def test_from_dict_names_the_key_of_a_bad_setting(values, message):
    with pytest.raises(ValueError, match=message):
        AnnealerConfig.from_dict(values, "--sa-", "annealing")


def test_the_kinds_come_from_the_annotations():
    kinds = AnnealerConfig.kinds()
    assert kinds["proposals"] == ("int", False) and kinds["scale"] == ("number", False)
    assert kinds["t_min"] == ("number", True) and kinds["patience"] == ("int", True)
    assert kinds["proposal"] == ("str", False) and kinds["scale_by_rms"] == ("bool", False)
    assert ESConfig.kinds()["decision_size"] == ("int", False)
    assert compare.CompareConfig.kinds()["seeds"] == ("any", False)  # a list, checked by resolve_config


def test_builders_take_a_config_or_a_dict_of_its_keys():
    model = builders.make_model(ModelConfig(hidden=8, latents=2))
    assert builders.make_model({"hidden": 8, "latents": 2}) == model
    loss_fn = builders.make_training_loss(model, ModelConfig())
    typed = builders.make_annealer(loss_fn, AnnealerConfig(proposals=5))
    from_dict = builders.make_annealer(loss_fn, {"proposals": 5})
    assert typed.cost == from_dict.cost == 6  # K + 1 evaluations a step
    es = builders.make_es(loss_fn, ESConfig(pairs=3, decision_size=0))
    assert es.cost == 2 * 3 + 2  # the antithetic pairs, then the candidate and incumbent for the decision


def test_a_compare_config_round_trips_through_its_dict_and_refuses_a_bad_type():
    args = compare.build_parser().parse_args(["--methods", "adam,sa", "--seeds", "0,2", "--hidden", "16",
                                              "--set", "sa.scale=0.05"])
    config = compare.resolve_config(args)
    assert isinstance(config, compare.CompareConfig) and isinstance(config, ModelConfig)
    assert (config.methods, config.seeds, config.hidden) == ("adam,sa", [0, 2], 16)
    assert config.checkpoint_every == 5 * config.eval_every  # filled in by resolve_config
    assert config.method_config["sa"]["scale"] == 0.05 and config.method_config["adam"] == {"lr": 1e-3}
    assert compare.CompareConfig.from_dict(config.to_dict()) == config  # config.json's form
    with pytest.raises(ValueError, match=r"^--hidden: must be an integer, got True$"):
        compare.check_config_types(compare.DEFAULTS | {"hidden": True})


def test_settings_defaults_are_the_configs_defaults():
    assert settings.SA_DEFAULTS == dataclasses.asdict(AnnealerConfig())
    assert list(settings.MODEL_DEFAULTS) == [f.name for f in dataclasses.fields(ModelConfig)]


def test_importing_the_library_or_the_experiment_layer_does_not_import_matplotlib():
    code = ("import sys, savae_jax, savae_jax.experiments.compare, savae_jax.experiments.train, "
            "savae_jax.experiments.plateau, savae_jax.experiments.benchmark, savae_jax.experiments.figures; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_savae_command_lists_and_runs_its_subcommands(tmp_path, capsys):
    """The console command (installed by pip) and a subcommand's own help, from a folder with no checkout."""
    savae = Path(sys.executable).with_name("savae")
    if not savae.exists():
        pytest.skip(f"no savae console script beside {sys.executable} (install the package with pip)")
    top = subprocess.run([str(savae), "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for name in ("train", "compare", "plateau", "bench", "dual-annealing", "tune", "quantize", "quantize-bits"):
        assert f"    {name}" in top.stdout, top.stdout
    # Each subcommand's own parser, through the console command's entry point (in this process: the
    # subprocesses above and below show the installed command itself works).
    from savae_jax import cli

    for name in ("train", "compare", "plateau", "bench", "dual-annealing", "tune", "quantize", "quantize-bits"):
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0 and out.startswith(f"usage: savae {name}"), out[:400]
    bad = subprocess.run([str(savae), "compar"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'compar'" in bad.stderr, bad.stderr
    bad_flag = subprocess.run([str(savae), "compare", "--budget-evals", "0", "--workdir", str(tmp_path / "w")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad_flag.returncode == 2 and "savae compare: error: --budget-evals: must be a positive integer" \
        in bad_flag.stderr, bad_flag.stderr[-1000:]
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_a_config_file_sets_the_defaults_and_the_command_line_wins(tmp_path):
    from savae_jax.experiments import flags, train

    path = tmp_path / "train.json"
    path.write_text('{"epochs": 2, "lr": 0.003, "sa-t0": 0.5, "sa_proposals": 8, "binarize": "static", '
                    '"overwrite": true}')
    args = flags.parse_with_config(train.build_parser(), ["--config", str(path), "--lr", "0.01"])
    assert (args.epochs, args.lr, args.sa_t0, args.sa_proposals) == (2, 0.01, 0.5, 8)  # --lr wins over the file
    assert args.binarize == "static" and args.overwrite is True
    assert train.sa_config(args).t0 == 0.5  # the typed annealer config of the --sa-* settings
    assert "config" not in train.effective_settings(args)  # recorded setting by setting, not as a path


@pytest.mark.parametrize("text, message", [
    ('{"epoch": 2}', "--config: unknown setting 'epoch'; known: "),
    ('{"epochs": -2}', "--config epochs: must be > 0, got -2"),
    ('{"epochs": "two"}', "--config epochs: invalid literal for int() with base 10: 'two'"),
    ('{"binarize": "maybe"}', "--config binarize: must be one of dynamic, static, none, got 'maybe'"),
    ('{"quiet": 1}', "--config quiet: must be true or false, got 1"),
    ('{"lr": [0.1]}', "--config lr: must be a value such as --lr takes, got [0.1]"),
    ('[1, 2]', "must hold a JSON object of settings, got list"),
    ('{"lr": 0.1', "--config: cannot read"),
])
def test_a_bad_config_file_is_a_usage_error_naming_the_key(tmp_path, capsys, text, message):
    from savae_jax.experiments import train

    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        train.main(["--config", str(path), "--workdir", str(tmp_path / "w")])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_plateau_reads_a_config_file_into_its_typed_config(tmp_path, capsys):
    from savae_jax.experiments import plateau

    path = tmp_path / "plateau.json"
    path.write_text('{"arms": "adam,warp"}')
    with pytest.raises(SystemExit) as info:
        plateau.main(["--config", str(path), "--workdir", str(tmp_path / "w")])
    assert info.value.code == 2 and "--arms: choose from adam, adam-decayed" in capsys.readouterr().err
    path.write_text('{"max_epochs": 2.5}')
    with pytest.raises(SystemExit):
        plateau.main(["--config", str(path), "--workdir", str(tmp_path / "w")])
    assert "--config max_epochs: invalid literal for int()" in capsys.readouterr().err


def test_train_warns_about_a_config_files_setting_that_has_no_effect(tmp_path, capsys):
    from savae_jax.experiments import flags, train

    path = tmp_path / "train.json"
    path.write_text('{"sa-t0": 0.5, "hidden": 16, "latents": 2}')
    parser = train.build_parser()
    args = flags.parse_with_config(parser, ["--config", str(path), "--workdir", str(tmp_path / "w"), "--quiet"])
    train.check_run(args, parser, None)  # --optimizer adam (the default): the annealer's t0 does nothing
    assert "warning: --sa-t0 has no effect with --optimizer adam" in capsys.readouterr().err


def test_every_library_feature_of_an_annealer_is_reachable_from_its_settings():
    """Issue 23: fraction, local polish and replica exchange from --set / --sa-* (the sa-pt method)."""
    import jax
    import jax.numpy as jnp

    import savae_jax as sv
    from savae_jax import annealing
    from savae_jax.experiments import registry

    model = builders.make_model(ModelConfig(hidden=8, latents=2))
    loss_fn = builders.make_training_loss(model, ModelConfig())
    plain = builders.make_annealer(loss_fn, {"proposals": 4, "proposal": "cauchy", "fraction": 0.1})
    polished = builders.make_annealer(loss_fn, {"proposals": 4, "polish_steps": 3, "polish_every": 10,
                                                "polish_optimizer": "adam"})
    assert polished.cost == plain.cost + 2  # ceil((3 x 3 + 2) / 10) evaluations a step for the polish
    pt = builders.make_annealer(loss_fn, {"proposals": 4, "replicas": 3, "ladder_ratio": 3.0, "t0": 0.1})
    assert pt.cost == 3 * plain.cost + 3  # 3 replicas, and 3 losses for the swap round of every step
    params = sv.models.init(jax.random.key(0), model, jnp.zeros((1, 8, 8, 1)))
    state, info = jax.jit(pt.step)(jax.random.key(1), pt.init(params), jnp.full((16, 8, 8, 1), 0.5))
    assert isinstance(state, annealing.ReplicaState)
    # Replica k cools on the schedule scaled by 3**k: T = 0.1, 0.3, 0.9 at the first step.
    assert info.replicas.temperature.tolist() == pytest.approx([0.1, 0.3, 0.9], rel=1e-6)
    with pytest.raises(ValueError, match=r"^sa\.fraction: moves a fraction of the entries of gaussian and cauchy"):
        builders.make_annealer(loss_fn, {"fraction": 0.5}, "sa.")
    with pytest.raises(ValueError, match=r"^sa\.replicas: replica exchange scales each replica's schedule"):
        builders.make_annealer(loss_fn, {"replicas": 2, "schedule": "adaptive"}, "sa.")
    with pytest.raises(ValueError, match=r"^sa\.replicas: must be 1 \(one annealer\) or an integer >= 2, got 0"):
        builders.make_annealer(loss_fn, {"replicas": 0}, "sa.")
    phases = registry.build_phases("sa-pt", registry.METHOD_DEFAULTS["sa-pt"], loss_fn, batch_size=16)
    assert [p.name for p in phases] == ["adam", "sa"] and isinstance(
        phases[1].optimizer.init(params), annealing.ReplicaState)
    # The --help epilog says that each method has its own keys (a refinement's Adam reads adam_lr).
    assert "--set adam.lr changes the adam method only" in registry.set_keys_help()

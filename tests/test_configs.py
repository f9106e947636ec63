"""Every YAML file in configs/ parses, in each stack of ``-c`` files it is meant for, against
the code's constructor signatures, so a recipe or overlay can never drift from the code."""

from pathlib import Path

import pytest
import yaml

from train import LayerdiffCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (subcommand, files): recipes at the top level, overlays stacked on them as the README and
# the files' own headers use them.
STACKS = [
    ("fit", ("transparent_vae.yaml",)),
    ("fit", ("transparent_vae.yaml", "demo/transparent_vae.yaml")),
    ("fit", ("latent_diffusion.yaml",)),
    ("fit", ("latent_diffusion.yaml", "demo/latent_diffusion.yaml")),
    ("fit", ("transparent_vae.yaml", "strategy/fsdp.yaml")),
    ("fit", ("transparent_vae.yaml", "demo/transparent_vae.yaml", "strategy/fsdp.yaml")),
    ("fit", ("latent_diffusion.yaml", "strategy/fsdp.yaml")),
    ("fit", ("latent_diffusion.yaml", "demo/latent_diffusion.yaml", "strategy/fsdp.yaml")),
    ("fit", ("transparent_vae.yaml", "cluster/slurm.yaml")),
    ("fit", ("latent_diffusion.yaml", "cluster/slurm.yaml")),
    ("fit", ("latent_diffusion.yaml", "strategy/fsdp.yaml", "cluster/slurm.yaml")),
    ("fit", ("joint_lora.yaml",)),
    ("fit", ("joint_lora.yaml", "demo/joint_lora.yaml")),
    ("fit", ("joint_lora.yaml", "strategy/fsdp.yaml")),
    ("fit", ("joint_sd15.yaml",)),
    ("fit", ("joint_lora.yaml", "conditional/layers.yaml")),
    ("fit", ("joint_lora.yaml", "demo/joint_lora.yaml", "conditional/layers.yaml")),
    *(("fit", ("joint_lora.yaml", f"conditional/{variant}.yaml")) for variant in ("fg2ble", "bg2ble", "fgble2bg", "bgble2fg")),
    ("fit", ("joint_lora.yaml", "demo/joint_lora.yaml", "conditional/bgble2fg.yaml")),
    ("fit", ("joint_sd15.yaml", "conditional/fg2bg_sd15.yaml")),
    ("fit", ("joint_sd15.yaml", "conditional/bg2fg_sd15.yaml")),
    ("fit", ("diffumatting.yaml",)),
    ("fit", ("diffumatting.yaml", "demo/diffumatting.yaml")),
    ("predict", ("diffumatting.yaml", "predict_matting.yaml")),
    ("predict", ("diffumatting.yaml", "demo/diffumatting.yaml", "predict_matting.yaml", "demo/predict_matting.yaml")),
    ("predict", ("joint_lora.yaml", "demo/joint_lora.yaml", "predict_layers.yaml", "demo/predict_layers.yaml")),
    ("predict", ("latent_diffusion.yaml", "predict.yaml")),
    ("predict", ("latent_diffusion.yaml", "demo/latent_diffusion.yaml", "predict.yaml", "demo/predict.yaml")),
]
RECIPES = sorted(
    path.name for path in CONFIGS.glob("*.yaml") if "class_path" in yaml.safe_load(path.read_text()).get("model", {})
)


def stack_id(stack: tuple[str, tuple[str, ...]]) -> str:
    subcommand, files = stack
    return f"{subcommand}:" + "+".join(name.removesuffix(".yaml") for name in files)


def print_config(capsys, subcommand: str, *files: str, extra: tuple[str, ...] = ()) -> dict:
    args = [subcommand]
    for name in files:
        args += ["-c", str(CONFIGS / name)]
    with pytest.raises(SystemExit) as exit_info:
        LayerdiffCLI(args=[*args, *extra, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_every_config_file_is_in_a_tested_stack():
    tested = {name for _, files in STACKS for name in files}
    on_disk = {str(path.relative_to(CONFIGS)) for path in CONFIGS.rglob("*.yaml")}
    assert on_disk <= tested, f"add these to STACKS: {sorted(on_disk - tested)}"
    for recipe in RECIPES:
        assert ("fit", (recipe,)) in STACKS, f"recipe {recipe} must parse alone"


@pytest.mark.parametrize("stack", STACKS, ids=stack_id)
def test_stack_parses_and_every_overlay_value_is_applied(stack, capsys):
    subcommand, files = stack
    config = print_config(capsys, subcommand, *files)
    assert config["model"]["class_path"].startswith("layerdiff.modules.")
    for (section, key), (name, value) in overlay_settings(files[1:]).items():
        parsed = config[section].get("init_args", config[section])
        assert parsed[key] == value, f"{name}: {section}.{key} was not applied"


def overlay_settings(files: tuple[str, ...]) -> dict[tuple[str, str], tuple[str, object]]:
    """The plain values the overlays set, by ``(section, key)``; a later file wins, and one that
    names a new ``class_path`` for a section replaces that section's earlier values."""
    settings = {}
    for name in files:
        overlay = yaml.safe_load((CONFIGS / name).read_text())
        for section in ("trainer", "model", "data"):
            values = overlay.get(section, {})
            if "class_path" in values:
                settings = {where: setting for where, setting in settings.items() if where[0] != section}
            for key, value in values.get("init_args", values).items():
                if isinstance(value, (str, int, float, bool)) and "${" not in str(value):
                    settings[section, key] = (name, value)
                else:  # not compared, and no earlier plain value of it holds any more
                    settings.pop((section, key), None)
    return settings


def test_interpolation_follows_the_merged_config(capsys):
    config = print_config(capsys, "fit", "transparent_vae.yaml", extra=("--trainer.default_root_dir", "/tmp/elsewhere"))
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "/tmp/elsewhere"
    checkpoint = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["dirpath"] == "/tmp/elsewhere/checkpoints"


def test_the_slurm_overlay_adds_a_slurm_environment_without_auto_requeue_to_the_recipe_plugins(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for recipe in RECIPES:
        recipe_plugins = print_config(capsys, "fit", recipe)["trainer"]["plugins"]
        config = print_config(capsys, "fit", recipe, "cluster/slurm.yaml")
        *kept, environment = config["trainer"]["plugins"]
        assert kept == recipe_plugins
        assert environment["class_path"].endswith("SLURMEnvironment") and environment["init_args"]["auto_requeue"] is False
        assert config["trainer"]["logger"]["init_args"]["id"] == "slurm-4242"


def test_wandb_is_offline_unless_asked(capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert print_config(capsys, "fit", "transparent_vae.yaml")["trainer"]["logger"]["init_args"]["offline"] is True
    monkeypatch.setenv("WANDB_MODE", "online")
    assert print_config(capsys, "fit", "transparent_vae.yaml")["trainer"]["logger"]["init_args"]["offline"] is False


def test_a_typo_is_reported_by_name(capsys):
    recipe = str(CONFIGS / "transparent_vae.yaml")
    with pytest.raises(SystemExit) as exit_info:
        LayerdiffCLI(args=["fit", "-c", recipe, "--model.init_args.learning_rat", "1e-4", "--print_config"])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err

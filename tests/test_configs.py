"""Every recipe in configs/ parses, alone and with each of its overlays, against the code's
constructor signatures, so a recipe can never drift from the code."""

from pathlib import Path

import pytest
import yaml

from layerdiff.cli import LayerdiffCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def overlays_for(recipe: Path) -> list[Path]:
    """An overlay applies to a recipe when it is named after it (``configs/demo/<recipe>.yaml``)."""
    return sorted(path for path in CONFIGS.glob(f"*/{recipe.name}"))


def print_config(capsys, *files: Path, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit"]
    for path in files:
        args += ["-c", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        LayerdiffCLI(args=[*args, *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_recipes_and_overlays():
    assert RECIPES, "configs/ holds no recipes"
    assert all(overlays_for(recipe) for recipe in RECIPES), "every recipe needs at least its demo overlay"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_parses_alone(recipe, capsys):
    config = print_config(capsys, recipe)
    assert config["model"]["class_path"].startswith("layerdiff.modules.")
    assert config["data"]["class_path"] == "data.ShardDataModule"


@pytest.mark.parametrize(
    "recipe,overlay",
    [(recipe, overlay) for recipe in RECIPES for overlay in overlays_for(recipe)],
    ids=lambda path: f"{path.parent.name}/{path.stem}",
)
def test_recipe_parses_with_overlay(recipe, overlay, capsys):
    config = print_config(capsys, recipe, overlay)
    overlay_values = yaml.safe_load(overlay.read_text())
    for section in ("trainer", "model", "data"):
        for key, value in overlay_values.get(section, {}).get("init_args", overlay_values.get(section, {})).items():
            if isinstance(value, (str, int, float, bool)) and "${" not in str(value):
                parsed = config[section].get("init_args", config[section])
                assert parsed[key] == value, f"{overlay.name}: {section}.{key} was not applied"


def test_interpolation_follows_the_merged_config(capsys):
    recipe = CONFIGS / "transparent_vae.yaml"
    config = print_config(capsys, recipe, extra=("--trainer.default_root_dir", "/tmp/elsewhere"))
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "/tmp/elsewhere"
    checkpoint = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["dirpath"] == "/tmp/elsewhere/checkpoints"


def test_wandb_is_offline_unless_asked(capsys, monkeypatch):
    recipe = CONFIGS / "transparent_vae.yaml"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert print_config(capsys, recipe)["trainer"]["logger"]["init_args"]["offline"] is True
    monkeypatch.setenv("WANDB_MODE", "online")
    assert print_config(capsys, recipe)["trainer"]["logger"]["init_args"]["offline"] is False


def test_a_typo_is_reported_by_name(capsys):
    recipe = CONFIGS / "transparent_vae.yaml"
    with pytest.raises(SystemExit) as exit_info:
        LayerdiffCLI(args=["fit", "-c", str(recipe), "--model.init_args.learning_rat", "1e-4", "--print_config"])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err

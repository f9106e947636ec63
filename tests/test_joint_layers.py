"""JointLayerLoRAModule (LD sec. 3.3) on the tiny models: its loss, the errors a mismatched
batch gets, layer-set generation with every sampler, and ``train.py`` fit and predict of the
joint recipe with both sharing variants. The declared-parts contract is in test_contracts.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from psd_tools import PSDImage

from data import ShardDataModule
from layerdiff.batches import ImageBatch
from layerdiff.models.layer_sharing import sharing_units
from layerdiff.modules import JointLayerLoRAModule
from layerdiff.modules.joint_layers import LayerMismatchError
from layerdiff.pipelines import GenerationSettings, LayerPromptBatch
from support.launch import run_train_py
from support.shards import write_tiny_shards

LAYERS = ("foreground", "background", "blend")
SETTINGS = GenerationSettings(width=64, height=64, steps=2, guidance_scale=4.0)
RECIPE = ("-c", "configs/joint_lora.yaml", "-c", "configs/demo/joint_lora.yaml")


def make_module(parts, **overrides) -> JointLayerLoRAModule:
    sdxl, transparent_vae = parts
    torch.manual_seed(0)
    arguments = {"base_model": str(sdxl), "transparent_vae": str(transparent_vae), "layers": LAYERS, "lora_rank": 4}
    return JointLayerLoRAModule(**{**arguments, **overrides})


def trained_looking(module: JointLayerLoRAModule) -> JointLayerLoRAModule:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for unit in sharing_units(module.unet).values():
            for parameter in unit.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def parts(tiny_sdxl, tiny_transparent_vae):
    return tiny_sdxl, tiny_transparent_vae


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("layered")
    train = write_tiny_shards(folder / "train", 8, sizes=((64, 64),), layers=True)
    val = write_tiny_shards(folder / "val", 2, sizes=((64, 64),), layers=True)
    single = write_tiny_shards(folder / "single", 4, sizes=((64, 64),))
    return {"train": ",".join(train), "val": ",".join(val), "single": ",".join(single)}


@pytest.fixture(scope="module")
def batch(shards):
    data = ShardDataModule(shards["train"], batch_size=2, num_workers=0, shuffle_buffer=0, require_layers=True)
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch.layer("background").pixels.dtype == torch.float32
    return batch


def test_the_loss_is_the_mean_of_the_per_layer_terms_and_depends_on_every_layer(parts, batch):
    module = trained_looking(make_module(parts))
    losses = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"loss"} | {f"loss_{name}" for name in LAYERS}
    torch.testing.assert_close(losses["loss"], torch.stack([losses[f"loss_{name}"] for name in LAYERS]).mean())
    again = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.equal(again["loss"], losses["loss"])  # every random number from the generator
    batch.layer("background").pixels = 1.0 - batch.layer("background").pixels
    changed = module.compute_loss(batch, torch.Generator().manual_seed(0))
    batch.layer("background").pixels = 1.0 - batch.layer("background").pixels
    assert not torch.equal(changed["loss_background"], losses["loss_background"])
    assert not torch.equal(changed["loss_foreground"], losses["loss_foreground"])  # shared attention


def test_without_sharing_a_layer_s_loss_ignores_the_other_layers(parts, batch):
    module = trained_looking(make_module(parts, attention_sharing="none"))
    losses = module.compute_loss(batch, torch.Generator().manual_seed(0))
    batch.layer("background").pixels = 1.0 - batch.layer("background").pixels
    changed = module.compute_loss(batch, torch.Generator().manual_seed(0))
    batch.layer("background").pixels = 1.0 - batch.layer("background").pixels
    assert torch.equal(changed["loss_foreground"], losses["loss_foreground"])
    assert not torch.equal(changed["loss_background"], losses["loss_background"])


def test_a_batch_that_does_not_fit_the_model_is_named(parts, batch):
    module = make_module(parts)
    single = ImageBatch(batch.layer("foreground").rgb, batch.layer("foreground").alpha, batch.caption, batch.key,
                        batch.original_size, batch.crop_top_left)
    with pytest.raises(LayerMismatchError, match="require_layers: true"):
        module.compute_loss(single, torch.Generator())
    with pytest.raises(LayerMismatchError, match=r"not \['shadow'\]"):
        make_module(parts, layers=("foreground", "shadow"), lora_rank=2).compute_loss(batch, torch.Generator())
    with pytest.raises(LayerMismatchError, match="'background'.*transparent_layers"):
        make_module(parts, transparent_layers=("foreground", "background")).compute_loss(batch, torch.Generator())
    with pytest.raises(ValueError, match="not among layers"):
        make_module(parts, transparent_layers=("alpha",))
    with pytest.raises(ValueError, match="each layer once"):
        make_module(parts, layers=("foreground", "foreground"))


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpm++"])
def test_every_sampler_makes_layer_sets_that_depend_only_on_their_own_seed(parts, scheduler):
    generate = trained_looking(make_module(parts)).layer_generator()
    prompts = [{"foreground": "a cat", "background": "a garden", "blend": "a cat in a garden"}, {"foreground": "a cup"}]
    settings = GenerationSettings(**{**SETTINGS.__dict__, "scheduler": scheduler})
    both = generate(LayerPromptBatch([0, 1], prompts, [5, 6], settings))
    alone = generate(LayerPromptBatch([1], prompts[1:], [6], settings))
    assert [set(item.layers) for item in both] == [set(LAYERS)] * 2
    assert both[0].layers["foreground"].shape == (4, 64, 64) and both[0].layers["background"].shape == (3, 64, 64)
    assert all(0.0 <= image.min() and image.max() <= 1.0 for item in both for image in item.layers.values())
    for name in LAYERS:
        torch.testing.assert_close(alone[0].layers[name], both[1].layers[name], atol=2e-3, rtol=0)
    assert both[1].prompts == {"foreground": "a cup", "background": "", "blend": ""}


def test_guidance_applies_per_layer(parts):
    generate = trained_looking(make_module(parts)).layer_generator()
    prompts = [{"foreground": "a cat", "background": "a garden", "blend": "a cat in a garden"}]
    plain = generate(LayerPromptBatch([0], prompts, [1], SETTINGS))[0]
    louder = generate(LayerPromptBatch([0], prompts, [1], SETTINGS, guidance={"background": 9.0}))[0]
    assert not torch.equal(plain.layers["background"], louder.layers["background"])
    with pytest.raises(ValueError, match=r"guidance for layers \['shadow'\]"):
        generate(LayerPromptBatch([0], prompts, [1], SETTINGS, guidance={"shadow": 2.0}))
    with pytest.raises(ValueError, match=r"prompts for layers \['shadow'\]"):
        generate(LayerPromptBatch([0], [{"shadow": "x"}], [1], SETTINGS))


def recipe_arguments(parts, shards, root: Path, **model) -> list[str]:
    sdxl, transparent_vae = parts
    arguments = [*RECIPE, f"--trainer.default_root_dir={root}", f"--model.init_args.base_model={sdxl}",
                 f"--model.init_args.transparent_vae={transparent_vae}", "--model.init_args.lora_rank=4",
                 f"--data.init_args.train_shards={shards['train']}", f"--data.init_args.val_shards={shards['val']}",
                 "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]
    return arguments + [f"--model.init_args.{key}={value}" for key, value in model.items()]


@pytest.mark.parametrize("sharing", ["concat", pytest.param("frame", marks=pytest.mark.slow)])
def test_the_joint_recipe_trains_two_steps_and_predict_writes_layer_sets_and_a_layered_file(parts, shards, tmp_path, sharing):
    root = tmp_path / sharing
    run_train_py("fit", *recipe_arguments(parts, shards, root, attention_sharing=sharing), "--trainer.max_steps=2",
                 "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1")
    assert list((root / "samples").glob("step_*.png"))
    checkpoint = root / "checkpoints" / "last.ckpt"
    run_train_py("predict", *recipe_arguments(parts, shards, root, attention_sharing=sharing),
                 "-c", "configs/predict_layers.yaml", "-c", "configs/demo/predict_layers.yaml", f"--ckpt_path={checkpoint}",
                 "--data.init_args.images_per_prompt=1", "--data.init_args.settings.steps=2")
    generated = root / "generated"
    stems = sorted(path.name.removesuffix(".psd") for path in generated.glob("*.psd"))
    assert len(stems) == 2 and (generated / "contact_sheet.png").is_file()
    for stem in stems:
        foreground = Image.open(generated / f"{stem}.foreground.png")
        assert foreground.mode == "RGBA" and foreground.size == (64, 64)
        assert "prompts" in foreground.text and Image.open(generated / f"{stem}.background.png").mode == "RGB"
        psd = PSDImage.open(generated / f"{stem}.psd")
        assert [layer.name for layer in psd] == ["background", "foreground", "blend (generated)"]  # bottom first
        assert [layer.visible for layer in psd] == [True, True, False]
        fg_in_file = np.asarray(psd[1].topil().convert("RGBA"))
        assert np.array_equal(fg_in_file[..., 3], np.asarray(foreground)[..., 3])


def test_a_layered_recipe_on_single_layer_shards_says_how_to_fix_it(parts, shards, tmp_path):
    result = run_train_py("fit", *recipe_arguments(parts, {**shards, "train": shards["single"]}, tmp_path),
                          "--trainer.max_steps=1", check=False)
    assert result.returncode != 0
    assert "bg.png" in result.stderr and "require_layers" in result.stderr


def test_training_can_start_from_a_layer_sharing_file_in_either_layout(parts, tmp_path):
    from layerdiff.formats.layer_sharing import save_layer_sharing

    source = trained_looking(make_module(parts, attention_sharing="frame"))
    path = save_layer_sharing(tmp_path / "units.safetensors", source.unet, LAYERS)
    started = make_module(parts, attention_sharing="frame", init_from=str(path))
    expected = {key: value for key, value in source.unet.state_dict().items() if ".processor." in key}
    for key, value in expected.items():
        torch.testing.assert_close(started.unet.state_dict()[key], value, msg=key)
    with pytest.raises(ValueError, match="mode: frame in the file, concat in the UNet"):
        make_module(parts, attention_sharing="concat", init_from=str(path))


def test_an_sd15_model_trains_on_layers_generates_and_restarts_from_its_export(tiny_sd15, tiny_transparent_vae, batch,
                                                                              tmp_path):
    from layerdiff.formats.layer_sharing import save_layer_sharing

    source = trained_looking(make_module((tiny_sd15, tiny_transparent_vae), attention_sharing="frame"))
    assert source.architecture == "sd15"
    losses = source.compute_loss(batch, torch.Generator().manual_seed(0))
    assert all(value.isfinite() for value in losses.values())
    layer_set = source.layer_generator()(LayerPromptBatch([0], [{"foreground": "a cat"}], [0], SETTINGS))[0]
    assert layer_set.layers["foreground"].shape == (4, 64, 64)
    # (the released SD1.5 layout needs the full SD1.5 block structure: tests/test_layer_sharing_formats.py)
    path = save_layer_sharing(tmp_path / "units.safetensors", source.unet, LAYERS)
    started = make_module((tiny_sd15, tiny_transparent_vae), attention_sharing="frame", init_from=str(path)).eval()
    torch.testing.assert_close(started.compute_loss(batch, torch.Generator().manual_seed(0))["loss"], losses["loss"])


def test_any_number_of_layers_trains_together(parts, batch):
    from dataclasses import replace as replace_fields

    from layerdiff.batches import Layer

    four = replace_fields(batch, layers=[*batch.layers, Layer("shadow", batch.layer("background").pixels.flip(-1),
                                                              ["a shadow"] * len(batch))])
    module = trained_looking(make_module(parts, layers=(*LAYERS, "shadow")))
    losses = module.compute_loss(four, torch.Generator().manual_seed(0))
    assert set(losses) == {"loss"} | {f"loss_{name}" for name in (*LAYERS, "shadow")}
    layer_set = module.layer_generator()(LayerPromptBatch([0], [{"shadow": "a shadow"}], [0], SETTINGS))[0]
    assert list(layer_set.layers) == [*LAYERS, "shadow"]

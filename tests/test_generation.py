"""Generation: text -> RGBA with the tiny models (64 px, 2 steps): samplers, seeds, community
LoRAs, the prompt DataModule, the PNG writer, the sampling callback and ``train.py predict``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from safetensors.torch import load_file, save_file

from callbacks import RGBAPredictionWriter, TransparentSamples
from data import PromptDataModule, ShardDataModule
from layerdiff.modules import LatentDiffusionModule
from layerdiff.pipelines import (
    SCHEDULERS,
    CommunityLora,
    GenerationSettings,
    IncompatibleLoraError,
)
from support.loras import randomise_lora_up_weights, write_community_lora
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer
from train import LayerdiffCLI

REPO = Path(__file__).resolve().parents[1]
SETTINGS = GenerationSettings(width=64, height=64, steps=2, guidance_scale=5.0)


def make_module(base_model: Path, transparent_vae: Path, **overrides) -> LatentDiffusionModule:
    return LatentDiffusionModule(
        transparent_vae=str(transparent_vae), base_model=str(base_model), lora_rank=4, **overrides
    )


@pytest.fixture(scope="module")
def module(tiny_sdxl, tiny_transparent_vae) -> LatentDiffusionModule:
    """A LoRA module whose adapter is not the identity (as after training)."""
    module = make_module(tiny_sdxl, tiny_transparent_vae)
    randomise_lora_up_weights(module.unet, seed=0)
    return module


@pytest.fixture(scope="module")
def community_lora(tiny_sdxl, tmp_path_factory) -> Path:
    return write_community_lora(tiny_sdxl, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def sd15_lora(tiny_sd15, tmp_path_factory) -> Path:
    """A LoRA for another architecture: the tiny SD1.5 UNet's."""
    return write_community_lora(tiny_sd15, tmp_path_factory.mktemp("sd15_lora"))


def generate(module: LatentDiffusionModule, prompts=("a cat", "a glass cup"), seeds=(1, 2), settings=SETTINGS):
    return module.image_generator()(list(prompts), list(seeds), settings)


def rgba(images) -> torch.Tensor:
    return torch.stack([torch.cat([image.rgb, image.alpha]) for image in images])


# -- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_sampler_makes_rgba_images_of_the_requested_size(module, scheduler):
    settings = GenerationSettings(width=64, height=128, steps=2, guidance_scale=5.0, scheduler=scheduler)
    images = generate(module, settings=settings)
    assert [image.rgb.shape for image in images] == [(3, 128, 64)] * 2
    assert [image.alpha.shape for image in images] == [(1, 128, 64)] * 2
    pixels = rgba(images)
    assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    assert images[0].parameters["scheduler"] == scheduler


def test_euler_and_dpm_solver_differ(module):
    euler = rgba(generate(module, settings=SETTINGS))
    dpm = rgba(generate(module, settings=GenerationSettings(**{**vars(SETTINGS), "scheduler": "dpm++"})))
    assert not torch.allclose(euler, dpm)


def test_a_seed_gives_the_same_image_in_any_batch(module):
    first = rgba(generate(module, seeds=(1, 2)))
    assert torch.equal(first, rgba(generate(module, seeds=(1, 2))))
    assert not torch.allclose(first[0], first[1])
    alone = rgba(generate(module, prompts=["a glass cup"], seeds=[2]))
    # Batched matmuls round differently, and how much depends on the kernels the CPU's load picks
    # (up to 6e-4 seen): the same image means equal within half a level of the 8-bit PNG.
    torch.testing.assert_close(alone[0], first[1], atol=0.5 / 255, rtol=0)


def test_guidance_and_negative_prompt_change_the_image(module):
    plain = rgba(generate(module))
    negative = GenerationSettings(**{**vars(SETTINGS), "negative_prompt": "blurry"})
    assert not torch.allclose(plain, rgba(generate(module, settings=negative)))


def test_sd15_models_generate_too(tiny_sd15, tiny_transparent_vae):
    module = make_module(tiny_sd15, tiny_transparent_vae)
    images = generate(module)
    assert module.image_generator().architecture == "sd15"
    assert images[0].rgb.shape == (3, 64, 64)


@pytest.mark.parametrize("width,height", [(100, 64), (64, 32), (0, 64)])
def test_sizes_must_be_positive_multiples_of_64(width, height):
    with pytest.raises(ValueError, match="multiple of 64") as error:
        GenerationSettings(width=width, height=height)
    assert "use e.g. width" in str(error.value)


# -- community LoRAs -------------------------------------------------------------------------


def test_a_community_lora_stacks_with_its_weight_and_comes_off_again(module, community_lora):
    generator = module.image_generator()
    without = rgba(generate(module))
    try:
        generator.add_community_lora(CommunityLora(path=str(community_lora), weight=0.0))
        assert torch.equal(rgba(generate(module)), without)
        generator.remove_community_loras()
        generator.add_community_lora(CommunityLora(path=str(community_lora.parent)))  # a folder works too
        with_lora = generate(module)
        assert not torch.allclose(rgba(with_lora), without)
        assert with_lora[0].parameters["loras"] == [{"path": str(community_lora.parent), "weight": 1.0}]
    finally:
        generator.remove_community_loras()
    assert list(module.unet.peft_config) == ["layerdiff"]
    assert torch.equal(rgba(generate(module)), without)


def test_a_lora_for_another_architecture_is_refused_by_name(module, sd15_lora):
    with pytest.raises(IncompatibleLoraError) as error:
        module.image_generator().add_community_lora(CommunityLora(path=str(sd15_lora)))
    message = str(error.value)
    assert str(sd15_lora) in message and "SDXL" in message
    # SD1.5's cross-attention reads 768-wide text (here 32), SDXL's 2048 (here 96)
    assert "have other sizes" in message and "attn2.to_k (input size 32 in the LoRA, 96 in the model)" in message
    assert list(module.unet.peft_config) == ["layerdiff"]  # nothing was loaded


def test_a_lora_naming_layers_the_model_lacks_is_refused(module, community_lora, tmp_path):
    renamed = {
        key.replace("down_blocks.1.", "down_blocks.7."): value for key, value in load_file(community_lora).items()
    }
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(IncompatibleLoraError, match=r"are not in the model, e\.g\. unet\.down_blocks\.7\."):
        module.image_generator().add_community_lora(CommunityLora(path=str(tmp_path / "renamed.safetensors")))


def test_a_lora_file_that_is_not_a_lora_is_refused(module, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        module.image_generator().add_community_lora(CommunityLora(path=str(missing)))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(IncompatibleLoraError, match="garbage.safetensors"):
        module.image_generator().add_community_lora(CommunityLora(path=str(garbage)))


# -- prompts -----------------------------------------------------------------------------------


def test_prompts_come_from_a_list_and_a_file(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red apple\n\n  a glass of water  \n", encoding="utf-8")
    data = PromptDataModule(prompts=["a cat"], prompt_file=str(prompt_file), seed=10, images_per_prompt=2)
    assert [(r.index, r.prompt, r.seed) for r in data.requests] == [
        (0, "a cat", 10), (1, "a cat", 11),
        (2, "a red apple", 12), (3, "a red apple", 13),
        (4, "a glass of water", 14), (5, "a glass of water", 15),
    ]  # fmt: skip


def test_explicit_seeds_apply_to_every_prompt_and_batches_carry_the_settings():
    data = PromptDataModule(prompts=["a", "b"], seeds=[7, 3], settings=SETTINGS, batch_size=3)
    batches = list(data.predict_dataloader())
    assert [batch.seeds for batch in batches] == [[7, 3, 7], [3]]
    assert [batch.prompts for batch in batches] == [["a", "a", "b"], ["b"]]
    assert [batch.indices for batch in batches] == [[0, 1, 2], [3]]
    assert all(batch.settings == SETTINGS for batch in batches)


def test_prompt_errors_say_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        PromptDataModule(prompt_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="No prompts"):
        PromptDataModule()
    with pytest.raises(ValueError, match="either seeds"):
        PromptDataModule(prompts=["a"], seeds=[1], images_per_prompt=2)


# -- train.py predict ---------------------------------------------------------------------


def predict_trainer(tmp_path: Path, output_dir: Path) -> Trainer:
    return quiet_trainer(tmp_path, callbacks=[RGBAPredictionWriter(str(output_dir), contact_sheet_columns=2)])


def test_predict_writes_rgba_pngs_with_their_settings_previews_and_a_contact_sheet(
    tiny_sdxl, tiny_transparent_vae, community_lora, tmp_path
):
    loras = [CommunityLora(path=str(community_lora), weight=0.5)]
    module = make_module(tiny_sdxl, tiny_transparent_vae, community_loras=loras)
    randomise_lora_up_weights(module.unet, seed=3)
    data = PromptDataModule(prompts=["a cat", "a glass cup"], seeds=[5], settings=SETTINGS, batch_size=1)
    trainer = predict_trainer(tmp_path, tmp_path / "out")
    trainer.predict(module, datamodule=data, return_predictions=False)

    names = ["00000_seed5_a-cat.png", "00001_seed5_a-glass-cup.png"]
    assert sorted(path.name for path in (tmp_path / "out").glob("*_seed*.png")) == names
    with Image.open(tmp_path / "out" / names[1]) as image:
        assert image.mode == "RGBA" and image.size == (64, 64)
        metadata = dict(image.text)
        first = torch.from_numpy(np.array(image))
    assert metadata["prompt"] == "a glass cup" and metadata["seed"] == "5"
    assert (metadata["width"], metadata["height"], metadata["steps"]) == ("64", "64", "2")
    assert metadata["scheduler"] == "euler" and metadata["guidance_scale"] == "5.0"
    assert metadata["negative_prompt"] == "" and metadata["base_model"] == str(tiny_sdxl)
    assert metadata["loras"] == f'[{{"path": "{community_lora}", "weight": 0.5}}]'
    assert all((tmp_path / "out" / "previews" / name).is_file() for name in names)
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # two columns, one row, 2 px padding
    assert list(module.unet.peft_config) == ["layerdiff"]  # the community LoRA came off again

    # A checkpoint restores the trained adapter; the community LoRA is stacked after that.
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    restored = make_module(tiny_sdxl, tiny_transparent_vae, community_loras=loras)
    predict_trainer(tmp_path, tmp_path / "again").predict(restored, datamodule=data, ckpt_path=checkpoint)
    with Image.open(tmp_path / "again" / names[1]) as image:
        assert torch.equal(torch.from_numpy(np.array(image)), first)


def predict_arguments(tiny_sdxl: Path, tiny_transparent_vae: Path, root: Path, *extra: str) -> list[str]:
    """``train.py predict`` on the demo recipe with the predict overlays, on the test models."""
    arguments = ["predict"]
    for config in ("latent_diffusion.yaml", "demo/latent_diffusion.yaml", "predict.yaml", "demo/predict.yaml"):
        arguments += ["-c", str(REPO / "configs" / config)]
    return [
        *arguments,
        "--model.init_args.base_model", str(tiny_sdxl),
        "--model.init_args.transparent_vae", str(tiny_transparent_vae),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.settings.steps", "2",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_train_py_predict_spreads_prompts_over_two_devices(tiny_sdxl, tiny_transparent_vae, tmp_path):
    arguments = predict_arguments(
        tiny_sdxl, tiny_transparent_vae, tmp_path,
        "--data.init_args.prompts", "[a cat, a glass cup, a red apple]",
        "--data.init_args.images_per_prompt", "1",
        "--data.init_args.batch_size", "1",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
    )  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "generated"
    names = sorted(path.name for path in output.glob("*.png"))
    images = ["00000_seed0_a-cat.png", "00001_seed1_a-glass-cup.png", "00002_seed2_a-red-apple.png"]
    assert names == [*images, "contact_sheet.png"]  # each once, whichever rank made it
    assert len(list((output / "previews").glob("*.png"))) == 3
    with Image.open(output / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 64 + 4 * 2, 64 + 2 * 2)  # every rank's images, in one row


@pytest.mark.parametrize(
    "arguments,error,message",
    [
        (
            ("--data.init_args.prompt_file", "missing_prompts.txt"),
            SystemExit,  # the CLI prints a project error alone and exits
            "missing_prompts.txt does not exist",
        ),
        (
            ("--data.init_args.prompts", "[a cat]", "--data.init_args.settings.width", "100"),
            SystemExit,
            "width 100 is not a positive multiple of 64",
        ),
        (
            ("--data.init_args.prompts", "[a cat]", "--model.init_args.community_loras", "[{path: SD15_LORA}]"),
            IncompatibleLoraError,
            "does not fit base model",
        ),
    ],
    ids=["missing prompt file", "size not a multiple of 64", "LoRA for another architecture"],
)
def test_train_py_predict_reports_bad_inputs(
    tiny_sdxl, tiny_transparent_vae, sd15_lora, tmp_path, arguments, error, message
):
    arguments = [argument.replace("SD15_LORA", str(sd15_lora)) for argument in arguments]
    with pytest.raises(error, match=message):
        LayerdiffCLI(args=predict_arguments(tiny_sdxl, tiny_transparent_vae, tmp_path, *arguments))


# -- sampling during training -------------------------------------------------------------


def test_samples_are_written_at_the_start_and_every_n_steps(tiny_sdxl, tiny_transparent_vae, tmp_path):
    module = make_module(tiny_sdxl, tiny_transparent_vae, caption_dropout=0.0)
    shards = ",".join(write_tiny_shards(tmp_path / "train", 4, sizes=((64, 64),)))
    data = ShardDataModule(shards, batch_size=2, num_workers=0)
    prompts = ["a cat", "a glass cup", "an apple"]
    samples = TransparentSamples(prompts=prompts, seeds=[0, 1], every_n_steps=2, settings=SETTINGS)
    logger = WandbLogger(save_dir=tmp_path, project="layerdiff-test", offline=True)
    quiet_trainer(tmp_path, max_steps=3, logger=logger, callbacks=[samples]).fit(module, datamodule=data)

    written = sorted(path.name for path in (tmp_path / "samples").iterdir())
    assert written == ["step_000000.png", "step_000002.png"]
    with Image.open(tmp_path / "samples" / written[0]) as grid:
        # 3 prompts across; per seed a row of images and a row of alpha; 2 px padding
        assert grid.size == (3 * 64 + 4 * 2, 4 * 64 + 5 * 2)
    assert module.unet.training and not module.vae.training  # every part back in its own mode
    logged = list(tmp_path.glob("wandb/offline-run-*/files/media/images/samples_*.png"))
    assert len(logged) == 2


def test_sampling_needs_a_module_that_generates(tmp_path):
    with pytest.raises(TypeError, match="image_generator"):
        trainer = quiet_trainer(tmp_path)
        TransparentSamples(prompts=["a cat"]).setup(trainer, LightningModule(), "fit")


def test_by_default_samples_follow_validation_at_the_native_size(tiny_sdxl, tiny_transparent_vae, tmp_path):
    module = make_module(tiny_sdxl, tiny_transparent_vae, caption_dropout=0.0)
    train = ",".join(write_tiny_shards(tmp_path / "train", 4, sizes=((64, 64),)))
    val = ",".join(write_tiny_shards(tmp_path / "val", 2, sizes=((64, 64),)))
    data = ShardDataModule(train, val, batch_size=2, num_workers=0)
    samples = TransparentSamples(prompts=["a cat"], settings=GenerationSettings(steps=2))
    trainer = quiet_trainer(tmp_path, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                            limit_val_batches=1, num_sanity_val_steps=1, callbacks=[samples])
    trainer.fit(module, datamodule=data)

    written = sorted(path.name for path in (tmp_path / "samples").iterdir())
    assert written == ["step_000000.png", "step_000002.png", "step_000004.png"]  # not after the sanity check
    with Image.open(tmp_path / "samples" / written[0]) as grid:
        assert grid.size == (64 + 2 * 2, 2 * 64 + 3 * 2)  # the tiny model's native 64 px

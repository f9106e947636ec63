"""LatentDiffusionModule on the tiny SDXL / SD1.5 models and tiny shards."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from data import ShardDataModule
from layerdiff import diffusion
from layerdiff.batches import ImageBatch
from layerdiff.modules import LatentDiffusionModule
from layerdiff.resume import rank_seed
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]


def make_module(base_model: Path, transparent_vae: Path, **overrides) -> LatentDiffusionModule:
    arguments = {
        "base_model": str(base_model),
        "transparent_vae": str(transparent_vae),
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "caption_dropout": 0.0,
        **overrides,
    }
    return LatentDiffusionModule(**arguments)


def image_batch(size: int = 64, batch_size: int = 2) -> ImageBatch:
    generator = torch.Generator().manual_seed(1)
    return ImageBatch(
        rgb=torch.rand(batch_size, 3, size, size, generator=generator),
        alpha=torch.rand(batch_size, 1, size, size, generator=generator),
        caption=["a red apple", "a glass of water"][:batch_size],
        key=["apple", "water"][:batch_size],
        original_size=torch.tensor([[size, size], [2 * size, 3 * size]])[:batch_size],
        crop_top_left=torch.tensor([[0, 0], [4, 8]])[:batch_size],
    )


def loss_with_seed(module: LatentDiffusionModule, batch: ImageBatch, seed: int = 0) -> torch.Tensor:
    return module.compute_loss(batch, torch.Generator().manual_seed(seed))["loss"]


@pytest.fixture
def shards(tmp_path) -> dict[str, str]:
    return {split: ",".join(write_tiny_shards(tmp_path / split, 4, sizes=((64, 64),))) for split in ("train", "val")}


def make_trainer(tmp_path: Path, **overrides) -> Trainer:
    return quiet_trainer(tmp_path, **{"limit_val_batches": 1, **overrides})


def test_lora_trains_only_the_adapter_on_the_released_targets(tiny_sdxl, tiny_transparent_vae):
    module = make_module(tiny_sdxl, tiny_transparent_vae)
    trainable = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_" in name and name.startswith("unet.") for name in trainable)
    adapted = {name.split(".lora_")[0] for name in trainable}
    targets = module.hparams.lora_targets
    assert all(name.endswith(targets) for name in adapted)
    assert all(any(name.endswith(target) for name in adapted) for target in targets)

    loss = loss_with_seed(module, image_batch())
    loss.backward()
    assert all(parameter.grad is not None for parameter in module.parameters() if parameter.requires_grad)
    assert all(parameter.grad is None for parameter in module.parameters() if not parameter.requires_grad)


def test_full_fine_tune_trains_the_whole_unet_and_nothing_else(tiny_sdxl, tiny_transparent_vae):
    module = make_module(tiny_sdxl, tiny_transparent_vae, lora_rank=None)
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    assert trainable == {f"unet.{name}" for name, _ in module.unet.named_parameters()}
    assert module.unet.training


def test_the_loss_is_a_function_of_batch_and_seed(tiny_sdxl, tiny_transparent_vae):
    module = make_module(tiny_sdxl, tiny_transparent_vae)
    batch = image_batch()
    assert torch.equal(loss_with_seed(module, batch, 0), loss_with_seed(module, batch, 0))
    assert not torch.equal(loss_with_seed(module, batch, 0), loss_with_seed(module, batch, 1))


def test_each_rank_draws_from_its_own_stream():
    seeds = {rank_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(seeds) == 32
    assert rank_seed(0, 1) == rank_seed(0, 1)


def test_sdxl_micro_conditioning_reaches_the_unet(tiny_sdxl, tiny_transparent_vae):
    module = make_module(tiny_sdxl, tiny_transparent_vae)
    batch = image_batch()
    moved = replace(batch, original_size=batch.original_size * 4)
    assert not torch.allclose(loss_with_seed(module, batch), loss_with_seed(module, moved))


def test_sd15_trains_without_pooled_text_or_size_conditions(tiny_sd15, tiny_transparent_vae):
    module = make_module(tiny_sd15, tiny_transparent_vae)
    assert module.architecture == "sd15"
    batch = image_batch()
    loss = loss_with_seed(module, replace(batch, original_size=None, crop_top_left=None))  # never read for SD1.5
    loss.backward()
    assert torch.isfinite(loss)


def test_v_prediction_targets_the_velocity(tiny_sdxl, tiny_transparent_vae):
    epsilon = make_module(tiny_sdxl, tiny_transparent_vae)
    velocity = make_module(tiny_sdxl, tiny_transparent_vae, prediction_type="v_prediction")
    velocity.load_state_dict(epsilon.state_dict())
    assert velocity.prediction_type == "v_prediction"
    batch = image_batch()
    assert not torch.allclose(loss_with_seed(epsilon, batch), loss_with_seed(velocity, batch))


def test_min_snr_weights_follow_the_paper():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(diffusion.min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(diffusion.min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    prediction, target = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    assert torch.isclose(diffusion.denoising_loss(prediction, target, torch.tensor([1.0, 0.0, 0.5])), torch.tensor(0.5))


def test_caption_dropout_trains_on_the_empty_prompt(tiny_sdxl, tiny_transparent_vae):
    always = make_module(tiny_sdxl, tiny_transparent_vae, caption_dropout=1.0)
    batch = image_batch()
    empty = replace(batch, caption=["", ""])
    assert torch.equal(loss_with_seed(always, batch), loss_with_seed(always, empty))
    never = make_module(tiny_sdxl, tiny_transparent_vae)
    never.load_state_dict(always.state_dict())
    assert not torch.equal(loss_with_seed(never, batch), loss_with_seed(never, empty))


def test_noise_offset_changes_the_noise(tiny_sdxl, tiny_transparent_vae):
    plain = make_module(tiny_sdxl, tiny_transparent_vae)
    offset = make_module(tiny_sdxl, tiny_transparent_vae, noise_offset=0.1)
    offset.load_state_dict(plain.state_dict())
    batch = image_batch()
    assert not torch.allclose(loss_with_seed(plain, batch), loss_with_seed(offset, batch))


def test_adamw8bit_and_a_cosine_schedule_with_warm_up(tiny_sdxl, tiny_transparent_vae, shards, tmp_path):
    pytest.importorskip("bitsandbytes")
    module = make_module(tiny_sdxl, tiny_transparent_vae, optimizer="adamw8bit", warmup_steps=2, lr_schedule="cosine")
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=ShardDataModule(shards["train"], batch_size=2, num_workers=0))
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    # warm-up 0 -> 1e-3 over 2 steps, then cosine to 0 at step 4: lr(step 4) = 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_missing_transparent_vae_is_reported_with_the_fix(tiny_sdxl, tmp_path):
    with pytest.raises(FileNotFoundError, match="vae_transparent_encoder.safetensors"):
        make_module(tiny_sdxl, tmp_path / "nowhere")


def test_the_loader_workers_tokenize_and_the_loss_is_the_same(tiny_sdxl, tiny_transparent_vae, shards, tmp_path):
    module = make_module(tiny_sdxl, tiny_transparent_vae)
    datamodule = ShardDataModule(train_shards=shards["train"], batch_size=2, num_workers=1, shuffle_buffer=0)
    make_trainer(tmp_path, max_steps=0).fit(module, datamodule)  # attaches both, trains nothing
    tagged = next(iter(datamodule.train_dataloader()))
    batch = datamodule.on_before_batch_transfer(tagged, 0)
    assert [ids.shape for ids in batch.token_ids] == [(2, 77), (2, 77)]  # one per tokenizer, from the worker
    assert batch.rgb.dtype == torch.float32 and batch.rgb.max() > 0.5  # converted by the loader
    loss = loss_with_seed(module, batch)
    assert torch.equal(loss, loss_with_seed(module, replace(batch, token_ids=None)))  # tokenized in the step


def test_validation_measures_the_same_draws_on_plain_latents(tiny_sdxl, tiny_transparent_vae, shards, tmp_path):
    module = make_module(tiny_sdxl, tiny_transparent_vae)
    datamodule = ShardDataModule(train_shards=shards["train"], val_shards=shards["val"], batch_size=2, num_workers=0)
    trainer = make_trainer(tmp_path)
    offset = trainer.validate(module, datamodule, verbose=False)[0]
    assert offset["val/loss"] != offset["val/loss_plain"]  # the fixture's encoder adds a small offset
    assert offset["val/loss"] == pytest.approx(offset["val/loss_plain"], rel=0.2)
    torch.nn.init.zeros_(module.transparent_encoder.blocks[-1].weight)  # no offset: x_a = x
    torch.nn.init.zeros_(module.transparent_encoder.blocks[-1].bias)
    again = trainer.validate(module, datamodule, verbose=False)[0]
    assert again["val/loss"] == again["val/loss_plain"] == pytest.approx(offset["val/loss_plain"], rel=1e-6)

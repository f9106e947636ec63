"""TransparentVAEModule end to end on the tiny SDXL model and tiny shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks import CorruptSampleMonitor
from data import ShardDataModule
from data.schema import FOREGROUND
from layerdiff.export import main as export_main
from layerdiff.formats.provenance import read_metadata
from support.shards import truncated_foreground, write_tiny_shards
from support.transparency import make_data, make_module, make_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shards(tmp_path) -> dict[str, str]:
    train = write_tiny_shards(tmp_path / "train", 8, sizes=((64, 64),))
    val = write_tiny_shards(tmp_path / "val", 4, sizes=((64, 64),))
    return {"train": ",".join(train), "val": ",".join(val)}


def parameters_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], value) for name, value in module.state_dict().items())


def test_a_step_trains_encoder_decoder_and_discriminator_but_never_the_frozen_vae(tiny_sdxl, shards, tmp_path):
    module = make_module(tiny_sdxl, discriminator_start_step=0)
    parts = ("vae", "transparent_encoder", "transparent_decoder", "discriminator")
    snapshots = {name: parameters_of(getattr(module, name)) for name in parts}
    trainer = make_trainer(tmp_path)
    trainer.fit(module, datamodule=make_data(shards))
    assert trainer.global_step == 2, "a training step is one batch, whatever the discriminator does"
    assert not changed(snapshots["vae"], module.vae)
    assert changed(snapshots["transparent_encoder"], module.transparent_encoder)
    assert changed(snapshots["transparent_decoder"], module.transparent_decoder)
    assert changed(snapshots["discriminator"], module.discriminator)


def test_the_discriminator_waits_for_its_start_step(tiny_sdxl, shards, tmp_path):
    module = make_module(tiny_sdxl, discriminator_start_step=1000)
    before = parameters_of(module.discriminator)
    make_trainer(tmp_path).fit(module, datamodule=make_data(shards))
    assert not changed(before, module.discriminator)


def test_it_learns_alpha(tiny_sdxl, shards, tmp_path):
    module = make_module(tiny_sdxl, adversarial_weight=0.0, learning_rate=2e-3)
    assert module.discriminator is None
    data = make_data(shards, batch_size=4, resample=True)
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.val_dataloader())), 0)

    def alpha_error() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(module.reconstruct(batch.rgb, batch.alpha)["alpha"], batch.alpha).item()

    before = alpha_error()
    make_trainer(tmp_path, max_steps=60).fit(module, datamodule=data)
    after = alpha_error()
    assert after < before / 3, f"alpha MSE {before:.4f} -> {after:.4f}"


def test_validation_reports_alpha_mse_colour_and_identity_psnr(tiny_sdxl, shards, tmp_path):
    for augmentation in (False, True):
        module = make_module(tiny_sdxl, validation_augmentation=augmentation)
        metrics = make_trainer(tmp_path, limit_val_batches=None).validate(module, datamodule=make_data(shards), verbose=False)[0]
        assert set(metrics) == {"val/alpha_mse", "val/rgb_psnr_visible", "val/identity_psnr"}
        assert 0 < metrics["val/alpha_mse"] < 1 and 0 < metrics["val/rgb_psnr_visible"] < 60
        # the offset encoder's last layer starts at zero: the untrained offset changes nothing
        assert metrics["val/identity_psnr"] == float("inf")


def test_corrupt_members_in_a_run_are_skipped_and_counted(tiny_sdxl, tmp_path):
    damaged = {1: {FOREGROUND: truncated_foreground(1)}, 5: {FOREGROUND: b"not a png"}}
    train = write_tiny_shards(tmp_path / "train", 10, sizes=((64, 64),), damage=damaged)
    data = ShardDataModule(train_shards=",".join(train), batch_size=2, num_workers=2, max_corrupt_fraction=0.5)
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=1, callbacks=[CorruptSampleMonitor()])
    trainer.fit(make_module(tiny_sdxl), datamodule=data)
    # 8 good samples; each of the 2 workers ends its share with a short batch
    assert trainer.global_step == 5
    assert trainer.callback_metrics["data/corrupt_skipped"] == 2
    assert data.corrupt_skipped == 2


def test_export_from_a_training_checkpoint_loads_back_as_initialisation(tiny_sdxl, shards, tmp_path):
    module = make_module(tiny_sdxl)
    trainer = make_trainer(tmp_path)
    trainer.fit(module, datamodule=make_data(shards))
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    export_main(["transparent-vae", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])

    metadata = read_metadata(tmp_path / "export" / "vae_transparent_decoder.safetensors")
    assert json.loads(metadata["layerdiff_config"])["learning_rate"] == 1e-3

    reloaded = make_module(tiny_sdxl, init_from=str(tmp_path / "export"))
    rgb, alpha = torch.rand(1, 3, 64, 64), (torch.rand(1, 1, 64, 64) > 0.5).float()
    with torch.no_grad():
        expected = module.eval().reconstruct(rgb, alpha)
        actual = reloaded.eval().reconstruct(rgb, alpha)
    assert torch.equal(expected["alpha"], actual["alpha"]) and torch.equal(expected["rgb"], actual["rgb"])


def test_perceptual_term_without_weights_is_refused_clearly(tiny_sdxl):
    with pytest.raises(ValueError, match="lpips_weights"):
        make_module(tiny_sdxl, perceptual_weight=0.1)

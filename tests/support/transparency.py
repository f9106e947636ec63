"""Tiny transparency models and the TransparentVAEModule on them, for the tests of the
module, its exports and its callbacks."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Trainer

from data import ShardDataModule
from layerdiff.formats.layerdiffuse_vae import load_transparent_vae
from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder
from layerdiff.modules import TransparentVAEModule
from support.trainers import quiet_trainer

TINY = {"block_out_channels": (8, 8, 16, 16, 32, 32, 32), "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 4}
TINY_DECODER = {"decoder_block_out_channels": (8, 8, 16, 16, 16, 16, 16), "discriminator_channels": 8}


def trained_tiny_modules() -> tuple[LatentTransparencyEncoder, TransparencyDecoder]:
    torch.manual_seed(3)
    encoder, decoder = LatentTransparencyEncoder(), TransparencyDecoder(**{**TINY, "attention_head_dim": 4})
    with torch.no_grad():
        for parameter in [*encoder.parameters(), *decoder.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return encoder, decoder


def fake_lightning_state(encoder, decoder) -> dict[str, torch.Tensor]:
    state = {"vae.decoder.conv_in.weight": torch.zeros(1), "discriminator.main.0.weight": torch.zeros(1)}
    state.update({f"transparent_encoder.{k}": v for k, v in encoder.state_dict().items()})
    state.update({f"transparent_decoder.{k}": v for k, v in decoder.state_dict().items()})
    return state


def assert_round_trip(out, encoder, decoder, dtype=torch.float32):
    loaded_encoder, loaded_decoder = LatentTransparencyEncoder(), TransparencyDecoder(**{**TINY, "attention_head_dim": 4})
    load_transparent_vae(loaded_encoder, loaded_decoder, out)
    for original, loaded in ((encoder, loaded_encoder), (decoder, loaded_decoder)):
        for key, tensor in original.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], tensor.to(dtype).float(), rtol=0, atol=0)


def make_module(base_model: Path, **overrides) -> TransparentVAEModule:
    arguments = {"base_model": str(base_model), "learning_rate": 1e-3, **TINY_DECODER, **overrides}
    return TransparentVAEModule(**arguments)


def make_trainer(tmp_path: Path, **overrides) -> Trainer:
    """The quiet trainer with gradients in validation (the adaptive GAN weight needs them)."""
    return quiet_trainer(tmp_path, **{"inference_mode": False, **overrides})


def make_data(shards: dict[str, str], batch_size: int = 2, **overrides) -> ShardDataModule:
    arguments = {"train_shards": shards["train"], "val_shards": shards["val"], "batch_size": batch_size, "num_workers": 0}
    return ShardDataModule(**{**arguments, **overrides})

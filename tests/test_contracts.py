"""Every objective module passes the contract of ``support.contracts`` by saying how it is
built on the tiny models; a new module adds one class here."""

from __future__ import annotations

from data import ShardDataModule
from data.transforms import GreenScreen
from layerdiff.modules import DiffuMattingModule, JointLayerLoRAModule, LatentDiffusionModule, TransparentVAEModule
from support.contracts import ObjectiveContract, TinyParts


class TestTransparentVAEModule(ObjectiveContract):
    module_class = TransparentVAEModule
    recipe = ("configs/transparent_vae.yaml", "configs/demo/transparent_vae.yaml")
    artefacts = ("images/alpha_step*.png", "images/reconstruction_step*.png")

    def module_arguments(self, parts: TinyParts) -> dict:
        return {
            "base_model": str(parts.sdxl),
            "decoder_block_out_channels": (8, 8, 16, 16, 16, 16, 16),
            "discriminator_channels": 8,
            "learning_rate": 1e-3,
        }


class TestLatentDiffusionModule(ObjectiveContract):
    module_class = LatentDiffusionModule
    recipe = ("configs/latent_diffusion.yaml", "configs/demo/latent_diffusion.yaml")
    artefacts = ("samples/step_*.png",)

    def module_arguments(self, parts: TinyParts) -> dict:
        return {
            "base_model": str(parts.sdxl),
            "transparent_vae": str(parts.transparent_vae),
            "lora_rank": 4,
            "learning_rate": 1e-3,
            "caption_dropout": 0.5,  # the dropout draws are part of what must resume exactly
        }


class TestJointLayerLoRAModule(ObjectiveContract):
    module_class = JointLayerLoRAModule
    recipe = ("configs/joint_lora.yaml", "configs/demo/joint_lora.yaml")
    artefacts = ("samples/step_*.png",)
    layered = True

    def module_arguments(self, parts: TinyParts) -> dict:
        return {
            "base_model": str(parts.sdxl),
            "transparent_vae": str(parts.transparent_vae),
            "layers": ("foreground", "background", "blend"),
            "attention_sharing": "concat",
            "lora_rank": 4,
            "learning_rate": 1e-3,
            "caption_dropout": 0.5,
        }


class TestDiffuMattingModule(ObjectiveContract):
    module_class = DiffuMattingModule
    recipe = ("configs/diffumatting.yaml", "configs/demo/diffumatting.yaml")
    artefacts = ("samples/step_*.png",)

    def module_arguments(self, parts: TinyParts) -> dict:
        return {
            "base_model": str(parts.sdxl),
            "lora_rank": 4,
            "learning_rate": 1e-3,
            "caption_dropout": 0.5,
            "green_loss": {"downsampling": [2]},  # the tiny UNet's only cross-attention size
        }

    def make_data(self, parts: TinyParts) -> ShardDataModule:
        return ShardDataModule(parts.train_shards, parts.val_shards, batch_size=2, num_workers=0, shuffle_buffer=0,
                               sample_transform=GreenScreen())

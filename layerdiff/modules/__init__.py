"""One thin LightningModule per training objective."""

from layerdiff.modules.joint_layers import JointLayerLoRAModule
from layerdiff.modules.latent_diffusion import LatentDiffusionModule
from layerdiff.modules.transparent_vae import TransparentVAEModule

__all__ = ["JointLayerLoRAModule", "LatentDiffusionModule", "TransparentVAEModule"]

"""One thin LightningModule per training objective."""

from layerdiff.modules.diffumatting import DiffuMattingModule
from layerdiff.modules.joint_layers import JointLayerLoRAModule
from layerdiff.modules.latent_diffusion import LatentDiffusionModule
from layerdiff.modules.transparent_vae import TransparentVAEModule

__all__ = ["DiffuMattingModule", "JointLayerLoRAModule", "LatentDiffusionModule", "TransparentVAEModule"]

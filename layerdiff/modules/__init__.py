"""One thin LightningModule per training objective."""

from layerdiff.modules.transparent_vae import TransparentVAEModule

__all__ = ["TransparentVAEModule"]

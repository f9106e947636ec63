"""Lightning callbacks: image logging and run monitoring."""

from callbacks.image_logger import TransparentReconstructionImages

__all__ = ["TransparentReconstructionImages"]

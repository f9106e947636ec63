"""Lightning callbacks: image logging and run monitoring."""

from callbacks.data_health import CorruptSampleMonitor
from callbacks.image_logger import TransparentReconstructionImages

__all__ = ["CorruptSampleMonitor", "TransparentReconstructionImages"]

"""Lightning callbacks: image logging and run monitoring."""

from callbacks.data_health import CorruptSampleMonitor
from callbacks.image_logger import TransparentReconstructionImages
from callbacks.rgba_writer import RGBAPredictionWriter
from callbacks.sample_images import TransparentSamples

__all__ = [
    "CorruptSampleMonitor",
    "RGBAPredictionWriter",
    "TransparentReconstructionImages",
    "TransparentSamples",
]

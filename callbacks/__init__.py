"""Lightning callbacks: image logging and run monitoring."""

from callbacks.data_health import CorruptSampleMonitor
from callbacks.ema import EMA, averaged_weights_of
from callbacks.image_logger import TransparentReconstructionImages
from callbacks.rgba_writer import RGBAPredictionWriter
from callbacks.sample_images import TransparentSamples

__all__ = [
    "EMA",
    "CorruptSampleMonitor",
    "RGBAPredictionWriter",
    "TransparentReconstructionImages",
    "TransparentSamples",
    "averaged_weights_of",
]

"""Lightning callbacks: images and samples, EMA, prediction writing, run monitoring and
preemption-safe stopping."""

from callbacks.data_health import CorruptSampleMonitor
from callbacks.ema import EMA, averaged_weights_of
from callbacks.image_logger import TransparentReconstructionImages
from callbacks.layer_writer import LayerSetWriter
from callbacks.model_summary import ModelPartsSummary
from callbacks.output_check import OutputDirectoryCheck, OutputDirectoryError
from callbacks.preemption import Preemption
from callbacks.rgba_writer import RGBAPredictionWriter
from callbacks.sample_images import LayerSamples, TransparentSamples
from callbacks.throughput import TrainingThroughput

__all__ = [
    "EMA",
    "CorruptSampleMonitor",
    "LayerSamples",
    "LayerSetWriter",
    "ModelPartsSummary",
    "OutputDirectoryCheck",
    "OutputDirectoryError",
    "Preemption",
    "RGBAPredictionWriter",
    "TransparentReconstructionImages",
    "TrainingThroughput",
    "TransparentSamples",
    "averaged_weights_of",
]

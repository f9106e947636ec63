"""Generation around the trained parts: text -> transparent images (``transparent``), with
community LoRAs stacked on the UNet (``community_lora``); a prompt per layer -> layer sets
(``joint_layers``), conditionally around given layers, and N layers composed one by one
(``composition``); text -> green screen -> matte and cutout (``green_screen``, DiffuMatting)."""

from layerdiff.pipelines.community_lora import CommunityLora, IncompatibleLoraError, check_lora_fits
from layerdiff.pipelines.composition import CompositionBatch
from layerdiff.pipelines.joint_layers import GeneratedLayers, JointLayerGenerator, LayerPromptBatch
from layerdiff.pipelines.transparent import (
    SCHEDULERS,
    GeneratedImage,
    GenerationSettings,
    PromptBatch,
    SchedulerName,
    TransparentImageGenerator,
    build_pipeline,
    check_size,
)

__all__ = [
    "SCHEDULERS",
    "CommunityLora",
    "CompositionBatch",
    "GeneratedImage",
    "GeneratedLayers",
    "GenerationSettings",
    "IncompatibleLoraError",
    "JointLayerGenerator",
    "LayerPromptBatch",
    "PromptBatch",
    "SchedulerName",
    "TransparentImageGenerator",
    "build_pipeline",
    "check_lora_fits",
    "check_size",
]

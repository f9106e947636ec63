"""Generation around the trained parts: text -> transparent images (``transparent``), with
community LoRAs stacked on the UNet (``community_lora``); a prompt per layer -> layer sets
(``joint_layers``); text -> green screen -> keyed cutout (``green_screen``, DiffuMatting)."""

from layerdiff.pipelines.community_lora import CommunityLora, IncompatibleLoraError, check_lora_fits
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

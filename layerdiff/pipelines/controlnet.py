"""ControlNet steering of generation (LayerDiffusion arXiv:2402.17113 sec. 4.4: the layer models
work with ControlNet): a diffusers ``ControlNetModel`` (hub id or folder, e.g. a canny or depth
model for the base) adds its residuals to the UNet's skip connections, guided by a control image.
Single images go through diffusers' ControlNet pipelines; joint layers through
:func:`controlnet_residuals`, which steers one layer's rows of the batch and leaves the others.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image


class ControlNetGuide(TypedDict, total=False):
    """A ControlNet and what it sees; in ``GenerationSettings.controlnet``.

    Keys:
        model: the ``ControlNetModel``: hub id or local folder, for the base model's architecture.
        image: the control image file (an edge map, a depth map, a pose), scaled and centre-cropped
            to the generation size.
        scale: ``controlnet_conditioning_scale`` (1.0).
        layer: for a joint-layer model, the layer it steers (default: the first generated one).
    """

    model: str
    image: str
    scale: float
    layer: str | None


@lru_cache(maxsize=2)
def load_controlnet(model: str) -> ControlNetModel:
    """The ControlNet at ``model`` (hub id or folder), once per process."""
    try:
        return ControlNetModel.from_pretrained(model).eval().requires_grad_(False)
    except (OSError, ValueError) as error:
        raise ValueError(f"ControlNet {model!r} could not be loaded as a diffusers ControlNetModel (a hub id or a folder "
                         f"with config.json and weights): {error}") from error


def control_image(path: str, width: int, height: int) -> torch.Tensor:
    """The control image ``[1, 3, H, W]`` in [0, 1]: RGB, scaled to cover the size, centre-cropped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ControlNet image {path} does not exist")
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def check_controlnet(controlnet: ControlNetModel, unet_config) -> None:
    """The ControlNet's residuals must fit the UNet: same cross-attention width and blocks."""
    mine, its = unet_config, controlnet.config
    if its.cross_attention_dim != mine.cross_attention_dim or tuple(its.block_out_channels) != tuple(
            mine.block_out_channels):
        raise ValueError(f"the ControlNet (cross-attention {its.cross_attention_dim}, blocks {list(its.block_out_channels)}) "
                         f"is for another base model than this UNet (cross-attention {mine.cross_attention_dim}, blocks "
                         f"{list(mine.block_out_channels)}): use a ControlNet trained for the base model")


def controlnet_residuals(
    controlnet: ControlNetModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    added: dict[str, torch.Tensor] | None,
    image: torch.Tensor,
    scale: float,
    rows: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ControlNet's residuals for the UNet batch ``sample`` (the noisy latents, 4 channels),
    computed for the ``rows`` it steers (bool ``[N]``) and zero for the others."""
    chosen = rows.nonzero().flatten()
    picked = {name: value[chosen] for name, value in (added or {}).items()} or None
    down, mid = controlnet(sample[chosen], timesteps[chosen], encoder_hidden_states=hidden[chosen],
                           controlnet_cond=image.expand(len(chosen), -1, -1, -1).to(sample),
                           conditioning_scale=scale, added_cond_kwargs=picked, return_dict=False)

    def spread(residual: torch.Tensor) -> torch.Tensor:
        full = residual.new_zeros((len(sample), *residual.shape[1:]))
        full[chosen] = residual
        return full

    return [spread(residual) for residual in down], spread(mid)

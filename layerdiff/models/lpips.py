"""LPIPS-VGG16 perceptual distance (Zhang et al. 2018), loaded only from a local file.

The latent-diffusion ``LPIPSWithDiscriminator`` the paper trains with (LayerDiffusion eq. 5)
adds this distance to the reconstruction loss. The computation follows the ``lpips`` package
and taming-transformers' ``taming/modules/losses/lpips.py``: input scaling, VGG16 features tapped
after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, unit-normalised over channels, squared
difference, a bias-free 1x1 "lin" conv per tap, spatial mean, sum over taps.

Nothing is downloaded. Weight file layout (safetensors, or a ``torch.save``'d dict):

* ``features.{i}.weight`` / ``features.{i}.bias`` for the 13 VGG16 convolutions, ``i`` in
  0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (torchvision's ``vgg16().features`` indices);
* ``lins.{k}.weight``, ``k`` = 0..4, shapes ``[1, C_k, 1, 1]`` with C = 64, 128, 256, 512, 512.

To produce it once, on a machine with ``torchvision`` and ``lpips`` installed and the
torchvision ImageNet weights available (the same VGG the ``lpips`` package uses)::

    import os, lpips, torch, torchvision
    from safetensors.torch import save_file
    from layerdiff.models.lpips import convert_lpips_weights

    vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1).state_dict()
    lin = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu")
    save_file(convert_lpips_weights(vgg, lin), "lpips_vgg16.safetensors")
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

# VGG16 configuration "D": conv widths, "M" = 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in ``features`` of the ReLUs whose outputs LPIPS compares (relu1_2 ... relu5_3).
_TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# The ``lpips`` package's ScalingLayer: maps [-1, 1] input to ImageNet-normalised range.
_INPUT_SHIFT = (-0.030, -0.088, -0.188)
_INPUT_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in _VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = entry
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance between two RGB images in [-1, 1].

    Build with ``LPIPS.from_file(path)``; a bare ``LPIPS()`` has random weights. The module is
    frozen (no parameter requires grad; it has no dropout or batch norm, so train/eval mode
    does not matter) but passes gradients to its inputs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False) for width in TAP_CHANNELS)
        # Constants, not weights: kept out of the state dict so the file holds only learnt tensors.
        self.register_buffer("input_shift", torch.tensor(_INPUT_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_scale", torch.tensor(_INPUT_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | PathLike) -> LPIPS:
        """Load weights in the layout of the module docstring from a local safetensors or torch file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weights not found at {path}. LPIPS is never downloaded: produce the file once "
                "with layerdiff.models.lpips.convert_lpips_weights from torchvision's VGG16 ImageNet "
                "weights and the lpips package's weights/v0.1/vgg.pth (recipe in the docstring of "
                "layerdiff/models/lpips.py), then point to it."
            )
        if path.suffix == ".safetensors":
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        model.load_state_dict(state_dict, strict=True)
        return model

    def _taps(self, image: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        features = (image - self.input_shift) / self.input_scale
        for index, layer in enumerate(self.features):
            features = layer(features)
            if index in _TAP_INDICES:
                taps.append(features)
        return taps

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distance per sample, shaped ``[B, 1, 1, 1]`` to broadcast against per-pixel losses."""
        if image.shape[1] != 3 or image.shape != target.shape:
            raise ValueError(
                f"LPIPS compares two RGB images of equal shape [B, 3, H, W], got {tuple(image.shape)} "
                f"and {tuple(target.shape)}"
            )
        distance = image.new_zeros(image.shape[0], 1, 1, 1)
        for lin, image_taps, target_taps in zip(self.lins, self._taps(image), self._taps(target)):
            difference = (_unit_normalise(image_taps) - _unit_normalise(target_taps)) ** 2
            distance = distance + lin(difference).mean(dim=(2, 3), keepdim=True)
        return distance


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + _NORM_EPS)


def convert_lpips_weights(
    vgg_state_dict: Mapping[str, torch.Tensor], lin_state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Combine torchvision ``vgg16`` and ``lpips`` ``vgg.pth`` state dicts into our file layout.

    ``vgg_state_dict``: a torchvision ``vgg16`` state dict (``features.*``; ``classifier.*`` is
    dropped). ``lin_state_dict``: the ``lpips`` package's ``weights/v0.1/vgg.pth``, keys
    ``lin{k}.model.1.weight`` (``model.0`` is its dropout; a ``lin{k}.model.0.weight`` from
    a dropout-free export is accepted too).
    """
    reference = LPIPS().state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key in reference:
        if key.startswith("features."):
            if key not in vgg_state_dict:
                raise KeyError(f"VGG16 state dict lacks {key!r}; expected torchvision's vgg16().state_dict()")
            converted[key] = vgg_state_dict[key]
    for index in range(len(TAP_CHANNELS)):
        pattern = re.compile(rf"lin{index}\.model\.\d+\.weight")
        matches = [key for key in lin_state_dict if pattern.fullmatch(key)]
        if len(matches) != 1:
            raise KeyError(
                f"expected exactly one 'lin{index}.model.<n>.weight' in the LPIPS lin state dict, found "
                f"{matches or 'none'}; expected the lpips package's weights/v0.1/vgg.pth"
            )
        converted[f"lins.{index}.weight"] = lin_state_dict[matches[0]]
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(reference[key].shape)}")
    return {key: tensor.detach().to(torch.float32).contiguous() for key, tensor in converted.items()}

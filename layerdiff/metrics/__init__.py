"""Evaluation metrics as torchmetrics ``Metric``s, so they aggregate correctly across
batches and data-parallel ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class MaskedPSNR(Metric):
    """PSNR over the pixels where ``mask`` is true, pooled over the whole evaluation set.

    Used for colour fidelity on visible pixels only: colour under zero alpha is padding
    (LayerDiffusion Appendix A) and no viewer ever sees it.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, data_range: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range = data_range
        self.add_state("squared_error", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """``prediction``/``target``: ``B x C x H x W``; ``mask``: ``B x 1 x H x W`` boolean."""
        mask = mask.expand_as(target)
        difference = (prediction.double() - target.double())[mask]
        self.squared_error += difference.square().sum()
        self.count += difference.numel()

    def compute(self) -> torch.Tensor:
        mse = self.squared_error / self.count.clamp_min(1.0)
        return (10.0 * torch.log10(self.data_range**2 / mse.clamp_min(1e-12))).float()

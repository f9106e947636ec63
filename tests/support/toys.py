"""Toy LightningModules and loaders: the smallest training that exercises a mechanism."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset

from layerdiff.modules.base import TrainedParts


class Regression(LightningModule):
    """A linear layer trained by SGD, beside a frozen layer and an (untrained) discriminator."""

    trained = TrainedParts(exported=("layer",), auxiliary=("discriminator",))

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
        self.discriminator = torch.nn.Linear(2, 1)
        self.validation_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.mse_loss(self.frozen(self.layer(inputs)), targets)

    def validation_step(self, batch, batch_idx):
        self.validation_weights.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.5)


def loader(batches: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4 * batches, 3, generator=generator)
    return DataLoader(TensorDataset(inputs, torch.randn(4 * batches, 2, generator=generator)), batch_size=4)

"""The base module's step mechanics: gradient clipping reuses the norm of the non-finite check."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset

from layerdiff.modules.base import FrozenBaseModule, TrainedParts
from support.trainers import quiet_trainer


class PlainRegression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.mse_loss(self.layer(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Regression(FrozenBaseModule, PlainRegression):
    trained = TrainedParts(exported=("layer",))


def fit(module: LightningModule, tmp_path, **trainer) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(12, 8, generator=generator), 10 * torch.randn(12, 4, generator=generator))
    quiet_trainer(tmp_path, max_steps=3, **trainer).fit(module, DataLoader(data, batch_size=4))
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_clipping_with_the_cached_norm_equals_lightnings_clipping(tmp_path, monkeypatch):
    unclipped = fit(PlainRegression(), tmp_path / "unclipped")
    lightning = fit(PlainRegression(), tmp_path / "lightning", gradient_clip_val=0.1)

    def second_norm(*args, **kwargs):
        raise AssertionError("the gradient norm was computed a second time")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", second_norm)
    ours = fit(Regression(), tmp_path / "ours", gradient_clip_val=0.1)
    assert not torch.equal(lightning["layer.weight"], unclipped["layer.weight"])  # the clip was active
    for name in lightning:
        assert torch.equal(ours[name], lightning[name]), name

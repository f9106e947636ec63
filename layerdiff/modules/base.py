"""Plumbing shared by every layerdiff LightningModule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule


class FrozenBaseModule(LightningModule):
    """A LightningModule that wraps frozen pretrained parts (a base VAE, text encoders, the
    base weights under a LoRA).

    Frozen weights are re-loaded from the base model on construction, so writing them into
    every checkpoint would only multiply checkpoint size (the SDXL UNet alone is 10 GB in
    fp32, the VAE 335 MB). Two kinds of keys are dropped on save and taken from the freshly
    loaded model on load, while every other key is still loaded strictly:

    * everything under the attribute prefixes a subclass names in ``frozen_prefixes``
      (parameters and buffers of wholly frozen parts);
    * every parameter with ``requires_grad=False`` elsewhere (e.g. a UNet's base weights
      when only its LoRA trains). Buffers of trained parts (BatchNorm statistics) are kept.
    """

    frozen_prefixes: tuple[str, ...] = ()

    def _frozen_keys(self, keys) -> set[str]:
        frozen_parameters = {name for name, parameter in self.named_parameters() if not parameter.requires_grad}
        return {key for key in keys if key.startswith(self.frozen_prefixes) or key in frozen_parameters}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state_dict = checkpoint["state_dict"]
        frozen = self._frozen_keys(state_dict)
        checkpoint["state_dict"] = {key: value for key, value in state_dict.items() if key not in frozen}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        merged = {key: own[key] for key in self._frozen_keys(own)}
        merged.update(state_dict)
        return super().load_state_dict(merged, strict=strict, assign=assign)

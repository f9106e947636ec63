"""Plumbing shared by every layerdiff LightningModule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule


class FrozenBaseModule(LightningModule):
    """A LightningModule that wraps frozen pretrained parts (a base VAE, text encoders).

    Frozen weights are re-loaded from the base model on construction, so writing them into
    every checkpoint would only multiply checkpoint size (the SDXL VAE alone is 335 MB in
    fp32). Subclasses name the attribute prefixes of their frozen parts in
    ``frozen_prefixes``; those keys are dropped on save and taken from the freshly loaded
    base model on load, while every other key is still loaded strictly.
    """

    frozen_prefixes: tuple[str, ...] = ()

    def _is_frozen_key(self, key: str) -> bool:
        return key.startswith(self.frozen_prefixes)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not self._is_frozen_key(key)
        }

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        merged = {key: value for key, value in self.state_dict().items() if self._is_frozen_key(key)}
        merged.update(state_dict)
        return super().load_state_dict(merged, strict=strict, assign=assign)

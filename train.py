"""Train, validate, test or sample with a YAML recipe: the composition root, where the
library (``layerdiff``), the data pipeline (``data``) and the callbacks meet.

    python train.py fit -c configs/transparent_vae.yaml -c configs/demo/transparent_vae.yaml
    python train.py fit -c configs/transparent_vae.yaml --print_config
    python train.py fit --help

LightningCLI with OmegaConf interpolation in YAML recipes.
"""

from __future__ import annotations

import contextlib
import os
import sys

from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf

from callbacks.preemption import exit_code_of
from layerdiff.distributed import is_sharding_strategy, sharded_construction


def _wandb_offline() -> bool:
    """W&B runs offline (no account, no network) unless ``WANDB_MODE=online`` is set."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run")


if not OmegaConf.has_resolver("wandb_offline"):
    OmegaConf.register_resolver("wandb_offline", _wandb_offline)


class LayerdiffCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` with stacked ``-c`` YAML files.

    The parser runs in ``omegaconf+`` mode: ``${...}`` interpolations are resolved after all
    ``-c`` files and command-line overrides are merged, so an overlay that changes
    ``trainer.default_root_dir`` also moves everything that interpolates it.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        # Under a sharding strategy the model is built for it: each process keeps only its shard.
        config = self.config.get(str(self.subcommand), self.config)
        strategy = config.get("trainer", {}).get("strategy")
        strategy = getattr(strategy, "class_path", strategy)
        sharded = strategy is not None and is_sharding_strategy(strategy)
        with sharded_construction() if sharded else contextlib.nullcontext():
            super().instantiate_classes()


def main(args: list[str] | None = None) -> None:
    cli = LayerdiffCLI(args=args)
    # 128 + signal number when a signal stopped the run and no requeue continues it
    code = exit_code_of(cli.trainer)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()

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
import warnings

from layerdiff.cli import (
    TRAINING_CALLBACK_STATES,
    ShortErrorParser,
    constructor_error,
    is_project_error,
    quiet_console,
)

quiet_console()  # before the imports below bring in diffusers and transformers, which talk on import

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import RichModelSummary  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from callbacks.model_summary import ModelPartsSummary  # noqa: E402
from callbacks.preemption import exit_code_of  # noqa: E402
from layerdiff.distributed import is_sharding_strategy, sharded_construction  # noqa: E402


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

    A bad setting is reported in one line (``ShortErrorParser``), and an error a constructor
    raises on purpose (a missing base model, say) as its own message alone, exit code 1; any
    other exception keeps its traceback.
    """

    def __init__(self, *args, **kwargs) -> None:
        quiet_console()
        kwargs.setdefault("parser_class", ShortErrorParser)
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
        try:
            with sharded_construction() if sharded else contextlib.nullcontext():
                super().instantiate_classes()
            return
        except Exception as wrapped:
            error = constructor_error(wrapped)
            if is_project_error(error):
                sys.exit(f"error: {error}")
            if error is wrapped:
                raise
        raise error  # outside the handler: the constructor's own traceback, not jsonargparse's dump

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks = [
            ModelPartsSummary(getattr(callback, "_max_depth", 1), **getattr(callback, "_summarize_kwargs", {}))
            if type(callback) is RichModelSummary else callback
            for callback in trainer.callbacks
        ]
        return trainer

    def before_predict(self) -> None:
        self._predict_warnings = warnings.catch_warnings()
        self._predict_warnings.__enter__()
        warnings.filterwarnings("ignore", message=TRAINING_CALLBACK_STATES)

    def after_predict(self) -> None:
        self._predict_warnings.__exit__(None, None, None)


def main(args: list[str] | None = None) -> None:
    cli = LayerdiffCLI(args=args)
    # 128 + signal number when a signal stopped the run and no requeue continues it
    code = exit_code_of(cli.trainer)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()

"""Watch a generative model learn: fixed prompts and seeds sampled during training, as transparent
images (``TransparentSamples``) or layer sets (``LayerSamples``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

from callbacks.ema import averaged_weights_of
from layerdiff.pipelines import GeneratedImage, GeneratedLayers, GenerationSettings, LayerPromptBatch
from layerdiff.rgba import image_grid, preview_layers, preview_on_checkerboard, to_uint8_hwc


class TransparentSamples(Callback):
    """Generate ``prompts`` x ``seeds`` with the module being trained: when training starts
    (step 0 of a fresh run), then after every validation (or every ``every_n_steps``
    optimizer steps), with the EMA weights when the run keeps an ``EMA``.

    Each time one grid ``<directory>/step_<N>.png``: for every seed, a row of the images on a
    checkerboard (one column per prompt) and beneath it a row of their alpha. The same grid
    goes to W&B (key ``samples``) when the trainer logs there. Fixed seeds make the grids of
    a run directly comparable.

    Every rank generates (a sharded UNet needs all ranks to run a forward); rank 0 writes.
    Works with any module that has an ``image_generator()`` method returning a
    ``layerdiff.pipelines.TransparentImageGenerator`` (``LatentDiffusionModule``).

    Args:
        prompts: what to generate.
        seeds: each prompt is generated once per seed.
        every_n_steps: sampling interval in optimizer steps; ``None`` samples whenever
            validation runs during training (``trainer.val_check_interval``).
        settings: size (default: the base model's native size), steps, guidance scale,
            negative prompt and sampler.
        directory: where to write; defaults to ``<trainer.default_root_dir>/samples``.
    """

    generator_method = "image_generator"  # what the module must have, and the model that has it
    generating_module = "LatentDiffusionModule"

    def __init__(
        self,
        prompts: list[str] | list[dict[str, str]],
        seeds: list[int] | None = None,
        every_n_steps: int | None = None,
        settings: GenerationSettings = GenerationSettings(),
        directory: str | None = None,
    ) -> None:
        if not prompts:
            raise ValueError(f"{type(self).__name__} needs at least one prompt.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}")
        self.prompts = list(prompts)
        self.seeds = list(seeds or [0])
        self.every_n_steps = every_n_steps
        self.settings = settings
        self.directory = directory
        self._last_sampled_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, self.generator_method, None)):
            raise TypeError(
                f"{type(self).__name__} needs a module with a {self.generator_method}() method, as "
                f"{self.generating_module} has; {type(pl_module).__name__} has none. Remove the callback "
                "from trainer.callbacks for this recipe."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sample(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation inside fit only: a plain `validate` or the sanity check is not a training step
        if self.every_n_steps is None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._sample(trainer, pl_module)

    def _sample(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_sampled_step:  # gradient accumulation: several batches per step
            return
        self._last_sampled_step = step
        images = self.generate(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        grid = self.grid(images)
        directory = Path(self.directory or Path(trainer.default_root_dir) / "samples")
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8_hwc(grid)).save(directory / f"step_{step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="samples", images=[to_uint8_hwc(grid)], caption=[self.caption()], step=step
                )

    def grid(self, images: list[GeneratedImage]) -> torch.Tensor:
        return sample_grid(images, len(self.prompts))

    def caption(self) -> str:
        return " | ".join(self.prompts)

    def generate(self, trainer: Trainer, pl_module: LightningModule) -> list[GeneratedImage]:
        """Seed-major: all prompts at the first seed, then all at the next, ..."""
        prompts = [prompt for _ in self.seeds for prompt in self.prompts]
        seeds = [seed for seed in self.seeds for _ in self.prompts]
        with averaged_weights_of(trainer), evaluation_mode(pl_module), trainer.precision_plugin.forward_context():
            return pl_module.image_generator()(prompts, seeds, self.settings)


class LayerSamples(TransparentSamples):
    """``TransparentSamples`` for joint-layer models (``JointLayerLoRAModule``): ``prompts`` are
    layer prompts (a prompt per layer name), and each grid row is one layer set, each layer
    (transparent ones on a checkerboard), then the layers composited top over bottom. A model
    that generates from condition layers (``concat_conditions``, ``control_layer``) gets them from
    the first held-out sample, the same at every step."""

    generator_method = "layer_generator"
    generating_module = "JointLayerLoRAModule"
    _conditions: dict[str, torch.Tensor] | None = None

    def held_out_conditions(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        needed = pl_module.layer_generator().conditions
        if needed and self._conditions is None:
            datamodule = trainer.datamodule
            loader = datamodule.val_dataloader() if datamodule.val_shards else datamodule.train_dataloader()
            batch = datamodule.on_before_batch_transfer(next(iter(loader)), 0)
            self._conditions = {name: batch.layer(name).pixels[0].float().cpu() for name in needed}
        return self._conditions or {}

    def grid(self, images: list[GeneratedLayers]) -> torch.Tensor:
        return image_grid([preview_layers(list(image.layers.values())) for image in images])

    def caption(self) -> str:
        return " | ".join(" / ".join(f"{layer}: {text}" for layer, text in prompts.items()) for prompts in self.prompts)

    def generate(self, trainer: Trainer, pl_module: LightningModule) -> list[GeneratedLayers]:
        prompts = [dict(prompt) for _ in self.seeds for prompt in self.prompts]
        seeds = [seed for seed in self.seeds for _ in self.prompts]
        batch = LayerPromptBatch(list(range(len(prompts))), prompts, seeds, self.settings)
        given = self.held_out_conditions(trainer, pl_module)
        with averaged_weights_of(trainer), evaluation_mode(pl_module), trainer.precision_plugin.forward_context():
            return pl_module.layer_generator()(batch, given_pixels=given)


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, then every submodule's own mode back (frozen parts stay in eval)."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes.items():
            submodule.training = training


def sample_grid(images: list[GeneratedImage], columns: int) -> torch.Tensor:
    """Rows of ``columns`` images on a checkerboard, each followed by the row of their alpha."""
    rows = []
    for start in range(0, len(images), columns):
        row = images[start : start + columns]
        rgb, alpha = torch.stack([image.rgb for image in row]), torch.stack([image.alpha for image in row])
        rows += [preview_on_checkerboard(rgb, alpha), alpha.expand(-1, 3, -1, -1)]
    return image_grid(rows)

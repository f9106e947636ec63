"""Show what the transparency VAE does: inputs and reconstructions, to disk and to W&B."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from layerdiff.rgba import image_grid, preview_on_checkerboard, to_uint8_hwc


class TransparentReconstructionImages(Callback):
    """After each validation, save the first validation batch's reconstructions.

    Two PNGs per validation run, named by global step so a run's "before" (step 0, e.g.
    from ``train.py validate``) and "after" images sit side by side:

    * ``reconstruction_step<N>.png`` — row 1 the input, row 2 the reconstruction, both
      composited on a checkerboard; row 3 the frozen VAE's decode of the adjusted latent
      (what an unmodified SD decoder shows: it should look like the premultiplied input);
    * ``alpha_step<N>.png`` — row 1 the input alpha, row 2 the predicted alpha, row 3 the
      absolute alpha error.

    Expects the validation step to return ``LightningModule.reconstruct``'s dict.

    Args:
        num_images: how many samples of the first validation batch to show.
        directory: where to write; defaults to ``<trainer.default_root_dir>/images``.
    """

    def __init__(self, num_images: int = 8, directory: str | None = None) -> None:
        self.num_images = num_images
        self.directory = directory

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        count = min(self.num_images, batch.rgb.shape[0])
        rgb, alpha = batch.rgb[:count].float(), batch.alpha[:count].float()
        rgb_hat, alpha_hat = outputs["rgb"][:count].float(), outputs["alpha"][:count].float()
        grids = {
            "reconstruction": image_grid(
                [
                    preview_on_checkerboard(rgb, alpha),
                    preview_on_checkerboard(rgb_hat, alpha_hat),
                    outputs["adjusted_decode"][:count].float(),
                ]
            ),
            "alpha": image_grid(
                [alpha.expand(-1, 3, -1, -1), alpha_hat.expand(-1, 3, -1, -1), (alpha - alpha_hat).abs().expand(-1, 3, -1, -1)]
            ),
        }
        directory = Path(self.directory or Path(trainer.default_root_dir) / "images")
        directory.mkdir(parents=True, exist_ok=True)
        step = trainer.global_step
        for name, grid in grids.items():
            Image.fromarray(to_uint8_hwc(grid)).save(directory / f"{name}_step{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="val/images",
                    images=[to_uint8_hwc(grid) for grid in grids.values()],
                    caption=list(grids),
                    step=step,
                )

"""Write what ``train.py predict`` generates: RGBA PNGs with their settings, previews, a contact sheet."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from layerdiff.pipelines import GeneratedImage
from layerdiff.resume import gather_from_ranks
from layerdiff.rgba import image_grid, preview_on_checkerboard, to_uint8_hwc

_SLUG_LENGTH = 48


def image_stem(image: GeneratedImage) -> str:
    """``<index>_seed<seed>_<prompt slug>``: sorts in run order, says what it shows."""
    return file_stem(image.index, image.seed, image.prompt)


def file_stem(index: int, seed: int, prompt: str) -> str:
    """``<index>_seed<seed>_<prompt slug>`` of any generated item."""
    ascii_prompt = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_prompt).strip("-")[:_SLUG_LENGTH].rstrip("-")
    return f"{index:05d}_seed{seed}_{slug or 'empty'}"


def png_metadata(parameters: dict[str, Any]) -> PngInfo:
    """One PNG text chunk per parameter: strings as they are, anything else as JSON (paths as strings).

    Read them back with ``PIL.Image.open(path).text``. Pillow stores text that Latin-1
    cannot hold as UTF-8 (iTXt chunks), so any prompt survives.
    """
    info = PngInfo()
    for key, value in parameters.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return info


class RGBAPredictionWriter(BasePredictionWriter):
    """Save each image that ``predict_step`` returns (a list of ``GeneratedImage``) as it comes.

    Into ``output_dir``:

    * ``<index>_seed<seed>_<prompt>.png`` — the RGBA image; its text chunks record prompt,
      negative prompt, seed, steps, guidance scale, sampler, size, base model, LoRAs, decode
      augmentation and checkpoint (``PIL.Image.open(path).text``);
    * ``previews/<same name>.png`` — the image composited on a checkerboard;
    * ``contact_sheet.png`` — thumbnails of the previews in run order, written by rank 0 once
      every rank has finished (it reads all ranks' files, so ``output_dir`` must be on a
      file system all nodes share, as run outputs usually are).

    Files of an earlier run with the same names are overwritten; others stay.

    Args:
        output_dir: where to write.
        contact_sheet_columns: thumbnails per row of the contact sheet.
        contact_sheet_thumbnail: longest side of a thumbnail in pixels.
        contact_sheet_max_images: the sheet shows the first this many images (0: no sheet).
    """

    def __init__(
        self,
        output_dir: str,
        contact_sheet_columns: int = 8,
        contact_sheet_thumbnail: int = 256,
        contact_sheet_max_images: int = 256,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.contact_sheet_columns = contact_sheet_columns
        self.contact_sheet_thumbnail = contact_sheet_thumbnail
        self.contact_sheet_max_images = contact_sheet_max_images
        self._previews: list[tuple[int, str]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previews = []
        (self.output_dir / "previews").mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[GeneratedImage],
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for image in prediction:
            name = image_stem(image) + ".png"
            rgba = to_uint8_hwc(torch.cat([image.rgb, image.alpha]))
            parameters = {**image.parameters, "checkpoint": trainer.ckpt_path}
            Image.fromarray(rgba).save(self.output_dir / name, pnginfo=png_metadata(parameters))
            for extra, pixels in image.extras.items():  # e.g. screen/<name>: the green screen it was keyed from
                (self.output_dir / extra).mkdir(exist_ok=True)
                array = to_uint8_hwc(pixels)  # one channel (a matte) is written as an 8-bit grey PNG
                array = array[..., 0] if array.shape[-1] == 1 else array
                Image.fromarray(array).save(self.output_dir / extra / name, pnginfo=png_metadata(parameters))
            preview = preview_on_checkerboard(image.rgb[None], image.alpha[None])[0]
            preview_path = self.output_dir / "previews" / name
            Image.fromarray(to_uint8_hwc(preview)).save(preview_path)
            self._previews.append((image.index, str(preview_path)))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # also the barrier: every rank has written
        previews = [preview for previews in gather_from_ranks(self._previews) for preview in previews]
        if trainer.is_global_zero and previews and self.contact_sheet_max_images > 0:
            paths = [path for _, path in sorted(previews)[: self.contact_sheet_max_images]]
            sheet = contact_sheet(paths, self.contact_sheet_columns, self.contact_sheet_thumbnail)
            Image.fromarray(to_uint8_hwc(sheet)).save(self.output_dir / "contact_sheet.png")


def contact_sheet(paths: list[str], columns: int, thumbnail: int) -> torch.Tensor:
    """The images at ``paths`` shrunk to fit ``thumbnail`` px, ``columns`` per row, on white."""
    thumbnails = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((thumbnail, thumbnail))
            thumbnails.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0)
    columns = min(columns, len(thumbnails))
    # Images of one run share a size; pad any other to the largest so the grid stays regular.
    height = max(tile.shape[1] for tile in thumbnails)
    width = max(tile.shape[2] for tile in thumbnails)
    tiles = torch.ones(len(thumbnails) + (-len(thumbnails)) % columns, 3, height, width)
    for tile, image in zip(tiles, thumbnails):
        tile[:, : image.shape[1], : image.shape[2]] = image
    return image_grid(list(tiles.split(columns)))

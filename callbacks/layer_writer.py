"""Write the layer sets a joint-layer model generates with ``train.py predict``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from callbacks.rgba_writer import contact_sheet, file_stem, png_metadata
from layerdiff.formats.layered_image import Layer, write_layered
from layerdiff.pipelines import GeneratedLayers
from layerdiff.resume import gather_from_ranks
from layerdiff.rgba import image_grid, preview_layers, to_uint8_hwc

BLEND_LAYER = "blend"  # kept in the layered file as a hidden reference: the others composite to it


def layer_set_stem(layers: GeneratedLayers) -> str:
    """``<index>_seed<seed>_<slug of the first layer's prompt that is not empty>``."""
    return file_stem(layers.index, layers.seed, next((text for text in layers.prompts.values() if text), ""))


def layered_file_stack(layers: GeneratedLayers) -> list[Layer]:
    """The layers as a file stack, top first; the generated blend hidden on top, so the file opens
    showing the other layers composited and the blend is one click away."""
    stack = [Layer(name, to_uint8_hwc(image)) for name, image in layers.layers.items() if name != BLEND_LAYER]
    if BLEND_LAYER in layers.layers:
        stack.insert(0, Layer(f"{BLEND_LAYER} (generated)", to_uint8_hwc(layers.layers[BLEND_LAYER]), visible=False))
    return stack


class LayerSetWriter(BasePredictionWriter):
    """Save each layer set that ``predict_step`` returns (a list of ``GeneratedLayers``).

    Into ``output_dir``, per set ``<stem>`` (``layer_set_stem``):

    * ``<stem>.<layer>.png``: each layer (transparent ones RGBA), prompts, seed and settings in
      the PNG text chunks;
    * ``<stem>.psd`` (or ``.ora``: ``layered_format``): the layered file Photoshop, GIMP and Krita
      open (``layerdiff.formats.layered_image``);
    * ``previews/<stem>.png``: the layers side by side (transparent ones on a checkerboard) and
      then composited top over bottom;
    * ``contact_sheet.png``: the previews in run order, written by rank 0 at the end.

    Args:
        output_dir: where to write.
        layered_format: ``psd`` or ``ora``.
        contact_sheet_max_images: the sheet shows the first this many sets (0: no sheet).
    """

    def __init__(self, output_dir: str, layered_format: str = "psd", contact_sheet_max_images: int = 64) -> None:
        super().__init__(write_interval="batch")
        if layered_format not in ("psd", "ora"):
            raise ValueError(f"layered_format must be 'psd' or 'ora'; got {layered_format!r}")
        self.output_dir = Path(output_dir)
        self.layered_format = layered_format
        self.contact_sheet_max_images = contact_sheet_max_images
        self._previews: list[tuple[int, str]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previews = []
        (self.output_dir / "previews").mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction: list[GeneratedLayers], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int) -> None:
        for layers in prediction:
            stem = layer_set_stem(layers)
            parameters = {**layers.parameters, "checkpoint": trainer.ckpt_path}
            metadata = png_metadata(parameters)
            for name, image in layers.layers.items():
                Image.fromarray(to_uint8_hwc(image)).save(self.output_dir / f"{stem}.{name}.png", pnginfo=metadata)
            write_layered(self.output_dir / f"{stem}.{self.layered_format}", layered_file_stack(layers))
            preview_path = self.output_dir / "previews" / f"{stem}.png"
            preview = image_grid([preview_layers(list(layers.layers.values()))])
            Image.fromarray(to_uint8_hwc(preview)).save(preview_path)
            self._previews.append((layers.index, str(preview_path)))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # also the barrier: every rank has written
        previews = [preview for previews in gather_from_ranks(self._previews) for preview in previews]
        if trainer.is_global_zero and previews and self.contact_sheet_max_images > 0:
            paths = [path for _, path in sorted(previews)[: self.contact_sheet_max_images]]
            with Image.open(paths[0]) as first:
                width = first.width
            sheet = contact_sheet(paths, columns=1, thumbnail=width)
            Image.fromarray(to_uint8_hwc(sheet)).save(self.output_dir / "contact_sheet.png")


"""Write the layer sets a joint-layer model generates with ``train.py predict``."""

from __future__ import annotations

from PIL import Image

from callbacks.rgba_writer import RGBAPredictionWriter, file_stem, png_metadata
from layerdiff.formats.layered_image import Layer, write_layered
from layerdiff.pipelines import GeneratedLayers
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


class LayerSetWriter(RGBAPredictionWriter):
    """Save each layer set that ``predict_step`` returns (a list of ``GeneratedLayers``).

    Into ``output_dir``, per set ``<stem>`` (``layer_set_stem``):

    * ``<stem>.<layer>.png``: each layer (transparent ones RGBA), prompts, seed and settings in
      the PNG text chunks;
    * ``<stem>.psd`` (or ``.ora``: ``layered_format``): the layered file Photoshop, GIMP and Krita
      open (``layerdiff.formats.layered_image``);
    * ``previews/<stem>.png``: the layers side by side (transparent ones on a checkerboard) and
      then composited top over bottom;
    * ``contact_sheet.png``: the previews in run order, one set per row, written by rank 0 at
      the end (as ``RGBAPredictionWriter``'s).

    Args:
        output_dir: where to write.
        layered_format: ``psd`` or ``ora``.
        contact_sheet_thumbnail: longest side of a preview row on the contact sheet, in pixels.
        contact_sheet_max_images: the sheet shows the first this many sets (0: no sheet).
    """

    def __init__(self, output_dir: str, layered_format: str = "psd", contact_sheet_thumbnail: int = 1024,
                 contact_sheet_max_images: int = 64) -> None:
        super().__init__(output_dir, contact_sheet_columns=1, contact_sheet_thumbnail=contact_sheet_thumbnail,
                         contact_sheet_max_images=contact_sheet_max_images)
        if layered_format not in ("psd", "ora"):
            raise ValueError(f"layered_format must be 'psd' or 'ora'; got {layered_format!r}")
        self.layered_format = layered_format

    def write_on_batch_end(self, trainer, pl_module, prediction: list[GeneratedLayers], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int) -> None:
        for layers in prediction:
            stem = layer_set_stem(layers)
            metadata = png_metadata({**layers.parameters, "checkpoint": trainer.ckpt_path})
            for name, image in layers.layers.items():
                Image.fromarray(to_uint8_hwc(image)).save(self.output_dir / f"{stem}.{name}.png", pnginfo=metadata)
            write_layered(self.output_dir / f"{stem}.{self.layered_format}", layered_file_stack(layers))
            preview_path = self.output_dir / "previews" / f"{stem}.png"
            preview = image_grid([preview_layers(list(layers.layers.values()))])
            Image.fromarray(to_uint8_hwc(preview)).save(preview_path)
            self._previews.append((layers.index, str(preview_path)))

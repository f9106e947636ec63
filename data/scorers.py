"""What ``data.filters`` measures on one sample: a perceptual hash for near-duplicates, CLIP
embeddings from a local model folder, and the LAION aesthetic predictor's head over them.

Hashes and models see a foreground composited over mid-grey (``on_grey``): the colour under zero
alpha is padding, not content. Models load from local paths only; nothing is downloaded.

CLIP runs through transformers (``CLIPModel`` / ``CLIPProcessor`` folders, e.g. a local copy of
openai/clip-vit-large-patch14, the embedding the LAION aesthetic predictor was trained on), not
open_clip: open_clip needs torchvision, and no torchvision build here matches the CPU torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from layerdiff.rgba import composite

GREY = 0.5
HASH_SIDE = 8  # dHash of an 8 x 9 grey thumbnail: 64 bits
HASH_BITS = HASH_SIDE * HASH_SIDE


def on_grey(foreground: np.ndarray, *, crop: bool = False) -> np.ndarray:
    """A uint8 RGBA foreground over mid-grey as uint8 RGB; ``crop`` keeps only the box around its
    visible pixels, so that a small object fills a hash's thumbnail instead of the grey around it."""
    if crop:
        rows, columns = np.nonzero(foreground[..., 3].any(axis=1))[0], np.nonzero(foreground[..., 3].any(axis=0))[0]
        if rows.size:
            foreground = foreground[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    rgba = foreground.astype(np.float32) / 255.0
    return np.rint(composite(rgba[..., :3], rgba[..., 3:], GREY) * 255.0).astype(np.uint8)


def dhash(rgb: np.ndarray) -> int:
    """The 64-bit difference hash of an RGB image: one bit per horizontally adjacent pair of its
    9 x 8 grey thumbnail, set where brightness rises to the right."""
    thumbnail = Image.fromarray(rgb).convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumbnail, dtype=np.int16)
    return int.from_bytes(np.packbits(pixels[:, 1:] > pixels[:, :-1]).tobytes(), "big")


class HashIndex:
    """Hashes kept so far, searched for one within ``max_distance`` differing bits.

    Two hashes that differ in at most d bits agree exactly on at least one of d + 1 disjoint bands
    (pigeonhole), so a lookup compares only with the hashes sharing a band with it, not with all.
    """

    def __init__(self, max_distance: int, bits: int = HASH_BITS):
        if not 0 <= max_distance < bits:
            raise ValueError(f"the near-duplicate distance must be 0 to {bits - 1} differing bits, got {max_distance}")
        self.max_distance = max_distance
        edges = np.linspace(0, bits, max_distance + 2).round().astype(int)
        self.bands = [(int(low), (1 << int(high - low)) - 1) for low, high in zip(edges[:-1], edges[1:])]
        self.tables: list[dict[int, list[tuple[int, object]]]] = [{} for _ in self.bands]

    def nearest(self, value: int) -> tuple[int, object] | None:
        """``(distance, item)`` of the closest kept hash within ``max_distance``, or None."""
        best = None
        for table, (shift, mask) in zip(self.tables, self.bands):
            for other, item in table.get((value >> shift) & mask, ()):
                distance = (value ^ other).bit_count()
                if distance <= self.max_distance and (best is None or distance < best[0]):
                    best = (distance, item)
        return best

    def add(self, value: int, item: object) -> None:
        for table, (shift, mask) in zip(self.tables, self.bands):
            table.setdefault((value >> shift) & mask, []).append((value, item))


def existing_path(path: str | Path, what: str, fix: str) -> Path:
    """``path`` when it exists, else a ``FileNotFoundError`` saying what it should have been."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist. Fix: {fix}; nothing is downloaded")
    return Path(path)


class ClipEmbedder:
    """Unit-length CLIP image and text embeddings from a local transformers CLIP folder (``CLIPModel``
    and ``CLIPProcessor`` saved with ``save_pretrained``)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = existing_path(folder, "CLIP model folder", "give a local folder holding a transformers CLIPModel and "
                               "its processor (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot load a CLIP model and processor from {folder}: {error}. Fix: give a folder "
                             "written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained") from error
        self.device = device

    @property
    def width(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """``[N, width]`` embeddings of uint8 RGB images."""
        pixels = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """``[N, width]`` embeddings of captions (cut to the model's token limit)."""
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()


def load_aesthetic_head(path: str | Path) -> torch.nn.Sequential:
    """The LAION aesthetic predictor's MLP (improved-aesthetic-predictor: ``layers.{0,2,4,6,7}``, Linear
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between) with the weights of a local ``.pth`` or
    ``.safetensors`` file. The widths are read from the file, so a head for any CLIP width loads."""
    path = existing_path(path, "aesthetic head weights", "give a local file, e.g. the LAION predictor's "
                         "sac+logos+ava1-l14-linearMSE.pth (on CLIP ViT-L/14 embeddings)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot read aesthetic head weights {path}: {type(error).__name__}: {error}") from error
    state = {name.removeprefix("layers."): tensor for name, tensor in state.items()}
    indices = sorted(int(name.split(".")[0]) for name in state if name.endswith(".weight"))
    if not indices or any(f"{index}.bias" not in state or state[f"{index}.weight"].ndim != 2 for index in indices):
        raise ValueError(f"{path} holds no MLP of Linear layers (layers.N.weight / layers.N.bias): "
                         f"found {sorted(state)[:6]}. Fix: give the LAION aesthetic predictor's state dict")
    # Dropout positions stay identities: the head only ever runs in inference.
    layers = [torch.nn.Identity() for _ in range(indices[-1] + 1)]
    for index in indices:
        out_features, in_features = state[f"{index}.weight"].shape
        layers[index] = torch.nn.Linear(in_features, out_features)
    head = torch.nn.Sequential(*layers)
    try:
        head.load_state_dict(state)
        head(torch.zeros(1, layers[indices[0]].in_features))
    except RuntimeError as error:
        raise ValueError(f"the layers of {path} do not chain into one MLP: {error}") from error
    if layers[indices[-1]].out_features != 1:
        raise ValueError(f"{path} ends in {layers[indices[-1]].out_features} outputs; an aesthetic head gives one score")
    return head.eval()

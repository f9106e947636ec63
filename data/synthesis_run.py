"""Running the layered-data synthesis through Lightning: ``Trainer.predict`` over the plan's chunks.

Every device gets whole output shards: the shards not finished by an earlier run are dealt out
by rank (``remaining[rank::world_size]``, decided on rank 0 and broadcast before anything is
written), each cut into chunks of ``batch_size`` items in order. ``ChunkDataset`` reads and
prepares a chunk's foregrounds (in DataLoader workers), ``LayerSynthesisPredictor`` inpaints
them (``layerdiff.pipelines.layer_synthesis``), and ``SynthesisShardWriter`` streams the
samples into the shard's staging tar and finishes the shard after its last chunk
(``data.synthesis_output``). Lightning's progress bar counts chunks.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.schema import FOREGROUND, CorruptMemberError, LayerSample, SchemaError, decode_sample, encode_sample
from data.shards import ShardWriter, serialise_sample
from data.synthesis import Plan, WorkItem, read_members
from data.synthesis_output import CREATED_BY, SynthesisFolder
from data.writer import NO_ALPHA, NO_TRANSPARENT_PIXEL, NO_VISIBLE_PIXEL, UNREADABLE
from layerdiff.pipelines.layer_synthesis import LayerSynthesizer, SynthesisSettings, load_inpainting_pipeline
from layerdiff.rgba import MissingAlphaError, load_rgba, prepare_foreground, resize_and_crop


@dataclass
class ChunkItem:
    """One item of a chunk: what the output sample needs besides its pixels, or why it is dropped."""

    index: int
    key: str
    seed: int
    captions: tuple[str, str, str] = ("", "", "")  # foreground, blend, background
    prompt_line: int = 0
    input: dict[str, str] = field(default_factory=dict)
    source: str = ""
    original_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)
    license: str | None = None
    attribution: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    dropped: tuple[str, str] | None = None  # (reason, detail)


@dataclass
class SynthesisChunk:
    """Consecutive items of output shard ``shard``; ``foregrounds`` ``[K, 4, S, S]`` for its kept items, in order."""

    shard: int
    last_in_shard: bool
    items: list[ChunkItem]
    foregrounds: torch.Tensor

    @property
    def kept(self) -> list[ChunkItem]:
        return [item for item in self.items if item.dropped is None]


def prepare_item(item: WorkItem, size: int) -> tuple[ChunkItem, np.ndarray | None]:
    """Read and prepare one foreground at ``size`` x ``size`` (float RGBA), or say why it is dropped."""
    reference = item.foreground
    chunk_item = ChunkItem(item.index, f"{item.index:08d}_{_slug(reference.key)}", item.seed,
                           input={"shard" if reference.members else "file": reference.source, "key": reference.key})
    if item.prompts is None:
        chunk_item.dropped = (item.dropped or "no prompt", "")
        return chunk_item, None
    try:
        rgba, caption = _read_foreground(item, chunk_item)
    except MissingAlphaError as error:
        chunk_item.dropped = (NO_ALPHA, str(error).split(". ")[0])
        return chunk_item, None
    except (CorruptMemberError, SchemaError, OSError, ValueError) as error:
        chunk_item.dropped = (UNREADABLE, f"{type(error).__name__}: {error}")
        return chunk_item, None
    if rgba.shape[:2] != (size, size):
        # The SDXL size condition then describes this resize of the input sample.
        chunk_item.original_size = rgba.shape[:2]
        rgba, chunk_item.crop_top_left = resize_and_crop(rgba, size, size)
    alpha_levels = np.rint(np.clip(rgba[..., 3], 0.0, 1.0) * 255.0)  # as the 8-bit PNG stores it
    if alpha_levels.min() == 255:
        chunk_item.dropped = (NO_TRANSPARENT_PIXEL, "fully opaque: nothing to inpaint")
    elif alpha_levels.max() == 0:
        chunk_item.dropped = (NO_VISIBLE_PIXEL, "empty: no foreground to keep")
    if chunk_item.dropped:
        return chunk_item, None
    prompts = item.prompts
    chunk_item.captions = (prompts.foreground or caption, prompts.blend, prompts.background)
    chunk_item.prompt_line = prompts.line
    return chunk_item, prepare_foreground(rgba)


def _read_foreground(item: WorkItem, chunk_item: ChunkItem) -> tuple[np.ndarray, str]:
    """Float RGBA and its caption; fills the item's size, crop and licence metadata from the input."""
    reference = item.foreground
    if not reference.members:  # a PNG, e.g. from train.py predict: the prompt it was made from is a text chunk
        rgba = load_rgba(reference.source)
        with Image.open(reference.source) as image:
            caption = getattr(image, "text", {}).get("prompt", "")
        chunk_item.source, chunk_item.original_size = f"{reference.key}.png", rgba.shape[:2]
        return rgba, caption
    members: dict[str, Any] = {**read_members(reference), "__key__": reference.key, "__url__": reference.source}
    if FOREGROUND in members:
        with Image.open(io.BytesIO(members[FOREGROUND])) as image:  # the header only: an RGB cut-out is dropped as such
            if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
                raise MissingAlphaError(f"{FOREGROUND} of mode {image.mode}: no alpha channel")
    sample = decode_sample(members)
    chunk_item.source, chunk_item.original_size, chunk_item.crop_top_left = (
        sample.source, sample.original_size, sample.crop_top_left)
    chunk_item.license, chunk_item.attribution, chunk_item.provenance = sample.license, sample.attribution, sample.provenance
    return sample.foreground.astype(np.float32) / 255.0, sample.caption


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", key)[-48:].strip("-") or "item"


@dataclass(frozen=True)
class ChunkSpec:
    shard: int
    items: range
    last_in_shard: bool


class ChunkDataset(Dataset):
    """One element per chunk: its items read and prepared (``SynthesisChunk``)."""

    def __init__(self, chunks: list[ChunkSpec], items: list[WorkItem], size: int) -> None:
        self.chunks, self.items, self.size = chunks, items, size

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, position: int) -> SynthesisChunk:
        spec = self.chunks[position]
        prepared = [prepare_item(self.items[index], self.size) for index in spec.items]
        pixels = [torch.from_numpy(rgba).permute(2, 0, 1) for _, rgba in prepared if rgba is not None]
        stacked = torch.stack(pixels) if pixels else torch.empty(0, 4, self.size, self.size)
        return SynthesisChunk(spec.shard, spec.last_in_shard, [item for item, _ in prepared], stacked)


def _single(chunks: list[SynthesisChunk]) -> SynthesisChunk:
    return chunks[0]  # a dataset element is already a batch


class SynthesisDataModule(LightningDataModule):
    """The chunks of this rank's share of the unfinished output shards."""

    def __init__(self, plan: Plan, folder: SynthesisFolder, size: int, batch_size: int, workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.plan, self.folder, self.size, self.batch_size, self.workers = plan, folder, size, batch_size, workers
        self.chunks: list[ChunkSpec] = []
        self.finished_earlier: set[int] = set()

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if self.trainer.is_global_zero:
            self.folder.start()
        strategy.barrier()
        # Decided once, before any rank writes: every rank deals out the same list.
        finished = set(strategy.broadcast(sorted(self.folder.finished()) if self.trainer.is_global_zero else None))
        self.finished_earlier = finished
        remaining = [shard for shard in range(len(self.plan.shards)) if shard not in finished]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = remaining[rank::world]
        shown = f"{mine}" if len(mine) <= 10 else f"{mine[:10]} ... ({len(mine)} in all)"
        print(f"synthesize-layers rank {rank}/{world}: shards {shown} ({len(remaining)} unfinished of "
              f"{len(self.plan.shards)})", flush=True)
        self.chunks = []
        for shard in mine:
            items = self.plan.shards[shard]
            for start in range(items.start, items.stop, self.batch_size):
                stop = min(start + self.batch_size, items.stop)
                self.chunks.append(ChunkSpec(shard, range(start, stop), stop == items.stop))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(ChunkDataset(self.chunks, self.plan.items, self.size), batch_size=1, collate_fn=_single,
                          num_workers=self.workers, persistent_workers=False)


class LayerSynthesisPredictor(LightningModule):
    """Predict-only: blend and background of each chunk's kept foregrounds."""

    def __init__(self, model: str, settings: SynthesisSettings, dtype: torch.dtype) -> None:
        super().__init__()
        pipeline = load_inpainting_pipeline(model, dtype=dtype)
        # Registered so that Lightning moves them to the device; the pipeline holds the same modules.
        self.parts = nn.ModuleDict({name: part for name, part in pipeline.components.items() if isinstance(part, nn.Module)})
        self.synthesizer = LayerSynthesizer(pipeline, settings)
        self.description = {"pipeline": type(pipeline).__name__, "scheduler": type(pipeline.scheduler).__name__}

    def predict_step(self, chunk: SynthesisChunk) -> tuple[SynthesisChunk, Any]:
        kept = chunk.kept
        if not kept:
            return chunk, None
        layers = self.synthesizer(chunk.foregrounds, [item.captions[1] for item in kept],
                                  [item.captions[2] for item in kept], [item.seed for item in kept])
        return chunk, layers


class SynthesisShardWriter(BasePredictionWriter):
    """Streams each chunk's samples into its output shard; finishes the shard after its last chunk."""

    def __init__(self, folder: SynthesisFolder, provenance: dict[str, Any]) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.provenance = folder, provenance
        self._writer: ShardWriter | None = None
        self._written: dict[int, str] = {}
        self._dropped: dict[int, tuple[str, str]] = {}
        self.finished_shards = 0

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: tuple[SynthesisChunk, Any],
                           batch_indices, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        chunk, layers = prediction
        if self._writer is None:
            self._writer = self.folder.open_shard(chunk.shard)
            self._written, self._dropped = {}, {}
        provenance = {**self.provenance, **getattr(pl_module, "description", {})}
        for position, item in enumerate(chunk.kept):
            sample = output_sample(item, chunk.foregrounds[position], layers.blend[position],
                                   layers.background[position], provenance)
            self._writer.write(serialise_sample(encode_sample(sample)))
            self._written[item.index] = item.key
        self._dropped.update({item.index: item.dropped for item in chunk.items if item.dropped is not None})
        if chunk.last_in_shard:
            self.folder.finish_shard(chunk.shard, self._writer, self._written, self._dropped)
            self._writer = None
            self.finished_shards += 1


def output_sample(item: ChunkItem, foreground: torch.Tensor, blend: torch.Tensor, background: torch.Tensor,
                  provenance: dict[str, Any]) -> LayerSample:
    """The layered sample of one item: the prepared foreground, the two inpainted layers, three captions."""
    def hwc(image: torch.Tensor) -> np.ndarray:
        return image.permute(1, 2, 0).numpy()

    synthesis = {**provenance, "seed": item.seed, "prompt_line": item.prompt_line, "input": item.input,
                 "created_by": CREATED_BY}
    return LayerSample(
        key=item.key, foreground=hwc(foreground), caption=item.captions[0], original_size=item.original_size,
        crop_top_left=item.crop_top_left, source=item.source, background=hwc(background), blend=hwc(blend),
        background_caption=item.captions[2], blend_caption=item.captions[1], license=item.license,
        attribution=item.attribution, provenance={**item.provenance, "synthesis": synthesis},
    )

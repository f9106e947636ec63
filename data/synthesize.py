"""``python -m data synthesize-layers``: layered shards from transparent foregrounds by inpainting.

LayerDiffusion sec. 3.4 ("Multi-layer Dataset"): for each foreground and its prompt triple, an
inpainting model draws the whole image around the foreground (the blend) and then the scene
without it (the background); the samples (fg, bg, blend, three captions, provenance) are written
as layered shards (``data.schema``). Inputs and matching: ``data.synthesis``; the maths:
``layerdiff.pipelines.layer_synthesis``; running on every device: ``data.synthesis_run``; the
output folder and resuming after a kill: ``data.synthesis_output``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from data.synthesis import BROKEN_PROMPT_LINE, list_foregrounds, plan_items, read_prompt_file
from data.synthesis_output import SynthesisFolder
from data.synthesis_run import LayerSynthesisPredictor, SynthesisDataModule, SynthesisShardWriter
from layerdiff.pipelines.layer_synthesis import SynthesisSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXAMPLES_PER_REASON = 5


@dataclass
class SynthesisReport:
    """What the output folder holds after a run (earlier runs' shards included) and what was dropped."""

    out_dir: Path
    items: int
    shards: int
    finished_shards: int
    done_earlier: int
    written: int
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unmatched_lines: list[int] = field(default_factory=list)
    seconds: float = 0.0
    written_now: int = 0

    @property
    def complete(self) -> bool:
        return self.finished_shards == self.shards

    def summary(self) -> str:
        rate = self.written_now / max(self.seconds, 1e-9)
        lines = [
            f"{self.out_dir}: {self.written} layered samples from {self.items} foregrounds in {self.finished_shards} of "
            f"{self.shards} shard(s) ({self.done_earlier} finished by an earlier run); this run: {self.written_now} samples "
            f"in {self.seconds:.1f} s ({rate:.2f} samples/s)",
            f"dropped {sum(self.dropped.values())}" + (":" if self.dropped else ""),
        ]
        for reason, count in self.dropped.most_common():
            lines.append(f"  {count:6d}  {reason}, e.g. {'; '.join(self.examples[reason])}")
        if self.unmatched_lines:
            shown = ", ".join(map(str, self.unmatched_lines[:10])) + (", ..." if len(self.unmatched_lines) > 10 else "")
            lines.append(f"{len(self.unmatched_lines)} prompt line(s) name a key no foreground has: line(s) {shown}")
        if not self.complete:
            lines.append("INCOMPLETE: run the same command again to finish the remaining shards")
        return "\n".join(lines)


def synthesize_layers(
    foregrounds: str,
    prompts: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str,
    settings: SynthesisSettings,
    seed: int = 0,
    samples_per_shard: int = 100,
    batch_size: int = 4,
    accelerator: str = "auto",
    devices: int | str = "auto",
    dtype: str = "auto",
    workers: int = 1,
    skip_broken_prompts: bool = False,
    progress_bar: bool = True,
) -> SynthesisReport | None:
    """Synthesise layered shards into ``out_dir`` (resuming it if an earlier run of the same
    command was interrupted); returns the report on rank 0, ``None`` on the other ranks."""
    prompt_file = read_prompt_file(prompts, skip_broken=skip_broken_prompts)
    plan = plan_items(list_foregrounds(foregrounds), prompt_file, seed=seed, samples_per_shard=samples_per_shard)
    if dtype == "auto":
        on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
        dtype = "float16" if on_gpu else "float32"  # diffusers upcasts SDXL's VAE where it would overflow
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    # What the samples depend on; the inputs themselves (paths, keys, prompts) are in the plan's digest.
    run_settings = {"model": _normalised_source(model), "prompts_sha256": prompt_file.sha256,
                    **settings.to_json(), "seed": seed, "dtype": dtype}
    folder = SynthesisFolder(out_dir, run_settings, plan)
    folder.check()
    predictor = LayerSynthesisPredictor(model, settings, DTYPES[dtype])
    writer = SynthesisShardWriter(folder, {"model": model, **settings.to_json(), "dtype": dtype})
    data = SynthesisDataModule(plan, folder, settings.size, batch_size, workers)
    trainer = Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, use_distributed_sampler=False, callbacks=[writer],
                      enable_progress_bar=progress_bar, default_root_dir=str(out_dir))
    started = time.perf_counter()
    with warnings.catch_warnings():
        # A rank with no unfinished shard (or a finished folder) has nothing to predict: expected here.
        warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero")
        trainer.predict(predictor, datamodule=data, return_predictions=False)
    trainer.strategy.barrier()  # every rank's shards are finished (or its run failed)
    if not trainer.is_global_zero:
        return None
    seconds = time.perf_counter() - started
    folder.write_manifest({"foregrounds": foregrounds, "prompt_file": str(prompt_file.path.resolve()),
                           "broken_prompt_lines": len(prompt_file.broken)})
    report = _report(folder, data.finished_earlier, seconds)
    report.unmatched_lines = plan.unmatched_lines
    if prompt_file.broken:
        report.dropped[BROKEN_PROMPT_LINE] = len(prompt_file.broken)
        report.examples[BROKEN_PROMPT_LINE] = prompt_file.broken[:EXAMPLES_PER_REASON]
    return report


def _report(folder: SynthesisFolder, finished_earlier: set[int], seconds: float) -> SynthesisReport:
    plan = folder.plan
    records = [record for shard in range(len(plan.shards)) if (record := folder.record(shard)) is not None]
    written = sum(len(record.written) for record in records)
    report = SynthesisReport(Path(folder.root), len(plan.items), len(plan.shards), len(records), len(finished_earlier),
                             written, seconds=seconds, written_now=written - sum(
                                 len(record.written) for record in records if record.index in finished_earlier))
    for record in records:
        for index, (reason, detail) in sorted(record.dropped.items()):
            report.dropped[reason] += 1
            if len(report.examples[reason]) < EXAMPLES_PER_REASON:
                reference = plan.items[index].foreground
                report.examples[reason].append(f"{reference.source}:{reference.key}" + (f" ({detail})" if detail else ""))
    return report


def _normalised_source(name_or_path: str) -> str:
    """A local folder as its absolute path (so other working directories compare equal), else as given."""
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path

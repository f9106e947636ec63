"""Speed and memory of the training step, in the progress bar and the loggers."""

from __future__ import annotations

import resource
import sys
import time
import warnings

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from layerdiff.compat import cpu_flash_attention_ops, dispatch_mode_base, overload_packet

GIB = 1024**3
# ru_maxrss is in kilobytes on Linux, in bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


class TrainingThroughput(Callback):
    """Every ``log_every_n_steps`` steps: ``perf/samples_per_sec`` (all ranks together),
    ``perf/tflops_per_sec`` and ``perf/mfu`` per device, and ``perf/peak_memory_gib`` (the
    largest over the devices; each rank's as ``perf/peak_memory_gib_rank<N>`` in the loggers).

    * FLOPs are counted once, on the first training step, with ``torch.utils.flop_counter``'s
      formulas (forward and backward; matmuls, convolutions and attention) and scaled by samples
      afterwards, which is exact while batches keep the first one's image size. That step is
      left out of the timings, as is everything before it. The counting runs every op as it is
      (``CountingFlops``), so the counted step computes exactly what it would have otherwise,
      and a resumed run still matches an uninterrupted one bit for bit.
    * MFU divides the achieved FLOP/s by the device's peak: ``peak_flops`` when given (e.g. the
      measured dense bf16 matmul rate of your GPU), else Lightning's table of known GPUs for the
      run's precision; without either (a CPU) only TFLOP/s are logged.
    * Peak memory: the CUDA caching allocator's peak allocation; on a CPU, the process's peak
      resident set size. Timings on CUDA synchronise the device at logging steps only.

    Args:
        count_flops: count FLOPs on the first step (turn off if a model does not trace under
            the FLOP counter).
        peak_flops: FLOP/s of one device at 100 % utilisation, for MFU.
    """

    def __init__(self, count_flops: bool = True, peak_flops: float | None = None) -> None:
        self.count_flops = count_flops
        self.peak_flops = peak_flops
        self.flops_per_sample: float | None = None
        self._counter: CountingFlops | None = None
        self._window_start: float | None = None
        self._window_samples = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window_start, self._window_samples = None, 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.count_flops and self.flops_per_sample is None and self._counter is None:
            self._counter = CountingFlops()
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        samples = batch_size(batch)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_sample = self._counter.flops / max(samples, 1)
            self._counter = None
        if self._window_start is None:  # the timing starts after the first (counted, warm-up) step
            self._synchronize(pl_module)
            self._window_start = time.perf_counter()
            return
        self._window_samples += samples
        if trainer.global_step % trainer.log_every_n_steps:
            return  # the same steps on every rank: the gather below is a collective
        self._synchronize(pl_module)
        elapsed = time.perf_counter() - self._window_start
        local = torch.tensor([self._window_samples, peak_memory_bytes(pl_module.device)], dtype=torch.float64,
                             device=pl_module.device)
        every_rank = pl_module.all_gather(local).reshape(-1, 2).cpu()
        metrics = {
            "perf/samples_per_sec": float(every_rank[:, 0].sum()) / elapsed,
            "perf/peak_memory_gib": float(every_rank[:, 1].max()) / GIB,
        }
        if self.flops_per_sample:
            achieved = self.flops_per_sample * self._window_samples / elapsed
            metrics["perf/tflops_per_sec"] = achieved / 1e12
            peak = self.peak_flops or self._known_peak_flops(trainer, pl_module.device)
            if peak:
                metrics["perf/mfu"] = achieved / peak
        pl_module.log_dict(metrics, prog_bar=True, rank_zero_only=True)
        pl_module.log_dict(
            {f"perf/peak_memory_gib_rank{rank}": float(memory) / GIB for rank, memory in enumerate(every_rank[:, 1])},
            rank_zero_only=True,
        )
        self._window_start, self._window_samples = time.perf_counter(), 0

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    @staticmethod
    def _synchronize(module: LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    @staticmethod
    def _known_peak_flops(trainer: Trainer, device: torch.device) -> float | None:
        precision = str(trainer.precision).split("-")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown device is normal here, not a problem
            return get_available_flops(device, _PRECISION_DTYPES.get(precision, torch.float32))


class CountingFlops(dispatch_mode_base()):
    """Adds up the FLOPs of the matmuls, convolutions and attention run inside it.

    ``torch.utils.flop_counter.FlopCounterMode`` decomposes every op it has no formula for
    (group norm, the CPU flash-attention kernel, ...) into smaller ones to find matmuls in
    them, which changes the numbers those ops compute; here every op runs unchanged. The CPU
    flash-attention kernels, which that module has no formula for, count as attention does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self._flash_attention, self._flash_attention_backward = cpu_flash_attention_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = overload_packet(func)
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet is self._flash_attention:
            query, key, value = args[:3]
            self.flops += sdpa_flop_count(query.shape, key.shape, value.shape)
        elif packet is self._flash_attention_backward:
            grad_out, query, key, value = args[:4]
            self.flops += sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
        return out


def batch_size(batch) -> int:
    """Samples in a batch: a layerdiff batch's ``len`` (its per-sample keys), else the length of
    a dict's first tensor, or of the batch itself."""
    if isinstance(batch, dict):
        batch = next((value for value in batch.values() if isinstance(value, torch.Tensor)), None)
    return len(batch) if batch is not None else 0


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT

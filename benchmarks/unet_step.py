"""Training-step speed, memory and model FLOPs utilisation of an SDXL-architecture UNet.

    python -m benchmarks.unet_step                       # on a GPU: SDXL shape, bf16, 1024 px
    python -m benchmarks.unet_step --unet tiny --resolution 64 --batch-sizes 2 --no-write   # CPU smoke run

For each combination of batch size, fine-tune (rank-256 LoRA on the released targets, or the full
UNet), optimizer (fused AdamW, bitsandbytes AdamW8bit), gradient checkpointing (off/on) and
``torch.compile`` (off/on), one training step of LD eq. 7 (noise prediction, MSE) on random
latents and conditions, with bf16 autocast (fp32 master weights; a LoRA's frozen base in bf16),
SDPA attention (flash kernel on CUDA), channels-last memory. Reported: median step time of
``--steps`` timed steps after ``--warmup``, peak memory, and MFU = model FLOPs per step (counted
with ``torch.utils.flop_counter``: forward and backward) / step time / the device's *measured*
dense matmul rate in the same dtype (a large ``torch.matmul``, timed here).

Writes the "UNet training step" section of BENCHMARKS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import machine_description, report
from layerdiff.models.base import SDXL_UNET_CONFIG
from layerdiff.models.lora import RELEASED_LORA_TARGETS
from layerdiff.models.tiny import make_unet
from layerdiff.optim import build_optimizer

SECTION_TITLE = "## UNet training step"
GIB = 1024**3


@dataclass(frozen=True)
class Setting:
    batch_size: int
    fine_tune: str  # "lora" or "full"
    optimizer: str  # "adamw" (fused on CUDA) or "adamw8bit"
    gradient_checkpointing: bool
    compiled: bool

    def label(self) -> str:
        return (f"{self.fine_tune}, batch {self.batch_size}, {self.optimizer}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                f"compile {'on' if self.compiled else 'off'}")


def build_unet(kind: str, setting: Setting, lora_rank: int, device: torch.device) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG) if kind == "sdxl" else make_unet()
    if setting.fine_tune == "lora":
        unet.requires_grad_(False)
        unet.to(torch.bfloat16)  # the frozen base as shipped; the adapter's factors stay fp32
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(RELEASED_LORA_TARGETS)))
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if setting.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.to(device, memory_format=torch.channels_last).train()


def make_batch(unet: UNet2DConditionModel, batch_size: int, resolution: int, device: torch.device) -> dict:
    config = unet.config
    side = resolution // 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch_size, 4, side, side, device=device).to(memory_format=torch.channels_last),
        "timestep": torch.randint(0, 1000, (batch_size,), device=device),
        "encoder_hidden_states": torch.randn(batch_size, 77, config.cross_attention_dim, device=device),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch_size, pooled, device=device),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                                     dtype=torch.float32).repeat(batch_size, 1),
        },
        "target": torch.randn(batch_size, 4, side, side, device=device),
    }


def attention_kernels(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a large dense matmul in ``dtype``: the peak this device reaches in practice."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(args, setting: Setting, device: torch.device) -> dict | None:
    if setting.optimizer == "adamw8bit" and device.type != "cuda":
        return None  # bitsandbytes' 8-bit optimizer steps on CUDA; its CPU path says nothing about GPUs
    unet = build_unet(args.unet, setting, args.lora_rank, device)
    optimizer = build_optimizer(unet.parameters(), setting.optimizer, 1e-5, (0.9, 0.999), 1e-2)
    forward = torch.compile(unet) if setting.compiled else unet
    batch = make_batch(unet, setting.batch_size, args.resolution, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast, attention_kernels(device):
            prediction = forward(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"],
                                 added_cond_kwargs=batch["added_cond_kwargs"]).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(args.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - started)
    except torch.OutOfMemoryError:
        return {"setting": setting, "error": "out of memory"}
    seconds = statistics.median(times)
    memory = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"setting": setting, "seconds": seconds, "memory": memory, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--unet", choices=("sdxl", "tiny"), default="sdxl", help="SDXL's architecture or the tiny one")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--fine-tunes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--optimizers", nargs="+", choices=("adamw", "adamw8bit"), default=["adamw", "adamw8bit"])
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--lora-rank", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the matmul that measures peak FLOP/s")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()

    device = torch.device(args.device)
    peak = measured_matmul_flops(device, torch.bfloat16, args.matmul_size)
    settings = [Setting(batch, fine_tune, optimizer, checkpointing == "on", compiled == "on")
                for batch, fine_tune, optimizer, checkpointing, compiled in itertools.product(
                    args.batch_sizes, args.fine_tunes, args.optimizers, args.checkpointing, args.compile)]
    rows = []
    for setting in settings:
        result = run_setting(args, setting, device)
        if result is None:
            continue
        if "error" in result:
            rows.append(f"| {setting.label()} | {result['error']} | | | |")
            continue
        achieved = result["flops"] / result["seconds"]
        memory = f"{result['memory']:.1f} GiB" if result["memory"] is not None else "n/a"
        rows.append(f"| {setting.label()} | {result['seconds'] * 1e3:.1f} ms | {memory} | "
                    f"{achieved / 1e12:.2f} | {achieved / peak:.1%} |")
        print(rows[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    section = (
        f"{SECTION_TITLE}\n\n"
        f"`python -m benchmarks.unet_step --unet {args.unet} --resolution {args.resolution}` on "
        f"{machine_description()}: {args.unet.upper()}-architecture UNet (random init), {args.resolution} px, "
        f"bf16 autocast, SDPA{' flash' if device.type == 'cuda' else ''} attention, channels-last; LoRA rank "
        f"{args.lora_rank} on the released targets. Median of {args.steps} steps after {args.warmup} warm-up "
        f"steps. MFU against the measured bf16 matmul rate of this device, {peak / 1e12:.1f} TFLOP/s "
        f"({args.matmul_size}^3).\n\n"
        "| setting | step time | peak memory | TFLOP/s | MFU |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    report(section, write=not args.no_write)


if __name__ == "__main__":
    main()

"""Sharded training (FSDP2) on the CPU: two processes over gloo, tiny models, two steps.

Every sharded run goes through ``train.py`` with ``configs/strategy/fsdp.yaml`` stacked on a
recipe and its demo overlay; Lightning starts the second rank itself. The runs are
module-scoped fixtures shared between the assertions (each costs ~20-30 s on two cores):

* the transparent VAE, sharded: GAN terms from step 0, EMA, a checkpoint after each step;
* the same on one process (in this process), to compare losses and weights with;
* the sharded VAE resumed from its step-1 checkpoint and killed while writing ``last.ckpt``;
* the step-1 checkpoint consolidated into one file and resumed on one process;
* the latent diffusion LoRA, sharded (EMA, sampling), and resumed from step 1;
* the joint-layer LoRAs (three layers, concat sharing), sharded, and resumed from step 1.

The data make these comparisons exact in principle: every shard is a byte copy of one shard
holding exactly one batch (two 64 px samples), read in order (shuffle buffer 1), so every batch of
every rank in every run is those two samples whatever the data position.

* Sharded vs one process: each rank runs the forward, the adaptive GAN weight and the
  discriminator's BatchNorm statistics on the same batch as the single process, and FSDP
  averages two identical gradients, which is exact in floating point. The first step's
  losses are bit for bit the single process's. Gradients are not quite: FSDP2's hooks add
  autograd nodes at each unit's inputs, which changes the order in which a tensor used by
  several consumers (a resnet input feeds its convolutions, its shortcut and a skip
  connection) sums its gradient contributions, so they agree to rounding. Adam then turns
  rounding noise into whole steps where a gradient is analytically zero (a convolution bias
  right before a GroupNorm): its computed value is noise of either sign, which Adam
  normalises into a full +-lr update. So weights and optimizer moments are compared by
  relative L2 distance over all tensors together, and logged values element-wise, both
  with a tolerance (1e-3) 20-30x above the differences this produces and far below what a
  wrong gradient (another batch, a missing or doubled reduction) gives. Gradient clipping
  runs on the sharded gradients but at a norm they never reach: clipping by a norm summed
  shard by shard differs in the last bit, and the GAN's adaptive weight amplifies that
  from step to step.
* Resumed vs uninterrupted: the same computations on the same world size, bit for bit.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from layerdiff.distributed import (
    SHARDED_ENTRIES,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
)
from layerdiff.export import main as export_main
from layerdiff.formats.checkpoints import EMA_AVERAGES_KEY
from layerdiff.formats.layerdiffuse_vae import (
    DECODER_FILENAME,
    load_transparency_models,
)
from layerdiff.formats.lora import DIFFUSERS_LORA_FILENAME, read_lora
from layerdiff.formats.provenance import read_metadata
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer
from support.unets import unet_output
from train import main as train_main

pytestmark = [
    pytest.mark.slow,  # two-rank train.py runs: minutes on two cores
    pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers|LeafSpec|args parameter):"),
]

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
STEPS = 2
CHECKPOINT_EVERY = 1
# Sharded vs single process (see the module docstring): summation order, amplified by Adam.
RELATIVE_TOLERANCE = 1e-3
VAE_RECIPE = ("configs/transparent_vae.yaml", "configs/demo/transparent_vae.yaml")
LD_RECIPE = ("configs/latent_diffusion.yaml", "configs/demo/latent_diffusion.yaml")
JOINT_RECIPE = ("configs/joint_lora.yaml", "configs/demo/joint_lora.yaml")
FSDP = ("configs/strategy/fsdp.yaml",)


# -- runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_batch_shards(tmp_path_factory) -> dict[str, str]:
    """Train and validation shard lists, every shard a byte copy of one two-sample shard."""
    folder = tmp_path_factory.mktemp("shards")
    (original,) = write_tiny_shards(folder / "original", 2, per_shard=2, sizes=((64, 64),))
    copies = []
    for index in range(3):
        copies.append(folder / f"copy-{index}.tar")
        shutil.copy(original, copies[-1])
    return {"train": f"{copies[0]},{copies[1]}", "val": str(copies[2])}


def run_overlay(
    root: Path, shards: dict[str, str], model: dict, extra_callbacks: list[dict], save_last: bool = False
) -> Path:
    """A ``-c`` file for one test run: CSV metrics and a checkpoint every step, EMA. With
    ``save_last``, also ``last.ckpt``, overwritten whatever is there (no ``last-v1.ckpt``)."""
    overlay = {
        "trainer": {
            "default_root_dir": str(root),
            "max_steps": STEPS,
            "val_check_interval": STEPS,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "csv", "version": 0},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "checkpoints"),
                        "every_n_train_steps": CHECKPOINT_EVERY,
                        "save_last": save_last,
                        "enable_version_counter": False,
                        "save_top_k": -1,
                    },
                },
                {"class_path": "callbacks.EMA", "init_args": {"decay": 0.9}},
                *extra_callbacks,
            ],
        },
        "model": {"init_args": model},
        "data": {
            "init_args": {
                "train_shards": shards["train"],
                "val_shards": shards["val"],
                "batch_size": 2,
                "num_workers": 0,
                "shuffle_buffer": 1,
            }
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def train_arguments(configs: tuple[str, ...], overlay: Path, *extra: str) -> list[str]:
    """``train.py`` arguments: ``fit`` with the configs, the run's overlay last."""
    arguments = ["fit"]
    for config in (*configs, str(overlay)):
        arguments += ["-c", config]
    return [*arguments, *extra]


def sharded_command(configs: tuple[str, ...], overlay: Path, *extra: str) -> list[str]:
    """Two ranks on the CPU: Lightning starts the second itself, one thread each."""
    return [sys.executable, "train.py", *train_arguments((*configs, *FSDP), overlay, "--trainer.devices", "2", *extra)]


def train_environment() -> dict[str, str]:
    # tests/ on the path for support.crash_while_saving.CrashWhileSaving
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}


def run_sharded(configs: tuple[str, ...], overlay: Path, *extra: str) -> None:
    command = sharded_command(configs, overlay, *extra)
    result = subprocess.run(command, cwd=REPO, env=train_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def run_single_process(configs: tuple[str, ...], overlay: Path, *extra: str) -> None:
    """One process, the recipe's default strategy, in this process, on one thread as each
    sharded rank, so that kernels reduce in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main(train_arguments(configs, overlay, "--trainer.devices", "1", *extra))
    finally:
        torch.set_num_threads(threads)


def vae_model(tiny_sdxl: Path) -> dict:
    return {
        "base_model": str(tiny_sdxl),
        "decoder_block_out_channels": [8, 8, 16, 16, 16, 16, 16],
        "decoder_layers_per_block": 1,
        "discriminator_channels": 8,
        "discriminator_start_step": 0,
        "gradient_clip_norm": 1.0e6,  # clips (on sharded gradients) without changing them
    }


def checkpoint_path(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"epoch=0-step={step}.ckpt"


@pytest.fixture(scope="module")
def vae_sharded(tiny_sdxl, one_batch_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae_sharded")
    images = {"class_path": "callbacks.TransparentReconstructionImages", "init_args": {"num_images": 2}}
    construction = {"class_path": "support.recorders.ConstructionRecorder", "init_args": {"path": str(root / "construction")}}
    run_sharded(VAE_RECIPE, run_overlay(root, one_batch_shards, vae_model(tiny_sdxl), [images, construction]))
    return root


@pytest.fixture(scope="module")
def vae_single(tiny_sdxl, one_batch_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae_single")
    run_single_process(VAE_RECIPE, run_overlay(root, one_batch_shards, vae_model(tiny_sdxl), []))
    return root


@pytest.fixture(scope="module")
def vae_resumed_and_killed(tiny_sdxl, one_batch_shards, vae_sharded, tmp_path_factory) -> Path:
    """Resumed from the sharded step-1 checkpoint, with a valid ``last.ckpt`` (step 1) in its
    checkpoint folder; rank 0 is SIGKILLed while writing ``last.ckpt`` at step 2, after the
    step-2 checkpoint is complete."""
    root = tmp_path_factory.mktemp("vae_resumed")
    crash = {"class_path": "support.crash_while_saving.CrashWhileSaving", "init_args": {"step": STEPS, "save_number": 2}}
    overlay = run_overlay(root, one_batch_shards, vae_model(tiny_sdxl), [crash], save_last=True)
    shutil.copytree(checkpoint_path(vae_sharded, CHECKPOINT_EVERY), root / "checkpoints" / "last.ckpt")
    command = sharded_command(VAE_RECIPE, overlay, "--ckpt_path", str(checkpoint_path(vae_sharded, CHECKPOINT_EVERY)))
    log = root / "train.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=train_environment(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=600)
        finally:
            # rank 1, started by rank 0 in its session, may still wait in a collective for it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-4000:]
    return root


@pytest.fixture(scope="module")
def consolidated_resumed_on_one_process(tiny_sdxl, one_batch_shards, vae_sharded, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae_consolidated")
    consolidated = root / "step1.ckpt"
    assert export_main(
        ["consolidate", "--checkpoint", str(checkpoint_path(vae_sharded, CHECKPOINT_EVERY)), "--out", str(consolidated)]
    ) == 0  # fmt: skip
    overlay = run_overlay(root, one_batch_shards, vae_model(tiny_sdxl), [])
    run_single_process(VAE_RECIPE, overlay, "--ckpt_path", str(consolidated))
    return root


def ld_model(tiny_sdxl: Path, tiny_transparent_vae: Path) -> dict:
    return {
        "base_model": str(tiny_sdxl),
        "transparent_vae": str(tiny_transparent_vae),
        "lora_rank": 4,
        "warmup_steps": 1,
        "lr_schedule": "cosine",
    }


@pytest.fixture(scope="module")
def ld_sharded(tiny_sdxl, tiny_transparent_vae, one_batch_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ld_sharded")
    samples = {
        "class_path": "callbacks.TransparentSamples",
        "init_args": {"prompts": ["a cat"], "every_n_steps": 2, "settings": {"width": 64, "height": 64, "steps": 2}},
    }
    run_sharded(LD_RECIPE, run_overlay(root, one_batch_shards, ld_model(tiny_sdxl, tiny_transparent_vae), [samples]))
    return root


@pytest.fixture(scope="module")
def ld_resumed(tiny_sdxl, tiny_transparent_vae, one_batch_shards, ld_sharded, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ld_resumed")
    overlay = run_overlay(root, one_batch_shards, ld_model(tiny_sdxl, tiny_transparent_vae), [])
    run_sharded(LD_RECIPE, overlay, "--ckpt_path", str(checkpoint_path(ld_sharded, CHECKPOINT_EVERY)))
    return root


@pytest.fixture(scope="module")
def layered_shards(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("layered_shards")
    train = write_tiny_shards(folder / "train", 8, per_shard=2, sizes=((64, 64),), layers=True)
    val = write_tiny_shards(folder / "val", 2, per_shard=2, sizes=((64, 64),), layers=True)
    return {"train": ",".join(train), "val": ",".join(val)}


def joint_model(tiny_sdxl: Path, tiny_transparent_vae: Path) -> dict:
    return {"base_model": str(tiny_sdxl), "transparent_vae": str(tiny_transparent_vae), "lora_rank": 4,
            "caption_dropout": 0.5, "warmup_steps": 1}


@pytest.fixture(scope="module")
def joint_sharded(tiny_sdxl, tiny_transparent_vae, layered_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("joint_sharded")
    samples = {
        "class_path": "callbacks.LayerSamples",
        "init_args": {"prompts": [{"foreground": "a cat"}], "every_n_steps": 2,
                      "settings": {"width": 64, "height": 64, "steps": 2}},
    }
    run_sharded(JOINT_RECIPE, run_overlay(root, layered_shards, joint_model(tiny_sdxl, tiny_transparent_vae), [samples]))
    return root


@pytest.fixture(scope="module")
def joint_resumed(tiny_sdxl, tiny_transparent_vae, layered_shards, joint_sharded, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("joint_resumed")
    overlay = run_overlay(root, layered_shards, joint_model(tiny_sdxl, tiny_transparent_vae), [])
    run_sharded(JOINT_RECIPE, overlay, "--ckpt_path", str(checkpoint_path(joint_sharded, CHECKPOINT_EVERY)))
    return root


# -- reading results -----------------------------------------------------------------------


def logged_metrics(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Each logged metric's ``(step, value)`` rows from the CSV logger (rank 0's)."""
    metrics: dict[str, list[tuple[int, float]]] = {}
    with open(root / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name not in ("step", "epoch") and value:
                    metrics.setdefault(name, []).append((int(row["step"]), float(value)))
    return metrics


def read_checkpoint(path: Path) -> dict:
    return read_sharded_checkpoint(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=False)


def ema_averages(checkpoint: dict) -> dict[str, torch.Tensor]:
    (averages,) = [state[EMA_AVERAGES_KEY] for state in checkpoint["callbacks"].values() if EMA_AVERAGES_KEY in state]
    return averages


def assert_tensors(actual: dict, expected: dict, exact: bool, what: str) -> None:
    """Equal (``exact``), or within ``RELATIVE_TOLERANCE`` in L2 over all tensors together."""
    assert set(actual) == set(expected), what
    if exact:
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{what}: {key}"
        return
    difference = sum(float(((actual[key].double() - expected[key].double()) ** 2).sum()) for key in expected)
    size = sum(float((expected[key].double() ** 2).sum()) for key in expected)
    relative = (difference / size) ** 0.5
    assert relative <= RELATIVE_TOLERANCE, f"{what}: relative L2 difference {relative:.2e}"


def assert_same_training_state(actual: dict, expected: dict, exact: bool) -> None:
    assert actual["global_step"] == expected["global_step"]
    floats = {key: tensor for key, tensor in expected["state_dict"].items() if tensor.is_floating_point()}
    assert_tensors({key: actual["state_dict"][key] for key in floats}, floats, exact, "weights")
    assert set(actual["state_dict"]) == set(expected["state_dict"])
    assert_tensors(ema_averages(actual), ema_averages(expected), exact, "EMA averages")
    assert len(actual["optimizer_states"]) == len(expected["optimizer_states"])
    pairs = zip(actual["optimizer_states"], expected["optimizer_states"])
    for index, (actual_state, expected_state) in enumerate(pairs):
        assert actual_state["param_groups"] == expected_state["param_groups"]
        assert set(actual_state["state"]) == set(expected_state["state"])
        for moment in ("step", "exp_avg", "exp_avg_sq"):
            assert_tensors(
                {number: state[moment] for number, state in actual_state["state"].items()},
                {number: state[moment] for number, state in expected_state["state"].items()},
                exact or moment == "step",
                f"optimizer {index} {moment}",
            )


# -- the transparent VAE ---------------------------------------------------------------------


def test_the_sharded_vae_run_shards_its_trained_parts_and_logs_like_one_process(vae_sharded, vae_single):
    folder = checkpoint_path(vae_sharded, STEPS)
    assert is_sharded_checkpoint(folder)
    assert sorted(path.name for path in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for key in (
        "state_dict.transparent_decoder.down_blocks.0.resnets.0.conv1.weight",  # a block unit
        "state_dict.transparent_decoder.conv_out.weight",  # the decoder's root unit
        "state_dict.discriminator.main.0.weight",
        "optimizer_0.state.transparent_decoder.conv_out.weight.exp_avg",
    ):
        assert len(stored[key].chunks) == 2, f"{key} is not split across the two ranks"
    # the EMA's averages of sharded parameters are stored sharded too
    assert any(key.startswith(f"{SHARDED_ENTRIES}.") and len(value.chunks) == 2 for key, value in stored.items())
    assert not any(key.startswith("state_dict.vae.") for key in stored)
    assert sorted(path.name for path in (vae_sharded / "images").glob("*.png")) == [
        f"alpha_step{STEPS:07d}.png",
        f"reconstruction_step{STEPS:07d}.png",
    ]

    # train.py built the trained parts whole on rank 0 only; rank 1 got just its shards
    empty = {rank: json.loads((vae_sharded / "construction" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert empty == {0: [], 1: ["discriminator", "transparent_decoder", "transparent_encoder"]}

    sharded, single = logged_metrics(vae_sharded), logged_metrics(vae_single)
    logged = {"train/loss", "train/adversarial", "train/discriminator", "train/adaptive_weight", "val/alpha_mse"}
    assert logged <= set(single)
    assert set(sharded) == set(single)
    for name, rows in single.items():
        assert [step for step, _ in sharded[name]] == [step for step, _ in rows], name
        first_step = (sharded[name][0][1], rows[0][1])
        if name.startswith("train/"):
            assert first_step[0] == first_step[1], f"{name} at the first step: {first_step}"
        torch.testing.assert_close(
            torch.tensor([value for _, value in sharded[name]]), torch.tensor([value for _, value in rows]),
            rtol=RELATIVE_TOLERANCE, atol=0, msg=lambda message, name=name: f"{name}: {message}",
        )  # fmt: skip


def test_the_sharded_vae_ends_with_the_weights_ema_and_optimizer_state_of_one_process(vae_sharded, vae_single):
    sharded = read_checkpoint(checkpoint_path(vae_sharded, STEPS))
    single = read_checkpoint(checkpoint_path(vae_single, STEPS))
    assert_same_training_state(sharded, single, exact=False)


def test_a_resumed_sharded_run_continues_exactly(vae_sharded, vae_resumed_and_killed):
    resumed = read_checkpoint(checkpoint_path(vae_resumed_and_killed, STEPS))
    uninterrupted = read_checkpoint(checkpoint_path(vae_sharded, STEPS))
    assert_same_training_state(resumed, uninterrupted, exact=True)


def test_a_crash_while_saving_keeps_the_previous_checkpoint_and_leaves_nothing_that_looks_valid(
    vae_sharded, vae_resumed_and_killed
):
    checkpoints = vae_resumed_and_killed / "checkpoints"
    valid = sorted(path.name for path in checkpoints.iterdir() if is_sharded_checkpoint(path))
    assert valid == [checkpoint_path(vae_resumed_and_killed, STEPS).name, "last.ckpt"]
    last = read_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == CHECKPOINT_EVERY  # the previous last.ckpt, whole
    assert_same_training_state(last, read_checkpoint(checkpoint_path(vae_sharded, CHECKPOINT_EVERY)), exact=True)
    leftovers = [path for path in checkpoints.iterdir() if path.name.startswith(".")]
    assert [path.name for path in leftovers] == [".last.ckpt.partial"]  # the interrupted save, no meta.pt
    with pytest.raises(FileNotFoundError, match="not a complete sharded checkpoint"):
        read_sharded_checkpoint(leftovers[0])


def test_a_consolidated_checkpoint_resumes_on_one_process_as_if_trained_there(
    vae_single, consolidated_resumed_on_one_process
):
    resumed = read_checkpoint(checkpoint_path(consolidated_resumed_on_one_process, STEPS))
    single = read_checkpoint(checkpoint_path(vae_single, STEPS))
    assert_same_training_state(resumed, single, exact=False)


def test_exports_of_a_sharded_vae_checkpoint_load_strictly_into_the_released_layout(vae_sharded, tmp_path):
    folder = checkpoint_path(vae_sharded, STEPS)
    checkpoint = read_checkpoint(folder)
    averages = ema_averages(checkpoint)
    for use_ema, flag in ((True, ()), (False, ("--no-ema",))):
        out = tmp_path / ("ema" if use_ema else "raw")
        assert export_main(["transparent-vae", "--checkpoint", str(folder), "--out", str(out), *flag]) == 0
        assert read_metadata(out / DECODER_FILENAME)["component"] == "transparent_decoder"
        encoder, decoder = load_transparency_models(out)  # strict loads, shape from the file's metadata
        expected = averages if use_ema else checkpoint["state_dict"]
        for prefix, module in (("transparent_encoder.", encoder), ("transparent_decoder.", decoder)):
            for name, tensor in module.state_dict().items():
                assert torch.equal(tensor, expected[prefix + name]), prefix + name

    consolidated = tmp_path / "last.ckpt"
    assert export_main(["consolidate", "--checkpoint", str(folder), "--out", str(consolidated)]) == 0
    from layerdiff.modules import TransparentVAEModule

    module = TransparentVAEModule.load_from_checkpoint(consolidated)
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(module.state_dict()[name], tensor), name


# -- latent diffusion ------------------------------------------------------------------------


def test_the_sharded_lora_run_keeps_base_weights_out_and_samples_on_every_rank(ld_sharded):
    checkpoint = read_checkpoint(checkpoint_path(ld_sharded, STEPS))
    assert checkpoint["state_dict"] and all(".lora_" in key for key in checkpoint["state_dict"])
    assert set(ema_averages(checkpoint)) == set(checkpoint["state_dict"])
    noise_states = [generators["noise"] for generators in checkpoint["per_rank"]["generators"]]
    assert len(noise_states) == 2 and not torch.equal(*noise_states)  # both ranks' own streams
    # the sampling callback ran the sharded UNet on both ranks when training started and at step 2
    samples = sorted(path.name for path in (ld_sharded / "samples").glob("*.png"))
    assert samples == ["step_000000.png", "step_000002.png"]


def test_a_resumed_sharded_lora_run_continues_exactly(ld_sharded, ld_resumed):
    resumed = read_checkpoint(checkpoint_path(ld_resumed, STEPS))
    uninterrupted = read_checkpoint(checkpoint_path(ld_sharded, STEPS))
    assert_same_training_state(resumed, uninterrupted, exact=True)
    for resumed_rank, uninterrupted_rank in zip(resumed["per_rank"]["generators"], uninterrupted["per_rank"]["generators"]):
        assert torch.equal(resumed_rank["noise"], uninterrupted_rank["noise"])
    assert resumed["lr_schedulers"] == uninterrupted["lr_schedulers"]


def test_the_sharded_joint_run_keeps_only_the_layer_units_and_resumes_exactly(joint_sharded, joint_resumed):
    uninterrupted = read_checkpoint(checkpoint_path(joint_sharded, STEPS))
    assert uninterrupted["state_dict"] and all(".processor." in key for key in uninterrupted["state_dict"])
    assert any(".to_q_lora.2.up." in key for key in uninterrupted["state_dict"])  # the blend layer's own LoRA
    assert sorted(path.name for path in (joint_sharded / "samples").glob("*.png")) == ["step_000000.png", "step_000002.png"]
    resumed = read_checkpoint(checkpoint_path(joint_resumed, STEPS))
    assert_same_training_state(resumed, uninterrupted, exact=True)
    for resumed_rank, uninterrupted_rank in zip(resumed["per_rank"]["generators"], uninterrupted["per_rank"]["generators"]):
        assert torch.equal(resumed_rank["noise"], uninterrupted_rank["noise"])


def test_lora_and_unet_exports_of_a_sharded_checkpoint_load_into_diffusers(tiny_sdxl, ld_sharded, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    folder = checkpoint_path(ld_sharded, STEPS)
    averages = ema_averages(read_checkpoint(folder))
    assert export_main(["lora", "--checkpoint", str(folder), "--out", str(tmp_path / "lora")]) == 0
    assert export_main(["unet", "--checkpoint", str(folder), "--out", str(tmp_path / "unet")]) == 0

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    lora = read_lora(tmp_path / "lora" / DIFFUSERS_LORA_FILENAME, pipeline.unet.config)
    for module, factors in lora.items():  # lora_alpha = rank: the factors are the averages themselves
        assert torch.equal(factors.down, averages[f"unet.{module}.lora_A.layerdiff.weight"]), module
        assert torch.equal(factors.up, averages[f"unet.{module}.lora_B.layerdiff.weight"]), module
    base_output = unet_output(pipeline.unet)
    pipeline.load_lora_weights(tmp_path / "lora")
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(unet_output(fused), unet_output(pipeline.unet), rtol=0, atol=1e-5)
    assert not torch.allclose(base_output, unet_output(fused), atol=1e-6)  # the LoRA trained


# -- units, in this process (a one-rank gloo group) -------------------------------------------


@pytest.fixture
def one_rank_mesh(tmp_path):
    """FSDP2 over a one-rank mesh: the unit layout ``parallelize`` builds, without spawning."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_lora_block_is_one_unit_of_its_factors_while_base_weights_stay_whole(tiny_sdxl, one_rank_mesh):
    from diffusers.models.attention import BasicTransformerBlock
    from peft import LoraConfig
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from layerdiff.distributed import ShardingSettings, parallelize
    from layerdiff.models.base import load_unet
    from layerdiff.models.lora import DEFAULT_ADAPTER as LORA_ADAPTER
    from layerdiff.models.lora import RELEASED_LORA_TARGETS
    from layerdiff.optim import build_optimizer

    unet = load_unet(str(tiny_sdxl)).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, target_modules=list(RELEASED_LORA_TARGETS)), adapter_name=LORA_ADAPTER)
    names = [name for name, _ in unet.named_parameters()]
    parallelize([unet], one_rank_mesh, ShardingSettings(activation_checkpointing=True, compile=False))

    assert [name for name, _ in unet.named_parameters()] == names  # no wrapper in any name
    for name, parameter in unet.named_parameters():
        assert isinstance(parameter, DTensor) == parameter.requires_grad, name
    blocks = [module for module in unet.modules() if isinstance(module, BasicTransformerBlock)]
    assert blocks and isinstance(unet, FSDPModule)
    for block in blocks:
        assert not isinstance(block, FSDPModule)  # its base weights are no unit's
        factors = [module for module in block.modules() if isinstance(module, FSDPModule)]
        assert len(factors) == 2 * len(RELEASED_LORA_TARGETS)  # lora_A and lora_B of each projection
        assert len({id(module._get_fsdp_state()) for module in factors}) == 1  # gathered together

    unet_output(unet, grad=True).square().mean().backward()
    for name, parameter in unet.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name

    with pytest.raises(ValueError, match="adamw8bit.*sharded"):
        build_optimizer(unet.parameters(), "adamw8bit", 1e-4, (0.9, 0.999), 0.0)


def test_a_module_with_frozen_and_trainable_parameters_of_its_own_is_refused(one_rank_mesh):
    from diffusers.models.resnet import ResnetBlock2D

    from layerdiff.distributed import ShardingSettings, parallelize

    part = torch.nn.Sequential(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4))
    part[0].conv1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="conv1 holds frozen and trainable parameters"):
        parallelize([part], one_rank_mesh, ShardingSettings())


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_bf16_units_keep_float32_gradients_with_a_discriminator_frozen_at_its_first_forward(
    tiny_sdxl, one_rank_mesh, norm
):
    """The CUDA setting (bf16 gathered parameters, float32 reduction), here on the CPU, with
    the discriminator frozen during its first forward as Lightning's toggle_optimizer does
    in the generator step. Cast to bf16, a BatchNorm discriminator would fail on its float32
    running statistics, and a GroupNorm one on bf16 gradients FSDP2 assigns to float32
    parameters; in its own dtype, both train."""
    from torch.distributed.tensor import DTensor

    from layerdiff import losses
    from layerdiff.distributed import ShardingSettings, parallelize
    from layerdiff.modules import TransparentVAEModule

    module = TransparentVAEModule(**vae_model(tiny_sdxl), discriminator_norm=norm)
    generator = [module.transparent_encoder, module.transparent_decoder]
    discriminator = [module.discriminator]
    parallelize([*generator, *discriminator], one_rank_mesh, ShardingSettings(param_dtype=torch.bfloat16), discriminator)
    rgb, alpha = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()

    module.discriminator.requires_grad_(False)  # the generator step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruction = module.reconstruct(rgb, alpha)
        fake = torch.cat([reconstruction["alpha"], reconstruction["rgb"]], dim=1)
        losses.generator_adversarial_loss(module.discriminator(fake * 2 - 1)).backward()
    module.discriminator.requires_grad_(True)  # the discriminator step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = torch.cat([alpha, rgb], dim=1)
        real_logits, fake_logits = module.discriminator(real * 2 - 1), module.discriminator(fake.detach() * 2 - 1)
    losses.hinge_discriminator_loss(real_logits, fake_logits).backward()

    for part in (*generator, module.discriminator):
        for name, parameter in part.named_parameters():
            assert isinstance(parameter, DTensor) and parameter.dtype == torch.float32, name
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name


# -- sharded construction ----------------------------------------------------------------------


def test_under_sharded_construction_only_a_nodes_first_process_builds_the_trained_parts(tiny_sdxl, monkeypatch,
                                                                                       tmp_path):
    from torch.utils.data import DataLoader

    from layerdiff.distributed import (
        FSDP2Strategy,
        is_sharding_strategy,
        sharded_construction,
    )
    from layerdiff.modules import TransparentVAEModule

    def trained_and_frozen(module):
        trained = [module.transparent_encoder, module.transparent_decoder, module.discriminator]
        tensors = [tensor for part in trained for tensor in (*part.parameters(), *part.buffers())]
        return tensors, list(module.vae.parameters())

    monkeypatch.setenv("LOCAL_RANK", "1")  # as Lightning's launcher sets it for the second process
    trained, frozen = trained_and_frozen(TransparentVAEModule(**vae_model(tiny_sdxl)))
    assert not any(tensor.is_meta for tensor in trained + frozen)  # outside the context: whole
    with sharded_construction():
        module = TransparentVAEModule(**vae_model(tiny_sdxl))
    trained, frozen = trained_and_frozen(module)
    assert trained and all(tensor.is_meta for tensor in trained)
    assert not any(parameter.is_meta for parameter in frozen)  # frozen weights stay whole everywhere

    trainer = quiet_trainer(tmp_path, max_steps=1)
    expected = r"built on the meta device.*--trainer.strategy layerdiff.distributed.FSDP2Strategy"
    with pytest.raises(ValueError, match=expected):
        trainer.fit(module, train_dataloaders=DataLoader([{"rgb": torch.rand(3, 64, 64)}]))

    monkeypatch.setenv("LOCAL_RANK", "0")
    with sharded_construction():
        trained, _ = trained_and_frozen(TransparentVAEModule(**vae_model(tiny_sdxl)))
    assert not any(tensor.is_meta for tensor in trained)  # the node's first process: rank 0 sends from it

    assert is_sharding_strategy("layerdiff.distributed.FSDP2Strategy") and is_sharding_strategy(FSDP2Strategy())
    assert not is_sharding_strategy("ddp") and not is_sharding_strategy("lightning.pytorch.strategies.DDPStrategy")

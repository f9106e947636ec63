"""Shared fixtures and the GPU skip hook for the CPU test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from layerdiff.models.tiny import build_tiny_sdxl
from support.shards import write_tiny_shards
from support.slurm_cluster import (
    SKIP_VARIABLE,
    SlurmCluster,
    missing_programs,
    start_cluster,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without CUDA (development and CI)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the embedded tiny SDXL model (seed 0), built once per session; do not modify."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_transparent_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export folder of an untrained transparency encoder and a narrow decoder (the released
    file format), for objectives that build on a trained transparent VAE; do not modify."""
    from layerdiff.formats.layerdiffuse_vae import save_transparent_vae
    from layerdiff.models.transparency import (
        LatentTransparencyEncoder,
        TransparencyDecoder,
    )

    torch.manual_seed(0)
    encoder = LatentTransparencyEncoder()
    # The released encoder starts at a zero offset; a small random last layer makes the
    # adjusted latent differ from the plain one, as after training.
    torch.nn.init.normal_(encoder.blocks[-1].weight, std=1e-2)
    decoder = TransparencyDecoder(block_out_channels=(8, 8, 16, 16, 16, 16, 16))
    folder = tmp_path_factory.mktemp("transparent_vae")
    save_transparent_vae(encoder, decoder, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD1.5-layout model (one text encoder, no added conditions) from the tiny SDXL's
    VAE, first text encoder and tokenizer plus a matching tiny UNet; do not modify."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        cross_attention_dim=sdxl.text_encoder.config.hidden_size,
    )
    pipeline = StableDiffusionPipeline(
        vae=sdxl.vae,
        text_encoder=sdxl.text_encoder,
        tokenizer=sdxl.tokenizer,
        unet=unet,
        scheduler=sdxl.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-sd15"
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two shards of 4 training samples (one per rank of a two-rank run) and one of 2 validation
    samples, 64 px, comma-joined as ``train_shards``/``val_shards`` take them; do not modify."""
    root = tmp_path_factory.mktemp("preemption_shards")
    train = write_tiny_shards(root / "train", 8, per_shard=4, sizes=((64, 64),))
    val = write_tiny_shards(root / "val", 2, per_shard=2, sizes=((64, 64),))
    return {"train": ",".join(train), "val": ",".join(val)}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real one-node SLURM cluster on loopback (``tests/support/slurm_cluster.py``), started once per
    session and stopped at its end. Skipped only when ``LAYERDIFF_SKIP_SLURM_TESTS=1``."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the SLURM tests are skipped on this machine")
    missing = missing_programs()
    if missing or os.geteuid() != 0:
        problem = f"{', '.join(missing)} missing" if missing else "SLURM's daemons run as root, this user is not"
        pytest.fail(
            f"The SLURM tests need slurm-wlm and munge ({problem}): run `bash scripts/test_packages.sh slurm` as root "
            f"(scripts/test.sh does), or set {SKIP_VARIABLE}=1 to skip them."
        )
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing test that used the SLURM cluster shows its jobs' output and the daemons' logs."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("slurm_cluster")
    if report.failed and cluster is not None:
        report.sections.append(("SLURM job output", cluster.job_outputs()))
        report.sections.append(("SLURM daemon logs", cluster.logs()))

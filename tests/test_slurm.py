"""SLURM submissions on a real one-node cluster on loopback (``slurm_cluster`` fixture): the
CPU sbatch template trains the tiny model on two tasks (DDP over gloo) to the end; a job
preempted with ``scancel --signal=USR1`` checkpoints, requeues itself, resumes at the saved
step and ends with the weights of the uninterrupted job; a job cancelled with a plain
``scancel`` (SIGTERM to every process of the job) still saves and exits 143."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from support.contracts import assert_identical
from support.runs import run_environment, saved_step, tiny_fit_arguments
from support.slurm_cluster import ClusterError, SlurmCluster

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "scripts" / "slurm" / "train_cpu.sbatch"
MAX_STEPS = 5
# each rank has 4 samples: 2 batches per epoch, so step 3 is in the middle of the second epoch
PREEMPT_AT_STEP = 3

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def submit_training(
    cluster: SlurmCluster,
    tiny_sdxl: Path,
    shards: dict[str, str],
    root: Path,
    *extra: str,
    hold_at_step: int | None = None,
) -> str:
    return cluster.submit(
        TEMPLATE,
        *tiny_fit_arguments(tiny_sdxl, shards, root, max_steps=MAX_STEPS, hold_at_step=hold_at_step),
        *extra,
        output=root / "job.out",
        cwd=REPO,
        environment={**run_environment(), "SLURM_CONF": str(cluster.config), "PYTHON": sys.executable},
    )


def start_steps(root: Path) -> dict[str, int]:
    """``start-rank<r>-run<n>`` -> the global step run ``n`` of the job started training at."""
    return {path.stem: int(path.read_text()) for path in sorted((root / "probe").glob("start-*.txt"))}


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tiny_sdxl, tiny_vae_shards, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """The reference job: the tiny run trained to MAX_STEPS without a signal; an extra
    ModelCheckpoint keeps its state at PREEMPT_AT_STEP in ``periodic/``."""
    root = tmp_path_factory.mktemp("uninterrupted")
    periodic = (
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'periodic'}",
        f"--trainer.callbacks.every_n_train_steps={PREEMPT_AT_STEP}",
        "--trainer.callbacks.save_top_k=-1",
    )
    job = submit_training(slurm_cluster, tiny_sdxl, tiny_vae_shards, root, *periodic)
    return root, job, slurm_cluster.wait_for(job, {"COMPLETED"}, timeout=300)


def test_a_two_task_cpu_job_trains_to_the_end(uninterrupted):
    root, job, record = uninterrupted
    assert record["ExitCode"] == "0:0" and record["Restarts"] == "0"
    output = (root / "job.out").read_text()
    assert f"[slurm] job {job}, run 1: 1 node(s) x 2 task(s)" in output
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert start_steps(root) == {"start-rank0-run0": 0, "start-rank1-run0": 0}
    assert saved_step(root / "checkpoints" / "last.ckpt") == MAX_STEPS


def test_a_job_preempted_with_usr1_checkpoints_requeues_resumes_and_ends_like_the_uninterrupted_one(
    slurm_cluster, tiny_sdxl, tiny_vae_shards, uninterrupted, tmp_path
):
    root = tmp_path / "preempted"
    job = submit_training(slurm_cluster, tiny_sdxl, tiny_vae_shards, root, hold_at_step=PREEMPT_AT_STEP)
    wait_until_holding(slurm_cluster, job, root / "probe" / "holding", timeout=240)
    slurm_cluster.signal(job, "USR1")
    record = slurm_cluster.wait_for(job, {"COMPLETED"}, timeout=300)

    assert record["Restarts"] == "1" and record["ExitCode"] == "0:0", record
    output = (root / "job.out").read_text()
    assert f"Preemption: SIGUSR1 received; saved step {PREEMPT_AT_STEP}" in output
    assert f"Preemption: requeued SLURM job {job}" in output
    assert f"[slurm] job {job}, run 2:" in output
    assert "Traceback" not in output
    assert start_steps(root) == {
        "start-rank0-run0": 0, "start-rank1-run0": 0,
        "start-rank0-run1": PREEMPT_AT_STEP, "start-rank1-run1": PREEMPT_AT_STEP,
    }, "the requeued run resumes at the saved step on every rank"  # fmt: skip
    assert saved_step(root / "checkpoints" / "last.ckpt") == MAX_STEPS
    assert len(list((root / "wandb").glob(f"offline-run-*-slurm-{job}"))) == 2, "both runs log to the job's W&B run id"

    # The preemption checkpoint is the uninterrupted run's state at that step, bit for bit.
    saved = load(root / "probe" / "resumed-from-run1.ckpt")
    reference = load(next((uninterrupted[0] / "periodic").glob(f"*step={PREEMPT_AT_STEP}.ckpt")))
    for part in ("global_step", "state_dict", "optimizer_states", "loops", "per_rank", "ShardDataModule"):
        assert_identical(saved[part], reference[part], part)
    # ...and the resumed run ends with the uninterrupted run's weights, bit for bit.
    expected = load(uninterrupted[0] / "checkpoints" / "last.ckpt")
    actual = load(root / "checkpoints" / "last.ckpt")
    assert_identical(actual["state_dict"], expected["state_dict"], "final weights")



def test_a_job_cancelled_with_sigterm_saves_its_step_and_exits_143(
    slurm_cluster, tiny_sdxl, tiny_vae_shards, tmp_path
):
    root = tmp_path / "cancelled"
    job = submit_training(slurm_cluster, tiny_sdxl, tiny_vae_shards, root, hold_at_step=PREEMPT_AT_STEP)
    wait_until_holding(slurm_cluster, job, root / "probe" / "holding", timeout=240)
    slurm_cluster.command("scancel", job)
    record = slurm_cluster.wait_for(job, {"CANCELLED"}, timeout=60)
    output = (root / "job.out").read_text()
    # the DataLoader workers got the SIGTERM too, and kept serving batches until the save
    assert "DataLoader worker" not in output, output[-3000:]
    assert f"Preemption: SIGTERM received; saved step {PREEMPT_AT_STEP}" in output
    assert record["ExitCode"] == "143:0", record  # 128 + SIGTERM, from the tasks through srun
    assert saved_step(root / "checkpoints" / "last.ckpt") == PREEMPT_AT_STEP
    assert record["Restarts"] == "0"


def wait_until_holding(cluster: SlurmCluster, job: str, marker: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        state = cluster.job(job)["JobState"]
        if state not in {"PENDING", "CONFIGURING", "RUNNING"}:
            raise ClusterError(f"job {job} is {state} before reaching step {PREEMPT_AT_STEP}")
        if time.monotonic() > deadline:
            raise ClusterError(f"job {job} did not reach step {PREEMPT_AT_STEP} within {timeout:.0f} s")
        time.sleep(0.2)

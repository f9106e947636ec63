#!/usr/bin/env bash
# The body of the sbatch templates beside it, which set the resources and run it as
#   ACCELERATOR=gpu|cpu bash scripts/slurm/launch.sh <train.py fit arguments>
# in the directory sbatch was called from (the repository root). srun starts one
# `train.py fit` task per GPU (per task slot on CPUs) on every node; Lightning's
# SLURMEnvironment reads ranks and the rendezvous from SLURM's variables. The SLURM overlay
# goes last and `--ckpt_path last` resumes from the newest last.ckpt in the run's checkpoint
# folder (none yet: a fresh start), so the first run and every requeued run of the job are
# this same command.
#   PYTHON   the interpreter (default: the repository's .venv from scripts/setup.sh)
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?launch.sh runs inside an sbatch job}"
: "${ACCELERATOR:?set ACCELERATOR=gpu or cpu}"
: "${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node (one task per GPU), which Lightning reads}"
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || { echo "[slurm] no Python at $python: run scripts/setup.sh on the cluster or set PYTHON" >&2; exit 2; }
export PYTHONUNBUFFERED=1  # logs reach the job's output file before a preemption, not after
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "[slurm] job ${SLURM_JOB_ID}, run $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE} task(s) on ${SLURM_JOB_NODELIST}"
# --kill-on-bad-exit: a rank that fails ends the others instead of leaving them in a collective
exec srun --kill-on-bad-exit=1 "$python" train.py fit "$@" \
  -c configs/cluster/slurm.yaml \
  --trainer.accelerator "$ACCELERATOR" \
  --trainer.num_nodes "$SLURM_NNODES" \
  --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  --ckpt_path last

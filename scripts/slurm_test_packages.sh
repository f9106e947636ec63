#!/usr/bin/env bash
# Install what tests/test_slurm.py needs to start a real one-node SLURM cluster on loopback:
# Debian's slurm-wlm (slurmctld, slurmd, sbatch, srun, scontrol, scancel) and munge.
# Called by scripts/test.sh. Does nothing when the programs are there already; otherwise
# installs them with apt-get (as root), updating the package lists only if the install
# needs it.
#
# Machines without root (or without apt-get) and without these programs: set
# LAYERDIFF_SKIP_SLURM_TESTS=1 to skip the SLURM tests (they are then reported as skipped,
# with this reason) instead of failing here.
set -euo pipefail

if [ "${LAYERDIFF_SKIP_SLURM_TESTS:-0}" = 1 ]; then
  echo "[slurm] LAYERDIFF_SKIP_SLURM_TESTS=1: the SLURM tests will be skipped"
  exit 0
fi

programs=(slurmctld slurmd sbatch srun scontrol scancel squeue munged mungekey)
missing=()
for program in "${programs[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
[ ${#missing[@]} -eq 0 ] && exit 0

cannot() {
  echo "[slurm] error: the SLURM tests need ${missing[*]} (Debian packages slurm-wlm and munge), and $1." >&2
  echo "[slurm] Install them (as root: apt-get install slurm-wlm munge), or set LAYERDIFF_SKIP_SLURM_TESTS=1" >&2
  echo "[slurm] to skip the SLURM tests on this machine." >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || cannot "this user is not root, so they cannot be installed here"
command -v apt-get >/dev/null 2>&1 || cannot "there is no apt-get here to install them with"

echo "[slurm] installing slurm-wlm and munge for the SLURM tests (missing: ${missing[*]})"
install=(apt-get install -y -qq --no-install-recommends slurm-wlm munge)
export DEBIAN_FRONTEND=noninteractive
# The packages' scripts try to start the system services; the tests run their own daemons.
if ! "${install[@]}" >/tmp/layerdiff-slurm-apt.log 2>&1; then
  apt-get update -qq >>/tmp/layerdiff-slurm-apt.log 2>&1 || true
  "${install[@]}" >>/tmp/layerdiff-slurm-apt.log 2>&1 \
    || { tail -20 /tmp/layerdiff-slurm-apt.log >&2; cannot "apt-get could not install them (log above, all of it in /tmp/layerdiff-slurm-apt.log)"; }
fi
for program in "${missing[@]}"; do
  command -v "$program" >/dev/null 2>&1 || cannot "$program is still missing after installing slurm-wlm and munge"
done
echo "[slurm] installed"

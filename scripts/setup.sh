#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with layerdiff installed
# in editable mode. Sourced by demo.sh and test.sh; safe to run again (it only reinstalls
# when pyproject.toml changed).
#
# torch: on a machine without an NVIDIA GPU we install torch 2.13.0 before anything else
# pulls in torch, because an unpinned torch resolves to a multi-GB CUDA build. Set
# LAYERDIFF_TORCH_INDEX to a wheel index (e.g. PyTorch's CPU index) where the plain
# package registry would give you a CUDA build.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LAYERDIFF_VENV:-$repo_root/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.layerdiff-installed"
if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ]; then
  pip_install=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch build"
      "${pip_install[@]}" "torch>=2.4"
    else
      echo "[setup] no GPU: installing the CPU build of torch 2.13.0"
      "${pip_install[@]}" ${LAYERDIFF_TORCH_INDEX:+--index-url "$LAYERDIFF_TORCH_INDEX"} "torch==2.13.0"
    fi
  fi
  echo "[setup] installing layerdiff and its dependencies (a minute on first run)"
  "${pip_install[@]}" -e "$repo_root[test]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"

#!/usr/bin/env bash
# The main job on the embedded default (README command 1): tiny SDXL-shaped model + OpenMoji
# demo shards, on the CPU. Sets everything up itself; pictures land in outputs/demo/.
#   bash scripts/demo.sh                       # extra arguments override the recipe, e.g.
#   bash scripts/demo.sh --trainer.max_steps 100
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo_root/scripts/setup.sh"
cd "$repo_root"
exec python scripts/demo.py "$@"

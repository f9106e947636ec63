#!/usr/bin/env bash
# The test suite on the CPU (README command 2). Sets everything up itself.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k data -x      # extra arguments go to pytest
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo_root/scripts/setup.sh"
cd "$repo_root"
exec python -m pytest -q -p no:cacheprovider --timeout 900 "$@" tests

#!/usr/bin/env bash
# The test suite on the CPU (README command 2). Sets everything up itself.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k data -x      # extra arguments go to pytest
# The SLURM tests start a real one-node cluster: slurm-wlm and munge are installed when missing
# (as root); LAYERDIFF_SKIP_SLURM_TESTS=1 skips those tests on machines that cannot. Likewise chromium
# and chromium-driver for the headless-browser tests of the report and the review page
# (LAYERDIFF_SKIP_BROWSER_TESTS=1 skips them).
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo_root/scripts/setup.sh"
bash "$repo_root/scripts/test_packages.sh" slurm
bash "$repo_root/scripts/test_packages.sh" browser
cd "$repo_root"
exec python -m pytest -q -p no:cacheprovider --timeout 900 "$@" tests

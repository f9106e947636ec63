#!/usr/bin/env bash
# Install the system programs a group of tests needs, when they are missing:
#   bash scripts/test_packages.sh slurm     # tests/test_slurm.py: a real one-node SLURM cluster on loopback
#   bash scripts/test_packages.sh browser   # tests/test_report.py, tests/test_review.py: pages in headless chromium
#                                           # (the review page driven through chromium-driver)
# Called by scripts/test.sh. Does nothing when the programs are there already; otherwise installs
# the Debian packages with apt-get (as root), updating the package lists only if the install needs it.
#
# Machines without root (or without apt-get) and without these programs: set the group's skip
# variable (LAYERDIFF_SKIP_SLURM_TESTS=1, LAYERDIFF_SKIP_BROWSER_TESTS=1) to skip those tests (they
# are then reported as skipped, with the reason) instead of failing here.
set -euo pipefail

group=${1:?"usage: $0 slurm|browser"}
case "$group" in
  slurm)
    tests="the SLURM tests"; skip_variable=LAYERDIFF_SKIP_SLURM_TESTS
    packages=(slurm-wlm munge)
    programs=(slurmctld slurmd sbatch srun scontrol scancel squeue munged mungekey) ;;
  browser)
    tests="the headless-browser tests (report, review page)"; skip_variable=LAYERDIFF_SKIP_BROWSER_TESTS
    packages=(chromium chromium-driver)
    programs=(chromium chromedriver) ;;
  *) echo "usage: $0 slurm|browser (not '$group')" >&2; exit 2 ;;
esac

if [ "${!skip_variable:-0}" = 1 ]; then
  echo "[$group] $skip_variable=1: $tests will be skipped"
  exit 0
fi

missing=()
for program in "${programs[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
[ ${#missing[@]} -eq 0 ] && exit 0

log=/tmp/layerdiff-$group-apt.log
cannot() {
  echo "[$group] error: $tests need ${missing[*]} (Debian packages ${packages[*]}), and $1." >&2
  echo "[$group] Install them (as root: apt-get install ${packages[*]}), or set $skip_variable=1" >&2
  echo "[$group] to skip $tests on this machine." >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || cannot "this user is not root, so they cannot be installed here"
command -v apt-get >/dev/null 2>&1 || cannot "there is no apt-get here to install them with"

echo "[$group] installing ${packages[*]} for $tests (missing: ${missing[*]})"
install=(apt-get install -y -qq --no-install-recommends "${packages[@]}")
export DEBIAN_FRONTEND=noninteractive
# The packages' scripts may try to start system services; the tests run their own.
if ! "${install[@]}" >"$log" 2>&1; then
  apt-get update -qq >>"$log" 2>&1 || true
  "${install[@]}" >>"$log" 2>&1 \
    || { tail -20 "$log" >&2; cannot "apt-get could not install them (log above, all of it in $log)"; }
fi
for program in "${missing[@]}"; do
  command -v "$program" >/dev/null 2>&1 || cannot "$program is still missing after installing ${packages[*]}"
done
echo "[$group] installed"

"""The one way the tests run ``train.py`` in another process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def train_py_environment(**extra: str) -> dict[str, str]:
    """The caller's environment plus: ``tests/`` importable (for ``support.callbacks`` and the
    probes), W&B offline and quiet, one thread per process (several may share two cores)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def train_py_command(*arguments: str) -> list[str]:
    return [sys.executable, "train.py", *arguments]


def start_train_py(*arguments: str, **environment: str) -> subprocess.Popen:
    """``train.py`` running in the background, stdout and stderr merged into ``.stdout``."""
    return subprocess.Popen(train_py_command(*arguments), cwd=REPO, env=train_py_environment(**environment),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_train_py(*arguments: str, timeout: float = 600, check: bool = True, **environment: str) -> subprocess.CompletedProcess:
    """``train.py`` to its end; with ``check`` a non-zero exit fails the test with its output's tail."""
    result = subprocess.run(train_py_command(*arguments), cwd=REPO, env=train_py_environment(**environment),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def data_cli_command(*arguments: str) -> list[str]:
    """``python -m data ...`` (the shard tools) as a user types it, from the repository root."""
    return [sys.executable, "-m", "data", *arguments]


def start_data_cli(*arguments: str, log: Path, **environment: str) -> subprocess.Popen:
    """``python -m data`` running in the background, stdout and stderr into the file ``log`` (a
    pipe nobody reads would stall it once full)."""
    with open(log, "w") as handle:
        return subprocess.Popen(data_cli_command(*arguments), cwd=REPO, env=train_py_environment(**environment),
                                stdout=handle, stderr=subprocess.STDOUT, text=True)

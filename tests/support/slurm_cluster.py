"""A real one-node SLURM cluster on loopback for the tests: its own munged, slurmctld and
slurmd, with configuration, keys, state, spool, logs and sockets in one temporary folder,
so nothing of the machine's own SLURM or munge set-up is used or changed.

Needs Debian's ``slurm-wlm`` and ``munge`` (``scripts/test_packages.sh slurm`` installs them)
and root: munged and slurmd run as root here, as on a compute node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
SKIP_VARIABLE = "LAYERDIFF_SKIP_SLURM_TESTS"
FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}  # fmt: skip


class ClusterError(RuntimeError):
    """The test cluster did not start or a job did not reach the expected state; the message
    carries the daemons' log tails."""


def missing_programs() -> list[str]:
    return [program for program in PROGRAMS if shutil.which(program) is None]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class SlurmCluster:
    """Handle on the running cluster: submit jobs, query and signal them, read their output."""

    root: Path
    node: str
    cpus: int
    pid_files: list[Path] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)  # job id -> its output file

    @property
    def config(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def environment(self) -> dict[str, str]:
        """The caller's environment with ``SLURM_CONF`` pointing at this cluster (for sbatch,
        scontrol, ... and for the jobs, which inherit it)."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        return {**environment, "SLURM_CONF": str(self.config)}

    def command(self, *arguments: str, check: bool = True, timeout: float = 30) -> str:
        result = subprocess.run(
            arguments, env=self.environment, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            problem = f"{' '.join(arguments)} failed ({result.returncode}): {result.stderr.strip()}"
            raise ClusterError(f"{problem}\n{self.logs()}")
        return result.stdout

    def submit(self, script: Path, *arguments: str, output: Path, cwd: Path, environment: dict[str, str]) -> str:
        """``sbatch --parsable --output=<output> script [arguments]`` from ``cwd`` (the job's
        submit directory) with ``environment``, which sbatch passes on to the job (it needs
        ``SLURM_CONF`` from :attr:`environment`); returns the job id."""
        output.parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create it: the job would fail at once
        command = ["sbatch", "--parsable", f"--output={output}", str(script), *arguments]
        result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"{' '.join(command)} failed: {result.stderr.strip()}\n{self.logs()}")
        job_id = result.stdout.strip().split(";")[0]
        self.outputs[job_id] = output
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record from ``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = {}
        for item in self.command("scontrol", "show", "job", "-o", job_id).split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for(self, job_id: str, states: set[str], timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of ``states`` and, for a finished state, all its processes
        have ended (squeue lists it no more); fails early if it finished otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            state = record["JobState"]
            if state in states and not (state in FINISHED_STATES and self._listed(job_id)):
                return record
            if state in FINISHED_STATES:
                raise ClusterError(f"job {job_id} ended {state}, expected {sorted(states)}: {record}")
            if time.monotonic() > deadline:
                problem = f"job {job_id} still {state} after {timeout:.0f} s, expected {sorted(states)}: {record}"
                raise ClusterError(f"{problem}\n{self.logs()}")
            time.sleep(poll)

    def _listed(self, job_id: str) -> bool:
        """squeue shows the job: pending, running, or still ending its processes (COMPLETING)."""
        return bool(self.command("squeue", "--noheader", "--jobs", job_id, check=False).strip())

    def signal(self, job_id: str, signal_name: str) -> None:
        """``scancel --signal=<name> job``: the signal goes to every process of the job's steps
        (the tasks), not to the batch script, as SLURM's ``--signal`` does near the time limit."""
        self.command("scancel", f"--signal={signal_name}", job_id)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (tail)\n{_tail(self.root / name)}" for name in ("slurmctld.log", "slurmd.log", "munged.log")
        )

    def job_outputs(self, lines: int = 80) -> str:
        """The tails of every submitted job's output file, for failure reports."""
        return "\n".join(
            f"--- job {job_id}: {path} (tail)\n{_tail(path, lines)}" for job_id, path in self.outputs.items()
        )

    def stop(self) -> None:
        """Stop the daemons by their pid files (slurmd, slurmctld, then munged)."""
        for pid_file in reversed(self.pid_files):
            if not pid_file.is_file():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, 9)


def start_cluster(root: Path, cpus: int = 2) -> SlurmCluster:
    """Write the configuration into ``root`` and start munged, slurmctld and slurmd; returns
    once the node is idle. The caller stops the cluster with :meth:`SlurmCluster.stop`."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir(mode=0o755, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(root=root, node=node, cpus=cpus)
    munge_socket = root / "munge" / "munge.socket"
    controller_port, node_port = _free_ports(2)
    cluster.config.write_text(
        "\n".join(
            [
                "ClusterName=layerdiff-test",
                f"SlurmctldHost={node}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                "MailProg=/bin/true",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # a requeued job waits cred_expire seconds (default 120) before it may start again
                f"AuthInfo=socket={munge_socket},cred_expire=5",
                f"SlurmctldPort={controller_port}",
                f"SlurmdPort={node_port}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/builtin",
                "SchedulerParameters=sched_interval=1",
                "MpiDefault=none",
                "SwitchType=switch/none",
                "ReturnToService=2",
                # preemption-safe training requeues its own job (`scontrol requeue`)
                "JobRequeue=1",
                # short waits between SIGTERM and SIGKILL and before a slot is reused keep tests fast
                "KillWait=10",
                "MinJobAge=600",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    key = root / "munge" / "munge.key"
    daemons = [
        (["mungekey", "--create", "--force", f"--keyfile={key}"], None),
        (
            [
                "munged", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
            root / "munged.pid",
        ),
        (["slurmctld", "-c", "-f", str(cluster.config)], root / "slurmctld.pid"),
        (["slurmd", "-f", str(cluster.config)], root / "slurmd.pid"),
    ]  # fmt: skip
    try:
        for command, pid_file in daemons:
            result = subprocess.run(command, env=cluster.environment, capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                problem = f"{command[0]} did not start ({result.returncode}): {result.stderr.strip()}"
                raise ClusterError(f"{problem}\n{cluster.logs()}")
            if pid_file is not None:
                cluster.pid_files.append(pid_file)
                _wait_for_file(pid_file, cluster)
        _wait_for_idle_node(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_file(path: Path, cluster: SlurmCluster, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ClusterError(f"{path.name} did not appear within {timeout:.0f} s\n{cluster.logs()}")
        time.sleep(0.1)


def _wait_for_idle_node(cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["sinfo", "--noheader", "--format=%T", "--nodes", cluster.node],
            env=cluster.environment, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        state = result.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.2)
    problem = f"node {cluster.node} is {state or 'unknown'}, not idle, after {timeout:.0f} s"
    raise ClusterError(f"{problem}\n{cluster.logs()}")

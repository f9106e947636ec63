"""Stop safely on SIGUSR1 (SLURM's warning before the time limit; requeue) or SIGTERM: one
checkpoint at a batch boundary that every rank agrees on, then a clean stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from layerdiff.compat import last_saved_step, save_last_checkpoint, skip_next_validation

log = logging.getLogger(__name__)

STOP_SIGNAL = signal.SIGTERM


class Preemption(Checkpoint):
    """Saves a resumable checkpoint and stops when the process is signalled; on the requeue
    signal it also requeues the SLURM job, so the same ``sbatch`` command continues the run.

    Lightning's own ``SLURMEnvironment(auto_requeue=True)`` saves *inside* the signal handler,
    i.e. wherever the signal interrupts the step, and each rank at its own point: the
    checkpoint mixes states, and ranks that save while others run a collective deadlock.
    Here the handler only records the signal, and:

    1. after every optimizer step (the end of a batch that stepped; never inside gradient
       accumulation) all ranks all-reduce a two-flag tensor, so they agree on the same step
       even when the signal reaches them at different times, or only one of them (a local
       ``kill`` of rank 0);
    2. at that step all ranks save one checkpoint through the trainer's ``ModelCheckpoint``:
       its ``last.ckpt``, which ``--ckpt_path last`` resumes from (see below); nothing later in
       the run overwrites it (the validation Lightning runs when a run stops early is skipped);
    3. the run stops (``trainer.should_stop``; ``min_steps``/``min_epochs`` give way);
    4. at the end of ``fit`` the W&B run is finished (W&B's service is a separate process,
       which SLURM signals along with the job), the signal handlers from before are put back, and
       on the requeue signal rank 0 runs ``scontrol requeue <job>`` (array jobs:
       ``<array job>_<task>``) as the very last step, because SLURM ends the job right after.

    Signals arriving during validation, sanity checking or a checkpoint save take effect at
    the next optimizer step (the save or validation in progress completes); a second signal
    changes nothing. Signals before ``fit`` reaches ``setup`` (imports, model construction)
    still have their default effect: nothing is trained yet.

    Why ``last.ckpt`` and not Lightning's ``hpc_ckpt_<n>.ckpt``: ``--ckpt_path last`` picks
    the newest of the ModelCheckpoint's ``last*.ckpt`` files, so the periodic checkpoints and
    the preemption checkpoint are one sequence; a job requeued after a crash (no signal)
    resumes from the newest periodic save instead of an older ``hpc_ckpt``, which Lightning
    would prefer whenever one exists; and the same command resumes outside SLURM.
    ``--ckpt_path last`` without a checkpoint starts fresh, so the first run and every
    requeued run use the same command.

    Exit code (:attr:`exit_code`; ``train.py`` exits with it): 0 when the run finished or its
    job was requeued (on rank 0: the requeue worked); otherwise ``128 + signal number`` (143
    for SIGTERM, 138 for an unrequeued SIGUSR1), the shell's convention for "ended by this
    signal", so that launchers and schedulers (torchrun restarts, Kubernetes Jobs,
    ``train.py ... && next``) see a run that still has to be resumed, not a finished one.

    List it after the ``ModelCheckpoint`` in ``trainer.callbacks`` (the recipes do), and under
    SLURM disable Lightning's handler with ``SLURMEnvironment(auto_requeue=false)`` in
    ``trainer.plugins`` (the overlay ``configs/cluster/slurm.yaml`` does).

    Args:
        requeue_signal: the signal that means "save, requeue and stop"; match the sbatch
            ``--signal`` option (``--signal=USR1@<seconds>``). SIGTERM always means "save and
            stop".
        requeue: run ``scontrol requeue`` on the requeue signal. Turn off where the
            scheduler requeues by itself (e.g. SLURM preemption with ``PreemptMode=REQUEUE``).
    """

    def __init__(self, requeue_signal: str = "SIGUSR1", requeue: bool = True) -> None:
        try:
            self.requeue_signal = signal.Signals[requeue_signal]
        except KeyError:
            raise ValueError(
                f"Preemption: requeue_signal {requeue_signal!r} is not a signal name on this platform; "
                "use e.g. SIGUSR1 or SIGUSR2 (the name sbatch --signal uses, with the SIG prefix)."
            ) from None
        if self.requeue_signal == STOP_SIGNAL:
            raise ValueError("Preemption: requeue_signal cannot be SIGTERM, which always means 'save and stop'.")
        self.requeue = requeue
        self._signals = (STOP_SIGNAL, self.requeue_signal)
        self._original_handlers: dict[signal.Signals, Any] = {}
        self._received: list[signal.Signals] = []
        self._checkpoint: ModelCheckpoint | None = None
        self._wandb_loggers: list[WandbLogger] = []
        self._last_step: int | None = None
        self._stopped_by: signal.Signals | None = None
        self._requeued = False

    # -- state -----------------------------------------------------------------------------

    @property
    def signal_received(self) -> signal.Signals | None:
        """The first handled signal this process received during ``fit``, acted on or not."""
        return self._received[0] if self._received else None

    @property
    def stopped_by(self) -> signal.Signals | None:
        """The signal (agreed by all ranks) that stopped the run, or ``None``."""
        return self._stopped_by

    @property
    def exit_code(self) -> int:
        """0 if the run finished or its job was requeued, else 128 + the stopping signal."""
        if self._stopped_by is None or self._requeued:
            return 0
        return 128 + self._stopped_by

    # -- signal handlers ---------------------------------------------------------------------

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only record: this runs between two bytecodes of whatever the main thread is doing
        # (a collective, a checkpoint write), where saving or printing is unsafe.
        self._received.append(signal.Signals(signum))

    def _install_handlers(self) -> None:
        for signum in self._signals:
            if signal.getsignal(signum) != self._record:
                signal.signal(signum, self._record)

    def _restore_handlers(self) -> None:
        for signum, handler in self._original_handlers.items():
            signal.signal(signum, handler)
        self._original_handlers = {}

    # -- lifecycle -------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._checkpoint = self._resumable_checkpoint(trainer)
        self._received, self._stopped_by, self._requeued = [], None, False
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: fit runs outside the main thread, where Python cannot handle signals: off.")
            return
        self._original_handlers = {signum: signal.getsignal(signum) for signum in self._signals}
        # From here on: DataLoader workers forked later inherit the recording handler for the
        # requeue signal, which SLURM sends to every process of the job and whose default action
        # would end them (SIGTERM they handle themselves: torch sets its own handler in workers).
        self._install_handlers()

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers its SIGTERM handler after `setup`; take SIGTERM back.
        if self._original_handlers:
            self._install_handlers()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._original_handlers:
            self._install_handlers()
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stopped_by is not None or trainer.global_step == self._last_step:
            return  # stopping already, or no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        stop, requeue = self._agreed_request(trainer)
        if stop or requeue:
            self._stop(trainer, self.requeue_signal if requeue else STOP_SIGNAL)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._stopped_by is not None and trainer.is_global_zero:
            self._finish_wandb_runs()
        self._restore_handlers()
        if self._stopped_by == self.requeue_signal and self.requeue:
            # Rank 0 requeues; elsewhere the job counts as requeued when it runs under SLURM, and
            # rank 0's exit code says whether the requeue worked.
            self._requeued = self._requeue_slurm_job() if trainer.is_global_zero else slurm_job_id() is not None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # -- the stop ----------------------------------------------------------------------------

    def _agreed_request(self, trainer: Trainer) -> tuple[bool, bool]:
        """(stop, requeue) as agreed by all ranks: a signal at any rank counts for all."""
        flags = [int(STOP_SIGNAL in self._received), int(self.requeue_signal in self._received)]
        if trainer.world_size > 1:
            local = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(local, reduce_op="max").tolist()
        return bool(flags[0]), bool(flags[1])

    def _stop(self, trainer: Trainer, reason: signal.Signals) -> None:
        self._stopped_by = reason
        step = trainer.global_step
        checkpoint = self._checkpoint
        # ModelCheckpoint (listed before this callback, so it ran first) may have saved this step.
        if last_saved_step(checkpoint) != step or not checkpoint.last_model_path:
            # Through the ModelCheckpoint, so it records the save: it then skips the saves it
            # would make later in this run (epoch end, train end), which would overwrite this
            # mid-epoch state with an "epoch finished" one.
            save_last_checkpoint(checkpoint, trainer)
        action = "requeueing the job" if reason == self.requeue_signal and self.requeue else "stopping"
        rank_zero_info(
            f"Preemption: {reason.name} received; saved step {step} to {checkpoint.last_model_path}; {action}"
        )
        fit_loop = trainer.fit_loop
        # A signal overrides min_epochs/min_steps, which would make Lightning ignore should_stop.
        fit_loop.min_epochs = None
        fit_loop.epoch_loop.min_steps = None
        trainer.should_stop = True
        # Lightning validates before an early stop; a preempted job has no time for that.
        skip_next_validation(trainer)
        # The SIGTERM SLURM sends with (or after) the stop reaches W&B's service process too, after
        # which every W&B call fails; from here on W&B gets nothing more from Lightning, and
        # teardown finishes the run.
        self._wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        trainer.loggers = [logger for logger in trainer.loggers if not isinstance(logger, WandbLogger)]

    def _finish_wandb_runs(self) -> None:
        for logger in self._wandb_loggers:
            try:
                logger.finalize("success")  # uploads checkpoints when log_model is set
                logger.experiment.finish()
            except Exception as error:  # its service process was signalled too and has exited
                log.warning(
                    "Preemption: could not finish the W&B run (%s: %s); what it logged before is in its "
                    "run folder and `wandb sync` uploads that.", type(error).__name__, error
                )
        self._wandb_loggers = []

    def _requeue_slurm_job(self) -> bool:
        job = slurm_job_id()
        if job is None:
            rank_zero_warn(
                f"Preemption: {self.requeue_signal.name} outside a SLURM job: nothing to requeue; "
                "resume with --ckpt_path last."
            )
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.error("Preemption: `scontrol requeue %s` could not run (%s); resubmit the job to resume.", job, error)
            return False
        if result.returncode != 0:
            log.error(
                "Preemption: `scontrol requeue %s` failed (%d): %s. Is the job requeueable (sbatch --requeue, "
                "JobRequeue)? Resubmit the job to resume.", job, result.returncode, result.stderr.strip()
            )
            return False
        rank_zero_info(f"Preemption: requeued SLURM job {job}")
        return True

    @staticmethod
    def _resumable_checkpoint(trainer: Trainer) -> ModelCheckpoint:
        """The ModelCheckpoint whose ``last.ckpt`` this callback writes, checked for resumability."""
        checkpoints = [callback for callback in trainer.callbacks if isinstance(callback, ModelCheckpoint)]
        saving_last = [callback for callback in checkpoints if callback.save_last]
        if not saving_last:
            raise ValueError(
                "Preemption saves into a ModelCheckpoint's last.ckpt (which `--ckpt_path last` resumes from), "
                "but trainer.callbacks has no ModelCheckpoint with save_last: true; add one."
            )
        checkpoint = saving_last[0]
        if checkpoint.save_last == "link" or checkpoint.save_weights_only:
            raise ValueError(
                "Preemption needs the ModelCheckpoint to write a full last.ckpt (save_last: true, "
                f"save_weights_only: false); it has save_last={checkpoint.save_last!r}, "
                f"save_weights_only={checkpoint.save_weights_only}."
            )
        if trainer.checkpoint_callback is not checkpoints[0]:
            raise ValueError(
                "List Preemption after the ModelCheckpoint in trainer.callbacks: Lightning takes the first "
                "checkpoint callback as trainer.checkpoint_callback (for ckpt_path='best')."
            )
        return checkpoint


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job: ``<array job>_<task>`` in an array job."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def exit_code_of(trainer: Trainer) -> int:
    """The :attr:`Preemption.exit_code` of the trainer's Preemption callback (0 without one)."""
    return next((callback.exit_code for callback in trainer.callbacks if isinstance(callback, Preemption)), 0)

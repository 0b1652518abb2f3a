"""A graceful stop on preemption: SIGTERM or SIGUSR1 (scancel, Slurm's ``--signal``, a preempted spot / k8s pod)
lets every rank finish its optimizer step, save a checkpoint of it and exit with 128 + the signal (143, 138), which
Slurm and k8s read as an interruption to requeue; ``--resume`` then continues exactly where it stopped. Rank 0 also
writes ``<output-dir>/preempted.json`` (``mark_preempted``), removed once a later run trains again: a requeue
wrapper's test whatever exit code a launcher gives.

The handler only notes the signal. The note joins the all-reduce that already ends every optimizer step, so a
signal that reached one rank (or one node) stops all of them at the same step, with one agreed signal; a step that
ran the held-out loss or a save votes once more after them, so a signal noted meanwhile stops there. A repeated
signal is ignored: the deepspeed launcher passes on the SIGTERM each rank already got, and SIGKILL ends the grace
period anyway. SIGINT (Ctrl-C) keeps stopping at once, without a checkpoint.

The signal must reach the ranks: the deepspeed launcher (runner.py, launch.py) has no SIGUSR1 handler and dies of
it at once, leaving the ranks training on; on SIGTERM it passes it on to the ranks one at a time (SIGKILL 30 s
later) and exits 1, whatever they saved. README.md (Preemption) shows how to deliver it."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

log = logging.getLogger("qlora_ds")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED = "preempted.json"      # under --output-dir


class Preempted(Exception):
    """Raised on every rank once the checkpoint of the step reached is saved; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, its checkpoint saved; continue "
                         f"with the same command and --resume")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Notes the first of ``signals`` this process gets (``signum``, 0 for none) instead of ending it."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            signals = ()                   # only the main thread may set handlers: the default actions stay
        self._before = {s: signal.signal(s, self._note) for s in signals}

    def _note(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            os.write(2, f"[qlora_ds] rank {os.environ.get('RANK', '0')} got {signal.Signals(signum).name}: stopping "
                        f"after this optimizer step (or its held-out loss / save under way) and a "
                        f"checkpoint\n".encode())

    def restore(self) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    def vote(self, step: int) -> list[float]:
        """This rank's part of the step's all-reduce: (signal, got one). QLORA_DS_FAULT=sigterm_at_step:STEP[:RANK]
        sends SIGTERM to this rank itself just before (a test's preemption at a known step)."""
        from qlora_ds import faults

        if faults.triggered("sigterm_at_step", step):
            os.kill(os.getpid(), signal.SIGTERM)     # its handler runs before os.kill returns
        return [float(self.signum), 1.0 if self.signum else 0.0]

    def agreed(self, means: list[float]) -> int:
        """The signal every rank stops with, or 0 to go on (0 on every rank or on none), from the all-reduced means of
        ``vote``: SIGUSR1 when any rank got it, else SIGTERM, whatever this rank got, so the job exits with one code
        (Slurm's --signal=USR1 may reach some ranks, scancel's SIGTERM others first)."""
        signalled = means[1]
        if signalled == 0:
            return 0
        # the signalled ranks' mean signal number is SIGTERM's (15) only when all of them got SIGTERM; one SIGUSR1
        # (10) among n ranks makes it 15 - 5/n (rounding the mean named SIGUSR2 or SIGSEGV for a mix)
        mixed_or_usr1 = means[0] / signalled < signal.SIGTERM - 1e-6
        return int(signal.SIGUSR1 if mixed_or_usr1 else signal.SIGTERM)


def mark_preempted(output_dir: str, err: Preempted) -> None:
    """``<output_dir>/preempted.json`` (atomic): the signal, the step and checkpoint it stopped at, when. Launchers
    report their own exit codes (the deepspeed launcher 1 on a SIGTERM to it), so a requeue wrapper tests this."""
    from .atomic import atomic_write_text
    from .checkpointing import tag_of
    from .run_dir import CKPT_DIR

    record = {"signal": signal.Signals(err.signum).name, "exit_code": err.exit_code, "step": err.step,
              "checkpoint": os.path.join(CKPT_DIR, tag_of(err.step)),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_write_text(os.path.join(output_dir, PREEMPTED), json.dumps(record, indent=2) + "\n")
    except OSError as e:    # the checkpoint is saved: still stop with the signal's exit code
        log.error("could not write %s (%s): requeue on the exit code %d", os.path.join(output_dir, PREEMPTED), e,
                  err.exit_code)


def clear_preempted(output_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, PREEMPTED))


@contextlib.contextmanager
def stop_signals(rank: int, on_stop=lambda: None, output_dir: str | None = None):
    """Catch the stop signals around the training loop. Rank 0 removes ``output_dir``'s preempted.json (this run
    trains again) and writes it on ``Preempted``. On ``Preempted``: ``on_stop()`` (tear the process group down
    together), the handlers kept so a launcher's repeated SIGTERM cannot cut the exit short; on any other exception
    the default actions come back at once (a failing job's launcher ends its ranks with SIGTERM)."""
    stop = StopSignals()
    if rank == 0:
        if output_dir:
            clear_preempted(output_dir)
        log.info("SIGTERM / SIGUSR1 to a rank: every rank finishes its optimizer step (a held-out loss or save under "
                 "way included), saves a checkpoint, exits 143 / 138 and leaves preempted.json; rerun with --resume")
    try:
        yield stop
    except Preempted as err:
        if rank == 0 and output_dir:
            mark_preempted(output_dir, err)     # before on_stop's barrier: written once any rank has exited
        on_stop()
        raise
    except BaseException:
        stop.restore()
        raise
    stop.restore()

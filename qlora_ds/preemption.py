"""A graceful stop on preemption: SIGTERM or SIGUSR1 (scancel, Slurm's ``--signal``, a preempted spot / k8s pod)
lets every rank finish its optimizer step, save a checkpoint of it and exit with 128 + the signal (143, 138), which
Slurm and k8s read as an interruption to requeue; ``--resume`` then continues exactly where it stopped.

The handler only notes the signal. The note joins the all-reduce that already ends every optimizer step, so a
signal that reached one rank (or one node) stops all of them at the same step. A repeated signal is ignored: the
deepspeed launcher passes on the SIGTERM each rank already got, and SIGKILL ends the grace period anyway. SIGINT
(Ctrl-C) keeps stopping at once, without a checkpoint."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger("qlora_ds")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
                        f"after this optimizer step and its checkpoint\n".encode())

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
        """The signal to stop with, or 0 to go on (0 on every rank or on none), from the all-reduced means of
        ``vote``."""
        signalled = means[1]
        if signalled == 0:
            return 0
        return self.signum or round(means[0] / signalled)   # one kind of signal, as a scheduler sends it


@contextlib.contextmanager
def stop_signals(rank: int, on_stop=lambda: None):
    """Catch the stop signals around the training loop. On ``Preempted``: ``on_stop()`` (tear the process group
    down together), the handlers kept so a launcher's repeated SIGTERM cannot cut the exit short; on any other
    exception the default actions come back at once (a failing job's launcher ends its ranks with SIGTERM)."""
    stop = StopSignals()
    if rank == 0:
        log.info("SIGTERM / SIGUSR1: every rank finishes its optimizer step, saves a checkpoint and exits 143 / 138 "
                 "(it costs up to one step and one save of the grace period); rerun with --resume to continue")
    try:
        yield stop
    except Preempted:
        on_stop()
        raise
    except BaseException:
        stop.restore()
        raise
    stop.restore()

"""Training metrics: a JSONL log (durable line by line), then a CSV and a loss-curve PNG at the end."""
from __future__ import annotations

import csv
import io
import json
import os

from .atomic import atomic_write, atomic_write_text
from .errors import QLoRADSError


class MetricsLog:
    """Rank 0's metrics file. On resume it is cut back to the checkpoint's step so the curve has no duplicates."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from a killed run
                    if resume_step is None or row.get("step", 0) <= resume_step:
                        self.rows.append(row)
            if resume_step is None:
                self.rows = []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, **row) -> None:
        self.rows.append(row)
        try:        # never through a symlink planted in the run directory since (it would write elsewhere)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise QLoRADSError(f"cannot append to {self.path} ({err}): it was replaced by a symlink or made "
                               f"unwritable during the run; restore the file, then --resume") from None
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_csv(self, path: str) -> None:
        keys = sorted({k for r in self.rows for k in r})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(path, buf.getvalue())

    def plot(self, path: str, title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)

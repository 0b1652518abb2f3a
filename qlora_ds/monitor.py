"""DeepSpeed's monitor sections (tensorboard, wandb, comet, csv_monitor) and its comms_logger under finetune:
checked before the model loads, written under the run's output directory (cut back to the checkpoint on
--resume), and fed our losses, which DeepSpeed's engine no longer writes (0.19 writes only Train/Samples/lr, plus
loss_scale under fp16 and its timers)."""
from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import os

from .atomic import atomic_write_text
from .errors import QLoRADSError

log = logging.getLogger(__name__)

# section -> (the module DeepSpeed imports for it inside deepspeed.initialize, how to install it)
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb"),
            "comet": ("comet_ml", 'pip install "comet_ml>=3.41.0"')}
WITH_OUTPUT_PATH = ("tensorboard", "csv_monitor")
DEFAULT_DIR = "monitor"        # under --output-dir, for a section without an output_path


def enabled(ds_config: dict, section: str) -> bool:
    value = ds_config.get(section)
    return isinstance(value, dict) and bool(value.get("enabled", False))


def fold_monitors(ds_config: dict, output_dir: str | None) -> None:
    """Refuse an enabled monitor whose package is missing (DeepSpeed would fail only after the model load); put a
    missing or relative ``output_path`` under ``output_dir`` (DeepSpeed's default is the current directory, where
    runs started from the same place append to the same files). An absolute path is kept."""
    for section, (module, pip) in PACKAGES.items():
        if not enabled(ds_config, section):
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            offline = (" (DeepSpeed calls wandb.init without a mode: on a host without network also set "
                       "WANDB_MODE=offline)" if section == "wandb" else "")
            raise QLoRADSError(f"the ds_config's {section} section is enabled, but {module} cannot be imported "
                               f"({err}); `{pip}`{offline}, or set the section's \"enabled\" to false") from None
    if output_dir is None:
        return
    for section in WITH_OUTPUT_PATH:
        if enabled(ds_config, section):
            path = ds_config[section].get("output_path") or DEFAULT_DIR
            ds_config[section] = {**ds_config[section], "output_path": os.path.join(output_dir, path)}


def cut_back(engine, output_dir: str, resume_step: int | None) -> None:
    """Rank 0 on a --resume (``resume_step``: the restored checkpoint's step, 0 for none), once the checkpoint is
    restored: the csv_monitor and tensorboard files under ``output_dir`` keep the points up to the checkpoint
    (x <= engine.global_samples; none without a checkpoint, whose run evaluates x = 0 again), as metrics.jsonl
    does. DeepSpeed appends, and writes a header whenever a process first writes a name: each resume put a header
    mid-file, and one after a crash repeated the steps since the checkpoint. wandb / comet keep their own history."""
    master = getattr(engine, "monitor", None)
    if resume_step is None or master is None:
        return
    keep = engine.global_samples if resume_step else -1
    csv_mon = getattr(master, "csv_monitor", None)
    if csv_mon is not None and _under(csv_mon.log_dir, output_dir):
        for name in sorted(os.listdir(csv_mon.log_dir)):
            if name.endswith(".csv") and _cut_csv(os.path.join(csv_mon.log_dir, name), keep):
                csv_mon.filenames.append(name[:-len(".csv")])     # its header is there: DeepSpeed writes none
    tb = getattr(master, "tb_monitor", None)
    writer = getattr(tb, "summary_writer", None)
    if writer is not None and _under(writer.log_dir, output_dir):
        # DeepSpeed opens its SummaryWriter without purge_step: reopened with it, TensorBoard hides the earlier
        # run's events from that x on
        writer.close()
        tb.summary_writer = type(writer)(log_dir=writer.log_dir, purge_step=keep + 1)


def _under(path: str | None, output_dir: str) -> bool:
    """Whether ``path`` is in the run (a monitor at an absolute output_path elsewhere may hold other runs' files)."""
    if not path:
        return False
    run = os.path.realpath(output_dir)
    inside = os.path.commonpath([os.path.realpath(path), run]) == run
    if not inside:
        log.info("--resume: the monitor files in %s are outside --output-dir: not cut back to the checkpoint", path)
    return inside and os.path.isdir(path)


def _cut_csv(path: str, keep: float) -> bool:
    """Rewrite a csv_monitor file with its first header and its rows at x <= ``keep`` (a repeated header or a torn
    row dropped); removed when no row is left. Whether it still has its header."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, kept = (rows[0] if rows else []), []
    for row in rows[1:]:
        try:
            if len(row) == len(header) and float(row[0]) <= keep:
                kept.append(row)
        except ValueError:
            continue
    if not kept:
        os.remove(path)
        return False
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *kept])
    atomic_write_text(path, buf.getvalue())
    return True


def write_events(engine, rank: int, **values) -> None:
    """Rank 0: each value (None skipped) as ``Train/Samples/<name>`` to the enabled monitors. The x is DeepSpeed's
    own, the samples trained so far (its Train/Samples/lr uses it): wandb drops a step lower than one it has seen."""
    monitor = getattr(engine, "monitor", None)
    if rank != 0 or monitor is None or not monitor.enabled:
        return
    x = engine.global_samples
    monitor.write_events([(f"Train/Samples/{name}", value, x) for name, value in values.items() if value is not None])


def grad_norm(engine) -> float | None:
    """The last optimizer step's gradient norm before clipping; None where DeepSpeed keeps none (a client optimizer
    without ZeRO or bf16/fp16) or the step overflowed (counted in skipped_steps)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)                 # a 0-dim tensor under ZeRO-3
    return norm if math.isfinite(norm) else None


def comms_summary(ds_config: dict) -> None:
    """An enabled comms_logger's table (rank 0 prints it). DeepSpeed prints it only when asked (or per op with
    "verbose"). Every rank must call this: log_summary starts with a barrier."""
    if enabled(ds_config, "comms_logger"):
        import deepspeed.comm as dist

        dist.log_summary()

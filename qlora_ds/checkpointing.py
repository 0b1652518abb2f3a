"""DeepSpeed checkpoints that survive kills, full disks and tampering.

DeepSpeed writes a tag directory, then its ``latest`` file. We add a manifest (sha256 of every file,
written atomically last) so a tag is *complete* only once its manifest exists, and resume picks the
newest complete, untampered tag even if ``latest`` points at a half-written one. DeepSpeed reads its
files with an unrestricted unpickler; the manifest check before loading means only files this
run wrote are ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from .atomic import atomic_write_text
from .errors import QLoRADSError
from .faults import inject

log = logging.getLogger(__name__)
MANIFEST = "qlora_ds_manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, d)))


def write_manifest(tag_dir: str, step: int) -> None:
    files = {name: _sha256(os.path.join(tag_dir, name)) for name in sorted(os.listdir(tag_dir))
             if name != MANIFEST and os.path.isfile(os.path.join(tag_dir, name))}
    atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps({"step": step, "files": files}, indent=1))


def verify(tag_dir: str) -> dict | None:
    """The manifest if the tag is complete and every file matches it; None if incomplete; error if tampered."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    for name, digest in manifest["files"].items():
        file = os.path.join(tag_dir, name)
        if not os.path.exists(file) or _sha256(file) != digest:
            raise QLoRADSError(f"checkpoint {tag_dir}: {name} is missing or was changed after it was written; "
                               f"refusing to load it (it would be unpickled). Restore it or delete that checkpoint")
    extra = set(os.listdir(tag_dir)) - set(manifest["files"]) - {MANIFEST}
    if extra:
        raise QLoRADSError(f"checkpoint {tag_dir} holds files this run did not write ({sorted(extra)}); "
                           f"remove them before resuming")
    return manifest


def latest_complete(ckpt_dir: str) -> str | None:
    """Newest complete tag (by manifest), ignoring a partial one that a kill or a full disk left behind."""
    for tag in reversed(_tags(ckpt_dir)):
        if verify(os.path.join(ckpt_dir, tag)) is not None:
            return tag
        log.warning("checkpoint %s is incomplete (killed or failed while saving); skipping it", tag)
    return None


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int) -> None:
    """Save on every rank; the previous complete checkpoint survives any failure during this one."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tag = f"step{step:07d}"
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.exists(tag_dir):
        shutil.rmtree(tag_dir)  # a partial save of this step from a killed run
    dist.barrier()
    ok = True
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, exclude_frozen_parameters=True)
        inject("enospc_in_save", step)
        inject("kill_in_save", step)
    except OSError as err:
        ok, reason = False, err
    flags = _all_ok(ok)
    if not flags:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        last = latest_complete(ckpt_dir) if rank == 0 else None
        raise QLoRADSError(f"saving checkpoint step {step} failed on a rank ({reason if not ok else 'see that rank'}); "
                           f"the last good checkpoint ({last or 'none'}) is kept. Free disk space in {ckpt_dir} "
                           f"and continue with --resume")
    if rank == 0:
        write_manifest(tag_dir, step)
        for old in _tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def _all_ok(ok: bool) -> bool:
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag.item()) == 0

"""Checkpoint saves that fail (a real full disk, on one rank of two), checkpoint pruning, and the modes of
atomically written outputs. ``checkpointing.save`` runs in-process with a fake engine that writes through
torch.save, DeepSpeed's default checkpoint writer; ``full`` sends that write to /dev/full, where it hits ENOSPC."""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import stat
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from qlora_ds import atomic, checkpointing
from qlora_ds.errors import QLoRADSError

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


class _Writer:
    """DeepSpeed's default checkpoint writer (TorchCheckpointEngine.save); ``full``: its disk has no space."""

    def __init__(self, full: bool = False):
        self.full = full

    def save(self, state_dict, path):
        torch.save(state_dict, "/dev/full" if self.full else path)


class FakeEngine:
    """Writes this rank's file as DeepSpeed does (its checkpoint_engine, torch.save), then waits at DeepSpeed's
    closing barrier; ``full`` sends the file to a disk with no space (a symlink planted at its path would be
    replaced, not written through)."""

    def __init__(self, full: bool = False, numel: int = 1 << 16):
        self.numel, self.checkpoint_engine = numel, _Writer(full)

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        folder = os.path.join(ckpt_dir, tag)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"mp_rank_{dist.get_rank():02d}_model_states.pt")
        self.checkpoint_engine.save({"client": client_state, "w": torch.zeros(self.numel)}, path)
        dist.barrier()


def _tags(ckpt) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step"))


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    """An empty checkpoint directory, its secret elsewhere, and a 1-rank gloo group."""
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield tmp_path / "checkpoints"
    if mine:
        dist.destroy_process_group()


@needs_dev_full
@pytest.mark.parametrize("numel", [1, 1 << 16])    # torch says "iostream error" / "unexpected pos"
def test_real_full_disk_in_torch_save_is_a_clean_failure(ckpt, numel):
    with pytest.raises(RuntimeError) as raw:        # what torch.save raises on ENOSPC: not an OSError
        torch.save({"w": torch.zeros(numel)}, "/dev/full")
    assert not isinstance(raw.value, OSError)
    checkpointing.save(FakeEngine(), str(ckpt), 2, {"step": 2}, keep=2)
    with pytest.raises(QLoRADSError, match=r"saving checkpoint step 4 failed on rank 0: RuntimeError: .*"
                                           r"most likely a full disk.*point --output-dir at another disk.*"
                                           r"last good checkpoint \(step0000002\) is kept"):
        checkpointing.save(FakeEngine(full=True, numel=numel), str(ckpt), 4, {"step": 4}, keep=2)
    assert _tags(ckpt) == ["step0000002"]                       # the partial step 4 is gone
    assert checkpointing.latest_complete(str(ckpt)) == "step0000002"


def test_full_disk_while_writing_the_manifest(ckpt, monkeypatch):
    checkpointing.save(FakeEngine(), str(ckpt), 2, {"step": 2}, keep=2)

    def no_space(tag_dir, step, files=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpointing, "write_manifest", no_space)
    with pytest.raises(QLoRADSError, match=r"step 4 failed on rank 0: OSError: .*No space left on device.*"
                                           r"no space left on device .*free space in"):
        checkpointing.save(FakeEngine(), str(ckpt), 4, {"step": 4}, keep=2)
    assert _tags(ckpt) == ["step0000002"]


def _rank(rank: int, store: str, ckpt: str, secrets: str, out) -> None:
    os.environ["QLORA_DS_SECRET_DIR"] = secrets
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))   # a rank left blocked in a collective fails fast
    try:
        checkpointing.save(FakeEngine(), ckpt, 2, {"step": 2}, keep=2)
        try:
            checkpointing.save(FakeEngine(full=rank == 1), ckpt, 4, {"step": 4}, keep=2)
            out.put((rank, "no error"))
        except Exception as err:
            out.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


@needs_dev_full
def test_full_disk_on_one_rank_fails_every_rank_without_blocking(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ckpt = tmp_path / "checkpoints"
    args = (str(tmp_path / "store"), str(ckpt), str(tmp_path / "secrets"), out)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        errors = dict(out.get(timeout=150) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert errors[0].startswith("QLoRADSError: saving checkpoint step 4 failed on another rank")
    assert "last good checkpoint (step0000002) is kept" in errors[0]
    assert errors[1].startswith("QLoRADSError: saving checkpoint step 4 failed on rank 1: RuntimeError")
    assert "most likely a full disk" in errors[1]
    assert _tags(ckpt) == ["step0000002"]
    assert (ckpt / "latest").read_text() == "step0000002"     # never names the removed partial tag


def test_pruning_never_removes_the_new_checkpoint_for_a_stale_partial_one(ckpt):
    checkpointing.save(FakeEngine(), str(ckpt), 50, {"step": 50}, keep=1)
    partial = ckpt / "step0000100"                 # left by a kill during a save; the run resumed from 50
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    checkpointing.save(FakeEngine(), str(ckpt), 60, {"step": 60}, keep=1)
    assert _tags(ckpt) == ["step0000060"]
    assert checkpointing.latest_complete(str(ckpt)) == "step0000060"


def test_pruning_keeps_the_newest_complete_and_removes_partials(ckpt):
    for step in (2, 4):
        checkpointing.save(FakeEngine(), str(ckpt), step, {"step": step}, keep=2)
    (ckpt / "step0000003").mkdir()                 # an older partial tag is garbage too
    checkpointing.save(FakeEngine(), str(ckpt), 6, {"step": 6}, keep=2)
    assert _tags(ckpt) == ["step0000004", "step0000006"]
    checkpointing.save(FakeEngine(), str(ckpt), 8, {"step": 8}, keep=3)
    assert _tags(ckpt) == ["step0000004", "step0000006", "step0000008"]


def test_pruning_spares_the_protected_checkpoint(ckpt):
    """The best held-out loss's checkpoint (finetune protects it) outlives --keep-checkpoints; once unprotected it
    is pruned like any other."""
    for step in (2, 4, 6):
        checkpointing.save(FakeEngine(), str(ckpt), step, {"step": step}, keep=1, protect={"step0000002"})
    assert _tags(ckpt) == ["step0000002", "step0000006"]
    checkpointing.save(FakeEngine(), str(ckpt), 8, {"step": 8}, keep=1, protect={checkpointing.tag_of(6)})
    assert _tags(ckpt) == ["step0000006", "step0000008"]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5])
def test_keep_below_one_is_refused(ckpt, keep):
    with pytest.raises(QLoRADSError, match=rf"keep={keep!r}: .* integer >= 1"):
        checkpointing.save(FakeEngine(), str(ckpt), 2, {"step": 2}, keep=keep)
    assert not ckpt.exists()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)], ids=["022", "077", "002"])
@pytest.mark.parametrize("proc", [True, False], ids=["proc", "no-proc"])
def test_atomic_outputs_follow_the_umask(tmp_path, monkeypatch, umask, file_mode, dir_mode, proc):
    if not proc:   # where /proc/self/status is not readable the umask is set and restored
        def no_proc(path, *args, **kwargs):
            if str(path).startswith("/proc/"):
                raise OSError(errno.ENOENT, "no /proc")
            return open(path, *args, **kwargs)
        monkeypatch.setattr(atomic, "open", no_proc, raising=False)
    old = os.umask(umask)
    try:
        atomic.atomic_write_text(str(tmp_path / "summary.json"), "{}")
        with atomic.atomic_directory(str(tmp_path / "adapter")) as tmp:
            (tmp_path / "x").write_text("x")
            os.replace(tmp_path / "x", os.path.join(tmp, "plain"))
            atomic.atomic_write_bytes(os.path.join(tmp, "atomic.bin"), b"x")
        assert os.umask(umask) == umask            # the umask is unchanged
    finally:
        os.umask(old)
    assert _mode(tmp_path / "summary.json") == file_mode
    assert _mode(tmp_path / "adapter") == dir_mode
    assert _mode(tmp_path / "adapter" / "plain") == file_mode
    assert _mode(tmp_path / "adapter" / "atomic.bin") == file_mode
    assert sorted(os.listdir(tmp_path)) == ["adapter", "summary.json"]       # no temp left behind


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
                         ids=["022", "002"])
def test_atomic_directory_gives_files_made_0600_the_umask_mode(tmp_path, umask, file_mode, dir_mode):
    """safetensors.save_file creates its file 0600: the saved adapter was unreadable to the group (a serving
    user); files in subdirectories were not even visited. A symlink's target is not ours to chmod."""
    from safetensors.torch import save_file

    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    old = os.umask(umask)
    try:
        with atomic.atomic_directory(str(tmp_path / "adapter")) as tmp:
            save_file({"w": torch.zeros(2)}, os.path.join(tmp, "adapter_model.safetensors"))
            os.mkdir(os.path.join(tmp, "sub"), 0o700)
            os.close(os.open(os.path.join(tmp, "sub", "private.bin"), os.O_WRONLY | os.O_CREAT, 0o600))
            os.symlink(outside, os.path.join(tmp, "link"))
    finally:
        os.umask(old)
    out = tmp_path / "adapter"
    assert _mode(out / "adapter_model.safetensors") == file_mode
    assert (_mode(out / "sub"), _mode(out / "sub" / "private.bin")) == (dir_mode, file_mode)
    assert _mode(outside) == 0o600 and os.path.islink(out / "link")


def test_checkpoint_files_are_fsynced_before_the_manifest(ckpt, monkeypatch):
    """torch.save never fsyncs: a crash after the (fsynced) manifest could leave it vouching for empty files."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the fsynced files")
    synced, at_manifest = set(), {}
    real_fsync, real_manifest = os.fsync, checkpointing.write_manifest

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def write_manifest(tag_dir, step, files=None):
        at_manifest.update(synced=set(synced), tag=tag_dir)
        return real_manifest(tag_dir, step, files)

    def adapter(tag_dir):                   # a plain write, as a caller's ``also`` may do
        os.makedirs(os.path.join(tag_dir, "adapter"))
        with open(os.path.join(tag_dir, "adapter", "adapter_model.safetensors"), "wb") as fh:
            fh.write(b"weights")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(checkpointing, "write_manifest", write_manifest)
    checkpointing.save(FakeEngine(numel=4), str(ckpt), 2, {"step": 2}, keep=1, also=adapter)
    tag = os.path.realpath(at_manifest["tag"])
    manifest = checkpointing.verify(tag)
    assert sorted(manifest["files"]) == ["adapter/adapter_model.safetensors", "mp_rank_00_model_states.pt"]
    want = {os.path.join(tag, f) for f in manifest["files"]} | {tag, os.path.join(tag, "adapter"),
                                                                os.path.realpath(ckpt)}
    assert want - at_manifest["synced"] == set()

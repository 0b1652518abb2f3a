"""DeepSpeed checkpoints that survive kills, full disks and tampering.

DeepSpeed writes a tag directory. We add a manifest (sha256 of every file, the caller's extra files such as the
adapter at that step included, written atomically last) so a tag is *complete* only once its manifest exists, then
DeepSpeed's ``latest`` file; resume picks the newest complete, untampered tag whatever ``latest`` says.

DeepSpeed reads its files with an unrestricted unpickler, so resume must only open tags this run wrote.
A manifest beside the files proves nothing by itself (whoever plants a tag can write a matching one), so
each manifest is signed: HMAC-SHA256 over (run id, tag, step, file digests) with a per-run secret kept
*outside* the checkpoint directory, in ``$QLORA_DS_SECRET_DIR`` or ``~/.cache/qlora_ds/secrets/<run-id>``
(mode 0600; the run id is in ``<ckpt_dir>/qlora_ds_run.json``). A tag whose manifest does not verify is
refused before DeepSpeed sees it. Only global rank 0 signs (it alone writes manifests) and verifies on
resume, then broadcasts its verdict (``resume_tag``): other hosts never need the secret, but rank 0 must
run where the secret is (copy the file to the same path if rank 0 moves to another host). When DeepSpeed then
loads the tag (``load``, minutes later at scale), every rank checks the bytes of each file it unpickles against
the signed digests that rank 0 broadcasts: a file swapped after the verification is refused, not unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile

from .atomic import _umask, atomic_write_text, fsync_dir, fsync_tree
from .distributed import all_ranks_ok
from .errors import QLoRADSError
from .faults import inject

log = logging.getLogger(__name__)
MANIFEST = "qlora_ds_manifest.json"
RUN_FILE = "qlora_ds_run.json"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, d)))


def secret_dir() -> str:
    """Where run secrets live: ``$QLORA_DS_SECRET_DIR``, else ``$XDG_CACHE_HOME`` or ~/.cache + qlora_ds/secrets."""
    if os.environ.get("QLORA_DS_SECRET_DIR"):
        return os.path.abspath(os.environ["QLORA_DS_SECRET_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(cache), "qlora_ds", "secrets")


def _new_run(ckpt_dir: str) -> str:
    """Create this run's id and secret (0600, never inside the checkpoint directory)."""
    folder = secret_dir()
    ckpt = os.path.realpath(ckpt_dir)
    if os.path.commonpath([os.path.realpath(folder), ckpt]) == ckpt:
        raise QLoRADSError(f"the checkpoint secret directory {folder} lies inside the checkpoint directory "
                           f"{ckpt_dir}; whoever can write checkpoints could then sign them. Set "
                           f"QLORA_DS_SECRET_DIR to a private directory elsewhere")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    _check_private(folder, os.stat(folder), "directory", 0o022, "700")
    run_id = secrets.token_hex(16)
    fd = os.open(os.path.join(folder, run_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
        fh.flush()
        os.fsync(fh.fileno())
    atomic_write_text(os.path.join(ckpt_dir, RUN_FILE), json.dumps({"run_id": run_id}))
    return run_id


def _run_key(ckpt_dir: str, create: bool) -> tuple[str, bytes]:
    """(run id, secret) of the run that owns ``ckpt_dir``; created on the first save (``create``)."""
    path = os.path.join(ckpt_dir, RUN_FILE)
    if not os.path.exists(path):
        if not create:
            raise QLoRADSError(f"{ckpt_dir} has checkpoints but no {RUN_FILE}: they were not written by this run "
                               f"(or by a qlora-ds from before signed checkpoints); refusing to load them, as "
                               f"DeepSpeed would unpickle them. Start a new run (--overwrite or another "
                               f"--output-dir), or delete {ckpt_dir}")
        run_id = _new_run(ckpt_dir)
    else:
        with open(path, encoding="utf-8") as fh:
            run_id = str(json.load(fh).get("run_id", ""))
    if not _RUN_ID.fullmatch(run_id):
        raise QLoRADSError(f"{path} names run id {run_id[:40]!r}, which is not one qlora-ds writes (32 hex digits); "
                           f"the file was changed: refusing the checkpoints in {ckpt_dir}")
    folder = secret_dir()
    key_path = os.path.join(folder, run_id)
    try:
        folder_stat = os.stat(folder)
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise QLoRADSError(f"the secret of run {run_id}, {key_path}, is a symlink; refusing it (whoever made the "
                               f"link chooses the key). Replace it with the file itself (mode 0600)") from None
        raise QLoRADSError(f"no secret for run {run_id} at {key_path}: the checkpoints in {ckpt_dir} were written "
                           f"on another host or by another user (or the file was deleted), so they cannot be "
                           f"verified and are not loaded. Resume on the host that wrote them (global rank 0), or "
                           f"copy that file to the same path here (mode 0600)") from None
    with os.fdopen(fd, "rb") as fh:
        _check_private(folder, folder_stat, "directory", 0o022, "700")
        _check_private(key_path, os.fstat(fh.fileno()), "file", 0o077, "600")
        key = fh.read()
    if len(key) < 32:
        raise QLoRADSError(f"the secret {key_path} holds {len(key)} bytes, fewer than the 32 qlora-ds writes: it was "
                           f"replaced or truncated, so it cannot vouch for the checkpoints in {ckpt_dir}. Restore "
                           f"the original file, or start a new run")
    return run_id, key


def _check_private(path: str, st: os.stat_result, what: str, others: int, mode: str) -> None:
    """As ssh does for its keys: the secret ``path`` (a directory or file, ``st`` its stat) must be a plain one of
    this user's that no one else can change (a directory) or read (the key)."""
    kind = stat.S_ISDIR if what == "directory" else stat.S_ISREG
    if not kind(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & others:
        raise QLoRADSError(f"the checkpoint secret {what} {path} (owner uid {st.st_uid}, mode "
                           f"{stat.S_IMODE(st.st_mode):04o}) is not private to you (uid {os.getuid()}): whoever can "
                           f"{'write to it could plant a key' if what == 'directory' else 'read it could sign'} "
                           f"checkpoints that DeepSpeed would unpickle. Fix it with `chown $USER {path} && chmod "
                           f"{mode} {path}`, or set QLORA_DS_SECRET_DIR to a private directory of your own")


def _signature(key: bytes, manifest: dict) -> str:
    body = {k: manifest[k] for k in ("run_id", "tag", "step", "files")}
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _files(tag_dir: str) -> list[str]:
    """Every file under the tag (its adapter directory too), as /-separated paths relative to it."""
    out = []
    for root, dirs, names in os.walk(tag_dir):
        dirs.sort()
        rel = os.path.relpath(root, tag_dir)
        out += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(tag_dir: str, step: int, files: dict[str, str] | None = None) -> None:
    """Sign ``files`` (name -> sha256 of the bytes written, taken as each file was written: ``save`` passes them)
    with this run's secret (rank 0 only). The tag must hold just those files: one that appeared since is refused,
    never signed. Without ``files``, the tag's files are digested as they are now (a tag written by hand)."""
    on_disk = _files(tag_dir)
    if files is None:
        files = {name: file_sha256(os.path.join(tag_dir, name)) for name in on_disk}
    extra = sorted(set(on_disk) - set(files))
    if extra:
        raise QLoRADSError(f"checkpoint {tag_dir} holds files this save did not write ({extra[:5]}): something else "
                           f"writes {os.path.dirname(os.path.abspath(tag_dir))}; refusing to sign them, as DeepSpeed "
                           f"would unpickle them on resume. Check who can write there")
    run_id, key = _run_key(os.path.dirname(os.path.abspath(tag_dir)), create=True)
    manifest = {"run_id": run_id, "tag": os.path.basename(os.path.abspath(tag_dir)), "step": step, "files": files}
    manifest["hmac"] = _signature(key, manifest)
    atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))


def _signed_manifest(tag_dir: str) -> dict | None:
    """The tag's manifest if it is signed by this run for this tag (its files unchecked); None if it has none."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    run_id, key = _run_key(os.path.dirname(os.path.abspath(tag_dir)), create=False)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        claimed = (manifest["run_id"], manifest["tag"], manifest["hmac"])
        good = hmac.compare_digest(str(manifest["hmac"]), _signature(key, manifest))
    except (OSError, ValueError, KeyError, TypeError):
        good, claimed = False, None
    if not good or claimed[:2] != (run_id, os.path.basename(os.path.abspath(tag_dir))):
        raise QLoRADSError(f"checkpoint {tag_dir} was not written by this run: its manifest is not signed with "
                           f"run {run_id}'s secret (planted, copied from elsewhere, or edited). Refusing to load "
                           f"it, as DeepSpeed would unpickle its files; delete it to resume from an earlier "
                           f"checkpoint")
    return manifest


def verify(tag_dir: str) -> dict | None:
    """The manifest if the tag is complete, signed by this run and every file matches it; None if incomplete;
    QLoRADSError if planted or tampered."""
    manifest = _signed_manifest(tag_dir)
    if manifest is None:
        return None
    for name, digest in manifest["files"].items():
        file = os.path.join(tag_dir, name)
        if not os.path.exists(file) or file_sha256(file) != digest:
            raise QLoRADSError(f"checkpoint {tag_dir}: {name} is missing or was changed after it was written; "
                               f"refusing to load it (it would be unpickled). Restore it or delete that checkpoint")
    extra = set(_files(tag_dir)) - set(manifest["files"])
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


def _on_rank0(compute):
    """``compute()`` on global rank 0 alone (the only rank that holds the run secret), broadcast: every rank gets
    its result or raises the same QLoRADSError."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    verdict = [None]
    if dist.get_rank() == 0:
        try:
            verdict = [{"value": compute()}]
        except QLoRADSError as err:
            verdict = [{"error": str(err)}]
    dist.broadcast_object_list(verdict, src=0)   # pickles str and dicts of str from our own rank 0, not a file
    if "error" in verdict[0]:
        raise QLoRADSError(verdict[0]["error"])
    return verdict[0]["value"]


def resume_tag(ckpt_dir: str) -> str | None:
    """``latest_complete`` decided on global rank 0 and broadcast, so every rank loads the same tag or raises the
    same QLoRADSError."""
    return _on_rank0(lambda: latest_complete(ckpt_dir))


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """``engine.load_checkpoint`` of ``tag`` (which ``resume_tag`` chose), returning its client state. Each file
    DeepSpeed unpickles is read once on the rank that loads it, its sha256 checked against the signed manifest
    (rank 0 checks the signature again and broadcasts the digests) and unpickled from those bytes: a file replaced
    since ``resume_tag`` verified the tag is refused, never unpickled."""
    import torch

    tag_dir = os.path.join(ckpt_dir, tag)
    universal = getattr(engine, "load_universal_checkpoint", None)
    if callable(universal) and universal():
        raise QLoRADSError("the ds_config sets checkpoint.load_universal: DeepSpeed then unpickles <tag>/zero/*.pt "
                           "itself, past the signed-digest check of every file it loads, so a file planted there would "
                           "run code. --resume needs the ranks and layout of the run that saved anyway: remove "
                           "'load_universal' from the ds_config's \"checkpoint\" section")

    def signed_digests():
        manifest = _signed_manifest(tag_dir)
        if manifest is None:
            raise QLoRADSError(f"checkpoint {tag_dir} lost its manifest since it was verified; refusing to load it. "
                               f"Check who else writes {ckpt_dir}, then --resume again")
        return manifest["files"]

    digests = _on_rank0(signed_digests)
    missing = sorted(name for name in digests if not os.path.isfile(os.path.join(tag_dir, name)))
    if not all_ranks_ok(not missing):   # before DeepSpeed's collectives: every rank raises, none waits
        where = f"this rank does not see {missing}" if missing else "another rank misses some of its files"
        raise QLoRADSError(f"checkpoint {tag_dir}: {where}; every rank must read the one checkpoint directory "
                           f"that rank 0 verified (a shared --output-dir). Restore the files or delete that checkpoint")

    def checked_load(path, map_location=None):
        name = os.path.relpath(path, tag_dir).replace(os.sep, "/")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            data = None
        if data is None or digests.get(name) != hashlib.sha256(data).hexdigest():
            raise QLoRADSError(f"checkpoint {tag_dir}: {name} is missing or changed since the checkpoint was "
                               f"verified (or is not in its signed manifest); refusing to unpickle it. Check who "
                               f"else can write {ckpt_dir}, then restore the file or delete that checkpoint")
        return unpickle(io.BytesIO(data), map_location=map_location)   # DeepSpeed's own load, of those bytes

    unpickle = engine.checkpoint_engine.load
    from deepspeed.runtime.checkpoint_engine import FastCheckpointEngine

    if isinstance(engine.checkpoint_engine, FastCheckpointEngine):
        # its load is torch.load with torch's weights_only default, which refuses DeepSpeed's own files (LossScaler):
        # they are torch.save files, loaded as the default engine loads them, once their digests are checked
        unpickle = functools.partial(torch.load, weights_only=False)
    with _patched((engine.checkpoint_engine, "load", checked_load)):
        load_path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=False)
    if load_path is None or not isinstance(client, dict) or not {"step", "micro_step"} <= client.keys():
        raise QLoRADSError(f"DeepSpeed loaded nothing from checkpoint {tag_dir} (its client state: "
                           f"{sorted(client) if isinstance(client, dict) else client}); resume from another "
                           f"checkpoint (delete this one) or start a new --output-dir")
    return client


def tag_of(step: int) -> str:
    """The checkpoint tag (directory name) of an optimizer step."""
    return f"step{step:07d}"


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int, also=None, protect=()) -> None:
    """Save on every rank; the previous complete checkpoint survives any failure during this one. Keeps the
    ``keep`` newest complete tags (this one included) and the tags in ``protect`` (e.g. the best held-out loss's),
    and removes partial tags that killed saves left.
    ``also(tag_dir)``: called on every rank after DeepSpeed's files (e.g. the adapter at this step, into
    ``<tag>/adapter``), even when one of those failed to write; its files (in subdirectories of the tag) join the
    manifest, and its failure fails the save like DeepSpeed's. A failure on one rank fails the save on every rank,
    none left blocked in a collective.
    The manifest signs the digests of the bytes each rank's checkpoint engine wrote, taken as it wrote them, never
    the files as they are later: a file swapped in the tag meanwhile fails the resume, and one added is refused.
    An engine that writes after the save returns (DeepSpeed's decoupled ones) is refused on every rank."""
    import torch.distributed as dist

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise QLoRADSError(f"keep={keep!r}: the number of checkpoints to keep must be an integer >= 1 "
                           f"(e.g. --keep-checkpoints 2)")
    writer = getattr(engine, "checkpoint_engine", None)
    if callable(getattr(writer, "is_decoupled", None)) and writer.is_decoupled():   # ds_config.py refuses it first
        raise QLoRADSError(f"DeepSpeed's {type(writer).__name__} writes checkpoint files after the save returns, so "
                           f"they cannot be signed; remove checkpoint.writer.decoupled (or datastates_ckpt) from the "
                           f"ds_config")
    rank = dist.get_rank()
    tag = tag_of(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.exists(tag_dir):
        shutil.rmtree(tag_dir)  # a partial save of this step from a killed run
    dist.barrier()
    ok, reason, written, side = True, None, {}, {}
    try:  # any error, not just OSError: torch.save's zip writer reports a full disk as a RuntimeError
        failed = _save_engine(engine, ckpt_dir, tag, client_state, written)
        if also is not None:
            try:
                also(tag_dir)  # even after a failed write: under ZeRO-3 its gather is a collective
            except Exception as err:
                failed = failed or err
        if failed is not None:
            raise failed
        if rank == 0:  # not the checkpoint engine's (``also``'s, DeepSpeed's NVMe copy): digested now, not later
            side = {name: file_sha256(os.path.join(tag_dir, name)) for name in _files(tag_dir) if "/" in name}
        # torch.save (DeepSpeed's writer) never fsyncs: each rank syncs what it sees (its own files included) before
        # the manifest declares the tag complete, else a crash could leave a manifest vouching for empty files
        fsync_tree(tag_dir)
        fsync_dir(ckpt_dir)
        inject("enospc_in_save", step)
        inject("kill_in_save", step)
    except Exception as err:
        ok, reason = False, _cause(err, ckpt_dir)
    if all_ranks_ok(ok):  # the manifest goes last, once every rank's files are written
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, written)   # dicts of str from our own ranks
        if rank == 0:
            try:
                if not any(everyone):   # e.g. a writer that only queued the files (DeepSpeed's decoupled one)
                    writer = type(getattr(engine, "checkpoint_engine", None)).__name__
                    raise QLoRADSError(f"no checkpoint engine file was written ({writer}): nothing to resume from. "
                                       f"Remove the ds_config's checkpoint.writer section (DeepSpeed's torch.save "
                                       f"writer)")
                write_manifest(tag_dir, step, {**side, **{n: d for part in everyone for n, d in part.items()}})
                atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)  # DeepSpeed's, once the tag is complete
            except Exception as err:
                ok, reason = False, _cause(err, ckpt_dir)
    if not all_ranks_ok(ok):  # every rank reaches both all-reduces, so none blocks when another fails
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        last = (latest_complete(ckpt_dir) or "none") if rank == 0 else "see rank 0"
        where = f"on rank {rank}: {reason}" if not ok else "on another rank (its error says why)"
        raise QLoRADSError(f"saving checkpoint step {step} failed {where}; the last good checkpoint ({last}) is "
                           f"kept and the partial {tag} removed. Continue with --resume once fixed")
    if rank == 0:
        complete = [t for t in _tags(ckpt_dir) if os.path.exists(os.path.join(ckpt_dir, t, MANIFEST))]
        older = [t for t in complete if t < tag and t not in protect]
        stale = [t for t in _tags(ckpt_dir) if t != tag and t not in complete]  # partial tags of killed saves
        for old in stale + older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def _save_engine(engine, ckpt_dir: str, tag: str, client_state: dict, written: dict) -> Exception | None:
    """``engine.save_checkpoint``, returning (not raising) the first failed file write. Raised inside, it would take
    this rank past DeepSpeed's closing barrier while the others wait there (a full disk on one node): every rank
    would block until the process-group timeout. The writes are the checkpoint engine's ``save`` and, on rank 0 at
    ZeRO >= 1, the copy of DeepSpeed's recovery scripts. ``latest`` is left to ``save``, so it never names a
    partial tag. Each file the checkpoint engine saves is written into a fresh private directory beside ``path``,
    its sha256 put in ``written`` (name in the tag -> digest) and the file moved over ``path``; the recovery scripts
    are copied the same way: nothing is written through a symlink planted in the checkpoint directory."""
    failed = []
    tag_dir = os.path.join(ckpt_dir, tag)

    def signed(inner):
        def save(state_dict, path):
            name = os.path.relpath(path, tag_dir).replace(os.sep, "/")
            if name.startswith("../") or os.path.isabs(name):
                raise QLoRADSError(f"DeepSpeed saved {path}, outside the checkpoint {tag_dir}; it would not be signed")
            # DeepSpeed's writers take a path (its fast/python writers open it themselves; fast appends
            # "-<rank>.<writers>"): each writes into a fresh directory of ours (0700) on the same disk, then its one
            # file is digested and moved over ``path``
            with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".qlora_ds-write-",
                                             ignore_cleanup_errors=True) as private:
                inner(state_dict, os.path.join(private, os.path.basename(path)))
                made = sorted(os.listdir(private))
                if not made:   # a rank that this writer leaves out (DeepSpeed's fast writer on a non-writer rank)
                    return
                file = os.path.join(private, made[0])
                if len(made) > 1 or not os.path.isfile(file) or os.path.islink(file) or not os.path.getsize(file):
                    raise QLoRADSError(f"DeepSpeed's checkpoint writer ({type(engine.checkpoint_engine).__name__}) "
                                       f"saving {name} wrote {made if len(made) > 1 else 'an empty file'}, not one "
                                       f"torch.save file: it cannot be signed. Remove the ds_config's "
                                       f"checkpoint.writer section (DeepSpeed's torch.save writer)")
                digest = file_sha256(file)
                os.chmod(file, 0o666 & ~_umask())   # as torch.save's open() would (the fast writer asks for 0777)
                os.replace(file, path)    # over a symlink planted at ``path``, never through it
            written[name] = digest
        return save

    def scripts(inner):
        def copy(save_path):
            with tempfile.TemporaryDirectory(prefix="qlora_ds_scripts-") as private:
                inner(private)   # DeepSpeed's copy (copyfile, then chmod +x) into a directory no one else writes
                for name in sorted(os.listdir(private)):
                    with open(os.path.join(private, name), "rb") as fh:
                        _write_new(os.path.join(save_path, name), fh.read(), os.fstat(fh.fileno()).st_mode)
        return copy

    def guarded(inner):
        def write(*args, **kwargs):
            if not failed:  # after the first failure the rest is not worth writing
                try:
                    return inner(*args, **kwargs)
                except Exception as err:
                    failed.append(err)
        return write

    swaps = [(obj, name, guarded(wrap(getattr(obj, name))))
             for obj, name, wrap in ((getattr(engine, "checkpoint_engine", None), "save", signed),
                                     (engine, "_copy_recovery_script", scripts))
             if getattr(obj, name, None) is not None]
    with _patched(*swaps):
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    return failed[0] if failed else None


def _write_new(path: str, data: bytes, mode: int | None = None) -> None:
    """``data`` as the file ``path`` (``mode``, else the umask's): written under a fresh name in its directory, then
    moved over ``path``, which replaces a symlink planted there instead of writing through it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _patched(*swaps):
    """Each (object, attribute, function) set on the instance for the block, then what the instance had put back."""
    own = [(obj, name, getattr(obj, "__dict__", {}).get(name)) for obj, name, _ in swaps]
    for obj, name, function in swaps:
        setattr(obj, name, function)
    try:
        yield
    finally:
        for obj, name, value in own:
            if value is not None:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


# What torch.save's zip writer (DeepSpeed's default) raises, as a RuntimeError, when a write fails (a full disk).
_ZIP_WRITE_FAILED = ("file write failed", "unexpected pos", "PytorchStreamWriter failed", "iostream error")


def _cause(err: Exception, ckpt_dir: str) -> str:
    """The error, and when it looks like a full disk, that and the fix."""
    text = f"{type(err).__name__}: {err}"
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    zip_write = isinstance(err, RuntimeError) and any(s in str(err) for s in _ZIP_WRITE_FAILED)
    if not (full or zip_write):
        return text
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return (f"{text} -- {'no space left on device' if full else 'a write failed, most likely a full disk'} "
            f"({free}): free space in {ckpt_dir} or point --output-dir at another disk")

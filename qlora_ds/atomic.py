"""Atomic file and directory writes: write into a temporary sibling, fsync, then ``os.replace``.

A reader (or a crash) sees either the old complete file/directory or the new complete one, never a
half-written mix. Directories are swapped with two renames (old aside, new in place): if the process
dies between them the old copy survives as ``.<name>.old-*`` next to the target. Outputs get the modes a
plain ``open``/``mkdir`` would give (0666/0777 less the umask), not mkstemp's 0600/mkdtemp's 0700.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Callable, Iterator

from .errors import QLoRADSError


_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask, read where Linux shows it; else set and restored (a process-wide change, so briefly
    to the strictest mask: a file another thread creates meanwhile is never more open than it asked)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o777)
        os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str, mode: int | None = None) -> None:
    with open(path, "rb+") as f:
        f.flush()
        if mode is not None:
            os.fchmod(f.fileno(), mode)  # through the open fd: works even if the mode takes write access away
        os.fsync(f.fileno())


def fsync_tree(path: str, file_mode: int | None = None, dir_mode: int | None = None) -> None:
    """fsync every file and directory under ``path`` (deepest first), giving them ``file_mode``/``dir_mode`` when
    set. Symlinks are left alone (their targets are not ours); a file gone meanwhile is skipped."""
    for root, _, names in os.walk(path, topdown=False):
        for name in names:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            try:
                fsync_file(file, file_mode)
            except FileNotFoundError:
                continue
        if dir_mode is not None:
            os.chmod(root, dir_mode)
        fsync_dir(root)


def atomic_write(path: str, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce the file, fsync it, then move it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    os.close(fd)
    try:
        writer(tmp)
        fsync_file(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str, allowed_existing: tuple[str, ...] | None = None) -> Iterator[str]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``.

    If ``path`` exists and ``allowed_existing`` is given, every entry in it must be one of those
    names (so replacing it can never delete unrelated files); otherwise a QLoRADSError is raised
    before anything is written. On an exception the temporary directory is removed and ``path`` is
    left untouched.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise QLoRADSError(f"{path} exists and is not a directory; choose another output directory")
        if allowed_existing is not None:
            extra = sorted(set(os.listdir(path)) - set(allowed_existing))
            if extra:
                raise QLoRADSError(f"{path} already holds files that are not part of an adapter ({extra[:5]}); "
                                   f"save the adapter into an empty or adapter-only directory (e.g. {path}/adapter)")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        yield tmp
        mask = _umask()   # writers may create 0600 files (safetensors does): every output gets the umask's mode
        fsync_tree(tmp, 0o666 & ~mask, 0o777 & ~mask)
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

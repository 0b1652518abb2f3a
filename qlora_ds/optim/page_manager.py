"""The paged buffers of one optimizer instance.

Every optimizer state buffer is allocated here. On CUDA (``paged=True``) a buffer lives in unified memory
(``cudaMallocManaged`` via the paged_optim op): under memory pressure the driver — or :meth:`evict_to_host`, called
ahead of a known spike — moves its pages to CPU RAM, and :meth:`prefetch_to_device` brings them back before the
update. On CPU (or ``paged=False``, or without the CUDA op) buffers are ordinary tensors and paging is a no-op, so
everything above this class runs unchanged. Byte and time counters record what moved each way.

Prefetch and eviction need ``cudaDevAttrConcurrentManagedAccess``; WSL2, Windows and some vGPUs lack it (there
``cudaMemPrefetchAsync`` fails with cudaErrorInvalidDevice). :func:`managed_memory_usable` queries each device once;
where it is missing, or ``cudaMallocManaged`` itself fails, state goes to plain device memory (paging becomes a
no-op) and one warning says so.
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import torch

from ._op import paged_op

__all__ = ["PageManager", "PagingStats", "managed_memory_usable"]

_concurrent: dict[int, bool] = {}  # device index -> cudaDevAttrConcurrentManagedAccess, queried once
_query_lock = threading.Lock()
_warned_no_concurrent = False
_warned_alloc_refused = False


def managed_memory_usable(device: torch.device) -> bool:
    """Whether optimizer state on this CUDA device can live in prefetchable managed memory: the compiled CUDA op
    exists and the device supports concurrent managed access (asked once per device; one warning if not)."""
    global _warned_no_concurrent
    op = paged_op("cuda")
    if op is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _query_lock:
        if index not in _concurrent:
            _concurrent[index] = bool(op.concurrent_managed_access(index))
            if not _concurrent[index] and not _warned_no_concurrent:
                _warned_no_concurrent = True
                warnings.warn(
                    f"qlora_ds: cuda:{index} has no concurrent managed memory access (WSL2, Windows or a vGPU?): "
                    f"cudaMemPrefetchAsync is unsupported there, so optimizer state uses plain GPU memory and "
                    f"paging (evict_to_host / prefetch) is a no-op.", RuntimeWarning, stacklevel=4)
        return _concurrent[index]


def _managed_alloc_refused(index: int, err: RuntimeError) -> None:
    """cudaMallocManaged failed where the attribute promised it (a sandboxed driver, e.g. gVisor; UVM unloaded): this
    device's state goes to plain memory from now on, with one warning, rather than the run stopping."""
    global _warned_alloc_refused
    with _query_lock:
        _concurrent[index] = False
        if not _warned_alloc_refused:
            _warned_alloc_refused = True
            warnings.warn(f"qlora_ds: cudaMallocManaged failed on cuda:{index} ({str(err).splitlines()[0]}): "
                          f"optimizer state uses plain GPU memory and paging (evict_to_host / prefetch) is a no-op.",
                          RuntimeWarning, stacklevel=4)


def _plain_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, device=device)


@dataclass
class PagingStats:
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    seconds_to_device: float = 0.0
    seconds_to_host: float = 0.0
    prefetches: int = 0
    evictions: int = 0


class PageManager:
    """Owns the state buffers of one optimizer; ``free()`` releases them all."""

    def __init__(self, paged: bool = True):
        self.paged = bool(paged)
        self._buffers: dict[int, torch.Tensor] = {}
        self._managed_ids: set[int] = set()  # the buffers in managed (prefetchable) memory
        self._home: dict[int, torch.device] = {}  # managed buffer id -> the GPU it was allocated for
        self._on_host = False  # True after evict_to_host until the next prefetch
        self.stats = PagingStats()
        self._warned = False

    # -- allocation ---------------------------------------------------------------------------------------------
    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zero-filled 1-D state buffer of ``numel`` elements on ``device`` (managed memory when paged on CUDA)."""
        device = torch.device(device)
        buf = None
        if self.paged and device.type == "cuda":
            if managed_memory_usable(device):
                index = device.index if device.index is not None else torch.cuda.current_device()
                try:
                    buf = paged_op("cuda").managed_empty(int(numel), dtype, index)
                except RuntimeError as err:
                    _managed_alloc_refused(index, err)
                else:
                    buf.zero_()
                    self._managed_ids.add(id(buf))
                    self._home[id(buf)] = torch.device("cuda", index)
            elif paged_op("cuda") is None and not self._warned:
                self._warned = True
                warnings.warn("qlora_ds: no CUDA paged_optim op; optimizer state uses ordinary (unpaged) GPU memory.",
                              RuntimeWarning, stacklevel=3)
        if buf is None:
            buf = _plain_zeros(int(numel), dtype, device)
        self._buffers[id(buf)] = buf
        return buf

    def release(self, *buffers: torch.Tensor) -> None:
        """Forget buffers (their memory goes when the last reference does)."""
        for b in buffers:
            self._buffers.pop(id(b), None)
            self._managed_ids.discard(id(b))
            self._home.pop(id(b), None)

    def free(self) -> None:
        """Release every buffer this manager allocated."""
        self._buffers.clear()
        self._managed_ids.clear()
        self._home.clear()

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _managed(self) -> list[torch.Tensor]:
        if not self.paged:
            return []
        return [b for i, b in self._buffers.items() if i in self._managed_ids]

    def _devices(self, bufs) -> list[torch.device]:
        """The distinct GPUs of ``bufs``: state may live on a GPU that is not the current one."""
        return list(dict.fromkeys(self._home.get(id(b), b.device) for b in bufs))

    # -- paging -------------------------------------------------------------------------------------------------
    def prefetch_to_device(self) -> int:
        """Bring evicted pages back to their GPU before an update; returns the bytes moved (0 on CPU)."""
        if not self._on_host:
            return 0
        bufs = self._managed()
        moved, secs = self._prefetch(bufs, self._devices(bufs), to_host=False)
        self._on_host = False
        self.stats.bytes_to_device += moved
        self.stats.seconds_to_device += secs
        self.stats.prefetches += 1
        return moved

    @staticmethod
    def _prefetch(bufs, devices, to_host: bool) -> tuple[int, float]:
        """cudaMemPrefetchAsync every managed buffer to the host (-1) or back to its GPU, then wait for each of
        ``devices`` (the buffers' GPUs); (bytes, seconds)."""
        op = paged_op("cuda") if bufs else None
        if op is None:
            return 0, 0.0
        start = time.perf_counter()
        moved = 0
        for b in bufs:
            op.prefetch(b, -1 if to_host else b.device.index)
            moved += b.numel() * b.element_size()
        for device in devices:
            torch.cuda.synchronize(device)
        return moved, time.perf_counter() - start

    def evict_to_host(self) -> int:
        """Memory-pressure hook: move all paged state to CPU RAM now; returns the bytes moved (0 on CPU)."""
        bufs = self._managed()
        moved, secs = self._prefetch(bufs, self._devices(bufs), to_host=True)
        self._on_host = True
        self.stats.bytes_to_host += moved
        self.stats.seconds_to_host += secs
        self.stats.evictions += 1
        return moved

    def evict_if_low_memory(self, min_free_bytes: int) -> int:
        """Evict when a GPU holding paged state has less than ``min_free_bytes`` free; returns the bytes moved."""
        bufs = self._managed()
        if not bufs:
            return 0
        low = any(torch.cuda.mem_get_info(device)[0] < min_free_bytes for device in self._devices(bufs))
        return self.evict_to_host() if low else 0

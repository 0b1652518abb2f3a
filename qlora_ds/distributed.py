"""Process-group set-up that works under the deepspeed launcher, torchrun and mpirun alike."""
from __future__ import annotations

import os
import sys
import socket

from .errors import QLoRADSError

_MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def map_mpi_env(env=os.environ) -> None:
    """Under mpirun, derive RANK/WORLD_SIZE/LOCAL_RANK from Open MPI's variables (no mpi4py needed).

    A half-set environment (some of either family missing) is refused: it would hang at rendezvous.
    """
    have_mpi = [v for v in _MPI_VARS if v in env]
    have_torch = [v for v in _TORCH_VARS if v in env]
    if have_torch and len(have_torch) != len(_TORCH_VARS) and not have_mpi:
        missing = sorted(set(_TORCH_VARS) - set(have_torch))
        raise QLoRADSError(f"distributed environment is half set: {have_torch} present but {missing} missing; "
                           f"start through deepspeed, torchrun or mpirun, or set all of {list(_TORCH_VARS)}")
    if not have_mpi or len(have_torch) == len(_TORCH_VARS):
        return
    if len(have_mpi) != len(_MPI_VARS):
        missing = sorted(set(_MPI_VARS) - set(have_mpi))
        raise QLoRADSError(f"MPI environment is half set: {missing} missing; start the job with mpirun/mpiexec "
                           f"from Open MPI, or use the deepspeed launcher / torchrun instead")
    if "MASTER_PORT" not in env:  # checked before writing anything: a refused env is left as it was
        raise QLoRADSError("under mpirun set MASTER_PORT (and MASTER_ADDR for several nodes), e.g. "
                           "`mpirun -x MASTER_ADDR=<node0> -x MASTER_PORT=29500 …`")
    env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
    env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]
    env.setdefault("MASTER_ADDR", "127.0.0.1")


def check_port_free(addr: str, port: int) -> None:
    """Rank 0 binds the rendezvous port; if something else holds it, say so instead of hanging."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as err:
            raise QLoRADSError(f"MASTER_PORT {port} on {addr} is in use ({err.strerror}); pick another port "
                               f"(--master_port for deepspeed/torchrun, MASTER_PORT for mpirun)") from None


def _on_cuda() -> bool:
    """Whether DeepSpeed's accelerator (DS_ACCELERATOR, else what it detects) is CUDA."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def init_distributed(timeout_s: float = 600.0):
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world, local)."""
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist

    map_mpi_env()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python finetune.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed's accelerator, not torch.cuda, says where the engine runs: DS_ACCELERATOR=cpu on a GPU machine
        # keeps the model and DeepSpeed's own collectives on the CPU, which NCCL cannot serve
        backend = "nccl" if _on_cuda() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if _on_cuda():
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def collective_device():
    """Where a tensor of a collective on the default process group must live: this rank's GPU when the group runs
    NCCL, which has no CPU path (a CPU tensor fails with "No backend type associated with device type cpu"), else
    the CPU (gloo, or no process group)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Tear down cleanly (avoids gloo's SIGABRT at interpreter exit; design notes §5)."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        release_shm_buffer()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in module globals: after the group is destroyed, the next engine in this
    process (a second run in a notebook, a test) would get the dead ones ("Group … is not registered")."""
    groups = sys.modules.get("deepspeed.utils.groups")
    for name, value in list(vars(groups).items()) if groups is not None else ():
        if name.startswith("_") and name.isupper() and ("GROUP" in name or name.startswith("_MPU_")):
            setattr(groups, name, {} if isinstance(value, dict) else None)


SHM_DIR, SHM_BUFFER_PREFIX = "/dev/shm", "deepspeed_allreduce_buffer_"


def shm_buffer_path(env=os.environ) -> str | None:
    """This rank's /dev/shm file of DeepSpeed's CPU shared-memory all-reduce (``deepspeed/ops/csrc/cpu/comm/shm.cpp``
    names it by uid, MASTER_ADDR, MASTER_PORT and rank), or None without a launcher's environment."""
    addr, port, rank = env.get("MASTER_ADDR"), env.get("MASTER_PORT"), env.get("RANK")
    if not (addr and port and rank):
        return None
    return os.path.join(SHM_DIR, f"{SHM_BUFFER_PREFIX}{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer(env=os.environ) -> bool:
    """Remove this rank's shared-memory all-reduce buffer (66 MB, tmpfs: RAM) once no collective is left: DeepSpeed
    never removes it, so every CPU multi-rank run left world x 66 MB of RAM behind until reboot (8 GB after one
    day's test runs here). The mapping stays valid; only the name goes. True when a file was removed."""
    path = shm_buffer_path(env)
    if path is None:
        return False
    try:
        os.unlink(path)
        return True
    except OSError:            # not created (GPU, one rank, other backend) or removed already
        return False

"""Process-group set-up that works under the deepspeed launcher, torchrun and mpirun alike."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import sys
from typing import NamedTuple

from .errors import QLoRADSError

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_DEFAULT_PORT = 29500  # DeepSpeed's (deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT) when mpi4py discovers


class Launcher(NamedTuple):
    """What a launcher that sets no RANK says about this process; ``one_host`` is None when it does not say."""
    name: str
    rank: int
    world: int
    local: int
    one_host: bool | None


# (name, (rank, world size, local rank), ranks on this host): the first three each a tuple of aliases that
# must agree when several are set. Slurm's own variables count only inside an srun step and when no MPI
# launcher's are set (see _launcher).
_MPI_LAUNCHERS = (
    ("Open MPI", (("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH", (("MV2_COMM_WORLD_RANK",), ("MV2_COMM_WORLD_SIZE",), ("MV2_COMM_WORLD_LOCAL_RANK",)),
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH / Intel MPI (PMI)", (("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID")),
     "MPI_LOCALNRANKS"),
)
_SLURM = ("Slurm srun", (("SLURM_PROCID",), ("SLURM_NTASKS",), ("SLURM_LOCALID",)), None)
# Set next to the above by PMIx launchers (Open MPI 5 included): checked against the rank, never read alone
_RANK_ALIASES = ("PMIX_RANK",)


def _family(env, name: str, groups, local_size: str | None, slurm: Launcher | None = None) -> Launcher | None:
    """One launcher's view, None when it set nothing. ``slurm``: the srun step's view, which gives what the MPI
    variables lack when it agrees with them (``srun --mpi=pmi2`` starts MPICH ranks with no local rank in PMI)."""
    if not any(var in env for group in groups for var in group):
        return None
    values = []
    for what, group in zip(("rank", "world size", "local rank"), groups):
        found = {var: env[var] for var in group if var in env}
        if len(set(found.values())) > 1:
            raise QLoRADSError(f"{name} environment contradicts itself: {found} disagree on this process's "
                               f"{what}; launch with a single mpirun/srun from a clean environment")
        try:
            values.append(int(next(iter(found.values()))) if found else None)
        except ValueError:
            raise QLoRADSError(f"{name} environment: {found} is not an integer {what}") from None
    rank, world, local = values
    one_host = env[local_size] == str(world) if local_size is not None and local_size in env else None
    if slurm is not None and (slurm.rank, slurm.world) == (rank, world):
        local = slurm.local if local is None else local
        one_host = slurm.one_host if one_host is None else one_host
    missing = [" or ".join(group) for group, value in zip(groups, (rank, world, local)) if value is None]
    if missing:
        present = [var for group in groups for var in group if var in env]
        raise QLoRADSError(f"MPI environment is half set: {missing} missing; start the job with "
                           f"mpirun/mpiexec/srun, or use the deepspeed launcher / torchrun instead ({name}: "
                           f"{present} present)")
    if not (0 <= rank < world and 0 <= local < world):
        raise QLoRADSError(f"{name} environment is inconsistent: rank {rank}, world size {world}, local rank "
                           f"{local}; launch with a single mpirun/srun from a clean environment")
    return Launcher(name, rank, world, local, one_host)


def _srun_step(env) -> Launcher | None:
    """Slurm's view inside an srun step (SLURM_STEP_ID; an sbatch script without srun has SLURM_PROCID=0 too)."""
    if "SLURM_STEP_ID" not in env:
        return None
    if "SLURM_STEP_NUM_TASKS" in env:   # the step's tasks: `srun --pty bash` in `salloc -n 4` is a step of one
        env = {**env, "SLURM_NTASKS": env["SLURM_STEP_NUM_TASKS"]}
    found = _family(env, *_SLURM)
    nodes = env.get("SLURM_STEP_NUM_NODES")
    return found._replace(one_host=None if nodes is None else nodes == "1") if found else None


def _launcher(env) -> Launcher | None:
    """This process's rank, world and local rank from MPI's or srun's variables; None when none is set; a
    QLoRADSError when they are half set or contradict each other (either would hang at rendezvous)."""
    try:
        slurm = _srun_step(env)
    except QLoRADSError:
        slurm = None                     # not ours to judge when an MPI launcher is there; raised below if not
    # mpirun inside an allocation: its daemons are srun steps, so its ranks see Slurm's (other) numbers too
    found = [f for f in (_family(env, *fam, slurm=slurm) for fam in _MPI_LAUNCHERS) if f is not None]
    found = found or [f for f in [_srun_step(env)] if f is not None]
    aliases = {var: env[var] for var in _RANK_ALIASES if var in env}
    if not found:
        if aliases:
            raise QLoRADSError(f"MPI environment is half set: {aliases} but no world size or local rank; set "
                               f"{list(_TORCH_VARS)}, MASTER_ADDR and MASTER_PORT, or use the deepspeed launcher")
        return None
    first = found[0]
    for other in found[1:] + [first._replace(name=var, rank=value) for var, value in aliases.items()]:
        if (str(other.rank), other.world, other.local) != (str(first.rank), first.world, first.local):
            raise QLoRADSError(f"MPI environment contradicts itself: {first.name} says rank {first.rank} of "
                               f"{first.world} (local {first.local}), {other.name} says rank {other.rank} of "
                               f"{other.world} (local {other.local}); launch with a single mpirun/srun from a clean "
                               f"environment")
    one = [f.one_host for f in found if f.one_host is not None]
    return first._replace(one_host=one[0] if one else None)


def _mpi4py_installed() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def map_mpi_env(env=os.environ) -> Launcher | None:
    """Under mpirun/mpiexec (Open MPI, MPICH, Intel MPI, MVAPICH) or srun, derive RANK/WORLD_SIZE/LOCAL_RANK
    from the launcher's variables. RANK, WORLD_SIZE and LOCAL_RANK set by the deepspeed launcher or torchrun win.

    Returns the launcher when rank 0's address must be discovered through mpi4py (``mpi_discover``): no
    MASTER_PORT (``deepspeed --launcher openmpi`` exports none), or no MASTER_ADDR on a job that spans hosts,
    where 127.0.0.1 would leave the other hosts' ranks waiting at rendezvous. The environment is then left as
    it was, as it is whenever this raises: a half-set or contradictory environment, or a missing address with
    no mpi4py to discover it."""
    have_torch = [v for v in _TORCH_VARS if v in env]
    launcher = None if len(have_torch) == len(_TORCH_VARS) else _launcher(env)
    if have_torch and len(have_torch) != len(_TORCH_VARS) and launcher is None:
        missing = sorted(set(_TORCH_VARS) - set(have_torch))
        raise QLoRADSError(f"distributed environment is half set: {have_torch} present but {missing} missing; "
                           f"start through deepspeed, torchrun or mpirun, or set all of {list(_TORCH_VARS)}")
    if launcher is None or launcher.world == 1:
        return None          # a world of one (`srun python …` of one task): init_distributed's local rendezvous
    if "MASTER_PORT" in env and ("MASTER_ADDR" in env or launcher.one_host):
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = map(str, launcher[1:4])
        env.setdefault("MASTER_ADDR", "127.0.0.1")  # every rank on this host
        return None
    if _mpi4py_installed():
        return launcher
    if "MASTER_PORT" not in env:
        raise QLoRADSError(f"under mpirun set MASTER_PORT (and MASTER_ADDR for several nodes), e.g. `mpirun -x "
                           f"MASTER_ADDR=<node0> -x MASTER_PORT=29500 …` (`-genv` for MPICH/Intel MPI, `export` "
                           f"before srun), or `pip install mpi4py` to discover both ({launcher.name})")
    raise QLoRADSError(f"under {launcher.name} with MASTER_PORT but no MASTER_ADDR, and the job spans several hosts "
                       f"(or the launcher does not say): the default 127.0.0.1 cannot reach rank 0 from another "
                       f"host. Set MASTER_ADDR to rank 0's host (`mpirun -x MASTER_ADDR=<node0> …`), or "
                       f"`pip install mpi4py` to discover it")


def mpi_discover(launcher: Launcher) -> None:
    """DeepSpeed's mpi4py discovery (rank 0 broadcasts its address; port MASTER_PORT, else 29500), checked
    against the launcher: an mpi4py built for another MPI runs each process as a world of its own. A
    MASTER_ADDR the user set is kept (DeepSpeed's pick is rank 0's first address, maybe the wrong network)."""
    env = os.environ  # where DeepSpeed's discovery writes
    addr = env.get("MASTER_ADDR")
    try:
        from deepspeed.comm.comm import mpi_discovery
        mpi_discovery(distributed_port=int(env.get("MASTER_PORT", _DEFAULT_PORT)), verbose=False)
    except Exception as err:
        raise QLoRADSError(f"under {launcher.name} without MASTER_ADDR/MASTER_PORT, discovering rank 0's address "
                           f"through mpi4py failed ({type(err).__name__}: {err}); set MASTER_ADDR=<node0> and "
                           f"MASTER_PORT=29500 for every rank (`mpirun -x …`)") from None
    seen = (int(env["RANK"]), int(env["WORLD_SIZE"]))
    if seen != (launcher.rank, launcher.world):
        raise QLoRADSError(f"mpi4py sees rank {seen[0]} of {seen[1]} but {launcher.name} started rank "
                           f"{launcher.rank} of {launcher.world}: mpi4py is built for another MPI. Install it for "
                           f"this one (`pip install --no-binary mpi4py mpi4py`), or set MASTER_ADDR=<node0> and "
                           f"MASTER_PORT=29500 for every rank")
    env["LOCAL_RANK"] = str(launcher.local)  # the launcher knows; DeepSpeed guesses from host names
    if addr:
        env["MASTER_ADDR"] = addr


def check_port_free(addr: str, port: int) -> None:
    """Rank 0 binds the rendezvous port; if something else holds it, say so instead of hanging."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as err:
            raise QLoRADSError(f"MASTER_PORT {port} on {addr} is in use ({err.strerror}); pick another port "
                               f"(--master_port for deepspeed/torchrun, MASTER_PORT for mpirun)") from None


_LOCAL_ADDRS = ("127.0.0.1", "localhost", "::1")


def check_rendezvous_port(env=os.environ) -> None:
    """On rank 0, a MASTER_PORT on this host that something else holds, named before torch's rendezvous fails on it
    with a socket error. Not under torchrun, whose agent holds the port itself (TORCHELASTIC_USE_AGENT_STORE), nor
    for a MASTER_ADDR of another host."""
    if (env.get("RANK") == "0" and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            and env.get("MASTER_ADDR") in _LOCAL_ADDRS and str(env.get("MASTER_PORT", "")).isdigit()):
        check_port_free(env["MASTER_ADDR"], int(env["MASTER_PORT"]))


def _on_cuda() -> bool:
    """Whether DeepSpeed's accelerator (DS_ACCELERATOR, else what it detects) is CUDA."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def load_device(zero_stage: int):
    """Where ``from_pretrained`` puts each module as soon as it is filled: this rank's GPU below ZeRO-3 (host memory
    then holds one module, not the 4-bit model), None otherwise (the CPU; under ZeRO-3, zero.Init places the
    partitions)."""
    if zero_stage < 3 and _on_cuda():
        import torch
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextlib.contextmanager
def _without_shm_comm_op():
    """DeepSpeed's process group loads its CPU shared-memory all-reduce op (``deepspeed_shm_comm``) at every start,
    though it serves only ``inference_all_reduce`` (AutoTP inference, which falls back to the process group without
    it): ZeRO training never calls it. Its JIT load waits without end on torch's build ``lock``, which a job killed
    while building it (24 s on an empty cache) leaves behind: every later run then hung before the process group
    existed. It also mapped a 66 MB /dev/shm buffer per rank that DeepSpeed never removes. So it is not loaded."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")    # `import … as` would give deepspeed.comm's torch
    build = getattr(ds_torch, "build_shm_op", None)
    if build is None:                  # another DeepSpeed: nothing to leave out
        yield
        return
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def init_distributed(timeout_s: float = 600.0):
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world, local)."""
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist

    launcher = map_mpi_env()
    if not dist.is_initialized():
        if launcher is not None:
            mpi_discover(launcher)
        elif "RANK" not in os.environ:  # plain `python finetune.py`, no launcher's variables: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        check_rendezvous_port()
        # DeepSpeed's accelerator, not torch.cuda, says where the engine runs: DS_ACCELERATOR=cpu on a GPU machine
        # keeps the model and DeepSpeed's own collectives on the CPU, which NCCL cannot serve
        backend = "nccl" if _on_cuda() else "gloo"
        with _without_shm_comm_op():
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


def all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (True without a process group). Every rank must call it: a rank whose
    write failed reports through it instead of raising past a collective the others then wait in."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], device=collective_device())    # NCCL takes no CPU tensors
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def all_mean(values: list[float]) -> list[float]:
    """The mean of each of ``values`` over the ranks (every rank must call it), as float64."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=collective_device())   # NCCL takes no CPU tensors
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


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
    day's test runs here). init_distributed no longer loads that op; a group DeepSpeed started itself still maps one.
    The mapping stays valid; only the name goes. True when a file was removed."""
    path = shm_buffer_path(env)
    if path is None:
        return False
    try:
        os.unlink(path)
        return True
    except OSError:            # not created (GPU, one rank, other backend) or removed already
        return False

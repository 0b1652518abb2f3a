"""Start real multi-process jobs from tests: torchrun or the deepspeed launcher, on localhost/gloo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the master ports of the jobs this process started: DeepSpeed names its /dev/shm buffers by port, so a check (or the
# session's clean-up) can tell this process's buffers from those of another pytest worker running beside it
JOB_PORTS: set[int] = set()


def shm_buffers(ports=None) -> set[str]:
    """Names of DeepSpeed's CPU all-reduce buffers now in /dev/shm (qlora_ds.distributed.release_shm_buffer), only
    those of jobs on ``ports`` (an int or a set) when given."""
    from qlora_ds.distributed import SHM_BUFFER_PREFIX, SHM_DIR

    names = {f for f in os.listdir(SHM_DIR) if f.startswith(SHM_BUFFER_PREFIX)} if os.path.isdir(SHM_DIR) else set()
    if ports is None:
        return names
    ports = {str(p) for p in ({ports} if isinstance(ports, int) else ports)}
    return {f for f in names if f.split("_")[-2] in ports}          # ..._<uid>_<addr>_<port>_<rank>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    JOB_PORTS.add(port)
    return port


def dist_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.expanduser("~/.cache/qlora_ds/torch_extensions")),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env["MASTER_PORT"] = str(free_port())     # a single-process run would otherwise take 29500, maybe held already
    env.update(extra)
    return env


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, **env: str):
    """Run ``script`` under torchrun with ``nproc`` CPU ranks; returns the CompletedProcess (check=False)."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port}", "--master_addr=127.0.0.1", str(script), *args]
    return _run(cmd, port, env, timeout)


def run_deepspeed(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, **env: str):
    """Run ``script`` under the ``deepspeed`` launcher with ``nproc`` CPU ranks on localhost."""
    launcher = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    cmd = [str(launcher), f"--num_accelerators={nproc}", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(script), *args]
    return _run(cmd, port, env, timeout)


def _run(cmd, port: int, env: dict, timeout: float):
    """The job's CompletedProcess (check=False), with its ``master_port`` (its ranks' /dev/shm buffers: shm_buffers)."""
    proc = subprocess.run(cmd, env=dist_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    proc.master_port = port
    return proc


def check(proc) -> str:
    """Assert success and return stdout; on failure show the tail of both streams."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc.stdout

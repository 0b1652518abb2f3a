"""Start real multi-process jobs from tests: torchrun or the deepspeed launcher, on localhost/gloo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shm_buffers() -> set[str]:
    """Names of DeepSpeed's CPU all-reduce buffers now in /dev/shm (qlora_ds.distributed.release_shm_buffer)."""
    from qlora_ds.distributed import SHM_BUFFER_PREFIX, SHM_DIR

    return {f for f in os.listdir(SHM_DIR) if f.startswith(SHM_BUFFER_PREFIX)} if os.path.isdir(SHM_DIR) else set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(script), *args]
    return subprocess.run(cmd, env=dist_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_deepspeed(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, **env: str):
    """Run ``script`` under the ``deepspeed`` launcher with ``nproc`` CPU ranks on localhost."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), f"--num_accelerators={nproc}", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(script), *args]
    return subprocess.run(cmd, env=dist_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check(proc) -> str:
    """Assert success and return stdout; on failure show the tail of both streams."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc.stdout

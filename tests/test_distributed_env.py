"""Rank, world size and local rank from each launcher's environment (qlora_ds.distributed.map_mpi_env): Open MPI,
MPICH / Intel MPI / Cray PALS (PMI), PMIx, MVAPICH and Slurm's srun; half-set and contradictory sets refused; rank 0's
address discovered through mpi4py where the launcher exports none (``deepspeed --launcher openmpi``, a job over
several hosts without MASTER_ADDR). The last test runs the discovery under a real 2-rank Open MPI ``mpirun``.

This file is also that test's worker: ``mpirun -np 2 python tests/test_distributed_env.py OUT_DIR``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

PORT = {"MASTER_PORT": "29999"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "1"}                   # Open MPI 5 (prterun) sets both
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}  # MPICH, Intel MPI
PALS = {"PMI_RANK": "1", "PMI_SIZE": "2", "PALS_LOCAL_RANKID": "1", "PALS_RANKID": "1"}   # Cray PALS (mpiexec)
MVAPICH = {"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "1",
           "MV2_COMM_WORLD_LOCAL_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_ID": "7"}
LAUNCHERS = {"open_mpi": OPEN_MPI, "mpich_intel_mpi": HYDRA, "cray_pals": PALS, "mvapich": MVAPICH, "srun": SRUN,
             "srun_mpi_pmi2": {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "5", **SRUN},  # local rank: Slurm's
             "srun_mpi_pmix": {"PMIX_RANK": "1", **SRUN}}


@pytest.fixture
def mpi4py(monkeypatch):
    """Whether mpi4py is installed, as map_mpi_env sees it (it is in this venv: the [mpi] extra)."""
    from qlora_ds import distributed

    def installed(yes: bool):
        monkeypatch.setattr(distributed, "_mpi4py_installed", lambda: yes)
    return installed


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_each_launcher_maps_to_rank_world_and_local_rank(launcher):
    from qlora_ds.distributed import map_mpi_env

    env = {**LAUNCHERS[launcher], **PORT, "MASTER_ADDR": "node0"}
    assert map_mpi_env(env) is None
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "node0")
    env = {**LAUNCHERS[launcher], **PORT}
    if launcher != "cray_pals":                 # which says nothing of the hosts: rank 0's address is discovered
        assert map_mpi_env(env) is None and env["MASTER_ADDR"] == "127.0.0.1"           # every rank on one host


@pytest.mark.parametrize("launcher", ["mpich_intel_mpi", "srun"])
def test_mpich_rank_is_not_a_world_of_one(monkeypatch, launcher):
    """The reviewer's repro: rank 1 of 2 under MPICH / Intel MPI's mpirun became rank 0 of a world of 1."""
    import deepspeed
    import torch.distributed as dist

    from qlora_ds import distributed

    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, timeout: seen.update(os.environ))
    monkeypatch.setattr(distributed, "_on_cuda", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: int(os.environ["RANK"]))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: int(os.environ["WORLD_SIZE"]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):   # unset now, restored after
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    for var, value in {**LAUNCHERS[launcher], **PORT}.items():
        monkeypatch.setenv(var, value)
    assert distributed.init_distributed() == (1, 2, 1)
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["MASTER_ADDR"], seen["MASTER_PORT"]) == ("1", "2", "127.0.0.1",
                                                                                            "29999")


@pytest.mark.parametrize("env", [
    {},                                                                  # plain python
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"},   # an sbatch script
], ids=["plain", "sbatch_without_srun"])
def test_a_world_of_one_only_without_a_launcher(env):
    from qlora_ds.distributed import map_mpi_env

    given = dict(env)
    assert map_mpi_env(given) is None and given == env


def test_torch_variables_win_and_mpi_inside_an_allocation_wins_over_slurm():
    from qlora_ds.distributed import map_mpi_env

    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", **PORT}
    env = {**torchrun, **SRUN, "PMI_RANK": "0"}        # torchrun / deepspeed's launcher under srun or MPICH's helper
    assert map_mpi_env(env) is None and {k: env[k] for k in torchrun} == torchrun
    # Open MPI's mpirun in an sbatch script: its daemons run as srun steps, every rank inherits SLURM_PROCID=0
    env = {**OPEN_MPI, **PORT, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}
    assert map_mpi_env(env) is None and (env["RANK"], env["WORLD_SIZE"]) == ("1", "2")


@pytest.mark.parametrize("env,match", [
    ({"PMI_RANK": "1"}, r"half set: \['PMI_SIZE', 'MPI_LOCALRANKID or PALS_LOCAL_RANKID'\] missing; start the job"),
    ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"}, r"half set: \['MV2_COMM_WORLD_LOCAL_RANK'\] missing"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, r"half set: \['SLURM_LOCALID'\] missing"),
    ({"PMIX_RANK": "1"}, r"half set: \{'PMIX_RANK': '1'\} but no world size or local rank; set \['RANK'"),
    ({**OPEN_MPI, "PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"},
     r"contradicts itself: Open MPI says rank 1 of 2 \(local 1\), MPICH / Intel MPI \(PMI\) says rank 0 of 2"),
    ({**OPEN_MPI, "PMIX_RANK": "0"}, r"contradicts itself: Open MPI says rank 1 .*PMIX_RANK says rank 0"),
    ({**PALS, "MPI_LOCALRANKID": "0"}, r"contradicts itself: \{'MPI_LOCALRANKID': '0', 'PALS_LOCAL_RANKID': '1'\}"),
    ({**HYDRA, "PMI_SIZE": "two"}, r"\{'PMI_SIZE': 'two'\} is not an integer world size"),
    ({**HYDRA, "PMI_RANK": "2"}, r"inconsistent: rank 2, world size 2"),
], ids=["pmi_rank_only", "mvapich_no_local", "srun_no_local", "pmix_alone", "ompi_vs_pmi", "pmix_vs_ompi",
        "local_aliases_differ", "not_an_integer", "rank_past_world"])
def test_half_set_or_contradictory_launcher_env_is_refused_untouched(env, match):
    from qlora_ds.distributed import map_mpi_env
    from qlora_ds.errors import QLoRADSError

    given = {**env, **PORT}
    with pytest.raises(QLoRADSError, match=match):
        map_mpi_env(given)
    assert given == {**env, **PORT}


@pytest.mark.parametrize("env", [
    {k: v for k, v in OPEN_MPI.items()},                               # `deepspeed --launcher openmpi`: no MASTER_*
    {**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "1", **PORT},           # 2 hosts, MASTER_PORT only
    {**{k: v for k, v in HYDRA.items() if k != "MPI_LOCALNRANKS"}, **PORT},     # hosts unknown, MASTER_PORT only
    {**SRUN, "SLURM_STEP_NUM_NODES": "2", **PORT},
], ids=["no_master_vars", "several_hosts", "hosts_unknown", "srun_several_nodes"])
def test_without_rank_0s_address_it_is_discovered_through_mpi4py_or_refused(env, mpi4py):
    from qlora_ds.distributed import map_mpi_env
    from qlora_ds.errors import QLoRADSError

    given = dict(env)
    mpi4py(True)
    launcher = map_mpi_env(given)
    assert (launcher.rank, launcher.world, launcher.local) == (1, 2, 1) and given == env     # left to discovery
    mpi4py(False)
    match = r"under mpirun set MASTER_PORT .*pip install mpi4py" if "MASTER_PORT" not in env else \
        r"with MASTER_PORT but no MASTER_ADDR, and the job spans several hosts .*Set MASTER_ADDR to rank 0's host"
    with pytest.raises(QLoRADSError, match=match):
        map_mpi_env(given)
    assert given == env
    mpi4py(True)
    given["MASTER_ADDR"] = "node0"                                      # named: no discovery needed for the address
    if "MASTER_PORT" in env:
        assert map_mpi_env(given) is None and (given["RANK"], given["MASTER_ADDR"]) == ("1", "node0")


@pytest.mark.parametrize("user_env,port,addr", [
    ({}, "29500", "10.0.0.1"),
    ({"MASTER_PORT": "31000"}, "31000", "10.0.0.1"),
    ({"MASTER_ADDR": "node0"}, "29500", "node0"),                        # the user's pick beats rank 0's first address
])
def test_mpi_discover_uses_deepspeeds_discovery_and_checks_it(monkeypatch, user_env, port, addr):
    import deepspeed.comm.comm as ds_comm

    from qlora_ds.distributed import Launcher, mpi_discover
    from qlora_ds.errors import QLoRADSError

    def discovery(distributed_port, verbose):                           # what DeepSpeed's writes, from mpi4py
        os.environ.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="10.0.0.1",
                          MASTER_PORT=str(distributed_port))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, user_env.get(var, "0"))
        if var not in user_env:
            monkeypatch.delenv(var)
    monkeypatch.setattr(ds_comm, "mpi_discovery", discovery)
    mpi_discover(Launcher("Open MPI", 1, 2, 1, False))
    assert [os.environ[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == \
        ["1", "2", "1", addr, port]
    with pytest.raises(QLoRADSError, match=r"mpi4py sees rank 1 of 2 but MPICH / Intel MPI \(PMI\) started rank 1 "
                                           r"of 4: mpi4py is built for another MPI"):
        mpi_discover(Launcher("MPICH / Intel MPI (PMI)", 1, 4, 1, None))

    def no_mpi(distributed_port, verbose):
        raise ImportError("libmpi.so.40: cannot open shared object file")
    monkeypatch.setattr(ds_comm, "mpi_discovery", no_mpi)
    with pytest.raises(QLoRADSError, match=r"through mpi4py failed \(ImportError: libmpi.*set MASTER_ADDR=<node0>"):
        mpi_discover(Launcher("Open MPI", 1, 2, 1, False))


MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(MPIRUN is None, reason="Open MPI not installed (pip install -e .[mpi])")
def test_mpirun_over_two_hosts_without_master_addr_discovers_rank_0s_address(tmp_path):
    """Two ranks that Open MPI reports on two hosts (each its host's only rank), MASTER_PORT but no MASTER_ADDR:
    rank 0's address comes from mpi4py, not 127.0.0.1, and the group works."""
    from tests.dist_utils import dist_env, free_port

    port = str(free_port())
    env = dist_env(MASTER_PORT=port)
    env.pop("MASTER_ADDR")
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl_tcp_if_include", "lo",
           "-x", "MASTER_PORT", "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH", "-x", "GLOO_SOCKET_IFNAME",
           "-x", "TORCH_EXTENSIONS_DIR", "-x", "OMP_NUM_THREADS", sys.executable, __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(g["rank"], g["world"], g["local"], g["sum"]) for g in got] == [(0, 2, 0, 3.0), (1, 2, 0, 3.0)]
    assert got[0]["addr"] == got[1]["addr"] != "127.0.0.1" and got[0]["port"] == got[1]["port"] == port


def _worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    from qlora_ds.distributed import init_distributed, shutdown

    os.environ.update(OMPI_COMM_WORLD_LOCAL_SIZE="1", OMPI_COMM_WORLD_LOCAL_RANK="0")   # as if on 2 hosts
    rank, world, local = init_distributed(timeout_s=30)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "local": local, "sum": total.item(),
                   "addr": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]}, fh)
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.parametrize("env", [
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"},      # srun of one task
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0",
     "SLURM_STEP_ID": "3"},                                                          # srun --pty bash in salloc -n 4
    {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},   # mpirun -np 1
], ids=["srun-one-task", "salloc-pty-step", "mpirun-np-1"])
def test_a_launcher_world_of_one_is_a_local_run(env):
    """A world of one needs no rendezvous: no MASTER_PORT (or mpi4py) demanded, no fixed discovery port that two
    one-GPU jobs on a node would share; init_distributed then picks 127.0.0.1 and a free port."""
    from qlora_ds.distributed import map_mpi_env

    env = dict(env)
    assert map_mpi_env(env) is None
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env)


def test_init_distributed_never_waits_on_a_stale_shm_op_build_lock(tmp_path):
    """A job killed while DeepSpeed JIT-built its CPU shared-memory all-reduce op left torch's build ``lock`` behind,
    and every later run hung in init_distributed for good (torch waits on it without a timeout). That op serves only
    AutoTP inference, so it is no longer loaded: the stale lock holds nothing up, and nothing is built for it."""
    from .dist_utils import REPO, dist_env

    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()
    code = ("from qlora_ds.distributed import init_distributed, shutdown\n"
            "print('rank, world, local', init_distributed(timeout_s=30))\nshutdown()")
    proc = subprocess.run([sys.executable, "-c", code], env=dist_env(TORCH_EXTENSIONS_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=90, cwd=REPO)
    assert proc.returncode == 0 and "rank, world, local (0, 1, 0)" in proc.stdout, proc.stderr[-3000:]
    assert sorted(p.name for p in stale.parent.iterdir()) == ["lock"]

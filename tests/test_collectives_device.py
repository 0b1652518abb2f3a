"""Our own collectives put their tensors where the process group can take them: on a GPU run the group is NCCL
(qlora_ds.distributed.init_distributed, deepspeed.init_distributed), which has no CPU path (a CPU tensor fails with
"No backend type associated with device type cpu"), so every flag / loss / memory figure we all-reduce or all-gather
lives on ``collective_device()``. CPU runs (gloo) never see the difference, hence these checks without a GPU."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist

from qlora_ds import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("backend,want", [("nccl", "cuda:3"), ("cpu:gloo,cuda:nccl", "cuda:3"), ("gloo", "cpu")])
def test_collective_device_follows_the_backend(monkeypatch, backend, want):
    assert distributed.collective_device() == torch.device("cpu")         # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device(want)


@pytest.fixture
def fake_group(monkeypatch):
    """A one-rank 'NCCL' group: the collectives accept only tensors on the device collective_device() named (here
    the CPU stands in for the GPU, which a CPU machine cannot allocate on)."""
    asked = []

    def where():
        asked.append(torch.device("cpu"))
        return asked[-1]

    def check(t):
        if not asked or t.device != asked[-1]:
            raise RuntimeError("No backend type associated with device type cpu (tensor not on collective_device())")

    monkeypatch.setattr(distributed, "collective_device", where)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None, async_op=False: check(t))

    def all_gather(out, t, group=None, async_op=False):
        check(t)
        out[0].copy_(t)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    return asked


def test_checkpoint_all_ok_flag_on_the_collective_device(fake_group):
    from qlora_ds import checkpointing

    assert checkpointing.all_ranks_ok(True) and not checkpointing.all_ranks_ok(False)
    assert len(fake_group) == 2


def test_finetune_all_mean_on_the_collective_device(fake_group):
    spec = importlib.util.spec_from_file_location("qlora_ds_finetune_collectives",
                                                  os.path.join(REPO, "launch", "finetune.py"))
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    assert finetune._all_mean([2.0, 4.0]) == [2.0, 4.0] and fake_group


def test_sharded_heldout_loss_on_the_collective_device(fake_group, monkeypatch):
    from qlora_ds.eval import sharded

    from .test_heldout import _Engine, _example
    from .tiny_models import tiny_model

    monkeypatch.setattr(sharded, "collective_device", distributed.collective_device)   # imported by name there
    g = torch.Generator().manual_seed(0)
    loss, widths = sharded.sharded_heldout_loss(_Engine(tiny_model("llama")), [_example(n, 2, g) for n in (5, 7)],
                                                0, 2)
    assert loss > 0 and widths == {7} and fake_group


@pytest.mark.parametrize("accelerator,backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_backend_follows_deepspeeds_accelerator_not_torch_cuda(monkeypatch, accelerator, backend):
    """DS_ACCELERATOR=cpu on a GPU machine: the engine and DeepSpeed's collectives stay on the CPU, so the process
    group must be gloo (NCCL serves no CPU tensor), and no GPU is claimed."""
    import deepspeed
    import deepspeed.accelerator

    class Accelerator:
        def device_name(self, index=None):
            return accelerator

    started, claimed = [], []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, timeout: started.append(dist_backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)           # a GPU is there either way
    monkeypatch.setattr(torch.cuda, "set_device", claimed.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):   # unset now, restored after
        monkeypatch.setenv(var, "0")                     # (what init_distributed sets is undone with them)
        monkeypatch.delenv(var)
    assert distributed.init_distributed() == (0, 1, 0)
    assert started == [backend] and claimed == ([0] if accelerator == "cuda" else [])

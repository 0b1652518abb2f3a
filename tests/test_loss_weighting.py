"""finetune's --loss-weighting: with "tokens" an optimizer step's gradient is that of the mean loss over all its
target tokens, however the step is split into micro-batches (transformers' Trainer does the same); "micro-batch"
(runs from before the option) weighs each micro-batch's mean loss equally. Checked through finetune's own Loop
(its per-step token count and loss call) on a real DeepSpeed engine, whose backward divides by the accumulation
steps."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import torch

from qlora_ds.loss import causal_lm_loss
from tests.helpers import launch_script
from tests.tiny_models import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IGNORE = -100


def _examples():
    """Two examples of very different target counts (2 and 17): the weighting matters."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, targets in ((6, 2), (20, 17)):
        ids = torch.randint(3, 100, (length,), generator=g)
        labels = ids.clone()
        labels[: length - targets] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


class OneEpoch(list):
    """finetune's batch order: ``epoch(e)`` lists the micro-batches' example indices."""

    def epoch(self, _e):
        return self


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _loop_grads(weighting: str) -> torch.Tensor:
    """Gradients after one accumulation window of 2 micro-batches (1 example each), through finetune's Loop."""
    import deepspeed
    ft = launch_script("finetune")
    model = tiny_model("llama").train()
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "train_batch_size": 2,
           "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=cfg)
    loop = ft.Loop.__new__(ft.Loop)
    args = argparse.Namespace(loss_weighting=weighting, seed=0, chunked_loss=True, packing=False,
                              pad_to_multiple_of=1, max_len=64, nan_policy="stop")
    loop.run = types.SimpleNamespace(args=args, accum=2, world=1, rank=0)
    loop.engine, loop.pad_id, loop.widths = engine, 0, set()
    loop.train_ex = _examples()
    loop.batches = OneEpoch([[0], [1]])
    loop.step, loop.micro_step, loop.items = 0, 0, None
    for _ in range(2):
        items = loop.step_items()
        loss = loop.forward(loop.next_batch(), items)
        engine.backward(loss)
    return _grads(model)


def _reference(weighting: str) -> torch.Tensor:
    model = tiny_model("llama").train()
    losses = [causal_lm_loss(model, {k: v[None] for k, v in e.items()}, chunked=False) for e in _examples()]
    if weighting == "tokens":
        counts = [int((e["labels"][1:] != IGNORE).sum()) for e in _examples()]
        loss = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    else:
        loss = sum(losses) / len(losses)
    loss.backward()
    return _grads(model)


def _errors() -> dict:
    """In a fresh process (DeepSpeed keeps its process groups globally): each weighting's gradient against both
    references, as relative errors."""
    import torch.distributed as dist
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    refs = {w: _reference(w) for w in ("tokens", "micro-batch")}
    out = {}
    for weighting in refs:
        got = _loop_grads(weighting)
        out[weighting] = {w: ((got - r).norm() / r.norm()).item() for w, r in refs.items()}
    dist.destroy_process_group()
    return out


def test_accumulated_gradient_is_the_chosen_mean():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "tests.test_loss_weighting"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    for weighting, other in (("tokens", "micro-batch"), ("micro-batch", "tokens")):
        assert err[weighting][weighting] < 1e-4, err
        assert err[weighting][other] > 0.05, err      # the two weightings really differ on these examples


if __name__ == "__main__":
    print(json.dumps(_errors()))

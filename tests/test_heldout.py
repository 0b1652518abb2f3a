"""The held-out loss of a distributed run (qlora_ds.eval.sharded): token-weighted over examples, batched by length."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from qlora_ds.data import collate
from qlora_ds.eval.sharded import sharded_heldout_loss
from qlora_ds.loss import causal_lm_loss

from .tiny_models import VOCAB, tiny_model


class _Engine(torch.nn.Module):
    """What sharded_heldout_loss needs of a DeepSpeed engine: the call, .module, .device, eval()/train()."""

    def __init__(self, model):
        super().__init__()
        self.module, self.device = model, torch.device("cpu")

    def forward(self, **kw):
        return self.module(**kw)


def _example(n: int, prompt: int, g: torch.Generator) -> dict:
    ids = torch.randint(1, VOCAB, (n,), generator=g)
    labels = ids.clone()
    labels[:prompt] = -100                      # response-only: the prompt has no target
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("chunked", [True, False])
def test_heldout_loss_is_token_weighted_and_batched_by_length(tmp_path, chunked):
    g = torch.Generator().manual_seed(0)
    examples = [_example(n, 2, g) for n in (17, 3, 16, 4, 15, 5)]
    model = tiny_model("llama")
    engine = _Engine(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loss, widths = sharded_heldout_loss(engine, examples, 0, 2, chunked=chunked)
    finally:
        dist.destroy_process_group()
    # each example alone, weighted by its targets: padding and batching change nothing
    with torch.no_grad():
        per = [(causal_lm_loss(model, collate([e], 0)).item(), int((e["labels"][1:] != -100).sum()))
               for e in examples]
    want = sum(l * n for l, n in per) / sum(n for _, n in per)
    assert loss == pytest.approx(want, rel=1e-5)
    # batches of similar lengths: (3, 4), (5, 15), (16, 17), not the given order's (17, 3), (16, 4), (15, 5)
    assert widths == {4, 15, 17}
    assert engine.training                      # handed back in training mode

"""Users' own ds_config sections under finetune: what DeepSpeed does from hooks on the engine's forward outputs
(offloaded ZeRO gradient accumulation, wall-clock timers) works with the chunked loss, which returns its own loss."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .dist_utils import check
from .test_finetune_resume import DS, _args, _finetune, _steps, word  # noqa: F401 - word is a fixture


def _run(word, name, ds, *extra):
    path = word["root"] / f"{name}.ds.json"
    path.write_text(json.dumps(ds))
    out = word["root"] / name
    check(_finetune(*_args(word, out, "--max-steps", "2", "--eval-size", "0", "--warmup-ratio", "0", "--dtype",
                           "fp32", *extra, ds=str(path))))
    return [r["loss"] for r in _steps(out)], load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("timers", [False, True])
def test_offloaded_accumulation_with_the_chunked_loss_equals_full_logits(word, timers):
    """ZeRO-2 with offload_optimizer, accumulation 2, and LoRA gradients reduced during backward (the LoRA is
    larger than reduce_bucket_size, as a 7B r64 LoRA is with configs/ds_single_gpu.json's 5e7): the chunked loss
    trained on wrong gradients (the engine's backward prologue never ran: the adapter was 0.97 relatively off)."""
    ds = {**DS, "zero_force_ds_cpu_optimizer": False, "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "offload_optimizer": {"device": "cpu"}},
          "wall_clock_breakdown": timers}   # its timers start in that prologue too (it crashed without it)
    chunked_loss, chunked = _run(word, f"offload_chunked_{timers}", ds)
    full_loss, full = _run(word, f"offload_full_{timers}", ds, "--no-chunked-loss")
    assert len(chunked_loss) == len(full_loss) == 2
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(chunked_loss, full_loss)), (chunked_loss, full_loss)
    for k, ref in full.items():
        assert torch.allclose(chunked[k].float(), ref.float(), rtol=1e-4, atol=1e-6), k

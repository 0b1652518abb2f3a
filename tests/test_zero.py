"""2-rank ZeRO-3 (torchrun, gloo) vs single-rank ZeRO-0: sharded packed bytes, losses, saved adapter."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .dist_utils import check, run_torchrun
from .tiny_models import tiny_model

SCRIPT = "tests/scripts/zero_train.py"
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 17, 100, 64, 3]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama", hidden=128).save_pretrained(ckpt, max_shard_size="200KB")
    out = {}
    for stage, nproc in ((3, 2), (0, 1)):
        d = tmp_path_factory.mktemp(f"z{stage}")
        check(run_torchrun(SCRIPT, str(ckpt), str(d), str(stage), nproc=nproc))
        out[stage] = (d, json.loads((d / "result.json").read_text()))
    return ckpt, out


def test_zero3_shards_the_packed_bytes(runs):
    _, out = runs
    res = out[3][1]
    assert res["world"] == 2
    for rank, b in enumerate(res["bytes"]):
        for when in ("loaded", "trained"):
            local, full = b[when]
            print(f"rank {rank} {when}: {local} of {full} packed bytes")
            assert local <= full / 2 * 1.05, (rank, when, local, full)
    assert out[0][1]["bytes"][0]["loaded"][0] == out[0][1]["bytes"][0]["loaded"][1]   # ZeRO-0: whole


def test_zero3_losses_match_single_rank(runs):
    _, out = runs
    # same data split over 2 ranks; fp32 compute; only reduction order differs
    torch.testing.assert_close(torch.tensor(out[3][1]["losses"]), torch.tensor(out[0][1]["losses"]),
                               rtol=1e-4, atol=1e-5)
    assert out[3][1]["losses"][-1] < out[3][1]["losses"][0]
    assert out[3][1]["trainable"] == out[0][1]["trainable"]
    assert all(".lora_A." in n or ".lora_B." in n for n in out[3][1]["trainable"])


def test_zero3_adapter_equals_single_rank_and_loads_in_peft(runs):
    ckpt, out = runs
    a = load_file(str(out[3][0] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out[0][0] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        assert a[k].numel() > 0
        # Adam (lr 1e-2, 3 steps) turns reduction-order noise in near-zero grads into up to ~1e-4
        # absolute on single elements; the tensors as a whole agree to 1e-3 relative (Frobenius)
        assert (a[k] - b[k]).abs().max() < 1e-3, k
        assert (a[k] - b[k]).norm() <= 1e-3 * b[k].norm() + 1e-7, k
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)   # trained, not the zero init
    # the ZeRO-3 adapter is the same function in PEFT as in our layers: PEFT on the dequantized base
    # (fp32) vs our quantized model with the adapter loaded
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_ds.adapters import load_adapter
    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QLoRAConfig, QLoRALinear

    ours = from_pretrained(str(ckpt), QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32),
                           torch_dtype=torch.float32)
    load_adapter(ours, str(out[3][0] / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        for path, m in ours.named_modules():
            if isinstance(m, QLoRALinear):
                base.get_submodule(path).weight.copy_(m.dequantized_weight(torch.float32))
        plain = base(IDS).logits.clone()
        peft_model = PeftModel.from_pretrained(base, str(out[3][0] / "adapter")).eval()
        theirs, mine = peft_model(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (theirs - plain).abs().max() > 1e-2            # the adapter changes the output: not a no-op compare


def test_zero3_persistent_buffers_reach_every_rank(tmp_path):
    """Only rank 0 reads the checkpoint under ZeRO-3 and zero.Init shards parameters only: the persistent
    buffers it loaded must be broadcast, else rank 1 keeps the skeleton's zeros."""
    check(run_torchrun("tests/scripts/zero_buffers.py", str(tmp_path / "ckpt"), str(tmp_path), nproc=2))
    want = {"calibration": torch.linspace(0.5, 3.0, 6).tolist(), "steps": [[40, 41, 42], [43, 44, 45]],
            "steps_dtype": "torch.int64"}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == want, rank


def test_zero3_load_adapter_reaches_every_partition(runs, tmp_path):
    """An adapter (here: the single-rank run's, α changed to 24) loaded into a 2-rank ZeRO-3 model: every rank sets
    the file's scaling, holds only its partition, and the adapter gathered back is the file, bit for bit."""
    ckpt, out = runs
    src = tmp_path / "src"
    shutil.copytree(out[0][0] / "adapter", src)
    config = json.loads((src / "adapter_config.json").read_text())
    config["lora_alpha"] = 24
    (src / "adapter_config.json").write_text(json.dumps(config))
    check(run_torchrun("tests/scripts/zero3_adapter_load.py", str(ckpt), str(src), str(tmp_path), nproc=2))
    want = load_file(str(src / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    full = sum(t.numel() for k, t in want.items() if k.endswith("lora_B.weight"))
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(res["loaded"]) == 14 and set(res["scaling"].values()) == {24 / 8}, rank
        assert res["partition_numel"] <= full / 2 + 64, rank     # a partition, not the whole tensors

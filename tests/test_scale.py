"""bench/scale.py's checkpoints are what the hub's look like, and the host planner predicts what the
loader and a training step really take (on models it was not calibrated on)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import scale
from qlora_ds.plan import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(model_type: str, tie: bool) -> dict:
    make = scale._llama if model_type == "llama" else scale._qwen2
    return make(64, 160, 2, 4, 2, 512, tie)


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", True)])
def test_checkpoint_loads_in_transformers_and_ours(tmp_path, model_type, tie):
    from transformers import AutoModelForCausalLM

    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QLoRAConfig
    cfg = tiny(model_type, tie)
    d = scale.write_checkpoint(cfg, tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3              # sharded like the hub's
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert set(ref.state_dict()) >= set(index["weight_map"])        # every key is one transformers expects
    assert ref.model.layers[0].self_attn.q_proj.bias is not None if model_type == "qwen2" else True
    expected = {n: s for n, s in scale.tensors(cfg)}
    for name, t in ref.state_dict().items():
        if name in expected:
            assert tuple(t.shape) == expected[name], name
    w = ref.model.layers[1].mlp.down_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 2e-3   # random N(0, 0.02), not zeros
    ours = from_pretrained(str(d), QLoRAConfig(r=16, alpha=16, dropout=0.0), torch_dtype=torch.bfloat16)
    measured = sum(t.numel() * t.element_size() for t in (*ours.parameters(), *ours.buffers()))
    predicted = host.estimate_load(cfg).resident - host.LOAD_OVERHEAD_BYTES
    buffers = sum(b.numel() * b.element_size() for b in ours.buffers())   # rotary inv_freq: not a weight
    assert predicted == measured - buffers                          # the resident term is exact, from shapes alone


def test_load_peak_is_at_the_largest_transient():
    cfg = {k: v for k, v in scale.SHAPES["llama-7b"].items() if not k.startswith("_")}
    est = host.estimate_load(cfg)
    # untied: the bf16 lm_head comes last, when everything else is resident (it is kept as read)
    assert est.where == "lm_head" and est.largest_transient == 2 * 32000 * 4096
    n = 11008 * 4096
    tied = host.estimate_load({**cfg, "tie_word_embeddings": True})
    assert tied.where.endswith("down_proj")                          # then the largest linear being quantized
    assert tied.largest_transient == 2 * n + 4 * n // 64 + host.nf4_dq_bytes(n) + 4 * 16 * (11008 + 4096)
    packed = est.resident / 2 ** 30
    assert 3.5 < packed < 4.0                                       # 4.127-bit linears + bf16 embeddings
    # the bound: packed model + 2 x the largest bf16 tensor + 300 MiB (above the runtime)
    assert est.peak - est.runtime <= est.resident + 2 * 2 * 32000 * 4096 + 300 * 2 ** 20
    fp32 = host.estimate_load(cfg, dtype="fp32")
    assert fp32.resident - est.resident == pytest.approx(2 * (2 * 32000 * 4096 + 65 * 4096), rel=1e-6)
    z3 = host.estimate_load(cfg, world=2, zero_stage=3)
    assert z3.resident == pytest.approx((est.resident - host.LOAD_OVERHEAD_BYTES) / 2 + host.LOAD_OVERHEAD_BYTES)
    # ZeRO-3: a 16-bit tensor and its 1/world partition are alive together (DeepSpeed's _partition_param); with
    # Qwen2's 151936-row tied embedding that is rank 0's peak, before any layer is resident
    qwen = {k: v for k, v in scale.SHAPES["qwen2-0.5b"].items() if not k.startswith("_")}
    zq = host.estimate_load(qwen, world=2, zero_stage=3)
    emb = 2 * 151936 * 896
    assert zq.where == "embed_tokens" and zq.largest_transient == emb + emb // 2


def test_load_plan_takes_the_checkpoint_dtype_from_config_json():
    """An fp32 checkpoint loaded in bf16 holds 4 + 2 B/element while a tensor is read: on qwen2-1.5b's shape the
    peak moves to the tied embedding (measured, review r3 loadscale: VmHWM 1714 MiB at embed_tokens, vs 1573 MiB
    at layers.27.mlp.down_proj from the bf16 checkpoint and 1600 MiB from an fp16 one, AVX-512 box)."""
    cfg = {k: v for k, v in scale.SHAPES["qwen2-1.5b"].items() if not k.startswith("_")}
    n, mib = 151936 * 1536, 2 ** 20
    bf16 = host.estimate_load(cfg)
    assert bf16.where == "layers.27.mlp.down_proj" and bf16.peak / mib == pytest.approx(1573, rel=0.01)
    fp32 = host.estimate_load({**cfg, "torch_dtype": "float32"})
    assert fp32.where == "embed_tokens" and fp32.largest_transient == 6 * n
    assert fp32.peak / mib == pytest.approx(1714, rel=0.01) and fp32.resident == bf16.resident
    # transformers 5's key; a caller's ckpt_dtype over config.json's
    assert host.estimate_load({**cfg, "torch_dtype": None, "dtype": "float32"}) == fp32
    assert host.estimate_load(cfg, ckpt_dtype="fp32") == fp32
    fp16 = host.estimate_load(cfg, ckpt_dtype="fp16")     # same size, still a converted copy while quantizing
    assert fp16.peak / mib == pytest.approx(1600, rel=0.01) and fp16.peak > bf16.peak
    with pytest.raises(host.QLoRADSError, match="torch_dtype 'int8'.*ckpt_dtype="):
        host.estimate_load({**cfg, "torch_dtype": "int8"})

def test_fp32_compute_doubles_activations_and_drops_the_master_copy():
    cfg = {k: v for k, v in scale.SHAPES["llama-1.7b"].items() if not k.startswith("_")}
    bf, fp = (host.estimate_memory(host.step_config(cfg, d)) for d in ("bf16", "fp32"))
    assert fp.get("activations") > 1.6 * bf.get("activations")
    assert fp.get("master_weights") == 0 and bf.get("master_weights") > 0
    assert fp.get("lora_params") == 2 * bf.get("lora_params")
    assert fp.get("embeddings_norms") == 2 * bf.get("embeddings_norms")


def test_quick_scale_bench_planner_within_15_percent(tmp_path):
    """``python -m bench scale --quick``: every model here is out of the planner's calibration sample."""
    assert not set(scale.QUICK) & {host.CALIBRATION_MODEL}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-m", "bench", "scale", "--quick", "--results-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [scale.with_plan(json.loads(line)) for line in (tmp_path / "scale-quick.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {(r["model"], r["what"]) for r in ours} == {(m, w) for m in scale.QUICK for w in ("load", "step")}
    for r in ours:
        assert r["status"] == "ok", r
        assert 0.85 <= r["planned_peak_load"] / r["peak_load"] <= 1.15, r
        if r["what"] == "step":
            assert 0.85 <= r["planned_peak_step"] / r["peak_step"] <= 1.15, r
            assert r["compute_dtype"] == {torch.float32: "fp32", torch.bfloat16: "bf16"}[
                __import__("qlora_ds.hardware", fromlist=["x"]).resolve_dtype("auto", torch.device("cpu"))]
    bnb = [r for r in rows if r["impl"] == "bnb"]
    assert bnb and all(r["status"] == "ok" and r["peak_load"] > 0 for r in bnb)

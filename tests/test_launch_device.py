"""generate / evaluate / merge run on the device they are given (``--device``, default the local GPU if any)
in the compute dtype ``--dtype`` resolves (auto: by the device's facts, mocked at their single entry point).

Runs on the test device (``pytest --device cuda``); on CPU by default. Self-contained (a word-level tokenizer
with a chat template and a tiny random Llama, written here), so it runs where the packaged SmolLM2 is not
installed — the lent GPU machine."""
from __future__ import annotations

import json

import pytest
import torch

import qlora_ds.eval.runs as runs
import qlora_ds.hardware as hw
from qlora_ds.adapters import lora_layers, save_adapter
from qlora_ds.inject import from_pretrained
from qlora_ds.nn.config import QLoRAConfig

from .finetune_fixtures import save_word_level_tokenizer
from .helpers import launch_script



_script = launch_script


PAIRS = [("What is AI?", "A branch of computer science."), ("Hi there", "Hello, how are you?"),
         ("Name a color", "Blue is a color."), ("Count to three", "One two three.")]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random Llama (bf16) with a word-level tokenizer of PAIRS' words and a chat template; data file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dev_ckpt")
    vocab_size = save_word_level_tokenizer(PAIRS, str(root / "model"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=1)
                     ).to(torch.bfloat16).save_pretrained(str(root / "model"))
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in PAIRS))
    return {"model": str(root / "model"), "data": str(data)}


@pytest.fixture(scope="module")
def run_dir(tiny_ckpt, tmp_path_factory):
    """A finished QLoRA 'run' on the tiny checkpoint, its adapter's B random (so merging matters)."""
    run = tmp_path_factory.mktemp("dev_run")
    model = from_pretrained(tiny_ckpt["model"], QLoRAConfig(r=8, dropout=0.0, compute_dtype=torch.float32),
                            torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    save_adapter(model, str(run / "adapter"))
    (run / "run_config.json").write_text(json.dumps({"model": tiny_ckpt["model"], "method": "qlora", "lora_r": 8}))
    return run


@pytest.fixture
def loaded(monkeypatch):
    """Records the models the scripts load (runs.load is what generate and evaluate call)."""
    seen, real = [], runs.load

    def spy(*a, **k):
        model, tok = real(*a, **k)
        seen.append(model)
        return model, tok
    monkeypatch.setattr(runs, "load", spy)
    return seen


def _facts_for(device: torch.device, native_bf16: bool) -> hw.DeviceFacts:
    if device.type == "cuda":
        return hw.DeviceFacts("cuda", "mock GPU", cuda_capability=(9, 0) if native_bf16 else (7, 5))
    return hw.DeviceFacts("cpu", "mock CPU", cpu_isa="amx" if native_bf16 else "avx2")


@pytest.mark.parametrize("native_bf16", [False, True])
def test_generate_auto_device_and_dtype(run_dir, device, loaded, monkeypatch, capsys, native_bf16):
    monkeypatch.setattr(hw, "device_facts", lambda d: _facts_for(torch.device(d), native_bf16))
    want = torch.bfloat16 if native_bf16 else (torch.float16 if device.type == "cuda" else torch.float32)
    gen = _script("generate")
    assert gen.main(["--run", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "3", "--device", str(device),
                     "--dtype", "auto"]) == 0
    model = loaded[-1]
    assert {p.device.type for p in model.parameters()} == {device.type}
    assert model.get_input_embeddings().weight.dtype == want
    assert {layer.config.compute_dtype for layer in lora_layers(model).values()} == {want}
    assert "### Assistant:" in capsys.readouterr().out
    if device.type == "cpu" and not torch.cuda.is_available():     # auto = the CPU when there is no GPU
        assert gen.main(["--run", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
        assert {p.device.type for p in loaded[-1].parameters()} == {"cpu"}


def test_evaluate_records_device_and_dtype(run_dir, tiny_ckpt, device, loaded, tmp_path):
    out = tmp_path / "res.json"
    assert _script("evaluate").main(["--run", str(run_dir), "--heldout", tiny_ckpt["data"], "--max-len", "48",
                                     "--device", str(device), "--dtype", "fp32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == str(device) and res["dtype"] == "fp32" and res["heldout"]["tokens"] > 0
    assert {p.device.type for p in loaded[-1].parameters()} == {device.type}


@pytest.mark.parametrize("dtype,tol", [("fp32", 2 ** -5), ("bf16", 2 ** -4)])
def test_merge_verifies_on_the_device_in_the_dtype(run_dir, device, tmp_path, dtype, tol):
    merge = _script("merge")
    out = tmp_path / f"merged_{dtype}"
    report = merge.merge(merge.parse_args(["--run", str(run_dir), "--out", str(out), "--device", str(device),
                                           "--dtype", dtype]))
    v = report["verify"]
    assert v["device"] == str(device) and v["dtype"] == dtype and v["tolerance"] == tol
    assert v["ok"] and 0 < v["rel_diff"] <= tol and v["next_token_agree"] == "3/3"
    assert json.loads((out / "qlora_ds_merge.json").read_text())["verify"]["dtype"] == dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("script", ["generate", "evaluate", "merge"])
def test_cuda_without_a_gpu_is_a_clear_error(run_dir, tmp_path, caplog, script):
    extra = {"generate": ["--prompt", "Hi"], "evaluate": ["--heldout", "x.jsonl"], "merge": ["--out", str(tmp_path / "m")]}
    assert _script(script).main(["--run", str(run_dir), "--device", "cuda", *extra[script]]) == 2
    assert "asked for CUDA, but torch sees no GPU" in caplog.text and "--device cpu" in caplog.text
    assert not (tmp_path / "m").exists()

"""Export / adapter-format defects found in review: merged dtype in a bf16 model (GPTQ calibration), PEFT's
regex rank/alpha patterns, tied LM heads that were quantized or merged, GPTQ biases, QA-LoRA group size from a
plain PEFT config, target_modules that PEFT would widen."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from qlora_ds.adapters import load_adapter, save_adapter
from qlora_ds.adapters.merge import (adapter_config_from_dir, export_merged, merge_model, quantize_gptq,
                                     read_gptq_checkpoint)
from qlora_ds.inject.replace import inject
from qlora_ds.nn import QALoRAConfig, QALoRALinear, QLoRAConfig, QLoRALinear

from .tiny_models import tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 17, 100]])


def _randomize_adapter(model, seed=1, std=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QLoRALinear, QALoRALinear)):
                m.lora_B.weight.normal_(std=std)


@torch.no_grad()
def _logits(model):
    return model(IDS).logits.float()


def test_merge_into_the_models_dtype_and_gptq_calibration_of_a_bf16_model():
    """A QLoRA layer computing in fp32 inside a bf16 model merges into bf16 (the dtype of its inputs), so
    the merged model and GPTQ's calibration forward run in one dtype."""
    model = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    paths = inject(model, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    _randomize_adapter(model)
    ref = _logits(model)
    merge_model(model)
    assert {model.get_submodule(p).weight.dtype for p in paths} == {torch.bfloat16}
    assert ((_logits(model) - ref).abs().max() / ref.abs().max()).item() < 2 ** -4
    calibration = [torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    report = quantize_gptq(model, calibration, paths, bits=4, group_size=32)
    assert report["gptq_layers"] == len(paths) and torch.isfinite(_logits(model)).all()


def test_regex_rank_and_alpha_patterns_load_as_in_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    ours = tiny_model("llama", seed=0)
    inject(ours, QLoRAConfig(r=8, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                             target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"))
    inject(ours, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                             target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    base = tiny_model("llama", seed=0)
    with torch.no_grad():
        for path, m in ours.named_modules():
            if isinstance(m, QLoRALinear):
                base.get_submodule(path).weight.copy_(m.dequantized_weight(torch.float32))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     rank_pattern={r"layers\.0\.self_attn\.\w_proj": 8}, alpha_pattern={r"layers\.1\..*q_proj": 32})
    peft_model = get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    load_adapter(ours, str(tmp_path / "peft"))
    layers = ours.model.layers
    assert (layers[0].self_attn.q_proj.scaling, layers[1].self_attn.q_proj.scaling,
            layers[1].self_attn.v_proj.scaling) == (1.0, 8.0, 2.0)
    torch.testing.assert_close(_logits(ours), _logits(peft_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, fmt", [("qalora", "gptq"), ("qlora", "bf16")])
def test_tied_lm_head_that_was_merged_is_exported_untied(tmp_path, kind, fmt):
    from transformers import AutoModelForCausalLM

    tm = ("q_proj", "v_proj", "lm_head")
    cfg = (QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, target_modules=tm) if kind == "qlora"
           else QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                             target_modules=tm))
    model = tiny_model("qwen2", seed=0)
    assert model.config.tie_word_embeddings
    assert "lm_head" in inject(model, cfg)
    _randomize_adapter(model)
    merge_model(model)
    ref = _logits(model)
    out = str(tmp_path / "out")
    export_merged(model, out, fmt, dtype=torch.float32)
    assert json.loads(open(os.path.join(out, "config.json")).read())["tie_word_embeddings"] is False

    def reload():
        if fmt == "bf16":
            return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return read_gptq_checkpoint(out, exact=True)

    torch.testing.assert_close(_logits(reload()), ref, rtol=1e-5, atol=1e-5)
    if fmt == "gptq":           # the INT-N head is written dense: GPTQ loaders convert block layers only
        from safetensors import safe_open
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert "lm_head.weight" in keys and not any(k.startswith("lm_head.q") for k in keys)
        qcfg = json.loads(open(os.path.join(out, "config.json")).read())["quantization_config"]
        assert qcfg["block_name_to_quantize"] == "model.layers"
        assert qcfg["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.v_proj"]]
    if fmt == "gptq":           # an export from before the fix (config still tied): the reader keeps the head
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**config, "tie_word_embeddings": True}, f)
        torch.testing.assert_close(_logits(reload()), ref, rtol=1e-5, atol=1e-5)


def test_tied_lm_head_left_alone_stays_tied(tmp_path):
    model = tiny_model("qwen2", seed=0)
    inject(model, QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    _randomize_adapter(model)
    merge_model(model)
    export_merged(model, str(tmp_path / "out"), "gptq", dtype=torch.float32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(_logits(read_gptq_checkpoint(str(tmp_path / "out"))), _logits(model),
                               rtol=1e-5, atol=1e-5)


def test_gptq_export_writes_biases_in_the_export_dtype(tmp_path):
    """Biases go from the layer straight to the export dtype: no fp16 detour (rounding, inf above 65504)."""
    model = tiny_model("qwen2", seed=0)                      # q/k/v_proj have biases
    torch.manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(std=1.0)
        model.model.layers[0].self_attn.q_proj.bias[0] = 70000.0
    inject(model, QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    _randomize_adapter(model)
    merge_model(model)
    export_merged(model, str(tmp_path / "g"), "gptq", dtype=torch.float32)
    reloaded = read_gptq_checkpoint(str(tmp_path / "g"), exact=True)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        assert torch.equal(reloaded.get_submodule(path).bias, model.get_submodule(path).bias)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=1e-5, atol=1e-5)


def test_qalora_group_size_of_a_plain_peft_file(tmp_path, caplog):
    model = tiny_model("llama", seed=0)
    inject(model, QALoRAConfig(bits=4, group_size=64, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    _randomize_adapter(model)
    save_adapter(model, str(tmp_path / "ad"))
    os.remove(tmp_path / "ad" / "qlora_ds.json")                 # a plain PEFT file: use_qalora + qalora_group_size
    cfg = adapter_config_from_dir(str(tmp_path / "ad"), torch.float32, fallback={"method": "qalora", "group_size": 32})
    assert (type(cfg), cfg.group_size, cfg.bits) == (QALoRAConfig, 64, 4)
    assert "assuming 4; pass --bits" in caplog.text                  # the bits are a guess: said so
    caplog.clear()
    adapter_config_from_dir(str(tmp_path / "ad"), torch.float32, fallback={"method": "qalora", "bits": 4})
    assert "assuming 4" not in caplog.text
    again = tiny_model("llama", seed=0)
    inject(again, cfg)
    load_adapter(again, str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(again), _logits(model), rtol=1e-5, atol=1e-5)


def test_target_modules_do_not_widen_in_peft(tmp_path):
    from peft import PeftModel

    ours = tiny_model("llama", seed=0)
    paths = inject(ours, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                     target_modules=r"model\.layers\.0\.self_attn\..*"))
    save_adapter(ours, str(tmp_path / "part"))
    assert sorted(json.loads((tmp_path / "part" / "adapter_config.json").read_text())["target_modules"]) == \
        sorted(paths)
    peft_model = PeftModel.from_pretrained(tiny_model("llama", seed=0), str(tmp_path / "part"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == set(paths)
    # our own loader reads the full paths back as targets
    cfg = adapter_config_from_dir(str(tmp_path / "part"), torch.float32)
    assert {p for p in paths if cfg.matches(p)} == set(paths) and not cfg.matches("model.layers.1.self_attn.q_proj")


def _gpt2_merged(kind, targets):
    cfg = dict(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, target_modules=targets)
    model = tiny_model("gpt2", seed=0)
    paths = inject(model, QLoRAConfig(**cfg) if kind == "qlora" else QALoRAConfig(bits=4, group_size=32, **cfg))
    _randomize_adapter(model)
    ref = _logits(model)
    merge_model(model, dtype=torch.float32)
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    return model, paths


@pytest.mark.parametrize("targets", [None, r".*\.attn\.c_proj"], ids=["all", "square_c_proj"])
@pytest.mark.parametrize("kind, fmt", [("qlora", "bf16"), ("qalora", "bf16"), ("qalora", "gptq"), ("qlora", "gptq")])
def test_gpt2_conv1d_merge_exports_in_gpt2s_own_layout(tmp_path, kind, fmt, targets):
    """GPT-2's Conv1D layers (weight (in, out)) merge and export as Conv1D: the checkpoint reloads in transformers
    with no missing/unexpected/mismatched key and the merged model's logits (the square attn.c_proj alone would
    otherwise load transposed without an error). QLoRA -> GPTQ goes through quantize_gptq."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model, paths = _gpt2_merged(kind, targets)
    if targets is not None:
        assert paths == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    if kind == "qlora":
        assert all(isinstance(model.get_submodule(p), Conv1D) for p in paths)
    if kind == "qlora" and fmt == "gptq":
        calibration = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        assert quantize_gptq(model, calibration, paths, bits=4, group_size=32)["gptq_layers"] == len(paths)
    ref = _logits(model)
    out = str(tmp_path / "out")
    export_merged(model, out, fmt, dtype=torch.float32)
    if fmt == "bf16":
        reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    else:
        inner = json.loads(open(os.path.join(out, "config.json")).read())["quantization_config"]
        assert inner.get("modules_in_block_to_quantize") == (None if targets is None else [["attn.c_proj"]])
        reloaded = read_gptq_checkpoint(out, exact=True)
    original = tiny_model("gpt2", seed=0)
    for p in paths:
        got = reloaded.get_submodule(p)
        assert isinstance(got, Conv1D) and got.weight.shape == original.get_submodule(p).weight.shape
    torch.testing.assert_close(_logits(reloaded.eval()), ref, rtol=1e-5, atol=1e-5)


def test_gpt2_loaded_with_from_pretrained_merges_back_into_conv1d(tmp_path):
    """The streaming loader injects into the Conv1D skeleton too, so its layers carry the marker."""
    from transformers.pytorch_utils import Conv1D

    from qlora_ds.inject import from_pretrained

    base = tiny_model("gpt2", seed=0)
    base.save_pretrained(str(tmp_path / "base"))
    model = from_pretrained(str(tmp_path / "base"), QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32),
                            torch_dtype=torch.float32)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QLoRALinear) and layer.conv1d and (layer.in_features, layer.out_features) == (64, 192)
    _randomize_adapter(model)
    ref = _logits(model)
    merge_model(model)
    merged = model.transformer.h[0].attn.c_attn
    assert isinstance(merged, Conv1D) and merged.weight.shape == base.transformer.h[0].attn.c_attn.weight.shape
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


def test_a_gpt2_layers_own_merge_gives_conv1d():
    """``QLoRALinear.merge()`` called directly (not through merge_model) also gives back GPT-2's Conv1D, with the
    same outputs as the adapted layer."""
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2", seed=0)
    inject(model, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    _randomize_adapter(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, layer.in_features)
    merged = layer.merge()
    assert isinstance(merged, Conv1D) and tuple(merged.weight.shape) == (layer.in_features, layer.out_features)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    assert layer.merge(torch.bfloat16).weight.dtype == torch.bfloat16


def test_a_gpt2_qalora_layers_own_merge_keeps_the_conv1d_marker(tmp_path):
    """``QALoRALinear.merge()`` called directly keeps GPT-2's Conv1D marker, so a model merged layer by layer
    exports (in, out) weights that reload into GPT-2 with the adapted model's outputs."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2", seed=0)
    paths = inject(model, QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    _randomize_adapter(model)
    ref = _logits(model)
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_submodule(path).merge())
        assert model.get_submodule(path).conv1d is True
    export_merged(model, str(tmp_path / "out"), "bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert reloaded.transformer.h[0].mlp.c_fc.weight.shape == (64, 256)             # Conv1D: (in, out)
    assert ((_logits(reloaded) - ref).abs().max() / ref.abs().max()).item() < 2 ** -5   # bf16 weights


def test_plain_peft_adapter_with_a_run_whose_options_are_null(tmp_path):
    """run_config.json stores options that were not given as null (``--pool`` by default): a plain PEFT adapter
    read with such a run falls back to the defaults instead of failing on pool='None'."""
    model = tiny_model("llama", seed=0)
    inject(model, QALoRAConfig(bits=2, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    save_adapter(model, str(tmp_path / "ad"))
    os.remove(tmp_path / "ad" / "qlora_ds.json")
    run = {"method": "qalora", "bits": 2, "group_size": 32, "pool": None, "quant_type": None, "blocksize": None}
    cfg = adapter_config_from_dir(str(tmp_path / "ad"), torch.float32, fallback=run)
    assert (type(cfg), cfg.pool, cfg.bits, cfg.group_size) == (QALoRAConfig, "mean", 2, 32)
    assert adapter_config_from_dir(str(tmp_path / "ad"), torch.float32, fallback={**run, "pool": "sum"}).pool == "sum"
    qlora = tiny_model("llama", seed=0)
    inject(qlora, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    save_adapter(qlora, str(tmp_path / "q"))
    os.remove(tmp_path / "q" / "qlora_ds.json")
    cfg = adapter_config_from_dir(str(tmp_path / "q"), torch.float32, fallback={**run, "method": "qlora"})
    assert (type(cfg), cfg.quant_type, cfg.blocksize) == (QLoRAConfig, "nf4", 64)

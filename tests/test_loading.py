"""Streaming quantized loading: equality with quantize-after-load, peak RSS, bnb checkpoints, our
own pre-quantized format, and clear errors for bad checkpoints."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_ds.errors import QLoRADSError
from qlora_ds.inject import from_pretrained, inject, save_quantized
from qlora_ds.nn import QLoRAConfig

from .dist_utils import REPO, dist_env
from .tiny_models import tiny_config, tiny_model

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)


def _base_state(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_model("llama", hidden=128, dtype=torch.bfloat16).save_pretrained(d, max_shard_size="100KB")
    return str(d)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_streaming_load_equals_quantize_after_full_load(arch, tmp_path):
    tiny_model(arch, dtype=torch.bfloat16).save_pretrained(tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    streamed = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.bfloat16)
    full = tiny_model(arch, dtype=torch.bfloat16)
    inject(full, CFG)
    a, b = _base_state(streamed), _base_state(full)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert {n for n, p in streamed.named_parameters() if p.requires_grad} == \
        {n for n in dict(streamed.named_parameters()) if ".lora_" in n}
    if arch == "qwen2":   # tied embeddings stay one tensor
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


@pytest.mark.parametrize("shard", ["10MB", "single file"])
def test_peak_rss_of_streaming_load(tmp_path, shard):
    big, warm = tmp_path / "big", tmp_path / "warm"
    kw = {"max_shard_size": "10MB"} if shard == "10MB" else {"max_shard_size": "1GB"}
    tiny_model("llama", hidden=768, inter=2048, layers=4, vocab=256, dtype=torch.bfloat16).save_pretrained(big, **kw)
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(warm)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, str(REPO / "tests/scripts/zero_rss_load.py"), str(big), str(warm)],
                          capture_output=True, text=True, env=dist_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # Bound: 3 × the largest decoder block in bf16 (13 MB here: 4 attention + 3 MLP matrices) + the
    # quantized model + 32 MiB for allocator slack and quantize temporaries. Tensors are read into owned
    # memory, not mapped. This bound (~86 MB) is above the 53 MB checkpoint, so it alone would not catch a
    # loader that reads everything first: test_streaming_load_holds_one_16bit_weight_at_a_time does.
    block = 2 * (2 * 768 * 768 + 2 * 768 * 384 + 3 * 768 * 2048)
    bound = 3 * block + r["quantized"] + 32 * 2**20
    grew = r["peak"] - r["baseline"]
    print(f"checkpoint {size / 1e6:.1f} MB ({shard}), peak RSS growth {grew / 1e6:.1f} MB, bound {bound / 1e6:.1f} MB")
    assert grew < bound
    assert r["mapped"] == [], r["mapped"]      # no checkpoint file stays mapped after the load


def _peak_live_weight_bytes(path, monkeypatch, read_all=False):
    """Load ``path`` while counting the bytes of 16-bit linear weights read from the checkpoint that are still
    alive (weakref finalizers); returns (peak, largest single weight). ``read_all``: a loader that reads every
    tensor first and then builds the model from that cache (what streaming must not do)."""
    import weakref

    from qlora_ds.inject import checkpoint as ckpt_mod

    read = ckpt_mod.Checkpoint.get
    live = {"now": 0, "peak": 0, "largest": 0}

    def release(n):
        live["now"] -= n

    def tracked(self, key):
        t = read(self, key)
        if key.endswith("_proj.weight"):            # the linear weights that get quantized (Llama)
            n = t.numel() * t.element_size()
            live["now"] += n
            live["peak"], live["largest"] = max(live["peak"], live["now"]), max(live["largest"], n)
            weakref.finalize(t, release, n)
        return t

    def read_everything_first(self, key):
        if not hasattr(self, "_all"):
            self._all = {k: tracked(self, k) for k in list(self.keys())}
        return self._all[key]

    monkeypatch.setattr(ckpt_mod.Checkpoint, "get", read_everything_first if read_all else tracked)
    model = from_pretrained(path, CFG, torch_dtype=torch.bfloat16)
    monkeypatch.undo()
    del model
    return live["peak"], live["largest"]


def test_streaming_load_holds_one_16bit_weight_at_a_time(llama_dir, monkeypatch):
    """The claim behind the RSS test, measured directly: while loading, at most one 16-bit weight that is being
    quantized is alive (its bf16 copy is freed before the next is read); a loader that reads everything first
    fails the same check."""
    peak, largest = _peak_live_weight_bytes(llama_dir, monkeypatch)
    assert 0 < peak <= largest, (peak, largest)
    peak_all, _ = _peak_live_weight_bytes(llama_dir, monkeypatch, read_all=True)
    assert peak_all > 4 * largest, (peak_all, largest)    # all 14 weights of the 2 layers at once (9x here)


def _bnb_checkpoint(dst, arch="llama"):
    """A 4-bit checkpoint with exactly the keys bnb's Linear4bit._save_to_state_dict writes."""
    import bitsandbytes.functional as bnbF
    model = tiny_model(arch, dtype=torch.bfloat16)
    targets = set(inject(tiny_model(arch), CFG))
    sd = {}
    for k, v in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in targets and k.endswith(".weight"):
            packed, state = bnbF.quantize_4bit(v, blocksize=64, compress_statistics=True, quant_type="nf4")
            sd[k] = packed
            for name, t in state.as_dict(packed=True).items():
                sd[f"{k}.{name}"] = t
        else:
            sd[k] = v.contiguous()
    sd.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(os.path.join(dst, "config.json"))
    return sd


def test_bnb_quantized_checkpoint_loads_without_requantizing(tmp_path):
    sd = _bnb_checkpoint(tmp_path)
    model = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.bfloat16)
    layer = model.model.layers[1].mlp.down_proj
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(layer.weight, sd[key].view(-1))
    assert torch.equal(layer.weight_absmax, sd[key + ".absmax"])
    assert torch.equal(layer.weight_absmax2.view(torch.float32), sd[key + ".nested_absmax"])
    # logits: same as our own quantization of the same weights. The only difference is bnb-CPU's lookup-table
    # rounding of double-quant absmax codes (±1 in <= 0.5% of blocks; here 1 of 1152, absmax changed by 3e-4
    # relative, well under one bf16 ulp of 2^-8), so at most a few bf16 roundings of activations flip: allow 2 ulps
    # of the largest logit (measured: identical here)
    ref = tiny_model("llama", dtype=torch.bfloat16)
    inject(ref, CFG)
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(x).logits.float(), ref(x).logits.float()
    ulp = 2.0 ** (torch.floor(torch.log2(want.abs().max())).item() - 7)
    assert (got - want).abs().max().item() <= 2 * ulp
    bad = QLoRAConfig(r=4, blocksize=128)
    with pytest.raises(QLoRADSError, match="blocksize"):
        from_pretrained(str(tmp_path), bad)


def test_save_quantized_round_trip_and_metadata_checks(llama_dir, tmp_path):
    model = from_pretrained(llama_dir, CFG, torch_dtype=torch.bfloat16)
    out = tmp_path / "q"
    save_quantized(model, str(out))
    again = from_pretrained(str(out), CFG, torch_dtype=torch.bfloat16)
    a, b = _base_state(model), _base_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(QLoRADSError, match="quant_type"):
        from_pretrained(str(out), QLoRAConfig(quant_type="fp4"))
    meta_path = out / "qlora_ds_quant.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(QLoRADSError, match="version 99"):
        from_pretrained(str(out), CFG)


def test_missing_shard_is_a_clear_error(llama_dir, tmp_path):
    import shutil
    d = tmp_path / "c"
    shutil.copytree(llama_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(QLoRADSError, match=f"missing.*{shard.name}|{shard.name}.*missing"):
        from_pretrained(str(d), CFG)


def test_shape_mismatch_between_config_and_checkpoint(llama_dir, tmp_path):
    import shutil
    d = tmp_path / "c"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 384
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QLoRADSError, match="shape"):
        from_pretrained(str(d), CFG)


def test_no_checkpoint_files(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(QLoRADSError, match="safe_serialization"):
        from_pretrained(str(tmp_path), CFG)


def test_checkpoint_saved_by_transformers_bitsandbytes_loads_without_requantizing(tmp_path):
    """transformers + bitsandbytes quantize (on CPU) and save_pretrained; we load those bytes as they are."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import qlora_ds
    from qlora_ds.nn import QLoRAConfig

    from .tiny_models import tiny_model

    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=bnb_cfg, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bnb")
    ours = qlora_ds.from_pretrained(str(tmp_path / "bnb"), QLoRAConfig(r=4, alpha=8, dropout=0.0))
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        for name, module in ours.named_modules():
            if hasattr(module, "quantized_weight"):
                assert torch.equal(module.weight, f.get_tensor(f"{name}.weight").view(-1)), name
                assert torch.equal(module.weight_absmax, f.get_tensor(f"{name}.weight.absmax")), name
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(ids).logits.float(), ours(ids).logits.float()
    # both compute in bf16 from the same dequantized weights; differences are bf16 rounding of activations
    assert (theirs - mine).abs().max() <= 2e-2 * theirs.abs().max()


def test_moe_checkpoint_quantizes_the_fused_experts_unless_told_not_to(tmp_path, caplog):
    """transformers' per-expert keys are fused as it fuses them (tests/test_loading_experts.py checks the values):
    by default stored in 4 bit, with quantize_experts=False kept in 16 bit with the warning that names them."""
    import transformers as tf
    config = tf.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128)
    tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)   # per-expert keys
    with caplog.at_level(logging.WARNING, logger="qlora_ds.inject.replace"):
        model = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert {p.dtype for p in experts.parameters()} == {torch.uint8} and experts.gate_up_proj.shape == (4, 256, 64)
    assert not any("stay in 16 bit" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="qlora_ds.inject.replace"):
        model = from_pretrained(str(tmp_path), QLoRAConfig(r=4, quantize_experts=False), torch_dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.shape == (4, 256, 64)
    assert any("model.layers.*.mlp.experts (gate_up_proj, down_proj)" in r.getMessage() for r in caplog.records)


def test_gptq_checkpoint_as_a_base_is_refused_by_name(tmp_path):
    """A merged QA-LoRA GPTQ export (the natural next base) is named as a GPTQ checkpoint, not as a broken one."""
    from qlora_ds.adapters.merge import export_merged, merge_model
    from qlora_ds.nn import QALoRAConfig

    cfg = QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
    model = tiny_model("llama")
    inject(model, cfg)
    export_merged(merge_model(model), str(tmp_path / "gptq"), "gptq")
    with pytest.raises(QLoRADSError, match="is a GPTQ checkpoint .* train from the original base"):
        from_pretrained(str(tmp_path / "gptq"), cfg, torch_dtype=torch.float32)
    tiny_model("llama").save_pretrained(tmp_path / "awq")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    (tmp_path / "awq" / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(QLoRADSError, match="quantized with 'awq', which qlora-ds does not read"):
        from_pretrained(str(tmp_path / "awq"), cfg, torch_dtype=torch.float32)


def _fp16_llama(folder) -> str:
    """An fp16 checkpoint (Llama-2's dtype) with weights whose bf16 and fp16 roundings quantize differently."""
    model = tiny_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.02)
    model.half().save_pretrained(folder)
    return str(folder)


def _adapter_config(method: str, dtype: torch.dtype):
    from qlora_ds.nn import QALoRAConfig

    if method == "qalora":
        return QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=dtype)
    return QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=dtype)


def _packed(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if p.dtype == torch.uint8]


@pytest.mark.parametrize("method", ["qalora", "qlora"])
def test_fp32_merge_of_a_bf16_trained_adapter_uses_the_base_it_was_trained_on(tmp_path, method):
    """An fp16 checkpoint trained with --dtype bf16, then loaded to merge/evaluate in fp32 (a CPU without bf16):
    the base is quantized from bf16 as in training (the adapter's side file says so), so the merged model's logits
    are the trained model's (computing in fp32) to fp32 rounding."""
    from qlora_ds.adapters import load_adapter, lora_layers, save_adapter
    from qlora_ds.adapters.merge import merge_model
    from qlora_ds.eval.runs import load_base_and_adapter, resolve

    ckpt = _fp16_llama(tmp_path / "fp16")
    trained = from_pretrained(ckpt, _adapter_config(method, torch.bfloat16), torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    save_adapter(trained, str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "qlora_ds.json").read_text())["quantized_from"] == "bfloat16"

    as_trained = from_pretrained(ckpt, _adapter_config(method, torch.float32), torch_dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(_packed(trained), _packed(as_trained))), \
        "an fp32 load must quantize differently for this test to mean anything"
    with torch.no_grad():                           # the trained model, computing in fp32: the bf16-derived base
        for a, b in zip(_packed(as_trained), _packed(trained)):
            a.copy_(b)
    load_adapter(as_trained, str(tmp_path / "adapter"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = as_trained(ids).logits

    model = load_base_and_adapter(resolve(model=ckpt, adapter=str(tmp_path / "adapter")), compute_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(_packed(model), _packed(trained)))
    with torch.no_grad():
        merged = merge_model(model, dtype=torch.float32)(ids).logits
    assert ((merged - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_plain_peft_adapter_takes_the_training_dtype_from_the_run_or_warns(tmp_path, caplog):
    """Without the side file's ``quantized_from`` the run's (or --train-dtype's) dtype picks the base; where neither
    says it and the checkpoint's weights round differently in the load dtype, a warning names the fix."""
    from qlora_ds.adapters import save_adapter
    from qlora_ds.eval.runs import load_base_and_adapter, resolve

    ckpt = _fp16_llama(tmp_path / "fp16")
    trained = from_pretrained(ckpt, _adapter_config("qalora", torch.bfloat16), torch_dtype=torch.bfloat16)
    save_adapter(trained, str(tmp_path / "run" / "adapter"))
    os.remove(tmp_path / "run" / "adapter" / "qlora_ds.json")      # a plain PEFT file
    settings = {"model": ckpt, "method": "qalora", "bits": 4, "pool": None}
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({**settings, "dtype": "bf16"}))
    plain = dict(model=ckpt, adapter=str(tmp_path / "run" / "adapter"), method="qalora", bits=4)
    for source in (resolve(run=str(tmp_path / "run")), resolve(**plain, dtype="bf16")):
        model = load_base_and_adapter(source, compute_dtype=torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(_packed(model), _packed(trained)))
    assert "does not say which dtype" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="qlora_ds.eval.runs"):
        model = load_base_and_adapter(resolve(**plain), compute_dtype=torch.float32)
    assert "float16 checkpoint's weights are rounded to float32" in caplog.text and "--train-dtype" in caplog.text
    assert not all(torch.equal(a, b) for a, b in zip(_packed(model), _packed(trained)))


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "opt"])
def test_checkpoint_saved_from_the_base_model_gets_its_prefix(arch, tmp_path):
    """The hub's gpt2/bloom files were saved from the base model (``h.0.…``, ``wte.weight``, no ``transformer.``):
    the loader adds the base-model prefix as transformers does, and a separate ``lm_head.weight`` stays the head's."""
    model = tiny_model(arch, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "full")
    prefix = model.base_model_prefix + "."
    sd = {k.removeprefix(prefix): v for k, v in load_file(tmp_path / "full" / "model.safetensors").items()}
    if arch == "opt":                  # an untied head, saved under its own name next to the prefix-less keys
        model.config.tie_word_embeddings = False
        sd["lm_head.weight"] = torch.randn(tuple(model.lm_head.weight.shape)).to(torch.bfloat16)
    assert not any(k.startswith(prefix) for k in sd)
    os.makedirs(tmp_path / "bare")
    save_file(sd, tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(tmp_path / "bare" / "config.json")
    got = _base_state(from_pretrained(str(tmp_path / "bare"), CFG, torch_dtype=torch.bfloat16))
    want = tiny_model(arch, dtype=torch.bfloat16)
    if arch == "opt":
        want.config.tie_word_embeddings = False
        want.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"].clone())
    inject(want, CFG)
    want = _base_state(want)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_key_renamings_keep_transformers_name_boundaries():
    from qlora_ds.inject.loading import _renamer

    rename = _renamer(tiny_model("gpt_neox"))
    assert rename("embed_out.weight") == "lm_head.weight"
    assert rename("gpt_neox.layers.0.attention.dense.weight_g") == \
        "gpt_neox.layers.0.attention.dense.parametrizations.weight.original0"
    # transformers' patterns end on a name boundary (and its "." is a regex dot): these are other names
    for key in ("gpt_neox.layers.0.attention.dense.weight_gate", "gpt_neox.layers.0.attention.xweight_v2"):
        assert rename(key) == key
    assert rename("layers.0.attention.dense.weight") == "gpt_neox.layers.0.attention.dense.weight"


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_targeted_lm_head_tied_to_the_embeddings(arch, tmp_path):
    """target_modules with lm_head on a tied model: the file holds the weight only as the embedding; the head
    quantizes its own copy and the embedding stays 16-bit, as transformers' load + inject() gives."""
    from transformers import AutoModelForCausalLM

    from qlora_ds.adapters.merge import export_merged, merge_model
    from qlora_ds.nn import QLoRALinear

    source = tiny_model(arch)
    assert source.config.tie_word_embeddings
    source.save_pretrained(tmp_path / "ckpt")
    targets = ("c_attn", "lm_head") if arch == "gpt2" else ("q_proj", "v_proj", "lm_head")
    cfg = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, target_modules=targets)
    ours = from_pretrained(str(tmp_path / "ckpt"), cfg, torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    inject(ref, cfg)
    assert isinstance(ours.lm_head, QLoRALinear)
    emb = ours.get_input_embeddings().weight
    assert emb.dtype == torch.float32 and torch.equal(emb, source.get_input_embeddings().weight)
    a, b = _base_state(ours), _base_state(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ref(x).logits)
        ours.lm_head.lora_B.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
        merged = merge_model(ours)(x).logits
    export_merged(ours, str(tmp_path / "out"), "bf16", dtype=torch.float32)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, merged, rtol=1e-5, atol=1e-5)


def test_bitsandbytes_8bit_checkpoint_is_refused(tmp_path):
    """LLM.int8 checkpoints have quant_method "bitsandbytes" too; their int8 codes must not be taken as weights,
    whether the config says 8-bit or (config edited away) only the stored dtype does."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=BitsAndBytesConfig(
        load_in_8bit=True), dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "int8")
    with pytest.raises(QLoRADSError, match=r"bitsandbytes 8-bit \(LLM.int8\) checkpoint; .* original 16/32-bit"):
        from_pretrained(str(tmp_path / "int8"), CFG)
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "int8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QLoRADSError, match=r"model.layers.0.self_attn.q_proj.weight is stored as I8, not as a "
                                           r"16/32-bit weight.* quantized codes"):
        from_pretrained(str(tmp_path / "int8"), CFG)


def _new_tensor_bytes(fn) -> int:
    """Bytes of new tensor memory the aten ops run by ``fn()`` allocate (outputs on a storage no input holds)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def ptrs(tree):
        return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = ptrs((args, kwargs))
            Count.total += sum(t.nbytes for t in tree_leaves(out)
                               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given)
            return out

    with Count():
        fn()
    return Count.total


def test_save_quantized_streams_tensor_by_tensor(tmp_path, monkeypatch):
    """The file is written tensor by tensor: on the writer no torch copy of a CPU model and no Python-side copy of
    its bytes; a rank that does not write copies nothing; ZeRO-3's gathered parameters go to the file while they are
    gathered (the writer kept a host copy of each until the end: the whole model once more on rank 0)."""
    import contextlib
    import tracemalloc

    import torch.distributed as tdist
    from safetensors import safe_open

    from qlora_ds import distributed
    from qlora_ds.inject import loading

    tiny_model("llama", hidden=512, dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    model = from_pretrained(str(tmp_path / "base"), CFG, torch_dtype=torch.bfloat16)
    state = _base_state(model)
    total = sum(t.nbytes for t in state.values())
    tracemalloc.start()
    try:
        copied = _new_tensor_bytes(lambda: save_quantized(model, str(tmp_path / "one")))
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 2_000_000 and copied == 0
    assert python_peak < total / 4, (python_peak, total)
    with safe_open(str(tmp_path / "one" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == state.keys() and f.metadata() == {"format": "pt"}
    on_disk = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert all(on_disk[k].dtype == state[k].dtype and torch.equal(on_disk[k], state[k]) for k in state)

    # "ZeRO-3" on 2 ranks: the parameters are partitioned (gathered in full, here they are whole already)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "all_ranks_ok", lambda ok: ok)
    live = []

    @contextlib.contextmanager
    def gathered(params):
        live.extend(params)
        yield
        live.clear()

    monkeypatch.setattr(loading, "gathered", gathered)
    partitioned = [p for n, p in model.named_parameters() if ".lora_" not in n]
    for p in partitioned:
        p.ds_id, p.ds_shape = id(p), p.shape
    monkeypatch.setattr(tdist, "get_rank", lambda group=None: 1)
    assert _new_tensor_bytes(lambda: save_quantized(model, str(tmp_path / "rank1"))) == 0
    assert not (tmp_path / "rank1").exists()

    monkeypatch.setattr(tdist, "get_rank", lambda group=None: 0)      # the writer
    from qlora_ds import safetensors_writer
    real_write = safetensors_writer.SafetensorsWriter.write

    def write(self, name, tensor):
        assert not hasattr(tensor, "ds_id") or any(tensor is p for p in live), name     # written while gathered
        real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "write", write)
    assert _new_tensor_bytes(lambda: save_quantized(model, str(tmp_path / "z3"))) == 0
    on_disk = load_file(str(tmp_path / "z3" / "model.safetensors"))
    assert on_disk.keys() == state.keys() and all(torch.equal(on_disk[k], state[k]) for k in state)


def test_save_quantized_directory_keeps_the_dtype_its_codes_came_from(tmp_path):
    """Codes quantized from bf16 and saved stay "quantized from bf16" when the directory is loaded in fp32 (what
    save_adapter writes as quantized_from, and a second save_quantized records); asking for another dtype is an
    error, since the codes cannot change."""
    from qlora_ds.inject.replace import is_quantized_layer

    ckpt = _fp16_llama(tmp_path / "fp16")
    model = from_pretrained(ckpt, _adapter_config("qlora", torch.bfloat16), torch_dtype=torch.bfloat16)
    save_quantized(model, str(tmp_path / "own"))
    for quantize_from in (None, torch.bfloat16, "bf16"):
        again = from_pretrained(str(tmp_path / "own"), CFG, torch_dtype=torch.float32, quantize_from=quantize_from)
        layers = [m for m in again.modules() if is_quantized_layer(m)]
        assert len(layers) == 14 and {m.weight_dtype for m in layers} == {torch.bfloat16}
    save_quantized(again, str(tmp_path / "own2"))
    assert json.loads((tmp_path / "own2" / "qlora_ds_quant.json").read_text())["weight_dtype"] == "bfloat16"
    with pytest.raises(QLoRADSError, match=r"holds codes quantized from bfloat16 \(qlora_ds_quant.json\); "
                                           r"quantize_from=float32 cannot change them"):
        from_pretrained(str(tmp_path / "own"), CFG, torch_dtype=torch.float32, quantize_from=torch.float32)


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_non_finite_weight_names_the_tensor_and_its_shard(tmp_path, method):
    model = tiny_model("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    key = "model.layers.1.mlp.up_proj.weight"
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][key]
    with pytest.raises(QLoRADSError, match=rf"^{key} in {shard} \({tmp_path}\): weight .*(non-finite|NaN)"):
        from_pretrained(str(tmp_path), _adapter_config(method, torch.bfloat16), torch_dtype=torch.bfloat16)


def test_index_shard_names_must_stay_inside_the_checkpoint(tmp_path):
    """A downloaded index's weight_map named '../other_model/model.safetensors' or an absolute path, and the loader
    read that file's tensors into the base; a malformed map crashed with TypeError / AttributeError."""
    from qlora_ds.inject.checkpoint import INDEX_NAME, Checkpoint

    private = tmp_path / "private_model"
    private.mkdir()
    save_file({"w": torch.arange(4.0)}, str(private / "model.safetensors"))
    ckpt = tmp_path / "downloaded"
    (ckpt / "shards").mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(ckpt / "shards" / "model-00001.safetensors"))
    os.symlink(private / "model.safetensors", ckpt / "linked.safetensors")
    for target in ("../private_model/model.safetensors", str(private / "model.safetensors"), "linked.safetensors",
                   "shards/../../private_model/model.safetensors", "./shards/model-00001.safetensors"):
        (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": target}}))
        with pytest.raises(QLoRADSError, match=rf"{INDEX_NAME} in .* points outside the checkpoint directory"):
            Checkpoint(str(ckpt))
    for bad in ({"weight_map": {"w": ["x"]}}, {"weight_map": ["x"]}, {"weight_map": {"w": 3}}):
        (ckpt / INDEX_NAME).write_text(json.dumps(bad))
        with pytest.raises(QLoRADSError, match=rf"{INDEX_NAME} is not a valid safetensors index .*weight_map"):
            Checkpoint(str(ckpt))
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "shards/model-00001.safetensors"}}))
    assert Checkpoint(str(ckpt)).get("w").tolist() == [1.0] * 4


def test_hf_cache_snapshot_links_into_its_blobs_load(tmp_path):
    """A Hugging Face cache snapshot's files are symlinks to ../../blobs: those are inside the model."""
    from qlora_ds.inject.checkpoint import Checkpoint

    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file({"w": torch.full((2,), 3.0)}, str(repo / "blobs" / "f00d"))
    os.symlink("../../blobs/f00d", repo / "snapshots" / "abc" / "model.safetensors")
    assert Checkpoint(str(repo / "snapshots" / "abc")).get("w").tolist() == [3.0, 3.0]

"""Streaming load of MoE experts (qlora_ds.inject.experts_loading): per-expert checkpoints fused exactly as
transformers fuses them, then quantized (the bytes of quantize() of transformers' own fused tensor, the logits of
transformers' load + inject()); fused checkpoints; save_quantized round trips; bitsandbytes checkpoints; the
quantize_experts flag; clear errors for what is not read."""
import dataclasses
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_ds.errors import QLoRADSError
from qlora_ds.inject import from_pretrained, inject, save_quantized
from qlora_ds.nn import QLoRAConfig
from qlora_ds.nn.quantized_experts import PARTS, is_quantized_experts
from qlora_ds.quant.nf4 import quantize

from .dist_utils import check, run_torchrun

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.bfloat16)
ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe"]


def tiny_moe_config(model_type: str):
    """2 layers, 4 experts, hidden 64; the expert width (48) differs from hidden / 2, so a transposed or wrongly
    concatenated gate_up_proj cannot pass for the right one."""
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                num_local_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                num_experts_per_tok=2, max_position_embeddings=64)


def save_tiny_moe(model_type: str, directory, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(model_type)).to(dtype)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=ARCHS)
def moe_dir(request, tmp_path_factory):
    """An fp32 checkpoint as transformers writes it: per-expert keys (mixtral's under block_sparse_moe.*.w1/w2/w3)."""
    d = save_tiny_moe(request.param, tmp_path_factory.mktemp(request.param))
    keys = load_file(f"{d}/model.safetensors").keys()
    assert any(".experts.3." in k for k in keys) and not any(k.endswith("experts.gate_up_proj") for k in keys)
    return d


def hf_load(directory, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def experts_of(model):
    return {p: m for p, m in model.named_modules() if is_quantized_experts(m)}


def assert_quantized_like(module, fused: dict, config=CFG):
    """``module``'s parts are the bytes of quantize() of each fused float tensor in ``fused``."""
    for name, w in fused.items():
        qt = quantize(w.detach(), config.quant_type, config.blocksize, config.double_quant, config.nested_blocksize)
        p = module._parameters
        assert torch.equal(p[f"{name}_packed"], qt.packed.view(-1)), name
        assert torch.equal(p[f"{name}_absmax"], qt.absmax.view(-1)), name
        assert torch.equal(p[f"{name}_absmax2"].view(torch.float32), qt.absmax2), name
        assert p[f"{name}_offset"].view(torch.float32).item() == qt.offset, name
        assert module.dequantized(name).dtype == w.dtype


def base_state(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_per_expert_checkpoint_quantizes_what_transformers_fuses(moe_dir):
    """fp32 per-expert tensors, loaded in bf16: fused (gate then up, experts in order) and rounded to bf16 as
    transformers does, then quantized; the logits are those of transformers' load followed by inject()."""
    ours = from_pretrained(moe_dir, CFG, torch_dtype=torch.bfloat16)
    hf = hf_load(moe_dir)
    experts = experts_of(ours)
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for path, module in experts.items():
        theirs = hf.get_submodule(path)
        assert module.gate_up_proj.shape == theirs.gate_up_proj.shape == (4, 96, 64)
        assert_quantized_like(module, {"gate_up_proj": theirs.gate_up_proj, "down_proj": theirs.down_proj})
        assert all(p.dtype == torch.uint8 and not p.requires_grad for p in module.parameters())
    inject(hf, CFG)
    assert torch.equal(logits(ours), logits(hf))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, _ in ours.named_parameters() if ".lora_" in n}


class _Tensors:
    """The part of Checkpoint that the experts planner and reader use, over a dict of tensors."""
    path = "mem"

    def __init__(self, tensors):
        self.tensors = tensors
        self.shape = {k: tuple(v.shape) for k, v in tensors.items()}

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key):
        return key in self.tensors

    def dtype_name(self, key):
        return {torch.float32: "F32", torch.bfloat16: "BF16"}[self.tensors[key].dtype]

    def get(self, key):
        return self.tensors[key].clone()


@pytest.mark.parametrize("stack_dim,cat_dim", [(0, 1), (0, 0), (1, 0), (-1, 1), (0, -1), (2, 2)])
def test_fusing_matches_transformers_ops_for_any_dims(stack_dim, cat_dim):
    """Converted reproduces transformers' MergeModulelist(stack_dim) then Concatenate(cat_dim) (its own convert()),
    experts in natural order (10 after 9), each tensor cast to the target dtype."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    from qlora_ds.inject.experts_loading import ExpertSources
    patterns = ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"]
    conv = WeightConverter(patterns, "mlp.experts.gate_up_proj", [MergeModulelist(stack_dim), Concatenate(cat_dim)])
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.0.mlp.experts.{e}.{w}.weight": torch.randn(3, 5, generator=g)
               for e in range(11) for w in ("gate_proj", "up_proj")}
    ordered = {p: [tensors[p.replace("*", str(e))] for e in range(11)]
               for p in ["model.layers.0." + q for q in patterns]}
    want = conv.operations[0].convert({p[len("model.layers.0."):]: [t.to(torch.bfloat16) for t in ts]
                                       for p, ts in ordered.items()}, patterns, conv.target_patterns)
    want = conv.operations[1].convert(want, patterns, conv.target_patterns)["mlp.experts.gate_up_proj"]
    sources = ExpertSources(None, _Tensors(tensors))
    sources._groups = {"model.layers.0.mlp.experts.gate_up_proj":
                       (conv, {p: sorted(list(tensors)[i::2]) for i, p in enumerate(patterns)})}   # 10 before 2
    got = sources.source("model.layers.0.mlp.experts.gate_up_proj", tuple(want.shape)).read(sources.ckpt,
                                                                                            torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_save_quantized_round_trip_is_byte_exact(moe_dir, tmp_path):
    ours = from_pretrained(moe_dir, CFG, torch_dtype=torch.bfloat16)
    save_quantized(ours, str(tmp_path / "q"))
    meta = json.loads((tmp_path / "q" / "qlora_ds_quant.json").read_text())
    assert meta["experts"] == sorted(experts_of(ours))
    on_disk = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert on_disk["model.layers.1.mlp.experts.down_proj_packed"].dtype == torch.uint8
    assert not any(".experts.0." in k or k.endswith("experts.down_proj") for k in on_disk)
    again = from_pretrained(str(tmp_path / "q"), CFG, torch_dtype=torch.bfloat16)
    a, b = (base_state(m) for m in (ours, again))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert experts_of(again)["model.layers.0.mlp.experts"].gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(logits(again), logits(ours))
    # fp32 load of the bf16 codes: the experts keep the dtype they were quantized from, as the linears do
    wide = from_pretrained(str(tmp_path / "q"), CFG, torch_dtype=torch.float32)
    assert experts_of(wide)["model.layers.1.mlp.experts"].down_proj.dtype == torch.bfloat16
    with pytest.raises(QLoRADSError, match=r"holds the MoE experts quantized .* has quantize_experts=False; pass "
                                           r"QLoRAConfig\(quantize_experts=True\)"):
        from_pretrained(str(tmp_path / "q"), QLoRAConfig(r=4, quantize_experts=False))


def test_quantize_experts_false_fuses_per_expert_tensors_in_16bit(tmp_path):
    """The experts stay in 16 bit, fused from the per-expert tensors as transformers does (bf16 load); saved that way,
    the directory is refused under quantize_experts=True, naming the flag."""
    d = save_tiny_moe("mixtral", tmp_path / "ckpt")
    cfg = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.bfloat16, quantize_experts=False)
    ours = from_pretrained(d, cfg, torch_dtype=torch.bfloat16)
    hf = hf_load(d)
    assert not experts_of(ours)
    for name in ("gate_up_proj", "down_proj"):
        got, want = (getattr(m.model.layers[1].mlp.experts, name) for m in (ours, hf))
        assert got.dtype == torch.bfloat16 and not got.requires_grad and torch.equal(got, want)
    inject(hf, cfg)
    assert torch.equal(logits(ours), logits(hf))
    save_quantized(ours, str(tmp_path / "q16"))
    assert json.loads((tmp_path / "q16" / "qlora_ds_quant.json").read_text())["experts"] == []
    again = from_pretrained(str(tmp_path / "q16"), cfg, torch_dtype=torch.bfloat16)
    assert torch.equal(again.model.layers[0].mlp.experts.gate_up_proj, ours.model.layers[0].mlp.experts.gate_up_proj)
    with pytest.raises(QLoRADSError, match=r"holds the MoE experts in 16 bit .* has quantize_experts=True; pass "
                                           r"QLoRAConfig\(quantize_experts=False\)"):
        from_pretrained(str(tmp_path / "q16"), CFG)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_fused_checkpoint_is_read_as_stored(arch, tmp_path):
    """A checkpoint that holds the fused 3-D tensors under the parameters' names (written here straight from the
    state dict; GPT-OSS's own save: transposed gate_up_proj (E, H, 2I) with biases; Llama-4's) is quantized
    from them."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch)).to(torch.bfloat16).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert sum(k.endswith(".experts.gate_up_proj") for k in state) == 2        # Llama-4: feed_forward.experts
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    # the attention only: Llama-4's router subclasses nn.Linear with a forward of its own (wrapping it breaks it)
    cfg = dataclasses.replace(CFG, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    ours = from_pretrained(str(tmp_path), cfg, torch_dtype=torch.bfloat16)
    hf = hf_load(str(tmp_path))             # (not `model`: .to(bf16) rounded its rotary inv_freq too)
    for path, module in experts_of(ours).items():
        theirs = model.get_submodule(path)
        assert torch.equal(theirs.gate_up_proj, hf.get_submodule(path).gate_up_proj)
        assert_quantized_like(module, {"gate_up_proj": theirs.gate_up_proj, "down_proj": theirs.down_proj})
        if arch == "gpt_oss":
            assert module.gate_up_proj.shape == (4, 64, 96) and torch.equal(module.gate_up_proj_bias,
                                                                            theirs.gate_up_proj_bias)
    inject(hf, cfg)
    assert torch.equal(logits(ours), logits(hf))


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_checkpoint_of_the_multimodal_model_loads(model_type, tmp_path):
    """The hub's Qwen3.5 files are saved from the vision-language model: the text weights sit under
    ``model.language_model.``, next to ``model.visual.*``. transformers' CausalLM load drops that prefix (a
    ``PrefixChange`` in its conversion mapping); ours reads the same tensors: transformers' logits after inject()."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                layer_types=["linear_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, max_position_embeddings=64)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision)
    AutoModelForImageTextToText.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.visual.") for k in state)
    ours = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.bfloat16)
    hf = hf_load(str(tmp_path))
    assert torch.equal(hf.model.layers[1].self_attn.q_proj.weight,           # transformers read the file's tensors
                       state["model.language_model.layers.1.self_attn.q_proj.weight"])
    assert len(experts_of(ours)) == (2 if "moe" in model_type else 0)
    inject(hf, CFG)
    assert torch.equal(logits(ours), logits(hf))


def test_llama4_checkpoint_of_the_multimodal_model_loads(tmp_path):
    """The hub's Llama-4 files are saved from Llama4ForConditionalGeneration (``language_model.model.…``,
    ``language_model.lm_head.weight``, ``vision_model.…``); AutoModelForCausalLM builds Llama4ForCausalLM, whose
    base-model prefix is ``language_model``, and transformers strips it: ours reads the same tensors."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                num_experts_per_tok=1, max_position_embeddings=64, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama4", text_config=text, vision_config=vision)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)    # fp32, read in bf16 by both
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "language_model.lm_head.weight" in state and any(k.startswith("vision_model.") for k in state)
    cfg = dataclasses.replace(CFG, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))   # the router: see above
    ours = from_pretrained(str(tmp_path), cfg, torch_dtype=torch.bfloat16)
    hf = hf_load(str(tmp_path))
    assert torch.equal(hf.lm_head.weight, state["language_model.lm_head.weight"].to(torch.bfloat16))
    assert len(experts_of(ours)) == 2
    inject(hf, cfg)
    assert torch.equal(logits(ours), logits(hf))


@pytest.mark.parametrize("model_type", ["olmo_hybrid", "kimi_linear"])
def test_weight_concatenated_from_several_tensors_loads(model_type, tmp_path):
    """The short convolution of these linear-attention layers is one parameter that transformers concatenates from
    q/k/v tensors in the file (a converter of ``Concatenate`` alone): read the same way, transformers' logits."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, moe_intermediate_size=48,
                                  num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not any(k.endswith("conv1d.weight") and ".q_" not in k and ".k_" not in k and ".v_" not in k for k in keys)
    ours = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.bfloat16)
    hf = hf_load(str(tmp_path))
    inject(hf, CFG)
    assert torch.equal(logits(ours), logits(hf))


def test_bitsandbytes_checkpoint_experts_are_quantized_from_their_16bit_tensors(tmp_path):
    """transformers + bitsandbytes quantize the linears and leave the experts in 16 bit (saved per expert): the
    linears' bytes are taken as stored, the experts are fused and quantized like a 16-bit checkpoint's."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    d = save_tiny_moe("qwen3_moe", tmp_path / "bf16", torch.bfloat16)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bnb")
    keys = load_file(str(tmp_path / "bnb" / "model.safetensors")).keys()
    assert any(".quant_state.bitsandbytes__nf4" in k for k in keys) and any(".experts.3.up_proj" in k for k in keys)
    ours = from_pretrained(str(tmp_path / "bnb"), CFG, torch_dtype=torch.bfloat16)
    hf = hf_load(d)
    for path, module in experts_of(ours).items():
        theirs = hf.get_submodule(path)
        assert_quantized_like(module, {"gate_up_proj": theirs.gate_up_proj, "down_proj": theirs.down_proj})


def test_load_onto_the_device_puts_the_experts_there(moe_dir, device):
    ref = from_pretrained(moe_dir, CFG, torch_dtype=torch.bfloat16)
    got = from_pretrained(moe_dir, CFG, torch_dtype=torch.bfloat16, device=device)
    want_device = torch.device(device.type, device.index or 0) if device.type == "cuda" else device
    for path, module in experts_of(got).items():
        assert {p.device for p in module.parameters()} == {want_device}, path
        for k, p in module.named_parameters():
            assert torch.equal(p.cpu(), ref.get_submodule(path).get_parameter(k)), (path, k)


def test_per_expert_tensors_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Host memory while fusing: one fused weight (in the quantize_from dtype) and one expert's tensor; every
    expert's tensor is freed before the fused weight is quantized."""
    import weakref

    from qlora_ds.inject import checkpoint as ckpt_mod
    from qlora_ds.inject import experts_loading
    d = save_tiny_moe("qwen3_moe", tmp_path, torch.bfloat16)
    read, real_quantize = ckpt_mod.Checkpoint.get, experts_loading.quantize
    live = {"now": 0, "peak": 0, "at_quantize": []}

    def release():
        live["now"] -= 1

    def tracked(self, key):
        t = read(self, key)
        if ".experts." in key:
            live["now"] += 1
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(t, release)
        return t

    def quantize_(w, *args):
        live["at_quantize"].append((tuple(w.shape), w.dtype, live["now"]))
        return real_quantize(w, *args)

    monkeypatch.setattr(ckpt_mod.Checkpoint, "get", tracked)
    monkeypatch.setattr(experts_loading, "quantize", quantize_)
    from_pretrained(d, CFG, torch_dtype=torch.float32, quantize_from=torch.bfloat16)
    assert live["peak"] == 1
    assert live["at_quantize"] == [((4, 96, 64), torch.bfloat16, 0), ((4, 64, 48), torch.bfloat16, 0)] * 2


def _drop_keys(directory, drop):
    path = f"{directory}/model.safetensors"
    state = load_file(path)
    save_file({k: v for k, v in state.items() if not drop(k)}, path, metadata={"format": "pt"})


def test_missing_per_expert_tensors_are_named(tmp_path):
    d = save_tiny_moe("qwen3_moe", tmp_path / "a", torch.bfloat16)
    _drop_keys(d, lambda k: k.startswith("model.layers.1.mlp.experts.2."))
    with pytest.raises(QLoRADSError, match=r"model.layers.1.mlp.experts.(gate_up|down)_proj: the checkpoint's "
                                           r"per-expert tensors \(3 experts, .* expects \(4, "):
        from_pretrained(d, CFG)
    d = save_tiny_moe("qwen3_moe", tmp_path / "b", torch.bfloat16)
    _drop_keys(d, lambda k: k.startswith("model.layers.0.mlp.experts.") and ".up_proj" in k)
    with pytest.raises(QLoRADSError, match=r"experts.gate_up_proj: .* none for \['mlp.experts.\*.up_proj.weight'\]"):
        from_pretrained(d, CFG)
    _drop_keys(d, lambda k: k.startswith("model.layers.0.mlp.experts."))
    with pytest.raises(QLoRADSError, match=r"no tensor for the fused MoE expert parameter 'model.layers.0.mlp.experts"
                                           r"\.(gate_up|down)_proj'.*model_type='qwen3_moe'"):
        from_pretrained(d, QLoRAConfig(r=4, quantize_experts=False))


def test_converter_with_other_operations_is_refused_with_the_fix(tmp_path, monkeypatch):
    """Only MergeModulelist (+ Concatenate) is reproduced; another op on an experts weight names the model type and
    the way that works (transformers' load, then inject)."""
    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose, WeightConverter
    d = save_tiny_moe("qwen3_moe", tmp_path / "a", torch.bfloat16)
    real = cm.get_model_conversion_mapping

    def mapping(model, *args, **kwargs):
        out = [t for t in real(model, *args, **kwargs) if "mlp.experts.gate_up_proj" not in t.target_patterns]
        return [WeightConverter(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                                "mlp.experts.gate_up_proj", [MergeModulelist(0), Concatenate(1), Transpose(1, 2)]),
                *out]

    monkeypatch.setattr(cm, "get_model_conversion_mapping", mapping)
    with pytest.raises(QLoRADSError, match=r"model_type='qwen3_moe' weight .*Transpose.* AutoModelForCausalLM"
                                           r"\.from_pretrained .* qlora_ds\.inject\.inject"):
        from_pretrained(d, CFG)


ZERO3_SCRIPT = """
import json, sys
import deepspeed, torch, torch.distributed as dist
from qlora_ds.inject import from_pretrained, save_quantized
from qlora_ds.nn import QLoRAConfig
from qlora_ds.nn.quantized_experts import is_quantized_experts
deepspeed.init_distributed(dist_backend="gloo")
ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
model = from_pretrained(sys.argv[1], QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.bfloat16),
                        ds_config=ds, torch_dtype=torch.bfloat16)
parts = {f"{p}.{k}": (v.ds_numel, v.ds_tensor.numel()) for p, m in model.named_modules() if is_quantized_experts(m)
         for k, v in m.named_parameters()}
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(parts, f)
save_quantized(model, f"{sys.argv[2]}/q")
"""


@pytest.mark.multirank
def test_zero3_partitions_the_quantized_experts(tmp_path):
    """ZeRO-3 on 2 CPU ranks: rank 0 reads and quantizes, every rank keeps half of each uint8 part, and the gathered
    bytes (save_quantized) are those of a single-process load."""
    d = save_tiny_moe("qwen3_moe", tmp_path / "ckpt", torch.bfloat16)
    (tmp_path / "z3.py").write_text(textwrap.dedent(ZERO3_SCRIPT))
    check(run_torchrun(tmp_path / "z3.py", d, str(tmp_path), nproc=2))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 2 * 2 * len(PARTS)
    for key, (numel, local) in ranks[0].items():
        assert ranks[1][key][0] == numel and local == ranks[1][key][1] == -(-numel // 2), key
    single = from_pretrained(d, CFG, torch_dtype=torch.bfloat16)
    again = load_file(str(tmp_path / "q" / "model.safetensors"))
    want = base_state(single)
    assert again.keys() == want.keys()
    assert all(torch.equal(again[k], want[k]) for k in want)

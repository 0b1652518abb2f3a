"""The planner's model layouts (qlora_ds/plan/layouts.py): every model type it accepts, built by transformers from a
tiny config, holds exactly the parameters the planner counts, and qlora_ds.inject wraps exactly the linears and
LoRA parameters it plans; one measured check of a plain-MLP layout's activations (CPU only)."""
import pytest
import torch

from qlora_ds.errors import QLoRADSError
from qlora_ds.plan import PlanConfig, estimate_memory, lora_params
from qlora_ds.plan.memory import activation_bytes_per_token_layer
from qlora_ds.plan.presets import SUPPORTED, shape_from_hf_config

H = 64
LLAMA_KW = dict(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0)
MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)}
_PLAIN = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
# model types whose config keys differ from LLaMA's, with the variants that change the layout
VARIANTS = {
    "gpt_neox": [dict(hidden_size=H, intermediate_size=128, **_PLAIN),
                 dict(hidden_size=H, intermediate_size=96, attention_bias=False, use_parallel_residual=False,
                      **_PLAIN)],
    "opt": [dict(hidden_size=H, ffn_dim=128, word_embed_proj_dim=H, max_position_embeddings=64, **_PLAIN),
            dict(hidden_size=H, ffn_dim=128, word_embed_proj_dim=32, max_position_embeddings=64,
                 do_layer_norm_before=False, enable_bias=False, **_PLAIN)],
    "falcon": [dict(hidden_size=H, **_PLAIN),                                    # multi-query, parallel
               dict(hidden_size=H, multi_query=False, bias=True, parallel_attn=False, **_PLAIN),
               dict(hidden_size=H, new_decoder_architecture=True, num_kv_heads=2, **_PLAIN),
               dict(hidden_size=H, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                    ffn_hidden_size=96, **_PLAIN)],
    "gpt2": [dict(n_embd=H, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0),
             dict(n_embd=H, n_layer=2, n_head=4, vocab_size=100, n_positions=32, n_inner=96, bos_token_id=0,
                  eos_token_id=0, tie_word_embeddings=False)],
    "bloom": [dict(hidden_size=H, n_layer=2, n_head=4, vocab_size=100)],
    "phi": [dict(LLAMA_KW, head_dim=None), dict(LLAMA_KW, head_dim=None, qk_layernorm=True)],
    "phi3": [dict(LLAMA_KW, head_dim=None)],
    "starcoder2": [dict(LLAMA_KW, head_dim=None), dict(LLAMA_KW, head_dim=None, use_bias=False)],
    "llama": [dict(LLAMA_KW), dict(LLAMA_KW, attention_bias=True, mlp_bias=True)],
    "granite": [dict(LLAMA_KW, attention_bias=True, mlp_bias=True)],
}
CASES = [(mt, i, kw) for mt in SUPPORTED for i, kw in enumerate(VARIANTS.get(mt, [dict(LLAMA_KW, **MOE.get(mt, {}))]))]


def _build(model_type, kw, **extra):
    import transformers as tf
    config = tf.AutoConfig.for_model(model_type, **{k: v for k, v in kw.items() if v is not None}, **extra)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type,variant,kw", CASES, ids=[f"{m}-{i}" for m, i, _ in CASES])
def test_planner_counts_what_transformers_builds_and_inject_wraps(model_type, variant, kw):
    """The quantized linears (what inject wraps, by default: all linear), the LoRA A/B it adds at r=4, and every
    other parameter (embeddings, position tables, norms, biases, experts) are the planner's, exactly."""
    from qlora_ds.inject import inject, select
    from qlora_ds.nn import QLoRAConfig
    model = _build(model_type, kw)
    s = shape_from_hf_config(model.config.to_dict())
    total = sum(p.numel() for p in model.parameters())
    paths = select(model, QLoRAConfig(r=4))
    assert s.linear_params == sum(model.get_submodule(p).weight.numel() for p in paths)
    assert s.total_params == total and s.embedding_params == total - s.linear_params
    # the layout's names are the model's own: every wrapped module is one of them
    names = set(s.linears())
    assert all(any(p.endswith("." + n) for n in names) for p in paths), (sorted(names), paths[:8])
    inject(model, QLoRAConfig(r=4, compute_dtype=torch.float32))
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == lora_params(s, 4)


@pytest.mark.parametrize("model_type,targets", [("gpt2", ("c_attn",)), ("gpt2", ("c_proj",)),
                                                ("gpt2", ("mlp.c_proj", "c_fc")), ("phi3", ("qkv_proj", "o_proj")),
                                                ("falcon", ("query_key_value", "dense_4h_to_h")),
                                                ("opt", ("q_proj", "v_proj", "fc2")),
                                                ("llama", ("self_attn.q_proj", "self_attn.v_proj"))])
def test_lora_targets_are_the_models_module_names(model_type, targets):
    """Targets by leaf name (GPT-2's c_proj is in attention and MLP both) or by path inside the layer, as PEFT and
    inject match target_modules (the same names on both sides): the LoRA the planner counts is what inject adds."""
    from qlora_ds.inject import inject
    from qlora_ds.nn import QLoRAConfig
    model = _build(model_type, VARIANTS[model_type][0])
    s = shape_from_hf_config(model.config.to_dict())
    inject(model, QLoRAConfig(r=4, target_modules=tuple(targets), compute_dtype=torch.float32))
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == lora_params(s, 4, targets)
    assert 0 < lora_params(s, 4, targets) < lora_params(s, 4)


def test_multimodal_gemma3_plans_its_text_model_and_keeps_the_rest_16bit():
    """Gemma-3 4B/12B/27B load as Gemma3ForConditionalGeneration: the planner plans the text model from the text
    config (widths the published file leaves to transformers' defaults filled in) and counts the vision tower and
    projector, which inject leaves unwrapped, in 16 bit: exactly what transformers builds and inject wraps."""
    import transformers as tf

    from qlora_ds.inject import inject, select
    from qlora_ds.nn import QLoRAConfig
    text = dict(LLAMA_KW, model_type="gemma3_text", sliding_window=16)
    del text["head_dim"]                                # left to the default (256), as Google's configs do
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    s = shape_from_hf_config(config.to_dict())
    assert s.layout.family == "gemma3_text" and s.head_dim == 256 and s.frozen_params > 0
    vision_params = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n)
    assert s.frozen_params == vision_params
    assert s.total_params == sum(p.numel() for p in model.parameters())
    paths = select(model, QLoRAConfig(r=4))
    assert s.linear_params == sum(model.get_submodule(p).weight.numel() for p in paths)
    inject(model, QLoRAConfig(r=4, compute_dtype=torch.float32))
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == lora_params(s, 4)


def test_targets_that_match_no_linear_of_the_layout_are_refused():
    s = shape_from_hf_config({**LLAMA_KW, "model_type": "gpt2", "n_positions": 64})
    with pytest.raises(QLoRADSError, match=r"gpt2 layout \(attn\.c_attn, attn\.c_proj, mlp\.c_fc, mlp\.c_proj.*"
                                           r"\['q_proj', 'v_proj'\] match none"):
        PlanConfig(shape=s, lora_targets=("q_proj", "v_proj"))
    assert PlanConfig(shape=s, lora_targets=()).lora_targets == ()      # no LoRA at all is a plan too


@pytest.mark.parametrize("model_type", ["t5", "mamba", "gptj", "gpt_bigcode", "deepseek_v3"])
def test_model_types_without_a_layout_are_refused(model_type):
    with pytest.raises(QLoRADSError, match=f"model_type '{model_type}' is not modelled; the planner models llama"):
        shape_from_hf_config({**LLAMA_KW, "model_type": model_type})


def _saved_bytes_per_layer(model, layer, batch: int, seq: int, whole: bool = False):
    """Bytes autograd saves inside ``layer``'s forward (distinct storages; the model's own weights left out); with
    ``whole``, (those, the bytes the whole forward saves). KV cache off, as qlora-ds trains: a train-mode forward
    with transformers' cache keeps its copies of k and v too (qlora_ds/plan/attention.py)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved, every, inside = {}, {}, [False]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            every[ptr] = t.untyped_storage().nbytes()
            if inside[0]:
                saved[ptr] = t.untyped_storage().nbytes()
        return t
    hooks = [layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    ids = torch.randint(1, 100, (batch, seq)).to(model.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return (sum(saved.values()), sum(every.values())) if whole else sum(saved.values())


def _slope(r: int) -> tuple[int, float]:
    """(planned, measured) bytes per token of one GPT-NeoX decoder layer (see the test below), in this process."""
    from qlora_ds.inject import inject
    from qlora_ds.nn import QLoRAConfig, functional
    # the kept-weight pool (the planner's dequant_keep, per weight, not per token) off: without AMX's fused linear
    # (e.g. AVX2) the two batches would keep different sets of dequantized weights
    functional.KEEP_LIMIT = 0
    functional.set_keep_limit(0)                          # and the pool emptied
    model = _build("gpt_neox", VARIANTS["gpt_neox"][0], attn_implementation="sdpa", dtype=torch.bfloat16)
    if r:
        inject(model, QLoRAConfig(r=r, dropout=0.0, compute_dtype=torch.bfloat16))
    else:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
    layer, seq = model.gpt_neox.layers[1], SLOPE_SEQ
    one, three = (_saved_bytes_per_layer(model, layer, b, seq) for b in (1, 3))
    s = shape_from_hf_config(model.config.to_dict())
    return activation_bytes_per_token_layer(s, r, dropout=0.0, elem=2, mask_bytes=0), (three - one) / (2 * seq)


SLOPE_SEQ = 48


@pytest.mark.parametrize("r", [0, 8])
def test_plain_mlp_activations_are_what_autograd_keeps(r):
    """GPT-NeoX in bf16 on the CPU (SDPA; parallel block: two LayerNorms of one input, fused query_key_value, a
    plain gelu MLP, biases), its LoRA on all linears with dropout 0: per token, one decoder layer's saved tensors
    are the planner's activation term. Measured as the slope between batch 1 and 3 (per-layer constants such as
    rotary tables and the LoRA weights' bf16 copies cancel). A gated MLP's 3·e·i in place of gelu's e·i would be
    512 B/token over. Measured in a fresh interpreter: in the full suite's process an earlier test's process-wide
    state once made SDPA keep more (1560 vs 920 B/token at r 0)."""
    import json
    import subprocess
    import sys

    from .dist_utils import REPO, dist_env
    code = f"import json; from tests.test_plan_layouts import _slope; print(json.dumps(_slope({r})))"
    proc = subprocess.run([sys.executable, "-c", code], env=dist_env(), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned, measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert planned == pytest.approx(measured, rel=0.01), (planned, measured)
    s = shape_from_hf_config(_build("gpt_neox", VARIANTS["gpt_neox"][0]).config.to_dict())
    cfg = PlanConfig(shape=s, lora_r=r, lora_dropout=0.0, device="cpu", seq_len=SLOPE_SEQ, grad_ckpt=False)
    assert estimate_memory(cfg).get("activations") == s.layers * SLOPE_SEQ * planned


@pytest.mark.parametrize("cfg,published", [
    ({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
      "tie_word_embeddings": True}, 124_439_808),                                             # gpt2
    ({"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32,
      "vocab_size": 65024, "multi_query": True, "parallel_attn": True, "bias": False}, 6_921_720_704),  # falcon-7b
    ({"model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32,
      "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 4096}, 6_658_473_984),  # opt-6.7b
    ({"model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
      "num_attention_heads": 32, "vocab_size": 51200, "tie_word_embeddings": False}, 2_779_683_840),     # phi-2
    ({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False},
     3_821_079_552),                                                                           # Phi-3-mini
])
def test_published_models_have_their_published_size(cfg, published):
    assert shape_from_hf_config(cfg).total_params == published

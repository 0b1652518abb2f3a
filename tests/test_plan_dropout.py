"""The model's own dropout in the planner (plan/layouts.py reads which dropouts a config turns on, plan/memory.py
counts what they keep): measured per model type as the difference between a tiny model built with every dropout key
of its config at 0.1 and at 0, per token, in bf16 and fp32 on the CPU (SDPA where transformers has it), for one
decoder layer, for the whole forward, and outside the layers under gradient checkpointing."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from qlora_ds.plan import PlanConfig, estimate_memory
from qlora_ds.plan.memory import activation_bytes, activation_bytes_per_token_layer, model_dropout_bytes_per_token
from qlora_ds.plan.presets import SUPPORTED, shape_from_hf_config

from .test_plan_layouts import _PLAIN, H, LLAMA_KW, MOE, VARIANTS, _build, _saved_bytes_per_layer

# every dropout key of the supported configs (a config class ignores the ones it does not have)
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "residual_dropout", "embedding_dropout")
EAGER = ("bloom", "gemma2")             # transformers 5.23 has no SDPA path for them
SEQ = 32
# GPT-2 without attention dropout here: with it, see test_gpt2_attention_dropout_layer_is_exact
CASES = ([(mt, VARIANTS.get(mt, [dict(LLAMA_KW, **MOE.get(mt, {}))])[0], {}) for mt in SUPPORTED if mt != "gpt2"]
         + [("gpt2", VARIANTS["gpt2"][0], {"attn_pdrop": 0.0}),
            ("falcon", VARIANTS["falcon"][1], {}),                     # sequential: attention_dropout on its residual
            ("falcon", dict(hidden_size=H, alibi=True, **_PLAIN), {})])   # ALiBi: attention_dropout inside SDPA
IDS = [f"{mt}-{i}" for i, (mt, _, _) in enumerate(CASES)]


def _config(mt, kw, p, overrides):
    import transformers as tf
    drops = {k: p for k in DROPOUT_KEYS}
    return tf.AutoConfig.for_model(mt, **{k: v for k, v in kw.items() if v is not None}, **{**drops, **overrides})


def _slopes(mt, kw, p, overrides, dtype, ckpt, device="cpu") -> tuple[float, float]:
    """Per token (batch 2 vs 3: at batch 1 some layouts keep views in place of copies, attention.py): bytes saved
    inside decoder layer 1, and in the whole forward (outside the layers only, with checkpointing: the checkpoint
    keeps what is inside them to itself)."""
    attn = {} if mt in EAGER else {"attn_implementation": "sdpa"}
    model = _build(mt, kw, dtype=dtype, **attn, **{**{k: p for k in DROPOUT_KEYS}, **overrides}).to(device)
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = next(m for n, m in model.named_modules() if n.endswith(("layers.1", "h.1")))
    two, three = (_saved_bytes_per_layer(model, layer, b, SEQ, whole=True) for b in (2, 3))
    return tuple((b - a) / SEQ for a, b in zip(two, three))


def _measure(cases) -> dict:
    """{"case/dtype": [layer Δ, forward Δ, outside-the-layers Δ under checkpointing]}, dropout on minus off."""
    out = {}
    for i, (mt, kw, overrides) in enumerate(cases):
        for dtype in ("bfloat16", "float32"):
            dt = getattr(torch, dtype)
            (lay1, all1), (lay0, all0) = (_slopes(mt, kw, p, overrides, dt, False) for p in (0.1, 0.0))
            (_, out1), (_, out0) = (_slopes(mt, kw, p, overrides, dt, True) for p in (0.1, 0.0))
            out[f"{i}/{dtype}"] = [lay1 - lay0, all1 - all0, out1 - out0]
    return out


@pytest.fixture(scope="module")
def measured():
    """All cases in one fresh interpreter (as tests/test_plan_layouts.py's slope: no earlier test's state)."""
    from .dist_utils import REPO, dist_env
    code = "import json; from tests.test_plan_dropout import CASES, _measure; print(json.dumps(_measure(CASES)))"
    proc = subprocess.run([sys.executable, "-c", code], env=dist_env(), capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _planned(shape, e, ckpt):
    cfg = PlanConfig(shape=shape, device="cpu", compute_dtype={2: "bf16", 4: "fp32"}[e], seq_len=SEQ, micro_batch=2,
                     lora_r=0, grad_ckpt=ckpt)
    return activation_bytes(cfg)["activations"] / (2 * SEQ)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
@pytest.mark.parametrize("e", [2, 4], ids=["bf16", "fp32"])
def test_model_dropout_is_what_autograd_keeps(measured, case, e):
    """Per token, what turning the config's dropouts on adds: in one decoder layer (CPU: e-byte noise per hidden-wide
    dropout; SDPA's math path instead of its flash kernel, or eager attention's noise), over the whole forward without
    checkpointing (layers + the embedding's dropout), and with it (one recomputed layer + the embedding's dropout)."""
    mt, kw, overrides = CASES[case]
    layer, forward, outside = measured[f"{case}/{'bfloat16' if e == 2 else 'float32'}"]
    on, off = (shape_from_hf_config(_config(mt, kw, p, overrides).to_dict()) for p in (0.1, 0.0))
    assert model_dropout_bytes_per_token(off, e, "cpu", SEQ, 2) == (0, 0)
    assert activation_bytes_per_token_layer(on, 0, elem=e, keys=SEQ) == activation_bytes_per_token_layer(
        off, 0, elem=e, keys=SEQ)
    assert model_dropout_bytes_per_token(on, e, "cpu", SEQ, 2) == (layer, outside)
    assert _planned(on, e, False) - _planned(off, e, False) == forward == on.layers * layer + outside
    assert _planned(on, e, True) - _planned(off, e, True) == layer + outside
    assert layer > 0      # every supported layout has a dropout its config turns on


def test_gpt2_attention_dropout_layer_is_exact():
    """GPT-2 with its default dropouts (all 0.1): SDPA's math path keeps its fp32 copies of q, k and v, not c_attn's
    fused output (which its flash kernel keeps through the views of it), so with attention dropout on the whole
    decoder layer is the planner's, to the byte, in bf16 and fp32."""
    from .dist_utils import REPO, dist_env
    code = ("import json, torch; from tests.test_plan_dropout import _slopes; from tests.test_plan_layouts import "
            "VARIANTS; print(json.dumps([_slopes('gpt2', VARIANTS['gpt2'][0], 0.1, {}, d, False)[0] "
            "for d in (torch.bfloat16, torch.float32)]))")
    proc = subprocess.run([sys.executable, "-c", code], env=dist_env(), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16, fp32 = json.loads(proc.stdout.strip().splitlines()[-1])
    shape = shape_from_hf_config(_config("gpt2", VARIANTS["gpt2"][0], 0.1, {}).to_dict())
    for e, got in ((2, bf16), (4, fp32)):
        assert activation_bytes_per_token_layer(shape, 0, elem=e, keys=SEQ, batch=2) + model_dropout_bytes_per_token(
            shape, e, "cpu", SEQ, 2)[0] == got


def test_dropout_is_read_from_the_config_with_transformers_defaults():
    """A config.json without dropout keys gets its class's defaults (GPT-2 and OPT train with 0.1); 0 turns a dropout
    off; on CUDA a dropout keeps a bool mask (1 B/element) and SDPA's attention dropout nothing; the plan grows by
    exactly the activation term."""
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64}
    lay = shape_from_hf_config(gpt2).layout
    assert (lay.hidden_dropouts, lay.attn_dropout, lay.embed_dropout) == (2, True, True)
    off = shape_from_hf_config({**gpt2, "resid_pdrop": 0.0, "embd_pdrop": 0, "attn_pdrop": 0.0})
    assert (off.layout.hidden_dropouts, off.layout.attn_dropout, off.layout.embed_dropout) == (0, False, False)
    opt = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 100}
    assert shape_from_hf_config(opt).layout.hidden_dropouts == 2
    assert not shape_from_hf_config({**opt, "dropout": 0.0}).layout.hidden_dropouts
    s = shape_from_hf_config(gpt2)
    assert model_dropout_bytes_per_token(s, 2, "cuda", 512) == (2 * 64, 64)
    bloom = shape_from_hf_config({"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 4,
                                  "vocab_size": 100, "attention_dropout": 0.1})
    assert model_dropout_bytes_per_token(bloom, 2, "cuda", 512) == (4 * 512, 0)       # eager: a mask per head and key
    cfg = PlanConfig(shape=s, seq_len=128, micro_batch=2)
    plain = replace(cfg, shape=off)
    grown = {it.name: it.bytes - estimate_memory(plain).get(it.name) for it in estimate_memory(cfg).items}
    assert {k for k, v in grown.items() if v} == {"activations", "fragmentation"}
    assert grown["activations"] == 2 * 128 * (2 * 64 + 64)        # checkpointing: one recomputed layer + embedding


@pytest.mark.cuda
@pytest.mark.parametrize("mt", ["gpt2", "gpt_neox", "bloom"])
def test_model_dropout_on_cuda_keeps_bool_masks(mt):
    """On CUDA (bf16) a dropout keeps a bool mask (1 B/element), SDPA's attention dropout nothing, eager attention's
    a mask per head and key: the planner's CUDA terms, measured as on the CPU."""
    kw = VARIANTS[mt][0]
    (layer1, all1), (layer0, all0) = (_slopes(mt, kw, p, {}, torch.bfloat16, False, "cuda") for p in (0.1, 0.0))
    shape = shape_from_hf_config(_config(mt, kw, 0.1, {}).to_dict())
    planned_layer, planned_once = model_dropout_bytes_per_token(shape, 2, "cuda", SEQ, 2)
    assert (layer1 - layer0, all1 - all0) == (planned_layer, shape.layers * planned_layer + planned_once)

"""The planner's attention and norm terms (qlora_ds/plan/attention.py, the norms of plan/memory.py) are what autograd
keeps: one decoder layer of a tiny model of every dense layout (MoE routing is not modelled), on the CPU in bf16 and
fp32, KV cache off as qlora-ds trains, at batch 1 and per token beyond it (Falcon's multi-query math path keeps
less at batch 1), at two sequence lengths (eager attention's probabilities grow with the keys); under gradient
checkpointing, the recomputed layer holds them, once."""
import json
import subprocess
import sys

import pytest
import torch

from qlora_ds.plan import PlanConfig
from qlora_ds.plan.memory import activation_bytes, activation_bytes_per_token_layer, model_dropout_bytes_per_token
from qlora_ds.plan.presets import shape_from_hf_config

from .test_plan_dropout import DROPOUT_KEYS, EAGER
from .test_plan_layouts import _PLAIN, H, LLAMA_KW, VARIANTS, _build, _saved_bytes_per_layer

SEQS = (16, 32)
FALCON = dict(hidden_size=H, **_PLAIN)
CASES = {   # id: (model_type, config keywords); every dropout 0 unless given
    "llama": ("llama", LLAMA_KW),                        # RMSNorm: fp32 input and rstd, no e-byte copy (frozen weight)
    "qwen3": ("qwen3", LLAMA_KW),                        # q/k RMSNorm per head
    "olmo": ("olmo", LLAMA_KW),                          # LayerNorm without parameters, in fp32
    "olmo2": ("olmo2", LLAMA_KW),                        # q/k RMSNorm over the full width
    "gemma3": ("gemma3_text", LLAMA_KW),
    "phi-qk": ("phi", VARIANTS["phi"][1]),               # q/k LayerNorm per head
    "gpt2": ("gpt2", VARIANTS["gpt2"][0]),               # q, k, v views of c_attn's output
    "gpt_neox": ("gpt_neox", VARIANTS["gpt_neox"][0]),   # fused q|k|v, RoPE copies q and k: v a view of the output
    "phi3": ("phi3", VARIANTS["phi3"][0]),
    "bloom": ("bloom", VARIANTS["bloom"][0]),            # eager
    "gemma2": ("gemma2", LLAMA_KW),                      # eager, soft-capped
    "gemma2-nocap": ("gemma2", dict(LLAMA_KW, attn_logit_softcapping=None)),
    "falcon-mq": ("falcon", VARIANTS["falcon"][0]),      # one k/v head: SDPA's math path (falcon-7b)
    "falcon-mha": ("falcon", VARIANTS["falcon"][1]),     # materialized causal mask
    "falcon-new": ("falcon", VARIANTS["falcon"][2]),     # k and v expanded to every head
    "falcon-alibi-mq": ("falcon", dict(FALCON, alibi=True)),
    "falcon-alibi": ("falcon", dict(FALCON, alibi=True, multi_query=False)),   # flash with a bias per head
    "falcon-alibi-dropout": ("falcon", dict(FALCON, alibi=True, multi_query=False, attention_dropout=0.1)),
}


def _model(mt, kw, dtype, device="cpu"):
    drops = {k: kw.get(k, 0.0) for k in DROPOUT_KEYS}
    attn = {} if mt in EAGER else {"attn_implementation": "sdpa"}
    model = _build(mt, {k: v for k, v in kw.items() if k not in drops}, dtype=dtype, **attn, **drops).to(device)
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model.train()


def _layer(model):
    return next(m for n, m in model.named_modules() if n.endswith(("layers.1", "h.1")))


def _per_token(mt, kw, dtype, seq, device="cpu") -> tuple[float, float]:
    """(at batch 1, per token beyond it): layer 1's saved bytes at batch 1, 2 and 3; what does not grow with the
    batch (rotary tables, masks shared by the batch) extrapolated from batch 2 and 3 and taken off."""
    model = _model(mt, kw, dtype, device)
    one, two, three = (_saved_bytes_per_layer(model, _layer(model), b, seq) for b in (1, 2, 3))
    return (one - (3 * two - 2 * three)) / seq, (three - two) / seq


def _recomputed(mt, kw, dtype, seq) -> float:
    """Per token (batch 2 to 3): what the last decoder layer's recomputation saves in backward under gradient
    checkpointing. Reentrant checkpointing recomputes under the caller's saved-tensor hooks (the non-reentrant kind
    qlora-ds uses recomputes the same ops under hooks of its own)."""
    saved = []
    for b in (2, 3):
        model = _model(mt, kw, dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        layers = [m for n, m in model.named_modules() if n.endswith((".layers.0", ".h.0", ".layers.1", ".h.1"))]
        current = [None]
        for i, layer in enumerate(layers):
            for sub in layer.modules():
                sub.register_forward_pre_hook(lambda *a, i=i: current.__setitem__(0, i))
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        kept = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if current[0] == len(layers) - 1 and ptr not in weights:
                kept[ptr] = t.untyped_storage().nbytes()
            return t
        ids = torch.randint(1, 100, (b, seq))
        loss = model(ids, labels=ids, use_cache=False).loss
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss.backward()
        saved.append(sum(kept.values()))
    return (saved[1] - saved[0]) / seq


def _measure(ids) -> dict:
    return {f"{i}/{d}/{s}": _per_token(*CASES[i], getattr(torch, d), s) for i in ids
            for d in ("bfloat16", "float32") for s in SEQS}


def _fresh(code: str):
    """Run in a fresh interpreter (as tests/test_plan_layouts.py's slope: no earlier test's process-wide state)."""
    from .dist_utils import REPO, dist_env
    proc = subprocess.run([sys.executable, "-c", f"import json; {code}"], env=dist_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured():
    return _fresh(f"from tests.test_plan_attention import _measure; print(json.dumps(_measure({list(CASES)})))")


def _shape(mt, kw):
    return shape_from_hf_config(_model(mt, kw, torch.float32).config.to_dict())


def _planned(shape, e, seq, batch, device="cpu"):
    return (activation_bytes_per_token_layer(shape, 0, elem=e, keys=seq, batch=batch)
            + model_dropout_bytes_per_token(shape, e, device, seq, batch)[0])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_attention_and_norms_are_what_autograd_keeps(measured, case, dtype):
    shape, e = _shape(*CASES[case]), 2 if dtype == "bfloat16" else 4
    for seq in SEQS:
        assert tuple(measured[f"{case}/{dtype}/{seq}"]) == (_planned(shape, e, seq, 1), _planned(shape, e, seq, 2))


@pytest.mark.parametrize("case", ["bloom", "gemma2", "falcon-mq"])
def test_checkpointing_keeps_the_probabilities_of_the_recomputed_layer_only(case):
    """Under gradient checkpointing the layer being recomputed holds what the planner counts per layer (its eager
    probabilities included), and the plan counts that once beside the layer inputs."""
    mt, kw = CASES[case]
    got = _fresh(f"import torch; from tests.test_plan_attention import CASES, _recomputed; "
                 f"print(json.dumps(_recomputed(*CASES[{case!r}], torch.bfloat16, 32)))")
    shape = _shape(mt, kw)
    assert got == _planned(shape, 2, 32, 2)
    cfg = PlanConfig(shape=shape, device="cpu", seq_len=32, micro_batch=2, lora_r=0)
    t, h = 64, shape.hidden
    assert activation_bytes(cfg)["activations"] == (shape.layers * t * 2 * h + t * _planned(shape, 2, 32, 2)
                                                    + 2 * t * max(h, shape.intermediate))


def _with_cache(mt, kw, dtype, seq) -> float:
    """Per token (batch 2 to 3): layer 1's saved bytes in a train-mode forward that builds transformers' cache."""
    model = _model(mt, kw, dtype)
    forward = model.forward
    model.forward = lambda ids, use_cache: forward(ids, use_cache=True)
    two, three = (_saved_bytes_per_layer(model, _layer(model), b, seq) for b in (2, 3))
    return (three - two) / seq


def test_the_kv_cache_kept_the_copies_training_does_not_make():
    """GPT-2 in a train-mode forward that builds transformers' cache keeps its copies of k and v beside c_attn's
    output (e·2kv per token more: what an earlier measurement took for SDPA's); qlora-ds trains with
    use_cache=False, where the layer is the planner's (test above)."""
    got = _fresh("import torch; from tests.test_plan_attention import CASES, _with_cache; "
                 "print(json.dumps(_with_cache(*CASES['gpt2'], torch.bfloat16, 32)))")
    shape = _shape(*CASES["gpt2"])
    assert got == _planned(shape, 2, 32, 2) + 2 * 2 * shape.kv_dim


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["llama", "gpt_neox", "bloom", "gemma2", "falcon-mq", "falcon-mha", "falcon-new"])
def test_attention_on_cuda_is_what_autograd_keeps(case):
    """On CUDA (bf16): the same terms (eager attention runs the same code; SDPA's flash / efficient kernels keep
    q, k, v as given, their output, log-sum-exp and Falcon's mask; the math path computes in fp32 there too)."""
    mt, kw = CASES[case]
    assert _per_token(mt, kw, torch.bfloat16, 32, "cuda") == (_planned(_shape(mt, kw), 2, 32, 1, "cuda"),
                                                               _planned(_shape(mt, kw), 2, 32, 2, "cuda"))

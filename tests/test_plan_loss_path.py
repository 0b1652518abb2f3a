"""The planner's LM head + loss (qlora_ds/plan/loss.py): the chunked loss where qlora_ds.loss would run it, the full
logits (with what the model's logit transform keeps for backward) where it would not."""
from dataclasses import replace

import pytest
import torch

from qlora_ds.plan import PlanConfig
from qlora_ds.plan.loss import loss_path
from qlora_ds.plan.memory import activation_bytes
from qlora_ds.plan.presets import shape_from_hf_config

GEMMA2 = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
          "final_logit_softcapping": 30.0}
V, H, T = 256000, 2304, 2048
ROWS = (1 << 24) // V                  # 65 rows of 256,000 fp32 logits in a chunk


def _logits(config: dict, **kw) -> float:
    cfg = PlanConfig(shape=shape_from_hf_config(config), seq_len=T, **kw)
    return activation_bytes(cfg)["logits_loss"]


def test_gemma2_plans_the_chunked_loss_and_an_unverified_type_the_full_logits():
    assert ROWS == 65
    # the soft cap inside the chunked loss: its tanh is one more chunk of fp32
    assert _logits(GEMMA2, chunked_loss=True) == 3 * 4 * ROWS * V + T * (4 + 8 * H)
    # the plain path: 12 B per logit and the tanh output in the compute dtype (bf16; fp32: 4 B)
    assert _logits(GEMMA2, chunked_loss=False) == T * V * (12 + 2)
    assert _logits(GEMMA2, chunked_loss=False, compute_dtype="fp32") == T * V * (12 + 4)
    # a transform Gemma-2's forward does not apply: the plain loss (which still caps)
    assert _logits(dict(GEMMA2, logits_scaling=4.0), chunked_loss=True) == T * V * (12 + 2)
    # no cap set: two chunk buffers, and nothing extra in the full logits
    assert _logits(dict(GEMMA2, final_logit_softcapping=None), chunked_loss=True) == 2 * 4 * ROWS * V + T * (4 + 8 * H)
    assert _logits(dict(GEMMA2, final_logit_softcapping=None), chunked_loss=False) == T * V * 12
    # a model type the chunked loss is not verified on (a remote-code architecture of the same shape): full logits
    shape = shape_from_hf_config(dict(GEMMA2, final_logit_softcapping=None))
    remote = PlanConfig(shape=replace(shape, layout=replace(shape.layout, family="my_remote_gemma")), seq_len=T,
                        chunked_loss=True)
    assert "not one the chunked loss is verified on" in loss_path(remote)[1]
    assert activation_bytes(remote)["logits_loss"] == T * V * 12
    # Granite divides by its logits_scaling (a Python number: nothing kept for backward)
    granite = dict(GEMMA2, model_type="granite", logits_scaling=8.0)
    del granite["final_logit_softcapping"]
    assert _logits(granite, chunked_loss=True) == 2 * 4 * ROWS * V + T * (4 + 8 * H)
    assert _logits(granite, chunked_loss=False) == T * V * 12


KW = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def _model(model_type: str, dtype=torch.float32, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **KW, **extra), dtype=dtype)


@pytest.mark.parametrize("model_type, extra, chunked", [
    ("gemma2", {}, True), ("gemma2", {"final_logit_softcapping": None}, True), ("llama", {}, True),
    ("granite", {"logits_scaling": 8.0}, True), ("gemma2", {"logits_scaling": 4.0}, False),
    ("llama", {"final_logit_softcapping": 5.0}, False),
    ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}, True),
    ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1, "output_router_logits": True}, False)])
def test_the_planner_agrees_with_the_loss(model_type, extra, chunked):
    """The planner decides from config.json what qlora_ds.loss decides on the model built from it."""
    from qlora_ds.loss import chunked_transform
    model = _model(model_type, **extra)
    config = model.config.to_dict()
    plan = loss_path(PlanConfig(shape=shape_from_hf_config(config), chunked_loss=True))
    assert plan == chunked_transform(model)
    assert (plan[1] is None) == chunked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_plain_paths_transform_keeps_what_the_planner_adds(dtype):
    """Measured with saved-tensor hooks: Gemma-2's soft cap keeps its tanh output (e B per logit) beyond the uncapped
    model; Granite's division by logits_scaling keeps nothing."""
    b, t = 2, 24
    ids = torch.randint(1, 512, (b, t), generator=torch.Generator().manual_seed(0))

    def saved(model) -> int:
        kept = {}

        def pack(x):
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model(input_ids=ids, labels=ids, use_cache=False)
        return sum(kept.values())

    e = torch.finfo(dtype).bits // 8
    for model_type, on, off, extra_bytes in (("gemma2", {"final_logit_softcapping": 30.0},
                                              {"final_logit_softcapping": None}, e),
                                             ("granite", {"logits_scaling": 8.0}, {"logits_scaling": 1.0}, 0)):
        measured = saved(_model(model_type, dtype, **on)) - saved(_model(model_type, dtype, **off))
        assert measured == b * t * 512 * extra_bytes, (model_type, measured)
        config = _model(model_type, dtype, **on).config.to_dict()
        planned = [_plan_full(dict(config, **o), dtype, b * t) for o in (on, off)]
        assert planned[0] - planned[1] == measured


def _plan_full(config: dict, dtype, tokens: int) -> float:
    cfg = PlanConfig(shape=shape_from_hf_config(config), seq_len=tokens,
                     compute_dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
    return activation_bytes(cfg)["logits_loss"]


def test_the_report_says_which_loss_the_run_takes():
    """The plan's first line names the loss path plan/loss.py chose, and why the chunked loss does not run."""
    from qlora_ds.plan import format_report, plan
    chunked = format_report(plan(PlanConfig(shape=shape_from_hf_config(GEMMA2), seq_len=T, chunked_loss=True)))
    assert "loss chunked" in chunked.splitlines()[0]
    full = format_report(plan(PlanConfig(shape=shape_from_hf_config(dict(GEMMA2, logits_scaling=4.0)), seq_len=T,
                                         chunked_loss=True)))
    assert "loss over the full logits (the chunked loss does not run: config.logits_scaling=4.0" in full
    off = format_report(plan(PlanConfig(shape=shape_from_hf_config(GEMMA2), seq_len=T, chunked_loss=False)))
    assert "loss over the full logits" in off.splitlines()[0] and "does not run" not in off


def test_a_composite_gemma3_plans_no_soft_cap_its_forward_never_applies():
    """Gemma3ForConditionalGeneration never caps its logits, whatever its text config holds: the planner plans the
    composite as its loss runs (no cap), not as a Gemma3ForCausalLM would."""
    import transformers as tf
    from qlora_ds.loss import chunked_transform

    text = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=96, final_logit_softcapping=30.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    shape = shape_from_hf_config(config.to_dict())
    assert chunked_transform(model)[0].softcap is None
    assert loss_path(PlanConfig(shape=shape, chunked_loss=True, seq_len=T)) == chunked_transform(model)
    rows = max(16, (1 << 24) // 4096)
    assert activation_bytes(PlanConfig(shape=shape, chunked_loss=False, seq_len=T))["logits_loss"] == T * 4096 * 12
    assert activation_bytes(PlanConfig(shape=shape, chunked_loss=True, seq_len=T))["logits_loss"] == \
        2 * 4 * min(T, rows) * 4096 + T * (4 + 8 * 32)

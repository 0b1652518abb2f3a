"""Which models take the chunked LM-head loss (``qlora_ds.loss.chunked_supported``): every verified model type gives
the model's own loss through it (with its default logit transform, applied inside the chunked loss), and a logit
transform its model type does not apply (or an unverified type) keeps the plain loss. The head is scaled up so
that a transform left out (a soft cap, a multiplier) would change the loss."""
import logging

import pytest
import torch

from qlora_ds.loss import LOGIT_TRANSFORMS, VERIFIED_MODEL_TYPES, causal_lm_loss, chunked_supported
from qlora_ds.loss_support import LogitTransform

KW = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
          num_key_value_heads=2, pad_token_id=0)
# Gemma-3's vision tower, small (with its defaults, a 2B text model and SigLIP-So400m, it took ~40 s to build)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


# multi-head latent attention (DeepSeek-V2/V3, glm4_moe_lite, Youtu) and GPT-J-style partial rotary: their own sizes
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0, n_group=1,
            topk_group=1)
_GPTJ = dict(rotary_dim=8, n_embd=64, n_layer=1, n_head=4)
OWN = {"falcon": {}, "deepseek_v2": _MLA, "deepseek_v3": _MLA, "glm4_moe_lite": _MLA, "youtu": _MLA,
       "codegen": _GPTJ, "gptj": _GPTJ}


def build(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(KW, **OWN.get(model_type, {"head_dim": 16}), **extra)
    if model_type == "gemma3":      # multimodal: the text model's keys go in its text_config
        kw = dict(text_config=kw, vision_config=VISION)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)   # logits of ~±30: caps and scales matter
    return model


def losses(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        return model(**batch, use_cache=False).loss.item(), causal_lm_loss(model, batch).item()


def test_every_verified_model_type_gives_the_models_own_loss():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    wrong, chunked = [], 0
    for model_type in sorted(VERIFIED_MODEL_TYPES):
        model = build(model_type)
        plain, ours = losses(model)
        chunked += chunked_supported(model) is None
        if abs(plain - ours) > 1e-5 * abs(plain):
            wrong.append((model_type, plain, ours))
    assert not wrong
    assert chunked == len(VERIFIED_MODEL_TYPES)      # cohere/cohere2's default logit scale included


@pytest.mark.parametrize("model_type, name, value", [("llama", "final_logit_softcapping", 2.0),
                                                     ("gemma2", "logits_scaling", 4.0),
                                                     ("granite", "lm_head_multiplier", 0.1)])
def test_a_logit_transform_the_model_type_does_not_apply_keeps_the_plain_loss(model_type, name, value):
    """Transforms the chunked loss applies: tests/test_chunked_loss_transforms.py; any other keeps the plain loss."""
    model = build(model_type, **{name: value})
    assert name in LOGIT_TRANSFORMS and name in chunked_supported(model)
    plain, ours = losses(model)
    assert ours == plain


def test_a_transform_in_the_text_config(monkeypatch):
    """Gemma3ForConditionalGeneration never applies its text config's final_logit_softcapping (transformers 5.23; only
    Gemma3ForCausalLM does): the chunked loss leaves it out too. Another transform there keeps the plain loss."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    for extra, chunked in (({"final_logit_softcapping": 2.0}, True), ({"logits_scaling": 4.0}, False)):
        cfg = Gemma3Config(text_config=dict(KW, head_dim=16, **extra), vision_config=VISION)
        torch.manual_seed(0)
        model = Gemma3ForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(30.0)       # logits of ~±30: a cap of 2 would matter
        name = next(iter(extra))
        assert getattr(model.config, name, None) is None           # only the text config has it
        assert (chunked_supported(model) is None) if chunked else (name in chunked_supported(model))
        plain, ours = losses(model)
        assert abs(ours - plain) <= 1e-5 * abs(plain)
    # applying the text config's cap (as Gemma3ForCausalLM would) gives another loss: the check above can tell
    monkeypatch.setattr("qlora_ds.loss.chunked_transform", lambda m: (LogitTransform(softcap=2.0), None))
    cfg = Gemma3Config(text_config=dict(KW, head_dim=16, final_logit_softcapping=2.0), vision_config=VISION)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    plain, ours = losses(model)
    assert abs(ours - plain) > 1e-2 * abs(plain)


def test_unverified_types_and_router_losses_keep_the_plain_loss():
    model = build("llama")
    assert chunked_supported(model) is None
    model.config.model_type = "my_remote_llama"
    assert "not one the chunked loss is verified on" in chunked_supported(model)
    moe = build("mixtral", output_router_logits=True, num_local_experts=2, num_experts_per_tok=1)
    assert "auxiliary loss" in chunked_supported(moe)

"""The chunked LM-head loss for models that transform their logits after the head (Gemma-2's final soft cap, Cohere's
logit scale, Granite's logits scaling, Falcon-H1's LM-head multiplier): the model's own loss and gradients, computed
chunk by chunk (``qlora_ds.loss_support.APPLIED``)."""
import pytest
import torch
import torch.nn.functional as F

from qlora_ds.errors import QLoRADSError
from qlora_ds.loss import causal_lm_loss, chunked_supported, chunked_transform
from qlora_ds.loss_support import APPLIED, LogitTransform, logit_transform
from qlora_ds.nn.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from tests.test_chunked_loss import rel
from tests.test_chunked_loss_models import build

# a non-neutral, non-default value per supported model type (the head is scaled to logits of ~±30 by build)
TRANSFORMED = {"gemma2": 10.0, "gemma3_text": 7.5, "cohere": 0.25, "cohere2": 0.5, "granite": 4.0,
               "granitemoe": 3.0, "falcon_h1": 0.3}


def reference(hidden, weight, labels, scale=1.0, softcap=None):
    """The plain path: full logits, the transform as the model's forward writes it, ForCausalLMLoss."""
    logits = F.linear(hidden, weight) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("scale, softcap", [(0.37, None), (1.0, 3.0), (2.5, 4.0), (-0.5, 6.0)])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_function_applies_the_transform(scale, softcap, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    weight = (torch.randn(40, 16) * 2).requires_grad_()         # logits of ~±8: a cap of 3 bends most of them
    labels = torch.randint(0, 40, (2, 13))
    labels[0, :5] = IGNORE_INDEX
    ref = reference(hidden, weight, labels, scale, softcap)
    ref_g = torch.autograd.grad(3.0 * ref, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, None, labels, chunk_tokens=chunk, scale=scale, softcap=softcap)
    got_g = torch.autograd.grad(3.0 * got, (hidden, weight))
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, r in zip(got_g, ref_g):
        assert rel(g, r) <= 1e-4
    plain = reference(hidden, weight, labels)                   # the transform matters at these values
    assert abs(plain.item() - ref.item()) > 1e-2 * abs(ref.item())
    with torch.no_grad():
        assert abs(linear_cross_entropy(hidden, weight, None, labels, chunk_tokens=chunk, scale=scale,
                                        softcap=softcap).item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("softcap, scale", [(0.0, 1.0), (float("inf"), 1.0), (None, float("nan"))])
def test_function_refuses_a_bad_transform(softcap, scale):
    hidden, weight, labels = torch.randn(1, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (1, 4))
    with pytest.raises(QLoRADSError, match="soft cap finite and non-zero"):
        linear_cross_entropy(hidden, weight, None, labels, scale=scale, softcap=softcap)


def _batch(response_only: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    labels = ids.clone()
    if response_only:
        labels[0, :5] = IGNORE_INDEX          # a prompt
        labels[1, :3] = IGNORE_INDEX
        labels[1, 10:] = IGNORE_INDEX         # right padding
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("response_only", [False, True])
@pytest.mark.parametrize("model_type", sorted(TRANSFORMED))
def test_model_with_a_logit_transform_gives_its_own_loss_and_grads(model_type, response_only):
    [(name, _)] = APPLIED[model_type].items()
    model = build(model_type, **{name: TRANSFORMED[model_type]})
    transform, why = chunked_transform(model)
    assert why is None and transform != LogitTransform()
    batch = _batch(response_only)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch, use_cache=False).loss
    ref_g = torch.autograd.grad(ref, params, allow_unused=True)
    got = causal_lm_loss(model, batch, chunk_tokens=5)
    got_g = torch.autograd.grad(got, params, allow_unused=True)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    pairs = [(g, r) for g, r in zip(got_g, ref_g) if r is not None and r.norm() > 0]
    assert len(pairs) > 3 and max(rel(g, r) for g, r in pairs) <= 1e-4
    # the transform changes this loss: without it the chunked loss would be another one
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        untransformed = linear_cross_entropy(*_final_hidden(model, batch), head, None, batch["labels"])
    assert abs(untransformed.item() - ref.item()) > 1e-3 * abs(ref.item())


def _final_hidden(model, batch):
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(input_ids=batch["input_ids"], use_cache=False)
    finally:
        hook.remove()
    return seen


def test_every_applied_transform_reads_the_config_default_of_its_model_type():
    """APPLIED's defaults (the planner plans a config.json that leaves the key out by them) are transformers'."""
    from transformers import AutoConfig
    for model_type, attrs in APPLIED.items():
        for name, (_, default) in attrs.items():
            assert getattr(AutoConfig.for_model(model_type), name) == default, (model_type, name)


def test_a_transform_the_model_type_does_not_apply_keeps_the_plain_loss():
    """Gemma-2 caps its logits, but a logits_scaling in its config is nothing its forward reads: not silently taken
    (as Granite's division, nor ignored); HyperCLOVA X multiplies by a logits_scaling that Granite divides by."""
    transform, why = logit_transform("gemma2", [{"final_logit_softcapping": 30.0, "logits_scaling": 4.0}])
    assert transform is None and "logits_scaling=4.0" in why and "'gemma2'" in why
    assert "not one the chunked loss is verified on" in logit_transform("hyperclovax", [{}])[1]
    assert "logits_scaling" in logit_transform("hyperclovax", [{"logits_scaling": 2.0}])[1]
    assert logit_transform("granite", [{"logits_scaling": 4.0}]) == (LogitTransform(scale=0.25), None)
    assert logit_transform("gemma2", [{}]) == (LogitTransform(softcap=30.0), None)        # transformers' default
    assert "non-zero" in logit_transform("gemma2", [{"final_logit_softcapping": 0.0}])[1]
    model = build("granite", logits_scaling=4.0)
    model.config.final_logit_softcapping = 5.0
    assert "final_logit_softcapping=5.0" in chunked_supported(model)
    with torch.no_grad():
        assert causal_lm_loss(model, _batch(True)).item() == model(**_batch(True), use_cache=False).loss.item()

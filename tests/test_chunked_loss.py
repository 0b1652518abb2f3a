"""Chunked LM head + cross-entropy: the same loss and gradients as the full logits, without them."""
import pytest
import torch
import torch.nn.functional as F

from qlora_ds.errors import QLoRADSError
from qlora_ds.loss import causal_lm_loss, chunked_supported
from qlora_ds.nn.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from tests.tiny_models import tiny_model


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def plain_loss(hidden, weight, bias, labels, num_items=None):
    logits = F.linear(hidden, weight, bias).float()
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    red = "sum" if num_items is not None else "mean"
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=red)
    return loss / num_items if num_items is not None else loss


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_function_matches_full_logits(chunk, with_bias):
    torch.manual_seed(0)
    b, t, h, v = 3, 21, 32, 97
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    bias = torch.randn(v, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (b, t))
    labels[0, :9] = IGNORE_INDEX          # a prompt: response-only loss
    labels[2, 15:] = IGNORE_INDEX         # right padding
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    ref = plain_loss(hidden, weight, bias, labels)
    ref_g = torch.autograd.grad(2.5 * ref, inputs)          # an incoming gradient != 1 (loss scaling, accumulation)
    got = linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens=chunk)
    got_g = torch.autograd.grad(2.5 * got, inputs)
    with torch.no_grad():                                    # evaluation: the loss alone
        assert abs(linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens=chunk).item() - ref.item()) \
            <= 1e-5 * abs(ref.item())
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, r in zip(got_g, ref_g):
        assert rel(g, r) <= 1e-4
    # the ignored positions get exactly no gradient (their hidden state predicts nothing)
    assert got_g[0][0, :8].abs().max().item() == 0.0 and got_g[0][:, -1].abs().max().item() == 0.0


def test_num_items_in_batch_and_frozen_head():
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16)          # frozen: no weight gradient is computed or returned
    labels = torch.randint(0, 50, (2, 9))
    ref = plain_loss(hidden, weight, None, labels, num_items=torch.tensor(40))
    got = linear_cross_entropy(hidden, weight, None, labels, num_items_in_batch=torch.tensor(40), chunk_tokens=5)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(ref, hidden)[0]) <= 1e-4



@pytest.mark.parametrize("bad", [-1, 10])
def test_out_of_range_label_raises(bad):
    torch.manual_seed(0)
    hidden, weight = torch.randn(1, 5, 8), torch.randn(10, 8)
    labels = torch.tensor([[IGNORE_INDEX, 3, bad, 9, 4]])
    with pytest.raises(IndexError, match="out of bounds"):           # the plain loss refuses it too
        plain_loss(hidden, weight, None, labels)
    with pytest.raises(QLoRADSError, match=rf"out of bounds for a vocabulary of 10 \(e.g. {bad}\).*ignore_index"):
        linear_cross_entropy(hidden, weight, None, labels)
    labels = torch.tensor([[-1, 3, -1, 9, 4]])                       # -1 where it is the data's ignore_index
    ref = F.cross_entropy(F.linear(hidden, weight)[0, :-1], labels[0, 1:], ignore_index=-1)
    got = linear_cross_entropy(hidden, weight, None, labels, ignore_index=-1)
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()


@pytest.mark.parametrize("num_items", [None, 7])
def test_no_target_tokens_gives_zero_gradients(num_items):
    """A micro-batch whose labels are all ignored (a prompt longer than the row under a response-only loss): the
    loss is that of transformers' ForCausalLMLoss (0/0 = nan for the mean, 0 over num_items_in_batch) and every
    gradient, a trained head's included, is an exact zero as F.cross_entropy's, not 0·nan."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    bias = torch.randn(10, requires_grad=True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    items = None if num_items is None else torch.tensor(num_items)
    ref = plain_loss(hidden, weight, bias, labels, num_items=items)
    ref_g = torch.autograd.grad(ref, (hidden, weight, bias))
    got = linear_cross_entropy(hidden, weight, bias, labels, num_items_in_batch=items, chunk_tokens=4)
    got_g = torch.autograd.grad(got, (hidden, weight, bias))
    if num_items is None:
        assert torch.isnan(ref) and torch.isnan(got)
    else:
        assert ref.item() == got.item() == 0.0
    for g, r in zip(got_g, ref_g):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert torch.equal(r, torch.zeros_like(r)) and torch.equal(g, torch.zeros_like(g))

def _batch(vocab, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels[1, 18:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])   # qwen2: tied embeddings
def test_model_loss_and_grads_match(arch):
    model = tiny_model(arch).train()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (arch == "qwen2")
    batch = _batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]   # the head (tied or not) trains too here
    ref = model(**batch).loss
    ref_g = torch.autograd.grad(ref, params)
    got = causal_lm_loss(model, batch, chunk_tokens=5)
    got_g = torch.autograd.grad(got, params)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    worst = max(rel(g, r) for g, r in zip(got_g, ref_g) if r.norm() > 0)
    assert worst <= 1e-4, worst


def test_no_full_logits_saved_or_returned():
    """Nothing of [tokens, vocab] size is kept for backward (the plain path keeps it)."""
    model = tiny_model("llama", vocab=2048).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)      # something to backpropagate into
    batch = _batch(2048, t=32)
    full = batch["input_ids"].numel() * 2048
    sizes = []
    head = model.get_output_embeddings().weight

    def pack(t):
        if t.data_ptr() != head.data_ptr():     # the head weight itself is saved by both paths
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    assert max(sizes) >= full                 # the check can see the plain path's logits
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, batch, chunk_tokens=8)
    assert max(sizes) <= full / 16, max(sizes)


def test_logit_transform_falls_back_to_plain():
    model = tiny_model("llama")
    assert chunked_supported(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "softcapping" in chunked_supported(model)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert causal_lm_loss(model, batch).item() == model(**batch).loss.item()


def test_fallback_is_said_once_per_reason(caplog):
    """A finetune calls the loss every micro step: the fallback warning comes once, not thousands of times."""
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 29.25          # a reason no other test has warned of in this process
    batch = _batch(model.config.vocab_size)
    with caplog.at_level("WARNING", logger="qlora_ds.loss"), torch.no_grad():
        for _ in range(3):
            causal_lm_loss(model, batch)
        model.config.final_logit_softcapping = 29.5
        causal_lm_loss(model, batch)
    said = [r.getMessage() for r in caplog.records if "chunked LM-head loss not used" in r.getMessage()]
    assert len(said) == 2 and "29.25" in said[0] and "29.5" in said[1]


def test_hf_trainer_uses_chunked_loss(tmp_path):
    """QLoRATrainer's training loss is the chunked one (the head sees no tokens), equal to the plain loss."""
    from transformers import TrainingArguments

    from qlora_ds.integrations.hf_trainer import QLoRATrainer

    model = tiny_model("llama").train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    batch = _batch(model.config.vocab_size)
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: widths.append(a[0].shape[1]))
    try:
        got = QLoRATrainer(model=model, args=args).compute_loss(model, dict(batch), num_items_in_batch=None)
        ref = QLoRATrainer(model=model, args=args, chunked_loss=False).compute_loss(model, dict(batch))
    finally:
        hook.remove()
    assert widths == [0, batch["input_ids"].shape[1]]
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()


def test_planner_models_the_chunked_loss():
    from dataclasses import replace

    from qlora_ds.nn.chunked_loss import LOGIT_BUDGET, default_chunk_tokens
    from qlora_ds.plan import memory
    from qlora_ds.plan.presets import shape_from_hf_config

    assert memory.CHUNK_LOGITS == LOGIT_BUDGET
    shape = shape_from_hf_config(tiny_model("llama", vocab=49152).config.to_dict())
    plain = memory.PlanConfig(shape=shape, seq_len=2048, device="cpu")
    chunked = replace(plain, chunked_loss=True)
    full = memory.activation_bytes(plain)["logits_loss"]
    part = memory.activation_bytes(chunked)["logits_loss"]
    assert full == 2048 * 49152 * 12
    assert part == 2 * 4 * default_chunk_tokens(49152) * 49152 + 2048 * (4 + 8 * shape.hidden)
    assert memory.estimate_memory(chunked).peak < memory.estimate_memory(plain).peak - 0.9 * (full - part)


def test_zero3_two_ranks_matches_full_logits(tmp_path):
    """ZeRO-3 on 2 ranks (the head partitioned; untied and tied, checkpointing on): the chunked loss runs through
    ZeRO-3's backward hooks (it failed there with "active_backward_submodules is empty") and gives the loss and
    gradients of the full logits."""
    import json

    from tests.dist_utils import check, run_torchrun

    out = tmp_path / "z3.json"
    check(run_torchrun("tests/scripts/zero3_chunked_loss.py", str(out), timeout=240))
    result = json.loads(out.read_text())
    assert sorted(result) == ["llama", "qwen2"]
    for arch, r in result.items():
        chunked, plain, again, evaluated = r["loss"]
        assert abs(chunked - plain) <= 1e-5 * plain, (arch, r)
        assert again == chunked and abs(evaluated - plain) <= 1e-5 * plain, (arch, r)
        assert r["grad_rel"] <= 1e-4, (arch, r)

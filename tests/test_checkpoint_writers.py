"""DeepSpeed's checkpoint writers other than its torch.save default, under our signed checkpoints. The synchronous
ones (ds_config checkpoint.writer type "python" / "fast") take a path, not a buffer: each used to fail the first
save (open() of our in-memory buffer). The ones that write after the save returns (decoupled, DataStates) or
write nothing (mock) cannot be signed: refused before the model loads."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from qlora_ds import checkpointing
from qlora_ds.errors import QLoRADSError

from .dist_utils import check
from .test_ds_config_sections import _resolve
from .test_finetune_resume import DS, _args, _finetune, _steps, word  # noqa: F401 - word is a fixture

PYTHON_WRITER = {"checkpoint": {"writer": {"type": "python", "data_parallel": "replica"}}}


@pytest.fixture
def nodes(monkeypatch):
    """What DeepSpeed's launcher sets and its writers read: one node (the tests run without that launcher)."""
    monkeypatch.setenv("CROSS_SIZE", "1")
    monkeypatch.setenv("CROSS_RANK", "0")


def _ds(word, name, extra):
    path = word["root"] / f"{name}.ds.json"
    path.write_text(json.dumps({**DS, **extra}))
    return str(path)


def test_python_writer_resume_equals_the_straight_run(word, nodes):
    """Saved at step 2 through DeepSpeed's python writer (signed), resumed to step 3: the same losses and adapter as
    a straight 3-step run with the default writer."""
    fixed = ["--eval-size", "0", "--warmup-ratio", "0", "--dtype", "fp32"]
    straight, out = word["root"] / "writer_straight", word["root"] / "writer_python"
    check(_finetune(*_args(word, straight, "--max-steps", "3", *fixed)))
    ds = _ds(word, "writer_python", PYTHON_WRITER)
    check(_finetune(*_args(word, out, "--max-steps", "2", *fixed, ds=ds)))
    ckpt = out / "checkpoints"
    manifest = checkpointing.verify(str(ckpt / "step0000002"))
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= manifest["files"].keys()
    assert not [p for p in (ckpt / "step0000002").iterdir() if p.name.startswith(".")]   # no private dir left
    states = torch.load(ckpt / "step0000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["step"] == 2 and states["ds_config"]["checkpoint"] == PYTHON_WRITER["checkpoint"]
    check(_finetune(*_args(word, out, "--max-steps", "3", "--resume", *fixed, ds=ds)))
    a, b = _steps(straight), _steps(out)
    assert [r["step"] for r in b] == [1, 2, 3] and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


REFUSED = [({"checkpoint": {"writer": {"type": "python", "decoupled": True}}},
            r"checkpoint\.writer\.decoupled=True: .* background process .* Remove \"decoupled\""),
           ({"checkpoint": {"writer": {"decoupled": 1}}}, r"checkpoint\.writer\.decoupled=1"),
           ({"checkpoint": {"writer": {"data_parallel": "replica"}}},     # DeepSpeed's default writer type
            r"checkpoint\.writer\.type \"fast\" .* needs an accelerator .* Use \"type\": \"python\" on a CPU"),
           ({"checkpoint": {"writer": {"type": "python"}}, "zero_optimization": {"stage": 2}},
            r"checkpoint\.writer without \"data_parallel\" at ZeRO stage 2: .* Add \"data_parallel\": \"replica\""),
           ({"datastates_ckpt": {}}, r"datastates_ckpt: .* asynchronously, .* Remove datastates_ckpt"),
           ({"datastates_ckpt": None}, r"datastates_ckpt"),     # DeepSpeed enables it for anything but false
           ({"checkpoint": {"writer": {"type": "Mock"}}}, r"checkpoint\.writer\.type=\"mock\" writes empty files"),
           ({"checkpoint": {"writer": "python"}}, r"checkpoint\.writer='python' must be an object")]


@pytest.mark.parametrize("ds,match", REFUSED)
def test_unsignable_writers_are_refused_by_the_ds_config(ds, match, nodes):
    with pytest.raises(QLoRADSError, match=match):
        _resolve(ds)


def test_writer_without_deepspeeds_launcher_variables_is_refused(monkeypatch):
    """DeepSpeed's writers read CROSS_SIZE / CROSS_RANK, set only by its launcher: torchrun or a plain process
    failed inside deepspeed.initialize with KeyError: 'CROSS_SIZE'."""
    monkeypatch.delenv("CROSS_SIZE", raising=False)
    monkeypatch.setenv("CROSS_RANK", "0")
    with pytest.raises(QLoRADSError, match=r"from CROSS_SIZE, which only its `deepspeed` launcher sets.* export "
                                           r"CROSS_SIZE=<nodes> CROSS_RANK=<node index>"):
        _resolve(PYTHON_WRITER)


@pytest.mark.parametrize("ds", [{}, PYTHON_WRITER, {"checkpoint": {"writer": None}}, {"datastates_ckpt": False},
                                {"checkpoint": {"writer": {"type": "python"}}, "zero_optimization": {"stage": 3}},
                                {"checkpoint": {"checkpoint_serialization": False}},
                                {**PYTHON_WRITER, "datastates_ckpt": {}}])
def test_synchronous_writers_pass(ds, nodes):
    """The python writer, torch.save (legacy format too); DataStates is ignored when a writer is set."""
    assert {k: v for k, v in _resolve(ds).items() if k in ds} == ds


def test_decoupled_writer_is_refused_before_the_model_loads(word, nodes):
    """It used to train to the first checkpoint, then write it from a background process after the save returned:
    the signed files were empty (the bytes went to a copy of our buffer) and --resume refused them."""
    out = word["root"] / "writer_decoupled"
    ds = _ds(word, "writer_decoupled", {"checkpoint": {"writer": {"type": "python", "decoupled": True}}})
    proc = _finetune(*_args(word, out, "--max-steps", "2", ds=ds))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint.writer.decoupled=True" in proc.stderr and "trainable params" not in proc.stderr
    assert not (out / "run_config.json").exists()


# ------------------------------------------------------------- checkpointing.save with writers that take a path

class _Writer:
    """A checkpoint engine whose ``save`` opens the path itself, as DeepSpeed's fast writer does (it appends
    "-<rank>.<writers>"); ``wrote`` is what it writes: torch.save's bytes, nothing (a rank it leaves out), or an
    empty file (the mock writer)."""

    def __init__(self, suffix="-0.1", wrote="torch.save", decoupled=False):
        self.suffix, self.wrote, self.decoupled = suffix, wrote, decoupled

    def is_decoupled(self):
        return self.decoupled

    def save(self, state_dict, path):
        if self.wrote == "torch.save":
            with os.fdopen(os.open(path + self.suffix, os.O_CREAT | os.O_WRONLY, 0o777), "wb") as fh:  # as the fast
                torch.save(state_dict, fh)                                                          # writer does
        elif self.wrote == "empty":
            open(path + self.suffix, "wb").close()


class _Engine:
    def __init__(self, writer):
        self.checkpoint_engine = writer

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            self.checkpoint_engine.save({"client": client_state, "w": torch.arange(4.0)},
                                        os.path.join(ckpt_dir, tag, name))


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield tmp_path / "checkpoints"
    dist.destroy_process_group()


def test_a_writer_that_renames_its_file_is_signed_under_deepspeeds_name(ckpt):
    """The file lands where DeepSpeed loads it (the name it asked for), signed with the digest of its bytes."""
    checkpointing.save(_Engine(_Writer()), str(ckpt), 2, {"step": 2}, keep=2)
    tag = ckpt / "step0000002"
    assert {p.name for p in tag.iterdir()} == {checkpointing.MANIFEST, "mp_rank_00_model_states.pt",
                                               "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    files = checkpointing.verify(str(tag))["files"]
    assert files["mp_rank_00_model_states.pt"] == checkpointing.file_sha256(str(tag / "mp_rank_00_model_states.pt"))
    state = torch.load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert state["client"] == {"step": 2} and torch.equal(state["w"], torch.arange(4.0))
    assert os.stat(tag / "mp_rank_00_model_states.pt").st_mode & 0o777 == 0o666 & ~checkpointing._umask()


def test_a_save_that_writes_no_file_fails(ckpt):
    """A rank that the writer leaves out writes (and signs) nothing; a save in which no rank wrote a file is no
    checkpoint (a decoupled writer only queues them)."""
    with pytest.raises(QLoRADSError, match="step 2 failed .* no checkpoint engine file was written"):
        checkpointing.save(_Engine(_Writer(wrote="nothing")), str(ckpt), 2, {"step": 2}, keep=2)
    assert not (ckpt / "step0000002").exists()


@pytest.mark.parametrize("writer,match", [(_Writer(wrote="empty"), r"wrote an empty file, not one torch\.save file"),
                                          (_Writer(decoupled=True), r"writes checkpoint files after the save returns")])
def test_writers_that_cannot_be_signed_fail_the_save(ckpt, writer, match):
    checkpointing.save(_Engine(_Writer()), str(ckpt), 2, {"step": 2}, keep=2)
    with pytest.raises(QLoRADSError, match=match):
        checkpointing.save(_Engine(writer), str(ckpt), 4, {"step": 4}, keep=2)
    assert checkpointing.latest_complete(str(ckpt)) == "step0000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == ["step0000002"]

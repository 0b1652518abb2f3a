"""fp16 that works (issue 14 §2), on the CPU: numerics of both layer kinds against an fp32 reference, the fp16
overflow watch (guards off), the skipped-step policy, and DeepSpeed fp16 end to end (ZeRO 0 and 2 here; 0-3 in
the GPU check) with a forced overflow and a resume that keeps the loss scale.

Error bound (test_fp16_matches_fp32_reference): fp16 compute rounds each factor of a product (x, deq(W), A, B, the
upstream gradient) to fp16 once, each intermediate (A·x, ·scaling, B·A·x, the two input-gradient paths and their
sum) once, and the result once: at most 8 roundings of relative size u = 2^-11 on any term's path. The matmuls
accumulate in fp32 (torch's CPU fp16 GEMM; u32 = 2^-24) over a reduction of length K. So, elementwise,

    |out_fp16 - out_fp32| <= (8·u + K·u32) · M,    M = the same computation on absolute values (|x|·|W|ᵀ + ...),

with no value near fp16's subnormal range (inputs O(1), gradients O(1)). It is a worst case: the largest measured
err/bound is 0.003-0.08 over the seven kinds (2026-12-03); fp16 accumulation would have a worst case of K·u, 30x this
bound at K = 264. The tests also check that the error is not trivially zero (fp16 was used).

Cost of the watch (a bench line, not a test): ``guards.record`` on a 256x1024 fp16 tensor (one fp32 sum + three
one-element ops) took 0.21-0.25 ms; a layer records twice per forward (input, output), twice per backward, against
~44 ms for the fp16 1024x1024 r16 forward of 256 tokens itself (about 1%; watch on/off forward times were within the
noise: 43.8/35.9, 45.1/42.2, 47.9/43.3 ms). AMD EPYC (AVX2 + AVX-512), 1 thread, load average 0.6-1.7, 2026-12-03:
    python -c "import torch,time; from qlora_ds.nn import guards as g; y=torch.randn(256,1024).half(); \
t0=time.perf_counter(); [g.record(y,0,1) for _ in range(200)]; print((time.perf_counter()-t0)/200*1e6,'us')"
On a GPU the same ops are four small kernels per record and no host sync (not measured: no GPU in this session).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from qlora_ds.errors import NonFiniteError
from qlora_ds.nn import QALoRAConfig, QALoRALinear, QLoRAConfig, QLoRALinear, guards
from qlora_ds.quant import intn
from qlora_ds.quant.nf4 import quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U16, U32 = 2.0 ** -11, 2.0 ** -24
T, IN, OUT, R = 16, 256, 96, 8

KINDS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), (4, None), (3, None), (2, None)]


def _pair(kind, dq):
    """(fp32 layer, fp16 layer) over the same quantized base and the same (nonzero) fp32 LoRA weights."""
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, bias=True)
    layers = []
    for cd in (torch.float32, torch.float16):
        if isinstance(kind, str):
            cfg = QLoRAConfig(quant_type=kind, double_quant=dq, r=R, alpha=16, dropout=0.0, compute_dtype=cd)
            qt = quantize(lin.weight.detach(), kind, cfg.blocksize, dq, cfg.nested_blocksize)
            layers.append(QLoRALinear.from_quantized(qt, lin.bias.detach(), cfg))
        else:
            cfg = QALoRAConfig(bits=kind, group_size=32, r=R, alpha=16, dropout=0.0, compute_dtype=cd)
            layers.append(QALoRALinear.from_quantized(intn.quantize(lin.weight.detach(), kind, 32),
                                                      lin.bias.detach(), cfg))
    ref, half = layers
    torch.manual_seed(1)
    nn.init.normal_(ref.lora_B.weight, std=0.05)
    half.load_state_dict(ref.state_dict())
    return ref, half


@torch.no_grad()
def _magnitudes(layer, x, g):
    """M for the output, the input gradient and the two LoRA gradients: the same sums over absolute values."""
    w = layer.dequantized_weight(torch.float32).abs()
    a, b, s = layer.lora_A.weight.abs(), layer.lora_B.weight.abs(), layer.scaling
    xa, ga = x.abs(), g.abs()
    if isinstance(layer, QALoRALinear):
        pool, unpool = layer.pool, lambda z: z.repeat_interleave(layer.group_size, -1) * layer.pool_factor / layer.group_size
    else:
        pool = unpool = lambda z: z
    xp = pool(xa)
    m_y = xa @ w.t() + s * (xp @ a.t()) @ b.t() + layer.bias.abs().float()
    m_gx = ga @ w + s * unpool((ga @ b) @ a)
    m_ga = s * (ga @ b).t() @ xp
    m_gb = s * ga.t() @ (xp @ a.t())
    return m_y, m_gx, m_ga, m_gb


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("kind,dq", KINDS, ids=[f"{k}-dq" if d else (f"{k}" if d is not None else f"int{k}")
                                                for k, d in KINDS])
def test_fp16_matches_fp32_reference(kind, dq):
    ref, half = _pair(kind, dq)
    storage = {n: p.detach().clone() for n, p in half.named_parameters() if p.dtype == torch.uint8}
    torch.manual_seed(2)
    x, g = torch.randn(T, IN), torch.randn(T, OUT)
    outs32, outs16 = _run(ref, x, g), _run(half, x, g)
    reductions = (IN + R, OUT + R, T, T)                  # K of each result: y, grad x, grad A, grad B
    worst = 0.0
    for name, a, b, m, k in zip(("output", "input grad", "lora_A grad", "lora_B grad"), outs32, outs16,
                                _magnitudes(ref, x, g), reductions):
        assert b.dtype == torch.float32 and torch.isfinite(b).all(), name  # cast back / fp32 master grads
        err, bound = (a - b).abs(), (8 * U16 + k * U32) * m
        assert bool((err <= bound).all()), f"{name}: max err/bound {(err / bound).max():.3f}"
        worst = max(worst, float((err / m.clamp(min=1e-30)).max()))
    assert worst > U16 / 8, "fp16 was not used (error far below one fp16 rounding)"
    # LoRA masters stay fp32; the base stays 4-bit (or INT-N) bytes, untouched by fwd + bwd
    assert half.lora_A.weight.dtype == half.lora_B.weight.dtype == torch.float32
    for n, p in half.named_parameters():
        if p.dtype == torch.uint8:
            assert torch.equal(p, storage[n]) and not p.requires_grad
    main = half.weight if isinstance(half, QLoRALinear) else half.qweight
    bits = 4 if isinstance(half, QLoRALinear) else kind
    assert main.numel() * 8 == OUT * IN * bits


# --------------------------------------------------------------------------------------- the overflow watch

class Net(nn.Module):
    """a -> (x · gain) -> b, fp16 compute; b's weights all 1, so b's output is the sum of its inputs."""

    def __init__(self, dtype=torch.float16, gain=1.0):
        super().__init__()
        cfg = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=dtype)
        torch.manual_seed(0)
        ones = nn.Linear(64, 64, bias=False)
        nn.init.constant_(ones.weight, 1.0)
        self.a = QLoRALinear.from_linear(nn.Linear(64, 64), cfg)
        self.b = QLoRALinear.from_linear(ones, cfg)
        self.gain = gain

    def forward(self, x):
        return self.b(self.a(x).relu() * self.gain + 2000.0)     # 64 inputs of >= 2000: b's sum > 65504


@pytest.fixture(autouse=True)
def _clean_watch():
    guards.reset_overflow()
    yield
    guards.reset_overflow()


def test_forward_overflow_without_grad_raises_naming_the_module():
    assert not guards.is_enabled() or os.environ.get(guards.ENV_VAR)      # the default: guards off
    model = Net()
    guards.watch(model)
    x = torch.randn(4, 64)
    with torch.no_grad(), pytest.raises(NonFiniteError) as err:
        model(x)
    assert (err.value.module, err.value.what, err.value.input_finite) == ("b", "layer output", True)
    assert "65504" in str(err.value) and "without loss scaling" in str(err.value)


def test_overflow_made_upstream_is_blamed_upstream():
    model = Net(gain=1e6)             # the inf is made by `* gain` in fp16 (not a quantized layer), before b
    guards.watch(model)
    with torch.no_grad(), pytest.raises(NonFiniteError) as err:
        model(torch.rand(4, 64).half() + 0.5)
    assert (err.value.module, err.value.what) == ("b", "input")


def test_training_forward_and_backward_record_without_raising():
    model = guards.name_modules(Net())
    guards.watch(model)
    x = torch.randn(4, 64, requires_grad=True)
    y = model(x)                                  # grad on: no raise, the step reads it
    assert not torch.isfinite(y).all()
    found = guards.take_overflow()
    assert found == guards.Overflow("b", "layer output") and guards.take_overflow() is None
    y = model.b(model.a(x).relu())                # a finite forward, then a scaled loss whose gradient overflows
    assert torch.isfinite(y).all() and guards.take_overflow() is None
    (y.float().sum() * 1e6).backward()            # 1e6 > 65504 once the gradient is cast to b's fp16 compute
    assert guards.take_overflow() == guards.Overflow("b", "input gradient")


def test_other_dtypes_and_watch_off_record_nothing():
    for dtype in (torch.float32, torch.bfloat16):
        layer = Net(dtype).b
        assert guards.watch_id(layer) is None
    model = Net()
    guards.watch(model)
    previous = guards.enable_watch(False)
    try:
        with torch.no_grad():
            y = model(torch.randn(4, 64))     # silently inf, as before the watch
        assert not torch.isfinite(y).all() and guards.take_overflow() is None
    finally:
        guards.enable_watch(previous)


def test_first_record_under_inference_mode_keeps_later_forwards_working(monkeypatch):
    monkeypatch.setattr(guards, "_first", {})     # the watch buffer is made by the first record, here
    model = Net()
    guards.watch(model)
    x = torch.randn(4, 64)
    with torch.inference_mode(), pytest.raises(NonFiniteError):     # a pipeline / generate() before training
        model(x)
    assert not guards._first[x.device].is_inference()
    y = model(x.requires_grad_())                 # training: records, raises nothing
    y.float().sum().backward()
    assert guards.take_overflow() == guards.Overflow("b", "layer output")
    for mode in (torch.no_grad(), torch.inference_mode()):
        with mode, pytest.raises(NonFiniteError) as err:
            model(x)
        assert (err.value.module, err.value.what) == ("b", "layer output")


# ------------------------------------------------------------------------------ the skipped-step policy

class FakeEngine:
    """DeepSpeed's engine surface that OverflowMonitor reads: a scripted overflow on each step."""

    def __init__(self, overflows, scale=4.0, floor=1.0, ds_raise_at_min=False):
        self.overflows, self.skipped_steps, self.floor, self.ds_raise = list(overflows), 0, floor, ds_raise_at_min
        self.optimizer = type("Opt", (), {"cur_scale": scale})()

    def fp16_enabled(self):
        return True

    def dynamic_loss_scale(self):
        return True

    def dynamic_loss_scale_args(self):
        return {"min_scale": self.floor}

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        if self.overflows.pop(0):
            if self.ds_raise and self.optimizer.cur_scale == self.floor:
                raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")
            self.skipped_steps += 1
            self.optimizer.cur_scale = max(self.floor, self.optimizer.cur_scale / 2)


def _overflowing_layer():
    layer = guards.name_modules(nn.ModuleDict({"proj": Net().b}))["proj"]
    with torch.no_grad():
        layer(torch.full((1, 64), 3000.0))        # records: the output of 'proj' overflows
    return layer


def test_skipped_step_is_reported_not_raised():
    from qlora_ds.overflow import OverflowMonitor

    engine = FakeEngine([False, True, False])
    monitor = OverflowMonitor(engine)
    assert monitor.step() is None
    layer = _overflowing_layer()                  # kept alive: the watch holds modules weakly
    report = monitor.step()
    assert report == {"skipped_steps": 1, "loss_scale_before": 4.0, "loss_scale": 2.0, "overflow_module": "proj",
                      "overflow_at": "layer output", "overflow_rank": 0}
    assert monitor.step() is None and layer is not None


@pytest.mark.parametrize("ds_raise", [False, True], ids=["zero0-silent", "zero-raises"])
def test_overflow_persisting_at_min_scale_raises_naming_the_module(ds_raise):
    from qlora_ds.overflow import OverflowMonitor

    engine = FakeEngine([True] * 5, scale=2.0, ds_raise_at_min=ds_raise)
    monitor = OverflowMonitor(engine)
    assert monitor.step()["loss_scale"] == 1.0            # 2 -> 1: normal
    with pytest.raises(NonFiniteError) as err:
        for _ in range(3):
            layer = _overflowing_layer()
            monitor.step()
    del layer
    assert err.value.module == "proj" and "minimum fp16 loss scale" in str(err.value)


# ------------------------------------------------------------------------ DeepSpeed fp16, end to end

def test_deepspeed_fp16_skips_reports_and_resumes_the_scale(tmp_path):
    """scripts/gpu/fp16.py (the GPU check's fp16 step) on this CPU, ZeRO 0 (FP16_UnfusedOptimizer) and 2 (ZeRO's
    DynamicLossScaler): 6 steps, a forced overflow at step 2, checkpoint after 3, resume by finetune's restore."""
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", QLORA_DS_SECRET_DIR=str(tmp_path / "s"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu", "fp16.py"), "--device", "cpu",
                           "--cpu-fp16", "--stages", "0,2", "--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert proc.returncode == 0 and len(rows) == 2, (rows, proc.stdout[-3000:], proc.stderr[-3000:])
    for row, wrapper, inner in zip(rows, ("FP16_UnfusedOptimizer", "DeepSpeedZeroOptimizer"),
                                   ("PagedAdamW", "PagedAdamW8bit")):
        assert (row["optimizer"], row["inner"]) == (wrapper, inner)
        assert row["scale"] == 256.0 and row["forced"]["scale"] == 128.0 and row["forced"]["skipped"] == 1
        assert row["forced"]["module"].startswith("model.layers.") and row["forced"]["at"]
        assert row["restored"] == {"step": 3, "scale": 128.0, "skipped": 1}
        assert all(row["checks"].values()), row["checks"]


# ------------------------------------------------------------------ launch/finetune.py --dtype fp16, in process

def _finetune(argv):
    """launch/finetune.py's main in this process (a world of one)."""
    from .helpers import launch_script

    return launch_script("finetune").main(argv)


def test_finetune_fp16_skips_name_the_module_and_resume_keeps_the_scale(tmp_path, monkeypatch):
    """finetune --dtype fp16 (ZeRO-2, one process, word-level tiny Llama) from a loss scale of 2^24, far above what
    its gradients fit in fp16 (2^16-2^17 here): the first steps overflow and are skipped, each halving the scale
    (hysteresis 1, no growth) and naming the first module that overflowed in metrics.jsonl; the adapter stays
    untrained. --resume continues from the checkpoint's scale and skipped count (a fresh scaler would start again
    at 2^23 with 1 skipped) down to a scale that trains."""
    from deepspeed.accelerator import get_accelerator
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import qlora_ds.distributed as qdist
    from .finetune_fixtures import write_word_level_run

    paths = write_word_level_run(str(tmp_path))
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)   # as scripts/gpu/fp16.py --cpu-fp16
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):   # init_distributed sets them
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)                  # recorded by setenv: restored (or removed) after the test
    shutdown = qdist.shutdown      # one process group for both runs: DeepSpeed caches its groups across engines
    monkeypatch.setattr(qdist, "shutdown", lambda: None)
    with open(os.path.join(REPO, "configs", "ds_cpu_demo.json")) as fh:
        ds = json.load(fh)
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    ds["fp16"] = {"enabled": "auto", "initial_scale_power": 24, "hysteresis": 1, "loss_scale_window": 1000}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    argv = ["--model", paths["model"], "--dataset", paths["data"], "--output-dir", str(out), "--ds-config",
            str(tmp_path / "ds.json"), "--dtype", "fp16", "--lora-r", "4", "--max-len", "32", "--eval-size", "4",
            "--eval-every", "100", "--save-every", "100", "--sample-prompt=", "--no-grad-ckpt"]

    def rows():
        with open(out / "metrics.jsonl") as fh:
            return [r for r in map(json.loads, fh) if "loss" in r]

    def lora_b():
        tensors = load_file(out / "adapter" / "adapter_model.safetensors")
        return [v for k, v in tensors.items() if k.endswith("lora_B.weight")]

    with torch.device("meta"):
        names = {n for n, _ in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths["model"]))
                 .named_modules()}
    try:
        assert _finetune(argv + ["--max-steps", "3"]) == 0
        first = rows()
        assert [r["step"] for r in first] == [1, 2, 3]
        assert [r["skipped_steps"] for r in first] == [1, 2, 3]
        assert [r["loss_scale"] for r in first] == [2.0 ** 23, 2.0 ** 22, 2.0 ** 21]
        for r in first:        # far above the fitting scale, the loss gradient overflows before any quantized layer
            assert str(r.get("overflow_module")).startswith("model.layers.") and r["overflow_module"] in names, r
            assert r["overflow_at"] == "output gradient", r
        assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 3
        assert len(lora_b()) == 14 and all(not b.any() for b in lora_b())   # every step skipped: B still zero

        assert _finetune(argv + ["--max-steps", "12", "--resume"]) == 0
    finally:
        shutdown()
    resumed = rows()
    assert resumed[:3] == first and [r["step"] for r in resumed[3:]] == list(range(4, 13))
    scales, skipped = [r["loss_scale"] for r in resumed], [r["skipped_steps"] for r in resumed]
    assert (scales[3], skipped[3]) == (2.0 ** 20, 4), (scales, skipped)   # continued from 2^21 and 3 skipped
    for i in range(3, len(resumed)):              # halved exactly on a skip, kept otherwise; a skip is reported
        r, was_skipped = resumed[i], skipped[i] > skipped[i - 1]
        assert skipped[i] - skipped[i - 1] in (0, 1) and scales[i] == scales[i - 1] / (2 if was_skipped else 1), r
        assert ("overflow_module" in r) == was_skipped, r
        assert r.get("overflow_module") is None or r["overflow_module"] in names, r  # None: a LoRA grad's sum
    assert skipped[-1] < 12 and skipped[-3:] == [skipped[-1]] * 3, (scales, skipped)   # found a scale that trains
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == skipped[-1]
    assert any(b.any() for b in lora_b())                                        # and it trained

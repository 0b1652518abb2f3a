"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU proof runs on CPU at tiny shapes (one process),
so the script cannot rot before a GPU is lent. ~30 s on a 2-core box."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["install", "env", "build_quant", "build_quant_cpu", "build_paged_optim", "tests", "paging", "fp16", "headline",
         "headline_7b", "bench_quant", "bench_layer", "bench_train_135m", "headline_33b", "headline_13b",
         "bench_train_1b", "bench_moe"]
# the steps the dry run cannot run on a CPU, each with its reason: a new skip must be added here, on purpose
SKIPPED_IN_DRY_RUN: set[str] = set()


def _fake_wheel(folder) -> str:
    """A valid pure-Python wheel, so that the dry run's install step runs pip's command for real."""
    os.makedirs(folder, exist_ok=True)
    name, info = "qlora_ds_dry_probe", "qlora_ds_dry_probe-0.0.0.dist-info"
    files = {f"{name}/__init__.py": b"",
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: qlora-ds-dry-probe\nVersion: 0.0.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{info}/RECORD,,\n"
    path = os.path.join(folder, "qlora_ds_dry_probe-0.0.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for p, data in {**files, f"{info}/RECORD": record.encode()}.items():
            zf.writestr(p, data)
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_results")
    wheels = tmp_path_factory.mktemp("gpu_wheels")
    _fake_wheel(wheels)
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET": "900", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "QLORA_DS_WHEELS": str(wheels)}
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    return out, proc


def _check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_runner", os.path.join(REPO, "scripts", "gpu", "check.py"))
    check = sys.modules[spec.name] = importlib.util.module_from_spec(spec)     # its dataclass needs the entry
    spec.loader.exec_module(check)
    return check


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_step_runs_or_says_why_not(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["step"]: s for s in _jsonl(out / "steps.jsonl")}
    assert list(steps) == STEPS
    skipped = {n for n, s in steps.items() if s["rc"] == "skipped"}
    assert skipped == SKIPPED_IN_DRY_RUN, {n: steps[n]["note"] for n in skipped}
    failed = {n: s for n, s in steps.items() if n not in skipped and s["rc"] != 0}
    assert not failed, (failed, (out / "log.txt").read_text()[-4000:])
    assert all(s["note"].startswith("dry run: ") for n, s in steps.items() if n in skipped)   # a skip says why
    for n in skipped:
        assert f"== {n} " in proc.stdout and steps[n]["note"] in proc.stdout         # ... on one printed line
    # install: the GPU's pip command (for CPython 3.12 manylinux) ran on the carried wheel, off the path
    assert "qlora_ds_dry_probe-0.0.0" in steps["install"]["note"] and "lacks bitsandbytes" in steps["install"]["note"]
    log = (out / "log.txt").read_text()
    # tests: the CUDA selection (same files, -m, -k and --device-tests-only) collected on the CPU: the device tests
    collected = re.search(r"(\d+)/(\d+) tests? collected", log)
    assert collected and 30 <= int(collected.group(1)) < int(collected.group(2)) / 4, log[-3000:]
    # the builds: the CPU op through its OpBuilder, then the CUDA builder's plan (sources, arch flags)
    assert "paged_optim (cuda, not built here)" in log and "quant (cuda, not built here)" in log
    # what comes back from the device tool: at most 8 plain files, no folders
    assert len(os.listdir(out)) <= 8 and all((out / f).is_file() for f in os.listdir(out))


def test_headline_rows_set_measured_beside_planned(dry_run):
    out, _ = dry_run
    rows = [r for r in _jsonl(out / "rows.jsonl") if r["bench"] == "headline"]
    assert [r["shape"].split("-shaped")[0] for r in rows] == ["llama-65b", "llama-7b", "llama-33b", "llama-13b"]
    for r in rows:
        assert r["ok"] and r["layers"] == 2 and r["hidden"] == 64 and r["r"] == 64 and r["seq"] == 32
        assert r["measured_peak_bytes"] > 0 and r["planned_compared_bytes"] > 0 and r["lora_params"] > 0
        assert r["device"] == "cpu" and r["commit"] and r["versions"]["torch"]
    # only the 7B run adds the long-sequence step (8192 tokens on the GPU, 64 here), chunked loss, planner beside it
    assert [bool(r.get("long_seq")) for r in rows] == [False, True, False, False]
    long = rows[1]["long_seq"]
    assert long["ok"] and long["seq"] == 64 and long["measured_peak_bytes"] > 0 and long["planned_compared_bytes"] > 0
    assert math.isfinite(long["loss"]) and long["step_s"] > 0
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] and env["cpu_isa"] and env["commit"]
    summary = (out / "summary.md").read_text()
    assert "## Headline" in summary and "llama-65b-shaped" in summary and "## bench layer" in summary
    assert "+ chunked loss" in summary          # the 7B run's long-sequence step has its own row
    benches = {r["bench"] for r in _jsonl(out / "rows.jsonl")}
    assert {"headline", "quant", "layer", "train", "fp16"} <= benches
    fp16 = [r for r in _jsonl(out / "rows.jsonl") if r["bench"] == "fp16"]
    assert [(r["stage"], r["ok"]) for r in fp16] == [(0, True)] and fp16[0]["restored"]["scale"] == 128.0


def test_bench_rows_include_bitsandbytes_and_the_gpu_settings(dry_run):
    """bench layer ran its bnb Linear4bit+PEFT variant and bench train its three variants (bnb+PEFT included) with
    the GPU command's settings (r 64: the dispatcher once read ``--r`` as ``--results-dir``)."""
    out, _ = dry_run
    rows = _jsonl(out / "rows.jsonl")
    layer = [r for r in rows if r["bench"] == "layer"]
    assert layer and all("bnb_peft_ms" in r and "qlora_ds_ms" in r for r in layer), layer
    train = [(r["variant"], r["shape"]["r"], r.get("error")) for r in rows if r["bench"] == "train"]
    assert train == [("ours-nf4dq", 64, None), ("bnb-peft", 64, None), ("bf16-peft", 64, None),   # bench_train_135m
                     ("ours-nf4dq", 64, None)]                                                     # bench_train_1b


def test_paging_ran_through_the_page_managers_managed_path(dry_run):
    out, _ = dry_run
    res = json.loads((out / "paging.json").read_text())
    kernel = res["kernel"]     # the CPU's parameters may be an ulp from torch's (optim_gpu_paging.failed_checks)
    assert kernel["moments_bit_identical_to_torch"] and kernel["param_ulps_vs_torch"] <= 1
    assert kernel["state_dict_gpu_cpu_gpu_exact"] and not res["failed"]
    pg = res["paging"]
    assert pg["spike_ok"] and pg["paged_equals_unpaged"]
    assert pg["bytes_to_host"] == pg["evicted"] == pg["bytes_to_device"] == pg["state_bytes"] > 0
    assert set(res["step_s"]) >= {"PagedAdamW/paged", "PagedAdamW8bit/unpaged"}


def test_gpu_mode_without_wheels_records_the_fix(tmp_path):
    """Outside the dry run a missing wheels folder is a recorded step failure naming the fix, not a crash
    (checked on the runner alone: no GPU steps start here)."""
    check = _check_module()
    runner = check.Runner(str(tmp_path), budget=60, dry=False)
    check.install(runner, str(tmp_path / "none"))
    row = _jsonl(tmp_path / "steps.jsonl")[0]
    assert row["step"] == "install" and row["rc"] == 1 and "fetch_wheels.sh" in row["note"]
    plan = check.steps(str(tmp_path))
    assert [s.name for s in plan] == STEPS[1:]
    assert all(s.gpu for s in plan)                                        # every step has a GPU command
    # ... and a dry-run command derived from it, on the CPU
    assert {s.name for s in plan if s.dry is None} == SKIPPED_IN_DRY_RUN - {"install"}
    assert all("cuda" not in s.dry for s in plan if s.dry)


def test_dry_run_without_wheels_says_it_skips_pip(tmp_path):
    check = _check_module()
    runner = check.Runner(str(tmp_path), budget=60, dry=True)
    check.install(runner, str(tmp_path / "none"))
    row = _jsonl(tmp_path / "steps.jsonl")[0]
    assert row["step"] == "install" and row["rc"] == "skipped"
    assert row["note"].startswith("dry run: no wheels in") and "pip not run" in row["note"]


def test_headline_caps_memory_for_a_bare_cuda_device(monkeypatch):
    """``--device cuda`` resolves to ``torch.device("cuda")`` (no index); torch.cuda.set_per_process_memory_fraction
    refuses that (ValueError from torch.cuda._utils._get_device_index), which would end every headline step before
    its first row. The fake below runs that same index check of torch's, without a GPU."""
    import types

    import torch
    from torch.cuda._utils import _get_device_index

    spec = importlib.util.spec_from_file_location("gpu_check_headline", os.path.join(REPO, "scripts", "gpu",
                                                                                     "headline.py"))
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    calls = []

    def set_fraction(fraction, device=None):
        calls.append((fraction, _get_device_index(device)))     # torch's own check: raises for a bare "cuda"

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=96 << 30))
    with pytest.raises(ValueError):                              # the check the fake stands for
        set_fraction(0.5, torch.device("cuda"))
    calls.clear()
    assert headline.cap_memory(torch.device("cuda"), 48) == 0.5
    assert headline.cap_memory(torch.device("cuda", 0), 200) == 1.0
    assert calls == [(0.5, 0), (1.0, 0)]


def test_a_step_past_its_budget_takes_its_children_with_it(tmp_path):
    """A timed-out step (say a JIT build) is killed with its whole process group: a grandchild (nvcc under ninja)
    must not outlive it, holding the GPU, the cores and torch's extension lock."""
    import tempfile
    import time

    check = _check_module()
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as out:
        assert check.run_group([sys.executable, "-c", code], out, timeout=3) == 124
    assert time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):                                   # SIGKILL is asynchronous: give the kernel a moment
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{grandchild}/stat") as fh:      # a zombie (killed, not yet reaped by init) is dead too
            assert fh.read().split()[2] == "Z", "the step's grandchild outlived its timeout"
    with tempfile.TemporaryFile(mode="w+") as out:
        assert check.run_group([sys.executable, "-c", "print('ok')"], out, timeout=30) == 0
        out.seek(0)
        assert out.read().strip() == "ok"


def test_unknown_only_step_fails_before_the_install(tmp_path, monkeypatch, capsys):
    """A typo in --only (the 65B headline step is "headline") stops before pip runs on the device."""
    check = _check_module()
    monkeypatch.setattr(check, "install", lambda *a: pytest.fail("installed before checking --only"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        check.main(["--dry-run", "--results", str(tmp_path / "res"), "--only", "headline_65b"])
    assert stop.value.code == 2 and "unknown steps ['headline_65b']" in capsys.readouterr().err


def test_a_step_stays_in_the_commands_session(tmp_path):
    """The device tool ends what a command leaves running, except processes in a session of their own: a step must
    stay in the check's session (a check cut off at timeout_s takes its running step along, instead of leaving it
    on the warm machine holding the GPU for the rerun) and still lead its own process group (killed with its
    children at its budget, the runner spared)."""
    import tempfile

    check = _check_module()
    code = "import os; print(os.getpid(), os.getpgrp(), os.getsid(0))"
    with tempfile.TemporaryFile(mode="w+") as out:
        assert check.run_group([sys.executable, "-c", code], out, timeout=30) == 0
        out.seek(0)
        pid, pgid, sid = map(int, out.read().split())
    assert sid == os.getsid(0)
    assert pgid == pid != os.getpgrp()


@pytest.fixture
def saved_environ():
    """check.main sets the check's variables in os.environ and chdirs to the repository: both restored."""
    env, cwd, path = dict(os.environ), os.getcwd(), list(sys.path)
    yield
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[:] = path


def test_the_check_exits_1_after_its_summary_when_a_step_failed(tmp_path, monkeypatch, capsys, saved_environ):
    """Every step runs whatever the others do, but a failed one makes the check's exit status (the device tool's rc)
    1, after summary.md, with a last line naming it; a run of passing and skipped steps exits 0."""
    check = _check_module()
    for name, rc in (("passes", 0), ("fails", 3)):
        (tmp_path / f"{name}.py").write_text(f"def main():\n    return {rc}\n")

    def plan(names):
        return lambda res: [check.Step(n, 20, [str(tmp_path / f"{n}.py")]) for n in names] + [
            check.Step("skips", 20, ["x.py"], None, why="not here")]
    args = ["--dry-run", "--wheels", str(tmp_path / "no_wheels"), "--budget", "120"]
    monkeypatch.setattr(check, "steps", plan(["passes", "fails"]))
    assert check.main([*args, "--results", str(tmp_path / "bad")]) == 1
    steps = {s["step"]: s["rc"] for s in _jsonl(tmp_path / "bad" / "steps.jsonl")}
    assert steps == {"install": "skipped", "passes": 0, "fails": 3, "skips": "skipped"}
    assert "## Steps" in (tmp_path / "bad" / "summary.md").read_text()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gpu_check: 1 step(s) failed: fails")
    monkeypatch.setattr(check, "steps", plan(["passes"]))
    assert check.main([*args, "--results", str(tmp_path / "good")]) == 0


def test_bench_train_budgets_leave_the_parent_its_time():
    """bench train runs its variants one after another, each under --timeout: the step's budget must hold all of
    them and the parent's own start (imports, CUDA init, the random checkpoint), or a slow last variant is killed
    with the step before its row is written."""
    from bench.train import VARIANTS

    check = _check_module()
    train = [s for s in check.steps("res") if s.name.startswith("bench_train_")]
    assert [s.name for s in train] == ["bench_train_135m", "bench_train_1b"]
    for s in train:
        timeout = float(s.gpu[s.gpu.index("--timeout") + 1])
        assert "--variants" not in s.gpu and check.TRAIN_VARIANTS == len(VARIANTS)
        assert s.budget - len(VARIANTS) * timeout >= 14, (s.name, s.budget, timeout)


def test_env_json_records_what_a_cuda_build_reads(monkeypatch, tmp_path):
    """A failed build on the GPU is read against env.json: the toolkit torch found, the nvcc on PATH and the
    variables the builders read."""
    import shutil

    spec = importlib.util.spec_from_file_location("gpu_check_env", os.path.join(REPO, "scripts", "gpu", "env.py"))
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    build = env.build_env()
    assert build["CUDA_HOME"] == str(tmp_path) and build["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    assert build["nvcc_path"] == shutil.which("nvcc") and "torch_cuda_home" in build


def test_the_gpu_tests_step_holds_every_device_test_file():
    """The tests step lists its files: a new test file with CUDA-marked tests (or taking the ``device`` fixture)
    left out of CUDA_TESTS would never run on a GPU. Its tests run in the foreground, before the headline and the
    benchmarks (beside them they would share the GPU's memory and skew their timings)."""
    check = _check_module()
    marked = set()
    for name in sorted(os.listdir(os.path.join(REPO, "tests"))):
        if name.startswith("test_") and name.endswith(".py") and name != os.path.basename(__file__):
            with open(os.path.join(REPO, "tests", name)) as fh:
                text = fh.read()
            if "pytest.mark.cuda" in text or re.search(r"def test_\w*\([^)]*\bdevice\b", text):
                marked.add(f"tests/{name}")
    assert "tests/test_loading_device.py" in marked and "tests/test_plan_moe.py" in marked
    assert marked == set(check.CUDA_TESTS), (sorted(marked - set(check.CUDA_TESTS)),
                                             sorted(set(check.CUDA_TESTS) - marked))
    plan = {s.name: s for s in check.steps("res")}
    assert not plan["tests"].background and not any(s.background for s in plan.values()
                                                    if not s.name.startswith("build"))
    order = [s.name for s in check.steps("res")]
    assert order.index("tests") < order.index("paging") < order.index("fp16") < order.index("headline")


def test_the_arch_probe_opens_no_cuda_context_in_the_runner(monkeypatch):
    """The runner asks a child process for the GPU's compute capability; a CUDA context of its own would hold GPU
    memory beside every step. A probe that fails leaves the arch list to the build."""
    check = _check_module()
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="9.0\n", stderr="")
    monkeypatch.setattr(check.subprocess, "run", fake_run)
    assert check.gpu_arch_list() == {"TORCH_CUDA_ARCH_LIST": "9.0"}
    assert calls and calls[0][0] == check.PY and "get_device_capability" in calls[0][-1]

    def failing(argv, **kw):
        raise subprocess.CalledProcessError(1, argv)
    monkeypatch.setattr(check.subprocess, "run", failing)
    assert check.gpu_arch_list() == {}


def test_tests_past_the_time_budget_are_skipped_and_the_report_is_written(tmp_path):
    """The GPU check's tests step passes --time-budget below its own budget: the tests not started by then are
    reported skipped and pytest.xml is still written (a pytest killed at the step's budget would leave none)."""
    check = _check_module()
    tests = next(s for s in check.steps("res") if s.name == "tests")
    assert float(tests.gpu[tests.gpu.index("--time-budget") + 1]) <= tests.budget - 20
    xml = tmp_path / "pytest.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                           "--time-budget", "0", "tests/test_codebooks.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    report = xml.read_text()
    tests_run = int(re.search(r'tests="(\d+)"', report).group(1))
    assert tests_run > 3 and f'skipped="{tests_run}"' in report and "past --time-budget 0 s" in report

"""The steps of scripts/gpu_check.sh and their runner (see that script's header for what it proves).

On the GPU (default) every step is its own process under a time budget — min(its budget, what is left of the total
minus 5 s) — so a crash, a hang or an out-of-memory error costs one step, is recorded, and the next step runs; the
builds run side by side. With ``--dry-run`` the same steps run at tiny shapes on the
CPU inside this one process (a SIGALRM per step is the budget), so that the CI test (tests/test_gpu_check.py)
costs one interpreter start, not ten; only pip (install) and bench train's variant workers are processes of their
own. Each dry-run command is derived from the GPU's (``on_cpu``: ``cuda`` -> ``cpu``, sizes set small), so the two
cannot drift apart; a step the CPU cannot run has ``tiny=None`` and a ``why``, printed and recorded as skipped
(none today; tests/test_gpu_check.py lists the skips it allows).

    python scripts/gpu/check.py [--dry-run] [--results DIR] [--wheels DIR] [--budget SECONDS] [--only a,b]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
DRY_SLACK = 3                        # dry-run steps get 3x their GPU budget: tiny work, but CI boxes are shared
# the headline's model scaled down for the dry run (every configured size runs, each at this shape)
TINY = {"--layers": "2", "--hidden": "64", "--ffn": "172", "--heads": "4", "--vocab": "512", "--seq": "32"}
# bench train's tiny run: its own "tiny" random shape, one timed step (the variants' worker processes stay)
TINY_TRAIN = {"--shape": "tiny", "--batch": "1", "--seq": "16", "--steps": "1", "--warmup": "0", "--timeout": "90"}
# every test file with a test marked cuda or taking the `device` fixture (tests/test_gpu_check.py checks the list)
CUDA_TESTS = ["tests/test_kernels.py", "tests/test_kernels_intn.py", "tests/test_codebooks.py", "tests/test_layers.py",
              "tests/test_optim.py", "tests/test_adapters.py", "tests/test_inject.py", "tests/test_loading_device.py",
              "tests/test_hardware.py", "tests/test_ds_config_sections.py", "tests/test_plan_attention.py",
              "tests/test_plan_dropout.py", "tests/test_plan_moe.py", "tests/test_merge_safety.py",
              "tests/test_launch_device.py", "tests/test_packing.py", "tests/test_quantized_experts.py",
              "tests/test_loading_experts.py", "tests/test_experts_lora.py",
              "tests/test_finetune.py"]     # quick ones first
# what fetch_wheels.sh puts in gpu_wheels/ (distribution names as wheel files spell them)
WHEELS = ("bitsandbytes", "deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
          "typing_extensions")


def on_cpu(argv: list[str], set: dict | None = None, add: tuple = ()) -> list[str]:
    """The dry run's command, derived from the GPU's so that the two cannot drift apart: every ``cuda`` argument
    becomes ``cpu``, each option in ``set`` gets that value (appended when the GPU command lacks it), ``add`` is
    appended."""
    out = ["cpu" if a == "cuda" else a for a in argv]
    for opt, val in (set or {}).items():
        if opt in out:
            out[out.index(opt) + 1] = val
        else:
            out += [opt, val]
    return out + list(add)


@dataclasses.dataclass
class Step:
    name: str
    budget: int                       # seconds on the GPU machine
    gpu: list[str] | None             # argv on the GPU (None: not run there)
    tiny: dict | None = dataclasses.field(default_factory=dict)  # the dry run: on_cpu(gpu, **tiny); None: skipped
    why: str = ""                     # why the dry run skips it (printed and recorded)
    background: bool = False          # GPU: run beside the following steps ...
    waits_for: tuple = ()             # ... until one that waits for the background steps named with these prefixes

    @property
    def dry(self) -> list[str] | None:
        return None if self.gpu is None or self.tiny is None else on_cpu(self.gpu, **self.tiny)


def steps(res: str) -> list[Step]:
    headline = [Step(f"headline_{s}", b, ["scripts/gpu/headline.py", "--shape", f"llama-{s}", "--cap-gib", "48",
                                          "--device", "cuda"], {"set": TINY})
                for s, b in (("65b", 100), ("33b", 60), ("13b", 45), ("7b", 50))]
    # the 7B run adds one step at 8192 tokens with the chunked loss (issue 17 §3: long context on the GPU)
    headline[-1].gpu += ["--long-seq", "8192"]
    headline[-1].tiny = {"set": {**TINY, "--long-seq": "64"}}
    headline[0].name = "headline"
    pytest_args = ["-q", "-p", "no:cacheprovider", f"--junitxml={res}/pytest.xml", "--durations=10"]
    # order: what proves correctness first (tests, paging, fp16), then the 65B claim and the long-context 7B, then
    # speed, then the other sizes; whatever the budget does not reach is recorded "out of time". The tests run in
    # the foreground: beside the headline they would share its GPU memory and skew its timings.
    by_name = {h.name: h for h in headline}
    return [
        Step("env", 20, ["scripts/gpu/env.py", f"{res}/env.json"]),
        Step("build_quant", 170, ["scripts/gpu/build_ops.py", "quant", "cuda"], background=True),
        # the CPU quant op too: from_pretrained quantizes the checkpoint's CPU tensors (qlora_ds/inject/loading.py
        # _fill_layer), so tests, fp16 and bench train's workers would otherwise JIT-compile it inside their own
        # budgets (17 s per train variant), and a step killed mid-build leaves torch's extension lock behind, on
        # which every later build waits until its own step times out
        Step("build_quant_cpu", 170, ["scripts/gpu/build_ops.py", "quant", "cpu"], background=True),
        Step("build_paged_optim", 170, ["scripts/gpu/build_ops.py", "paged_optim", "cuda"]),
        # only the tests that exercise the device (its fixture, or marked cuda): the rest is the CPU suite's, and
        # all of them would not end inside the budget (a killed pytest writes no pytest.xml).
        # Dry run: the same selection on the CPU, collected only (running it all is the CPU suite's job)
        Step("tests", 150, ["-m", "pytest", *pytest_args, "--device", "cuda", "--device-tests-only",
                            "--time-budget", "125",     # then the rest are skipped and pytest.xml is still written
                            "-m", "not multirank and not slow",
                            "-k", "not two_ranks and not launcher", *CUDA_TESTS], {"add": ("--collect-only",)},
             waits_for=("build",)),
        Step("paging", 60, ["tests/scripts/optim_gpu_paging.py", f"{res}/paging.json", "--device", "cuda"]),
        # DeepSpeed fp16 end to end, ZeRO 0-3 (dynamic loss scale, forced overflow, resume); rows -> rows.jsonl.
        # Dry run: ZeRO-0 (tests/test_fp16.py runs this script at ZeRO 0 and 2 on the CPU)
        Step("fp16", 60, ["scripts/gpu/fp16.py", "--device", "cuda", "--stages", "0,1,2,3"],
             {"set": {"--stages": "0"}, "add": ("--cpu-fp16",)}),
        by_name["headline"], by_name["headline_7b"],
        Step("bench_quant", 45, ["-m", "bench", "quant", "--device", "cuda"],
             {"set": {"--shape": "256x256"}, "add": ("--quick",)}),
        Step("bench_layer", 45, ["-m", "bench", "layer", "--device", "cuda"], {"add": ("--quick",)}),
        bench_train("135m", "smollm2-135m", 17, 14, {"set": TINY_TRAIN}),
        by_name["headline_33b"], by_name["headline_13b"],
        # dry run: the same command at the same tiny shape (bench train has no size overrides), ours only
        bench_train("1b", "llama-1b", 19, 20, {"set": {**TINY_TRAIN, "--variants": "ours-nf4dq"}}),
        # a ~0.7B Qwen3-MoE: 4-bit experts vs 16-bit experts vs transformers + bnb + PEFT (16-bit experts)
        Step("bench_moe", 100, ["-m", "bench", "moe", "--device", "cuda", "--timeout", "25"], {"add": ("--quick",),
                                                                                            "set": {"--timeout": "90"}}),
    ]


TRAIN_VARIANTS = 3          # bench train's default --variants


def bench_train(name: str, shape: str, timeout: int, parent: int, tiny: dict) -> Step:
    """bench train's step: each variant (a process) under ``--timeout``, its row written as it ends; the budget is
    the variants' timeouts plus ``parent`` seconds for the parent's own imports, CUDA init and random checkpoint
    (llama-1b: 1.1 B parameters, a 2.2 GB save), so a slow last variant ends with its timeout row, not a kill."""
    train = ["-m", "bench", "train", "--device", "cuda", "--batch", "4", "--seq", "512", "--r", "64", "--steps", "3"]
    return Step(f"bench_train_{name}", TRAIN_VARIANTS * timeout + parent,
                [*train, "--shape", shape, "--timeout", str(timeout)], tiny)


def run_group(argv: list[str], out, timeout: float) -> int:
    """Run ``argv`` in a process group of its own; past ``timeout`` the whole group is killed (124). A step's
    children (ninja and nvcc under a JIT build, DeepSpeed's workers) would otherwise live on and keep the GPU, the
    cores and torch's extension lock file, on which every later build would wait.

    The group stays in this command's session (not ``start_new_session``): the device tool ends what a command
    leaves running, except processes in a session of their own, so a check cut off at the tool's ``timeout_s``
    takes its running step with it instead of leaving it on the warm machine for the rerun to meet."""
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            process_group=0)       # stdin: a group not in the terminal's foreground must not read it
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):   # a process stuck in the driver may not die at once:
            proc.wait(timeout=15)                              # record the step and go on, not wait for the tool
        return 124
    finally:
        with contextlib.suppress(ProcessLookupError):     # what a finished step left running in the background
            os.killpg(proc.pid, signal.SIGKILL)


class Runner:
    def __init__(self, res: str, budget: int, dry: bool):
        self.res, self.budget, self.dry = res, budget, dry
        self.start = time.monotonic()
        self.log = open(os.path.join(res, "log.txt"), "a", buffering=1)
        self.rows = open(os.path.join(res, "steps.jsonl"), "a", buffering=1)
        self.lock = threading.Lock()
        self.failed: list[str] = []          # steps that neither passed nor were skipped: the check's exit status

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def record(self, name: str, rc, seconds: float, budget: float, note: str = "") -> None:
        row = {"step": name, "rc": rc, "seconds": round(seconds, 1), "budget_s": round(budget),
               "timed_out": rc in (124, 137, "timeout"), "note": note}
        with self.lock:
            if rc not in (0, "skipped"):
                self.failed.append(name)
            self.rows.write(json.dumps(row) + "\n")
            print(f"== {name:<18} rc {str(rc):<8} {seconds:6.1f} s (budget {budget:.0f} s) {note}", flush=True)

    def limit(self, step: Step) -> float:
        return min(step.budget, self.left() - 5)

    # -- the GPU machine: a process per step -------------------------------------------------------------
    def run_process(self, step: Step, note=None) -> None:
        """``note(rc)``: the recorded note (default: the last output line of tests, paging and fp16)."""
        t = self.limit(step)
        if t < 5:
            return self.record(step.name, "skipped", 0, 0, "out of time")
        out = tempfile.TemporaryFile(mode="w+")
        t0 = time.monotonic()
        rc = run_group([PY, *step.gpu], out, t)
        out.seek(0)
        text = out.read()
        with self.lock:
            self.log.write(f"#### {step.name} (budget {t:.0f} s): {' '.join(step.gpu)}\n{text}\n")
        last = text.strip().splitlines()[-1][:150] if text.strip() else ""
        self.record(step.name, rc, time.monotonic() - t0, t,
                    note(rc) if note else last if step.name in ("tests", "paging", "fp16") else "")

    # -- the dry run: the same entry points, in this process ----------------------------------------------
    def run_inline(self, step: Step) -> None:
        if step.dry is None:
            return self.record(step.name, "skipped", 0, 0, f"dry run: {step.why}")
        t = max(1, int(min(DRY_SLACK * step.budget, self.left() - 5)))   # a shared CI box may be loaded
        self.log.write(f"#### {step.name} (budget {t} s, in process): {' '.join(step.dry)}\n")
        t0 = time.monotonic()

        def alarm(*_):
            raise TimeoutError(f"step {step.name} ran past {t} s")
        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(t)
        try:
            with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
                rc = _call(step.dry)
        except TimeoutError:
            rc = "timeout"
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # noqa: BLE001 - a failed step is recorded, the next one runs
            self.log.write(f"{type(exc).__name__}: {exc}\n")
            rc = 1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        self.record(step.name, rc, time.monotonic() - t0, t)

    def run_all(self, plan: list[Step], after_step=lambda: None) -> None:
        """Every step in order (background ones beside the next); ``after_step`` after each foreground step."""
        pending: list[tuple[str, threading.Thread]] = []
        for step in plan:
            if self.dry:
                self.run_inline(step)
                continue
            if step.gpu is None:
                self.record(step.name, "skipped", 0, 0, step.why)
                continue
            for name, th in pending:
                if name.startswith(step.waits_for):
                    th.join()
            if step.background:
                th = threading.Thread(target=self.run_process, args=(step,), daemon=True)
                th.start()
                pending.append((step.name, th))
            else:
                self.run_process(step)
                after_step()
        for _, th in pending:
            th.join()


def _call(argv: list[str]) -> int:
    """Run ``python ARGV`` in this process: ``-m pytest``, ``-m bench`` or a script path's ``main``."""
    if argv[:2] == ["-m", "pytest"]:
        import pytest
        return int(pytest.main(argv[2:]))
    if argv[:2] == ["-m", "bench"]:
        from bench.run import main
        return main(argv[2:])
    spec = importlib.util.spec_from_file_location(f"gpu_check_{os.path.basename(argv[0])[:-3]}",
                                                  os.path.join(REPO, argv[0]))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = sys.argv
    sys.argv = argv
    try:
        entry = mod.main
        rc = entry(argv[1:]) if entry.__code__.co_argcount else entry()
    finally:
        sys.argv = saved
    return rc if isinstance(rc, int) else 0


# the GPU machine's interpreter and platform, which fetch_wheels.sh fetches for: the dry run installs for them
GPU_PY_TAGS = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_24_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def install_step(found: list[str], target: str, dry: bool = False) -> Step:
    return Step("install", 60, ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--no-cache-dir", "--upgrade", "--target", target, *(GPU_PY_TAGS if dry else ()),
                                *found], None)


def install(runner: Runner, wheels: str) -> None:
    """deepspeed + bitsandbytes (+ deepspeed's needs the image lacks) from the carried wheels into /tmp.

    Dry run: the same pip command (another process, as on the GPU) into a temporary target that is NOT put on the
    path (the venv's packages stay in use); it says which of fetch_wheels.sh's wheels the folder lacks, and with no
    wheels at all it skips pip and says so."""
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if runner.dry:
        have = {os.path.basename(w).split("-")[0].lower() for w in found}
        missing = [w for w in WHEELS if w not in have]
        if not found:
            return runner.record("install", "skipped", 0, 0, f"dry run: no wheels in {wheels}, pip not run (the "
                                 f"venv's deepspeed and bitsandbytes are used); the GPU run needs "
                                 f"scripts/gpu/fetch_wheels.sh")
        target = tempfile.mkdtemp(prefix="gpu_check_site.")

        def note(rc) -> str:
            got = sorted(n[:-len(".dist-info")] for n in os.listdir(target) if n.endswith(".dist-info"))
            return (f"dry run: pip (for CPython 3.12 manylinux) into a temporary target, not put on the path (the "
                    f"venv's packages are used): {', '.join(got) or 'nothing'}; the folder "
                    f"{'lacks ' + ', '.join(missing) if missing else 'has all of fetch_wheels.sh'}")
        try:
            runner.run_process(install_step(found, target, dry=True), note=note)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        return None
    if not found:
        return runner.record("install", 1, 0, 0, f"no wheels in {wheels}: run scripts/gpu/fetch_wheels.sh and carry it")
    target = "/tmp/qlora_ds_site"
    runner.run_process(install_step(found, target))
    os.environ["PYTHONPATH"] = os.pathsep.join([target, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([os.path.join(target, "bin"), os.environ.get("PATH", "")])


def gpu_arch_list() -> dict:
    """{"TORCH_CUDA_ARCH_LIST": this GPU's compute capability}, asked in a child process ({} if it cannot say): a
    CUDA context in this runner would hold ~0.5 GiB of the GPU beside every step for the whole check."""
    probe = "import torch; print('%d.%d' % torch.cuda.get_device_capability())"
    with contextlib.suppress(Exception):
        out = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
        return {"TORCH_CUDA_ARCH_LIST": out.strip().splitlines()[-1]}
    return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--results", default=os.environ.get("OUT") or os.path.join(REPO, "gpu_results"))
    p.add_argument("--wheels", default=os.environ.get("QLORA_DS_WHEELS") or os.path.join(REPO, "gpu_wheels"))
    p.add_argument("--budget", type=int, default=int(os.environ.get("GPU_CHECK_BUDGET", "470")))
    p.add_argument("--only", default=None, help="comma-separated step names (a rerun of some steps; install and "
                                                "the builds run whenever a later step needs them)")
    args = p.parse_args(argv)
    res = os.path.abspath(args.results)
    os.chdir(REPO)
    os.makedirs(res, exist_ok=True)
    for name in ("steps.jsonl", "log.txt", "rows.jsonl", "summary.md"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(res, name))
    rows = tempfile.mkdtemp(prefix="gpu_check_rows.")    # the benchmarks' JSONL files, merged into rows.jsonl
    os.environ.update(QLORA_DS_BENCH_RESULTS=rows, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    commit_file = os.path.join(args.wheels, "COMMIT")
    if os.path.exists(commit_file):
        with open(commit_file) as fh:
            os.environ["QLORA_DS_COMMIT"] = fh.read().strip()
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/qlora_ds/torch_extensions"))
    else:
        os.environ.update(DS_ACCELERATOR="cuda", TORCH_EXTENSIONS_DIR="/tmp/qlora_ds_ext")
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
        nvcc = shutil.which("nvcc")
        if nvcc and "CUDA_HOME" not in os.environ:      # nvcc may be a wrapper outside the toolkit (/usr/local/bin)
            homes = [os.path.dirname(os.path.dirname(p)) for p in (os.path.realpath(nvcc), nvcc)] + ["/usr/local/cuda"]
            os.environ["CUDA_HOME"] = next((h for h in homes if os.path.exists(
                os.path.join(h, "include", "cuda_runtime_api.h"))), homes[1])
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:      # this GPU's arch only: a third of the compile time
            os.environ.update(gpu_arch_list())
    runner = Runner(res, args.budget, args.dry_run)
    plan = steps(res)
    if args.only:                                       # checked before the install: a typo costs no device time
        wanted = set(args.only.split(",")) | {"env", "build_quant", "build_quant_cpu", "build_paged_optim"}
        unknown = wanted - {s.name for s in plan}
        if unknown:
            p.error(f"--only: unknown steps {sorted(unknown)}; steps are {', '.join(s.name for s in plan)}")
        for s in plan:
            if s.name not in wanted:
                s.gpu = None
                s.why = "not in --only"
    install(runner, args.wheels)

    def merge_rows() -> None:      # after every step: a run cut off by the device's time limit keeps its rows
        atomic = os.path.join(res, "rows.jsonl.tmp")
        with open(atomic, "w") as out:
            for path in sorted(glob.glob(os.path.join(rows, "*.jsonl"))):
                with open(path) as fh:
                    out.write(fh.read())
        os.replace(atomic, os.path.join(res, "rows.jsonl"))
    runner.run_all(plan, merge_rows)
    merge_rows()
    shutil.rmtree(rows, ignore_errors=True)
    elapsed = int(time.monotonic() - runner.start)
    import io
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            _call(["scripts/gpu/summarize.py", res, "--elapsed", str(elapsed)])
        summary = buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - a summary.md must come back whatever the results hold
        import traceback
        with open(os.path.join(res, "steps.jsonl")) as fh:
            steps_text = fh.read()
        summary = (f"# GPU check (scripts/gpu_check.sh)\n\nsummarize.py failed ({type(exc).__name__}: {exc}); the "
                   f"raw step rows follow, every output is in log.txt.\n\n```\n{steps_text}```\n\n```\n"
                   f"{traceback.format_exc()[-2000:]}```\n")
    with open(os.path.join(res, "summary.md"), "w") as fh:
        fh.write(summary)
    print(summary)
    if runner.failed:          # after summary.md: every step ran and was recorded, but the tool's rc says it failed
        print(f"gpu_check: {len(runner.failed)} step(s) failed: {', '.join(runner.failed)} (steps.jsonl, log.txt)")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())

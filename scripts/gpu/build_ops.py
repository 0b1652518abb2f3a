"""JIT-build one of our compiled ops through its DeepSpeed OpBuilder (``qlora_ds.ops.builder.load_op``) and say
how long it took and what it compiled for; exit 1 (with the builder's reason) when it cannot be built.

    python scripts/gpu/build_ops.py quant cuda
    python scripts/gpu/build_ops.py paged_optim cuda
    python scripts/gpu/build_ops.py paged_optim cpu      # the dry run: the CPU op, then the CUDA builder's plan

On ``cpu`` (the dry run of scripts/gpu_check.sh) the CUDA builder of the same op is also asked, without compiling,
what the GPU step would hand to nvcc: its sources (missing ones fail the step), the capabilities a prebuild compiles
for, and why it cannot build here.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv: list[str]) -> int:
    op, device = (argv + ["quant", "cuda"][len(argv):])[:2]
    from qlora_ds.errors import OpBuildError
    from qlora_ds.ops.builder import BUILDERS, load_op

    builder = BUILDERS[(op, device)]()
    if device == "cuda":
        try:
            builder.jit_mode = True                      # as load() will: the visible GPU's capability
            flags = builder.compute_capability_args()    # JIT: [] and the arch goes to TORCH_CUDA_ARCH_LIST
            print(f"{op}: nvcc arch flags {flags}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}",
                  flush=True)
        except Exception as err:  # noqa: BLE001 - informational only
            print(f"{op}: could not list the arch flags ({type(err).__name__}: {err})", flush=True)
    t0 = time.perf_counter()
    try:
        module = load_op(op, device)
    except OpBuildError as err:
        print(f"{op} ({device}): BUILD FAILED after {time.perf_counter() - t0:.1f} s\n{err}", flush=True)
        return 1
    print(f"{op} ({device}): built/loaded {module.__name__} in {time.perf_counter() - t0:.1f} s "
          f"(TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR')})", flush=True)
    return cuda_plan(op) if device == "cpu" else 0


def cuda_plan(op: str) -> int:
    """What the GPU step's builder would compile, asked on a machine without a GPU (nothing is compiled)."""
    from pathlib import Path

    from qlora_ds.ops.builder import BUILDERS

    builder = BUILDERS[(op, "cuda")]()
    missing = [s for s in builder.sources() if not Path(s).is_file()]
    if missing:
        print(f"{op} (cuda): sources missing: {missing}", flush=True)
        return 1
    print(f"{op} (cuda, not built here): {builder.NAME} from {[Path(s).name for s in builder.sources()]}; "
          f"prebuild arch flags {builder.compute_capability_args()}; compatible here: "
          f"{builder.is_compatible(verbose=False) or builder.error_log}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

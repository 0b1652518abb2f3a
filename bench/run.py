"""One entry point for the benchmarks: ``python -m bench quant|layer|train|memory|quality|all [--quick] [--results-dir DIR] [...]``.

Each sub-benchmark is a module ``bench/<name>.py`` with a ``main`` (taking ``argv``, or reading
``sys.argv`` itself) or a ``run(argv)``. Options after the name that this dispatcher does not know go to
the sub-benchmark unchanged (``all`` forwards only ``--quick``). ``--results-dir`` is passed on as
``$QLORA_DS_BENCH_RESULTS``, which ``bench.common.results_dir`` reads, and ``--device`` (cpu, cuda, cuda:N; default:
the GPU if there is one) as ``$QLORA_DS_BENCH_DEVICE``, which ``bench.common.default_device`` reads (``all``
forwards both).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time

BENCHMARKS = ("quant", "layer", "train", "memory", "quality")
# not in ``all``: minutes to hours of CPU (``python -m bench scale``), or a CPU-only kernel (``decode``)
ON_REQUEST = ("scale", "longctx", "packing", "decode", "moe")


def _call(name: str, argv: list[str]) -> int:
    """Run sub-benchmark ``name`` with ``argv``; its exit status (1 when it cannot be found)."""
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"bench.{name}":
            raise
        print(f"bench {name}: not available yet (no bench/{name}.py)", file=sys.stderr)
        return 1
    entry = getattr(mod, "main", None) or getattr(mod, "run", None)
    if entry is None:
        print(f"bench {name}: bench/{name}.py has neither main() nor run()", file=sys.stderr)
        return 1
    if inspect.signature(entry).parameters:
        rc = entry(argv)
    else:   # an argparse main() that reads sys.argv
        saved = sys.argv
        sys.argv = [f"bench {name}"] + argv
        try:
            rc = entry()
        except SystemExit as exc:
            rc = exc.code
        finally:
            sys.argv = saved
    return rc if isinstance(rc, int) else (0 if rc is None else 1)


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: parse_known_args would take a sub-benchmark's option for a prefix of ours
    # (bench train's ``--r 64`` was read as ``--results-dir 64``)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("which", choices=BENCHMARKS + ON_REQUEST + ("all",))
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke test)")
    p.add_argument("--results-dir", default=None, help="where the JSONL rows go (default bench/results)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    args, rest = p.parse_known_args(argv)
    if args.results_dir:
        os.environ["QLORA_DS_BENCH_RESULTS"] = os.path.abspath(args.results_dir)
    if args.device:
        from qlora_ds.hardware import resolve_device    # a bad or absent device fails here, before any work
        from qlora_ds.errors import QLoRADSError
        try:
            os.environ["QLORA_DS_BENCH_DEVICE"] = str(resolve_device(args.device))
        except QLoRADSError as err:
            p.error(str(err))
    quick = ["--quick"] if args.quick else []
    if args.which != "all":
        return _call(args.which, quick + rest)
    if rest:
        p.error(f"'all' forwards only --quick; run the sub-benchmarks one by one to pass {rest}")
    failed = []
    for name in BENCHMARKS:
        t0 = time.perf_counter()
        print(f"\n==== bench {name} ====", flush=True)
        rc = _call(name, quick)
        print(f"==== bench {name}: exit {rc} in {time.perf_counter() - t0:.0f} s ====", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

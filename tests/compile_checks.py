"""Compiler syntax checks that remember what passed, keyed by what the compiler sees.

Parsing torch's headers costs ~20 s per translation unit (over a minute for the four binding checks on a 2-core AVX2
box). As ccache does, each unit is preprocessed first (~2 s); a unit whose preprocessed text (line markers left out,
include folders named by place: the clone's and the venv's paths do not matter), compiler version and language
standard already passed is not parsed again. The cache sits beside the compiled ops (``$QLORA_DS_CHECK_CACHE``,
else ``~/.cache/qlora_ds/compile_checks``), so it outlives the clone; any change to a source, a header, torch or the
compiler is a new key. A machine that starts with no cache (a fresh CI box) parses all four.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_DS_CHECK_CACHE") or Path.home() / ".cache" / "qlora_ds" / "compile_checks")


def _key(version: str, std: str, preprocessed: str, places: list[str]) -> str:
    """``places``: the include and source folders, named in the text by ``__FILE__`` (torch's checks expand it)."""
    for n, place in enumerate(places):
        preprocessed = preprocessed.replace(place, f"<dir{n}>")
    code = "\n".join(line for line in preprocessed.splitlines() if not line.startswith("# "))    # no line markers
    return hashlib.sha256(f"{version}\n{std}\n{code}".encode()).hexdigest()


def syntax_checks(units: dict, compiler: str, work: Path) -> dict:
    """Check every unit (``key -> (std, preprocessor flags + source)``) with ``compiler -fsyntax-only``, side by
    side; returns ``{key: compiler errors}`` for the units that failed (empty: all passed)."""
    pre = {k: subprocess.Popen([compiler, f"-std={std}", "-E", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for k, (std, args) in units.items()}
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    failed, parsing, keys = {}, {}, {}
    for n, (k, proc) in enumerate(pre.items()):
        text, err = proc.communicate(timeout=600)
        if proc.returncode:
            failed[k] = err[-3000:]
            continue
        std = units[k][0]
        args = units[k][1]
        places = {a[2:] for a in args if a.startswith("-I")} | {str(Path(args[-1]).parent)}
        keys[k] = _key(version, std, text, sorted(places, key=len, reverse=True))    # the longest first
        if (cache_dir() / keys[k]).exists():
            continue
        unit = work / f"unit{n}.ii"
        unit.write_text(text)
        parsing[k] = subprocess.Popen([compiler, f"-std={std}", "-fsyntax-only", str(unit)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    for k, proc in parsing.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            failed[k] = err[-3000:]
        else:
            _remember(keys[k])
    return failed


def _remember(key: str) -> None:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}"
    tmp.write_text("passed\n")
    os.replace(tmp, d / key)

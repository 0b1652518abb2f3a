"""tests/compile_checks.py: a syntax check passed before is skipped only while the compiler would see the same
unit; a failing unit is never remembered."""
from __future__ import annotations

import shutil

import pytest

from . import compile_checks

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (the CUDA binding checks use it)")


def _units(src):
    return {"u": ("c++17", [f"-I{src}", str(src / "unit.cpp")])}


def test_cache_skips_only_an_unchanged_unit(tmp_path, monkeypatch):
    cache, src = tmp_path / "cache", tmp_path / "src"
    src.mkdir()
    monkeypatch.setenv("QLORA_DS_CHECK_CACHE", str(cache))
    (src / "head.h").write_text("inline int twice(int x) { return 2 * x; }\n")
    (src / "unit.cpp").write_text('#include "head.h"\nint f() { return twice(3); }\nconst char *where = __FILE__;\n')
    assert compile_checks.syntax_checks(_units(src), "g++", tmp_path) == {}
    first = sorted(p.name for p in cache.iterdir())
    assert len(first) == 1

    parsed = []                                 # which units reach the parser on the second run
    real = compile_checks.subprocess.Popen

    def spy(cmd, *a, **k):
        if "-fsyntax-only" in cmd:
            parsed.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(compile_checks.subprocess, "Popen", spy)
    copy = tmp_path / "elsewhere"               # another clone: other paths, same code -> the same key
    shutil.copytree(src, copy)
    assert compile_checks.syntax_checks(_units(copy), "g++", tmp_path) == {} and parsed == []

    (copy / "head.h").write_text("inline int twice(int x) { return 2 * y; }\n")     # a header breaks
    failed = compile_checks.syntax_checks(_units(copy), "g++", tmp_path)
    assert len(parsed) == 1 and "was not declared" in failed["u"] and "head.h" in failed["u"]
    assert sorted(p.name for p in cache.iterdir()) == first      # the failure is not remembered
    assert compile_checks.syntax_checks(_units(copy), "g++", tmp_path)["u"]          # and fails again

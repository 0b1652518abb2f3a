"""scripts/arch_sweep.py, the loader's sweep over transformers' causal-LM types, on a few types in process."""
import importlib.util

from .dist_utils import REPO


def _sweep():
    spec = importlib.util.spec_from_file_location("arch_sweep", REPO / "scripts" / "arch_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_loads_types_and_reports_a_failure(tmp_path):
    sweep = _sweep()
    assert sweep.check("mamba", str(tmp_path / "a")) == "OK"
    assert sweep.check("qwen3_5_moe_text", str(tmp_path / "b")) == "OK"     # one layer of each kind: linear + full
    assert sweep.config_for("qwen3_5_moe_text").layer_types == ["linear_attention", "full_attention"]
    assert sweep.check("rwkv", str(tmp_path / "c")).startswith("FAIL ")       # its eval rescales weights in place

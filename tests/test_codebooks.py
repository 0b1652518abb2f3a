"""Code tables: bnb's values, and one copy per (table, device) — no host->device copy inside a forward (issue 13 §1.3)."""
from __future__ import annotations

import pytest
import torch

from qlora_ds import codebooks


@pytest.fixture
def counted(monkeypatch):
    """Count the host -> device table copies (every one goes through codebooks._transfer); start with no cache."""
    calls: list[tuple[int, torch.device]] = []
    real = codebooks._transfer

    def transfer(t, device):
        calls.append((t.numel(), device))
        return real(t, device)

    monkeypatch.setattr(codebooks, "_transfer", transfer)
    monkeypatch.setattr(codebooks, "_cache", {})
    return calls


def test_tables_match_bnb():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(codebooks.dynamic_code(), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(codebooks.udynamic_code(), bnbF.create_dynamic_map(signed=False))
    assert torch.equal(codebooks.code4("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebooks.code4("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))


def test_same_tensor_per_table_and_device(counted):
    """CPU sibling of the CUDA test below: the meta device stands in for a GPU (a real .to(device) copy)."""
    meta = torch.device("meta")
    first = [codebooks.code4("nf4", meta), *codebooks.code4_bounds("fp4", meta), codebooks.dynamic_code(meta),
             codebooks.udynamic_bounds(meta)]
    assert len(counted) == 5 and all(t.device == meta for t in first)
    again = [codebooks.code4("nf4", "meta"), *codebooks.code4_bounds("fp4", "meta"), codebooks.dynamic_code("meta"),
             codebooks.udynamic_bounds("meta")]
    assert len(counted) == 5                                  # nothing copied the second time
    assert all(a is b for a, b in zip(first, again))          # the very same tensors
    assert codebooks.code4("nf4") is codebooks.code4("nf4", "cpu")  # CPU tables are never copied
    assert len(counted) == 5


def test_unknown_tables_rejected():
    with pytest.raises(ValueError, match="quant_type"):
        codebooks.code4("nf3")
    with pytest.raises(ValueError, match="unknown code table"):
        codebooks.table("nope")


def test_ops_do_not_import_quant():
    """The layering: ops/ reads the tables from the package bottom, not from quant/."""
    import ast
    import inspect

    import qlora_ds.ops as ops

    tree = ast.parse(inspect.getsource(ops))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(m == "quant" or m.startswith("quant.") for m in imported), imported


@pytest.mark.cuda
def test_second_forward_copies_no_table_to_the_gpu(counted):
    from qlora_ds.nn import QLoRAConfig, QLoRALinear

    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(256, 128).cuda(), QLoRAConfig()).cuda()
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    after_first = len(counted)
    assert after_first >= 1
    layer(x).sum().backward()
    torch.cuda.synchronize()
    assert len(counted) == after_first

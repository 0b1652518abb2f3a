"""GPTQ (Frantar et al., 2022) into our group-wise INT-N format: the baseline of the QA-LoRA paper.

``gptq_quantize(W, H)`` quantizes one linear weight [out, in] given its Hessian ``H = 2XᵀX/n`` over
calibration inputs X [n, in]: columns are quantized left to right and each one's rounding error is
spread over the not-yet-quantized columns with the inverse Hessian (the OBQ update), computed from the
upper Cholesky factor of H⁻¹ in blocks of ``blocksize`` columns with lazy batch updates. Settings are
the paper baseline's: asymmetric, ``group_size`` 32, act-order off, dampening ``percdamp``·mean(diag H).

Choices:

* The grid is **our** format's (``intn.quantize``: per (row, group) min/max of the group, integer zero
  point, grid [min(min, 0), max(max, 0)]), computed when the quantizer reaches the group's first column from
  the weights as updated so far (GPTQ with ``static_groups`` off). Reference GPTQ code reads those
  weights from the outer matrix, which misses the updates of earlier columns of the same block; we read
  the updated ones, so the blocked algorithm equals the one-column-at-a-time OBQ update exactly (a test
  checks that). With ``H = I`` it gives exactly ``intn.quantize``'s codes.
* Computed in H's dtype (fp32, or fp64 if given fp64) on H's device (GPU when the model is there).

``gptq_quantize_model`` drives it through a Hugging Face style decoder true-sequentially: the inputs of
the first block and every block's other arguments (attention mask, rotary embeddings: they differ per
block in models mixing sliding and global attention, e.g. Gemma2/3) are captured in one forward per
sample, then for each block, stage by stage (linears that read the same tensor: q/k/v, o, gate/up,
down), Hessians are collected with the earlier stages already quantized, the stage is quantized (its
weights replaced in place by the dequantized result), and the block's output becomes the next block's
input. It knows ``torch.nn.Linear`` only; callers wrap the returned
``IntNQuantizedTensor``s into layers.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from . import intn

log = logging.getLogger(__name__)


def _grid(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``x`` [group, out] (a transposed group): (scale, zero) of intn.quantize's min/max grid,
    the scale rounded to fp32 as stored."""
    wmin, wmax = x.amin(dim=0).clamp(max=0), x.amax(dim=0).clamp(min=0)
    # a tensor divisor: CUDA computes `tensor / python_number` as a multiply by its reciprocal (not intn's scale)
    maxq_t = torch.full_like(wmin, float(maxq))
    flat = ((wmax - wmin) / maxq_t).float() == 0          # all zero, or subnormals that underflow: grid [-1, 1]
    wmin = torch.where(flat, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(flat, torch.ones_like(wmax), wmax)
    scale = ((wmax - wmin) / maxq_t).float().to(x.dtype)
    zero = torch.round(-wmin / scale).clamp(0, maxq).float().to(x.dtype)
    return scale, zero


def hessian_inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(upper Cholesky factor U of (H + λI)⁻¹ with H⁻¹ = UᵀU, dead-column mask, λ used).

    Dead inputs (diag H = 0: never active in the calibration data) get H_ii = 1 (their weights are
    zeroed by the caller). λ = percdamp·mean(diag H); if H + λI is still not positive definite (too
    little calibration data), λ is raised tenfold, at most three times."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise QLoRADSError(f"the Hessian must be square [in, in], got shape {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise QLoRADSError("the GPTQ Hessian holds NaN/Inf (non-finite calibration activations); check the "
                           "model in fp32 on the calibration data first")
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    base = percdamp * torch.mean(torch.diag(H)).item()
    for attempt in range(4):
        damp = base * 10 ** attempt
        Hd = H.clone()
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("GPTQ: H + λI was not positive definite; used λ = %.3g (%gx percdamp)", damp,
                                10 ** attempt)
                return U, dead, damp
    raise QLoRADSError(f"GPTQ: the Hessian stays singular even with {1000 * percdamp:g}·mean(diag) dampening; use "
                       f"more (or longer) calibration samples, or a larger percdamp")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 32,
                  percdamp: float = 0.01, blocksize: int = 128) -> intn.IntNQuantizedTensor:
    """GPTQ-quantize ``weight`` [out, in] with Hessian ``hessian`` [in, in] into an IntNQuantizedTensor."""
    intn.check_bits(bits)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise QLoRADSError("GPTQ needs a 2-D floating-point weight [out_features, in_features]")
    out_f, in_f = weight.shape
    intn.check_group_size(group_size, in_f)
    if tuple(hessian.shape) != (in_f, in_f):
        raise QLoRADSError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's in_features {in_f}")
    if not 0 <= percdamp < 1:
        raise QLoRADSError(f"percdamp={percdamp!r}: use a small fraction such as 0.01 (GPTQ's default)")
    if not bool(torch.isfinite(weight).all()):
        raise QLoRADSError("weight must be finite; fix NaN/Inf in the checkpoint first")
    dt = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    dev = hessian.device
    # work on Wᵀ [in, out]: a weight column is then a contiguous row, and the error update a rank-1 addr_
    Wt = weight.detach().to(dev, dt).t().contiguous()
    U, dead, _ = hessian_inverse_cholesky(hessian.detach().to(dt), percdamp)
    Wt[dead] = 0
    maxq = 2 ** bits - 1
    codes = torch.empty(in_f, out_f, dtype=torch.uint8, device=dev)
    scales = torch.empty(in_f // group_size, out_f, dtype=dt, device=dev)
    zeros = torch.empty_like(scales)
    blocksize = max(group_size, blocksize // group_size * group_size)   # a group never straddles two blocks
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)      # the column loop is many small ops: measured 10-50x faster on one thread
    try:
        _columns(Wt, U, codes, scales, zeros, maxq, group_size, blocksize)
    finally:
        torch.set_num_threads(threads)
    return intn.IntNQuantizedTensor(qweight=intn.pack(codes.t().contiguous(), bits).to(weight.device),
                                    scales=scales.float().t().contiguous().to(weight.device),
                                    zeros=zeros.float().t().contiguous().to(weight.device),
                                    shape=torch.Size(weight.shape), bits=bits, group_size=group_size,
                                    dtype=weight.dtype)


def _columns(Wt, U, codes, scales, zeros, maxq, group_size, blocksize) -> None:
    """The GPTQ column loop on Wᵀ (in place), writing codes/scales/zeros (all [in or groups, out])."""
    in_f = Wt.shape[0]
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = Wt[i1:i2]                      # a view: updated in place
        err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                s, z = _grid(W1[i:i + group_size], maxq)
                scales[col // group_size], zeros[col // group_size] = s, z
            w = W1[i]
            q = torch.round(w / s + z).clamp_(0, maxq)
            codes[col] = q.to(torch.uint8)
            e = (w - s * (q - z)) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1)
            err1[i] = e
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err1, alpha=-1)


class HessianHook:
    """Forward hook accumulating ``H = 2XᵀX/n`` (fp32, on the input's device) from an ``nn.Linear``'s inputs."""

    def __init__(self, in_features: int):
        self.sum: torch.Tensor | None = None
        self.n = 0
        self.in_features = in_features

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().reshape(-1, self.in_features).float()
        if self.sum is None:
            self.sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None or self.n == 0:
            raise QLoRADSError("a GPTQ layer saw no calibration input (it is not on the forward path?)")
        return self.sum * (2.0 / self.n)


def _rows(qt: intn.IntNQuantizedTensor, start: int, n: int, dtype: torch.dtype) -> intn.IntNQuantizedTensor:
    """Rows [start, start+n) of a quantized weight (packing is per row)."""
    sl = slice(start, start + n)
    return intn.IntNQuantizedTensor(qweight=qt.qweight[sl].contiguous(), scales=qt.scales[sl].contiguous(),
                                    zeros=qt.zeros[sl].contiguous(), shape=torch.Size((n, qt.shape[1])),
                                    bits=qt.bits, group_size=qt.group_size, dtype=dtype)


class _Stop(Exception):
    pass


def _blocks(model: nn.Module, wanted: set[str], strict: bool) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks holding (most of) the wanted linears (e.g. 'model.layers')."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.startswith(name + ".") for p in wanted)
            if n and (best is None or n > best[2]):
                best = (name, mod, n)
    if best is None:
        raise QLoRADSError("GPTQ needs the quantized linears inside one list of decoder blocks (model.layers "
                           "in Llama-style models); this model's layout is not supported")
    outside = sorted(p for p in wanted if not p.startswith(best[0] + "."))
    if strict and outside:
        raise QLoRADSError(f"GPTQ quantizes the linears of one list of decoder blocks ({best[0]}); {outside[:3]} "
                           f"lie outside it: leave them out of the selection (GPTQ loaders keep such layers, e.g. "
                           f"lm_head, unquantized)")
    return best[0], best[1]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _stages(block: nn.Module, names: list[str], args, kwargs) -> list[list[str]]:
    """Linears of ``block`` grouped by the tensor they read, in call order (true-sequential stages)."""
    seen: list[tuple[str, torch.Tensor]] = []
    mods = dict(block.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0]))) for n in names]
    try:
        block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for n, x in seen:
        if n in sum(stages, []):
            continue
        if last is not None and x is last:
            stages[-1].append(n)
        else:
            stages.append([n])
        last = x
    missing = [n for n in names if n not in sum(stages, [])]
    if missing:
        raise QLoRADSError(f"GPTQ: linears {missing[:3]} are not called by their block's forward")
    return stages


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration: Iterable[torch.Tensor], bits: int = 4, group_size: int = 32,
                        percdamp: float = 0.01, blocksize: int = 128,
                        select: Callable[[str, nn.Linear], bool] | None = None) -> dict[str, intn.IntNQuantizedTensor]:
    """GPTQ every selected ``nn.Linear`` of a decoder true-sequentially (see module doc), in place.

    ``calibration``: token id tensors ([T] or [1, T], one unpadded sequence each). ``select(path,
    linear)``: which linears (default: every ``nn.Linear`` inside the decoder blocks). Each selected
    weight is overwritten with its dequantized GPTQ result; returns {path: IntNQuantizedTensor}.
    """
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    wanted = {p for p, m in linears.items() if select is None or select(p, m)}
    if not wanted:
        raise QLoRADSError("GPTQ: no nn.Linear selected to quantize (merge the adapters into plain linears first)")
    prefix, blocks = _blocks(model, wanted, strict=select is not None)
    wanted = {p for p in wanted if p.startswith(prefix + ".")}
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []                       # block 0's input hidden states, per sample
    rest: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]    # [block][sample]: its other (args, kwargs)

    def catch(b):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            h, args = (args[0], tuple(args[1:])) if args else (kwargs.pop("hidden_states"), ())
            if b == 0:
                hidden.append(h)
            rest[b].append((args, kwargs))
            if b == len(blocks) - 1:
                raise _Stop                               # the last block's inputs are all we need
        return hook

    hooks = [block.register_forward_pre_hook(catch(b), with_kwargs=True) for b, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for ids in calibration:
            ids = ids.reshape(1, -1).to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    if not hidden:
        raise QLoRADSError("GPTQ needs calibration samples; pass --calibration data.jsonl with a few dozen records")
    if any(len(r) != len(hidden) for r in rest):
        raise QLoRADSError(f"GPTQ: the model's forward does not call every block of {prefix} once per sample; "
                           f"this model's layout is not supported")
    done: dict[str, intn.IntNQuantizedTensor] = {}
    try:
        for b, block in enumerate(blocks):
            bp = f"{prefix}.{b}."
            names = sorted(p[len(bp):] for p in wanted if p.startswith(bp))
            mods = dict(block.named_modules())
            for stage in _stages(block, names, (hidden[0],) + rest[b][0][0], rest[b][0][1]) if names else []:
                accs = {stage[0]: HessianHook(mods[stage[0]].in_features)}
                hooks = [mods[stage[0]].register_forward_hook(accs[stage[0]])]
                stop = mods[stage[-1]].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(_Stop()))
                try:
                    for h, (args, kwargs) in zip(hidden, rest[b]):
                        try:
                            block(h, *args, **kwargs)
                        except _Stop:
                            pass
                finally:
                    for h in hooks + [stop]:
                        h.remove()
                # the stage's linears read the same input, so share one Hessian; GPTQ treats rows
                # independently given H, so their stacked rows are quantized in one pass
                H = accs[stage[0]].hessian()
                ws = [mods[n].weight for n in stage]
                qt = gptq_quantize(torch.cat([w.float() for w in ws]), H, bits, group_size, percdamp, blocksize)
                row = 0
                for n, w in zip(stage, ws):
                    part = _rows(qt, row, w.shape[0], w.dtype)
                    row += w.shape[0]
                    w.copy_(part.dequantize(torch.float32).to(w.dtype))
                    done[bp + n] = part
            hidden = [_first(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, rest[b])]
            rest[b] = []
    finally:
        model.train(was_training)
    log.info("GPTQ INT%d g%d: %d linears in %d blocks, %d calibration samples", bits, group_size, len(done),
             len(blocks), len(hidden))
    return done

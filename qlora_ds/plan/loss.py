"""The LM head and loss in the memory plan: the chunked loss (``qlora_ds.loss``) for a model it runs on, else the full
logits. Which models it runs on comes from the same table as the loss's own check (``qlora_ds.loss_support``, torch
free): the planned model's type is its layout's family (the config's ``model_type``), its logit settings
``ModelShape.logit_config`` (empty: the model type's defaults, as for the presets). A router's auxiliary loss
(``output_router_logits``) keeps the plain loss too; the router loss's own few bytes are not planned.

* chunked: one chunk of fp32 logits and its in-place softmax gradient (2·4·c·V, c = max(16, 2²⁴/V) rows, at most the
  tokens), plus per token its log-sum-exp (4 B) and the hidden state selected for the loss with its gradient (2·4·h,
  fp32 at most); a soft cap keeps one more chunk of fp32 (its tanh) while the chunk's gradient is formed.
* full logits: 12 B per logit (the fp32 log-softmax output, the gradient coming into it and the one it produces, at
  the backward peak), plus what the model's transform keeps for backward in the compute dtype: a soft cap's tanh
  output (e B per logit); a scale by a Python number keeps nothing (tests/test_plan_loss_path.py measures both).
"""
from __future__ import annotations

from ..loss_support import APPLIED, LOGIT_TRANSFORMS, ROUTER_LOSS, ROUTER_WHY, LogitTransform, logit_transform

CHUNK_LOGITS = 1 << 24      # = qlora_ds.nn.chunked_loss.LOGIT_BUDGET (the planner imports no torch code)
FULL_LOGIT_BYTES = 12


def logit_config_of(hf_config: dict) -> tuple:
    """``ModelShape.logit_config`` from a config.json dict: the ``LOGIT_TRANSFORMS`` keys it sets (a composite's from
    its text config, which the planner plans)."""
    cfg = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else hf_config
    return tuple((k, cfg[k]) for k in (*LOGIT_TRANSFORMS, ROUTER_LOSS) if k in cfg)


def loss_path(cfg) -> tuple[LogitTransform | None, str | None]:
    """(the transform, None) where ``qlora_ds.loss.causal_lm_loss`` takes the chunked loss, else (None, why not)."""
    if not cfg.chunked_loss:
        return None, "chunked_loss is off"
    if dict(cfg.shape.logit_config).get(ROUTER_LOSS):
        return None, ROUTER_WHY
    return logit_transform(cfg.shape.layout.family, [dict(cfg.shape.logit_config)])


def chunked_loss_bytes(cfg, tokens: int, transform: LogitTransform = LogitTransform()) -> float:
    v, h = cfg.shape.vocab, cfg.shape.hidden
    rows = min(tokens, max(16, CHUNK_LOGITS // v))
    buffers = 2 if transform.softcap is None else 3
    return buffers * 4 * rows * v + tokens * (4 + 2 * 4 * h)


def full_logits_bytes(cfg, tokens: int) -> float:
    family = cfg.shape.layout.family
    own = {k: v for k, v in cfg.shape.logit_config if k in APPLIED.get(family, {})}
    transform, _ = logit_transform(family, [own])       # the model type's own transform, whatever else the config sets
    capped = transform is not None and transform.softcap is not None
    return tokens * cfg.shape.vocab * (FULL_LOGIT_BYTES + (cfg.elem if capped else 0))


def logits_loss_bytes(cfg, tokens: int) -> float:
    transform, why = loss_path(cfg)
    return full_logits_bytes(cfg, tokens) if why is not None else chunked_loss_bytes(cfg, tokens, transform)

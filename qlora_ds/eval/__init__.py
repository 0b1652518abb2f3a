"""Evaluation: held-out loss/perplexity and an MMLU-format multiple-choice harness; loading runs."""
from .multiple_choice import MCRecord, build_prompt, choice_token_ids, evaluate_mc, load_mc
from .perplexity import heldout_loss, token_nll

__all__ = ["MCRecord", "build_prompt", "choice_token_ids", "evaluate_mc", "heldout_loss", "load_mc", "token_nll"]

"""Which of the installed transformers' causal-LM types qlora-ds loads: a tiny random model of each type is saved,
then loaded by ``qlora_ds.from_pretrained`` and by transformers (+ ``inject``); the logits must be equal.

    python scripts/arch_sweep.py                  # every type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (~30 min, 2 cores)
    python scripts/arch_sweep.py mamba qwen3_5    # some

Each type runs in its own process (a default config may be huge: an address-space limit and a timeout stop it).
A line per type: OK, DIFF (logits differ), FAIL (our load or forward raised), or skip (the tiny model could not be
built, or transformers itself failed on it: a config this sweep does not size right, not a qlora-ds result).
Rerun it after a transformers upgrade; what it found is in the README ("Mixture-of-experts models").
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts=4, num_local_experts=4, n_routed_experts=4, moe_intermediate_size=48,
             shared_expert_intermediate_size=96, num_experts_per_tok=2, max_position_embeddings=64,
             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
             n_embd=64, n_layer=2, n_head=4, d_model=64, ffn_dim=96, n_positions=64, kv_lora_rank=16, q_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
LIMIT_BYTES, TIMEOUT_S = 8 << 30, 180


def config_for(model_type: str):
    from transformers import AutoConfig
    full = AutoConfig.for_model(model_type)
    kinds = list(dict.fromkeys(getattr(getattr(full, "text_config", None) or full, "layer_types", None) or []))
    extra = {"layer_types": kinds, "num_hidden_layers": len(kinds)} if len(kinds) > 1 else {}   # one layer per kind
    return AutoConfig.for_model(model_type, **{**SIZES, **extra})


def check(model_type: str, directory: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_ds.inject import from_pretrained, inject
    from qlora_ds.nn import QLoRAConfig
    try:
        config = config_for(model_type)
        if getattr(config, "is_encoder_decoder", False):
            return "skip: encoder-decoder"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).float().save_pretrained(directory)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            hf(ids)
    except Exception as e:      # noqa: BLE001 - the sweep reports whatever a type raises
        return f"skip: {type(e).__name__}: {str(e)[:120]}"
    config = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
    try:
        ours = from_pretrained(directory, config, torch_dtype=torch.float32).eval()
        inject(hf, config)
        with torch.no_grad():
            a, b = ours(ids).logits, hf(ids).logits
    except Exception as e:      # noqa: BLE001
        return f"FAIL {type(e).__name__}: {str(e)[:240]}"
    return "OK" if torch.equal(a, b) else f"DIFF max {(a - b).abs().max().item():.3g}"


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        with tempfile.TemporaryDirectory() as d:
            print("RESULT", check(argv[1], d), flush=True)
        return 0
    if argv:
        types = argv
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    for model_type in types:
        try:
            out = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                                 timeout=TIMEOUT_S, env=env, preexec_fn=_limit).stdout
            result = next((l[7:] for l in out.splitlines() if l.startswith("RESULT ")), "skip: crashed (memory?)")
        except subprocess.TimeoutExpired:
            result = f"skip: over {TIMEOUT_S} s"
        print(f"{model_type:28s} {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

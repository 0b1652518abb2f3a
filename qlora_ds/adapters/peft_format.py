"""LoRA adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``
(keys ``base_model.model.<module path>.lora_{A,B}.weight``), plus a side file ``qlora_ds.json`` with
what PEFT has no field for (per-layer kind and quantization, the base's config without token ids and other
fields that do not change the weights (``base_config``; older files have only ``base_config_hash``), and
``quantized_from``: the dtype the base weights were rounded to before quantization, which an fp16/fp32
checkpoint's INT-N/NF4 base depends on).
PEFT drops unknown config keys with a warning, so our extras live in the side file, not in the config.

``read_adapter`` validates a directory against a model and returns our state-dict entries without
touching the model; ``load_adapter`` = read + copy, so a bad file leaves the model unchanged.
QA-LoRA: our pool is the group mean or the group sum (``QALoRAConfig.pool``: the mean times c = 1 or L);
PEFT's QA-LoRA variant multiplies the mean by in/L, so ``lora_A`` is multiplied by c/(in/L) on save
(``use_qalora``/``qalora_group_size`` set) and by (in/L)/c on load; the side file records ``pool``. The file
is then the same function whichever pool trained it, and loads exactly (up to fp32 rounding) into either.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from typing import Iterable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import QLoRADSError
from ..nn import QALoRALinear, QLoRALinear
from ..nn.experts_lora import ExpertsLoRAView, adapter_paths
from ..nn.quantized_experts import is_quantized_experts
from ..atomic import atomic_directory

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")   # refused, never unpickled
SIDE_NAME = "qlora_ds.json"
PREFIX = "base_model.model."
_ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, SIDE_NAME, "README.md")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype", "quantization_config", "architectures",
                         "use_cache", "name_or_path")
# config fields that neither shape the weights nor change the forward: token ids, output flags, task-head labels,
# the generation defaults older configs carry. Editing them (e.g. a second eos id) keeps the base the same.
_NON_ARCH_CONFIG_KEYS = frozenset((
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "forced_bos_token_id",
    "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "output_attentions",
    "output_hidden_states", "output_scores", "return_dict", "return_dict_in_generate", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "num_labels",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "initializer_range", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "num_return_sequences", "remove_invalid_values",
    "exponential_decay_length_penalty"))
# PEFT LoRA options whose forward or file layout is not plain LoRA ("off" is None/False for each). VeLoRA and
# MonteCLoRA (velora_config, monteclora_config) and MiCA (init_lora_weights="mica") infer as plain LoRA: accepted.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (a learned magnitude per output)",
    "alora_invocation_tokens": "aLoRA (it acts only from its invocation tokens on, and cannot be merged)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing between LoRAs",
    "kasa_config": "KaSA (a learned singular-value diagonal on a truncated base)",
    "layer_replication": "layer replication (PEFT stacks copies of decoder layers)",
    "lora_bias": "a bias on lora_B",
}
# init_lora_weights methods that also change the base (W - scaling·B0·A0; LoftQ re-quantizes it): a file saved
# without PEFT's conversion is a delta against that changed base. EVA, orthogonal, gaussian and MiCA leave it as is.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_QLORA_QUANT_KEYS = ("quant_type", "blocksize", "double_quant")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> our LoRA layer, for every QLoRALinear / QALoRALinear that carries an adapter, and for each
    adapted 4-bit MoE expert weight an ``ExpertsLoRAView`` under the path PEFT's nested wrappers give it."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear) or (isinstance(m, QALoRALinear) and m.has_adapter):
            layers[name] = m
        elif is_quantized_experts(m):
            layers.update({path: ExpertsLoRAView(m, weight, name) for weight, path in adapter_paths(name, m).items()})
    return layers


def _state_key(path: str, layer, part: str) -> str:
    """Our parameter name of a layer's ``lora_A``/``lora_B`` (``model.named_parameters()``)."""
    return layer.state_key(part) if isinstance(layer, ExpertsLoRAView) else f"{path}.{part}.weight"


def _config_dict(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    return {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def _sha256(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def base_config_hash(model: nn.Module) -> str | None:
    """sha256 of the model's (HF) config without volatile fields: the side file's ``base_config_hash`` (this rule
    since version 1, so older qlora-ds versions still check new files; it also covers token ids)."""
    d = _config_dict(model)
    return None if d is None else _sha256(d)


def base_config(model: nn.Module) -> dict | None:
    """The model's config without the fields that do not change the weights or the forward, as JSON values:
    what ``read_adapter`` compares (the side file's ``base_config``)."""
    d = _config_dict(model)
    if d is None:
        return None
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _NON_ARCH_CONFIG_KEYS}, default=str))


def _to_peft_a(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Our lora_A -> PEFT's (the same function under PEFT's pool = mean·in/L); computed in fp64, one rounding."""
    if not isinstance(layer, QALoRALinear):
        return t
    return (t.double() * layer.pool_factor / (layer.in_features // layer.group_size)).float()


def _from_peft_a(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(layer, QALoRALinear):
        return t
    return (t.double() * (layer.in_features // layer.group_size) / layer.pool_factor).float()


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None,
                 model_state: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
    """Write the adapter of ``model`` atomically in PEFT's format.

    ``model_state``: optional (name, tensor) pairs with our names (``<path>.lora_A.weight``, an experts module's
    ``<path>.<weight>_lora_A``) whose
    tensors are used instead of the module's parameters (e.g. ones gathered under ZeRO-3); the
    model then only supplies the structure.
    """
    layers = lora_layers(model)
    if not layers:
        raise QLoRADSError("the model has no QLoRALinear/QALoRALinear layers with an adapter; inject them first")
    given = dict(model_state) if model_state is not None else {}
    tensors, side_layers, ranks, alphas = {}, {}, {}, {}
    for path, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{path}.{part}.weight"
            state_key = _state_key(path, layer, part)
            t = given[state_key] if state_key in given else getattr(layer, part).weight
            t = t.detach().to("cpu", torch.float32)
            want = tuple(getattr(layer, part).weight.shape) if not getattr(layer, part).weight.is_meta else t.shape
            if tuple(t.shape) != tuple(want) or t.numel() == 0:
                raise QLoRADSError(f"{key}: got shape {tuple(t.shape)}, the layer expects {tuple(want)} (a ZeRO-3 "
                                   f"partition? gather the parameters and pass them as model_state)")
            if part == "lora_A":
                t = _to_peft_a(layer, t)
            tensors[PREFIX + key] = t.contiguous()
        ranks[path], alphas[path] = layer.r, layer.lora_alpha
        info = {"kind": _kind(layer), "r": layer.r,
                "lora_alpha": layer.lora_alpha, "in_features": layer.in_features, "out_features": layer.out_features}
        if isinstance(layer, QALoRALinear):
            info.update(bits=layer.bits, group_size=layer.group_size, pool=layer.pool_mode)
        else:
            info.update(quant_type=layer.quant_type, blocksize=layer.blocksize, double_quant=layer.double_quant)
        side_layers[path] = info
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = next(iter(layers.values()))
    experts = {p: l for p, l in layers.items() if isinstance(l, ExpertsLoRAView)}
    qalora = [l for l in layers.values() if isinstance(l, QALoRALinear)]
    group_sizes = {l.group_size for l in qalora}
    if len(group_sizes) > 1:
        raise QLoRADSError(f"QA-LoRA layers use several group sizes {sorted(group_sizes)}; PEFT's format holds one")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": float(getattr(first.lora_dropout, "p", 0.0)), "bias": "none",
        "target_modules": _target_modules(model, [p for p in layers if p not in experts]),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "revision": None,
        "use_qalora": bool(qalora), "qalora_group_size": qalora[0].group_size if qalora else 16,
    }
    if experts:     # PEFT's LoRA on nn.Parameters: the experts modules' fused weights, by full path
        config["target_parameters"] = sorted(f"{l.module_path}.{l.name}" for l in experts.values())
    side = {"format": "qlora_ds.adapter", "version": 1, "base_config_hash": base_config_hash(model),
            "base_config": base_config(model), "quantized_from": str(first.weight_dtype).removeprefix("torch."),
            "layers": side_layers, "quantize_experts": any(is_quantized_experts(m) for m in model.modules())}
    with atomic_directory(directory, allowed_existing=_ADAPTER_FILES) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, SIDE_NAME), "w") as f:
            json.dump(side, f, indent=2, sort_keys=True)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise QLoRADSError(f"cannot read the adapter's {what} {path}: {err}; is this a PEFT adapter "
                           f"directory?") from None


_PLAIN_KEY = re.compile(r"\^?[\w.-]+")
_MAX_KEY = 256


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern (``peft.utils.other.get_pattern_key``): each key is a regex
    that must match a whole dotted suffix of the module path; the first key that matches wins. A key is read from
    a downloaded file, so its cost is bounded: a plain name (``.`` any character, as in PEFT) is matched without
    the regex engine, and a regex key may not repeat a group or hold more than a few repeats (``_regex_key``)."""
    for key, value in (pattern or {}).items():
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY:
            raise QLoRADSError(f"adapter pattern key {str(key)[:40]!r} is not a module name or regex of 1 to "
                               f"{_MAX_KEY} characters; fix rank_pattern / alpha_pattern in adapter_config.json")
        if _PLAIN_KEY.fullmatch(key):
            if _plain_match(key, path):
                return value
        elif _regex_key(key).match(path):
            return value
    return default


def _plain_match(key: str, path: str) -> bool:
    """``re.match(rf"(.*\.)?({key})$", path)`` for a key of word characters, ``-`` and ``.`` (which matches any
    character) with an optional leading ``^``, in linear time: the key matches the path's end, at its start or
    just after a dot (``^``: at its start only)."""
    anchored, key = key.startswith("^"), key.lstrip("^")
    start = len(path) - len(key)
    if start < 0 or "\n" in path or (start and (anchored or path[start - 1] != ".")):
        return False
    return all(k == c or k == "." for k, c in zip(key, path[start:]))


@functools.lru_cache(maxsize=256)
def _regex_key(key: str) -> re.Pattern:
    """The compiled PEFT pattern of a regex ``key``, refused where it could backtrack for long: a repeat (``*``,
    ``+``, ``{n,m}``) of anything but one character or class (``(a+)+``: exponential time), or more than 3 unbounded
    repeats (polynomial)."""
    try:
        compiled = re.compile(rf"(.*\.)?({key})$")
        tree = re._parser.parse(key)
    except re.error as err:
        raise QLoRADSError(f"adapter pattern key {key!r} is not a valid regular expression ({err})") from None
    c = re._constants
    unbounded = 0

    def walk(items) -> None:
        nonlocal unbounded
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                high, body = av[1], av[2]
                if high > 1 and any(sub not in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN) for sub, _ in body):
                    raise QLoRADSError(f"adapter pattern key {key!r} repeats a group, which can take exponential "
                                       f"time to match; repeat single characters only (e.g. layers\\.[0-9]+\\.) "
                                       f"or list the module names in adapter_config.json's rank_pattern / "
                                       f"alpha_pattern")
                unbounded += high == c.MAXREPEAT
                walk(body)
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP, c.ASSERT, c.ASSERT_NOT):
                walk(av[-1])
            elif op is c.BRANCH:
                for branch in av[1]:
                    walk(branch)
    walk(tree)
    if unbounded > 3:
        raise QLoRADSError(f"adapter pattern key {key!r} has {unbounded} unbounded repeats (*, +), more than the 3 "
                           f"a module-name pattern needs; simplify it in adapter_config.json's rank_pattern / "
                           f"alpha_pattern")
    return compiled


def _target_modules(model: nn.Module, paths) -> list[str]:
    """The leaf names (as PEFT users write them) when PEFT, matching them as suffixes, would wrap exactly
    our layers; else the full module paths (an exact match in PEFT and in ``config.matches``)."""
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    named = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if named == set(paths) else sorted(paths)


def read_adapter(model: nn.Module, directory: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Validate the adapter in ``directory`` against ``model``; return ({our key: tensor}, {path: scaling}).
    Raises QLoRADSError naming the first bad key; never touches the model."""
    out, scalings, _, _ = _read_adapter(model, directory)
    return out, scalings


def _read_adapter(model: nn.Module, directory: str):
    """read_adapter plus {path: α} with α/r = the file's scaling for that layer (α·√r for an rsLoRA file),
    so that the α a layer keeps after loading re-saves the same function, and {path: rank} for the layers
    whose ``rank_pattern`` rank differs from the rank they were built with (the file's ``r``)."""
    config = _read_json(os.path.join(directory, CONFIG_NAME), "config")
    side_path = os.path.join(directory, SIDE_NAME)
    side = _read_json(side_path, "side file") if os.path.exists(side_path) else {}
    if config.get("peft_type", "LORA") != "LORA":
        raise QLoRADSError(f"adapter peft_type={config.get('peft_type')!r}; only LoRA adapters can be loaded")
    _check_options(config)
    _check_base_config(model, side, side_path, directory)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(directory, n))]
        if pickles:
            raise QLoRADSError(f"{directory} holds only {pickles[0]}, a pickle; qlora-ds never unpickles adapters "
                               f"(unpickling a file from someone else can run any code). Convert it where you trust "
                               f"it: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)")
        raise QLoRADSError(f"{weights_path} is missing; save adapters with save_adapter or PEFT save_pretrained "
                           f"(safe_serialization=True)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise QLoRADSError(f"{weights_path} is not a readable safetensors file ({err}): it is truncated or corrupt; "
                           f"copy it again or re-save the adapter") from None
    biases = [k for k in tensors if k.endswith(".bias")]
    if config.get("bias", "none") != "none" and biases:
        raise QLoRADSError(f"adapter has bias={config['bias']!r} and holds trained biases ({biases[0]!r} and "
                           f"{len(biases) - 1} more); qlora-ds keeps the base biases frozen: train with bias='none'")
    layers = lora_layers(model)
    qalora_peft = bool(config.get("use_qalora"))
    out, scalings, alphas, ranks, seen = {}, {}, {}, {}, set()
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.weight", ".weight")
        base_path, is_copy, what = name.rpartition(".base_layer.")
        if is_copy and base_path in layers and what in ("weight", "bias"):
            _check_base_copy(layers[base_path], base_path, key, what, t)
            continue
        path, sep, part = name.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise QLoRADSError(f"adapter key {key!r} is not a LoRA A/B weight (embeddings, DoRA magnitudes and "
                               f"modules_to_save are not supported)")
        layer = layers.get(path)
        if layer is None:
            if config.get("target_parameters"):
                raise QLoRADSError(f"adapter key {key!r} targets {path!r}, which is no QLoRALinear/QALoRALinear or "
                                   f"adapted 4-bit MoE experts weight in this model; the adapter has LoRA on the "
                                   f"experts (target_parameters): build the model with QLoRAConfig(lora_experts=True,"
                                   f" dropout=0) and its target_modules {config.get('target_modules')}")
            raise QLoRADSError(f"adapter key {key!r} targets module {path!r}, which is not a QLoRALinear/QALoRALinear "
                               f"in this model; inject layers for the adapter's target_modules "
                               f"{config.get('target_modules')} first")
        info = side.get("layers", {}).get(path)
        if isinstance(layer, QALoRALinear):
            if info is not None and (info.get("kind") != "qalora" or info.get("bits") != layer.bits
                                     or info.get("group_size") != layer.group_size):
                raise QLoRADSError(f"adapter key {key!r} was trained for {info.get('kind')} bits={info.get('bits')} "
                                   f"group_size={info.get('group_size')}, but the layer is QA-LoRA bits={layer.bits} "
                                   f"group_size={layer.group_size}; quantize the base the same way")
            if qalora_peft and config.get("qalora_group_size") != layer.group_size:
                raise QLoRADSError(f"adapter has qalora_group_size={config.get('qalora_group_size')} but {path} uses "
                                   f"group_size={layer.group_size}")
            if part[0] == "A":
                t = _from_peft_a(layer, t)
        elif info is not None and info.get("kind") != _kind(layer):
            raise QLoRADSError(f"adapter key {key!r} is a {info.get('kind')} adapter but {path} is "
                               f"{'a QLoRALinear' if isinstance(layer, QLoRALinear) else 'a 4-bit MoE expert weight'}")
        elif qalora_peft:
            raise QLoRADSError(f"adapter is a QA-LoRA adapter (use_qalora) but {path} is a QLoRALinear")
        elif info is not None and any(k in info and info[k] != getattr(layer, k) for k in _QLORA_QUANT_KEYS):
            trained = " ".join(f"{k}={info.get(k)}" for k in _QLORA_QUANT_KEYS)
            here = " ".join(f"{k}={getattr(layer, k)}" for k in _QLORA_QUANT_KEYS)
            raise QLoRADSError(f"adapter key {key!r} was trained for qlora {trained}, but the layer is {here}; "
                               f"quantize the base the same way")
        sub = layer.lora_A if part[0] == "A" else layer.lora_B
        if not t.is_floating_point():
            raise QLoRADSError(f"adapter key {key!r} has dtype {t.dtype}; LoRA weights must be floating point "
                               f"(the file is not a LoRA adapter or is corrupt)")
        if not bool(torch.isfinite(t).all()):
            raise QLoRADSError(f"adapter key {key!r} holds NaN/Inf values (a diverged run?); load an earlier "
                               f"checkpoint's adapter")
        r_file = config.get("r", layer.r)
        r = _pattern_value(config.get("rank_pattern"), path, r_file)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise QLoRADSError(f"adapter rank {r!r} for {path} (r / rank_pattern) is not a positive integer")
        if r != layer.r and not (r != r_file and layer.r == r_file):
            raise QLoRADSError(f"{path} was built with rank {layer.r} but the adapter's rank for it is {r}"
                               f"{' (rank_pattern)' if r != r_file else ''}; build the layers with the adapter's "
                               f"r={r_file} (load_adapter gives rank_pattern layers their own rank)")
        want = list(sub.weight.shape)
        want[0 if part[0] == "A" else 1] = r * getattr(layer, "num_experts", 1)      # experts: r per expert
        if tuple(t.shape) != tuple(want):
            raise QLoRADSError(f"adapter key {key!r} has shape {tuple(t.shape)} but {path}.lora_{part} at the "
                               f"adapter's rank {r} is {tuple(want)}; load it into the base model it was trained on")
        if r != layer.r:
            ranks[path] = r         # a rank_pattern layer built at the file's r: load_adapter rebuilds its A/B
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", layer.lora_alpha))
        scalings[path] = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        alphas[path] = alpha * r ** 0.5 if config.get("use_rslora") else alpha
        out[f"{path}.lora_{part}"] = t.float()
        seen.add(key)
    for path in scalings:
        for part in ("A", "B"):
            if f"{path}.lora_{part}.weight" not in out:
                raise QLoRADSError(f"adapter has no lora_{part} weight for {path}; the file is incomplete")
    return out, scalings, alphas, ranks


def _kind(layer) -> str:
    return "qalora" if isinstance(layer, QALoRALinear) else getattr(layer, "kind", "qlora")


def _check_options(config: dict) -> None:
    for flag, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(flag):
            raise QLoRADSError(f"adapter uses {what} ({flag}); qlora-ds loads plain LoRA only: use this adapter "
                               f"with PEFT, or train a plain LoRA without {flag}")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        fix = ("load it onto the base that LoftQ saved, with init_lora_weights set to true in its "
               "adapter_config.json (as PEFT's LoftQ example does)") if init.startswith("loftq") else (
               "convert it in PEFT with save_pretrained(dir, path_initial_model_for_weight_conversion=<the adapter "
               "saved right after init>) (a plain LoRA of rank 2r), or load it onto the saved residual base with "
               "init_lora_weights set to true in its adapter_config.json")
        raise QLoRADSError(f"adapter has init_lora_weights={config['init_lora_weights']!r}: that init also changed the "
                           f"base weights, so the file is relative to that changed base, not to "
                           f"{config.get('base_model_name_or_path') or 'the original model'}; {fix}")


def _check_base_config(model: nn.Module, side: dict, side_path: str, directory: str) -> None:
    have = base_config(model)
    want = side.get("base_config")
    if have is None:
        return
    if isinstance(want, dict):
        want = {k: v for k, v in want.items() if k not in _NON_ARCH_CONFIG_KEYS}
        diff = sorted(k for k in want.keys() | have.keys() if k not in want or k not in have or want[k] != have[k])
        if diff:
            shown = "; ".join(f"{k}: {want.get(k, '<unset>')!r} vs this model's {have.get(k, '<unset>')!r}"
                              for k in diff[:4])
            raise QLoRADSError(f"adapter {directory} was trained on a base model with a different config (hash "
                               f"{str(side.get('base_config_hash'))[:12]} vs this model's "
                               f"{base_config_hash(model)[:12]}; {shown}{'; ...' if len(diff) > 4 else ''}); load it "
                               f"into the base model it was trained on")
        return
    # a side file with only the hash (written before base_config existed): the old rule, or the new one
    want_hash = side.get("base_config_hash")
    if want_hash and want_hash not in (base_config_hash(model), _sha256(have)):
        raise QLoRADSError(f"adapter {directory} was trained on a base model with a different config (hash "
                           f"{want_hash[:12]} vs this model's {base_config_hash(model)[:12]}); load it into the base "
                           f"model it was trained on (this older side file's hash also covers token ids: if only e.g. "
                           f"eos_token_id changed, delete base_config_hash from {side_path})")


def _check_base_copy(layer: nn.Module, path: str, key: str, what: str, t: torch.Tensor) -> None:
    """PEFT's save_pretrained (save_embedding_layers="auto") also writes a targeted lm_head's base weight (and bias):
    accept that copy if it is this model's base (up to our quantization), else refuse (a resized or another head)."""
    ours = layer.bias if what == "bias" else None
    want = (layer.out_features,) if what == "bias" else (layer.out_features, layer.in_features)
    if what == "bias" and ours is None:
        raise QLoRADSError(f"adapter key {key!r} is a base bias, but this model's {path} has none: the adapter was "
                           f"trained on another base; load it into the base model it was trained on")
    if tuple(t.shape) != want or not t.is_floating_point():
        raise QLoRADSError(f"adapter key {key!r} ({t.dtype}, shape {tuple(t.shape)}) should be PEFT's copy of this "
                           f"model's {path}.{what} (shape {want}): the adapter's base has another (resized?) head; "
                           f"load it into the base model it was trained on")
    if any(p.is_meta or hasattr(p, "ds_id") for p in layer.parameters(recurse=False)):
        return      # no local values (meta / ZeRO-3 partitions): the shape check is all we can do
    if what == "bias":      # equal within the coarser of the two dtypes
        b = ours.detach().to("cpu", torch.float64)
        eps = max(torch.finfo(t.dtype).eps, torch.finfo(ours.dtype).eps)
        err = float((t.double() - b).abs().max()) if t.numel() else 0.0
        ok = torch.allclose(t.double(), b, rtol=eps, atol=1e-6)
    else:
        # quantization alone (NF4/FP4, INT2-4) leaves a relative error below 0.5; another weight gives about 1 or more
        w = layer.dequantized_weight(layer.compute_dtype)
        num = den = 0.0
        for i in range(0, want[0], 4096):
            a = t[i:i + 4096].float()
            num += float((a - w[i:i + 4096].to("cpu", torch.float32)).square().sum())
            den += float(a.square().sum())
        err = (num / den) ** 0.5 if den else float(num > 0)
        ok = err <= 0.8
    if not ok:
        raise QLoRADSError(f"adapter key {key!r} is PEFT's copy of the base {path}.{what}, but it differs from this "
                           f"model's ({'max abs' if what == 'bias' else 'relative'} error {err:.3g}): the adapter was "
                           f"trained on another base; load it into the base model it was trained on")
    log.info("adapter key %s: PEFT's copy of the base %s.%s (save_embedding_layers), checked and skipped",
             key, path, what)


def _set_rank(layer: nn.Module, r: int) -> None:
    """Rebuild the layer's lora_A/lora_B at rank ``r`` (values follow), keeping their device, dtype and
    requires_grad: what PEFT builds for a ``rank_pattern`` entry."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    layer.lora_A = nn.Linear(a.shape[1], r, bias=False, device=a.device, dtype=a.dtype).requires_grad_(a.requires_grad)
    layer.lora_B = nn.Linear(r, b.shape[0], bias=False, device=b.device, dtype=b.dtype).requires_grad_(b.requires_grad)
    layer.r = r


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str) -> list[str]:
    """Load a PEFT-format LoRA adapter into the model's QLoRA/QA-LoRA layers; returns the module paths
    loaded. Layers the adapter does not cover get a zero lora_B (no-op adapter). A layer built at the file's
    ``r`` whose ``rank_pattern`` rank differs gets new lora_A/lora_B at that rank (call this before an
    optimizer takes the parameters). On any error the model is left unchanged."""
    state, scalings, alphas, ranks = _read_adapter(model, directory)
    layers = lora_layers(model)
    split = [p for p in ranks if any(hasattr(w, "ds_id") for w in (layers[p].lora_A.weight, layers[p].lora_B.weight))]
    if split:
        raise QLoRADSError(f"the adapter gives {split[0]} rank {ranks[split[0]]} (rank_pattern), but its LoRA weights "
                           f"are ZeRO-3 partitions built at rank {layers[split[0]].r}, which cannot be resized; load "
                           f"this adapter without ZeRO-3 (merge, evaluate), or train with one rank")
    fused = [p for p in ranks if isinstance(layers[p], ExpertsLoRAView)]
    if fused:
        raise QLoRADSError(f"the adapter gives the experts weight {fused[0]} rank {ranks[fused[0]]} (rank_pattern), "
                           f"but it was built at rank {layers[fused[0]].r}; build the model with that r")
    for path, r in ranks.items():
        _set_rank(layers[path], r)
    for key, t in state.items():
        path, _, part = key.rpartition(".lora_")
        sub = layers[path].lora_A if part[0] == "A" else layers[path].lora_B
        sub.weight.copy_(t.to(sub.weight.dtype))
    for path, layer in layers.items():
        if path in scalings:
            # α goes with the scaling: save_adapter writes lora_alpha, so keeping the layer's own α would
            # re-save a different function
            layer.scaling, layer.lora_alpha = scalings[path], alphas[path]
        else:
            layer.lora_B.weight.zero_()
            log.info("adapter does not cover %s: its LoRA is reset to a no-op", path)
    return sorted(scalings)

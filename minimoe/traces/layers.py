"""Which decoder layers of a model are MoE layers: the map between a trace's MoE-layer axis and the model's layers.

A trace (``minimoe.traces.format``) and a placement (``minimoe.placement.Placement``) count MoE layers only:
axis 1 of ``experts`` and axis 0 of ``phy2log`` are 0..L-1 over the MoE layers. Serving engines number layers
differently (the table is in ``minimoe import --help`` and ``minimoe export --help``):

    SGLang          every decoder layer 0..num_hidden_layers-1 (dense layers are rows of zeros / the identity)
    TensorRT-LLM    the model's layer index of each MoE layer (keys of its statistics and of its yaml)
    vLLM, EPLB      the MoE layers only, 0..M-1 over the model's M MoE layers, in model order

so importing a load dump and exporting a placement need ``moe_layers``: the model layer index of every MoE
layer, in order. The user names them (``--moe-layers 1,2,3``) or gives the model's transformers
``config.json`` (``--config``), read here by the rules transformers' modeling code applies:

    DeepSeek-V2/V3 (``first_k_dense_replace``)   layer i is MoE when i >= first_k_dense_replace and
                                                 i % moe_layer_freq == 0
    Qwen2/Qwen3-MoE (``decoder_sparse_step``)    i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    Llama 4 (``interleave_moe_layer_step``)      the listed ``moe_layers``, else (i + 1) % step == 0
    minimoe (``moe`` and ``moe_layers``)         the listed ``moe_layers``, else every layer
    any other MoE config (Mixtral, OLMoE, ...)   every layer

A config nested under ``text_config`` (multimodal Llama 4, Qwen3-VL-MoE) is read from there.
``tests/test_engine_files.py`` checks these rules against the modules transformers builds. One rule is the
engines' rather than transformers': DeepSeek's own modeling code, which SGLang and vLLM follow, makes layer i MoE
only when i % moe_layer_freq == 0, and transformers' port ignores ``moe_layer_freq`` (1 in every released
DeepSeek config, where the two agree). For a config with another value, a trace recorded with transformers
(``minimoe trace --hf``) holds layers that ``--config`` calls dense, and ``minimoe export`` refuses it naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from minimoe.traces.layer_ids import MAX_LAYERS, clip, layer_list

EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "top_k")


@dataclass(frozen=True)
class ModelLayers:
    """num_layers: decoder layers of the model; moe_layers: model index of each MoE layer, increasing;
    num_experts, top_k: routed experts per MoE layer and per token (None when the config does not say);
    source: what named them, for messages ("--moe-layers", "--config PATH")."""
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int | None = None
    top_k: int | None = None
    source: str = "the given layers"


def check_experts(layers: ModelLayers, what: str, num_experts: int) -> None:
    """Refuse model layers (from ``--config``) whose experts per layer differ from ``what``'s ("the placement",
    "the load file", "the dump"): ValueError naming ``layers.source``. Nothing to check when the config does not
    say (``--moe-layers``)."""
    if layers.num_experts is not None and layers.num_experts != num_experts:
        raise ValueError(f"{layers.source}: the model has {layers.num_experts} experts per layer, {what} "
                         f"{num_experts}")


def _count(config: dict, keys, source: str, most: int | None = None) -> int | None:
    """The first of ``keys`` the config has, an int in [0, most]; ValueError naming ``source`` and the key."""
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{source}: {key} must be a non-negative int, got {clip(repr(value))}")
            if most is not None and value > most:
                raise ValueError(f"{source}: {key}={value} is more than {most} (no model has that many layers)")
            return value
    return None


def text_config(config: dict, unless: str | None = None) -> dict:
    """The text model's part of a config dict: its ``text_config`` when that is an object (multimodal Llama 4,
    Qwen3-VL-MoE) and ``config`` lacks the key ``unless``; else ``config`` itself."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and (unless is None or unless not in config) else config


def layers_from_config(config: dict, source: str = "config") -> ModelLayers:
    """The MoE layers of a transformers (or minimoe) config dict; raises ValueError naming ``source`` and the key
    (also for more than ``MAX_LAYERS`` layers)."""
    if not isinstance(config, dict) or not config:
        raise ValueError(f"{source}: expected a model's config.json (a JSON object with num_hidden_layers), "
                         f"got {type(config).__name__ if not isinstance(config, dict) else 'an empty object'}")
    config = text_config(config, unless="num_hidden_layers")
    if isinstance(config.get("moe"), dict) and "num_layers" in config:  # minimoe's own ModelConfig
        num_layers = _count(config, ("num_layers",), source, MAX_LAYERS)
        listed = config.get("moe_layers")
        moe = list(range(num_layers)) if listed is None else listed
        num_experts = _count(config["moe"], ("num_experts",), source)
        if not num_experts:
            raise ValueError(f"{source}: its \"moe\" section has no num_experts >= 1 (got "
                             f"{clip(repr(config['moe'].get('num_experts')))})")
        return _checked(num_layers, moe, num_experts, _count(config["moe"], ("top_k",), source), source,
                        "moe_layers")
    num_layers = _count(config, ("num_hidden_layers",), source, MAX_LAYERS)
    if num_layers is None:
        raise ValueError(f"{source}: no num_hidden_layers: not a transformers model config (keys "
                         f"{sorted(config)[:12]}); name the MoE layers with --moe-layers instead")
    num_experts, top_k = _count(config, EXPERT_KEYS, source), _count(config, TOP_K_KEYS, source)
    if not num_experts:
        raise ValueError(f"{source}: no routed experts ({' / '.join(EXPERT_KEYS)} missing or 0): a dense model")
    layers = range(num_layers)
    if "first_k_dense_replace" in config:  # DeepSeek-V2/V3
        first = _count(config, ("first_k_dense_replace",), source)
        every = _count(config, ("moe_layer_freq",), source) or 1
        moe, key = [i for i in layers if i >= first and i % every == 0], "first_k_dense_replace"
    elif "decoder_sparse_step" in config or "mlp_only_layers" in config:  # Qwen2-MoE, Qwen3-MoE
        every = _count(config, ("decoder_sparse_step",), source) or 1
        dense = set(config.get("mlp_only_layers") or [])
        moe, key = [i for i in layers if i not in dense and (i + 1) % every == 0], "decoder_sparse_step"
    elif config.get("moe_layers") is not None:  # Llama 4 lists them
        moe, key = config["moe_layers"], "moe_layers"
    elif "interleave_moe_layer_step" in config:
        every = _count(config, ("interleave_moe_layer_step",), source) or 1
        moe, key = [i for i in layers if (i + 1) % every == 0], "interleave_moe_layer_step"
    else:
        moe, key = list(layers), "num_hidden_layers"
    return _checked(num_layers, moe, num_experts, top_k, source, key)


def _checked(num_layers, moe, num_experts, top_k, source, key) -> ModelLayers:
    if not isinstance(moe, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in moe) \
            or any(not 0 <= i < num_layers for i in moe) or len(set(moe)) != len(moe):
        raise ValueError(f"{source}: {key} gives MoE layers {layer_list(moe)}, expected distinct indices in "
                         f"[0, {num_layers})")
    if not moe:
        raise ValueError(f"{source}: {key} leaves no MoE layer among the {num_layers} layers")
    return ModelLayers(num_layers, tuple(sorted(moe)), num_experts, top_k, source)


def read_config(path) -> ModelLayers:
    """``layers_from_config`` of a config.json file (or a model folder holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected a model's config.json)") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
                         "expected a model's config.json") from None
    if not text.strip():
        raise ValueError(f"{path} is empty: expected a model's config.json")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    return layers_from_config(config, path)


def parse_layers(text: str) -> list[int]:
    """``"1,2,3"`` or ``"1-3"`` (or a mix, ``"0,3-5"``) -> [1, 2, 3]: the one parser of ``--moe-layers`` for
    ``minimoe import`` and ``minimoe export``. Indices must be in [0, MAX_LAYERS) and increase; ValueError
    (quoting at most a short prefix of ``text``) otherwise."""
    given = clip(repr(str(text)), 60)
    expected = f"expected increasing layer indices >= 0 like 1,2,3 or 1-3 (or 0,3-5), got {given}"
    layers = []
    for part in str(text).split(","):
        first, dash, last = part.strip().partition("-")
        try:
            ends = (int(first), int(last)) if dash else (int(first),)
        except ValueError:
            raise ValueError(expected) from None
        if max(ends) >= MAX_LAYERS:
            raise ValueError(f"layer index {clip(str(max(ends)), 24)} is above {MAX_LAYERS - 1}: no model has that "
                             f"many layers, got {given}")
        span = list(range(ends[0], ends[-1] + 1))
        layers.extend(span)
        if not span or min(span) < 0 or layers != sorted(set(layers)):
            raise ValueError(expected)
    return layers


def model_layers(moe_layers=None, config=None, num_layers: int | None = None) -> ModelLayers | None:
    """The model layers a user named: ``moe_layers`` (list, ``--moe-layers``) or ``config`` (path, ``--config``),
    at most one; ``num_layers`` (``--num-layers``) bounds a ``moe_layers`` list (None: one past its largest).
    None when neither is given. Raises ValueError naming the flags (or the config file) that disagree."""
    if moe_layers is not None and config is not None:
        raise ValueError("--moe-layers and --config both name the MoE layers: give one")
    if config is not None:
        return dataclasses.replace(read_config(config), source=f"--config {config}")
    if moe_layers is None:
        return None
    moe_layers = list(moe_layers)
    if num_layers is not None and moe_layers and max(moe_layers) >= num_layers:
        raise ValueError(f"--moe-layers {layer_list(moe_layers)} names layer {max(moe_layers)}, but --num-layers "
                         f"{num_layers} gives the model layers 0..{num_layers - 1}: the MoE layers must be below "
                         "--num-layers")
    total = num_layers if num_layers is not None else max(moe_layers, default=-1) + 1
    return _checked(total, moe_layers, None, None, "--moe-layers", "the list")

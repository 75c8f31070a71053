"""Hugging Face Llama folders and titanmem models: parameter names, the RoPE layout, the config, and loading.

A titanmem model and transformers' `LlamaForCausalLM` hold the same weights under other names, with one difference
of layout: titanmem rotates each head's consecutive pairs (x[2i], x[2i+1]) by RoPE's angle i (Meta's layout), while
transformers rotates (x[i], x[i + head_dim/2]). The rows of the query and key projections are therefore reordered
between the two (`rope_to_hf`, `rope_from_hf`), which leaves every attention score, and so the logits, unchanged.

The vocabulary of a Hugging Face folder is the tokenizer's: titanmem pads its embedding rows to a multiple of 64
(`model.vocab_size = -1`), and an export keeps only the tokenizer's rows, so that no generator there can pick a
padding id. Reading such a folder back fills the rows it has and leaves the padding at its initialisation.

A memory model's folder (`model_type = "titanmem"`, an `export.format = "hf"` export) keeps the memory layers under
the names of their FFN slot (`model.layers.N.mlp.query.weight`, ...) and the shared table as
`model.memory_values.weight`. A dense Llama read into a memory model fills everything but the memory layers, which
keep their own initialisation; the FFN weights of the blocks whose FFN a memory layer replaces are not used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from titanmem.components.safetensors_folder import SafetensorsFolder
from titanmem.config.errors import ConfigError
from titanmem.distributed.initialize import local_block
from titanmem.models.args import ModelArgs

logger = logging.getLogger(__name__)

CONFIG = "config.json"
MEMORY_MODEL_TYPE = "titanmem"

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "memory_values.weight": "model.memory_values.weight",
}
_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FEED_FORWARD = {"w1.weight": "gate_proj.weight", "w2.weight": "down_proj.weight", "w3.weight": "up_proj.weight"}
# The rows of the embedding and the output projection are vocabulary ids.
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")


def hf_name(name: str, memory_layers: tuple[int, ...] = ()) -> str:
    """The Hugging Face name of titanmem parameter `name` (a plain model name, no wrapper parts)."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    _, layer, rest = name.split(".", 2)
    if rest in _BLOCK:
        return f"model.layers.{layer}.{_BLOCK[rest]}"
    slot = rest.removeprefix("feed_forward.")
    if slot == rest:
        raise KeyError(f"{name} has no Hugging Face name")
    if int(layer) in memory_layers:
        return f"model.layers.{layer}.mlp.{slot}"
    return f"model.layers.{layer}.mlp.{_FEED_FORWARD[slot]}"


def rope_heads(name: str, args: ModelArgs) -> int | None:
    """The head count whose rows `name` reorders between the two RoPE layouts (query or key projection), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def rope_to_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query or key projection from titanmem's pair layout to transformers' half layout: within each head,
    the even rows first, then the odd ones."""
    return weight.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)


def rope_from_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rope_to_hf`."""
    return weight.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def read_hf_config(path: str | Path) -> dict | None:
    """The `config.json` of a Hugging Face model folder (one with a `model_type`), else None."""
    file = Path(path) / CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def is_hf_folder(path: str | Path) -> bool:
    return read_hf_config(path) is not None


def rope_theta(config: dict) -> float | None:
    """RoPE's base, where transformers 4 (`rope_theta`) or 5 (`rope_parameters`) keeps it."""
    parameters = config.get("rope_parameters") or {}
    return parameters.get("rope_theta", config.get("rope_theta"))


def hf_config(args: ModelArgs, *, vocab_size: int, eos_id: int, dtype: torch.dtype) -> dict:
    """`config.json` of a Hugging Face folder holding a model of `args` with `vocab_size` (the tokenizer's) ids."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # transformers 4 reads rope_theta; 5 reads rope_parameters (and warns on a rope_scaling key).
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.memory is not None:
        memory = args.memory
        config.update(architectures=["TitanmemForCausalLM"], model_type=MEMORY_MODEL_TYPE, memory={
            "layers": list(memory.layers), "n_keys": memory.n_keys, "k_dim": memory.k_dim, "v_dim": memory.v_dim,
            "heads": memory.heads, "knn": memory.knn, "swilu": memory.swilu, "qk_norm": memory.qk_norm,
            "gated": memory.gated, "value_dtype": memory.value_dtype,
        })
    return config


def check_hf_config(path: str | Path, args: ModelArgs, field: str = "checkpoint.initial_load_path") -> dict:
    """The folder's config, after checking that its model is `args`'s (or its dense base): one line naming the first
    difference otherwise. Its vocabulary may be smaller than the model's padded one."""
    config = read_hf_config(path)
    if config is None:
        raise ConfigError(field, f"{path} has no Hugging Face config.json with a model_type")
    if config["model_type"] not in ("llama", MEMORY_MODEL_TYPE):
        raise ConfigError(field, f"{path} holds a {config['model_type']!r} model; titanmem reads Llama models "
                          "(model_type 'llama') and its own memory models")
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(field, f"{path} uses RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r}, which "
                          "titanmem's model does not implement; start from a model without rope_scaling")
    expected = {
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "intermediate_size": args.ffn_hidden_dim,
        "head_dim": args.head_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
    }
    found = {**config, "num_key_value_heads": config.get("num_key_value_heads") or config.get("num_attention_heads"),
             "head_dim": config.get("head_dim") or config.get("hidden_size", 0) // max(config.get("num_attention_heads",
                                                                                                    1), 1),
             "rope_theta": rope_theta(config) if rope_theta(config) is not None else 10000.0}
    for key, value in expected.items():
        if found.get(key) != value:
            raise ConfigError(field, f"{path}/config.json has {key} = {found.get(key)}, but this run's model has "
                              f"{value}: choose the model.flavor of that model")
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError(field, f"{path} is a Llama variant with biases or another activation, which titanmem's "
                          "Llama does not have")
    if config.get("vocab_size", 0) > args.vocab_size:
        raise ConfigError(field, f"{path} has {config.get('vocab_size')} vocabulary rows, more than this run's "
                          f"{args.vocab_size}: set model.vocab_size to {config.get('vocab_size')}, with its tokenizer")
    if config["model_type"] == MEMORY_MODEL_TYPE:
        saved = config.get("memory") or {}
        if args.memory is None:
            raise ConfigError(field, f"{path} holds a memory model; enable [memory] with its settings "
                              f"({json.dumps(saved, sort_keys=True)}) to read it")
        mine = hf_config(args, vocab_size=0, eos_id=0, dtype=torch.float32)["memory"]
        for key, value in mine.items():
            if key != "value_dtype" and saved.get(key) != value:
                raise ConfigError(field, f"{path} holds memory {key} = {saved.get(key)}, but this run's is {value}: "
                                  f"set memory.{key} to match")
    return config


@torch.no_grad()
def load_hf_folder(model: torch.nn.Module, path: str | Path, field: str = "checkpoint.initial_load_path") -> None:
    """Fill `model` (any plan) from a Hugging Face Llama folder or a titanmem memory model exported to one; each rank
    reads only the block of each tensor it stores."""
    path = Path(path)
    args: ModelArgs = model.args
    config = check_hf_config(path, args, field)
    memory_layers = args.memory.layers if args.memory is not None else ()
    dense_source = config["model_type"] == "llama"
    kept = []
    with SafetensorsFolder(path, field) as stored_tensors:
        # A model with tied embeddings (Llama 3.2's small ones) stores no output projection: titanmem's starts as a copy.
        tied = config.get("tie_word_embeddings") and "lm_head.weight" not in stored_tensors.files
        aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
        for name, param in model.named_parameters():
            plain, target, index = local_block(name, param)
            source = hf_name(plain, memory_layers)
            source = aliases.get(source, source)
            if source not in stored_tensors.files:
                if dense_source and _is_memory_parameter(plain, memory_layers):
                    kept.append(plain)
                    continue
                raise ConfigError(field, f"{path} has no tensor {source} (titanmem's {plain}); it holds another model")
            stored = stored_tensors.get_slice(source)
            shape = tuple(stored.get_shape())
            if plain in VOCAB_ROWS:
                expected = (config.get("vocab_size", shape[0]), *param.shape[1:])
            else:
                expected = tuple(param.shape)
            if shape != expected:
                raise ConfigError(field, f"{path} holds {source} of shape {list(shape)}, but this run's {plain} is "
                                  f"{list(param.shape)}: the model settings differ from its config.json")
            heads = rope_heads(plain, args)
            if heads is not None:
                block = rope_from_hf(stored[:], heads)[index]
            elif plain in VOCAB_ROWS:
                rows = index[0]
                stop = min(rows.stop, shape[0])
                if rows.start < stop:
                    target[: stop - rows.start].copy_(stored[rows.start:stop][(slice(None), *index[1:])])
                continue
            else:
                block = stored[index]
            target.copy_(block)
    if kept:
        layers = sorted({int(name.split(".")[1]) for name in kept if name.startswith("layers.")})
        logger.info("%s is a dense Llama: the memory layers of blocks %s keep their own initialisation, and those "
                    "blocks' FFN weights are not used", path, layers)


def _is_memory_parameter(name: str, memory_layers: tuple[int, ...]) -> bool:
    if name == "memory_values.weight":
        return True
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "layers" and int(parts[1]) in memory_layers and parts[2] == "feed_forward"

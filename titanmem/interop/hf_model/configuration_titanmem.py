"""The config of a titanmem memory model in Hugging Face transformers: Llama's, plus the memory layers' settings."""

from transformers import LlamaConfig


class TitanmemConfig(LlamaConfig):
    """`LlamaConfig` with `memory`: a dict of titanmem's memory settings (layers, n_keys, k_dim, v_dim, heads, knn,
    swilu, qk_norm, gated, value_dtype), which transformers keeps as an attribute and writes back to config.json."""

    model_type = "titanmem"

"""A titanmem memory model in Hugging Face transformers: `LlamaForCausalLM` with product-key memory layers in the FFN
slots of the blocks that `config.memory["layers"]` names, all reading one value table (`model.memory_values`).

Everything but the memory layer is transformers' own Llama. The memory layer is titanmem's code, copied beside this
file at export (`titanmem_memory.py`), with the plain PyTorch key search and lookup. Load the folder with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import torch
from transformers import LlamaForCausalLM

from .configuration_titanmem import TitanmemConfig
from .titanmem_memory import MemoryArgs, MemoryValues, ProductKeyMemory


def memory_args(config: TitanmemConfig) -> MemoryArgs:
    settings = dict(config.memory)
    return MemoryArgs(**{**settings, "layers": tuple(settings["layers"])})


class TitanmemForCausalLM(LlamaForCausalLM):
    config_class = TitanmemConfig

    def __init__(self, config: TitanmemConfig):
        super().__init__(config)
        args = memory_args(config)
        # Owned by the decoder so that its name is model.memory_values.weight; the layers hold a reference that is not
        # registered, so the table has one name and is stored once.
        self.model.memory_values = MemoryValues(args.n_values, args.v_dim, args.value_dtype)
        for layer in args.layers:
            self.model.layers[layer].mlp = ProductKeyMemory(config.hidden_size, args, self.model.memory_values)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """titanmem's initialisation for the memory's parameters (a model built from its config alone)."""
        if isinstance(module, (MemoryValues, ProductKeyMemory)):
            for name, spec in module.param_inits().items():
                parameter = module.get_parameter(name)
                parameter.copy_(spec.draw(tuple(parameter.shape), None, parameter.device))
            return
        super()._init_weights(module)

"""Which parts of titanmem may import which: the one statement of the layering (docs/architecture.md explains it,
tests/test_layering.py enforces it on every import statement, lazy ones included).

Lower layers never import higher ones. The model and the kernels are plain PyTorch and Triton and know nothing of the
run; the config describes the run and imports nothing it configures; the run plan resolves a config against the
machine; the build path assembles a run from a plan; the entry points drive it.
"""

# Each layer, and the layers it may import (besides itself).
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "utils": frozenset(),
    "kernels": frozenset(),
    "config": frozenset(),
    "models": frozenset({"utils", "kernels"}),
    "data": frozenset({"config", "utils"}),
    "distributed": frozenset({"config", "models", "utils"}),
    "components": frozenset({"config", "models", "data", "distributed", "kernels", "utils"}),
    "eval": frozenset({"config", "models", "data", "utils"}),
    "plan": frozenset({"config", "models", "data", "distributed", "components", "utils"}),
    "build": frozenset({"plan", "config", "models", "data", "distributed", "components", "utils"}),
    "interop": frozenset({"config", "models", "data", "components", "eval", "utils"}),
    "entry": frozenset({"build", "plan", "config", "models", "data", "distributed", "components", "eval", "interop",
                        "utils"}),
}

# Module (or package) -> layer; a module belongs to the layer of its longest listed prefix.
MODULE_LAYERS: dict[str, str] = {
    "titanmem": "utils",  # the package root only sets up the import path
    "titanmem.layering": "utils",
    "titanmem.utils": "utils",
    "titanmem.step_model": "utils",
    "titanmem.kernels": "kernels",
    "titanmem.config": "config",
    "titanmem.models": "models",
    "titanmem.data": "data",
    "titanmem.distributed": "distributed",
    "titanmem.components": "components",
    "titanmem.eval": "eval",
    "titanmem.interop": "interop",
    "titanmem.plan": "plan",
    "titanmem.build": "build",
    "titanmem.train": "entry",
    "titanmem.launch": "entry",
    "titanmem.generate": "entry",
    "titanmem.export": "entry",
    "titanmem.planner": "entry",
    "titanmem.eval.__main__": "entry",
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in MODULE_LAYERS:
            return MODULE_LAYERS[prefix]
    raise KeyError(f"{module} belongs to no layer; add it to titanmem.layering.MODULE_LAYERS")

"""Which parts of titanmem may import which: the one statement of the layering (docs/architecture.md explains it,
tests/test_layering.py enforces it on every import statement, lazy ones and importlib strings included).

Lower layers never import higher ones. The registry names every pluggable choice and imports nothing; the model and
the kernels are plain PyTorch and Triton and know nothing of the run; the config describes the run and imports
nothing it configures; the run plan resolves a config against the machine; the build path assembles a run from a
plan; the entry points drive it. Outside the package, `tools/` and `tests/` use it as a user would: any module, no
private (underscore) name, and the package imports neither (the tests may also import the tools' public names).

Every module is listed by name: a new file has no layer until it is placed here, so it cannot slip past the check.
"""

# Each layer, and the layers it may import (besides itself).
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "utils": frozenset(),
    "registry": frozenset(),
    "kernels": frozenset({"registry"}),
    "config": frozenset({"registry"}),
    "models": frozenset({"registry", "utils", "kernels"}),
    "data": frozenset({"registry", "config", "utils"}),
    "distributed": frozenset({"registry", "config", "models", "utils"}),
    "components": frozenset({"registry", "config", "models", "data", "distributed", "kernels", "utils"}),
    "eval": frozenset({"registry", "config", "models", "data", "utils"}),
    "plan": frozenset({"registry", "config", "models", "data", "distributed", "components", "utils"}),
    "build": frozenset({"registry", "plan", "config", "models", "data", "distributed", "components", "utils"}),
    "interop": frozenset({"registry", "config", "models", "data", "components", "eval", "utils"}),
    "entry": frozenset({"registry", "build", "plan", "config", "models", "data", "distributed", "components", "eval",
                        "interop", "utils"}),
}

OUTSIDE_LAYERS: dict[str, frozenset[str]] = {
    "tools": frozenset(ALLOWED_IMPORTS) | {"entry"},
    "tests": frozenset(ALLOWED_IMPORTS) | {"entry", "tools"},
}
"""The checkout's folders that use the package from outside (by folder name), and what they may import: any layer (and
the tests the tools), but only public names (tests/test_layering.py); no package module may import them."""

LAYER_MODULES: dict[str, tuple[str, ...]] = {
    "utils": ("titanmem", "titanmem.layering", "titanmem.utils", "titanmem.step_model"),
    "registry": ("titanmem.registry",),
    "kernels": ("titanmem.kernels", "titanmem.kernels.config", "titanmem.kernels.embedding_bag",
                "titanmem.kernels.key_search", "titanmem.kernels.row_update", "titanmem.kernels.select"),
    "config": ("titanmem.config", "titanmem.config.errors", "titanmem.config.manager", "titanmem.config.sections"),
    "models": ("titanmem.models", "titanmem.models.accounting", "titanmem.models.args", "titanmem.models.flavors",
               "titanmem.models.init", "titanmem.models.key_search",
               "titanmem.models.kv_cache", "titanmem.models.llama", "titanmem.models.lookup",
               "titanmem.models.memory", "titanmem.models.selected_key_search"),
    "data": ("titanmem.data", "titanmem.data.dataloader", "titanmem.data.facts", "titanmem.data.files",
             "titanmem.data.hf_tokenizer", "titanmem.data.position", "titanmem.data.records", "titanmem.data.text",
             "titanmem.data.tokenizer"),
    "distributed": ("titanmem.distributed", "titanmem.distributed.initialize", "titanmem.distributed.lookup",
                    "titanmem.distributed.memory_parallel", "titanmem.distributed.parallel_dims",
                    "titanmem.distributed.parallelize", "titanmem.distributed.read_recorder",
                    "titanmem.distributed.row_parallel", "titanmem.distributed.value_layout_cost"),
    "components": ("titanmem.components", "titanmem.components.checkpoint", "titanmem.components.checkpoint_io",
                   "titanmem.components.dcp_tensors", "titanmem.components.disk_space",
                   "titanmem.components.event_file", "titanmem.components.export", "titanmem.components.export_tensors",
                   "titanmem.components.faults",
                   "titanmem.components.finetune", "titanmem.components.hf_checkpoint",
                   "titanmem.components.lr_scheduler", "titanmem.components.manifest",
                   "titanmem.components.metrics", "titanmem.components.optimizer", "titanmem.components.profiling",
                   "titanmem.components.read_counts", "titanmem.components.records",
                   "titanmem.components.row_selection", "titanmem.components.row_update_torch",
                   "titanmem.components.run_lock", "titanmem.components.safetensors_folder",
                   "titanmem.components.safetensors_stream", "titanmem.components.staging",
                   "titanmem.components.states", "titanmem.components.stored_blocks",
                   "titanmem.components.stored_tensors", "titanmem.components.summing_writer",
                   "titanmem.components.value_optimizer", "titanmem.components.watchdog"),
    "eval": ("titanmem.eval", "titanmem.eval.decode", "titanmem.eval.facts", "titanmem.eval.runner",
             "titanmem.eval.telemetry"),
    "plan": ("titanmem.plan",),
    "build": ("titanmem.build",),
    "interop": ("titanmem.interop", "titanmem.interop.hf_export", "titanmem.interop.hf_model",
                "titanmem.interop.hf_model.configuration_titanmem", "titanmem.interop.hf_model.modeling_titanmem",
                "titanmem.interop.hf_model.titanmem_memory", "titanmem.interop.lm_eval_task",
                "titanmem.interop.memory_code", "titanmem.interop.source_copy"),
    # The planner builds through the build path (docs/planner.md).
    "entry": ("titanmem.entry", "titanmem.train", "titanmem.launch", "titanmem.generate", "titanmem.export",
              "titanmem.eval.__main__", "titanmem.planner", "titanmem.planner_report", "titanmem.weak_scale",
              "titanmem.count_memory_reads", "titanmem.build_finetune_facts", "titanmem.check_init"),
}
"""Every module of the package (the top-level kernels/ folder installs as titanmem.kernels), by layer."""

MODULE_LAYERS: dict[str, str] = {module: layer for layer, modules in LAYER_MODULES.items() for module in modules}


class UnlistedModule(KeyError):
    """A module that LAYER_MODULES does not place."""


def layer_of(module: str) -> str:
    """The layer of a package module (listed by its exact name) or of a module of tools/ or tests/."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    top = module.split(".", 1)[0]
    if top in OUTSIDE_LAYERS:
        return top
    raise UnlistedModule(f"{module} belongs to no layer; add it to titanmem.layering.LAYER_MODULES")


def may_import(importer: str, imported: str) -> bool:
    """Whether module `importer` may import module `imported` (both placed by `layer_of`)."""
    source, target = layer_of(importer), layer_of(imported)
    allowed = OUTSIDE_LAYERS.get(source, ALLOWED_IMPORTS.get(source, frozenset()))
    return source == target or target in allowed

"""The package's imports follow `titanmem.layering`: no upward import, no cycle, and no code cites a document outside
the repository."""

import ast
from pathlib import Path


from titanmem.layering import ALLOWED_IMPORTS, MODULE_LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """Every module of titanmem by its import name (the top-level kernels/ folder installs as titanmem.kernels)."""
    modules = {}
    for folder, package in ((ROOT / "titanmem", "titanmem"), (ROOT / "kernels", "titanmem.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The titanmem modules `module` imports anywhere in its file (in functions too), as precisely as known."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "titanmem" or name.startswith("titanmem."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {module: imports_of(path, module, known) for module, path in modules.items()}


def test_the_layering_is_itself_acyclic_and_complete():
    assert set(MODULE_LAYERS.values()) <= set(ALLOWED_IMPORTS)
    for layer, allowed in ALLOWED_IMPORTS.items():
        assert allowed <= set(ALLOWED_IMPORTS), layer
    visiting, done = set(), set()

    def visit(layer):
        assert layer not in visiting, f"the allowed imports cycle through {layer}"
        if layer in done:
            return
        visiting.add(layer)
        for lower in ALLOWED_IMPORTS[layer]:
            visit(lower)
        visiting.discard(layer)
        done.add(layer)

    for layer in ALLOWED_IMPORTS:
        visit(layer)
    for module in package_modules():
        layer_of(module)  # every module has a layer


def test_no_module_imports_a_higher_or_unrelated_layer():
    violations = []
    for module, imported in import_graph().items():
        for target in imported:
            source_layer, target_layer = layer_of(module), layer_of(target)
            if target_layer != source_layer and target_layer not in ALLOWED_IMPORTS[source_layer]:
                violations.append(f"{module} ({source_layer}) imports {target} ({target_layer})")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walk_sees_lazy_imports_and_would_catch_an_upward_one(tmp_path):
    """The check itself can fail: an import inside a function of a model file is found and judged."""
    path = tmp_path / "memory.py"
    path.write_text("def f():\n    from titanmem.config.sections import Memory\n")
    imported = imports_of(path, "titanmem.models.memory", set(package_modules()))
    assert imported == {"titanmem.config.sections"}
    assert layer_of("titanmem.config.sections") not in ALLOWED_IMPORTS[layer_of("titanmem.models.memory")]


def test_nothing_cites_a_document_outside_the_repository():
    banned = ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")
    files = [path for path in ROOT.rglob("*") if path.is_file() and path.suffix in (".py", ".md", ".sh", ".toml")
             and not any(part.startswith(".") or part in ("build", "outputs") for part in path.relative_to(ROOT).parts)]
    assert any(path.name == "train.py" for path in files)
    offenders = [f"{path.relative_to(ROOT)}: {word}" for path in files
                 for word in banned if word in path.read_text(errors="replace")]
    assert not offenders, "\n".join(offenders)

"""The imports of the package, of tools/ and of tests/ follow `titanmem.layering`: every module placed, no upward import
(import statements, lazy ones, importlib strings and the registry's implementation strings alike), no cycle, no
private name used from outside, and no code cites a document outside the repository. Each check is also shown to fail
on a planted violation."""

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import titanmem
from titanmem.layering import ALLOWED_IMPORTS, LAYER_MODULES, MODULE_LAYERS, OUTSIDE_LAYERS, layer_of, may_import

ROOT = Path(__file__).resolve().parents[1]

IMPLEMENTATION = re.compile(r"^(titanmem(?:\.\w+)+):(\w+)$")
"""A registry-style implementation string, "titanmem.package.module:attribute"."""

IMPORT_FUNCTIONS = ("import_module", "__import__")


def modules_of(folder: Path, package: str) -> dict[str, Path]:
    modules = {}
    for path in folder.rglob("*.py"):
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def package_modules() -> dict[str, Path]:
    """Every module of titanmem by its import name (the top-level kernels/ folder installs as titanmem.kernels)."""
    return {**modules_of(ROOT / "titanmem", "titanmem"), **modules_of(ROOT / "kernels", "titanmem.kernels")}


def outside_modules() -> dict[str, Path]:
    """Every Python file of tools/ and tests/, named as if each folder were a package."""
    return {name: path for folder in OUTSIDE_LAYERS for name, path in modules_of(ROOT / folder, folder).items()}


def _judged(name: str) -> bool:
    return name.split(".", 1)[0] in ("titanmem", *OUTSIDE_LAYERS)


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of titanmem, tools/ and tests/ that `module` imports anywhere in its file (in functions too, and
    through importlib with a literal name or an implementation string), as precisely as known."""
    return {name for name, _ in imported_names(path, module, known)}


def imported_names(path: Path, module: str, known: set[str]) -> set[tuple[str, str]]:
    """(module, name taken from it or "") for every import of `imports_of`."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add((submodule, "") if submodule in known else (base, alias.name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in IMPORT_FUNCTIONS and isinstance(node.args[0].value, str):
                found.add((node.args[0].value, ""))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not registry_file(path):
            match = IMPLEMENTATION.match(node.value)
            if match:
                found.add((match[1], match[2]))
    return {(name, taken) for name, taken in found if _judged(name)}


def registry_file(path: Path) -> bool:
    """The registry's own files: their implementation strings are imported by each kind's loader, not by them."""
    relative = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    return relative.parts[:2] in (("titanmem", "registry.py"), ("titanmem", "registry"))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(package_modules()) | set(outside_modules())
    return {module: imports_of(path, module, known) for module, path in modules.items()}


def unlisted(modules) -> list[str]:
    """Package modules LAYER_MODULES does not place."""
    return sorted(module for module in modules if module not in MODULE_LAYERS)


def import_violations(graph: dict[str, set[str]]) -> list[str]:
    violations = []
    for module, imported in graph.items():
        for target in imported:
            if target.split(".", 1)[0] == "titanmem" and target not in MODULE_LAYERS:
                violations.append(f"{module} imports {target}, which is no module of titanmem's layering")
            elif not may_import(module, target):
                violations.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return violations


def private_name_violations(modules: dict[str, Path]) -> list[str]:
    known = set(package_modules())
    return [f"{module} takes {name} from {source}" for module, path in modules.items()
            for source, name in imported_names(path, module, known | set(outside_modules()))
            if _judged(source) and (name.startswith("_") or "._" in f".{source}".replace(".__main__", ""))]


def bare_tool_imports(modules: dict[str, Path]) -> list[str]:
    """Imports of a tool by its file name alone (`from bench_train import ...`), which work only when the script's own
    folder is on the import path: tools run as `python -m tools.<folder>.<script>`, so they import each other by
    their full names."""
    stems = {name.rsplit(".", 1)[-1] for name in outside_modules() if name.startswith("tools.")} - {"tools"}
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found += [f"{module} imports {name}; import it as tools.<folder>.{name}" for name in names
                      if name.split(".", 1)[0] in stems]
    return found


def registry_violations(kinds) -> list[str]:
    """Each kind's loader may import each of its implementations, and each implementation exists."""
    violations = []
    for kind in kinds:
        if kind.loaded_by not in MODULE_LAYERS:
            violations.append(f"kind {kind.name}: its loader {kind.loaded_by} is no module of titanmem's layering")
            continue
        for entry in kind.entries:
            if entry.implementation is None:
                continue
            match = IMPLEMENTATION.match(entry.implementation)
            if not match:
                violations.append(f"{kind.name} {entry.name}: {entry.implementation!r} is not 'module:attribute'")
                continue
            module, attribute = match[1], match[2]
            if module not in MODULE_LAYERS:
                violations.append(f"{kind.name} {entry.name}: {module} is no module of titanmem's layering")
            elif not may_import(kind.loaded_by, module):
                violations.append(f"{kind.name} {entry.name}: its loader {kind.loaded_by} ({layer_of(kind.loaded_by)})"
                                  f" may not import {module} ({layer_of(module)})")
            elif not hasattr(importlib.import_module(module), attribute):
                violations.append(f"{kind.name} {entry.name}: {module} has no {attribute}")
    return violations


def test_the_layering_is_itself_acyclic_and_places_every_module_once():
    assert set(MODULE_LAYERS.values()) <= set(ALLOWED_IMPORTS)
    for layer, allowed in ALLOWED_IMPORTS.items():
        assert allowed <= set(ALLOWED_IMPORTS), layer
    placed = [module for modules in LAYER_MODULES.values() for module in modules]
    assert len(placed) == len(set(placed)), "a module is placed in two layers"
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
    modules = package_modules()
    assert not unlisted(modules), f"unplaced modules: {unlisted(modules)}"
    assert not set(MODULE_LAYERS) - set(modules), f"placed but absent: {sorted(set(MODULE_LAYERS) - set(modules))}"


def test_no_module_of_the_package_tools_or_tests_imports_a_higher_or_unrelated_layer():
    violations = import_violations(import_graph({**package_modules(), **outside_modules()}))
    assert not violations, "\n".join(sorted(violations))


def test_tools_and_tests_use_no_private_name_of_the_package():
    violations = private_name_violations(outside_modules())
    assert not violations, "\n".join(sorted(violations))


def test_tools_import_each_other_by_their_full_names(tmp_path):
    violations = bare_tool_imports(outside_modules())
    assert not violations, "\n".join(sorted(violations))
    path = tmp_path / "calibrate.py"
    path.write_text("def f():\n    from bench_train import bench\n")
    assert bare_tool_imports({"tools.bench.calibrate": path}) == [
        "tools.bench.calibrate imports bench_train; import it as tools.<folder>.bench_train"]


def test_every_registered_implementation_exists_and_its_loader_may_import_it():
    from titanmem.registry import all_kinds

    kinds = list(all_kinds())
    assert kinds
    assert not registry_violations(kinds), "\n".join(registry_violations(kinds))
    # The registry's files hold no implementation string outside an entry: each is checked above.
    registered = {entry.implementation for kind in kinds for entry in kind.entries}
    for path in package_modules().values():
        if registry_file(path):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and IMPLEMENTATION.match(node.value):
                    assert node.value in registered, f"{path.name}: {node.value} is in no registry entry"


def test_no_import_cycle_between_modules():
    graph = import_graph(package_modules())
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


def test_the_kernels_are_found_as_installed_without_widening_the_package_path():
    """titanmem.kernels comes from the install (the checkout's kernels/ folder, mapped by pyproject.toml), not from a
    path added at run time, which made every top-level folder of the checkout importable as titanmem.<folder>."""
    assert [Path(p).resolve() for p in titanmem.__path__] == [Path(titanmem.__file__).resolve().parent]
    kernels = importlib.import_module("titanmem.kernels")
    assert Path(kernels.__file__).resolve().parent.name == "kernels"
    for folder in ("tools", "tests", "train_configs"):
        assert importlib.util.find_spec(f"titanmem.{folder}") is None, folder


# The checks can fail: each meets a planted violation.

def test_a_planted_upward_import_is_caught_lazy_or_through_importlib(tmp_path):
    known = set(package_modules())
    path = tmp_path / "memory.py"
    path.write_text("def f():\n    from titanmem.config.sections import Memory\n")
    assert imports_of(path, "titanmem.models.memory", known) == {"titanmem.config.sections"}
    path.write_text("import importlib\n\ndef f():\n    return importlib.import_module('titanmem.train')\n")
    graph = {"titanmem.models.memory": imports_of(path, "titanmem.models.memory", known)}
    assert import_violations(graph) == ["titanmem.models.memory (models) imports titanmem.train (entry)"]
    path.write_text("TABLE = {'fast': 'titanmem.components.optimizer:build_optimizers'}\n")
    graph = {"titanmem.models.memory": imports_of(path, "titanmem.models.memory", known)}
    assert import_violations(graph) == ["titanmem.models.memory (models) imports titanmem.components.optimizer "
                                        "(components)"]
    path.write_text("import tests.helpers\n")
    graph = {"titanmem.utils": imports_of(path, "titanmem.utils", known | {"tests.helpers"})}
    assert import_violations(graph) == ["titanmem.utils (utils) imports tests.helpers (tests)"]


def test_a_planted_unlisted_module_and_a_misspelt_import_are_caught(tmp_path):
    assert unlisted([*package_modules(), "titanmem.models.new_block"]) == ["titanmem.models.new_block"]
    path = tmp_path / "t.py"
    path.write_text("from titanmem.modles import llama\n")
    graph = {"tests.t": imports_of(path, "tests.t", set(package_modules()))}
    assert import_violations(graph) == ["tests.t imports titanmem.modles, which is no module of titanmem's layering"]


def test_a_planted_private_import_from_a_test_is_caught(tmp_path):
    path = tmp_path / "test_x.py"
    path.write_text("from titanmem.eval.runner import sample_facts, _helper\n")
    assert private_name_violations({"tests.test_x": path}) == ["tests.test_x takes _helper from titanmem.eval.runner"]


def test_a_planted_registry_entry_that_breaks_the_table_is_caught():
    class Entry:
        def __init__(self, name, implementation):
            self.name, self.implementation = name, implementation

    class Kind:
        name, loaded_by = "toy kind", "titanmem.models.key_search"
        entries = [Entry("upward", "titanmem.components.value_optimizer:build_value_optimizer"),
                   Entry("missing", "titanmem.models.key_search:no_such_function"),
                   Entry("auto", None)]

    assert registry_violations([Kind()]) == [
        "toy kind upward: its loader titanmem.models.key_search (models) may not import "
        "titanmem.components.value_optimizer (components)",
        "toy kind missing: titanmem.models.key_search has no no_such_function"]


def test_nothing_cites_a_document_outside_the_repository():
    banned = ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")
    files = [path for path in ROOT.rglob("*") if path.is_file() and path.suffix in (".py", ".md", ".sh", ".toml")
             and not any(part.startswith(".") or part in ("build", "outputs") for part in path.relative_to(ROOT).parts)]
    assert any(path.name == "train.py" for path in files)
    offenders = [f"{path.relative_to(ROOT)}: {word}" for path in files
                 for word in banned if word in path.read_text(errors="replace")]
    assert not offenders, "\n".join(offenders)

"""Definitions of titanmem's modules copied as source text into files that other tools load without titanmem (the
memory layer of a Hugging Face folder, the scorer of an lm-evaluation-harness task): one source of truth, copied at
export."""

from __future__ import annotations

import ast
import importlib
import inspect


def definitions(module_name: str, names: tuple[str, ...]) -> list[str]:
    """The source of each named top-level definition (function, class or assignment) of a module, in `names`' order,
    with its comments and docstrings."""
    source = inspect.getsource(importlib.import_module(module_name))
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        if name in names:
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            found[name] = "\n".join(source.splitlines()[start - 1: node.end_lineno])
    missing = [name for name in names if name not in found]
    if missing:
        raise RuntimeError(f"{module_name} no longer defines {missing}: update the list of definitions to copy")
    return [found[name] for name in names]

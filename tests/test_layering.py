"""The layering rule: the framework-free core `babygpt/` imports no backend and no framework.

Read from the source (imports, and module names handed to `importlib`), so a backend imported
lazily inside a function or by name counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "babygpt"
FORBIDDEN = ("babygpt_jax", "babygpt_torch", "jax", "torch", "flax", "optax", "orbax", "grain")


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.append(arg.value)
                elif isinstance(arg, ast.JoinedStr):  # f"babygpt_{backend}.model"
                    names.append("".join(v.value for v in arg.values if isinstance(v, ast.Constant)))
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith((f"{f}.", f"{f}_")) for f in FORBIDDEN) or name.startswith(
        "babygpt_"
    )


def test_the_core_imports_no_backend_and_no_framework():
    found = [
        f"{path.relative_to(CORE)}: {name}"
        for path in sorted(CORE.rglob("*.py"))
        for name in _imported(ast.parse(path.read_text()))
        if _forbidden(name)
    ]
    assert not found, "the core imports a backend or a framework:\n" + "\n".join(found)


def test_the_scan_sees_every_way_of_importing():
    source = (
        "import torch\nfrom jax import numpy\nimport importlib\n"
        "importlib.import_module(f'babygpt_{b}.model')\n__import__('flax.nnx')\n"
    )
    assert [n for n in _imported(ast.parse(source)) if _forbidden(n)] == [
        "torch",
        "jax",
        "babygpt_.model",
        "flax.nnx",
    ]

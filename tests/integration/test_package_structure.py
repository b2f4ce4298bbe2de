"""The package's layering: its import graph is a DAG, the kernels load without the
frameworks, and the mixers' layout is stated in one module."""
from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_mamba_hybrid"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at any depth of the file (imports
    inside functions count: a lazy import is still a dependency)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in modules else root
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a.b.attr -> a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def _parents_of(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: count those edges too."""
    out = {m: set(d) for m, d in graph.items()}
    for m, deps in graph.items():
        for d in deps:
            parts = d.split(".")
            out[m].update(parent for parent in (".".join(parts[:i]) for i in range(2, len(parts)))
                          if not (m == parent or m.startswith(parent + ".")))  # own packages: running
    return out


def test_module_import_graph_is_a_dag():
    graph = _parents_of(import_graph())
    assert "vllm_mamba_hybrid.modeling.mamba2_mixer" in graph  # the walk found the package
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle between modules: {' -> '.join(e.args[1])}")


def test_subpackage_import_graph_is_a_dag():
    """One level up (ops, modeling, runtime, ...): no two subpackages import each other."""
    def top(module: str) -> str:
        return module.split(".")[1] if "." in module else module
    graph: dict[str, set[str]] = {}
    for m, deps in import_graph().items():
        graph.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
    graph.pop("vllm_mamba_hybrid", None)  # the package root imports nothing (lazy names)
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle between subpackages: {' -> '.join(e.args[1])}")


def test_root_package_imports_nothing_of_its_own():
    assert import_graph()["vllm_mamba_hybrid"] == set()


@pytest.mark.parametrize("module", ["vllm_mamba_hybrid.ops", "vllm_mamba_hybrid.layout"])
def test_kernels_and_layout_load_without_transformers_or_vllm(module):
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout.strip()
    assert out == "[]", f"import {module} loaded {out}"


def test_the_package_names_still_resolve_and_register_with_transformers():
    code = ("import vllm_mamba_hybrid as v\n"
            "from transformers import AutoConfig\n"
            "cfg = v.LlamaMambaHybridConfig(num_hidden_layers=2, hidden_size=64, "
            "num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=300)\n"
            "print(type(AutoConfig.for_model(cfg.model_type)).__name__, "
            "v.LlamaMambaHybridForCausalLM.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout.strip()
    assert out == "LlamaMambaHybridConfig LlamaMambaHybridForCausalLM"


PROJECTIONS = {"in_proj_x", "in_proj_z", "B_proj", "C_proj"}


def layout_spellings(path: Path) -> list[str]:
    """Where a module spells the layout itself: Mamba1's projection names (as attributes
    or strings, docstrings aside), or a list / sum of the pieces' sizes (d_xb with d_inner)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    found = []
    for node in ast.walk(tree):
        name = (node.attr if isinstance(node, ast.Attribute) else
                node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings else None)
        if name in PROJECTIONS:
            found.append(f"line {node.lineno}: {name}")
        sizes = (isinstance(node, ast.List) or
                 isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)))
        if sizes and {"d_xb", "d_inner"} <= {n.attr if isinstance(n, ast.Attribute) else
                                             getattr(n, "id", None) for n in ast.walk(node)}:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_layout_is_spelled_in_one_module():
    """Split orders and sizes live in layout.py; other modules read them. Exceptions: the
    reference Mamba1 module's own attributes (named by layout.MAMBA1_PROJECTIONS) and
    the attention -> Mamba copy into them, and the paper-checkpoint detector."""
    allowed = {"layout.py", "modeling/mamba1_mixer.py", "conversion/init.py", "conversion/paper.py"}
    found = [f"{path.relative_to(PACKAGE).as_posix()} {where}"
             for path in sorted(PACKAGE.rglob("*.py"))
             if path.relative_to(PACKAGE).as_posix() not in allowed
             for where in layout_spellings(path)]
    assert not found, "the layout spelled outside layout.py:\n" + "\n".join(found)

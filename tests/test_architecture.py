"""The package's import graph: one flow, imports pointing down, no cycles (docs/architecture.md).

    cli -> convert -> eval -> formats -> quant, calibration, model -> errors, fsutil
    (hub: Hub downloads and error wording, below calibration; tiny: the shipped demo model's builder, on model)

Every import counts, also the ones inside functions (they still tie modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import llama4_quant

PKG = Path(llama4_quant.__file__).parent
LEVEL = {"errors": 0, "fsutil": 0, "hub": 0.5, "model": 1, "quant": 1, "calibration": 1, "tiny": 2, "formats": 2,
         "eval": 3, "convert": 4, "cli": 5, "__main__": 6, "__init__": 0}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["llama4_quant", *parts])] = f
    return out


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - (node.level - 1)]
                target = ".".join(root + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != mod and n.startswith("llama4_quant"):
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) - {"llama4_quant"} for m, p in mods.items()}


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            a, b = _top(m), _top(d)
            if a != b and LEVEL[b] >= LEVEL[a]:
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_cli_holds_options_and_printing_only():
    """No conversion loop, pipeline or gate in cli/: it builds options, calls convert/eval, prints."""
    for f in (PKG / "cli").glob("*.py"):
        text = f.read_text()
        for word in ("Pipeline(", "GGUFExporter(", "SafetensorsExporter(", "compare_models(", "kld_mean\"] >"):
            assert word not in text, f"{f.name} uses {word}"

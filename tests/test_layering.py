"""The layering in one line: errors, layouts, checkpoint < kernels < formats, caches, tokenizer, sampling < models <
loading < sequence, runner < generate, train, kvpred < agents < serve < bench, cli. Imports (lazy and typing-only ones
too) only point down or sideways, and no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import edgellm

ROOT = Path(edgellm.__file__).parent
LAYERS = [
    ["edgellm.errors", "edgellm.layouts", "edgellm.checkpoint"],
    ["edgellm.kernels"],
    ["edgellm.quant.formats", "edgellm.quant.qmatmul", "edgellm.quant.linear", "edgellm.quant.gguf", "edgellm.kv",
     "edgellm.tokenizer", "edgellm.grammar", "edgellm.sampling", "edgellm.assets", "edgellm.perf"],
    ["edgellm.models"],
    ["edgellm.loader", "edgellm.quant", "edgellm.info"],
    ["edgellm.sequence", "edgellm.speculative", "edgellm.runner"],
    ["edgellm.generate", "edgellm.train", "edgellm.kvpred"],
    ["edgellm.agents"],
    ["edgellm.serve"],
    ["edgellm.bench", "edgellm.plan", "edgellm.cli", "edgellm.__main__", "edgellm"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module → the edgellm modules it imports anywhere in its source (submodules named in `from x import y` too)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgellm"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("edgellm"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def rank(module: str) -> int:
    """The layer of the longest prefix that names `module`'s place."""
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_imports_point_down():
    upward = [f"{m} (layer {rank(m)}) imports {d} (layer {rank(d)})"
              for m, deps in imports().items() for d in deps
              if rank(d) > rank(m) and not m.startswith(d + ".") and not d.startswith(m + ".")]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = imports()
    package_init = {m for m in graph if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()}

    def edges(m: str) -> set[str]:
        # a package's __init__ re-exporting its own submodules is not a cycle through them
        return {d for d in graph[m] if not (m in package_init and d.startswith(m + "."))
                and not (d in package_init and m.startswith(d + "."))}

    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in edges(node):
                if dep == start:
                    cycles.append(" -> ".join([*path, start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    assert not cycles, "\n".join(sorted(set(cycles))[:20])

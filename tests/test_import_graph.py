"""The package-level import graph of safealign_jax, read from the sources with `ast`: a unit is a
subpackage (models, convert, merge, ...) or a top-level module (lora, trained, ...); an edge is a
module-level `import` / `from ... import` of another unit (imports inside functions are deferred
and left out). The graph has no cycle, and convert/ (names, files, exports) never imports models/."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safealign_jax"


def unit(module: str) -> str | None:
    """The unit of a dotted module name in safealign_jax (None outside it or for the package root)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "safealign_jax" and len(parts) > 1 else None


def imported(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == "safealign_jax":  # from safealign_jax import lora, merge
            return [f"safealign_jax.{alias.name}" for alias in node.names]
        return [node.module]
    return []


def import_graph() -> dict[str, set[str]]:
    """{unit: units it imports at module level}."""
    edges = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for node in ast.parse(path.read_text()).body:
            for name in imported(node):
                target = unit(name)
                if target and source and target != source:
                    edges[source].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit, each sorted."""
    def reachable(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    units = set(edges) | {t for targets in edges.values() for t in targets}
    reach = {u: reachable(u) for u in units}
    return sorted({tuple(sorted({u} | {v for v in reach[u] if u in reach[v]})) for u in units if u in reach[u]})


def test_cycles_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []
    node = ast.parse("from safealign_jax import lora, merge\nfrom safealign_jax.models.load import x").body
    assert [unit(n) for stmt in node for n in imported(stmt)] == ["lora", "merge", "models"]


def test_convert_never_imports_models():
    edges = import_graph()
    assert "convert" in edges["models"]  # the name table is read by the loaders
    assert "models" not in edges["convert"]


def test_no_package_cycles():
    edges = import_graph()
    assert cycles(edges) == []
    assert "train" in edges["bench"] and "bench" not in edges["train"]  # the trainer's measures are perf/
    assert "perf" in edges["train"]

"""The package's wings import only the wings below them: no cycles, nothing from a wing above."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "advcli"
# bottom to top; the shared top-level modules come first
ORDER = ["shared", "runs", "attacks", "data", "models", "evaluation", "training", "cli"]
SHARED = {"errors", "values", "config", "threads", "runtime", "distributed"}


def layer(module: str) -> str:
    """advcli.runs.sweep -> runs; advcli.config -> shared; advcli.cli -> cli."""
    part = module.split(".")[1] if "." in module else ""
    if part in SHARED or part in ("", "__main__"):
        return "cli" if part == "__main__" else "shared"
    return part


def advcli_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("advcli"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                         or (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).is_dir())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("advcli"))
    return found


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py") if "configs" not in p.parts}


def test_no_module_imports_from_a_wing_above_its_own():
    upward = []
    for name, path in modules().items():
        mine = ORDER.index(layer(name))
        for imported in advcli_imports(path):
            if imported == "advcli":
                continue
            if ORDER.index(layer(imported)) > mine:
                upward.append(f"{name} -> {imported}")
    assert not upward, "imports from a wing above: " + ", ".join(sorted(upward))


def test_there_is_no_import_cycle_between_modules():
    graph = {name: {i for i in advcli_imports(path) if i in modules() and i != name and i != "advcli"}
             for name, path in modules().items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the code
    graph = {name: {i for i in deps if not (name.startswith(i + ".") and modules()[i].name == "__init__.py")}
             for name, deps in graph.items()}
    state, cycle = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)


@pytest.mark.parametrize("wing", ORDER[1:-1])
def test_importing_a_wing_loads_nothing_from_a_wing_above(wing):
    above = ORDER[ORDER.index(wing) + 1:]
    code = (f"import sys, advcli.{wing}\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('advcli.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if layer(m) in above]


def test_an_old_flat_module_name_says_where_the_module_went():
    with pytest.raises(ImportError, match=r"advcli\.evaluate moved to advcli\.evaluation\.evaluate"):
        import advcli.evaluate  # noqa: F401

"""No import cycles in the package: a walk of the graph of every import statement between its
modules, those inside functions included (a cycle held together by a deferred import is still a
cycle)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, tuple[Path, list[str]]]:
    """Dotted name -> (file, package parts) for fedlease/ and kernels/ (fedlease.kernels)."""
    out = {}
    for path in [*(ROOT / "fedlease").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["fedlease", *parts]
        package = parts[:-1]
        if parts[-1] == "__init__":
            parts = package = parts[:-1]
        out[".".join(parts)] = (path, package)
    return out


def bound_names(path: Path) -> set[str]:
    """Names a module binds at its top level (what ``from module import name`` can take)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, (path, package) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        deps.add(sub)
                    elif target in mods and alias.name in bound_names(mods[target][0]):
                        deps.add(target)  # a name from the package's own module
                    # else a compiled extension (fedlease._C): no Python module to cycle through
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_walk_sees_imports_of_every_kind():
    graph = import_graph()
    assert "fedlease.fl.driver" in graph["fedlease.fl.simulator"]  # from .driver import ...
    assert "fedlease.data.sources" in graph["fedlease.cli_args"]  # inside a function
    assert "fedlease.fl.types" in graph["fedlease.fl.strategies.base"]  # from ..types import
    assert "fedlease.kernels.routing" in graph["fedlease.kernels.moe_lora_fwd"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_kernels_folder_does_not_shadow_the_pypi_package_kernels():
    """Started in the checkout's root, a process sees ``kernels/`` under the name ``kernels`` first;
    that name must still mean the installed PyPI package (transformers imports it) and our kernels
    stay reachable as ``fedlease.kernels``."""
    import importlib.metadata
    import subprocess
    import sys

    probe = (
        "import kernels, fedlease.kernels.moe_lora_fwd as f;"
        "print(kernels.__file__); print(f.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1] == str(ROOT / "kernels" / "moe_lora_fwd.py")
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:
        assert not _is_ours(out[0]), out[0]
    else:  # no PyPI package: the name stays this folder's empty module, as before
        assert out[0] == str(ROOT / "kernels" / "__init__.py")


def _is_ours(origin) -> bool:
    return origin is not None and Path(origin).resolve().parent == ROOT / "kernels"

"""The import graph of ``xpconv/``: no circles, and the core never imports the shell.

The graph is read from the source (``ast``), not from ``sys.modules``, so every import
statement counts: module level, inside functions, under ``if TYPE_CHECKING``. Relative
imports are resolved; ``from pkg import name`` is an edge to the submodule ``pkg.name``
when there is one, else to ``pkg``; importing ``pkg.sub`` is an edge to ``pkg`` as well
(Python runs ``pkg/__init__.py`` first), except where ``pkg`` encloses the importer.
``importlib.import_module``/``__import__`` with a name the source spells (a string, or an
f-string starting with ``__name__``/``__package__``) count too: a name that ends in a
variable, e.g. ``f"{__name__}.{mod}"``, is an edge to every module it could be.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xpconv"

#: the core: it may import itself, backend, kernels and the private leaves (``_name``)
CORE = ("xpconv.ops", "xpconv.layers", "xpconv.optim", "xpconv.models", "xpconv.functions", "xpconv.util", "xpconv.gradient")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _edges(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported xpconv module, line) for every import statement in ``path``."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assigned: dict[str, list[ast.Assign]] = {}  # name -> its simple assignments, to follow `full = f"..."; import_module(full)`
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned.setdefault(node.targets[0].id, []).append(node)
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                targets.append(sub if sub in known else base_name)
        if isinstance(node, ast.Call):
            targets = _dynamic_targets(node, name, package, known, assigned)
        for target in targets:
            while target and target not in known:  # `import xpconv.a.b.func`-like spellings
                target = target.rpartition(".")[0]
            if not target:
                continue
            mine = set(_ancestors(name))
            for module in [*_ancestors(target), target]:
                if module in known and module != name and module not in mine:
                    found.append((module, node.lineno))
    return found


def _dynamic_targets(call: ast.Call, name: str, package: str, known: set[str], assigned: dict[str, list[ast.Assign]]) -> list[str]:
    """The xpconv modules an ``import_module(...)``/``__import__(...)`` call may import.
    A variable argument is followed to its last simple assignment above the call."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in ("import_module", "__import__") or not call.args:
        return []
    arg = call.args[0]
    for _ in range(3):
        if not isinstance(arg, ast.Name):
            break
        before = [a for a in assigned.get(arg.id, []) if a.lineno < call.lineno]
        if not before:
            break
        arg = before[-1].value
    parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
    prefix, open_ended = "", False
    for part in parts:
        value = part.value if isinstance(part, ast.FormattedValue) else part
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            prefix += value.value
        elif isinstance(value, ast.Name) and value.id in ("__name__", "__package__"):
            prefix += name if value.id == "__name__" else package
        else:
            open_ended = True
            break
    if prefix.startswith("."):  # relative to the package= argument, as the importer's package
        dots = len(prefix) - len(prefix.lstrip("."))
        base = package.split(".")
        prefix = ".".join(base[: len(base) - (dots - 1)]) + "." + prefix[dots:]
    if not open_ended:
        return [prefix]
    if not prefix.startswith("xpconv."):  # a variable name (backend imports array libraries so): not ours to follow
        return []
    return sorted(m for m in known if m.startswith(prefix) and m != name)


def _graph() -> dict[str, dict[str, list[int]]]:
    """module -> {imported module -> [lines]}."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for name, path in modules.items():
        for target, line in _edges(name, path, known):
            graph[name].setdefault(target, []).append(line)
    return graph


def _strongly_connected(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def _shortest_cycle(graph: dict[str, dict[str, list[int]]], component: list[str]) -> list[str]:
    """One shortest circle through the component's first module (breadth-first)."""
    start = component[0]
    inside = set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in inside:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start]


def _describe(graph: dict[str, dict[str, list[int]]], cycle: list[str]) -> str:
    modules = _modules()
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        where = f"{modules[a].relative_to(PACKAGE.parent)}:{','.join(map(str, graph[a][b]))}"
        steps.append(f"{a} -> {b} ({where})")
    return "\n    ".join(steps)


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    """The reader itself: a circle made only of a function-level relative import is found,
    and its file and line are named."""
    global PACKAGE
    saved = PACKAGE
    PACKAGE = tmp_path / "xpconv"
    try:
        (PACKAGE / "sub").mkdir(parents=True)
        (PACKAGE / "__init__.py").write_text("from . import a\n")
        (PACKAGE / "a.py").write_text("from .sub import b\n")
        (PACKAGE / "sub" / "__init__.py").write_text("")
        (PACKAGE / "sub" / "b.py").write_text("import os\n\n\ndef f():\n    from .. import a\n    return a, os\n")
        (PACKAGE / "c.py").write_text("import xpconv.sub.b\nfrom xpconv.a import thing\n")
        (PACKAGE / "sub" / "d.py").write_text(
            "import importlib\n\n\ndef g(m):\n    full = f'{__package__}.{m}'\n    return importlib.import_module(full)\n"
        )
        (PACKAGE / "e.py").write_text("import importlib\nimportlib.import_module('xpconv.c')\nimportlib.import_module('.a', __package__)\n")
        graph = _graph()
        assert graph["xpconv.a"] == {"xpconv.sub.b": [1], "xpconv.sub": [1]}
        assert graph["xpconv.sub.b"] == {"xpconv.a": [5]}
        assert graph["xpconv.c"] == {"xpconv.sub.b": [1], "xpconv.sub": [1], "xpconv.a": [2]}
        assert graph["xpconv"] == {"xpconv.a": [1]}
        assert graph["xpconv.sub.d"] == {"xpconv.sub.b": [6]}  # every module f"{__package__}.{m}" may be
        assert graph["xpconv.e"] == {"xpconv.c": [2], "xpconv.a": [3]}
        components = _strongly_connected(graph)
        assert components == [["xpconv.a", "xpconv.sub.b"]]
        text = _describe(graph, _shortest_cycle(graph, components[0]))
        assert text == "xpconv.a -> xpconv.sub.b (xpconv/a.py:1)\n    xpconv.sub.b -> xpconv.a (xpconv/sub/b.py:5)"
    finally:
        PACKAGE = saved


def test_no_import_circles():
    graph = _graph()
    assert "xpconv.ops" in graph and "xpconv.models" in graph  # the reader found the package
    components = _strongly_connected(graph)
    report = "\n".join(f"circle among {', '.join(c)}:\n    {_describe(graph, _shortest_cycle(graph, c))}" for c in components)
    if report:
        print(report)
    assert not components, f"{len(components)} import circle(s) in xpconv/:\n{report}"


def test_the_core_never_imports_the_shell():
    graph = _graph()

    def allowed(module: str) -> bool:
        last = module.rpartition(".")[2]
        return (
            module in CORE
            or module in ("xpconv", "xpconv.backend", "xpconv.bookpickle")  # bookpickle: a leaf, like _fileformat
            or module == "xpconv.kernels"
            or module.startswith("xpconv.kernels.")
            or last.startswith("_")
        )

    bad = [
        f"{core} -> {target} (line {', '.join(map(str, lines))})"
        for core in CORE
        for target, lines in sorted(graph[core].items())
        if not allowed(target)
    ]
    assert not bad, "the core imports the shell: " + "; ".join(bad)


def _outside_imports(path: Path, outside: str) -> list[int]:
    """Lines of ``path`` that import ``outside`` or a submodule of it: ``import``, ``from ...
    import`` and ``import_module``/``__import__`` calls whose name the source spells."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
                first = parts[0] if parts else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names = [first.value]
        if any(n == outside or n.startswith(outside + ".") for n in names):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_outside_import_reader_sees_every_spelling(tmp_path):
    source = (
        "import os\nimport benchmarks\nfrom benchmarks.harness import run\nimport benchmarks_other\n\n\n"
        "def f():\n    import benchmarks.__main__ as m\n    return importlib.import_module('benchmarks.__main__'), __import__(f'benchmarks.{m}')\n"
    )
    (tmp_path / "m.py").write_text(source)
    assert _outside_imports(tmp_path / "m.py", "benchmarks") == [2, 3, 8, 9, 9]


def test_the_package_never_imports_the_benchmarks():
    """benchmarks/ is a checkout's harness, not part of the installed package (it is run as
    ``python -m benchmarks``): nothing in xpconv/ may import it, which would also close a
    circle, since the harness imports xpconv."""
    modules = _modules()
    assert "xpconv.cli" in modules
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in modules.values() for line in _outside_imports(path, "benchmarks")]
    assert not bad, "xpconv/ imports benchmarks/: " + ", ".join(bad)

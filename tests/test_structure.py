"""The code stays readable as it grows: no module imports a module that imports it back (late imports included),
no function over 80 lines, no nested function over 15, a module docstring in every file, a docstring on every
public function of the training code."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tunesmith"


def _modules() -> dict:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).replace(".__init__", "")
        out[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


def _imports(tree, modules) -> set:
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunesmith"):
            deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("tunesmith")}
    return {d for d in deps if d in modules and d != "tunesmith"}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(tree, modules) - {m} for m, (_, tree) in modules.items()}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_functions_stay_short():
    long = []
    for name, (_, tree) in _modules().items():
        def walk(node, outer):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = child.end_lineno - child.lineno + 1
                    if n > (15 if outer else 80):
                        long.append(f"{name}.{child.name}: {n} lines" + (f" (nested in {outer})" if outer else ""))
                    walk(child, child.name)
                else:
                    walk(child, outer)
        walk(tree, None)
    assert not long, long


def test_docstrings():
    missing = []
    for name, (path, tree) in _modules().items():
        if not ast.get_docstring(tree) and path.stat().st_size > 0:
            missing.append(f"{name} (module)")
        if not name.startswith("tunesmith.train"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_") \
                    and node.name not in ("forward", "backward") and not ast.get_docstring(node):
                missing.append(f"{name}.{node.name}")
    assert not missing, missing

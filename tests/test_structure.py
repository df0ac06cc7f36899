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


# The layers, lowest first. A package may import its own modules and those of the packages listed for it; nothing
# else. `tunesmith.testing` (tiny in-process models) is for tests, bench and the demo only.
BASE = {"tunesmith.errors", "tunesmith.log", "tunesmith.files"}
LAYERS = {
    "tunesmith.errors": BASE, "tunesmith.log": BASE, "tunesmith.files": BASE,  # import nothing else of tunesmith
    "tunesmith.config": {"tunesmith.errors"},
    "tunesmith.data": BASE | {"tunesmith.config"},
    "tunesmith.models": BASE | {"tunesmith.config", "tunesmith.data"},
    "tunesmith.runs": BASE | {"tunesmith.config"},
    "tunesmith.inference": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.runs"},
    "tunesmith.serve": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.inference"},
    "tunesmith.eval": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.inference",
                              "tunesmith.runs"},
    "tunesmith.train": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.inference",
                               "tunesmith.runs"},
    "tunesmith.export": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.runs"},
    # the browser pages: they start training as `tunesmith` processes, never by importing train/ or commands/
    "tunesmith.webui": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.runs",
                               "tunesmith.inference", "tunesmith.serve", "tunesmith.eval"},
    "tunesmith.commands": BASE | {"tunesmith.config", "tunesmith.data", "tunesmith.models", "tunesmith.inference",
                                  "tunesmith.runs", "tunesmith.serve", "tunesmith.eval", "tunesmith.train",
                                  "tunesmith.export", "tunesmith.webui"},
    "tunesmith.cli": BASE | {"tunesmith.config", "tunesmith.commands"},
}
TOP = {"tunesmith", "tunesmith.__main__", "tunesmith.testing"}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layering_violations(modules: dict) -> list[str]:
    """Every import (late ones included) that runs against LAYERS, as 'importer -> imported' lines."""
    bad = []
    for name, (_, tree) in modules.items():
        pkg = _package(name)
        for dep in _imports(tree, modules):
            dep_pkg = _package(dep)
            if dep_pkg == pkg or dep_pkg == "tunesmith":
                continue
            if dep == "tunesmith.testing" or dep_pkg == "tunesmith.testing":
                bad.append(f"{name} -> {dep} (the tiny-model helpers are for tests, bench and the demo)")
            elif dep_pkg == "tunesmith.commands" and name != "tunesmith.cli":
                bad.append(f"{name} -> {dep} (command modules are imported only by the CLI)")
            elif pkg in LAYERS and dep_pkg not in LAYERS[pkg]:
                bad.append(f"{name} -> {dep} ({pkg} may import only {sorted(LAYERS[pkg])})")
    return sorted(bad)


def test_layers_only_import_downwards():
    modules = _modules()
    assert set(_package(m) for m in modules) <= set(LAYERS) | TOP, "a new package needs its place in LAYERS"
    assert not layering_violations(modules), "\n".join(layering_violations(modules))


def test_layering_check_catches_an_arrow_back_up():
    """The check itself: a deliberate upward import (inference importing training, config importing data, a
    library module importing a command) is reported."""
    modules = _modules()
    for importer, imported in (("tunesmith.inference.engine", "tunesmith.train.ops.token_logps"),
                               ("tunesmith.config.parser", "tunesmith.data.load"),
                               ("tunesmith.serve.app", "tunesmith.commands.infer"),
                               ("tunesmith.data.load", "tunesmith.testing")):
        path, tree = modules[importer]
        bad_tree = ast.parse(f"from {imported} import x\n" + ast.unparse(tree))
        found = layering_violations({**modules, importer: (path, bad_tree)})
        assert any(line.startswith(f"{importer} -> {imported}") for line in found), (importer, imported, found)


def test_the_training_loop_reads_as_one_story():
    """From the recipe (`tunesmith sft|rlhf` → train/recipe.py's `main`) to `optimizer.step()` is at most 3 frames,
    all in recipe.py and loop.py (today: recipe.main → loop.train, which owns the epoch/step loop and the log, eval
    and save cadence → loop.train_step → optimizer.step()); and loop.py stays under 450 lines (checkpoints,
    signals and disk errors, the optimiser and the data order live in their own files)."""
    funcs = {}  # "recipe.main" -> its ast.FunctionDef (module-level functions of the two files)
    for mod in ("recipe", "loop"):
        for node in ast.parse((PACKAGE / "train" / f"{mod}.py").read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef):
                funcs[f"{mod}.{node.name}"] = node

    def callees(name: str) -> set:
        """The functions of recipe.py and loop.py that `name` calls: f(...) in its own module, or loop.f(...)."""
        mod, out = name.split(".")[0], set()
        for call in (c for c in ast.walk(funcs[name]) if isinstance(c, ast.Call)):
            f = call.func
            target = f"{mod}.{f.id}" if isinstance(f, ast.Name) else \
                f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            if target in funcs:
                out.add(target)
        return out

    def steps_the_optimizer(name: str) -> bool:
        """Whether `name` itself calls `<...>optimizer.step()`."""
        return any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "step"
                   and ast.unparse(c.func.value).split(".")[-1] == "optimizer" for c in ast.walk(funcs[name]))

    paths, found = [["recipe.main"]], None
    while paths and found is None:  # breadth first: the shortest chain of calls
        found = next((p for p in paths if steps_the_optimizer(p[-1])), None)
        paths = [p + [c] for p in paths for c in sorted(callees(p[-1])) if c not in p]
    assert found is not None, "recipe.main never reaches optimizer.step() through recipe.py and loop.py"
    frames = found[1:] + ["optimizer.step"]  # the frames below the recipe
    assert len(frames) <= 3, " → ".join(found + ["optimizer.step()"])
    lines = len((PACKAGE / "train" / "loop.py").read_text(encoding="utf-8").splitlines())
    assert lines < 450, f"train/loop.py has {lines} lines"


def test_no_deprecated_library_names_in_our_calls():
    """transformers 5.25 deprecates `past_key_values=` (→ `cache=`, removed in 5.40) and `is_gradient_checkpointing`
    (→ `is_activation_checkpointing`): our code must not use them (the engine picks the keyword the model's forward
    takes, so older transformers keep working)."""
    found = []
    for name, (path, _) in _modules().items():
        text = path.read_text(encoding="utf-8")
        for deprecated in ("past_key_values=", ".is_gradient_checkpointing"):
            if deprecated in text:
                found.append(f"{name}: {deprecated}")
    assert not found, found


def test_commands_arguments_are_read_as_typed_fields():
    """Outside config/, a command's parsed arguments are read as fields (or through config.slices: `take`, a typed
    slice; `flag_values`, a name → value map), never probed with getattr(args, ...) — model loading, the engines
    and the trackers take typed slices, so a missing field is an error an IDE or a test sees."""
    found = []
    for name, (path, _) in _modules().items():
        if name.startswith("tunesmith.config"):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "getattr(args" in line:
                found.append(f"{name}:{i}")
    assert not found, found

"""ms-swift reward plugin files (`--external_plugins plugin.py`) run as ms-swift runs them, with or without ms-swift.

A plugin registers its reward classes as `orms['name'] = Cls` after `from swift.plugin import ORM, orms` (ms-swift
3.x) or `from swift.rewards import ORM, orms` (4.x). When ms-swift is not installed, those modules are stood in for
while the file runs, offering the registry and base classes of `tunesmith.train.rl.rewards` (`exports`); when it
is, ms-swift's own registries are read after the file ran. A failing plugin is a ConfigError naming its file and
line. No torch import.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import traceback
import types

from tunesmith.errors import ConfigError


@contextlib.contextmanager
def _swift_stand_in(exports: dict):
    """While a plugin runs, and only when ms-swift is not installed, make `swift.plugin` and `swift.rewards`
    importable with our ORM, AsyncORM and orms (`exports`: those names -> our objects). Why: plugins written for
    ms-swift begin with `from swift.plugin import ORM, orms` (3.x) or `from swift.rewards import ORM, orms` (4.x) and
    need nothing else from it, so they run unchanged. Why only then: an installed ms-swift must win — the plugin may
    use more of it, and shadowing it would break it for the rest of the process. Why only while loading: so that
    nothing later mistakes the stand-in for ms-swift (importlib.util.find_spec("swift") and friends stay
    truthful)."""
    if importlib.util.find_spec("swift") is not None:
        yield
        return
    root = types.ModuleType("swift", "tunesmith's stand-in for ms-swift while loading a reward plugin")
    root.__path__ = []
    root.__spec__ = importlib.machinery.ModuleSpec("swift", None, is_package=True)
    stand_ins = {"swift": root}
    # the registry's homes in 3.x (swift.plugin, swift.plugin.orm) and 4.x (swift.rewards, swift.rewards.orm)
    for sub in ("plugin", "rewards", "plugin.orm", "rewards.orm"):
        module = types.ModuleType(f"swift.{sub}")
        for name, value in exports.items():
            setattr(module, name, value)
        if "." not in sub:
            module.__path__ = []
            setattr(root, sub, module)
        else:
            setattr(stand_ins[f"swift.{sub.split('.')[0]}"], "orm", module)
        stand_ins[f"swift.{sub}"] = module
    utils = types.ModuleType("swift.utils")  # plugins' usual logger: `from swift.utils import get_logger`
    utils.get_logger = lambda *a, **k: logging.getLogger("tunesmith.plugin")
    root.utils = utils
    stand_ins["swift.utils"] = utils
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for key, module in stand_ins.items():
            if sys.modules.get(key) is module:
                del sys.modules[key]


def _swift_orms() -> dict:
    """ms-swift's own registries (4.x swift.rewards.orms, 3.x swift.plugin.orms), when ms-swift is installed."""
    found = {}
    if importlib.util.find_spec("swift") is None:
        return found
    for module_name in ("swift.plugin", "swift.rewards"):
        try:
            found[module_name] = importlib.import_module(module_name).orms
        except Exception:  # noqa: BLE001 — that ms-swift version has no such module
            continue
    return found


def _plugin_failure(path: str, e: BaseException) -> ConfigError:
    """A ConfigError naming the plugin file, the line and what went wrong."""
    if isinstance(e, SyntaxError):
        return ConfigError(f"{path}:{e.lineno}: syntax error in reward plugin: {e.msg}")
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    where = f"{path}:{lines[-1]}" if lines else path
    if isinstance(e, ImportError) and (e.name or "").split(".")[0] == "swift":
        if importlib.util.find_spec("swift") is None:
            return ConfigError(f"{where}: the reward plugin imports from ms-swift something tunesmith does not "
                               f"provide ({e}); without ms-swift installed only ORM, AsyncORM and orms from "
                               f"swift.plugin / swift.rewards (and their .orm modules) and swift.utils.get_logger "
                               f"are available")
        if e.name == "swift.plugin":
            return ConfigError(f"{where}: the installed ms-swift (4.x) has no swift.plugin; write "
                               f"`from swift.rewards import ORM, orms` (ms-swift 3.x plugins need this change "
                               f"for ms-swift 4 too), or uninstall ms-swift")
    return ConfigError(f"{where}: reward plugin failed: {type(e).__name__}: {e}")


_loaded_plugins: dict = {}  # path → what it registered in ms-swift's registries (a file runs once per process)


def run_plugin(path: str, exports: dict) -> dict:
    """Execute one plugin file as a module (as ms-swift's import_external_file, utils/utils.py:409-429: its
    folder goes on sys.path so it can import files next to it; a file already loaded is not run again).

    path: absolute. exports: what the stand-in `swift.plugin`/`swift.rewards` offer without ms-swift ({"ORM",
    "AsyncORM", "orms"}: tunesmith's base classes and registry). Returns the entries it added to or replaced in
    ms-swift's registries when ms-swift is installed (what it registers in ours lands in exports["orms"] directly).
    Raises ConfigError: the file is missing, does not parse, or fails (naming the line)."""
    if path in _loaded_plugins:
        return _loaded_plugins[path]
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: reward plugin file not found (--external_plugins)")
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))
    before = {name: dict(reg) for name, reg in _swift_orms().items()}
    module_name = "_tunesmith_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _swift_stand_in(exports):
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 — any failure inside the user's file becomes one clear message
        sys.modules.pop(module_name, None)
        raise _plugin_failure(path, e) from e
    added = {}
    for name, reg in _swift_orms().items():
        old = before.get(name, {})
        added.update({k: v for k, v in reg.items() if old.get(k) is not v})
    _loaded_plugins[path] = added
    return added

"""ms-swift plugin files (`--external_plugins plugin.py`) run as ms-swift runs them, with or without ms-swift.

A plugin registers its reward classes as `orms['name'] = Cls` after `from swift.plugin import ORM, orms` (ms-swift
3.x) or `from swift.rewards import ORM, orms` (4.x), its multi-turn schedulers as `multi_turns['name'] = Cls`
after `from swift.plugin.multi_turn import MultiTurnScheduler, multi_turns` (3.x) or `from swift.rollout import
MultiTurnScheduler, multi_turns` (4.x), and its reward-model plugins as `rm_plugins['name'] = Cls` (rm_plugins.py).
When ms-swift is not installed, those modules are stood in for while the file runs, offering tunesmith's registries
and base classes: the reward side's (`exports`, from `tunesmith.train.rl.rewards`) and what other modules `provide`
(the multi-turn side, `tunesmith.train.rl.schedulers`; the reward-model side, `tunesmith.train.rl.rm_plugins`); when
it is, ms-swift's own registries are read after the file ran. A failing plugin is a ConfigError naming its file
and line. No torch import.
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


# module name -> {name: object}: what other modules offer plugins through the stand-in `swift` (`provide`)
_PROVIDED: dict = {}


def provide(module: str, **names) -> None:
    """Offer `names` to plugins as `swift.<module>` while they load without ms-swift installed (e.g. provide(
    "rollout", MultiTurnScheduler=...) makes `from swift.rollout import MultiTurnScheduler` work). Repeated calls
    add to the module."""
    _PROVIDED.setdefault(module, {}).update(names)


def _stand_in_module(root, stand_ins: dict, sub: str, names: dict) -> None:
    """Create swift.<sub> (and its parents) in stand_ins holding `names`."""
    parent, name = root, "swift"
    for part in sub.split("."):
        name = f"{name}.{part}"
        module = stand_ins.get(name)
        if module is None:
            module = types.ModuleType(name)
            module.__path__ = []
            setattr(parent, part, module)
            stand_ins[name] = module
        parent = module
    for key, value in names.items():
        setattr(parent, key, value)


@contextlib.contextmanager
def _swift_stand_in(exports: dict):
    """While a plugin runs, and only when ms-swift is not installed, make `swift.plugin` and `swift.rewards`
    importable with our ORM, AsyncORM and orms (`exports`: those names -> our objects), and the modules other parts
    `provide` (the multi-turn schedulers' swift.rollout, swift.plugin.multi_turn, ...). Why: plugins written for
    ms-swift begin with `from swift.plugin import ORM, orms` (3.x) or `from swift.rewards import ORM, orms` (4.x) and
    need nothing else from it, so they run unchanged. Why only then: an installed ms-swift must win — the plugin may
    use more of it, and shadowing it would break it for the rest of the process. Why only while loading: so that
    nothing later mistakes the stand-in for ms-swift (importlib.util.find_spec("swift") and friends stay
    truthful)."""
    if importlib.util.find_spec("swift") is not None:
        yield
        return
    root = types.ModuleType("swift", "tunesmith's stand-in for ms-swift while loading a plugin")
    root.__path__ = []
    root.__spec__ = importlib.machinery.ModuleSpec("swift", None, is_package=True)
    stand_ins = {"swift": root}
    for sub, names in _PROVIDED.items():
        _stand_in_module(root, stand_ins, sub, names)
    # the registry's homes in 3.x (swift.plugin, swift.plugin.orm) and 4.x (swift.rewards, swift.rewards.orm); the
    # caller's exports win over what was provided
    for sub in ("plugin", "rewards", "plugin.orm", "rewards.orm"):
        _stand_in_module(root, stand_ins, sub, exports)
    # plugins' usual logger: `from swift.utils import get_logger`
    _stand_in_module(root, stand_ins, "utils", {"get_logger": lambda *a, **k: logging.getLogger("tunesmith.plugin")})
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for key, module in stand_ins.items():
            if sys.modules.get(key) is module:
                del sys.modules[key]


def stand_in():
    """The stand-in `swift` modules (what `provide` offers: the reward registry's homes once
    tunesmith.train.rl.rewards is imported, the multi-turn ones) as a context manager: for code of a plugin that
    imports ms-swift after the file loaded, e.g. in a scheduler's constructor. Does nothing when ms-swift is
    installed."""
    return _swift_stand_in({})


# ms-swift's registries plugin files add to -> their homes (3.x, 4.x)
_REGISTRIES = {"orms": ("swift.plugin", "swift.rewards"), "multi_turns": ("swift.plugin", "swift.rollout"),
               "rm_plugins": ("swift.plugin", "swift.rewards")}


def _swift_orms(registry: str = "orms") -> dict:
    """ms-swift's own registries, when ms-swift is installed: `orms` or `rm_plugins` (4.x swift.rewards, 3.x
    swift.plugin), or `multi_turns` (4.x swift.rollout, 3.x swift.plugin)."""
    found = {}
    if importlib.util.find_spec("swift") is None:
        return found
    homes = _REGISTRIES[registry]
    for module_name in homes:
        try:
            found[module_name] = getattr(importlib.import_module(module_name), registry)
        except Exception:  # noqa: BLE001 — that ms-swift version has no such module
            continue
    return found


def _plugin_failure(path: str, e: BaseException) -> ConfigError:
    """A ConfigError naming the plugin file, the line and what went wrong."""
    if isinstance(e, SyntaxError):
        return ConfigError(f"{path}:{e.lineno}: syntax error in plugin: {e.msg}")
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    where = f"{path}:{lines[-1]}" if lines else path
    if isinstance(e, ImportError) and (e.name or "").split(".")[0] == "swift":
        if importlib.util.find_spec("swift") is None:
            return _not_provided(where, e)
        if e.name == "swift.plugin":
            return ConfigError(f"{where}: the installed ms-swift (4.x) has no swift.plugin; write "
                               f"`from swift.rewards import ORM, orms` (ms-swift 3.x plugins need this change "
                               f"for ms-swift 4 too), or uninstall ms-swift")
    return ConfigError(f"{where}: plugin failed: {type(e).__name__}: {e}")


def _not_provided(where: str, e: ImportError) -> ConfigError:
    """What an ImportError of a name (or module) of ms-swift that the stand-in lacks says, in one short line: the
    name, the nearest ones it offers, how many it offers and where they are documented."""
    import difflib
    import re

    match = re.search(r"cannot import name '([^']+)'", str(e))
    offered = sorted({n for names in _PROVIDED.values() for n in names} | {"ORM", "AsyncORM", "orms", "get_logger"})
    if match:
        what, near = f"{match.group(1)} from {e.name}", difflib.get_close_matches(match.group(1), offered, n=3)
    else:
        homes = sorted({"swift.utils"} | {f"swift.{sub}" for sub in _PROVIDED})
        what, near = f"the module {e.name}", difflib.get_close_matches(e.name or "", homes, n=3)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return ConfigError(f"{where}: the plugin imports {what}, which tunesmith does not provide without ms-swift "
                       f"installed{hint}; it provides {len(offered)} of ms-swift's names (the ones reward, "
                       f"multi-turn and reward-model plugins use: docs/grpo.md); install ms-swift for the rest")


_loaded_plugins: dict = {}  # path → what it registered in ms-swift's registries (a file runs once per process)
_loaded_registries: dict = {}  # (path, registry) → what it registered in ms-swift's multi_turns / rm_plugins


def plugin_schedulers(path: str) -> dict:
    """The multi-turn schedulers the plugin at `path` (absolute, already run) registered in an installed
    ms-swift's `multi_turns` ({} without ms-swift: they land in tunesmith's registry directly)."""
    return plugin_registered(path, "multi_turns")


def plugin_registered(path: str, registry: str) -> dict:
    """What the plugin at `path` (absolute, already run) registered in an installed ms-swift's `registry`
    ("multi_turns" or "rm_plugins"; {} without ms-swift: it lands in tunesmith's registry directly)."""
    return _loaded_registries.get((path, registry), {})


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
    others = ("multi_turns", "rm_plugins")
    before_others = {r: {name: dict(reg) for name, reg in _swift_orms(r).items()} for r in others}
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
    for r in others:
        _loaded_registries[(path, r)] = {k: v for name, reg in _swift_orms(r).items() for k, v in reg.items()
                                         if before_others[r].get(name, {}).get(k) is not v}
    return added

"""What every page of `tunesmith web-ui` shares: the folders, the commands' own one-message flag check, the words in
the page's language, the chat engine; and `validate`, the one path from a built command line to the message shown
inline under a form (the CLI's own text, or the page's folder rule)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from tunesmith.webui.builder import Built
from tunesmith.webui.chat import ChatSession
from tunesmith.webui.paths import Folders, is_local, path_problems, within

Check = Callable[[str, list], Optional[str]]  # (command, flags) -> the CLI's error text, or None when the flags pass


@dataclass(frozen=True)
class Context:
    """folders: the output and allowed folders; check: the commands' own flag check (tunesmith.commands.web_ui:
    check_command); words: labels.labels(lang); chat: the Chat page's engine; max_upload_mb: the upload limit;
    cwd: the folder commands run from (relative paths in forms are relative to it)."""
    folders: Folders
    check: Check
    words: dict
    chat: ChatSession
    max_upload_mb: int = 100
    cwd: str = "."


def _system_file_problem(argv: list, folders: Folders) -> list[str]:
    """--system naming a .txt file outside the readable folders (the parser reads it at once)."""
    out = []
    for i, a in enumerate(argv[:-1]):
        if a == "--system" and re.search(r"\.txt$", argv[i + 1]) and is_local(argv[i + 1]) and \
                not within(argv[i + 1], folders.readable):
            out.append(f"--system {argv[i + 1]}: outside the folders this page may read "
                       f"({', '.join(folders.readable)})")
    return out


def validate(ctx: Context, built: Built) -> Optional[str]:
    """Why `built` must not run, as the message shown under the form, or None when it may run: the form's own
    problems, then the folder rule (the page's: a local path outside the folders given at start), then the
    command's own check — `tunesmith <command>`'s one-message text, exactly as the CLI prints it."""
    from tunesmith.config.parser import ArgError, parse_args, problems_message
    from tunesmith.config.slices import flag_values

    command, flags = built.command, built.argv[1:]
    if built.problems:
        return f"tunesmith {command}: error: {problems_message(built.problems)}"
    problems = _system_file_problem(flags, ctx.folders)
    if not problems:
        try:
            args = parse_args(command, flags, defer_problems=True)
        except ArgError as e:
            return f"tunesmith {command}: error: {e}"
        problems = path_problems(flag_values(args), ctx.folders)
    if problems:
        return f"tunesmith web-ui: {problems_message(problems)}"
    return ctx.check(command, flags)


def relative(path: str, cwd: str) -> str:
    """A path as short as it is unambiguous: relative to cwd when inside it."""
    try:
        rel = os.path.relpath(path, cwd)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel

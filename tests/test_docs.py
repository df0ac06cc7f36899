"""The README and docs/ stay true: every relative link resolves (anchors included), every `tunesmith <command>
--flag` in a ```bash block names a command and flags the parser knows, and the blocks marked runnable
(`<!-- runnable -->` on the line before the ```bash fence) run as written from the repository root on a tiny model."""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tunesmith.cli import COMMANDS
from tunesmith.config.parser import ArgError, deferred_problems, parse_args

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
RUNNABLE = "<!-- runnable -->"


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(REPO))


def bash_blocks(path: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(line number, text, marked runnable) of every ```bash block of a page."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != "bash":
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), before == RUNNABLE))
    return out


# ---------------------------------------------------------------- (a) links

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def _links(path: pathlib.Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "code", text)  # a [x](y) inside a code span is no link
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


def test_no_merge_conflict_markers_are_left():
    """No tracked text file (source, tests, docs, examples) holds a git conflict marker left by a merge: one once
    broke docs/grpo.md's flag table."""
    out = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.json", "*.sh", "*.jinja"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    bad = [f for f in out.stdout.split() if (REPO / f).is_file()
           and marker.search((REPO / f).read_text(encoding="utf-8", errors="replace"))]
    assert not bad, bad


def test_pages_exist():
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {"README.md", "datasets.md", "training.md", "distributed.md", "preference.md", "grpo.md", "serving.md",
            "export.md", "eval.md", "compatibility.md", "benchmarks.md", "architecture.md"} <= names, names
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    """Every link to a file of the repository (and, within Markdown pages, to a heading) resolves."""
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(page)}:\n  " + "\n  ".join(broken)


# ---------------------------------------------------------------- (b) commands and flags

def _strip_comment(line: str) -> str:
    """The line without its shell comment: a '#' at the start of a word, outside quotes (bash keeps `a.jsonl#500`)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def tunesmith_calls(block: str) -> list[list[str]]:
    """Each `tunesmith ...` invocation of a bash block as its argument list after `tunesmith` (comments dropped,
    continuation lines joined, stopped at the first shell operator; `...`/`…` placeholders left out)."""
    text = "\n".join(_strip_comment(line) for line in block.splitlines()).replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens = list(lexer)
        for k, tok in enumerate(tokens):
            if tok != "tunesmith":
                continue
            args = []
            rest = tokens[k + 1:]
            for j, t in enumerate(rest):
                if t and set(t) <= set(";&|<>()"):
                    break
                if t.isdigit() and j + 1 < len(rest) and rest[j + 1][:1] in "<>":  # the 2 of 2>&1
                    break
                if t not in ("...", "…"):
                    args.append(t)
            calls.append(args)
    return calls


def _parse(argv: list[str]) -> str | None:
    """What is wrong with one `tunesmith` argument list, as the CLI would parse it (None: nothing)."""
    if not argv or argv[0].startswith("-"):  # `tunesmith --help`, `--version`
        return None
    command = {"merge_lora": "merge-lora"}.get(argv[0].replace("_", "-"), argv[0].replace("_", "-"))
    if command not in COMMANDS:
        return f"unknown command {argv[0]!r}"
    rest = argv[1:]
    if "-h" in rest or "--help" in rest:
        return None
    if command == "report":  # run directories are positional, as in cli.main
        k = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
        rest = ["--runs", *rest[:k], *rest[k:]] if k else rest
    if command == "merge-lora":
        command, rest = "export", ["--merge_lora", "true", *rest]
    # a config file named positionally is not read here: the page's flags are what is checked
    rest = [a for a in rest if not a.lower().endswith((".yaml", ".yml"))]
    try:
        args = parse_args(command, rest, defer_problems=True)
    except ArgError as e:
        return str(e)
    problems = deferred_problems(args)
    return "; ".join(problems) if problems else None


def test_command_extraction():
    block = ('# comment tunesmith sft --nope\nNPROC_PER_NODE=2 tunesmith sft --dataset a.jsonl#5 \\\n'
             '    --lora_rank 8 ...  # note\ntunesmith infer --adapters x 2>&1 | grep y\n')
    assert tunesmith_calls(block) == [["sft", "--dataset", "a.jsonl#5", "--lora_rank", "8"],
                                      ["infer", "--adapters", "x"]]
    assert _parse(["sft", "--lora_rnak", "8"]) and _parse(["nosuch"]) and not _parse(["sft", "--lora_rank", "8"])


def test_documented_commands_use_known_flags():
    """Every `tunesmith <command> --flag ...` in a ```bash block of the README or docs/ parses: the command exists,
    every flag is one the parser knows, and every value has the flag's type and is among its choices."""
    bad, seen = [], 0
    for page in PAGES:
        for line, block, _ in bash_blocks(page):
            for argv in tunesmith_calls(block):
                seen += 1
                problem = _parse(argv)
                if problem:
                    bad.append(f"{_rel(page)}:{line}: tunesmith {' '.join(argv)}\n    -> {problem}")
    assert seen >= 30, f"only {seen} tunesmith commands found in the docs' bash blocks: is the extraction broken?"
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- (c) runnable blocks

RUNNABLE_BLOCKS = [(page, line, block) for page in PAGES for line, block, marked in bash_blocks(page) if marked]


def test_runnable_blocks_are_marked():
    """The demo and each page's tiny-model block are marked runnable, and the README's set-up commands are not
    (they install packages)."""
    where = {(_rel(p), b.strip().splitlines()[0]) for p, _, b in RUNNABLE_BLOCKS}
    assert ("README.md", "bash examples/demo.sh") in where
    assert len(RUNNABLE_BLOCKS) >= 8, where
    assert not any("pip install" in b for _, _, b in RUNNABLE_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("page,line,block", RUNNABLE_BLOCKS, ids=[f"{_rel(p)}:{n}" for p, n, _ in RUNNABLE_BLOCKS])
def test_runnable_block(page, line, block, tmp_path):
    """The block, run by bash with -euo pipefail in a fresh folder that sees the repository's examples/ (as from
    the repository root), with this interpreter's `tunesmith` and `python` and nothing from the network."""
    (tmp_path / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OUT": str(tmp_path / "demo_output")})
    env.pop("NPROC_PER_NODE", None)
    env.pop("NNODES", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (f"{_rel(page)}:{line} failed (exit {proc.returncode}):\n{block}\n"
                                  f"--- stdout (end)\n{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}")


def test_architecture_names_real_files_and_functions():
    """docs/architecture.md's call paths name frames as `package/module.function` (or `module.py`): each must exist
    in the code, so the page cannot drift from it after a move."""
    import ast
    import re

    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    pkg = REPO / "tunesmith"
    missing = []
    hypothetical = ("xpo", "embedding")  # the worked examples of a new method and a new endpoint
    for path in set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+)\.py", text)):
        if any(h in path for h in hypothetical):
            continue
        if not (pkg / f"{path}.py").exists() and not (REPO / f"{path}.py").exists():
            missing.append(f"{path}.py")
    for path, name in set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+)\.([A-Za-z_]\w*)", text)):
        file = pkg / f"{path}.py"
        if name == "py" or not file.exists():
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        if name not in defined:
            missing.append(f"{path}.{name}")
    assert not missing, f"docs/architecture.md names what the code does not have: {sorted(missing)}"

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "data")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models for each family, built once per test session (a few seconds)."""
    from tunesmith.testing import build_model

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family="qwen2", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_model(str(root / f"{family}-{len(cache)}"), family, **kw)
        return cache[key]

    return get


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

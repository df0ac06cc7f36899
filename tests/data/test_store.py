"""Encoded rows live in Arrow (tunesmith.data.store): the same rows as the encoder gives, read on access; a second run
with --load_from_cache_file true reuses them without loading or encoding; anything the encoding depends on changes
the cache key."""
import json
import os

import pytest

from conftest import EXAMPLES, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.data.encode import ChatEncoder
from tunesmith.data.formats import normalise_row
from tunesmith.errors import DataError


@pytest.fixture
def tok(tiny_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_models("qwen2"))


def _chat(i):
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": "answer " * (i % 5 + 1)}]}


@pytest.mark.parametrize("kind", ["sft", "preference", "kto"])
def test_rows_read_back_equal_the_encoder(tok, tmp_path, kind):
    from tunesmith.data.store import encode_rows

    rows = [normalise_row({"prompt": f"q{i}", "chosen": "yes " * (i + 1), "rejected": "no"}) for i in range(7)]
    if kind == "kto":
        rows = [{"messages": r["messages"], "label": i % 2 == 0} for i, r in enumerate(rows)]
    enc = ChatEncoder(tok, loss_scale="last_round")
    stored, stats = encode_rows(enc, rows, [("mem", i + 1) for i in range(7)], str(tmp_path / "rows"), kind)
    expected = [enc.encode_pair(r) if kind == "preference" else
                (enc.encode(r), r["label"]) if kind == "kto" else enc.encode(r) for r in rows]
    assert len(stored) == 7 and stats["bad"] == stats["too_long"] == 0
    assert [stored[i] for i in range(7)] == expected and stored[2:5] == expected[2:5] and list(stored) == expected
    first = [e[0] if kind != "sft" else e for e in expected]
    want = [len(e.input_ids) + (len(p[1].input_ids) if kind == "preference" else 0)
            for e, p in zip(first, expected)]
    assert stored.lengths() == want


def test_bad_rows_stop_with_file_and_line_or_are_counted(tok, tmp_path):
    from tunesmith.data.store import encode_rows

    pair = normalise_row({"prompt": "q", "chosen": "same", "rejected": "x"})
    same = {"messages": pair["messages"], "rejected_messages": pair["messages"]}  # only encoding can tell
    rows = [pair, same, pair]
    enc = ChatEncoder(tok)
    sources = [("data.jsonl", i + 1) for i in range(3)]
    with pytest.raises(DataError, match="data.jsonl:2: field 'rejected'"):
        encode_rows(enc, rows, sources, str(tmp_path / "strict"), "preference")
    kept, stats = encode_rows(enc, rows, sources, str(tmp_path / "lenient"), "preference", strict=False)
    assert len(kept) == 2 and stats["bad"] == 1 and stats["reasons"][0].startswith("data.jsonl:2")
    assert not os.path.exists(tmp_path / "strict")  # nothing half-written


def _prepare(tiny_models, data, *flags):
    from tunesmith.train import recipe
    from tunesmith.train.setup import prepare_data

    args = parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset", data, *flags])
    cfg, method = recipe.configure(args)
    return prepare_data(cfg.data, cfg.model, method)


def test_a_second_run_reuses_the_encoded_rows(tiny_models, tmp_path, capsys, monkeypatch):
    from tunesmith.data import prepare

    data = write_jsonl(tmp_path / "d.jsonl", [_chat(i) for i in range(40)])
    first = _prepare(tiny_models, data, "--load_from_cache_file", "true", "--split_dataset_ratio", "0.25")
    assert "encoded data:" in capsys.readouterr().err

    def no_loading(*a, **kw):
        raise AssertionError("the data was loaded again")

    monkeypatch.setattr(prepare, "load_datasets", no_loading)
    again = _prepare(tiny_models, data, "--load_from_cache_file", "true", "--split_dataset_ratio", "0.25")
    assert "reusing" in capsys.readouterr().err
    assert list(again.train_rows) == list(first.train_rows) and list(again.eval_rows) == list(first.eval_rows)
    assert again.val_records.records == first.val_records.records and again.data_stats == first.data_stats
    monkeypatch.undo()

    # the default (false) encodes afresh; a changed file, or a changed flag, is a different cache entry
    fresh = _prepare(tiny_models, data, "--split_dataset_ratio", "0.25")
    assert "reusing" not in capsys.readouterr().err and list(fresh.train_rows) == list(first.train_rows)
    write_jsonl(tmp_path / "d.jsonl", [_chat(i) for i in range(41)])
    changed = _prepare(tiny_models, data, "--load_from_cache_file", "true", "--split_dataset_ratio", "0.25")
    assert "reusing" not in capsys.readouterr().err and len(changed.train_rows) + len(changed.eval_rows) == 41
    _prepare(tiny_models, data, "--load_from_cache_file", "true", "--max_length", "64")
    assert "reusing" not in capsys.readouterr().err


def test_training_reads_its_rows_from_arrow(tiny_models, tmp_path):
    from tunesmith.data.store import EncodedRows

    prepared = _prepare(tiny_models, os.path.join(EXAMPLES, "capitals_messages.jsonl"))
    assert isinstance(prepared.train_rows, EncodedRows)
    files = os.listdir(prepared.train_rows.dataset.cache_files[0]["filename"].rsplit("/", 1)[0])
    assert any(f.endswith(".arrow") for f in files)
    with open(os.path.join(os.path.dirname(prepared.train_rows.dataset.cache_files[0]["filename"]), "..",
                           "meta.json")) as fh:
        meta = json.load(fh)
    assert meta["train_drops"]["bad"] == 0


def test_rows_dropped_from_training_and_validation_data_are_recorded(tiny_models, tmp_path):
    """args.json's data_stats (prepared.data_stats) count the bad rows of both, --strict false."""
    train = write_jsonl(tmp_path / "t.jsonl", [_chat(i) for i in range(6)] + [{"text": 5}])
    val = write_jsonl(tmp_path / "v.jsonl", [_chat(i) for i in range(3)] + ["{broken", {"messages": []}])
    prepared = _prepare(tiny_models, train, "--val_dataset", val, "--strict", "false")
    s = prepared.data_stats
    assert (s["train_rows"], s["val_rows"], s["dropped_bad"], s["val_dropped_bad"]) == (6, 3, 1, 2)


def test_data_cache_lists_and_cleans_the_encoded_datasets(tiny_models, tmp_path, monkeypatch, capsys):
    from tunesmith.cli import main

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [_chat(i) for i in range(8)])
    _prepare(tiny_models, data, "--load_from_cache_file", "true")
    _prepare(tiny_models, data, "--load_from_cache_file", "true", "--max_length", "64")
    capsys.readouterr()
    assert main(["data", "cache"]) == 0
    out = capsys.readouterr().out
    assert "kept: 2 encoded dataset(s)" in out and out.count(str(tmp_path / "cache" / "tunesmith-encoded")) == 3
    assert main(["data", "cache", "--clean", "true", "--older_than_days", "1"]) == 0  # both used just now
    assert "removed: 0 encoded dataset(s)" in capsys.readouterr().out
    assert main(["data", "cache", "--older_than_days", "1"]) == 1
    assert "goes with --clean true" in capsys.readouterr().err
    assert main(["data", "cache", "--clean", "true", "--older_than_days", "-1"]) == 1
    assert "expected a number of days >= 0" in capsys.readouterr().err
    assert main(["data", "cache", "--clean", "true", "--dataset", data]) == 1  # would remove every entry
    assert "drop --dataset" in capsys.readouterr().err
    assert main(["data", "cache", "--clean", "true"]) == 0
    assert "removed: 2 encoded dataset(s)" in capsys.readouterr().out
    assert not os.listdir(tmp_path / "cache" / "tunesmith-encoded")
    _prepare(tiny_models, data, "--load_from_cache_file", "true")
    assert "reusing" not in capsys.readouterr().err  # encoded afresh

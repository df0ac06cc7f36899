"""`tunesmith data inspect|validate|convert|split|stats` through the real CLI entry point."""
import json
import os

from conftest import EXAMPLES, read_jsonl, write_jsonl
from tunesmith.cli import main

ALL_FORMATS = [os.path.join(EXAMPLES, f) for f in ("capitals_messages.jsonl", "capitals_sharegpt.jsonl",
                                                   "capitals_alpaca.json", "dpo_prompt_chosen_rejected.jsonl")]


def test_inspect_marks_trained_tokens(capsys):
    assert main(["data", "inspect", "--dataset", ALL_FORMATS[0], "--template", "qwen3"]) == 0
    out = capsys.readouterr().out
    assert "[[<think>\n\n</think>\n\nThe capital of France is Paris.<|im_end|>]]" in out
    assert main(["data", "inspect", "--dataset", ALL_FORMATS[0], "--template", "qwen3",
                 "--loss_scale", "ignore_empty_think"]) == 0
    assert "[[The capital of France is Paris.<|im_end|>]]" in capsys.readouterr().out


def test_inspect_with_a_model(tiny_models, capsys):
    assert main(["data", "inspect", "--dataset", ALL_FORMATS[3], "--model", tiny_models("llama3"), "--rlhf"]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "rejected" in out and "[[I do not know.<|eot_id|>]]" in out


def test_validate_lists_every_problem(tmp_path, capsys):
    p = write_jsonl(tmp_path / "v.jsonl", [
        {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},
        '{"broken": ',
        {"query": "q", "response": ""},
    ])
    assert main(["data", "validate", "--dataset", p]) == 1
    out = capsys.readouterr().out
    assert f"{p}:2: field 'messages'" in out and "has no assistant message" in out
    assert "problem(s)" in out


def test_validate_clean_data(capsys):
    assert main(["data", "validate", "--dataset", *ALL_FORMATS]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_convert_and_split(tmp_path, capsys):
    out = tmp_path / "canon.jsonl"
    assert main(["data", "convert", "--dataset", *ALL_FORMATS, "--output", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 32 and all("messages" in r for r in rows)
    assert sum("rejected_messages" in r for r in rows) == 8
    # the canonical file loads back to itself
    main(["data", "convert", "--dataset", str(out), "--output", str(tmp_path / "again.jsonl")])
    assert read_jsonl(tmp_path / "again.jsonl") == rows
    assert main(["data", "split", "--dataset", str(out), "--output", str(tmp_path / "s"), "--val_ratio", "0.25"]) == 0
    assert len(read_jsonl(tmp_path / "s" / "train.jsonl")) == 24 and len(read_jsonl(tmp_path / "s" / "val.jsonl")) == 8
    # the row's own columns (ids, a GRPO solution next to the response) survive converting and splitting
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"query": f"{i}+1?", "response": str(i + 1), "solution": str(i + 1),
                                                    "id": i} for i in range(4)])
    main(["data", "convert", "--dataset", extra, "--output", str(tmp_path / "extra_out.jsonl")])
    assert [(r["solution"], r["id"]) for r in read_jsonl(tmp_path / "extra_out.jsonl")] == [("1", 0), ("2", 1),
                                                                                           ("3", 2), ("4", 3)]
    main(["data", "split", "--dataset", extra, "--output", str(tmp_path / "es"), "--val_ratio", "0.25"])
    assert all("solution" in r and "id" in r for r in read_jsonl(tmp_path / "es" / "val.jsonl"))


def test_stats_counts_over_long_rows(capsys):
    from tunesmith.commands.data import stats
    from tunesmith.config.parser import parse_args
    s = stats(parse_args("data", ["stats", "--dataset", *ALL_FORMATS, "--max_length", "37"]))
    assert s["rows"] == 32 and s["kinds"] == {"sft": 24, "preference": 8}
    assert 0 < s["over_max_length"]["sequences"] < 40
    assert s["tokens"]["max"] > 37 >= s["tokens"]["min"]
    assert "would be dropped" in capsys.readouterr().out
    json.dumps(s)


def test_inspect_system_file_shows_its_content(tmp_path, monkeypatch, capsys):
    """--system prompt.txt is the file's text, not its name; a .txt that does not exist is an error, as in ms-swift."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text("You are a pirate.\nSay arr.", encoding="utf-8")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "arr"}]}])
    assert main(["data", "inspect", "--dataset", data, "--system", "prompt.txt"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>system\nYou are a pirate.\nSay arr.<|im_end|>" in out and "prompt.txt" not in out
    assert main(["data", "inspect", "--dataset", data, "--system", "promt.txt"]) == 2
    assert "--system promt.txt: no such file" in capsys.readouterr().err


def test_stats_names_the_truncation_strategy_it_applies(capsys):
    """delete: over-long sequences are dropped; left/right: truncated and still trained, except those whose kept
    window holds no trained token (dropped, as training drops them)."""
    from tunesmith.config.parser import parse_args
    from tunesmith.commands.data import stats

    data = os.path.join(EXAMPLES, "capitals_messages.jsonl")
    out = {}
    for strategy in ("delete", "left", "right"):
        out[strategy] = stats(parse_args("data", ["stats", "--dataset", data, "--max_length", "12",
                                                  "--truncation_strategy", strategy]))["over_max_length"]
        printed = capsys.readouterr().out.splitlines()
        out[strategy]["printed"] = next(line for line in printed if line.startswith("over --max_length"))
    over = out["delete"]["sequences"]
    assert over > 0 and all(o["sequences"] == over for o in out.values())
    assert out["delete"]["dropped"] == over and out["delete"]["truncated"] == 0
    assert out["delete"]["printed"].endswith(f"{over} sequence(s) would be dropped (--truncation_strategy delete)")
    # left keeps the end of each conversation (the reply): every sequence is still trained
    assert out["left"]["truncated"] == over and out["left"]["dropped"] == 0
    assert "truncated to 12 tokens, cut on the left (--truncation_strategy left): all still trained" \
        in out["left"]["printed"] and "would be dropped" not in out["left"]["printed"]
    # right keeps the start (system + question): 12 tokens hold no reply token, so training drops them
    assert out["right"]["dropped"] == over and out["right"]["truncated"] == 0
    assert f"cut on the right (--truncation_strategy right): 0 still trained, {over} dropped (no trained token " \
           f"left)" in out["right"]["printed"]


def test_convert_and_split_refuse_an_output_they_cannot_write(tmp_path, capsys):
    """--output that is a folder (convert) or under a file (convert, split): one message before anything is read
    (a flag problem: exit 2), nothing half-written."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "a"}] * 4)
    assert main(["data", "convert", "--dataset", data, "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path}: is a folder; give the file to write, e.g. " in capsys.readouterr().err
    for action in ("convert", "split"):
        assert main(["data", action, "--dataset", data, "--output", str(tmp_path / "d.jsonl" / "x")]) == 2
        assert f"{data} is a file, so nothing can be created under it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_validate_reports_every_broken_file_of_a_folder(tmp_path, capsys):
    """A folder with a good file, broken JSON, invalid UTF-8, a named pipe and a dangling link: validate names each
    broken file (it used to stop at the first, and a named pipe made it wait forever)."""
    import os

    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    (tmp_path / "a.jsonl").write_text(good)
    (tmp_path / "b.jsonl").write_text('{"messages": [')
    (tmp_path / "c.jsonl").write_bytes(b"x\xff\xfe\n")
    os.mkfifo(tmp_path / "d.jsonl")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "e.jsonl")
    assert main(["data", "validate", "--dataset", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for fragment in ("b.jsonl:1: broken JSON", "c.jsonl:1: is not valid UTF-8", "d.jsonl: is not a regular file",
                     "e.jsonl: file not found", "4 problem(s)"):
        assert fragment in out, (fragment, out)

"""Data paths that cannot be used, through the real CLI entry point: an empty --dataset name, a folder this user
cannot read, an --output that is a folder or lies under a file, a datasets cache that cannot be written; and
`data validate --rlhf_type grpo`, which checks prompts as GRPO reads them. Flag problems exit 2 with one line
naming the flag, the value and the fix, before anything is read or written; never a traceback."""
import json
import os

import pytest

from conftest import as_other_user, cli, error_line, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}






@pytest.mark.parametrize("spec", ["", " ", "hf::"], ids=["empty", "blank", "hub-prefix-only"])
def test_an_empty_dataset_name_is_a_flag_problem(tiny_models, tmp_path, capsys, spec):
    """Not a hub failure with an IndexError: exit 2, naming the flag, before anything is loaded or written."""
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    model = tiny_models("qwen2")
    for command, argv in (("sft", ["--model", model, "--dataset", spec, "--output_dir", tmp_path / "o"]),
                          ("sft", ["--model", model, "--dataset", data, "--val_dataset", spec,
                                   "--output_dir", tmp_path / "o"]),
                          ("infer", ["--model", model, "--val_dataset", spec]),
                          ("data", ["validate", "--dataset", spec]),
                          ("data", ["convert", "--dataset", data, spec, "--output", tmp_path / "c.jsonl"])):
        rc, _, err = cli(capsys, command, *argv)
        msg = error_line(err, command)
        assert rc == 2 and f"{spec!r}: an empty name; give a data file, a folder or a hub id" in msg, msg
        assert "IndexError" not in msg and "hub" not in msg.split("give")[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "c.jsonl").exists()


def test_an_empty_dataset_name_reaching_the_loader_is_a_flag_error():
    from tunesmith.data.load import read_spec
    from tunesmith.errors import FlagError
    with pytest.raises(FlagError, match="an empty dataset name"):
        read_spec("")


@pytest.mark.slow
def test_an_unreadable_dataset_folder_says_it_cannot_be_read(shared_dir):
    """A folder of data that this user cannot read (run as another user: root reads everything) is "cannot be
    read (Permission denied)", not "holds no data files"; likewise a readable folder with an unreadable folder
    inside, whose files would otherwise be skipped without a word."""
    locked = os.path.join(shared_dir, "locked")
    os.makedirs(locked)
    write_jsonl(os.path.join(locked, "d.jsonl"), [GOOD])
    os.chmod(locked, 0o700)
    outer = os.path.join(shared_dir, "outer")
    os.makedirs(os.path.join(outer, "inner"))
    write_jsonl(os.path.join(outer, "a.jsonl"), [GOOD])
    write_jsonl(os.path.join(outer, "inner", "b.jsonl"), [GOOD])
    os.chmod(os.path.join(outer, "inner"), 0o700)
    for folder, named in ((locked, locked), (outer, os.path.join(outer, "inner"))):
        p = as_other_user(["data", "validate", "--dataset", folder])
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
        assert f"{named}: the folder cannot be read (Permission denied)" in p.stdout, p.stdout
        assert "holds no data files" not in p.stdout


def test_an_unreadable_subfolder_is_not_skipped_silently(tmp_path, monkeypatch):
    """The same rule in process, for a user who can read everything: os.walk's refusal is reported."""
    from tunesmith.data import load
    from tunesmith.errors import DataError

    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    real = os.walk

    def walk(path, onerror=None, **kw):
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "inner")))
        return real(path, onerror=onerror, **kw)
    monkeypatch.setattr(load.os, "walk", walk)
    with pytest.raises(DataError, match=r"inner: the folder cannot be read \(Permission denied\)"):
        load.folder_files(str(tmp_path))


def test_convert_and_split_outputs_that_cannot_be_written_are_flag_problems(tmp_path, capsys, read_only_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    cases = [("convert", tmp_path, f"--output {tmp_path}: is a folder; give the file to write, e.g. "
                                   f"{tmp_path / 'data.jsonl'}"),
             ("convert", tmp_path / "d.jsonl" / "x.jsonl", f"{data} is a file, so nothing can be created under it"),
             ("split", tmp_path / "d.jsonl", f"--output {data}: is a file, not a folder; give a folder"),
             ("convert", read_only_dir / "x.jsonl", f"{read_only_dir} is on a read-only file system"),
             ("split", read_only_dir / "s", f"{read_only_dir} is on a read-only file system")]
    for action, output, fragment in cases:
        rc, _, err = cli(capsys, "data", action, "--dataset", data, "--output", output)
        assert rc == 2 and fragment in error_line(err, "data"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ro"]


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_a_datasets_cache_that_cannot_be_written_is_one_message(tiny_models, tmp_path, capsys, monkeypatch,
                                                                 read_only_dir, where):
    """HF_DATASETS_CACHE (where the encoded rows are kept) under a file or on a read-only file system: exit 2
    before the model loads, naming the variable and the fix; no output folder is made."""
    (tmp_path / "f").write_text("x")
    cache = tmp_path / "f" / "cache" if where == "under_a_file" else read_only_dir / "cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    rc, _, err = cli(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", data,
                     "--output_dir", tmp_path / "o")
    msg = error_line(err, "sft")
    why = f"{tmp_path / 'f'} is a file" if where == "under_a_file" else f"{read_only_dir} is on a read-only file system"
    assert rc == 2 and msg.startswith(f"tunesmith sft: error: HF_DATASETS_CACHE={cache}: {why}") and \
        "set HF_DATASETS_CACHE to a writable folder" in msg, msg
    assert not (tmp_path / "o").exists()


GRPO_ROWS = [{"messages": [{"role": "user", "content": "What is 2+2?"}], "solution": "4"},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}]},
             {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
             {"query": "5+5?", "solution": "10"}]


def test_validate_grpo_prompts(tmp_path, capsys):
    """--rlhf_type grpo checks rows as GRPO reads them (a prompt ending with the user's turn; a final reply is the
    solution): a valid prompt file has no problem — it used to be called all bad as pairs — and a row with no
    prompt is one, named by file:line."""
    good = write_jsonl(tmp_path / "grpo.jsonl", GRPO_ROWS)
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", good, "--rlhf_type", "grpo")
    assert rc == 0 and "4 rows checked, 0 problem(s)." in out, out
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", good, "--rlhf", "true")
    assert rc == 1 and "rejected_response" in out  # as pairs they are not usable: the message says why
    bad = write_jsonl(tmp_path / "bad.jsonl", [*GRPO_ROWS, {"messages": [{"role": "system", "content": "x"}]}])
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", bad, "--rlhf_type", "grpo")
    assert rc == 1 and "5 rows checked, 1 problem(s)." in out and f"{bad}:5: field 'messages': has no prompt" in out, out


def test_data_split_refuses_trainings_ratio_and_a_ratio_outside_0_1(tmp_path, capsys):
    """`data split --split_dataset_ratio 2` used to be accepted and ignored (the split used the default
    --val_ratio); --val_ratio 2 exited 1 after reading the data. Both are flag problems now (exit 2), nothing written."""
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8)
    rc, _, err = cli(capsys, "data", "split", "--dataset", data, "--split_dataset_ratio", "2",
                     "--output", tmp_path / "s1")
    assert rc == 2 and "--split_dataset_ratio 2.0: that is training's validation split; `tunesmith data split` " \
                       "takes --val_ratio" in error_line(err, "data")
    for ratio in ("2", "-1", "0"):
        rc, _, err = cli(capsys, "data", "split", "--dataset", data, "--val_ratio", ratio, "--output", tmp_path / "s2")
        assert rc == 2 and f"--val_ratio {float(ratio)}: expected 0 < val_ratio < 1" in error_line(err, "data")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_a_missing_val_dataset_is_named_as_such_before_the_model_loads(tiny_models, tmp_path, capsys):
    """infer --val_dataset nonexist.jsonl said "check the path given to --dataset", after loading the model."""
    rc, _, err = cli(capsys, "infer", "--model", tiny_models("qwen2"), "--val_dataset", tmp_path / "nonexist.jsonl")
    assert rc == 2 and error_line(err, "infer").endswith("file not found. Fix: check the path given to --val_dataset.")
    assert "generation:" not in err

"""Malformed data, fuzzed through the real CLI entry point: never a traceback. Each bad input gives exit code 1 (2
for flags) with one `error:` line naming the file (and the line where there is one), nothing written to
--output_dir; or, under --strict false, a bad row is dropped and counted. `data validate` reports the same rows."""
import json
import sys

import pytest

from conftest import cli, error_line
from tunesmith.cli import main

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
G = json.dumps(GOOD)


def _sandwich(bad) -> bytes:
    """A JSON-lines file whose line 2 is `bad`, between two good rows."""
    bad = bad if isinstance(bad, bytes) else bad.encode("utf-8")
    return G.encode() + b"\n" + bad + b"\n" + G.encode() + b"\n"


def _msg(user, reply, **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                       **extra})


def _parquet_with_null_reply(path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"query": "q1", "response": "a1"}, {"query": "q2", "response": None},
                                         {"query": "q3", "response": "a3"}]), path)


# (id, file name, content (bytes, str or a writer), the line reported, a fragment of the message)
ROW_CASES = [
    ("broken_json", "d.jsonl", _sandwich('{"messages": [{"role": "user", '), 2, "broken JSON at column"),
    ("content_number", "d.jsonl", _sandwich(_msg(5, "a")), 2, "expected a string, got int"),
    ("content_list", "d.jsonl", _sandwich(_msg(["x", 1], "a")), 2, "expected a string, got list"),
    ("content_dict", "d.jsonl", _sandwich(_msg({"a": 1}, "a")), 2, "expected a string, got dict"),
    ("content_null", "d.jsonl", _sandwich(_msg("q", None)), 2, "is null"),
    ("content_empty", "d.jsonl", _sandwich(_msg("q", "")), 2, "is empty"),
    ("content_missing", "d.jsonl", _sandwich('{"messages": [{"role": "user"}, {"role": "assistant", '
                                             '"content": "a"}]}'), 2, "is missing"),
    ("unknown_role", "d.jsonl", _sandwich('{"messages": [{"role": "robot", "content": "q"}, '
                                          '{"role": "assistant", "content": "a"}]}'), 2, "unknown role 'robot'"),
    ("role_number", "d.jsonl", _sandwich('{"messages": [{"role": 7, "content": "q"}, '
                                         '{"role": "assistant", "content": "a"}]}'), 2, "unknown role 7"),
    ("invalid_utf8", "d.jsonl", _sandwich(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 2,
     "is not valid UTF-8"),
    ("deep_nesting", "d.jsonl", _sandwich("[" * 100_000 + "]" * 100_000), 2, "nested too deeply"),
    ("deep_in_row", "d.jsonl", _sandwich('{"messages": ' + "[" * 5000 + "]" * 5000 + "}"), 2, "nested too deeply"),
    ("huge_broken_line", "d.jsonl", _sandwich('{"messages": "' + "x" * 3_000_000), 2,
     "broken JSON at column 14: a string starts there and is never closed"),
    # columns as an editor shows them: 1-based, in characters, the line end not counted
    ("broken_json_column", "d.jsonl", _sandwich('{"a": "é😀", "b": x}'), 2,
     "broken JSON at column 18: Expecting value"),
    ("broken_json_at_line_end", "d.jsonl", _sandwich('{"a": 1').replace(b"\n", b"\r\n"), 2,
     "broken JSON at column 8: Expecting ',' delimiter"),
    ("row_is_list", "d.jsonl", _sandwich("[1, 2]"), 2, "expected a JSON object per row, got list"),
    ("row_is_string", "d.jsonl", _sandwich('"hello"'), 2, "expected a JSON object per row, got str"),
    ("row_is_null", "d.jsonl", _sandwich("null"), 2, "expected a JSON object per row"),
    ("messages_not_a_list", "d.jsonl", _sandwich('{"messages": "hi"}'), 2, "not a list of messages"),
    ("messages_empty", "d.jsonl", _sandwich('{"messages": []}'), 2, "is an empty list"),
    ("message_not_an_object", "d.jsonl", _sandwich('{"messages": ["hi", {"role": "assistant", "content": "a"}]}'),
     2, "expected a message object"),
    ("no_known_format", "d.jsonl", _sandwich('{"foo": 1}'), 2, "no known format"),
    ("ends_with_user", "d.jsonl", _sandwich('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                                            '"content": "a"}, {"role": "user", "content": "q2"}]}'), 2,
     "the last message must be the reply"),
    ("label_not_bool", "d.jsonl", _sandwich(_msg("q", "a", label="maybe")), 2, "expected true or false"),
    ("crlf_line_ends", "d.jsonl", _sandwich(_msg(5, "a")).replace(b"\n", b"\r\n"), 2, "got int"),
    ("bom_then_bad_row", "d.jsonl", b"\xef\xbb\xbf" + f'{{"foo": 1}}\n{G}\n{G}\n'.encode(), 1,
     "no known format: columns are foo."),
    ("json_list_item_not_object", "d.json", f"[\n{G},\n 5,\n{G}\n]", 3, "expected a JSON object per row, got int"),
    ("csv_extra_cells", "d.csv", "query,response\nq1,a1\nq2,a2,oops\nq3,a3\n", 3,
     "has 3 cells but the header has 2 columns"),
    ("csv_missing_cells", "d.csv", "query,response\nq1,a1\nq2\nq3,a3\n", 3, "has 1 cells"),
    ("csv_unclosed_quote", "d.csv", 'query,response\nq1,a1\nq3,a3\n"q2,a2\n', 4, "has 1 cells"),
    ("csv_invalid_utf8", "d.csv", b"query,response\nq1,a1\nq2 \xff\xfe,a2\nq3,a3\n", 3, "is not valid UTF-8 (byte 0xff, "
     "the line's byte 4)"),
    ("csv_invalid_utf8_in_a_quoted_cell", "d.csv", b'query,response\nq1,a1\n"q2\nsecond \xc3\x28 line",a2\nq3,a3\n', 4,
     "is not valid UTF-8 (byte 0xc3, the line's byte 8)"),
    ("txt_invalid_utf8", "d.txt", b"first\n\xc3\x28 broken\nthird\n", 2, "is not valid UTF-8"),
    ("parquet_null_reply", "d.parquet", _parquet_with_null_reply, 2,
     "field 'response': is missing or null: the row has a 'query' but no reply"),
    # messages name the user's own fields, not the canonical form's
    ("chosen_null", "d.jsonl", _sandwich('{"prompt": "q", "chosen": null, "rejected": "x"}'), 2,
     "field 'chosen': is missing or null: a chosen/rejected row needs both replies"),
    ("alpaca_without_output", "d.jsonl", _sandwich('{"instruction": "q", "input": ""}'), 2,
     "field 'output': is missing or null: an instruction row"),
    ("tool_call_without_result", "d.jsonl", _sandwich(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "tool_call", "content": '{"name": "f", "arguments": {}}'},
        {"role": "assistant", "content": "a"}]})), 2,
     "the call to 'f' is followed by an assistant reply without the tool's result"),
    ("tool_result_without_call", "d.jsonl", _sandwich(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "tool_response", "content": "1"},
        {"role": "assistant", "content": "a"}]})), 2, "a tool result follows a user message: no tool call"),
    ("unmatched_tool_call_id", "d.jsonl", _sandwich(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "1"}, {"role": "assistant", "content": "a"}]})), 2,
     "field 'messages[2].tool_call_id': 'c9' answers none of the calls before it (their ids: 'c1')"),
    ("misspelt_arguments_key", "d.jsonl", _sandwich(json.dumps({
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "messages": [
            {"role": "user", "content": "q"}, {"role": "tool_call", "content": '{"name": "f", "args": {"x": 1}}'},
            {"role": "tool_response", "content": "1"}, {"role": "assistant", "content": "a"}]})), 2,
     "field 'messages[1].content.args': is not a field of a tool call"),
    ("calls_without_tools", "d.jsonl", _sandwich(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "tool_call", "content": '{"name": "f", "arguments": {}}'},
        {"role": "tool_response", "content": "1"}, {"role": "assistant", "content": "a"}]})), 2,
     "field 'tools': is missing or empty, but the conversation calls tools"),
    ("tool_without_name", "d.jsonl", _sandwich(json.dumps({"tools": [{"foo": 1}], "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})), 2,
     "field 'tools[0]': has no function name"),
    ("call_to_unknown_function", "d.jsonl", _sandwich(json.dumps({
        "tools": [{"type": "function", "function": {"name": "g", "parameters": {}}}], "messages": [
            {"role": "user", "content": "q"}, {"role": "tool_call", "content": '{"name": "f", "arguments": {}}'},
            {"role": "tool_response", "content": "1"}, {"role": "assistant", "content": "a"}]})), 2,
     "field 'tools': has no function 'f', which the conversation calls (the tools: 'g')"),
]

# (id, file name, content or None (the path is not created), spec suffix, line or None, fragment)
FILE_CASES = [
    ("utf16", "d.jsonl", (G + "\n" + G + "\n").encode("utf-16"), "", None, "is a UTF-16"),
    ("utf16_csv", "d.csv", "query,response\nq,a\n".encode("utf-16"), "", None, "is a UTF-16"),
    ("csv_header_invalid_utf8", "d.csv", b"query,resp\xffonse\nq,a\n", "", 1, "is not valid UTF-8 (byte 0xff"),
    ("binary", "d.jsonl", bytes(range(256)) * 8, "", None, "is not a text file"),
    ("not_parquet", "d.parquet", b"PAR1 this is not parquet", "", None, "cannot be read as parquet"),
    ("empty", "d.jsonl", b"", "", None, "the dataset is empty"),
    ("blank_lines_only", "d.jsonl", b"\n  \n\r\n", "", None, "the dataset is empty"),
    ("bom_only", "d.jsonl", b"\xef\xbb\xbf", "", None, "the dataset is empty"),
    ("empty_json_list", "d.json", b"[]", "", None, "the dataset is empty"),
    ("broken_json_list", "d.json", f'[\n{G},\n{{"messages": ]\n]', "", 3, "broken JSON"),
    ("unclosed_json_list", "d.json", f"[\n{G},\n{G}\n", "", 3, "the list is never closed"),
    ("text_after_json_list", "d.json", f'[{G}]\n{{"x": 1}}\n', "", 2, "text after the end of the JSON list"),
    ("deep_json_list", "d.json", "[" + "[" * 100_000 + "]" * 100_000 + "]", "", 1, "nested too deeply"),
    ("missing_file", "missing.jsonl", None, "", None, "file not found"),
    ("missing_folder", "missing_dir/", None, "", None, "file not found"),
    ("empty_folder", "folder", "mkdir", "", None, "holds no data files"),
    ("unsupported_suffix", "d.xlsx", b"PK\x03\x04", "", None, "unsupported file type .xlsx"),
    ("sample_negative", "d.jsonl", G + "\n", "#-1", None, "'#-1' is not a number of rows"),
    ("sample_word", "d.jsonl", G + "\n", "#abc", None, "'#abc' is not a number of rows"),
    ("sample_fraction", "d.jsonl", G + "\n", "#1.5", None, "'#1.5' is not a number of rows"),
    ("sample_zero", "d.jsonl", G + "\n", "#0", None, "'#0' samples no rows"),
    ("sample_missing_file", "missing.jsonl", None, "#abc", None, "file not found"),
]


def _write(tmp_path, name, content) -> str:
    path = tmp_path / name
    if content is None:
        return str(path)
    if content == "mkdir":
        path.mkdir()
    elif content == "wrong_columns":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]), path)
    elif callable(content):
        content(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)






@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No network in these tests (the hub cases fail at once), and encoded data cached under tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name,file,content,line,fragment", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_a_bad_row(tiny_models, tmp_path, capsys, name, file, content, line, fragment):
    """validate lists it (file:line), sft stops at it (nothing written), --strict false drops and counts it."""
    path = _write(tmp_path, file, content)
    where = f"{path}:{line}:"
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", path)
    assert rc == 1 and where in out and fragment in out, out
    assert "1 problem(s)" in out
    output_dir = tmp_path / "out"
    rc, _, err = cli(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", path, "--output_dir", output_dir)
    msg = error_line(err, "sft")
    assert rc == 1 and where in msg and fragment in msg and len(msg) < 600, msg
    assert not output_dir.exists()
    rc, out, _ = cli(capsys, "data", "convert", "--dataset", path, "--strict", "false",
                     "--output", tmp_path / "canon.jsonl")
    assert rc == 0 and "1 bad rows dropped; first: " + where in out, out
    assert len((tmp_path / "canon.jsonl").read_text().splitlines()) == 2  # the good rows around it


@pytest.mark.parametrize("name,file,content,suffix,line,fragment", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_a_bad_file(tiny_models, tmp_path, capsys, name, file, content, suffix, line, fragment):
    """validate and sft (even --strict false) refuse it with one message naming the file; nothing is written."""
    path = _write(tmp_path, file, content)
    where = path.rstrip("/") + (f":{line}:" if line else "")
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", path + suffix)
    assert rc == 1 and where in out and fragment in out, out
    for strict in ("true", "false"):
        output_dir = tmp_path / f"out-{strict}"
        rc, _, err = cli(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", path + suffix,
                         "--strict", strict, "--output_dir", output_dir)
        msg = error_line(err, "sft")
        assert rc == 1 and where in msg and fragment in msg, msg
        assert not output_dir.exists()


@pytest.mark.parametrize("file,content", [("d.jsonl", '{"foo": 1}\n{"bar": 2}\n'),
                                          ("d.parquet", "wrong_columns")], ids=["jsonl", "parquet_wrong_columns"])
def test_every_row_bad(tiny_models, tmp_path, capsys, file, content):
    """validate lists each row; sft stops at the first (--strict true) or says none is usable (--strict false)."""
    path = _write(tmp_path, file, content)
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", path)
    assert rc == 1 and f"{path}:1: no known format" in out and f"{path}:2: no known format" in out, out
    for strict, fragment in (("true", f"{path}:1: no known format"),
                             ("false", f"{path}: no usable rows in --dataset. All 2 rows were bad")):
        rc, _, err = cli(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", path, "--strict", strict,
                         "--output_dir", tmp_path / "out")
        assert rc == 1 and fragment in error_line(err, "sft"), err
        assert not (tmp_path / "out").exists()


def test_json_array_in_a_jsonl_file_and_crlf_and_bom_load(tmp_path, capsys):
    """Not errors: a .jsonl holding one JSON list (datasets' json loader, so ms-swift, reads it), CRLF line ends,
    a UTF-8 byte-order mark, a huge but valid row."""
    files = [_write(tmp_path, "array.jsonl", json.dumps([GOOD, GOOD], indent=2)),
             _write(tmp_path, "crlf.jsonl", (G + "\r\n") * 2),
             _write(tmp_path, "bom.jsonl", "\ufeff" + G + "\n"),
             _write(tmp_path, "huge.jsonl", _msg("x" * 2_000_000, "a") + "\n")]
    rc, out, _ = cli(capsys, "data", "convert", "--dataset", *files, "--output", tmp_path / "all.jsonl")
    assert rc == 0 and "wrote 6 canonical rows" in out
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[:5] == [GOOD] * 5


def test_hub_ids_offline(tiny_models, tmp_path, capsys, monkeypatch):
    """ms:: without modelscope says so (no silent switch to Hugging Face); a hub that cannot be reached is one
    line, not a ConnectionError traceback; a plain id falls back to Hugging Face with a note, as --model does."""
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as when it is not installed
    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", None)
    cases = [("ms::x/y", "ms::x/y: ModelScope datasets need the modelscope package"),
             ("hf::x/y", "hf::x/y: loading it from the Hugging Face hub failed"),
             ("x/y", "hf::x/y: not a local file or folder, and loading it from the Hugging Face hub failed")]
    for spec, fragment in cases:
        rc, out, err = cli(capsys, "data", "validate", "--dataset", spec)
        assert rc == 1 and fragment in out, out
        if spec == "x/y":
            assert "modelscope is not installed; loading it from the Hugging Face hub instead" in err
        rc, _, err = cli(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", spec,
                         "--output_dir", tmp_path / "out")
        assert rc == 1 and fragment in error_line(err, "sft")
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ what each training method needs

PAIR = {"prompt": "Is the sky blue?", "chosen": "Yes, it is blue.", "rejected": "No."}
PREFERENCE_ROWS = [
    PAIR,                                                                             # 1 ok
    {"messages": GOOD["messages"], "rejected_response": None},                        # 2 no rejected reply
    {"messages": GOOD["messages"], "label": True},                                    # 3 KTO row: no pair
    {"messages": GOOD["messages"],                                                    # 4 prompts differ
     "rejected_messages": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
    {"prompt": "Is fire hot?", "chosen": "Yes.", "rejected": "No, cold."},            # 5 ok
]


def test_validate_checks_what_the_method_needs(tmp_path, capsys):
    """--rlhf: a pair needs a rejected reply and pairs are encoded as training encodes them (encode_pair);
    --rlhf_type kto: a label or a pair. --val_dataset rows are checked like --dataset rows."""
    from conftest import write_jsonl
    data = write_jsonl(tmp_path / "p.jsonl", PREFERENCE_ROWS)
    val = write_jsonl(tmp_path / "v.jsonl", [PAIR, {"messages": GOOD["messages"], "rejected_response": None}])
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", data)
    assert rc == 0 and "0 problem(s)" in out  # as sft data every row is fine
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", data, "--val_dataset", val, "--rlhf", "true")
    assert rc == 1 and "7 rows checked, 4 problem(s)" in out, out
    assert f"{data}:2: field 'rejected_response': is missing or null" in out
    assert f"{data}:3: field 'rejected_response'" in out
    assert f"{data}:4: field 'rejected': the chosen and rejected conversations differ before the reply" in out
    assert f"{val}:2: field 'rejected_response'" in out
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", data, "--val_dataset", val, "--rlhf_type", "kto")
    assert rc == 1 and "2 problem(s)" in out, out
    assert f"{data}:2: field 'label': is missing or null" in out and f"{val}:2: field 'label'" in out
    rc, _, err = cli(capsys, "data", "validate", "--dataset", data, "--rlhf_type", "ppoo")
    assert rc == 2 and "ppoo" in err and "ppo" in err.replace("ppoo", "")  # the nearest method named


@pytest.mark.slow
@pytest.mark.parametrize("method", [["rlhf", "--rlhf_type", "dpo"],  # cpo, simpo and orpo share its check_pairs
                                    ["rlhf", "--rlhf_type", "kto", "--per_device_train_batch_size", "2"]],
                         ids=["dpo", "kto"])
def test_training_drops_or_stops_at_rows_the_method_cannot_use(tiny_models, tmp_path, capsys, method):
    """--strict false: bad rows of --dataset and --val_dataset (including rows the method cannot use) are dropped,
    counted and the first reasons shown, and training runs. --strict true: the first one stops the run, naming
    file:line:field, before anything is written."""
    from conftest import write_jsonl
    kto = "kto" in method
    rows = [PAIR, {"messages": GOOD["messages"], "rejected_response": None}, '{"broken',
            {"prompt": "Is fire hot?", "chosen": "Yes.", "rejected": "No, cold."}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    val = write_jsonl(tmp_path / "v.jsonl", [PAIR, {"messages": GOOD["messages"], "rejected_response": None}])
    common = [*method, "--model", tiny_models("qwen2"), "--max_steps", "1", "--report_to", "none",
              "--save_strategy", "no", "--eval_strategy", "no"]
    field = "label" if kto else "rejected_response"
    # --strict true: the data loads (every row is a valid row), the method's check stops at line 2
    rc, _, err = cli(capsys, *common, "--dataset", val, "--strict", "true", "--output_dir", tmp_path / "strict")
    assert rc == 1 and f"{val}:2: field '{field}': is missing or null" in error_line(err, "rlhf")
    assert not (tmp_path / "strict").exists()
    rc, _, err = cli(capsys, *common, "--dataset", data, "--val_dataset", val, "--strict", "false",
                     "--output_dir", tmp_path / "lenient")
    assert rc == 0, err
    assert "--dataset: 2 bad row(s) dropped (--strict false); first reasons:" in err
    assert f"{data}:3: broken JSON" in err and f"{data}:2: field '{field}'" in err
    assert "validation data: 1 bad row(s) dropped" in err and f"{val}:2: field '{field}'" in err
    assert "done: 1 steps" in err


@pytest.mark.slow
def test_sft_strict_false_drops_every_bad_row(tiny_models, tmp_path, capsys):
    """All the malformed JSON-lines rows above in one file, with two good rows: dropped, counted, trained."""
    bad = [c[2].split(b"\n")[1] for c in ROW_CASES if c[1] == "d.jsonl" and c[0] != "bom_then_bad_row"]
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"\n".join([G.encode(), *bad, G.encode()]) + b"\n")
    rc, out, err = cli(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", path, "--strict", "false",
                       "--max_steps", "1", "--report_to", "none", "--save_strategy", "no",
                       "--output_dir", tmp_path / "out")
    assert rc == 0, err
    assert f"--dataset: {len(bad)} bad row(s) dropped (--strict false); first reasons:\n  {path}:2:" in err
    assert "sft: 2 training rows" in out


@pytest.mark.parametrize("line", ['{"messages": [{"role": "user", "content": "cut \\ud800 emoji"}, '
                                  '{"role": "assistant", "content": "a"}]}',
                                  '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                                  '"content": "a"}], "n": ' + "9" * 5000 + "}"],
                         ids=["lone-surrogate", "5000-digit-integer"])
def test_valid_json_that_cannot_be_used_is_a_bad_row(tmp_path, capsys, line):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    assert main(["data", "validate", "--dataset", str(path)]) == 1
    err = capsys.readouterr()
    assert f"{path}:2:" in err.out + err.err and "Traceback" not in err.out + err.err


def test_labelled_single_replies_given_to_a_pair_method_point_to_kto(tmp_path, capsys):
    path = tmp_path / "kto.jsonl"
    path.write_text(_msg("q", "a", label=True) + "\n")
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", str(path), "--rlhf_type", "dpo")
    assert rc == 1 and "KTO's unpaired form" in out and "--rlhf_type kto" in out, out
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", str(path), "--rlhf_type", "kto")
    assert rc == 0, out


@pytest.mark.parametrize("messages", [[{"role": "assistant", "content": "4"}],
                                      [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "4"}]],
                         ids=["assistant-only", "system-then-assistant"])
def test_a_prompt_row_without_a_user_turn_is_a_bad_row_for_generation(tmp_path, messages):
    """GRPO's prompts and infer's rows (need_reply=False) are generated from: a row that starts with the assistant
    has no user turn to answer. It used to get an invented empty user prompt (ms-swift's pretraining form, right
    for sft) and be trained on; now it is a bad row naming file:line:field (dropped and counted under --strict
    false), as `{"messages": []}` is. Training data (need_reply) keeps the pretraining form."""
    from conftest import write_jsonl
    from tunesmith.data.load import load_datasets, map_records
    from tunesmith.errors import DataError
    from tunesmith.train.rl.grpo import prompt_record

    user = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    path = write_jsonl(tmp_path / "prompts.jsonl", [user, {"messages": messages}, user])
    with pytest.raises(DataError) as e:
        load_datasets([path], need_reply=False, keep_columns=True)
    start = len(messages) - 1
    assert str(e.value).startswith(f"{path}:2: field 'messages[{start}].role': the conversation starts with an "
                                   f"assistant message, so there is no user turn to generate a reply to."), e.value
    assert "put the user's message before it" in str(e.value)
    loaded = load_datasets([path], strict=False, need_reply=False, keep_columns=True)
    prompts = map_records(loaded, prompt_record)
    assert [p["messages"] for p in prompts.records] == [[user["messages"][0]]] * 2
    assert prompts.dropped == 1 and prompts.reasons[0].startswith(f"{path}:2:")
    trained = load_datasets([path])  # sft: the pretraining form, an empty user turn before the reply
    assert trained.records[1]["messages"][start:] == [{"role": "user", "content": ""}, messages[-1]]

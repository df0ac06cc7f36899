"""Every supported format loads to the same canonical records; bad rows give one file:line:field message."""
import csv
import json

import pytest

from conftest import write_jsonl
from tunesmith.data.load import load_datasets, read_spec, split_train_val
from tunesmith.errors import DataError

CANON = {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "告诉我明天的天气"},
                      {"role": "assistant", "content": "明天天气晴朗"}]}


def _load(path, **kw):
    return load_datasets([str(path)], **kw).records


def test_messages_sharegpt_alpaca_query_response_are_the_same(tmp_path):
    system = "You are helpful."
    variants = {
        "messages.jsonl": {"messages": CANON["messages"]},
        "sharegpt.jsonl": {"conversations": [{"from": "system", "value": system},
                                             {"from": "human", "value": "告诉我明天的天气"},
                                             {"from": "gpt", "value": "明天天气晴朗"}]},
        "conversation_sys.jsonl": {"system": system, "conversation": [{"role": "user", "content": "告诉我明天的天气"},
                                                                      {"role": "assistant", "content": "明天天气晴朗"}]},
        "legacy_pairs.jsonl": {"system": system, "conversation": [{"human": "告诉我明天的天气", "assistant": "明天天气晴朗"}]},
        "alpaca.jsonl": {"system": system, "instruction": "告诉我明天的天气", "input": "", "output": "明天天气晴朗"},
        "query.jsonl": {"system_prompt": system, "query": "告诉我明天的天气", "response": "明天天气晴朗"},
        "question.jsonl": {"system": system, "question": "告诉我明天的天气", "answer": "明天天气晴朗"},
    }
    for name, row in variants.items():
        assert _load(write_jsonl(tmp_path / name, [row])) == [CANON], name


def test_json_list_csv_parquet_txt_and_folder(tmp_path):
    rows = [{"query": f"q{i}", "response": f"a{i}"} for i in range(3)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "list.json").write_text(json.dumps(rows, indent=2))
    with open(tmp_path / "d" / "t.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["query", "response"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "t.parquet")
    expect = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
              for i in range(3)]
    for f in ("list.json", "t.csv", "t.parquet"):
        assert _load(tmp_path / "d" / f) == expect, f
    assert len(_load(tmp_path / "d")) == 9  # a folder loads every data file in it
    (tmp_path / "pt.txt").write_text("first line\nsecond line\n")
    assert _load(tmp_path / "pt.txt")[0]["messages"] == [{"role": "user", "content": ""},
                                                          {"role": "assistant", "content": "first line"}]
    # .json that actually holds JSON lines (ms-swift accepts it)
    write_jsonl(tmp_path / "lines.json", rows)
    assert _load(tmp_path / "lines.json") == expect


def test_alpaca_joins_instruction_and_input_with_history(tmp_path):
    row = {"instruction": "沐雪的功能是什么？", "input": "简短回答", "output": "喵~", "history": [["你好", "喵"]]}
    rec = _load(write_jsonl(tmp_path / "a.jsonl", [row]))[0]
    assert rec["messages"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "喵"},
                               {"role": "user", "content": "沐雪的功能是什么？\n简短回答"},
                               {"role": "assistant", "content": "喵~"}]


def test_preference_formats_agree(tmp_path):
    prompt = [{"role": "user", "content": "1+1等于几"}]
    chosen = [{"role": "assistant", "content": "等于2"}]
    rejected = [{"role": "assistant", "content": "我不知道"}]
    expect = {"messages": prompt + chosen, "rejected_messages": prompt + rejected}
    variants = [
        {"messages": prompt + chosen, "rejected_response": "我不知道"},
        {"messages": prompt + chosen, "rejected_messages": prompt + rejected},
        {"prompt": "1+1等于几", "chosen": "等于2", "rejected": "我不知道"},          # no --columns needed
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},                # TRL conversational
        {"conversations": [{"from": "human", "value": "1+1等于几"}],                # LLaMA-Factory sharegpt
         "chosen": {"from": "gpt", "value": "等于2"}, "rejected": {"from": "gpt", "value": "我不知道"}},
        {"query": "1+1等于几", "response": "等于2", "rejected_response": "我不知道"},
    ]
    for i, row in enumerate(variants):
        assert _load(write_jsonl(tmp_path / f"p{i}.jsonl", [row])) == [expect], row


def test_rejected_response_replaces_after_last_user_in_multi_turn(tmp_path):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1"},
                        {"role": "assistant", "content": "2"}, {"role": "user", "content": "+1"},
                        {"role": "assistant", "content": "3"}], "rejected_response": "不知道"}
    rec = _load(write_jsonl(tmp_path / "m.jsonl", [row]))[0]
    assert rec["rejected_messages"] == row["messages"][:4] + [{"role": "assistant", "content": "不知道"}]


def test_kto_label_thinking_and_loss_kept(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "reasoning_content": "think", "loss": False},
                        {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "b", "thinking": "t2"}], "label": "true"}
    rec = _load(write_jsonl(tmp_path / "k.jsonl", [row]))[0]
    assert rec["label"] is True
    assert rec["messages"][1] == {"role": "assistant", "content": "a", "reasoning_content": "think", "loss": False}
    assert rec["messages"][3]["reasoning_content"] == "t2"


def test_columns_mapping_and_sampling(tmp_path):
    rows = [{"Q": f"q{i}", "A": f"a{i}"} for i in range(10)]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    recs = load_datasets([p], columns={"Q": "query", "A": "response"}).records
    assert recs[0]["messages"][0]["content"] == "q0"
    assert len(load_datasets([p + "#4"], columns={"Q": "query", "A": "response"})) == 4
    assert len(load_datasets([p + "#25"], columns={"Q": "query", "A": "response"})) == 25  # repeats the data
    mixed = load_datasets([p + "#3", str(tmp_path / "c.jsonl#2")], columns={"Q": "query", "A": "response"})
    assert len(mixed) == 5


def test_split_is_seeded_and_never_empty(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [{"query": f"q{i}", "response": "a"} for i in range(20)])
    res = load_datasets([p])
    t1, v1 = split_train_val(res, 0.1, 42)
    t2, v2 = split_train_val(res, 0.1, 42)
    assert v1.records == v2.records and len(v1) == 2 and len(t1) == 18
    _, tiny_val = split_train_val(load_datasets([p + "#3"]), 0.01, 42)
    assert len(tiny_val) == 1  # max(int(n * ratio), 1), as ms-swift


BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"messages": [{"role": "user", "content": "hi"}, ', 2, "broken JSON"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": "dangling"}]}', 1, "last message must be the reply"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', 1, "has no assistant message"),
    ('{"messages": [{"role": "system", "content": "s"}]}', 1, "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', 1,
     "messages[0].role': unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}', 1,
     "messages[1].content': is empty"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', 1,
     "messages[0].content': expected a string, got int"),
    ('{"messages": {"role": "user"}}', 1, "messages[0].content': is missing"),
    ('{"messages": "not a list"}', 1, "is a string that is not a list of messages"),
    ('{"foo": 1}', 1, "no known format: columns are foo"),
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', 1, "identical to the chosen"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": "no"}]}', 1,
     "messages[1].loss': expected true or false"),
    # videos and audio (ms-swift's videos/audios columns) would train the tags as text without the media; images
    # are read (tests/data/test_image_rows.py), and a picture that is not there is a bad row
    ('{"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a cat"}], '
     '"images": ["cat.png"]}', 1, "field 'images[0]': 'cat.png': the file does not exist"),
    ('{"messages": [{"role": "user", "content": "<video>what?"}, {"role": "assistant", "content": "a cat"}], '
     '"videos": ["cat.mp4"]}', 1, "field 'videos': holds videos or audio, which are not supported yet: only images"),
    ('{"query": "<audio>what?", "response": "a bird", "audios": "bird.wav"}', 1,
     "field 'audios': holds videos or audio, which are not supported yet"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "wide"}', 1,
     "field 'margin': expected a finite number"),
]


@pytest.mark.parametrize("text,line,fragment", BAD)
def test_bad_rows_name_file_line_and_field(tmp_path, text, line, fragment):
    good = '{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}\n'
    p = tmp_path / "bad.jsonl"
    p.write_text(good * 2 + text + "\n")
    with pytest.raises(DataError) as e:
        load_datasets([str(p)])
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line + 2}:"), msg
    assert fragment in msg and "Fix:" in msg and "\n" not in msg


def test_line_numbers_in_json_lists(tmp_path):
    p = tmp_path / "l.json"
    p.write_text('[\n  {"query": "a", "response": "b"},\n  {"query": "c"\n   , "response": 3}\n]\n')
    with pytest.raises(DataError, match=r"l.json:3: field 'response': expected a string"):
        load_datasets([str(p)])


def test_lenient_mode_drops_and_counts(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"query": "q", "response": "a"}, {"query": "q"}, {"foo": 1},
                                           {"query": "q2", "response": "a2"}])
    res = load_datasets([p], strict=False)
    assert len(res) == 2 and res.dropped == 2 and ":2:" in res.reasons[0]


def test_empty_results_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_datasets([str(tmp_path / "empty.jsonl")])
    p = write_jsonl(tmp_path / "allbad.jsonl", [{"foo": 1}, {"bar": 2}])
    with pytest.raises(DataError, match="no usable rows.*All 2 rows were bad"):
        load_datasets([p], strict=False)
    with pytest.raises(DataError, match="file not found"):
        read_spec(str(tmp_path / "missing.jsonl"))

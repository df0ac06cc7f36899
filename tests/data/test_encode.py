"""Loss masks derived from each family's chat template are exact, token for token."""
import pytest

from tunesmith.data.encode import IGNORE, ChatEncoder, NothingToTrain, TooLong, parse_loss_scale
from tunesmith.errors import ConfigError
from tunesmith.testing import build_tokenizer

CONV = [{"role": "system", "content": "sys"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello", "reasoning_content": "first thought"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok fine", "reasoning_content": "second thought"}]


@pytest.fixture(scope="module")
def toks():
    return {f: build_tokenizer(f) for f in ("qwen2", "qwen3", "llama3", "gpt_oss")}


def trained_runs(tok, enc):
    """The trained token runs, decoded; and a check that labels equal input_ids where trained."""
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def check_full_render(tok, encoder, messages, enc):
    full = tok.apply_chat_template(encoder._template_messages(messages), tokenize=False)
    assert enc.input_ids == tok(full, add_special_tokens=False)["input_ids"]  # labels align with the final render


EXPECTED = {
    # family: (default runs, last_round runs)
    "qwen2": (["hello<|im_end|>", "ok fine<|im_end|>"], ["ok fine<|im_end|>"]),
    # Qwen3 drops the first turn's thinking (it is history) and renders the last turn's
    "qwen3": (["hello<|im_end|>", "<think>\nsecond thought\n</think>\n\nok fine<|im_end|>"],
              ["<think>\nsecond thought\n</think>\n\nok fine<|im_end|>"]),
    "llama3": (["hello<|eot_id|>", "ok fine<|eot_id|>"], ["ok fine<|eot_id|>"]),
    # gpt-oss: the earlier turn ends <|end|>, the last <|return|>; analysis only in the final turn
    "gpt_oss": (["<|channel|>final<|message|>hello<|end|>",
                 "<|channel|>analysis<|message|>second thought<|end|><|start|>assistant<|channel|>final"
                 "<|message|>ok fine<|return|>"],
                ["<|channel|>analysis<|message|>second thought<|end|><|start|>assistant<|channel|>final"
                 "<|message|>ok fine<|return|>"]),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_multi_turn_masks(toks, family):
    tok = toks[family]
    default, last = EXPECTED[family]
    enc = ChatEncoder(tok, loss_scale="default")
    e = enc.encode({"messages": CONV})
    check_full_render(tok, enc, CONV, e)
    assert trained_runs(tok, e) == default
    assert trained_runs(tok, ChatEncoder(tok, loss_scale="last_round").encode({"messages": CONV})) == last
    e_all = ChatEncoder(tok, loss_scale="all").encode({"messages": CONV})
    assert all(x != IGNORE for x in e_all.labels)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3", "gpt_oss"])
def test_per_message_loss_overrides(toks, family):
    tok = toks[family]
    conv = [dict(m) for m in CONV]
    conv[2]["loss"] = False
    runs = trained_runs(tok, ChatEncoder(tok, loss_scale="default").encode({"messages": conv}))
    assert runs == EXPECTED[family][1]
    conv[2]["loss"], conv[4]["loss"] = True, False
    runs = trained_runs(tok, ChatEncoder(tok, loss_scale="last_round").encode({"messages": conv}))
    assert runs == EXPECTED[family][0][:1]
    conv[2]["loss"] = False
    with pytest.raises(NothingToTrain):
        ChatEncoder(tok).encode({"messages": conv})


def test_ignore_empty_think_masks_only_the_empty_block(toks):
    tok = toks["qwen3"]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}]
    assert trained_runs(tok, ChatEncoder(tok).encode({"messages": conv})) == \
        ["<think>\n\n</think>\n\nanswer<|im_end|>"]
    e = ChatEncoder(tok, loss_scale="ignore_empty_think").encode({"messages": conv})
    assert trained_runs(tok, e) == ["answer<|im_end|>"]
    # a real think block is still trained
    conv[1]["reasoning_content"] = "because"
    e = ChatEncoder(tok, loss_scale="last_round+ignore_empty_think").encode({"messages": conv})
    assert trained_runs(tok, e) == ["<think>\nbecause\n</think>\n\nanswer<|im_end|>"]
    # an explicit empty think written in the content (the seeds' style) is masked too
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nx"}]
    assert trained_runs(tok, ChatEncoder(tok, loss_scale="ignore_empty_think").encode({"messages": conv})) == \
        ["x<|im_end|>"]


def test_system_flag_and_data_system(toks):
    tok = toks["qwen2"]
    enc = ChatEncoder(tok, system="be brief")
    e = enc.encode({"messages": CONV[1:3]})
    assert "be brief" in tok.decode(e.input_ids)
    e = enc.encode({"messages": CONV[:3]})  # the dataset's system wins
    assert "be brief" not in tok.decode(e.input_ids) and "sys" in tok.decode(e.input_ids)


def test_truncation(toks):
    tok = toks["qwen2"]
    rec = {"messages": CONV}
    n = len(ChatEncoder(tok).encode(rec).input_ids)
    with pytest.raises(TooLong):
        ChatEncoder(tok, max_length=n - 1).encode(rec)
    left = ChatEncoder(tok, max_length=n - 5, truncation_strategy="left").encode(rec)
    assert len(left.input_ids) == n - 5 and trained_runs(tok, left)[-1] == "ok fine<|im_end|>"
    right = ChatEncoder(tok, max_length=n - 5, truncation_strategy="right").encode(rec)
    assert len(right.input_ids) == n - 5
    with pytest.raises(NothingToTrain):  # the reply was cut away entirely
        ChatEncoder(tok, max_length=10, truncation_strategy="right").encode(rec)


def test_preference_pair_shares_prompt_tokens(toks):
    for family, tok in toks.items():
        rec = {"messages": CONV[:3], "rejected_messages": CONV[:2] + [{"role": "assistant", "content": "nope"}]}
        c, r = ChatEncoder(tok, loss_scale="last_round").encode_pair(rec)
        pc = next(i for i, x in enumerate(c.labels) if x != IGNORE)
        pr = next(i for i, x in enumerate(r.labels) if x != IGNORE)
        assert pc == pr and c.input_ids[:pc] == r.input_ids[:pr], family


def test_loss_scale_parsing():
    assert parse_loss_scale("last_round_with_ignore_empty_think", "default") == ("last_round", True)
    assert parse_loss_scale(None, "last_round") == ("last_round", False)
    with pytest.raises(ConfigError, match="unknown part"):
        parse_loss_scale("react", "default")


def test_template_without_chat_template_is_a_clear_error(toks):
    tok = build_tokenizer("qwen2")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        ChatEncoder(tok)
    e = ChatEncoder(tok, use_chat_template=False).encode({"messages": [{"role": "assistant", "content": "text"}]})
    assert tok.decode(e.input_ids) == "text<|im_end|>"


@pytest.mark.slow
def test_parallel_encoding_equals_serial(toks, tmp_path):
    from tunesmith.data.store import encode_rows
    tok = toks["qwen3"]
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a " * (i % 9 + 1)}]}
            for i in range(300)]
    srcs = [("mem", i + 1) for i in range(300)]
    enc = ChatEncoder(tok, max_length=22)
    serial, s1 = encode_rows(enc, recs, srcs, str(tmp_path / "serial"))
    parallel, s2 = encode_rows(enc, recs, srcs, str(tmp_path / "parallel"), num_proc=2)
    from tunesmith.data.encode import TooLong
    expected = []
    for r in recs:  # the encoder's own output, row by row, for the rows that fit
        try:
            expected.append(enc.encode(r))
        except TooLong:
            pass
    assert [(e.input_ids, e.labels) for e in serial] == [(e.input_ids, e.labels) for e in expected]
    assert [(e.input_ids, e.labels) for e in serial] == [(e.input_ids, e.labels) for e in parallel]
    assert s1 == s2 and s1["too_long"] > 0 and len(serial) + s1["too_long"] == 300

"""Tool-call (agent) data and conversational preference data: every documented shape normalises to one canonical
record, rendered by the model's own chat template, and the trained tokens are exactly the template's assistant turns
(checked against a rendering made here, with spans located by hand) — the text inference parses back into calls."""
import json
from dataclasses import replace

import pytest

from conftest import write_jsonl
from tunesmith.data.encode import IGNORE, ChatEncoder
from tunesmith.data.formats import normalise_row
from tunesmith.data.load import load_datasets
from tunesmith.errors import ConfigError, DataError
from tunesmith.testing import build_tokenizer

WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                          "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
SYSTEM = {"role": "system", "content": "You are a weather bot."}
USER = {"role": "user", "content": "What is the weather in Paris?"}
RESULT = '{"temp": 20, "sky": "clear"}'
FINAL = {"role": "assistant", "content": "It is 20 degrees and clear in Paris."}

# ms-swift's agent format: a `tools` JSON string, `tool_call` content as a JSON string, `tool_response`
SWIFT_ROW = {"tools": json.dumps(TOOLS), "messages": [
    SYSTEM, USER,
    {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"role": "tool_response", "content": RESULT}, FINAL]}
# OpenAI's: null content, arguments as a JSON string, call ids, a bare list of tools
OPENAI_ROW = {"tools": TOOLS, "messages": [
    SYSTEM, USER,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": RESULT}, FINAL]}
# what the template is given in the reference rendering: arguments as a mapping (templates apply `tojson`)
REFERENCE = [SYSTEM, USER,
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": RESULT}, FINAL]

# The assistant turns as each official template renders them, written out by hand: the call, then the answer.
TRAINED = {
    "qwen2": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              "It is 20 degrees and clear in Paris.<|im_end|>"],
    "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              "<think>\n\n</think>\n\nIt is 20 degrees and clear in Paris.<|im_end|>"],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
               "It is 20 degrees and clear in Paris.<|eot_id|>"],
    "gpt_oss": [' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
                "<|channel|>final<|message|>It is 20 degrees and clear in Paris.<|return|>"],
}


@pytest.fixture(scope="module")
def toks():
    return {f: build_tokenizer(f, official_template=True) for f in TRAINED}


def expected_labels(tok, full: str, trained: list[str]) -> list[int]:
    """Labels computed here: the given strings located in order in the template's own rendering; a token is trained
    when its first character lies in one of them."""
    spans, at = [], 0
    for text in trained:
        k = full.index(text, at)
        spans.append((k, k + len(text)))
        at = k + len(text)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    return [t if any(a <= s < b for a, b in spans) and e > s else IGNORE
            for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]


def trained_text(tok, enc) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_both_tool_call_forms_are_one_canonical_record():
    swift, openai = normalise_row(SWIFT_ROW), normalise_row(OPENAI_ROW)
    assert swift == openai == {"messages": REFERENCE, "tools": TOOLS}
    assert normalise_row(swift) == swift  # the canonical form (what `data convert` writes) loads as itself


@pytest.mark.parametrize("family", sorted(TRAINED))
def test_masks_equal_the_templates_own_rendering(toks, family):
    tok = toks[family]
    full = tok.apply_chat_template(REFERENCE, tools=TOOLS, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    for loss_scale, trained in (("default", TRAINED[family]), ("last_round", TRAINED[family][1:])):
        encoder = ChatEncoder(tok, loss_scale=loss_scale)
        a, b = encoder.encode(normalise_row(SWIFT_ROW)), encoder.encode(normalise_row(OPENAI_ROW))
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
        assert a.input_ids == ids, family
        assert a.labels == expected_labels(tok, full, trained), (family, loss_scale, trained_text(tok, a))
        assert RESULT not in "".join(trained_text(tok, a))  # tool results are never trained


@pytest.mark.parametrize("family", sorted(TRAINED))
def test_what_is_trained_is_what_inference_parses(toks, family):
    from tunesmith.inference.reply import OutputParser

    tok = toks[family]
    enc = ChatEncoder(tok, loss_scale="default").encode(normalise_row(OPENAI_ROW))
    call_turn = trained_text(tok, enc)[0]
    parsed = OutputParser(tok).parse(call_turn, tools=True, final=True)
    assert parsed.content == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == \
        [("get_weather", {"city": "Paris"})]


PARALLEL_SWIFT = {"tools": [WEATHER], "messages": [  # a bare function schema: wrapped as {"type": "function", ...}
    USER,
    {"role": "tool_call", "content": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"role": "tool_call", "content": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    {"role": "tool_response", "content": {"temp": 20}},
    {"role": "tool_response", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 20, Rome 25."}]}
PARALLEL_OPENAI = {"tools": json.dumps(TOOLS), "messages": [
    USER,
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    # results given out of order: matched back to their calls by tool_call_id, as ms-swift does
    {"role": "tool", "tool_call_id": "b", "content": '{"temp": 25}'},
    {"role": "tool", "tool_call_id": "a", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "Paris 20, Rome 25."}]}


def test_parallel_calls_are_one_turn_and_results_consecutive_tool_messages(toks):
    rec = normalise_row(PARALLEL_SWIFT)
    assert rec == normalise_row(PARALLEL_OPENAI)
    assert rec["tools"] == TOOLS
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["arguments"] for c in rec["messages"][1]["tool_calls"]] == [{"city": "Paris"},
                                                                                      {"city": "Rome"}]
    assert [m["content"] for m in rec["messages"][2:4]] == ['{"temp": 20}', '{"temp": 25}']
    tok = toks["qwen2"]
    enc = ChatEncoder(tok).encode(rec)
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>')
    assert trained_text(tok, enc) == [call, "Paris 20, Rome 25.<|im_end|>"]
    full = tok.decode(enc.input_ids)
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n</tool_response>\n<tool_response>\n"
            "{\"temp\": 25}\n</tool_response><|im_end|>") in full
    full = tok.apply_chat_template(rec["messages"], tools=TOOLS, tokenize=False)
    assert enc.labels == expected_labels(tok, full, [call, "Paris 20, Rome 25.<|im_end|>"])


def test_a_template_without_parallel_calls_refuses_the_row_rather_than_dropping_a_call(toks):
    with pytest.raises(DataError, match=r"renders 1 of the 2 call\(s\) to 'get_weather'"):
        ChatEncoder(toks["gpt_oss"]).encode(normalise_row(PARALLEL_SWIFT))
    with pytest.raises(DataError, match="template refuses this conversation: This model only supports single"):
        ChatEncoder(toks["llama3"]).encode(normalise_row(PARALLEL_SWIFT))  # Llama 3.1's template raises itself


def test_a_template_that_renders_no_tool_calls_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not render assistant tool_calls"):
        ChatEncoder(build_tokenizer("qwen2")).encode(normalise_row(SWIFT_ROW))  # the compact test template


def test_call_with_text_and_a_final_call_turn(toks):
    """A reply's text then its call (ms-swift: an assistant message followed by tool_call) is one turn; a row may end
    in a call (teaching when to call)."""
    row = {"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": "Let me check."},
                                        {"role": "tool_call", "content": '{"name": "get_weather", "arguments": '
                                                                         '{"city": "Paris"}}'}]}
    rec = normalise_row(row)
    assert rec["messages"][1] == {"role": "assistant", "content": "Let me check.", "tool_calls": REFERENCE[2][
        "tool_calls"]}
    tok = toks["qwen2"]
    enc = ChatEncoder(tok, loss_scale="last_round").encode(rec)
    assert trained_text(tok, enc) == ['Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Paris"}}\n</tool_call><|im_end|>']
    tok = toks["gpt_oss"]
    enc = ChatEncoder(tok).encode({"messages": REFERENCE[:3], "tools": TOOLS})
    assert trained_text(tok, enc) == [TRAINED["gpt_oss"][0]]


def test_a_reply_the_template_renders_differently_later_is_a_located_bad_row(toks, tmp_path):
    """gpt-oss renders the text next to a tool call as analysis and keeps it only in the last turn: that row cannot
    be trained as rendered. It is a bad row (file:line), dropped and counted under --strict false."""
    from tunesmith.data.encode import encode_one
    from tunesmith.data.store import encode_rows

    row = {"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": "Let me check."},
                                        {"role": "tool_call", "content": '{"name": "get_weather", "arguments": '
                                                                         '{"city": "Paris"}}'},
                                        {"role": "tool_response", "content": RESULT}, FINAL]}
    status, err = encode_one(ChatEncoder(toks["gpt_oss"]), normalise_row(row), "sft")
    assert status == "bad" and err.field == "messages"
    assert "cannot locate assistant reply 1 (with tool calls)" in err.problem and "gpt-oss" in err.fix
    rows = [normalise_row(r) for r in (SWIFT_ROW, row, OPENAI_ROW)]
    sources = [("agent.jsonl", i + 1) for i in range(3)]
    with pytest.raises(DataError, match="^agent.jsonl:2: field 'messages': cannot locate assistant reply 1"):
        encode_rows(ChatEncoder(toks["gpt_oss"]), rows, sources, str(tmp_path / "strict"))
    kept, stats = encode_rows(ChatEncoder(toks["gpt_oss"]), rows, sources, str(tmp_path / "lenient"), strict=False)
    assert len(kept) == 2 and stats["bad"] == 1 and stats["reasons"][0].startswith("agent.jsonl:2: field")
    assert encode_one(ChatEncoder(toks["qwen2"]), normalise_row(row), "sft")[0] == "ok"  # Qwen keeps the text


@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', {"city": "Paris"}, ' {"city":"Paris"} '])
def test_arguments_as_string_or_dict_and_content_null_or_empty_or_missing(arguments):
    for content in ({"content": None}, {"content": ""}, {}):
        row = {"tools": TOOLS, "messages": [SYSTEM, USER, {"role": "assistant", **content, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "content": RESULT}, FINAL]}
        assert normalise_row(row)["messages"] == REFERENCE, (arguments, content)
    swift = {"tools": TOOLS, "messages": [USER, {"role": "tool_call", "content": {"name": "get_weather", "arguments": arguments}},
                          {"role": "tool_response", "content": RESULT}, FINAL]}
    assert normalise_row(swift)["messages"][1] == REFERENCE[2]


@pytest.mark.parametrize("message,field", [
    ({"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": Paris}'}}]},
     "messages[1].tool_calls[0].function.arguments': is not valid JSON"),
    ({"role": "tool_call", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}'},
     "messages[1].content': is not valid JSON"),
    ({"role": "tool_call", "content": {"name": "get_weather", "arguments": "[1, 2]"}},
     "messages[1].content.arguments': expected a JSON object of arguments, got list"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
     "messages[1].tool_calls[0].function.name': expected the function's name"),
    ({"role": "assistant", "content": None}, "messages[1].content': is null"),
])
def test_bad_tool_calls_name_file_line_and_field(tmp_path, message, field):
    good = {"messages": [USER, FINAL]}
    p = write_jsonl(tmp_path / "agent.jsonl", [good, good, {"tools": TOOLS, "messages": [
        USER, message, {"role": "tool", "content": RESULT}, FINAL]}])
    with pytest.raises(DataError) as e:
        load_datasets([p])
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: field '{field}"), msg
    assert "Fix:" in msg


def test_tools_column_padding_from_arrow_is_dropped():
    padded = {"type": "function", "function": {**WEATHER, "strict": None, "parameters": {
        **WEATHER["parameters"], "properties": {"city": {"type": "string", "description": "the city", "enum": None},
                                                "unit": None}}}}
    rec = normalise_row({"tools": [padded], "messages": [USER, FINAL]})
    assert rec["tools"] == [{"type": "function", "function": {**WEATHER, "parameters": {
        **WEATHER["parameters"], "properties": {"city": {"type": "string", "description": "the city", "enum": None}}}}}]


def test_data_inspect_shows_tool_rows(tmp_path, capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "agent.jsonl", [SWIFT_ROW, PARALLEL_OPENAI])
    assert main(["data", "inspect", "--dataset", data, "--num_rows", "2"]) == 0  # built-in tokenizer, tool-capable
    out = capsys.readouterr().out
    assert f"[[{TRAINED['qwen2'][0]}]]" in out and "<tool_response>\n" + RESULT + "\n</tool_response>" in out
    tok_dir = str(tmp_path / "llama")
    build_tokenizer("llama3", official_template=True).save_pretrained(tok_dir)
    assert main(["data", "inspect", "--dataset", data, "--model", tok_dir]) == 0
    assert f"[[{TRAINED['llama3'][0]}]]" in capsys.readouterr().out


def test_data_commands_without_a_model_check_tool_rows_with_the_named_template(tmp_path, capsys):
    """Without --model, inspect/validate/stats use the built-in tokenizer of --template's family with its official
    (tool-rendering) template: a row that template refuses (Llama 3.1: one call per turn) is located, not a crash;
    inspect goes on to the next row, validate counts it, stats drops it under --strict false like training."""
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "agent.jsonl", [PARALLEL_SWIFT, SWIFT_ROW])
    assert main(["data", "inspect", "--dataset", data, "--template", "llama3", "--num_rows", "2"]) == 0
    out = capsys.readouterr().out
    assert f"--- row 0 ({data}:1) messages: cannot be trained\n{data}:1: field 'messages': the chat template " \
           "refuses this conversation: This model only supports single tool-calls" in out
    assert f"[[{TRAINED['llama3'][0]}]]" in out  # row 1 still shown
    assert main(["data", "validate", "--dataset", data, "--template", "llama3"]) == 1
    out = capsys.readouterr().out
    assert out.count(f"{data}:1: field 'messages'") == 1 and "2 rows checked, 1 problem(s)." in out
    assert main(["data", "validate", "--dataset", data]) == 0  # Qwen2.5's template renders parallel calls
    capsys.readouterr()
    assert main(["data", "stats", "--dataset", data, "--template", "llama3"]) == 1  # strict: the first bad row
    assert f"error: {data}:1: field 'messages'" in capsys.readouterr().err
    assert main(["data", "stats", "--dataset", data, "--template", "llama3", "--strict", "false"]) == 0
    assert "rows: 1 (sft: 1), 1 bad rows dropped" in capsys.readouterr().out


def test_template_names_map_to_built_in_families_and_unknown_ones_are_errors(tmp_path, capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "agent.jsonl", [PARALLEL_SWIFT])
    assert main(["data", "validate", "--dataset", data, "--template", "llama3_1"]) == 1  # ms-swift's name: Llama 3.1
    assert "only supports single tool-calls" in capsys.readouterr().out
    assert main(["data", "validate", "--dataset", data, "--template", "mistral"]) == 1
    assert "--template mistral: no built-in tokenizer of that family" in capsys.readouterr().err
    assert main(["data", "inspect", "--dataset", data, "--row", "-1"]) == 1
    assert "expected --row >= 0" in capsys.readouterr().err


def test_a_tool_without_the_description_a_template_reads_names_tools(toks):
    bare = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"]}}
    with pytest.raises(DataError) as e:
        ChatEncoder(toks["gpt_oss"]).encode(normalise_row({**SWIFT_ROW, "tools": [bare]}))
    assert e.value.field == "tools" and 'give each function a "description"' in e.value.fix


def test_a_pair_whose_chosen_calls_a_tool_trains_every_turn_of_each_completion(toks):
    """chosen: call, result, answer; rejected: a direct answer. The completions start where the shared prompt
    ends, so under last_round (the preference default) the call is trained too, and the prompts agree."""
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    row = {"tools": TOOLS, "chosen": [USER, call, {"role": "tool", "content": RESULT}, FINAL],
           "rejected": [USER, {"role": "assistant", "content": "I do not know."}]}
    tok = toks["qwen2"]
    chosen, rejected = ChatEncoder(tok, loss_scale="last_round").encode_pair(normalise_row(row))
    assert trained_text(tok, chosen) == TRAINED["qwen2"] and trained_text(tok, rejected) == ["I do not know.<|im_end|>"]


def test_a_generated_call_and_the_gold_call_compare_equal_as_text():
    from tunesmith.commands.infer import calls_text

    generated = [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": '{"city": "Paris"}'}}]
    gold = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert calls_text(generated) == calls_text(gold) == '{"arguments": {"city": "Paris"}, "name": "get_weather"}'


# ---------------------------------------------------------------- conversational preference and KTO rows

Q = {"role": "user", "content": "What is 1+1?"}
GOOD = {"role": "assistant", "content": "It is 2."}
BAD = {"role": "assistant", "content": "I do not know."}


def pair_variants(system=None):
    """The same pair in every shape; the first is the plain prompt/chosen/rejected row they must encode like."""
    sysm = [{"role": "system", "content": system}] if system else []
    sysc = {"system": system} if system else {}
    return [
        {"prompt": Q["content"], "chosen": GOOD["content"], "rejected": BAD["content"], **sysc},
        {"prompt": sysm + [Q], "chosen": [GOOD], "rejected": [BAD]},                       # TRL explicit prompt
        {"chosen": sysm + [Q, GOOD], "rejected": sysm + [Q, BAD]},                          # TRL implicit prompt
        {"chosen": [Q, GOOD], "rejected": [Q, BAD], **sysc},                                # implicit + system column
        # HuggingFaceH4/ultrafeedback_binarized's layout: the prompt string and `messages` repeat the conversation
        {"prompt": Q["content"], "prompt_id": "0a1b", "chosen": sysm + [Q, GOOD], "rejected": sysm + [Q, BAD],
         "messages": sysm + [Q, GOOD], "score_chosen": 8.0, "score_rejected": 2.0},
    ]


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_conversational_pairs_encode_like_prompt_chosen_rejected(toks, family, system):
    enc = ChatEncoder(toks[family], default_loss_scale="last_round")
    base, *others = pair_variants(system)
    ref = enc.encode_pair(normalise_row(base))
    for row in others:
        got = enc.encode_pair(normalise_row(row))
        assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in ref], row


def test_implicit_pair_multi_turn_and_with_tool_calls():
    turns = [Q, {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2+2?"}]
    rec = normalise_row({"chosen": turns + [GOOD], "rejected": turns + [BAD]})
    assert rec == normalise_row({"messages": turns + [GOOD], "rejected_response": BAD["content"]})
    # the chosen side calls a tool first: everything after the shared prompt is its reply
    calls = OPENAI_ROW["messages"][2:]
    rec = normalise_row({"tools": TOOLS, "chosen": [USER] + calls, "rejected": [USER, BAD]})
    trained = [{**m, "loss": True} if m["role"] == "assistant" else m for m in REFERENCE[2:]]  # every turn of it
    assert rec["messages"] == [USER] + trained and rec["rejected_messages"] == [USER, BAD]


@pytest.mark.parametrize("row,fragment", [
    ({"chosen": [Q, GOOD], "rejected": [{"role": "user", "content": "What is 2+2?"}, BAD]},
     "field 'chosen[0]': the two conversations differ from this user message on"),
    ({"chosen": [Q, GOOD, {"role": "user", "content": "more"}, GOOD], "rejected": [Q, BAD]},
     "field 'chosen[2]': the two conversations differ from this user message on"),
    ({"chosen": [Q, GOOD], "rejected": [Q]}, "field 'rejected': has no reply of its own"),
    ({"chosen": [Q, GOOD], "rejected": [Q, GOOD]}, "identical to the chosen reply"),
])
def test_implicit_pairs_that_do_not_share_a_prompt_are_errors(tmp_path, row, fragment):
    p = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_datasets([p])
    assert str(e.value).startswith(f"{p}:1: ") and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("label", [True, False])
def test_kto_conversational_rows_encode_like_messages_and_label(toks, label):
    enc = ChatEncoder(toks["qwen2"], default_loss_scale="last_round")
    ref = normalise_row({"messages": [Q, GOOD], "label": label})
    assert ref["label"] is label
    for row in ({"prompt": [Q], "completion": [GOOD], "label": label},                # TRL explicit prompt
                {"prompt": Q["content"], "completion": [GOOD], "label": label},
                {"prompt": [Q], "completion": GOOD["content"], "label": label},
                {"completion": [Q, GOOD], "label": label},                           # TRL implicit prompt
                {"prompt": [Q], "completion": GOOD, "label": int(label)}):
        rec = normalise_row(row)
        assert rec == ref, row
        e, r = enc.encode(rec), enc.encode(ref)
        assert (e.input_ids, e.labels) == (r.input_ids, r.labels)
    # with a system column and a tool call in the completion
    rec = normalise_row({"system": SYSTEM["content"], "prompt": [USER], "completion": OPENAI_ROW["messages"][2:],
                         "tools": TOOLS, "label": label})
    assert rec == {"messages": REFERENCE, "tools": TOOLS, "label": label}


@pytest.mark.slow
def test_sft_on_tool_call_rows_makes_deploy_answer_with_tool_calls(tiny_models, tmp_path):
    """A short SFT on ms-swift-style agent rows (tiny model, official Qwen2.5 template), then the OpenAI API of
    `tunesmith deploy`'s app: a held-out question comes back as a parsed `tool_calls` reply."""
    import openai
    from transformers import AutoTokenizer

    from conftest import serve_on_a_thread
    from tunesmith.config.parser import parse_args
    from tunesmith.inference.chat import ChatEngine
    from tunesmith.serve.app import create_app
    from tunesmith.train import recipe

    model_dir = tiny_models("qwen2", official_template=True)
    rows = [{"tools": json.dumps(TOOLS), "messages": [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": city}})}]}
        for city in ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito")]
    data = write_jsonl(tmp_path / "agent.jsonl", rows)
    res = recipe.main(parse_args("sft", [
        "--model", model_dir, "--dataset", data, "--max_steps", "60", "--learning_rate", "3e-3", "--train_type", "full",
        "--per_device_train_batch_size", "6", "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "constant",
        "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--save_strategy", "no"]))
    chat = ChatEngine(res["model"].eval(), AutoTokenizer.from_pretrained(model_dir))
    # the server stops at the end of this block; the engine is ours and stays open for `tunesmith infer` below
    with serve_on_a_thread(create_app(chat, {"agent": None})) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="agent", tools=TOOLS, temperature=0, max_tokens=40, messages=[
            {"role": "user", "content": "What is the weather in Rome?"}])  # a city never seen in training
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)

    # `tunesmith infer` on held-out agent rows: the gold call is kept (labels in ms-swift's tool_call form, and as
    # OpenAI calls), the generated call is parsed next to it
    from types import SimpleNamespace

    from tunesmith.commands.infer import batch_infer

    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"tools": TOOLS, "messages": [
        {"role": "user", "content": "What is the weather in Rome?"},
        {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})}]}])
    loaded = load_datasets([held_out], need_reply=False, keep_columns=True)
    chat.defaults = replace(chat.defaults, temperature=0.0, max_new_tokens=40)
    batch_infer(chat, SimpleNamespace(stream=False, max_batch_size=1, metric=None), loaded,
                str(tmp_path / "result.jsonl"))
    (line,) = [json.loads(x) for x in open(tmp_path / "result.jsonl")]
    assert json.loads(line["labels"]) == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert line["label_tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Rome"}}}]
    assert line["finish_reason"] == "tool_calls" and line["tool_calls"][0]["function"]["name"] == "get_weather"
    assert line["messages"][-1]["tool_calls"] == line["tool_calls"]
    chat.close()

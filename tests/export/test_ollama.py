"""The Ollama Modelfile (tunesmith/export/ollama.py): its TEMPLATE, run by Go's text/template as Ollama runs it
(tests/export/go_render, which mirrors how Ollama turns a chat request into template data), renders exactly the
prompt the model's Hugging Face chat template renders — for the tiny models' compact templates and the families'
official ones (Qwen2.5, Qwen3, Llama 3.1, gpt-oss): system prompt, none (a default system prompt), multi-turn, tool
calls, reasoning. The Modelfile reads back through a port of Ollama's parser; unknown families and replaced chat
templates are refused with the reason."""
import json
import os
import re
import shutil
import subprocess

import pytest

from tunesmith.errors import ConfigError
from tunesmith.export import ollama
from tunesmith.testing import build_tokenizer

GO_MISSING = ("Go not installed (apt install golang-go): the Modelfile TEMPLATE is rendered with Go's text/template "
              "as Ollama does")
HARNESS = os.path.join(os.path.dirname(__file__), "go_render")


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """The Go renderer, built once per session (offline, standard library only)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip(GO_MISSING)
    version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()
    if tuple(map(int, re.match(r"go(\d+)\.(\d+)", version).groups())) < (1, 18):
        pytest.skip(f"{version} is older than Go 1.18, whose text/template stops `and`/`or` at the first decisive "
                    "argument as the templates (and the Go Ollama is built with) rely on")
    root = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(root / "cache"), "GOPATH": str(root / "path"), "GOTMPDIR": str(root),
           "GOFLAGS": "", "GO111MODULE": "on", "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    binary = root / "go_render"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=HARNESS, env=env, check=True, timeout=300)
    return str(binary)


def run_go(binary, template, messages, tools=None, think=None, system="", harmony=False, ollama_0_9=False) -> dict:
    """Ollama's rendering of a chat request: {"prompt", "think_tags", "tool_tag"} (ollama_0_9: with the narrower
    template data of Ollama 0.9)."""
    request = {"template": template, "system": system, "messages": [to_ollama(m) for m in messages],
               "tools": tools, "think": think, "harmony": harmony, "ollama_0_9": ollama_0_9}
    out = subprocess.run([binary], input=json.dumps(request), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def to_ollama(message: dict) -> dict:
    """A Hugging Face chat message as a client sends it to Ollama's /api/chat (reasoning in `thinking`)."""
    out = {"role": message["role"], "content": message.get("content", "")}
    if message.get("reasoning_content") or message.get("thinking"):
        out["thinking"] = message.get("reasoning_content") or message.get("thinking")
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                             for c in message["tool_calls"]]
    return out


@pytest.fixture(scope="session")
def toks():
    """The tiny tokenizers (family, official template?) -> tokenizer, built once per session (about a second)."""
    return {(family, official): build_tokenizer(family, official_template=official) for family, official in VARIANTS}


def hf_prompt(tok, messages, tools=None, **kwargs) -> str:
    """The prompt transformers renders, less the leading BOS text (llama.cpp adds BOS as a token; Ollama's
    templates leave it out): asserted present where the template writes it."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   **({"add_generation_prompt": True} | kwargs))
    if tok.bos_token:
        assert text.startswith(tok.bos_token)
        text = text[len(tok.bos_token):]
    return text


def template_for(tok, family: str, system: str | None = None) -> str:
    """The TEMPLATE of the Modelfile written for the tokenizer's model."""
    text = ollama.modelfile(source="./m.gguf", model_type=family, chat_template=tok.chat_template, tokenizer=tok,
                            system=system)
    return dict(parse_modelfile(text))["template"]


# ---- Ollama's Modelfile parser -------------------------------------------------------------------------------------


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama reads a Modelfile: a port of parser/parser.go ParseFile (github.com/ollama/ollama
    at fb30760), its state machine and its unquote — a value ends at the first line break where what was read,
    trimmed, is complete (bare, "...", or \"\"\"...\"\"\"); characters strconv.IsPrint rejects are dropped unless
    they are the line break or space that could have ended the value."""
    commands, state, buf, name = [], "nil", "", None

    def unquote(s):
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    def step(ch):  # parseRuneForState: (next state, the rune to keep or None)
        space, newline = ch in " \t", ch in "\r\n"
        if state == "nil":
            return ("comment", None) if ch == "#" else ("nil", None) if space or newline else ("name", ch)
        if state == "name":
            assert ch.isascii() and (ch.isalpha() or space), f"invalid command character {ch!r}"
            return ("name", ch) if ch.isalpha() else ("value", None)
        if state == "parameter":
            assert ch.isascii() and (ch.isalnum() or ch == "_" or space), f"invalid parameter character {ch!r}"
            return ("value", None) if space else ("parameter", ch)
        if state == "comment":
            return ("nil", None) if newline else ("comment", None)
        return ("nil", ch) if space or newline else ("value", ch)

    for ch in text:
        nxt, kept = step(ch)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                assert word in ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                                "parameter", "message", "requires"), f"invalid command {buf!r}"
                nxt = "parameter" if word == "parameter" else nxt
                name = {"from": "model"}.get(word, word)
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or ch in " \t":
                    buf += kept
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if kept is not None and kept.isprintable():
            buf += kept
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, "unexpected end of file inside a quoted value"
        commands.append((name, value))
    else:
        assert state in ("nil", "comment"), "unexpected end of file"
    assert any(n == "model" for n, _ in commands), "no FROM line"
    return commands


# ---- chats -----------------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather & more <for a city>",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. \"Paris\""},
        "days": {"type": "array", "items": {"type": "integer"}, "description": "Days ahead"},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time.",
                                          "parameters": {"type": "object", "properties": {}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "Paris."}
USER2 = {"role": "user", "content": "And of Italy? 你好"}
TOOL_CALL = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris", days=[1, 2],
                                                                     unit="c")]}
TOOL_RESULT = {"role": "tool", "content": '{"temp": 20, "sky": "clear & <calm>"}'}

CHATS = {
    "system + user": ([SYSTEM, USER], None),
    "user alone (default system prompt)": ([USER], None),
    "multi-turn": ([SYSTEM, USER, ANSWER, USER2], None),
    "multi-turn without system": ([USER, ANSWER, USER2], None),
    "tool round trip": ([SYSTEM, {"role": "user", "content": "Weather in Paris?"}, TOOL_CALL, TOOL_RESULT],
                        [WEATHER, CLOCK]),
    "tool round trip without system": ([{"role": "user", "content": "Weather in Paris?"}, TOOL_CALL, TOOL_RESULT],
                                       [WEATHER]),
    "two calls, two results, then an answer and a question": (
        [{"role": "user", "content": "Weather and time?"},
         {"role": "assistant", "content": "Checking both.", "tool_calls": [call("get_weather", city="Rome"),
                                                                           call("now")]},
         {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "12:00"},
         {"role": "assistant", "content": "Sunny, noon."}, {"role": "user", "content": "Thanks!"}],
        [WEATHER, CLOCK]),
}
THINKING_CHATS = {
    "reasoning in history (dropped)": ([USER, {**ANSWER, "reasoning_content": "Capital of France."}, USER2], None),
    "reasoning in a tool loop (kept)": (
        [{"role": "user", "content": "Weather in Paris?"},
         {**TOOL_CALL, "reasoning_content": "I should call the tool."}, TOOL_RESULT], [WEATHER]),
    "reasoning, tool loop, answer, new question": (
        [{"role": "user", "content": "Weather in Paris?"}, {**TOOL_CALL, "reasoning_content": "Call it."}, TOOL_RESULT,
         {"role": "assistant", "content": "20 degrees.", "reasoning_content": "Read the result."},
         {"role": "user", "content": "And tomorrow?"}], [WEATHER]),
}
# family, official template?, the chats it renders (compact tiny templates render no tools)
VARIANTS = [("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True), ("llama", False), ("llama", True),
            ("gpt_oss", False), ("gpt_oss", True)]


def cases():
    for family, official in VARIANTS:
        chats = {**CHATS, **(THINKING_CHATS if family in ("qwen3", "gpt_oss") else {})}
        for name, (messages, tools) in chats.items():
            if tools and not official:
                continue
            if family == "llama" and any(len(m.get("tool_calls", [])) > 1 for m in messages):
                continue  # Llama 3.1's template raises: "This model only supports single tool-calls at once!"
            yield pytest.param(family, official, messages, tools,
                               id=f"{family}-{'official' if official else 'compact'}-{name}")


@pytest.mark.parametrize("family,official,messages,tools", list(cases()))
def test_the_template_renders_the_chat_templates_prompt(toks, go_render, family, official, messages, tools):
    tok = toks[family, official]
    got = run_go(go_render, template_for(tok, family), messages, tools=tools, harmony=family == "gpt_oss")
    assert got["prompt"] == hf_prompt(tok, messages, tools=tools)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "gpt_oss"])
def test_the_templates_read_only_what_ollama_0_9_has(toks, go_render, family):
    """Go templates fail on a struct field the data lacks: the tool chats render the same with Ollama 0.9's types
    (the first Ollama with .Thinking and .IsThinkSet), so the Modelfile works there too."""
    tok = toks[family, True]
    for messages, tools in [CHATS["tool round trip"], CHATS["tool round trip without system"],
                            THINKING_CHATS["reasoning in a tool loop (kept)"]]:
        got = run_go(go_render, template_for(tok, family), messages, tools=tools, harmony=family == "gpt_oss",
                     ollama_0_9=True)
        assert got["prompt"] == hf_prompt(tok, messages, tools=tools)


def test_every_tiny_template_is_recognised(toks):
    for family, official in VARIANTS:
        tok = toks[family, official]
        assert ollama.ollama_problem(family, tok.chat_template, tok) is None, (family, official)


def test_ollama_reads_the_thinking_and_tool_call_tags_it_needs(toks, go_render):
    """Ollama parses a model's output with tags it reads off TEMPLATE (thinking/template.go InferTags,
    tools/template.go parseTag): Qwen3's reasoning between <think> tags, Qwen's calls after <tool_call>, Llama's
    calls as bare JSON ("{"). gpt-oss output goes through Ollama's harmony parser instead."""
    def tags(family, official):
        return run_go(go_render, template_for(toks[family, official], family), [USER])

    assert tags("qwen3", True)["think_tags"] == ["<think>", "</think>"]
    assert tags("qwen3", False)["think_tags"] == ["<think>", "</think>"]
    assert tags("qwen2", True)["think_tags"] == ["", ""]
    assert tags("qwen2", True)["tool_tag"] == tags("qwen3", True)["tool_tag"] == "<tool_call>"
    assert tags("llama", True)["tool_tag"] == "{"


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("think,enable_thinking", [(None, None), (True, True), (False, False)])
def test_qwen3_think_flag_is_enable_thinking(toks, go_render, official, think, enable_thinking):
    """Ollama's `think` (unset: on, for a model whose template has thinking tags) is Qwen3's enable_thinking: off
    adds the empty think block after the generation prompt."""
    tok = toks["qwen3", official]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    got = run_go(go_render, template_for(tok, "qwen3"), [SYSTEM, USER], think=think)["prompt"]
    assert got == hf_prompt(tok, [SYSTEM, USER], **kwargs)
    assert got.endswith("<think>\n\n</think>\n\n") == (think is False)


@pytest.mark.parametrize("level", ["low", "high"])
def test_gpt_oss_think_level_is_reasoning_effort(toks, go_render, level):
    """Ollama's think levels set gpt-oss's `Reasoning:` line as the template's reasoning_effort does (the compact
    tiny template writes a fixed "medium", so only the official template is compared)."""
    tok = toks["gpt_oss", True]
    got = run_go(go_render, template_for(tok, "gpt_oss"), [SYSTEM, USER], think=level, harmony=True)["prompt"]
    assert got == hf_prompt(tok, [SYSTEM, USER], reasoning_effort=level)
    assert f"Reasoning: {level}\n" in got


def test_gpt_oss_dates_its_system_message_with_ollamas_current_date(toks):
    official, compact = template_for(toks["gpt_oss", True], "gpt_oss"), template_for(
        toks["gpt_oss", False], "gpt_oss")
    assert "Current date: {{ currentDate }}" in official  # strftime_now("%Y-%m-%d") in the model's template
    assert "Current date: 2025-08-12" in compact  # a fixed date stays fixed


@pytest.mark.parametrize("family,official", VARIANTS)
def test_a_final_assistant_message_is_continued(toks, go_render, family, official):
    """As in Ollama's own templates, a chat ending with an assistant message is a prefill: the reply continues it
    (Hugging Face: continue_final_message=True)."""
    tok = toks[family, official]
    chat = [SYSTEM, USER, {"role": "assistant", "content": "The capital is"}]
    got = run_go(go_render, template_for(tok, family), chat, harmony=family == "gpt_oss")["prompt"]
    assert got == hf_prompt(tok, chat, add_generation_prompt=False, continue_final_message=True)
    assert got.endswith("The capital is")


# ---- SYSTEM ---------------------------------------------------------------------------------------------------------

SYSTEM_PROMPTS = {
    "quotes and lines": 'Say "hi".\nThen say \'bye\'.',
    "triple quotes inside a line": 'He wrote """wow""" and left.',
    "ending in a quote": 'Reply with "yes"',
    "starting with a quote": '"Quoted" opening.',
    "ending in triple quotes": 'End with """',
    "spaces and tabs around": "  indented\twith tab  ",
    "a template-looking text": "Use {{ .Content }} literally.",
}
TEMPLATE_SYSTEM_PROMPTS = {  # a SYSTEM block cannot hold these: they go into TEMPLATE
    "a line ending in triple quotes": 'First line """\nsecond line {{ .Content }}',
    "a no-break space": "Keep\u00a0this together.",
    "an emoji sequence with zero-width joiners": "Family: \U0001F468\u200d\U0001F469\u200d\U0001F467.",
}


@pytest.mark.parametrize("name", list(SYSTEM_PROMPTS) + list(TEMPLATE_SYSTEM_PROMPTS))
@pytest.mark.parametrize("family", ["qwen2", "gpt_oss"])  # (Llama trims it: test_llama_contents_are_not_trimmed)
def test_the_system_prompt_survives_ollamas_parser(toks, go_render, family, name):
    """--system reaches the model exactly: in SYSTEM, read back by Ollama's parser and put first when a request has
    no system message (routes.go ChatHandler); or, when a SYSTEM block cannot hold it, in TEMPLATE as the system
    prompt of a chat that has none — the same prompt either way."""
    text = {**SYSTEM_PROMPTS, **TEMPLATE_SYSTEM_PROMPTS}[name]
    tok = toks[family, True]
    written = ollama.modelfile(source="./m.gguf", model_type=family, chat_template=tok.chat_template, tokenizer=tok,
                               system=text)
    commands = dict(parse_modelfile(written))
    if name in SYSTEM_PROMPTS:
        assert commands["system"] == text
    else:
        assert "system" not in commands and "the system prompt is in template" in written.lower()
    harmony, system = family == "gpt_oss", commands.get("system", "")
    got = run_go(go_render, commands["template"], [USER], system=system, harmony=harmony)["prompt"]
    assert got == hf_prompt(tok, [{"role": "system", "content": text}, USER])
    own = {"role": "system", "content": "A request's own system prompt."}  # replaces SYSTEM, as in Ollama
    assert run_go(go_render, commands["template"], [own, USER], system=system, harmony=harmony)["prompt"] == \
        hf_prompt(tok, [own, USER])


def test_the_modelfile_reads_back(toks):
    tok = toks["qwen3", True]
    written = ollama.modelfile(source="/models/run-1/merged", model_type="qwen3", chat_template=tok.chat_template,
                               tokenizer=tok, system="Be brief.",
                               generation={"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
                                           "max_new_tokens": 256, "seed": None})
    commands = parse_modelfile(written)
    assert commands[0] == ("model", "/models/run-1/merged")
    assert [c for c in commands if c[0] not in ("model", "template")] == [
        ("system", "Be brief."), ("stop", "<|im_end|>"), ("temperature", "0.7"), ("top_p", "0.9"), ("top_k", "20"),
        ("repeat_penalty", "1.05"), ("num_predict", "256")]
    assert dict(commands)["template"] == template_for(tok, "qwen3")


@pytest.mark.parametrize("family,stops", [("qwen2", ["<|im_end|>"]), ("qwen3", ["<|im_end|>"]),
                                          ("llama", ["<|eot_id|>"]), ("gpt_oss", ["<|return|>", "<|call|>"])])
def test_stop_parameters_are_the_end_of_turn_tokens(toks, family, stops):
    tok = toks[family, True]
    written = ollama.modelfile(source="./m.gguf", model_type=family, chat_template=tok.chat_template, tokenizer=tok)
    assert [v for n, v in parse_modelfile(written) if n == "stop"] == stops
    assert all(tok.convert_tokens_to_ids(s) != tok.unk_token_id for s in stops)


def test_given_stops_and_greedy_decoding(toks):
    tok = toks["qwen2", False]
    written = ollama.modelfile(source="./m.gguf", model_type="qwen2", chat_template=tok.chat_template, tokenizer=tok,
                               stops=["<|im_end|>", " END", "User:"], generation={"do_sample": False,
                                                                                 "temperature": 0.6})
    commands = parse_modelfile(written)
    assert [v for n, v in commands if n == "stop"] == ["<|im_end|>", " END", "User:"]
    assert ("temperature", "0") in commands  # do_sample=False decodes greedily
    with pytest.raises(ConfigError, match="top_p='high' is not a number"):
        ollama.modelfile(source="./m.gguf", model_type="qwen2", chat_template=tok.chat_template, tokenizer=tok,
                         generation={"top_p": "high"})
    with pytest.raises(ConfigError, match="line break"):
        ollama.modelfile(source="./m\n.gguf", model_type="qwen2", chat_template=tok.chat_template, tokenizer=tok)


def test_create_hint():
    assert ollama.ollama_create_hint("out/run 1/Modelfile", "my-model") == \
        "ollama create my-model -f 'out/run 1/Modelfile'\nollama run my-model"


# ---- refusals -------------------------------------------------------------------------------------------------------

LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def test_a_family_without_a_template_is_refused():
    problem = ollama.ollama_problem("mistral", LLAMA2)
    assert "model_type 'mistral'" in problem and "qwen2, qwen3, llama, gpt_oss" in problem
    assert "no chat template" in ollama.ollama_problem("qwen2", None)


@pytest.mark.parametrize("family,template,probe", [
    ("llama", LLAMA2, "a system prompt and a question"),  # a Llama 2 model: [INST], not Llama 3 headers
    ("qwen2", None, "a system prompt and a question"),  # Qwen2.5's template with a newline lost after a turn
    ("qwen3", None, "reasoning in an earlier turn"),  # a Qwen3 template that keeps old reasoning
    ("gpt_oss", None, "a system prompt and a question"),  # system prompt as a system message, not instructions
])
def test_a_replaced_chat_template_is_refused(toks, family, template, probe):
    official = toks[family, True].chat_template
    template = template or {
        "qwen2": official.replace("message.content + '<|im_end|>' + '\\n'", "message.content + '<|im_end|>'"),
        "qwen3": official.replace("loop.index0 > ns.last_query_index", "true"),
        "gpt_oss": official.replace('"# Instructions\\n\\n"', '""'),
    }[family]
    assert template != official or family == "llama"
    problem = ollama.ollama_problem(family, template)
    assert problem and f"for {probe} it gives" in problem and "would prompt the model differently" in problem
    with pytest.raises(ConfigError, match="prompt the model differently"):
        ollama.modelfile(source="./m.gguf", model_type=family, chat_template=template, tokenizer=toks[family, True])


# ---- what Go templates cannot do ------------------------------------------------------------------------------------


def test_llama_contents_are_not_trimmed(toks, go_render):
    """Llama 3's template trims each message (`| trim`); Go's text/template has no trim (Ollama registers none), so
    the TEMPLATE uses a message as sent: equal prompts whenever contents carry no surrounding whitespace."""
    tok = toks["llama", True]
    padded = [SYSTEM, {"role": "user", "content": "  What is the capital of France?\n"}]
    got = run_go(go_render, template_for(tok, "llama"), padded)["prompt"]
    assert hf_prompt(tok, padded) == hf_prompt(tok, [SYSTEM, USER])
    assert got == hf_prompt(tok, padded).replace(USER["content"], padded[1]["content"])


def test_tool_arguments_come_in_sorted_key_order(toks, go_render):
    """Ollama gives templates a tool call's arguments as a Go map, whose keys a template can only visit sorted:
    arguments written in another order render sorted (the order of JSON keys, not their content, differs)."""
    tok = toks["qwen2", True]
    unsorted = [USER, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", unit="c", city="Oslo")]},
                TOOL_RESULT]
    got = run_go(go_render, template_for(tok, "qwen2"), unsorted, tools=[WEATHER])["prompt"]
    assert '"arguments": {"city": "Oslo", "unit": "c"}' in got
    resorted = [USER, {**unsorted[1], "tool_calls": [call("get_weather", city="Oslo", unit="c")]}, TOOL_RESULT]
    assert got == hf_prompt(tok, resorted, tools=[WEATHER])


def test_a_dated_llama_template_carries_the_export_date(go_render):
    """Llama 3.2's template writes today's date as "%d %b %Y"; Ollama's currentDate writes only YYYY-MM-DD, so the
    Modelfile fixes the export date (and says so)."""
    tok = build_tokenizer("llama", official_template=True)
    tok.chat_template = tok.chat_template.replace('"26 Jul 2024"', 'strftime_now("%d %b %Y")')
    written = ollama.modelfile(source="./m.gguf", model_type="llama", chat_template=tok.chat_template, tokenizer=tok)
    assert "carries the export date" in written
    got = run_go(go_render, dict(parse_modelfile(written))["template"], [SYSTEM, USER])["prompt"]
    assert got == hf_prompt(tok, [SYSTEM, USER])


@pytest.mark.slow
def test_a_saved_tiny_model_folder(go_render, tiny_models):
    """The path `tunesmith export` takes: the chat template read back from a saved model folder."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny_models("qwen2", official_template=True)
    tok, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    written = ollama.modelfile(source=folder, model_type=config.model_type, chat_template=tok.chat_template,
                               tokenizer=tok, system="Be brief.")
    commands = dict(parse_modelfile(written))
    chat, tools = CHATS["tool round trip without system"]
    got = run_go(go_render, commands["template"], chat, tools=tools, system=commands["system"])["prompt"]
    assert got == hf_prompt(tok, [{"role": "system", "content": "Be brief."}] + chat, tools=tools)


@pytest.mark.parametrize("think", [None, False, True])
def test_a_run_trained_without_thinking_prompts_without_it(toks, go_render, think):
    """A Qwen3 run trained with --enable_thinking false (its checkpoint's setting reaches the Modelfile) is prompted
    as training did, with the empty think block, whatever `think` says: Ollama sets think on by default for a model
    with think tags, so the default cannot be told from a request."""
    tok = toks["qwen3", True]
    text = ollama.modelfile(source="./m.gguf", model_type="qwen3", chat_template=tok.chat_template, tokenizer=tok,
                            enable_thinking=False)
    template = next(v for n, v in parse_modelfile(text) if n == "template")
    got = run_go(go_render, template, [SYSTEM, USER], think=think)["prompt"]
    assert got == hf_prompt(tok, [SYSTEM, USER], enable_thinking=False)

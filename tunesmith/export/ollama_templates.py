"""The Go templates (Ollama's `TEMPLATE`, run by Go's text/template) for the chat formats tunesmith exports:
ChatML (Qwen2/Qwen2.5, Qwen3 with its think blocks), Llama 3.x and gpt-oss harmony. Each renders, from Ollama's
template data (`.Messages` [{Role, Content, Thinking, ToolCalls [{Function {Name, Arguments}}]}], `.Tools`,
`.Think`, `.ThinkLevel`, `.IsThinkSet`; github.com/ollama/ollama template/template.go), the prompt the model's
Hugging Face chat template renders with `add_generation_prompt=True` — see tests/export/test_ollama.py, which runs
them through Go's text/template.

Written after the models' own templates (tunesmith/assets/chat_templates: Qwen2.5, Qwen3, Llama 3.1, gpt-oss) and in
the style of Ollama's published library templates (qwen2.5, qwen3, llama3.1, llama3.2, as mirrored in
github.com/huggingface/huggingface.js packages/ollama-utils/src/chat-template-automap.ts): the loop is
`range $i, $_ := .Messages` with `$last := eq (len (slice $.Messages $i)) 1`, a final assistant message is a prefill
(no end-of-turn token, no new assistant header), thinking is `.Thinking` between literal `<think>` tags (Ollama
infers its thinking tags from them: thinking/template.go InferTags), a tool call's first text is its tag
(`<tool_call>`; tools/template.go parseTag reads it) and `$.IsThinkSet`/`$.Think` follow the request's `think`.
Ollama's own gpt-oss template was not available here; ours follows the model's harmony template.

What Go's text/template (with only Ollama's functions: json, currentDate, yesterdayDate) cannot do, and so differs
from the Hugging Face rendering:
- no string functions: Llama 3 trims every message (`| trim`), Qwen3 strips newlines around reasoning and splits
  `<think>` out of a content string; here contents are used as sent (Ollama's thinking parser already puts the
  reasoning in `thinking`, without the tags).
- JSON is written by the templates below with Python's separators (", " and ": ", as `tojson` writes): keys come in
  Go's sorted order (Ollama hands templates plain Go maps, so the order a client sent is lost), strings are quoted
  with Go's %q (equal to JSON for printable text, quotes, backslashes, \\n \\t \\r; other control characters and
  non-printable Unicode are escaped differently), numbers with Ollama's `json` (Go: 20.0 prints as 20).
- a tool's parameter schema keeps what Ollama's api.ToolProperty has kept since Ollama 0.9 (type, items, enum,
  description): nested object properties, anyOf and a property's own `required` are not rendered (Ollama 0.11 to 0.20
  added them; a template that reads a field an older Ollama lacks fails there), and a JSON-schema `default` or
  `nullable` is dropped by Ollama before any template sees it.

Ollama 0.9 or later (May 2025: `.Thinking`, `.IsThinkSet`); the gpt-oss template also uses `.ThinkLevel` and
`currentDate` (0.11, August 2025, the first Ollama to run gpt-oss).
"""
from __future__ import annotations

import re

# ---- literal text --------------------------------------------------------------------------------------------------


def go_string(text: str) -> str:
    """`text` as a Go interpreted string literal: quotes, backslashes and line breaks escaped, and every character
    Go's strconv.IsPrint rejects (Python's str.isprintable is the same rule) as \\u/\\U, so that Ollama's Modelfile
    parser, which drops non-printable characters (parser/parser.go), never sees one."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def go_text(text: str) -> str:
    """`text` for a template's body: as itself when it is plain (printable, line breaks and tabs, no `{{`, no triple
    quote), else as a `{{ "..." }}` action printing the Go string."""
    plain = all(ch.isprintable() or ch in "\n\t" for ch in text) and "{{" not in text and '"""' not in text
    return text if plain else "{{ " + go_string(text) + " }}"


# ---- JSON and TypeScript renderers (Go `define`s shared by the family templates) -----------------------------------
# Written with two shorthands, expanded by _fill: `Q(` for Go's %q quoting (`printf "%q" (`), and `@n` for a line
# break followed by n levels of 4-space indent (`tojson(indent=4)`).


def _fill(text: str) -> str:
    text = text.replace("Q(", 'printf "%q" (')
    return re.sub(r"@(\d)", lambda m: "\n" + " " * (4 * int(m.group(1))), text)


# Any JSON value Ollama decoded into Go: map[string]interface{}, []interface{}, string, float64, bool, nil.
JSON_DEFINES = _fill(
    '{{- define "json.value" }}{{ $t := printf "%T" . }}{{ if eq $t "string" }}{{ Q(.) }}'
    '{{ else if eq $t "map[string]interface {}" }}{{ template "json.object" . }}'
    '{{ else if eq $t "[]interface {}" }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ template "json.value" $v }}'
    '{{ end }}]{{ else }}{{ json . }}{{ end }}{{ end }}'
    '{{- define "json.object" }}{ {{- $sep := "" }}{{ range $k, $v := . }}{{ $sep }}{{ Q($k) }}: '
    '{{ template "json.value" $v }}{{ $sep = ", " }}{{ end }}}{{ end }}'
    # api.ToolProperty, in transformers' get_json_schema key order (type, items/enum, description): the fields it has
    # had since Ollama 0.9 (a field a struct lacks stops a Go template; anyOf, nested properties and required came
    # later, in 0.11 to 0.20)
    '{{- define "json.property" }}{ {{- $sep := "" }}'
    '{{ if .Type }}"type": {{ if eq (len .Type) 1 }}{{ Q(index .Type 0) }}{{ else }}[{{ range $i, $t := .Type }}'
    '{{ if $i }}, {{ end }}{{ Q($t) }}{{ end }}]{{ end }}{{ $sep = ", " }}{{ end }}'
    '{{ if .Items }}{{ $sep }}"items": {{ template "json.value" .Items }}{{ $sep = ", " }}{{ end }}'
    '{{ if .Enum }}{{ $sep }}"enum": {{ template "json.value" .Enum }}{{ $sep = ", " }}{{ end }}'
    '{{ if .Description }}{{ $sep }}"description": {{ Q(.Description) }}{{ $sep = ", " }}{{ end }}'
    '}{{ end }}'
    # a tool as `tool | tojson` writes the usual {"type", "function": {"name", "description", "parameters"}}
    '{{- define "json.tool" }}{"type": {{ Q(.Type) }}, "function": {"name": {{ Q(.Function.Name) }}'
    '{{ if .Function.Description }}, "description": {{ Q(.Function.Description) }}{{ end }}'
    '{{ with .Function.Parameters }}{{ if .Type }}, "parameters": {"type": {{ Q(.Type) }}, "properties": {'
    ' {{- $sep := "" }}{{ range $k, $v := .Properties }}{{ $sep }}{{ Q($k) }}: {{ template "json.property" $v }}'
    '{{ $sep = ", " }}{{ end }}}{{ if .Required }}, "required": [{{ range $i, $r := .Required }}{{ if $i }}, {{ end }}'
    '{{ Q($r) }}{{ end }}]{{ end }}}{{ end }}{{ end }}}}{{ end }}'
)

# The same tool as `tool | tojson(indent=4)` writes it (Llama 3.1 puts tools in the first user message this way).
JSON_INDENT_DEFINES = _fill(
    '{{- define "json.value5" }}{{ if and (eq (printf "%T" .) "map[string]interface {}") (len .) }}{ {{- $sep := "" }}'
    '{{ range $k, $v := . }}{{ $sep }}@6{{ Q($k) }}: {{ template "json.value" $v }}{{ $sep = "," }}{{ end }}@5}'
    '{{ else }}{{ template "json.value" . }}{{ end }}{{ end }}'
    '{{- define "json.property4" }}{ {{- $sep := "" }}'
    '{{ if .Type }}@5"type": {{ if eq (len .Type) 1 }}{{ Q(index .Type 0) }}{{ else }}[{{ range $i, $t := .Type }}'
    '{{ if $i }},{{ end }}@6{{ Q($t) }}{{ end }}@5]{{ end }}{{ $sep = "," }}{{ end }}'
    '{{ if .Items }}{{ $sep }}@5"items": {{ template "json.value5" .Items }}{{ $sep = "," }}{{ end }}'
    '{{ if .Enum }}{{ $sep }}@5"enum": [{{ range $i, $e := .Enum }}{{ if $i }},{{ end }}@6{{ template "json.value" $e }}'
    '{{ end }}@5]{{ $sep = "," }}{{ end }}'
    '{{ if .Description }}{{ $sep }}@5"description": {{ Q(.Description) }}{{ $sep = "," }}{{ end }}'
    '{{ if $sep }}@4}{{ else }}}{{ end }}{{ end }}'
    '{{- define "json.tool4" }}{@1"type": {{ Q(.Type) }},@1"function": {@2"name": {{ Q(.Function.Name) }}'
    '{{ if .Function.Description }},@2"description": {{ Q(.Function.Description) }}{{ end }}'
    '{{ with .Function.Parameters }}{{ if .Type }},@2"parameters": {@3"type": {{ Q(.Type) }},@3"properties": '
    '{{ if .Properties }}{ {{- $sep := "" }}{{ range $k, $v := .Properties }}{{ $sep }}@4{{ Q($k) }}: '
    '{{ template "json.property4" $v }}{{ $sep = "," }}{{ end }}@3}{{ else }}{}{{ end }}'
    '{{ if .Required }},@3"required": [{{ range $i, $r := .Required }}{{ if $i }},{{ end }}@4{{ Q($r) }}{{ end }}@3]'
    '{{ end }}@2}{{ end }}{{ end }}@1}@0}{{ end }}'
)

# A tool as gpt-oss's template declares it: a TypeScript-like signature in the `functions` namespace.
TS_DEFINES = (
    '{{- define "ts.type" }}{{ $t := "" }}{{ if eq (len .Type) 1 }}{{ $t = index .Type 0 }}{{ end }}'
    '{{ if eq $t "array" }}{{ if .Items }}{{ $it := index .Items "type" }}'
    '{{ if eq (printf "%v" $it) "string" }}string[]{{ else if or (eq (printf "%v" $it) "number") '
    '(eq (printf "%v" $it) "integer") }}number[]{{ else if eq (printf "%v" $it) "boolean" }}boolean[]'
    '{{ else if eq (printf "%v" $it) "object" }}object[]{{ else }}any[]{{ end }}{{ else }}any[]{{ end }}'
    '{{ else if gt (len .Type) 1 }}{{ range $i, $x := .Type }}{{ if $i }} | {{ end }}{{ $x }}{{ end }}'
    '{{ else if eq $t "string" }}{{ if .Enum }}{{ range $i, $e := .Enum }}{{ if $i }} | {{ end }}"{{ $e }}"{{ end }}'
    '{{ else }}string{{ end }}{{ else if or (eq $t "number") (eq $t "integer") }}number'
    '{{ else if eq $t "boolean" }}boolean{{ else if eq $t "object" }}object{{ else }}any{{ end }}{{ end }}'
    '{{- define "ts.tool" }}// {{ .Function.Description }}\ntype {{ .Function.Name }} = '
    '{{ with .Function.Parameters }}{{ if .Properties }}(_: {\n{{ $req := .Required }}{{ range $k, $v := .Properties }}'
    '{{ if $v.Description }}// {{ $v.Description }}\n{{ end }}{{ $k }}{{ $isReq := false }}'
    '{{ range $req }}{{ if eq . $k }}{{ $isReq = true }}{{ end }}{{ end }}{{ if not $isReq }}?{{ end }}: '
    '{{ template "ts.type" $v }},\n{{ end }}}) => any;\n\n{{ else }}() => any;\n\n{{ end }}{{ end }}{{ end }}'
)

# The first system message, if the conversation opens with one (Ollama puts the Modelfile's SYSTEM there when the
# request has none); `default` (a Go string literal, or "") stands in when it does not.
_LEADING_SYSTEM = (
    '{{- $hasSys := and .Messages (eq (index .Messages 0).Role "system") }}{{ $sys := @DEFAULT@ }}'
    '{{ if $hasSys }}{{ $sys = (index .Messages 0).Content }}{{ end }}{{ $sysOn := or $hasSys @HAS_DEFAULT@ }}'
)
# $last: the message is the conversation's last (then an assistant message is a prefill, left open).
_LAST = '{{ $last := eq (len (slice $.Messages $i)) 1 }}'


def _leading_system(default: str | None, roles=("system",)) -> str:
    text = _LEADING_SYSTEM.replace("@DEFAULT@", go_string(default or "")).replace(
        "@HAS_DEFAULT@", "true" if default is not None else "false")
    if len(roles) > 1:
        first = " ".join(f'(eq (index .Messages 0).Role "{r}")' for r in roles)
        text = text.replace('(eq (index .Messages 0).Role "system")', f"(or {first})")
    return text


# ---- ChatML: Qwen2 / Qwen2.5, Qwen3 --------------------------------------------------------------------------------

CHATML_TOOLS_LIST = '{{ range $.Tools }}\n{{ template "json.tool" . }}{{ end }}'
CHATML_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>" + CHATML_TOOLS_LIST + "\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
)


def chatml_template(*, default_system: str | None, tools: bool, thinking: bool, think_default: bool = True) -> str:
    """The Go template for ChatML as Qwen2.5 (`thinking=False`) and Qwen3 (`thinking=True`) write it.

    default_system: the system prompt used when the conversation has none (Qwen2.5's "You are Qwen, ...").
    tools: the model's template declares tools in the system message and writes `<tool_call>` JSON (the official
    templates), else tool definitions and calls are not rendered (the compact tiny templates).
    thinking: Qwen3 — `<think>` blocks of assistant turns after the last user message (`.Thinking`, kept in a tool
    loop, empty on a prefill), and an empty think block after the generation prompt when the request sets
    `think: false` (Hugging Face's `enable_thinking=False`) — or, with think_default=False (a run trained with
    --enable_thinking false), always: Ollama turns `think` on by default for a model whose template has think
    tags, so a default cannot be told from a request, and the model was trained to answer without thinking."""
    head = _leading_system(default_system)
    if thinking:
        head += ('{{ $lastUser := len .Messages }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}'
                 '{{ $lastUser = $i }}{{ end }}{{ end }}')
    system = "{{ if $sysOn }}<|im_start|>system\n{{ $sys }}<|im_end|>\n{{ end }}"
    if tools:
        system = ("{{ if $.Tools }}<|im_start|>system\n{{ if $sysOn }}{{ $sys }}\n\n{{ end }}" + CHATML_TOOLS_HEADER
                  + "{{ else }}" + system + "{{ end }}")
    think = ('{{ if and (gt $i $lastUser) (or $last .Thinking) }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}'
             if thinking else "")
    call = ('<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": '
            '{{ template "json.object" .Function.Arguments }}}\n</tool_call>')
    if not tools:
        assistant = "<|im_start|>assistant\n" + think + "{{ .Content }}"
    elif thinking:  # content, then each call on its own line
        assistant = ("<|im_start|>assistant\n" + think + "{{ .Content }}{{ $content := .Content }}{{ if .ToolCalls }}"
                     "{{ range $j, $_ := .ToolCalls }}{{ if or $j $content }}\n<tool_call>{{ else }}<tool_call>"
                     "{{ end }}" + call.removeprefix("<tool_call>") + "{{ end }}{{ end }}")
    else:  # Qwen2.5: "<|im_start|>assistant" + ("\n" + content) + ("\n<tool_call>..." for each call)
        assistant = ("<|im_start|>assistant{{ if or .Content (not .ToolCalls) }}\n{{ .Content }}{{ end }}"
                     "{{ if .ToolCalls }}{{ range .ToolCalls }}\n" + call + "{{ end }}{{ end }}")
    if tools:  # consecutive tool results share one user turn
        tool = ('{{ if ne $prev "tool" }}<|im_start|>user{{ end }}\n<tool_response>\n{{ .Content }}\n</tool_response>'
                '{{ if or $last (ne (index (slice $.Messages $i) 1).Role "tool") }}<|im_end|>\n{{ end }}')
    else:
        tool = "<|im_start|>user\n<tool_response>\n{{ .Content }}\n</tool_response><|im_end|>\n"
    no_think = "{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}" if thinking else ""
    if thinking and not think_default:
        no_think = "<think>\n\n</think>\n\n"
    return (
        (JSON_DEFINES if tools else "") + head + system
        + '{{ $prev := "" }}{{ range $i, $_ := .Messages }}' + _LAST
        + '{{ if and (eq $i 0) $hasSys }}{{ else if eq .Role "assistant" }}' + assistant
        + "{{ if not $last }}<|im_end|>\n{{ end }}"
        + '{{ else if eq .Role "tool" }}' + tool
        + "{{ else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ $prev = .Role }}{{ end }}"
        + '{{ if ne $prev "assistant" }}<|im_start|>assistant\n' + no_think + "{{ end }}"
    )


# ---- Llama 3.x -----------------------------------------------------------------------------------------------------

LLAMA_TOOLS_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.Do not use variables.\n\n"
)


def llama3_template(*, preamble: str, default_system: str | None, tools: bool) -> str:
    """The Go template for Llama 3.x's header format, without the leading `<|begin_of_text|>` (llama.cpp's tokenizer
    adds BOS, as for Ollama's own llama3 templates).

    preamble: what the model's template writes in the system turn before the system prompt ("Cutting Knowledge
    Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n"). default_system: the system prompt when there is none.
    tools: Llama 3.1's JSON tool calling — "Environment: ipython", the tool definitions (indented JSON) in the first
    user message, calls as {"name", "parameters"}, results in `ipython` turns as a JSON string; else tool calls are
    not rendered and results are plain `ipython` turns (the compact tiny template)."""
    head = _leading_system(default_system) + '{{ $first := 0 }}{{ if $hasSys }}{{ $first = 1 }}{{ end }}'
    env = "{{ if $.Tools }}Environment: ipython\n{{ end }}" if tools else ""
    system = "<|start_header_id|>system<|end_header_id|>\n\n" + env + go_text(preamble) + "{{ $sys }}<|eot_id|>"
    turns = ['{{ if lt $i $first }}']
    reply = "{{ .Content }}"
    if tools:
        turns.append(
            '{{ else if and $.Tools (eq $i $first) }}<|start_header_id|>user<|end_header_id|>\n\n' + LLAMA_TOOLS_PROMPT
            + '{{ range $.Tools }}{{ template "json.tool4" . }}\n\n{{ end }}{{ .Content }}<|eot_id|>'
            '{{ else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n'
            '{{ printf "%q" .Content }}<|eot_id|>')
        reply = ('{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": '
                 '{{ template "json.object" .Function.Arguments }}}{{ end }}{{ else }}{{ .Content }}{{ end }}')
    else:
        turns.append('{{ else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n'
                     '{{ .Content }}<|eot_id|>')
    turns.append('{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n' + reply
                 + '{{ if not $last }}<|eot_id|>{{ end }}'
                 '{{ else }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}')
    return (
        (JSON_DEFINES + JSON_INDENT_DEFINES if tools else "") + head + system
        + '{{ $prev := "" }}{{ range $i, $_ := .Messages }}' + _LAST + "".join(turns) + "{{ $prev = .Role }}{{ end }}"
        + '{{ if ne $prev "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
    )


# ---- gpt-oss harmony -----------------------------------------------------------------------------------------------

HARMONY_TOOLS_LINE = "\nCalls to these tools must go to the commentary channel: 'functions'."


def harmony_template(*, system_message: str, default_system: str | None, tools: bool) -> str:
    """The Go template for gpt-oss's harmony format.

    system_message: the Go template text of the system message's body as the model's template writes it (identity,
    knowledge cutoff, current date, reasoning effort, valid channels; see harmony_system_message).
    default_system: the developer instructions when the conversation has none. tools: the official template's tool
    namespace, `to=functions.NAME` calls, `functions.NAME` results as a JSON string; else (the compact tiny template)
    tools are not rendered, results are `functions.tool` turns and other roles keep their own header.
    A system (or developer) message that opens the conversation becomes the developer `# Instructions`; reasoning is
    rendered only for a prefilled final assistant turn (the model's template drops it from history); a final
    assistant message continues the `final` channel."""
    head = _leading_system(default_system, roles=("system", "developer"))
    tools_line = "{{ if $.Tools }}" + HARMONY_TOOLS_LINE + "{{ end }}" if tools else ""
    system = "<|start|>system<|message|>" + system_message + tools_line + "<|end|>"
    namespace = ('{{ if $.Tools }}# Tools\n\n## functions\n\nnamespace functions {\n\n{{ range $.Tools }}'
                 '{{ template "ts.tool" . }}{{ end }}} // namespace functions{{ end }}') if tools else ""
    developer = ("{{ if or (and $sysOn $sys) " + ("$.Tools" if tools else "false") + " }}<|start|>developer<|message|>"
                 "{{ if and $sysOn $sys }}# Instructions\n\n{{ $sys }}\n\n{{ end }}" + namespace + "<|end|>{{ end }}")
    final = "<|start|>assistant<|channel|>final<|message|>"
    analysis = "<|start|>assistant<|channel|>analysis<|message|>"
    calls = (
        '{{ if .ToolCalls }}{{ $future := false }}{{ range (slice $.Messages $i) }}'
        '{{ if and (eq .Role "assistant") (not .ToolCalls) }}{{ $future = true }}{{ end }}{{ end }}'
        '{{ if not $future }}{{ if .Content }}' + analysis + '{{ .Content }}<|end|>{{ else if .Thinking }}' + analysis
        + '{{ .Thinking }}<|end|>{{ end }}{{ end }}{{ with index .ToolCalls 0 }}<|start|>assistant to=functions.'
        '{{ .Function.Name }}<|channel|>commentary json<|message|>{{ template "json.object" .Function.Arguments }}'
        '<|call|>{{ $lastTool = .Function.Name }}{{ end }}{{ else if $last }}') if tools else "{{ if $last }}"
    assistant = (calls + "{{ if .Thinking }}" + analysis + "{{ .Thinking }}<|end|>{{ end }}" + final + "{{ .Content }}"
                 "{{ else }}" + final + '{{ .Content }}<|end|>{{ $lastTool = "" }}{{ end }}')
    if tools:
        tool = ('<|start|>functions.{{ $lastTool }} to=assistant<|channel|>commentary<|message|>{{ printf "%q" .Content }}'
                '<|end|>')
        other = '{{ else if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>'
    else:
        tool = "<|start|>functions.tool to=assistant<|channel|>commentary<|message|>{{ .Content }}<|end|>"
        other = "{{ else }}<|start|>{{ .Role }}<|message|>{{ .Content }}<|end|>"
    return (
        (JSON_DEFINES + TS_DEFINES if tools else "") + head + system + developer
        + '{{ $lastTool := "" }}{{ $prev := "" }}{{ range $i, $_ := .Messages }}' + _LAST
        + '{{ if and (eq $i 0) $hasSys }}{{ else if eq .Role "assistant" }}' + assistant
        + '{{ else if eq .Role "tool" }}' + tool + other + "{{ end }}{{ $prev = .Role }}{{ end }}"
        + '{{ if ne $prev "assistant" }}<|start|>assistant{{ end }}'
    )


def harmony_system_message(body: str, *, dated: bool, today: str) -> str:
    """The Go template text for gpt-oss's system message body as the model's template rendered it (`body`):
    `Reasoning: X` follows the request's think level (`.ThinkLevel`: low, medium, high; X when none is set), and
    when the model's template dates it with strftime_now (`dated`), `Current date: <today>` becomes Ollama's
    `{{ currentDate }}` (the same YYYY-MM-DD)."""
    text = go_text(body)
    m = re.search(r"Reasoning: (\w+)\n", text)
    if m:
        level = "{{ if $.ThinkLevel }}{{ $.ThinkLevel }}{{ else }}" + m.group(1) + "{{ end }}"
        text = text[:m.start()] + "Reasoning: " + level + "\n" + text[m.end():]
    if dated and f"Current date: {today}" in text:
        text = text.replace(f"Current date: {today}", "Current date: {{ currentDate }}")
    return text

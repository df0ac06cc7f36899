"""Ollama Modelfiles (`tunesmith export --to_ollama`): `FROM` the exported model, a `TEMPLATE` in Ollama's Go-template
form that renders the prompt the model's own chat template renders (system prompt, multi-turn, tool calls, Qwen3 and
gpt-oss reasoning), `PARAMETER stop` for its end-of-turn tokens, `SYSTEM` from the run's --system and PARAMETER lines
for its sampling defaults. Format: docs/modelfile.md and parser/parser.go in github.com/ollama/ollama.

The family's format is read off the model's chat template by rendering probe conversations with it (transformers'
own Jinja renderer) and comparing with what the family's TEMPLATE gives; what varies between models of one family is
taken from the rendering (Qwen2.5's default system prompt, Llama 3's dated system header, gpt-oss's system message),
and a template that renders differently is refused — the Modelfile would prompt the model unlike training did.
The templates themselves: tunesmith/export/ollama_templates.py.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shlex

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.export import ollama_templates as gotmpl

OLLAMA_FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "gpt_oss")

_NAMES = {"qwen2": "Qwen2/Qwen2.5 (ChatML)", "qwen3": "Qwen3 (ChatML with <think>)", "llama": "Llama 3",
          "gpt_oss": "gpt-oss (harmony)"}
_STYLE = {"qwen2": "chatml", "qwen3": "chatml", "llama": "llama3", "gpt_oss": "harmony"}
# End-of-turn tokens per format (each kept when the tokenizer has it), then the tokenizer's eos token.
_STOPS = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>", "<|eom_id|>"], "harmony": ["<|return|>", "<|call|>"]}
# generation config name -> Ollama PARAMETER (docs/modelfile.md "Valid Parameters and Values")
_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict"}
_MODELFILE_DOC = "https://github.com/ollama/ollama/blob/main/docs/modelfile.md"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A model's chat format as its template renders it: `style` chatml | llama3 | harmony; `tools`: it renders tool
    definitions and calls; `thinking`: Qwen3 think blocks; `default_system`: the system prompt it puts in when a
    conversation has none; `preamble`: Llama 3's system-turn text before the system prompt, or gpt-oss's system
    message body; `dated`: that text carries the date of rendering (strftime_now)."""
    style: str
    tools: bool
    thinking: bool = False
    default_system: str | None = None
    preamble: str = ""
    dated: bool = False


# ---- probe conversations --------------------------------------------------------------------------------------------

_S, _U1, _A1, _U2 = "Probe system prompt.", "First probe question?", "First probe answer.", "Second probe question?"
_R1, _RESULT = "Probe reasoning.", "Probe result."
_TOOL = {"type": "function", "function": {
    "name": "probe_lookup", "description": "Look up a probe.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to look up."}},
                   "required": ["query"]}}}
_CALL = {"type": "function", "function": {"name": "probe_lookup", "arguments": {"query": "probe"}}}


def _msg(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


# name -> (messages, tools, extra template kwargs); `needs`: the ChatFormat flag the probe checks, if any
_PROBES = {
    "a system prompt and a question": ([_msg("system", _S), _msg("user", _U1)], None, {}, None),
    "a question alone": ([_msg("user", _U1)], None, {}, None),
    "a multi-turn chat": ([_msg("system", _S), _msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2)],
                          None, {}, None),
    "reasoning in an earlier turn": ([_msg("user", _U1), _msg("assistant", _A1, reasoning_content=_R1),
                                      _msg("user", _U2)], None, {}, None),
    "thinking turned off": ([_msg("user", _U1)], None, {"enable_thinking": False}, "thinking"),
    "a tool call and its result": ([_msg("user", _U1), _msg("assistant", "", tool_calls=[_CALL]),
                                    _msg("tool", _RESULT)], [_TOOL], {}, "tools"),
    "reasoning in a tool loop": ([_msg("user", _U1), _msg("assistant", "", tool_calls=[_CALL], reasoning_content=_R1),
                                  _msg("tool", _RESULT)], [_TOOL], {}, "thinking+tools"),
}


def _expected_chatml(fmt: ChatFormat, probe: str) -> str:
    """What our ChatML TEMPLATE gives for a probe (Qwen2.5 / Qwen3)."""
    def turn(role, text):
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"

    default = turn("system", fmt.default_system) if fmt.default_system is not None else ""
    gen = "<|im_start|>assistant\n"
    call = '<tool_call>\n{"name": "probe_lookup", "arguments": {"query": "probe"}}\n</tool_call>'
    tools_system = ("<|im_start|>system\n" + (fmt.default_system + "\n\n" if fmt.default_system is not None else "")
                    + gotmpl.CHATML_TOOLS_HEADER.replace(gotmpl.CHATML_TOOLS_LIST, "\n" + json.dumps(_TOOL)))
    result = turn("user", f"<tool_response>\n{_RESULT}\n</tool_response>")
    return {
        "a system prompt and a question": turn("system", _S) + turn("user", _U1) + gen,
        "a question alone": default + turn("user", _U1) + gen,
        "a multi-turn chat": turn("system", _S) + turn("user", _U1) + turn("assistant", _A1) + turn("user", _U2) + gen,
        "reasoning in an earlier turn": default + turn("user", _U1) + turn("assistant", _A1) + turn("user", _U2) + gen,
        "thinking turned off": default + turn("user", _U1) + gen + "<think>\n\n</think>\n\n",
        "a tool call and its result": tools_system + turn("user", _U1) + turn("assistant", call) + result + gen,
        "reasoning in a tool loop": tools_system + turn("user", _U1)
        + turn("assistant", f"<think>\n{_R1}\n</think>\n\n{call}") + result + gen,
    }[probe]


def _expected_llama3(fmt: ChatFormat, probe: str) -> str:
    """What our Llama 3 TEMPLATE gives for a probe (no BOS: llama.cpp adds it)."""
    def turn(role, text):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"

    def system(text, tools=False):
        return turn("system", ("Environment: ipython\n" if tools else "") + fmt.preamble + text)

    gen = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    tools_user = gotmpl.LLAMA_TOOLS_PROMPT + json.dumps(_TOOL, indent=4) + "\n\n" + _U1
    return {
        "a system prompt and a question": system(_S) + turn("user", _U1) + gen,
        "a question alone": system("") + turn("user", _U1) + gen,
        "a multi-turn chat": system(_S) + turn("user", _U1) + turn("assistant", _A1) + turn("user", _U2) + gen,
        "reasoning in an earlier turn": system("") + turn("user", _U1) + turn("assistant", _A1) + turn("user", _U2)
        + gen,
        "a tool call and its result": system("", tools=True) + turn("user", tools_user)
        + turn("assistant", '{"name": "probe_lookup", "parameters": {"query": "probe"}}')
        + turn("ipython", json.dumps(_RESULT)) + gen,
    }[probe]


def _expected_harmony(fmt: ChatFormat, probe: str) -> str:
    """What our gpt-oss TEMPLATE gives for a probe."""
    def system(tools=False):
        return f"<|start|>system<|message|>{fmt.preamble}{gotmpl.HARMONY_TOOLS_LINE if tools else ''}<|end|>"

    def turn(role, text):
        return f"<|start|>{role}<|message|>{text}<|end|>"

    developer = turn("developer", f"# Instructions\n\n{_S}\n\n")
    final, gen = "<|start|>assistant<|channel|>final<|message|>", "<|start|>assistant"
    namespace = ("# Tools\n\n## functions\n\nnamespace functions {\n\n// Look up a probe.\ntype probe_lookup = (_: {\n"
                 "// What to look up.\nquery: string,\n}) => any;\n\n} // namespace functions")
    return {
        "a system prompt and a question": system() + developer + turn("user", _U1) + gen,
        "a question alone": system() + turn("user", _U1) + gen,
        "a multi-turn chat": system() + developer + turn("user", _U1) + final + _A1 + "<|end|>" + turn("user", _U2)
        + gen,
        "reasoning in an earlier turn": system() + turn("user", _U1) + final + _A1 + "<|end|>" + turn("user", _U2)
        + gen,
        "a tool call and its result": system(tools=True) + turn("developer", namespace) + turn("user", _U1)
        + '<|start|>assistant to=functions.probe_lookup<|channel|>commentary json<|message|>{"query": "probe"}<|call|>'
        + "<|start|>functions.probe_lookup to=assistant<|channel|>commentary<|message|>" + json.dumps(_RESULT)
        + "<|end|>" + gen,
    }[probe]


_EXPECTED = {"chatml": _expected_chatml, "llama3": _expected_llama3, "harmony": _expected_harmony}


# ---- reading the model's chat format -------------------------------------------------------------------------------


def _renderer(chat_template: str, tokenizer):
    """render(messages, tools=None, **kwargs) -> the prompt the chat template gives with add_generation_prompt=True
    (transformers' own renderer, as apply_chat_template uses), less a leading BOS token: llama.cpp adds BOS when it
    tokenises, so Ollama's templates leave it out."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {k: getattr(tokenizer, k, None) or "" for k in ("bos_token", "eos_token")}

    def render(messages, tools=None, **kwargs) -> str:
        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=chat_template,
                                            add_generation_prompt=True, **special, **kwargs)
        bos = special["bos_token"]
        return rendered[0][len(bos):] if bos and rendered[0].startswith(bos) else rendered[0]

    return render


def _between(text: str, head: str, tail: str) -> str | None:
    """The middle of `text` when it is head + middle + tail, else None."""
    if len(text) >= len(head) + len(tail) and text.startswith(head) and text.endswith(tail):
        return text[len(head):len(text) - len(tail)]
    return None


def _derive(style: str, render, chat_template: str) -> ChatFormat:
    """What varies between models of one format, read off renderings of a plain question (the probes then check
    the whole format): the default system prompt, Llama 3's system-turn preamble, gpt-oss's system message; whether
    tools and Qwen3's `enable_thinking=False` change anything."""
    question = [_msg("user", _U1)]
    plain = render(question)
    tools = render(question, tools=[_TOOL]) != plain
    dated = "strftime_now" in chat_template
    if style == "chatml":
        head = _between(plain, "", f"<|im_start|>user\n{_U1}<|im_end|>\n<|im_start|>assistant\n")
        default = _between(head or "", "<|im_start|>system\n", "<|im_end|>\n")
        thinking = render(question, enable_thinking=False) != plain
        return ChatFormat("chatml", tools=tools, thinking=thinking, default_system=default)
    if style == "llama3":
        tail = f"{_S}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{_U1}<|eot_id|>" \
               "<|start_header_id|>assistant<|end_header_id|>\n\n"
        preamble = _between(render([_msg("system", _S)] + question), "<|start_header_id|>system<|end_header_id|>\n\n",
                            tail)
        return ChatFormat("llama3", tools=tools, preamble=preamble or "", dated=dated)
    body = _between(plain, "<|start|>system<|message|>", f"<|end|><|start|>user<|message|>{_U1}<|end|><|start|>assistant")
    return ChatFormat("harmony", tools=tools, preamble=body or "", dated=dated)


def _clip(text: str, start: int) -> str:
    return ("…" if start else "") + text[start:start + 90] + ("…" if len(text) > start + 90 else "")


def _mismatch(name: str, probe: str, got: str, expected: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    start = max(0, at - 30)
    return (f"the model's chat template does not render chats as {name} does, so a Modelfile TEMPLATE for {name} "
            f"would prompt the model differently than training did: for {probe} it gives {_clip(got, start)!r} where "
            f"{name}'s format gives {_clip(expected, start)!r} (from character {at}). Restore the family's chat "
            "template (chat_template in the model's tokenizer_config.json or chat_template.jinja), or leave out "
            f"--to_ollama and write the TEMPLATE by hand ({_MODELFILE_DOC}#template).")


def _probes_for(fmt: ChatFormat) -> list[str]:
    flags = {None: True, "thinking": fmt.thinking, "tools": fmt.tools, "thinking+tools": fmt.thinking and fmt.tools}
    return [name for name, (*_, needs) in _PROBES.items() if flags[needs]]


def _read(model_type: str, chat_template: str | None, tokenizer=None) -> ChatFormat | str:
    """The model's ChatFormat, or one message saying why there is no Ollama TEMPLATE for it."""
    if model_type not in OLLAMA_FAMILIES:
        return (f"there is no Ollama chat TEMPLATE for model_type {model_type!r}: tunesmith writes Modelfiles for "
                f"{', '.join(OLLAMA_FAMILIES)}. Leave out --to_ollama (the GGUF still loads in Ollama with a "
                f"Modelfile whose TEMPLATE you write: {_MODELFILE_DOC}#template).")
    name = _NAMES[model_type]
    if not chat_template:
        return (f"the model has no chat template (chat_template in tokenizer_config.json), so there is no chat format "
                f"to give Ollama; put the {name} template back in the model folder, or leave out --to_ollama.")
    render, style = _renderer(chat_template, tokenizer), _STYLE[model_type]
    probe = "a question alone"
    try:
        fmt = _derive(style, render, chat_template)
        for probe in _probes_for(fmt):
            messages, tools, kwargs, _ = _PROBES[probe]
            got, expected = render(messages, tools=tools, **kwargs), _EXPECTED[style](fmt, probe)
            if got != expected:
                return _mismatch(name, probe, got, expected)
    except Exception as e:  # noqa: BLE001 - a template that raises on a plain chat (Jinja errors, raise_exception)
        return (f"the model's chat template fails on {probe} ({type(e).__name__}: {e}), so it is not {name}'s; "
                f"restore the family's chat template or leave out --to_ollama.")
    return fmt


def ollama_problem(model_type: str, chat_template: str | None, tokenizer=None) -> str | None:
    """None when tunesmith can write an Ollama TEMPLATE for this model, else one message saying why not: a family
    (config.json model_type) we have no TEMPLATE for, no chat template, or a chat template that does not render the
    probe conversations (system prompt, a question alone, multi-turn, reasoning in history; tool calls and
    `enable_thinking=False` where the template supports them) as the family's TEMPLATE does — the Modelfile would
    then prompt the model differently than training did. `tokenizer` (optional): its bos/eos tokens are passed to
    the template as apply_chat_template passes them. Renders with transformers (chat_template_utils)."""
    result = _read(model_type, chat_template, tokenizer)
    return result if isinstance(result, str) else None


def chat_format(model_type: str, chat_template: str | None, tokenizer=None) -> ChatFormat:
    """The model's ChatFormat (see ollama_problem). Raises ConfigError with ollama_problem's message."""
    result = _read(model_type, chat_template, tokenizer)
    if isinstance(result, str):
        raise ConfigError(f"Ollama: {result}")
    return result


# ---- the Modelfile ---------------------------------------------------------------------------------------------------


def fits_modelfile(text: str) -> bool:
    """Whether `text` survives as a `\"\"\"...\"\"\"` value of Ollama's Modelfile parser (parser/parser.go ParseFile):
    it drops characters strconv.IsPrint rejects (line breaks and tabs excepted), and ends the value at the first line
    break where the value read so far, trimmed, is a complete `\"\"\"...\"\"\"` — a line of `text` ending in `\"\"\"`."""
    if not all(ch.isprintable() or ch in "\n\r\t" for ch in text):
        return False
    for i, ch in enumerate(text):
        if ch in "\r\n":
            read = ('"""' + text[:i]).rstrip(" \t\r\n")
            if len(read) >= 6 and read.endswith('"""'):
                return False
    return True


def _template(fmt: ChatFormat, default_system: str | None, enable_thinking: bool | None = None) -> str:
    if fmt.style == "chatml":
        return gotmpl.chatml_template(default_system=default_system, tools=fmt.tools, thinking=fmt.thinking,
                                      think_default=enable_thinking is not False)
    if fmt.style == "llama3":
        return gotmpl.llama3_template(preamble=fmt.preamble, default_system=default_system, tools=fmt.tools)
    today = datetime.date.today().strftime("%Y-%m-%d")
    system_message = gotmpl.harmony_system_message(fmt.preamble, dated=fmt.dated, today=today)
    return gotmpl.harmony_template(system_message=system_message, default_system=default_system, tools=fmt.tools)


def _stop_values(fmt: ChatFormat, tokenizer, stops: list[str] | None) -> list[str]:
    """The format's end-of-turn tokens the tokenizer has, its eos token, then the given stops (export's
    --stop_words: they add to the tokens that end a turn, which Ollama must still stop at)."""
    vocab = tokenizer.get_vocab()
    ends = [t for t in _STOPS[fmt.style] if t in vocab] + [getattr(tokenizer, "eos_token", None)]
    return list(dict.fromkeys(s for s in ends + list(stops or []) if s))


def _value(text: str) -> str:
    """A PARAMETER value as Ollama's own `ollama show --modelfile` writes it (parser.go quote): bare when it reads
    back as itself."""
    if text and text == text.strip() and not text.startswith('"') and "\n" not in text and "\r" not in text:
        return text
    if not fits_modelfile(text):
        raise ConfigError(f"Ollama: the stop string {text!r} cannot be written in a Modelfile (Ollama's parser "
                          f"would end or drop part of it); choose stop strings without it.")
    return '"""' + text + '"""'


def _parameter_lines(generation: dict | None) -> list[str]:
    """PARAMETER lines for the run's generation settings that are set; do_sample=False (greedy) is temperature 0."""
    settings = dict(generation or {})
    if settings.get("do_sample") is False:
        settings["temperature"] = 0
    lines = []
    for key, name in _PARAMETERS.items():
        value = settings.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Ollama: generation setting {key}={value!r} is not a number; PARAMETER {name} takes one.")
        lines.append(f"PARAMETER {name} {int(value) if name in ('top_k', 'num_predict') else value}")
    return lines


def modelfile(*, source: str, model_type: str, chat_template: str, tokenizer, system: str | None = None,
              generation: dict | None = None, stops: list[str] | None = None,
              enable_thinking: bool | None = None) -> str:
    """The Modelfile text (docs/modelfile.md in github.com/ollama/ollama): `FROM source` (as written: ./name.gguf,
    or an absolute Hugging Face folder), `TEMPLATE` for the model's chat format (ollama_templates), `SYSTEM` (when
    given), `PARAMETER stop` for the format's end-of-turn tokens in the tokenizer's vocabulary, its eos token and
    then each of `stops` and PARAMETER lines for `generation` (temperature, top_p, top_k,
    repetition_penalty -> repeat_penalty, max_new_tokens -> num_predict; those not None). enable_thinking=False
    (a Qwen3 run trained with --enable_thinking false): the prompt always closes the think block, as training
    rendered it (Ollama turns `think` on by default, so the TEMPLATE cannot tell a request's choice from it).

    A system prompt a Modelfile cannot hold (a line ending in three double quotes; characters Ollama's parser drops)
    goes into TEMPLATE as the system prompt of a chat that has none — what SYSTEM does (Ollama's chat handler puts
    SYSTEM first when a request has no system message), said in a comment.
    Raises ConfigError: no TEMPLATE for the model (ollama_problem's message), a source with a line break, a
    non-numeric generation setting, an unwritable stop string."""
    fmt = chat_format(model_type, chat_template, tokenizer)
    if not source or source != source.strip() or "\n" in source or "\r" in source:
        raise ConfigError(f"Ollama: FROM {source!r}: a Modelfile's FROM path cannot start or end with spaces or "
                          "hold a line break; export to a plainer path.")
    default_system, system_lines, notes = fmt.default_system, [], []
    if system and fits_modelfile(system):
        system_lines = [f'SYSTEM """{system}"""']
    elif system:
        default_system = system
        notes.append("# The system prompt is in TEMPLATE, as the system prompt of a chat that has none (what SYSTEM "
                     "does): a SYSTEM block cannot hold it (a line ending in \"\"\", or characters Ollama's parser drops).")
    if fmt.dated and fmt.style == "llama3":
        notes.append("# The model's chat template dates its system turn with the current day; Go templates cannot "
                     "write that date format, so TEMPLATE carries the export date.")
    template = _template(fmt, default_system, enable_thinking)
    if not fits_modelfile(template):
        raise TunesmithError("internal error: the Ollama TEMPLATE cannot be written in a Modelfile")
    features = ", ".join(["system prompt", "multi-turn"] + (["tool calls"] if fmt.tools else [])
                         + (["reasoning"] if fmt.thinking or fmt.style == "harmony" else []))
    lines = [f"# Ollama Modelfile for a {_NAMES[model_type]} model, written by tunesmith ({_MODELFILE_DOC}).",
             f"# TEMPLATE renders the prompt the model's own chat template renders ({features}).", *notes,
             f"FROM {source}", f'TEMPLATE """{template}"""', *system_lines]
    lines += [f"PARAMETER stop {_value(s)}" for s in _stop_values(fmt, tokenizer, stops)]
    return "\n".join(lines + _parameter_lines(generation)) + "\n"


def ollama_create_hint(modelfile_path: str, name: str) -> str:
    """The commands that make and run the Ollama model (`ollama create NAME -f PATH`, then `ollama run NAME`), one a
    line, quoted for a POSIX shell."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(modelfile_path)}\nollama run {shlex.quote(name)}"

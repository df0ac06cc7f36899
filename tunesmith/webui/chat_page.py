"""The Chat page (the whole of `tunesmith app`, and a page of `tunesmith web-ui`): a model, checkpoint or adapter set
on the engine `tunesmith deploy` serves (chat.ChatSession), replies streamed token by token with the reasoning
folded apart from the answer and tool calls shown as calls, the sampling settings and the system prompt per turn."""
from __future__ import annotations

import shlex
from typing import Callable, Optional

from tunesmith.webui.chat import ChatSession, conversation, gen_config, parse_tools, shown, stream_turn
from tunesmith.webui.paths import Folders, path_problems

SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")


def load_model(session: ChatSession, folders: Optional[Folders], model, adapters) -> str:
    """Load (model, adapters) as infer's --model/--adapters; the page's message: what was loaded, or why not (the
    folder rule, then infer's own flag checks and loading errors)."""
    from tunesmith.config.parser import ArgError
    from tunesmith.errors import TunesmithError

    model = str(model or "").strip()
    try:
        extra = shlex.split(str(adapters or ""))
    except ValueError as e:
        return f"error: --adapters: {e}"
    from tunesmith.models.checkpoint import is_adapter_dir

    if model and is_adapter_dir(model):  # a LoRA checkpoint picked as "the model": it is an adapter
        model, extra = "", [model, *extra]
    argv = (["--model", model] if model else []) + (["--adapters", *extra] if extra else [])
    if not argv:
        return "choose a model or a checkpoint"
    if folders is not None:
        problems = path_problems({"model": model or None, "adapters": extra}, folders)
        if problems:
            return "error: " + "\n".join(problems)
    try:
        return session.load(argv)
    except (ArgError, TunesmithError, OSError, ValueError) as e:
        return f"error: {e}"


def respond(session: ChatSession, words: dict, stream: bool, message, history, system, tools, *settings):
    """The Send handler (a generator): the user's turn, then the reply as it grows (reasoning, tool calls, answer);
    yields (chat messages, the input box's new value, the status line)."""
    from tunesmith.errors import TunesmithError
    from tunesmith.inference.chat import PromptTooLong

    history = list(history or [])
    if not str(message or "").strip():
        yield history, message, ""
        return
    engine = session.engine
    turn = history + [{"role": "user", "content": str(message)}]
    if engine is None:
        yield history, message, words["no_model"]
        return
    try:
        cfg = gen_config(dict(zip(SETTINGS, settings)))
        tool_list = parse_tools(tools)
        reply = None
        for reply in stream_turn(engine, conversation(history, system) + [turn[-1]], cfg, tool_list):
            if stream:
                yield turn + shown(reply, words), "", ""
        if reply is not None:
            yield turn + shown(reply, words), "", f"finish reason: {reply['finish_reason']}"
    except (TunesmithError, PromptTooLong, ValueError) as e:
        yield history, message, f"error: {e}"


def _settings(gr, defaults: dict, words: dict) -> list:
    """The sampling inputs (SETTINGS order), filled with the command's generation flags; an empty box is the
    model's own default (its generation_config.json)."""
    def box(name, label):
        value = defaults.get(name)
        return gr.Textbox(value="" if value is None else str(value), label=label, elem_id=f"chat-{name}", lines=1)

    with gr.Accordion(words["sampling"], open=True):
        with gr.Row():
            out = [gr.Number(value=defaults.get("max_new_tokens") or 256, precision=0, label="max_new_tokens",
                             elem_id="chat-max_new_tokens"),
                   box("temperature", "temperature (0: greedy)"), box("top_p", "top_p"), box("top_k", "top_k"),
                   box("repetition_penalty", "repetition_penalty"), box("seed", "seed"),
                   gr.Dropdown(choices=[], value=list(defaults.get("stop") or []), multiselect=True,
                               allow_custom_value=True, label="stop words", elem_id="chat-stop-words")]
    return out


def build(gr, session: ChatSession, words: dict, folders: Optional[Folders] = None,
          model_choices: Optional[Callable[[], list]] = None, defaults: Optional[dict] = None,
          stream: bool = True) -> dict:
    """The Chat page inside the current Blocks/Tab. With model_choices (web-ui) a model picker and Load button
    (paths held to `folders`); without (app) the session's engine is the one served. Returns {"model", "status"}."""
    defaults = defaults or {}
    comps: dict = {}
    if model_choices is not None:
        with gr.Row():
            comps["model"] = gr.Dropdown(choices=model_choices(), value=None, allow_custom_value=True,
                                         label=words["model"], elem_id="chat-model", scale=3)
            comps["adapters"] = gr.Textbox(label=words["adapters"], elem_id="chat-adapters", scale=2)
            load_btn = gr.Button(words["load"], elem_id="chat-load", scale=1)
    status = gr.Markdown(words["no_model"] if session.engine is None else f"loaded {session.name}",
                         elem_id="chat-status")
    system = gr.Textbox(value=defaults.get("system") or "", label=words["system"], lines=2, elem_id="chat-system")
    with gr.Accordion(words["tools"], open=False):
        tools = gr.Code(language="json", label=words["tools"], elem_id="chat-tools", interactive=True)
    settings = _settings(gr, defaults, words)
    bot = gr.Chatbot(label=words["chat"], elem_id="chatbot", height=420)
    with gr.Row():
        box = gr.Textbox(label=words["message"], scale=5, elem_id="chat-input", lines=1)
        send = gr.Button(words["send"], variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button(words["stop"], scale=1, elem_id="chat-stop")
        clear = gr.Button(words["clear"], scale=1, elem_id="chat-clear")
    turn_status = gr.Markdown(elem_id="chat-turn-status")

    def go(message, history, system_text, tool_text, *values):
        yield from respond(session, words, stream, message, history, system_text, tool_text, *values)

    inputs = [box, bot, system, tools, *settings]
    events = [send.click(go, inputs, [bot, box, turn_status]), box.submit(go, inputs, [bot, box, turn_status])]
    stop.click(None, None, None, cancels=events)
    clear.click(lambda: ([], ""), None, [bot, turn_status])
    if model_choices is not None:
        load_btn.click(lambda m, a: load_model(session, folders, m, a), [comps["model"], comps["adapters"]], status)
        comps["refresh_choices"] = lambda: gr.update(choices=model_choices())
    return {**comps, "status": status}

"""`tunesmith app --model/--adapters …`: one model or checkpoint on a chat page in the browser (ms-swift's `swift
app`), on the engine `tunesmith deploy` serves, built from the same flags."""
from __future__ import annotations



def app_problems(args) -> list[str]:
    """The app's own flags: a model to chat with, --base_url (not supported yet)."""
    if args.base_url:
        return [f"--base_url {args.base_url}: chatting with a server that is already running is not supported yet; "
                f"pass the model with --model (and --adapters): the page loads it itself"]
    if not args.model and not args.adapters and not args.ckpt_dir:
        return ["pass the model to chat with: --model (a folder or hub id) and/or --adapters CKPT"]
    return []


def main(args) -> int:
    """Load the model as deploy does, check its output is finite, and serve the chat page until Ctrl-C or SIGTERM;
    returns 0. Raises FlagError (flag values, before anything loads) or ConfigError (gradio missing, the model)."""
    from tunesmith.commands.deploy import check_finite
    from tunesmith.inference.chat import build_engine
    from tunesmith.inference.flags import check_inference_flags
    from tunesmith.webui.app import _check_port, _check_tls, api_key_of, chat_app, gradio_module, serve, server_problems
    from tunesmith.webui.chat import ChatSession

    key = api_key_of(args)
    check_inference_flags(args, app_problems(args) + server_problems(args, key, tls=False))
    gradio_module()
    _check_port(args.server_name, args.server_port)  # before the model loads: a busy port is said at once
    _check_tls(args.ssl_keyfile, args.ssl_certfile)
    engine, args, ckpt, _ = build_engine(args)
    check_finite(engine, args, ckpt)
    name = ", ".join(args.adapters) if args.adapters else str(args.model)
    session = ChatSession(engine, name)
    try:
        serve(chat_app(args, session, args.studio_title or name), args, key)
    finally:
        session.close()
    return 0

"""The pages put together and served: `tunesmith web-ui` (Train, Runs, Chat, Export, Eval) and `tunesmith app`
(Chat alone), on gradio (pinned to one major in the extra `tunesmith[webui]`; docs/web-ui.md says why).

Safe by default: the page listens on 127.0.0.1; any other address, or gradio's public share link, needs a password
(--api_key, or TUNESMITH_API_KEY), and `--share` is refused offline with the reason. The password is compared in
constant time and never shown, logged or written. Uploads are limited to --max_upload_mb; the pages read and start
nothing outside the folders given at start (paths.py); the only processes they start are `tunesmith` commands.
The browser fetches nothing from the internet (system fonts; gradio's analytics off).
"""
from __future__ import annotations

import hmac
import os
import socket
import sys
from typing import Callable, Optional

from tunesmith.errors import ConfigError

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
SHARE_HOST = ("api.gradio.app", 443)  # where gradio asks for a share link


def gradio_module():
    """gradio, or a ConfigError naming the extra that installs it."""
    try:
        import gradio
    except ImportError:
        raise ConfigError("the web pages need gradio: pip install 'tunesmith[webui]'") from None
    return gradio


def is_local(server_name: str) -> bool:
    """Whether an address serves this machine only (loopback)."""
    return server_name in LOCAL_NAMES or server_name.startswith("127.")


def can_reach(host_port: tuple = SHARE_HOST, timeout: float = 3.0) -> Optional[str]:
    """None when a TCP connection to host_port opens within `timeout` seconds, else why not."""
    try:
        with socket.create_connection(host_port, timeout=timeout):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def server_problems(args, api_key: Optional[str], reach: Callable[[], Optional[str]] = can_reach,
                    tls: bool = True) -> list[str]:
    """The page server's flags, before anything loads: another address than loopback or --share without a
    password; --share offline; the port; with `tls`, the TLS pair (deploy's check has it for app). reach: tells
    whether gradio's share service answers (None) or why not."""
    from tunesmith.config.checks import between

    out: list[str] = []
    if not is_local(args.server_name) and not api_key:
        out.append(f"--server_name {args.server_name} lets other machines open the page, which can start training "
                   f"and read your models and data: pass --api_key KEY (or set TUNESMITH_API_KEY) to require a "
                   f"password, or keep the default 127.0.0.1 and reach it through an SSH tunnel "
                   f"(ssh -L {args.server_port}:127.0.0.1:{args.server_port} HOST)")
    if args.share and not api_key:
        out.append("--share puts the page on a public gradio.live address: pass --api_key KEY (or set "
                   "TUNESMITH_API_KEY) to require a password")
    elif args.share:
        why = reach()
        if why:
            out.append(f"--share needs the internet (gradio's share service {SHARE_HOST[0]} cannot be reached: "
                       f"{why}); serve on this machine and reach it through an SSH tunnel instead (ssh -L "
                       f"{args.server_port}:127.0.0.1:{args.server_port} HOST)")
    between(out, "server_port", args.server_port, 1, 65535)
    if tls and bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        out.append("--ssl_keyfile and --ssl_certfile go together: HTTPS needs the private key and its certificate")
    for name, path in (("ssl_keyfile", args.ssl_keyfile), ("ssl_certfile", args.ssl_certfile)):
        if tls and path and not os.path.isfile(path):
            out.append(f"--{name} {path}: no such file")
    return out


def api_key_of(args) -> Optional[str]:
    """--api_key, else TUNESMITH_API_KEY (deploy's variable), else None; an empty value is None."""
    from tunesmith.serve.app import API_KEY_ENV

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return key if key and key.strip() else None


def _auth(api_key: Optional[str]):
    """gradio's login check: any user name, the key as the password (compared in constant time); None: no login."""
    if not api_key:
        return None
    expected = api_key.encode()
    return lambda _user, password: hmac.compare_digest(str(password or "").encode(), expected)


def _theme(gr):
    """gradio's default look with system fonts, so the browser fetches no web fonts (works offline)."""
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


# long command lines and messages wrap instead of scrolling sideways
CSS = ", ".join(f"#{e} pre, #{e} code" for e in ("train-message", "run-message", "run-progress", "run-action",
                                                  "export-status", "eval-status", "export-message", "eval-message")) \
    + " {white-space: pre-wrap !important; word-break: break-word}"


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            import errno

            hint = ("another server is using the port? Pass --server_port with a free one" if e.errno == errno.EADDRINUSE
                    else "--server_name must be an address or host name of this machine (127.0.0.1, 0.0.0.0, or "
                         "one of its interfaces)" if e.errno in (errno.EADDRNOTAVAIL, None) or isinstance(
                             e, socket.gaierror)
                    else "check --server_name and --server_port")
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); {hint}") from None


def _check_tls(keyfile: Optional[str], certfile: Optional[str]) -> None:
    """--ssl_keyfile/--ssl_certfile: a certificate and key that load (ssl's own check), before the server starts.
    Raises ConfigError naming the files and the ssl library's reason."""
    if not (keyfile or certfile):
        return
    import ssl

    if not (keyfile and certfile):
        raise ConfigError("--ssl_keyfile and --ssl_certfile go together: give both (PEM files) or neither")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"--ssl_certfile {certfile} / --ssl_keyfile {keyfile}: not a PEM certificate and its key "
                          f"({getattr(e, 'reason', None) or e.strerror or e}); give the files your TLS tool wrote "
                          f"(e.g. openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem)") from None


def serve(blocks, args, api_key: Optional[str], max_upload_mb: int = 100) -> None:
    """Serve `blocks` until Ctrl-C or SIGTERM (gradio's launch, blocking), saying where and whether a password is
    needed. Raises ConfigError when the port is taken."""
    gr = gradio_module()
    _check_port(args.server_name, args.server_port)
    _check_tls(args.ssl_keyfile, args.ssl_certfile)
    scheme = "https" if args.ssl_certfile else "http"
    where = "this machine only" if is_local(args.server_name) else "reachable from the network"
    print(f"[tunesmith] {scheme}://{args.server_name}:{args.server_port} ({where}"
          + ("; password required: any user name, the API key as the password)" if api_key else ")"),
          file=sys.stderr, flush=True)
    blocks.queue(default_concurrency_limit=8)
    _, _, share_url = blocks.launch(
        server_name=args.server_name, server_port=args.server_port, share=bool(args.share), auth=_auth(api_key),
        auth_message="tunesmith: log in with any user name and the API key", max_file_size=f"{max_upload_mb}mb",
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, quiet=True, show_error=False,
        footer_links=["gradio"], ssr_mode=False, mcp_server=False, enable_monitoring=False, theme=_theme(gr),
        css=CSS, prevent_thread_lock=True)
    if share_url:
        print(f"[tunesmith] public link: {share_url} (password required)", file=sys.stderr, flush=True)
    blocks.block_thread()


def web_ui(args, check) -> object:
    """The Blocks of `tunesmith web-ui` (Train, Runs, Chat, Export, Eval) for a parsed WebUIArguments; check: the
    commands' one-message flag check (tunesmith.commands.web_ui: check_command)."""
    from tunesmith.webui import chat_page, runs_page, tasks_page, train_page
    from tunesmith.webui.chat import ChatSession
    from tunesmith.webui.context import Context
    from tunesmith.webui.labels import labels
    from tunesmith.webui.paths import Folders, model_folders

    gr = gradio_module()
    words = labels(args.lang)
    ctx = Context(Folders.of(args.output_dir, args.allowed_paths), check, words, ChatSession(), args.max_upload_mb,
                  os.getcwd())

    def chat_choices():
        return [c for r in _runs(ctx) for c in reversed(r.checkpoints)] + model_folders(ctx.folders)

    with gr.Blocks(title=words["title"], analytics_enabled=False) as blocks:
        with gr.Tabs() as tabs:
            with gr.Tab(words["train"], id="train"):
                train = train_page.build(gr, ctx)
            with gr.Tab(words["runs"], id="runs"):
                runs = runs_page.build(gr, ctx)
            with gr.Tab(words["chat"], id="chat"):
                chat = chat_page.build(gr, ctx.chat, words, ctx.folders, chat_choices)
            with gr.Tab(words["export"], id="export"):
                export = tasks_page.build_export(gr, ctx)
            with gr.Tab(words["eval"], id="eval"):
                tasks_page.build_eval(gr, ctx)
        _wire(gr, ctx, blocks, tabs, runs, chat, export)
        blocks.load(train["choices"], None, train["pickers"], show_progress="hidden")  # files added since start
    return blocks


def _runs(ctx):
    from tunesmith.webui.runs import find_runs

    return find_runs(ctx.folders.outputs)


def _wire(gr, ctx, blocks, tabs, runs, chat, export) -> None:
    """The events between pages: the page load fills the Runs page (a reload finds every run again); the Runs
    page's buttons hand the selected run's last checkpoint to the Chat and Export pages."""
    from tunesmith.webui.runs import find

    def last_checkpoint(path, tab):
        run = find(ctx.folders.outputs, path) if path else None
        if run is None or not run.checkpoints:
            return gr.update(), gr.update()
        return gr.update(value=run.checkpoints[-1]), gr.Tabs(selected=tab)

    blocks.load(lambda s: runs["refresh"](s, None), [runs["select"]], runs["outputs"], show_progress="hidden")
    blocks.load(chat["refresh_choices"], None, chat["model"], show_progress="hidden")
    blocks.load(export["refresh"], None, export["checkpoint"], show_progress="hidden")
    runs["chat"].click(lambda p: last_checkpoint(p, "chat"), runs["select"], [chat["model"], tabs])
    runs["export"].click(lambda p: last_checkpoint(p, "export"), runs["select"], [export["checkpoint"], tabs])


def chat_app(args, session, title: str) -> object:
    """The Blocks of `tunesmith app`: the Chat page alone, over `session`'s engine, its sampling settings filled
    from the command's generation flags."""
    from tunesmith.webui import chat_page
    from tunesmith.webui.labels import labels

    gr = gradio_module()
    words = labels(args.lang)
    defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
                "stop": args.stop_words, "system": None}
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {title}")
        chat_page.build(gr, session, words, defaults=defaults, stream=args.stream is not False)
    return blocks

"""Bad input in a form is one inline message in the CLI's own words: check_command runs the commands' own parse and
value checks and returns exactly the line `tunesmith <command>` prints; the page's folder rule comes before it; the
web-ui and app servers are safe by default (loopback, a password for anything else, --share refused offline)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tunesmith.commands.web_ui import check_command
from tunesmith.config.parser import ArgError, parse_args, to_record
from tunesmith.webui.app import is_local, server_problems
from tunesmith.webui.builder import Built, build_training
from tunesmith.webui.chat import ChatSession
from tunesmith.webui.context import Context, validate
from tunesmith.webui.labels import labels
from tunesmith.webui.paths import Folders, is_local as is_local_path, path_problems

from conftest import CAPITALS_DATA, REPO


def test_parse_problems_read_as_the_cli_says_them():
    msg = check_command("sft", ["--lora_rnak", "1"])
    assert msg.startswith("tunesmith sft: error: ") and "Did you mean --lora_rank?" in msg
    msg = check_command("rlhf", ["--rlhf_type", "ppoo"])
    assert msg.startswith("tunesmith rlhf: error: 3 problems with the flags:\n  - --rlhf_type: 'ppoo' is not one of")
    assert "pass the model with --model" in msg  # parse and value problems together, as the CLI reports them


@pytest.mark.slow
def test_value_problems_are_the_cli_s_line(tiny_models, tmp_path):
    """The message under the form is character for character what `tunesmith sft` prints (exit 2), every problem
    in one message; a good command passes."""
    model = tiny_models("qwen2")
    argv = ["--model", model, "--dataset", CAPITALS_DATA[0], "--lora_rank", "0", "--learning_rate", "-1",
            "--output_dir", str(tmp_path / "out")]
    page = check_command("sft", argv)
    cli = subprocess.run([sys.executable, "-m", "tunesmith", "sft", *argv], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert cli.returncode == 2
    assert page == cli.stderr.strip().splitlines()[0] + "".join(
        "\n" + ln for ln in cli.stderr.strip().splitlines()[1:] if ln.startswith("  "))
    assert "2 problems with the flags" in page and "--lora_rank 0" in page and "--learning_rate -1" in page
    assert check_command("sft", ["--model", model, "--dataset", CAPITALS_DATA[0], "--output_dir",
                                 str(tmp_path / "out")]) is None


def _ctx(tmp_path, check=lambda c, a: None):
    folders = Folders.of([str(tmp_path / "out")], [str(tmp_path / "data")])
    return Context(folders, check, labels("en"), ChatSession())


def test_the_folder_rule_comes_first(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.jsonl").write_text("{}\n")
    calls = []
    ctx = _ctx(tmp_path, lambda c, a: calls.append(c))
    outside = build_training("sft", {"model": "Qwen/Qwen2.5-0.5B", "dataset": [str(tmp_path / "elsewhere" / "a.jsonl")],
                                     "output_dir": str(tmp_path / "elsewhere" / "out")}, str(tmp_path / "out"))
    msg = validate(ctx, outside)
    assert msg.startswith("tunesmith web-ui: 2 problems") and "--dataset" in msg and "--output_dir" in msg
    assert "--model" not in msg  # a hub id is not a path
    assert calls == []  # nothing of the command ran for a path outside
    inside = build_training("sft", {"model": "Qwen/Qwen2.5-0.5B", "dataset": ["data/x.jsonl#5"]},
                            str(tmp_path / "out"))
    assert validate(ctx, inside) is None and calls == ["sft"]
    # a symlink inside an allowed folder that points outside is outside
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "link")
    assert path_problems({"dataset": [str(tmp_path / "data" / "link" / "a.jsonl")]}, ctx.folders)
    assert not is_local_path("hf::org/name") and is_local_path("./x.jsonl") and is_local_path("/abs#10")


def test_form_problems_read_as_flag_errors(tmp_path):
    msg = validate(_ctx(tmp_path), Built(["sft", "--dataset", "a"], problems=["--dataset --x: a value cannot"]))
    assert msg == "tunesmith sft: error: --dataset --x: a value cannot"


def _server(**kw):
    base = dict(server_name="127.0.0.1", server_port=7860, share=False, ssl_keyfile=None, ssl_certfile=None)
    return SimpleNamespace(**{**base, **kw})


def test_safe_by_default():
    assert server_problems(_server(), None) == []
    (msg,) = server_problems(_server(server_name="0.0.0.0"), None)
    assert "--server_name 0.0.0.0 lets other machines open the page" in msg and "--api_key" in msg
    assert server_problems(_server(server_name="0.0.0.0"), "k") == []
    (msg,) = server_problems(_server(share=True), None)
    assert "--share puts the page on a public gradio.live address" in msg
    (msg,) = server_problems(_server(share=True), "k", reach=lambda: "Name or service not known")
    assert msg.startswith("--share needs the internet") and "Name or service not known" in msg
    assert server_problems(_server(share=True), "k", reach=lambda: None) == []
    assert is_local("127.0.0.2") and is_local("localhost") and not is_local("0.0.0.0")
    assert server_problems(_server(server_port=0, ssl_keyfile="k.pem"), None) == [
        "--server_port 0: expected 1 <= server_port <= 65535",
        "--ssl_keyfile and --ssl_certfile go together: HTTPS needs the private key and its certificate",
        "--ssl_keyfile k.pem: no such file"]


def test_the_key_is_a_secret():
    args = parse_args("web-ui", ["--api_key", "s3cret"])
    assert to_record(args)["api_key"] == "<redacted>"
    assert parse_args("app", ["--api_key", "s3cret"]).api_key == "s3cret"


@pytest.mark.slow
def test_the_cli_refuses_an_open_address_without_a_key():
    r = subprocess.run([sys.executable, "-m", "tunesmith", "web-ui", "--server_name", "0.0.0.0", "--lang", "fr"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2
    assert r.stderr.startswith("tunesmith web-ui: error: 2 problems with the flags:")
    assert "--lang: 'fr' is not one of en, zh" in r.stderr and "--api_key" in r.stderr


@pytest.mark.slow
def test_app_refuses_base_url_and_multimodal():
    r = subprocess.run([sys.executable, "-m", "tunesmith", "app", "--model", "m", "--base_url", "http://x/v1",
                        "--is_multimodal", "true"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2 and "--base_url http://x/v1: chatting with a server" in r.stderr
    assert "the chat page takes text only" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tunesmith", "app"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2 and "pass the model to chat with: --model" in r.stderr  # a flag problem: exit 2


def test_every_ms_swift_app_flag_is_known():
    """ms-swift 4.6's `swift app` flags (tests/fixtures/ms_swift_flags.json) parse for `tunesmith app`, or are
    refused saying so; none is unknown."""
    with open(os.path.join(REPO, "tests", "fixtures", "ms_swift_flags.json"), encoding="utf-8") as fh:
        flags = json.load(fh)["app"]
    unknown = []
    for flag in flags:
        try:
            parse_args("app", [f"--{flag}", "1" if flag not in ("is_multimodal", "share", "stream") else "false"])
        except ArgError as e:
            if "unknown flag" in str(e) or "Did you mean" in str(e):
                unknown.append(flag)
    assert unknown == []
    assert parse_args("app", ["--studio_title", "Demo", "--server_port", "7861", "--lang", "zh"]).studio_title == \
        "Demo"


@pytest.mark.slow
def test_a_key_means_a_password_and_is_never_written(tmp_path):
    """With TUNESMITH_API_KEY the page asks for it (any user name); a wrong one is refused; the key appears in no
    output and no file."""
    pytest.importorskip("gradio", reason="gradio is not installed: pip install 'tunesmith[webui]'")
    import http.cookiejar
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    from conftest import free_port

    port, key = free_port(), "k3y-that-must-not-leak"
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "web-ui", "--server_port", str(port), "--output_dir",
                             str(tmp_path / "out")], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO, "TUNESMITH_API_KEY": key})
    base = f"http://127.0.0.1:{port}"
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def status(path, data=None):
        try:
            with opener.open(base + path, data=urllib.parse.urlencode(data).encode() if data else None,
                             timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        end = time.time() + 120
        while time.time() < end:
            try:
                urllib.request.urlopen(base + "/", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        assert status("/config") == 401
        assert status("/login", {"username": "me", "password": "wrong"}) == 400
        assert status("/login", {"username": "anyone", "password": key}) == 200
        assert status("/config") == 200
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    said = (tmp_path / "ui.log").read_text()
    assert "password required" in said and key not in said
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and key in p.read_text(errors="replace")]


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_pages_build_in_both_languages(lang, tmp_path):
    """Every page of web-ui and app builds (no word missing in either language), the tabs in that language."""
    pytest.importorskip("gradio", reason="gradio is not installed: pip install 'tunesmith[webui]'")
    from tunesmith.webui.app import chat_app, web_ui
    from tunesmith.webui.labels import EN, ZH

    assert set(EN) == set(ZH)
    args = parse_args("web-ui", ["--lang", lang, "--output_dir", str(tmp_path / "out"), "--allowed_paths",
                                 str(tmp_path)])
    blocks = web_ui(args, lambda command, argv: None)
    tabs = [b.label for b in blocks.blocks.values() if type(b).__name__ == "Tab"]
    assert tabs == [labels(lang)[k] for k in ("train", "runs", "chat", "export", "eval")]
    app = chat_app(parse_args("app", ["--lang", lang, "--temperature", "0.3"]), ChatSession(), "Demo")
    values = {b.elem_id: getattr(b, "value", None) for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert values["chat-temperature"] == "0.3" and "chatbot" in values


def test_addresses_and_tls_files_are_one_line_each(tmp_path):
    """A busy port, an address this machine does not have, and TLS files that are not a PEM certificate and key
    each give one message saying what to change, before gradio starts (no traceback)."""
    import socket

    from tunesmith.errors import ConfigError
    from tunesmith.webui.app import _check_port, _check_tls

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="another server is using the port"):
            _check_port("127.0.0.1", s.getsockname()[1])
    for host in ("nosuchhost.invalid", "10.255.255.1"):
        with pytest.raises(ConfigError, match="--server_name must be an address or host name of this machine"):
            _check_port(host, 7999)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"--ssl_certfile .*notes.txt .*not a PEM certificate and its key"):
        _check_tls(str(bad), str(bad))
    with pytest.raises(ConfigError, match="go together"):
        _check_tls(None, str(bad))
    _check_tls(None, None)

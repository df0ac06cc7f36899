"""`tunesmith deploy` against the faults a break-it review found: a picture server that trickles its bytes (the
fetch deadline covers the whole download), many such fetches at once (they never hold up other requests), content
parts with fields of the wrong type, upper-case URL schemes and paths (never read from the server's disk), error
texts that name the part and the URL as given, and non-streamed requests whose client goes away (their sequences
are cancelled). Servers run in-process on loopback (uvicorn on a thread); the slow picture server is a loopback
one, never the network."""
import asyncio
import base64
import concurrent.futures as cf
import http.client
import http.server
import json
import os
import socket
import threading
import time

import pytest

from conftest import data_url, http_json, serve_on_a_thread, vl_chat

TRICKLE_S = 0.2  # the trickling server's pause between bytes


@pytest.fixture(scope="module")
def png(pictures):
    with open(pictures[0], "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def web(png):
    """A loopback HTTP server: /trickle sends a PNG one byte every TRICKLE_S seconds (with its Content-Length),
    /page.html answers an HTML page as 200, /a.png the PNG at once. Yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body, kind = (b"<html><body>not a picture</body></html>", "text/html") if self.path == "/page.html" \
                else (png, "image/png")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if self.path.startswith("/trickle"):
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(TRICKLE_S)
                else:
                    self.wfile.write(body)
            except OSError:  # the client gave up: as it should
                pass

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def vl_server(vl_models):
    """The app over a tiny Qwen2.5-VL model (greedy, 6 new tokens): (chat, base url)."""
    from tunesmith.inference.chat import GenConfig
    from tunesmith.serve.app import create_app

    chat = vl_chat(vl_models("qwen2_5_vl"), defaults=GenConfig(max_new_tokens=6, temperature=0), max_batch_size=16)
    with serve_on_a_thread(create_app(chat, {"vl": None}, max_image_bytes=1 << 20)) as port:
        yield chat, f"http://127.0.0.1:{port}/v1"
    chat.close()


def _ask(url, text="What is this?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _error(base, messages, **body):
    status, reply = http_json("POST", f"{base}/chat/completions", {"model": "vl", "messages": messages, **body})
    return status, reply.get("error", reply)


# ------------------------------------------------------------------ 1. the fetch deadline, and no starvation

def test_a_trickling_picture_server_is_cut_off_at_the_deadline(web, png, monkeypatch):
    """A PNG sent one byte every 0.2 s would take ~27 s; the whole download is bounded by FETCH_TIMEOUT_S (2 s
    here), and the fetch thread itself gives up by then (each socket wait is bounded by the time left)."""
    from tunesmith.serve import images
    from tunesmith.serve.protocol import ApiError

    assert len(png) * TRICKLE_S > 10
    monkeypatch.setattr(images, "FETCH_TIMEOUT_S", 2.0)
    param = "messages[0].content[0].image_url"
    start = time.monotonic()
    with pytest.raises(ApiError) as e:
        asyncio.run(images.resolve_images([(param, f"{web}/trickle.png")], 1 << 20))
    took = time.monotonic() - start
    assert 1.9 < took < 3.0, took
    assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_image_url", param)
    assert "did not finish within 2 s" in e.value.message and f"{web}/trickle.png" in e.value.message
    # the thread: _fetch on its own, with the deadline of a request, returns on time too
    start = time.monotonic()
    with pytest.raises(ApiError):
        images._fetch(param, f"{web}/trickle.png", 1 << 20, time.monotonic() + 1.0)
    assert time.monotonic() - start < 1.6
    # and a prompt server is fetched as before
    ref, = asyncio.run(images.resolve_images([(param, f"{web}/a.png")], 1 << 20))
    assert ref == "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.slow
def test_many_slow_fetches_never_hold_up_other_requests(vl_server, web, pictures, monkeypatch):
    """40 requests whose pictures trickle in (more than starlette's 40 worker threads, more than the fetch
    threads): a request with a data-URL picture and a text request are answered at once meanwhile, and every slow
    one gets its 400 by its deadline."""
    from tunesmith.serve import images

    monkeypatch.setattr(images, "FETCH_TIMEOUT_S", 4.0)
    chat, base = vl_server
    with cf.ThreadPoolExecutor(42) as pool:
        slow = [pool.submit(_error, base, _ask(f"{web}/trickle{i}.png")) for i in range(40)]
        time.sleep(0.5)
        start = time.monotonic()
        status, body = http_json("POST", f"{base}/chat/completions",
                                 {"model": "vl", "messages": _ask(data_url(pictures[0]))})
        assert status == 200 and time.monotonic() - start < 2.0, (status, body, time.monotonic() - start)
        start = time.monotonic()
        status, body = http_json("POST", f"{base}/chat/completions",
                                 {"model": "vl", "messages": [{"role": "user", "content": "just text"}]})
        assert status == 200 and time.monotonic() - start < 2.0
        assert not any(f.done() for f in slow)
        for f in slow:
            status, err = f.result(timeout=30)
            assert status == 400 and err["code"] == "invalid_image_url", err
    assert time.monotonic() - start < 4.0 + 2.0  # every slow one ended at its deadline (plus its start-up)


# ------------------------------------------------------------------ 2. content parts' fields

@pytest.mark.slow
def test_content_parts_with_wrong_fields_get_a_400_naming_the_field(vl_server):
    chat, base = vl_server
    text = {"type": "text", "text": "hi"}
    cases = [
        ([text, {"type": "text", "text": 5}], "messages[0].content[1].text", "expected a string, but got a number"),
        ([{"type": "text"}], "messages[0].content[0].text", "Missing required parameter"),
        ([{"type": "text", "text": None}], "messages[0].content[0].text", "got null"),
        ([{"text": "no type"}], "messages[0].content[0].type", "Missing required parameter"),
        ([{"type": "video_url", "video_url": {}}], "messages[0].content[0].type", "'video_url' are not supported"),
        ([{"type": 3}], "messages[0].content[0].type", "a number are not supported"),
        ([text, "a bare string"], "messages[0].content[1]", "expected an object"),
        ([{"type": "image_url", "image_url": {}}], "messages[0].content[0].image_url.url",
         "Missing required parameter"),
        ([{"type": "image_url"}], "messages[0].content[0].image_url", "Missing required parameter"),
        ([{"type": "image_url", "image_url": {"url": 7}}], "messages[0].content[0].image_url.url",
         "expected a string"),
        ([{"type": "image_url", "image_url": ["x"]}], "messages[0].content[0].image_url", "expected a string"),
        ([{"type": "image_url", "image_url": {"url": "  "}}], "messages[0].content[0].image_url.url", "empty URL"),
    ]
    for content, param, words in cases:
        status, err = _error(base, [{"role": "user", "content": content}])
        assert (status, err["type"], err["param"]) == (400, "invalid_request_error", param), (content, err)
        assert words in err["message"] and param in err["message"], (content, err)
    # a text-only request with a right text part is answered
    status, body = http_json("POST", f"{base}/chat/completions", {"model": "vl", "messages": [
        {"role": "user", "content": [text]}]})
    assert status == 200


# ------------------------------------------------------------------ 4. schemes: any case; never a server path

@pytest.mark.slow
def test_url_schemes_in_any_case_and_no_server_paths(vl_server, pictures, web, tmp_path):
    chat, base = vl_server
    url = data_url(pictures[0])
    expected = chat.generate([[{"role": "user", "content": "<image>What is this?"}]],
                             images=[[pictures[0]]])[0].content
    for shout in ("DATA:" + url[5:], "Data:IMAGE/PNG;BASE64," + url.split(",", 1)[1],
                  f"HTTP://{web[len('http://'):]}/a.png"):
        status, body = http_json("POST", f"{base}/chat/completions", {"model": "vl", "messages": _ask(shout)})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected, (shout[:40], body)
    secret = tmp_path / "secret.png"
    secret.write_bytes(open(pictures[0], "rb").read())
    param = "messages[0].content[0].image_url"
    for local in (str(secret), "file://" + str(secret), "FILE://" + str(secret), "File:" + str(secret),
                  "secret.png", "ftp://127.0.0.1/a.png", "C:\\pictures\\a.png"):
        status, err = _error(base, _ask(local))
        assert (status, err["code"], err["param"]) == (400, "invalid_image_url", param), (local, err)
        assert err["message"].startswith(f"{param}: image_url must be a data: URL or an http(s) URL"), err
        assert os.getcwd() not in err["message"] and "does not exist" not in err["message"], err


def test_the_data_layer_reads_schemes_in_any_case(pictures):
    """tunesmith.data.images: `DATA:` is a data URL and `FILE:` a file URL, as their lower-case spellings."""
    from tunesmith.data.images import image_size, to_reference, url_scheme

    url = data_url(pictures[0])
    assert image_size("DATA:" + url[5:]) == image_size(url) == (100, 60)
    assert to_reference("FILE://" + pictures[0]) == pictures[0]
    assert [url_scheme(u) for u in ("DATA:x", "Https://a", "C:\\a.png", "/a.png", 5)] == ["data", "https", "", "",
                                                                                           ""]


# ------------------------------------------------------------------ 5. error texts for request pictures

@pytest.mark.slow
def test_picture_errors_name_the_part_and_the_url_as_given(vl_server, png, web):
    chat, base = vl_server
    cut = "data:image/png;base64," + base64.b64encode(png[: len(png) * 2 // 3]).decode()  # header intact
    param = "messages[0].content[0].image_url"
    status, err = _error(base, _ask(cut))
    assert (status, err["code"], err["param"]) == (400, "invalid_image", param), err
    assert err["message"].startswith(f"{param}: the picture 'data:image/png;base64,...'"), err
    assert "truncated" in err["message"] and "complete picture" in err["message"], err
    assert "drop" not in err["message"] and "replace the file" not in err["message"], err
    # the second picture of a request, after a good one, is named as the second
    two = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                        {"type": "image_url", "image_url": {"url": data_url_of(png)}},
                                        {"type": "image_url", "image_url": {"url": cut}}]}]
    status, err = _error(base, two)
    assert (status, err["param"]) == (400, "messages[0].content[2].image_url"), err
    # an address that answers a web page
    status, err = _error(base, _ask(f"{web}/page.html"))
    assert (status, err["code"], err["param"]) == (400, "invalid_image", param), err
    assert f"'{web}/page.html'" in err["message"] and "text/html" in err["message"], err
    assert "data:image;base64" not in err["message"] and "drop" not in err["message"], err


def data_url_of(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


# ------------------------------------------------------------------ 3. non-streamed requests whose client leaves

def _recording(chat, monkeypatch) -> list:
    """The engine Handles of every request submitted from now on."""
    handles, submit = [], chat.submit

    def record(*args, **kw):
        out = submit(*args, **kw)
        handles.extend(out)
        return out

    monkeypatch.setattr(chat, "submit", record)
    return handles


def _leave_after(port, body, handles, headers=None, after_s=0.3):
    """Send a non-streamed chat request, wait until its sequences are generating, then close the connection after
    after_s seconds without reading the answer. Returns the time the client left."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", **(headers or {})})
    deadline = time.monotonic() + 120
    while not handles and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handles, "the request never reached the engine"
    time.sleep(after_s)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return time.monotonic()


def _assert_cancelled(handles, asked: int):
    deadline = time.monotonic() + 10
    while any(h.completion is None for h in handles) and time.monotonic() < deadline:
        time.sleep(0.02)
    for h in handles:
        assert h.cancelled and h.completion is not None, "the sequence runs on for a client that left"
        assert h.completion.finish_reason == "abort" and len(h.completion.token_ids) < asked, h.completion


@pytest.mark.slow
def test_a_non_streamed_request_whose_client_leaves_is_cancelled(tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine, GenConfig
    from tunesmith.serve.app import create_app

    d = tiny_models("qwen2")
    chat = ChatEngine(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d),
                      defaults=GenConfig(temperature=0), max_model_len=4096)
    try:
        for key in (None, "k"):  # behind the API-key check too
            with serve_on_a_thread(create_app(chat, {"m": None}, api_key=key)) as port:
                handles = _recording(chat, monkeypatch)
                body = {"model": "m", "messages": [{"role": "user", "content": "tell me everything"}],
                        "max_tokens": 3500, "n": 2}
                left = _leave_after(port, body, handles, {"Authorization": f"Bearer {key}"})
                _assert_cancelled(handles, 3500)
                assert time.monotonic() - left < 5
                assert len(handles) == 2
                # the server goes on answering
                status, reply = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                                          {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 3}, headers={"Authorization": f"Bearer {key}"})
                assert status == 200
                monkeypatch.undo()
    finally:
        chat.close()


@pytest.mark.slow
def test_a_non_streamed_picture_request_whose_client_leaves_is_cancelled(vl_server, pictures, monkeypatch):
    chat, base = vl_server
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    handles = _recording(chat, monkeypatch)
    asked = 3000
    _leave_after(port, {"model": "vl", "messages": _ask(data_url(pictures[0])), "max_tokens": asked}, handles)
    _assert_cancelled(handles, asked)


@pytest.mark.skipif(os.name != "posix", reason="TIME_WAIT reuse is SO_REUSEADDR's POSIX meaning")
def test_port_check_takes_a_port_in_time_wait_and_refuses_a_listening_one():
    """deploy's (and rollout's) port check binds as uvicorn does: a port whose server just stopped, its connection
    left in TIME_WAIT, is taken (restarting right after a kill); a port a live server listens on is refused."""
    from tunesmith.commands.deploy import _check_port
    from tunesmith.errors import ConfigError

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port} .*--port"):
            _check_port("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()   # the server side closes first: its end (on `port`) waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
    with socket.socket() as plain:   # the state the check must accept: a bind without SO_REUSEADDR fails
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    _check_port("127.0.0.1", port)

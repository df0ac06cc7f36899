"""`tunesmith deploy` with pictures (issue #31): OpenAI `image_url` parts — data URLs and http(s) URLs, the plain
string form too — through the official openai client, streaming and not, each reply the reply the engine gives the
same conversation alone; clients' pictures batched together; the 400s (a picture over the limit, bad base64, a
path, a fetch that fails, a text model, a non-user image). Servers run on loopback (uvicorn on a thread); the http
pictures come from a loopback file server, never the network."""
import base64
import concurrent.futures as cf
import functools
import http.server
import os
import threading
import time

import pytest

from conftest import data_url, http_json, serve_on_a_thread, vl_chat


def _ask(messages, url, **kw):
    """An image_url part (OpenAI's object form) then a text part."""
    return [*messages, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": kw.get("text", "What is this?")}]}]


@pytest.fixture(scope="module")
def vl_server(vl_models):
    """The app over a tiny Qwen2.5-VL model (greedy, 6 new tokens), pictures of at most 4,000 bytes: (chat, base
    url)."""
    from tunesmith.inference.chat import GenConfig
    from tunesmith.serve.app import create_app

    chat = vl_chat(vl_models("qwen2_5_vl"), defaults=GenConfig(max_new_tokens=6, temperature=0), max_batch_size=16)
    with serve_on_a_thread(create_app(chat, {"vl": None}, max_image_bytes=4000)) as port:
        yield chat, f"http://127.0.0.1:{port}/v1"
    chat.close()


SLOW_S = 3.0


@pytest.fixture(scope="module")
def file_server(tmp_path_factory):
    """A loopback HTTP server over a folder: (folder, base url). A path starting /slow/ answers after SLOW_S."""
    root = tmp_path_factory.mktemp("served")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/slow/"):
                time.sleep(SLOW_S)
                self.path = self.path[len("/slow"):]
            super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _alone(chat, text, pictures):
    return chat.generate([[{"role": "user", "content": "<image>" + text}]], images=[pictures])[0].content


@pytest.mark.slow
def test_the_openai_client_sends_pictures_streaming_and_not(vl_server, pictures, file_server):
    import openai

    chat, base = vl_server
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    expected = _alone(chat, "What is this?", [pictures[0]])
    url = data_url(pictures[0])
    reply = client.chat.completions.create(model="vl", messages=_ask([], url), temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(chat.prompt([{"role": "user", "content": "<image>What is this?"}],
                                                        images=[pictures[0]]).ids)
    stream = client.chat.completions.create(model="vl", messages=_ask([], url), temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    # the plain string form of image_url, and an http URL fetched by the server
    plain = [{"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text",
                                                                                   "text": "What is this?"}]}]
    assert client.chat.completions.create(model="vl", messages=plain).choices[0].message.content == expected
    root, web = file_server
    (root / "a.png").write_bytes(open(pictures[0], "rb").read())
    fetched = client.chat.completions.create(model="vl", messages=_ask([], f"{web}/a.png"))
    assert fetched.choices[0].message.content == expected


@pytest.mark.slow
def test_clients_pictures_share_batches_and_each_gets_its_lone_reply(vl_server, pictures):
    import openai

    chat, base = vl_server
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    asks = [(f"picture {i}?", pictures[i % 3]) for i in range(9)]
    expected = [_alone(chat, text, [pic]) for text, pic in asks]
    text_only = chat.generate([[{"role": "user", "content": "just text"}]])[0].content
    chat.engine.peak_rows = 0

    def one(i):
        """Request i: a picture and its question, or (the last) a text-only one."""
        msgs = _ask([], data_url(asks[i][1]), text=asks[i][0]) if i < len(asks) else \
            [{"role": "user", "content": "just text"}]
        return client.chat.completions.create(model="vl", messages=msgs).choices[0].message.content

    with cf.ThreadPoolExecutor(len(asks) + 1) as pool:
        got = list(pool.map(one, range(len(asks) + 1)))
    assert got == expected + [text_only]
    assert chat.engine.peak_rows >= 2  # requests with pictures were in flight together


def _error(base, messages):
    status, body = http_json("POST", f"{base}/chat/completions", {"model": "vl", "messages": messages})
    return status, body["error"]


@pytest.mark.slow
def test_pictures_that_cannot_be_used_get_an_openai_400(vl_server, pictures, tmp_path, file_server):
    from PIL import Image

    chat, base = vl_server
    big = str(tmp_path / "big.png")
    Image.frombytes("RGB", (60, 40), os.urandom(60 * 40 * 3)).save(big)  # noise: it does not compress
    with open(big, "rb") as fh:
        assert len(fh.read()) > 4000  # over this server's picture limit
    root, web = file_server
    (root / "big.png").write_bytes(open(big, "rb").read())
    (root / "not.png").write_bytes(b"this is not a picture")
    cases = [
        (_ask([], data_url(big)), "image_too_large", "at most 4000 bytes"),
        (_ask([], f"{web}/big.png"), "image_too_large", "at most 4000 bytes"),
        (_ask([], "data:image/png;base64,@@not base64@@"), "invalid_image", "base64 does not decode"),
        (_ask([], "data:image/png,rawbytes"), "invalid_image", "must hold base64"),
        (_ask([], "data:image/png;base64," + base64.b64encode(b"GIF? no").decode()), "invalid_image",
         "not a picture"),
        (_ask([], f"{web}/not.png"), "invalid_image", "not a picture"),
        (_ask([], f"{web}/missing.png"), "invalid_image_url", "could not fetch"),
        (_ask([], "http://127.0.0.1:9/none.png"), "invalid_image_url", "could not fetch"),
        (_ask([], pictures[0]), "invalid_image_url", "image_url must be a data: URL or an http(s) URL"),
        (_ask([], "file://" + pictures[0]), "invalid_image_url", "not a file: URL"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": data_url(pictures[0])}}]},
          {"role": "user", "content": "and?"}], "invalid_request_error", "only a user message may carry images"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "invalid_request_error",
         "'input_audio' are not supported"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "invalid_request_error",
         "expected {\"url\""),
        ([{"role": "user", "content": "typed <image> tag"}], "invalid_image", "1 image placeholder"),
    ]
    for messages, code, words in cases:
        status, err = _error(base, messages)
        assert (status, err["code"]) == (400, code) and words in err["message"], (messages, err)
    status, body = http_json("POST", f"{base}/chat/completions",  # the server still answers
                             {"model": "vl", "messages": _ask([], data_url(pictures[0]))})
    assert status == 200 and body["choices"][0]["message"]["content"] == _alone(chat, "What is this?", [pictures[0]])


@pytest.mark.slow
def test_a_text_model_given_a_picture_answers_400(tiny_models, pictures):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine, GenConfig
    from tunesmith.serve.app import create_app

    chat = ChatEngine(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")),
                      AutoTokenizer.from_pretrained(tiny_models("qwen2")), defaults=GenConfig(max_new_tokens=2))
    try:
        with serve_on_a_thread(create_app(chat, {"vl": None})) as port:
            base = f"http://127.0.0.1:{port}/v1"
            status, err = _error(base, _ask([], data_url(pictures[0])))
            assert status == 400 and err["code"] == "invalid_image"
            assert err["message"] == ("1 image(s) given, but the model takes text only (it has no vision tower); use "
                                      "a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), or leave the "
                                      "pictures out")
            assert err["param"] == "messages[0].content[0].image_url"
            # nothing is fetched for a model that takes no pictures
            status, err = _error(base, _ask([], "http://127.0.0.1:9/none.png"))
            assert status == 400 and "takes text only" in err["message"]
    finally:
        chat.close()


@pytest.mark.slow
def test_a_slow_picture_never_holds_up_another_request(vl_server, pictures, file_server):
    """The server fetches (and decodes) pictures in worker threads: while one request waits SLOW_S seconds for its
    picture, another request with a picture is answered."""
    chat, base = vl_server
    root, web = file_server
    (root / "b.png").write_bytes(open(pictures[1], "rb").read())
    with cf.ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        slow = pool.submit(http_json, "POST", f"{base}/chat/completions",
                           {"model": "vl", "messages": _ask([], f"{web}/slow/b.png")})
        time.sleep(0.3)
        status, body = http_json("POST", f"{base}/chat/completions",
                                 {"model": "vl", "messages": _ask([], data_url(pictures[0]))})
        quick = time.monotonic() - start
        assert status == 200 and not slow.done() and quick < SLOW_S
        status, body = slow.result()
    assert status == 200 and body["choices"][0]["message"]["content"] == _alone(chat, "What is this?", [pictures[1]])

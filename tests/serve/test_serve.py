"""`tunesmith deploy` under real use: clients that drop their streams, hundreds of concurrent clients (some
cancelling), SIGTERM under load, n/logprobs over HTTP, and a tool-call round trip through the official openai
client. Servers are real (a subprocess, or uvicorn on a thread for the scripted model), on loopback only."""
import concurrent.futures as cf
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import HANG_S, free_port, http_json, serve_on_a_thread, start_deploy
from fakes import WEATHER, scripted_chat, weather_script


def _start(model_dir, *extra):
    """`tunesmith deploy` of model_dir as "m" (greedy, 8 new tokens, batches of up to 64): (process, port)."""
    return start_deploy("--model", model_dir, "--max_new_tokens", "8", "--temperature", "0", "--verbose", "false",
                        "--max_batch_size", "64", "--served_model_name", "m", *extra)


@pytest.fixture(scope="module")
def server(tiny_models):
    proc, port = _start(tiny_models("qwen2"))
    yield port, proc
    if proc.poll() is None:
        proc.terminate()
        proc.communicate(timeout=30)


def _ask(port, content, stream=False, max_tokens=8, cancel_after=None, timeout=120, streaming=None):
    """One chat request over a raw connection: the reply text (streamed or not); cancel_after=k closes the
    connection after k stream events (the client going away); streaming: a threading.Event set at the first
    stream event (the request is being generated)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    if not stream:
        out = json.loads(resp.read())["choices"][0]["message"]["content"]
        conn.close()
        return out
    text, events = "", 0
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        events += 1
        if streaming is not None:
            streaming.set()
        if cancel_after is not None and events >= cancel_after:
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            return None
        event = json.loads(line[6:])
        assert "error" not in event, event
        if event["choices"]:
            text += event["choices"][0]["delta"].get("content") or ""
    conn.close()
    return text


def _model_name(port):
    return http_json("GET", f"http://127.0.0.1:{port}/v1/models")[1]["data"][0]["id"]


@pytest.mark.slow
def test_dropped_streams_never_block_the_next_request(server):
    port, _ = server
    for i in range(20):
        assert _ask(port, f"stream {i}", stream=True, max_tokens=200, cancel_after=2) is None
    start = time.time()
    assert isinstance(_ask(port, "are you there?"), str)
    assert time.time() - start < 30  # answered at once, not after the dropped streams ran to their end


@pytest.mark.slow
def test_256_concurrent_clients_mixed_and_cancelling_all_answered_as_alone(server):
    port, _ = server
    rng = random.Random(0)
    jobs = [(f"client {i} asks about {rng.choice(['rivers', 'kings', 'music', 'cities'])}",
             rng.random() < 0.5, 3 if rng.random() < 0.15 else None) for i in range(256)]
    alone = {q: _ask(port, q) for q, _, cancel in jobs[:24] if cancel is None}

    def run(job):
        q, stream, cancel = job
        return _ask(port, q, stream=stream, cancel_after=cancel)

    with cf.ThreadPoolExecutor(256) as pool:
        answers = list(pool.map(run, jobs))  # any failure raises here
    for (q, _, cancel), a in zip(jobs, answers):
        if cancel is None:
            assert isinstance(a, str)
            if q in alone:
                assert a == alone[q], q
    assert isinstance(_ask(port, "still answering?"), str)


@pytest.mark.slow
def test_n_and_logprobs_over_http(server):
    port, _ = server
    status, body = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0,
                              "logprobs": True, "top_logprobs": 2, "max_tokens": 4})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"] == body["choices"][1]["message"]
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"] // 2 and len(entries[0]["top_logprobs"]) == 2
    assert entries[0]["logprob"] == entries[0]["top_logprobs"][0]["logprob"] <= 0
    status, body = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {}}})
    assert status == 400 and "response_format" in body["error"]["message"]
    status, body = http_json("GET", f"http://127.0.0.1:{port}/v1/nothing-here")
    assert status == 404 and body["error"]["message"]
    hi = [{"role": "user", "content": "hi"}]
    for extra, param in [({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                         ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs")]:
        status, body = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                                 {"model": "m", "messages": hi, **extra})
        assert status == 400 and body["error"]["param"] == param, body  # refused, never silently ignored
    status, body = http_json("POST", f"http://127.0.0.1:{port}/v1/completions",
                             {"model": "m", "prompt": "hi", "logprobs": 2})
    assert status == 400 and body["error"]["param"] == "logprobs"


@pytest.mark.slow
def test_sigterm_under_load_exits_cleanly(tiny_models):
    proc, port = _start(tiny_models("qwen2"))
    results, streaming = [], threading.Event()

    def client(i):
        try:
            results.append(("ok", _ask(port, f"load {i}", stream=i % 2 == 0, max_tokens=64, timeout=60,
                                       streaming=streaming)))
        except Exception as e:  # noqa: BLE001 - an in-flight request may be refused or cut; it must not hang
            results.append(("error", repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    assert streaming.wait(HANG_S)  # requests are being generated (not a fixed wait: the machine may be busy)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=HANG_S)[0]
    for t in threads:
        t.join(timeout=HANG_S)
    # uvicorn drains in-flight requests; deploy closes the engine, then raises the signal again (POSIX convention)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
    assert len(results) == 16  # every client got an answer or an error; none hangs


class _Engine:
    """Stands for a ChatEngine: records its close."""

    def __init__(self, events):
        self.events = events

    def close(self):
        self.events.append("engine closed")


def test_a_server_stopping_leaves_the_engine_to_whoever_built_it():
    """The app never closes the engine it was given (another user of the same engine keeps it); deploy, which
    built its engine, closes it after uvicorn has drained and returned, and still ends killed by the SIGTERM that
    stopped it (uvicorn's way: handle the signal, shut down, restore the handler and raise the signal again)."""
    from tunesmith.commands.deploy import serve_then_close
    from tunesmith.serve.app import create_app

    events = []
    with serve_on_a_thread(create_app(_Engine(events), {"m": None})) as port:
        assert http_json("GET", f"http://127.0.0.1:{port}/health")[0] == 200
    assert events == []

    def uvicorn_run():
        caught = []
        original = signal.signal(signal.SIGTERM, lambda signum, _frame: caught.append(signum))
        signal.raise_signal(signal.SIGTERM)  # a SIGTERM while serving
        events.append("drained")
        signal.signal(signal.SIGTERM, original)
        for signum in caught:
            signal.raise_signal(signum)

    def default_action(_signum, _frame):  # SIG_DFL's part, in this test process
        events.append("process ends by SIGTERM")

    outer = signal.signal(signal.SIGTERM, default_action)
    try:
        serve_then_close(_Engine(events), uvicorn_run)
        assert events == ["drained", "engine closed", "process ends by SIGTERM"]
        assert signal.getsignal(signal.SIGTERM) is default_action
        events.clear()
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C: the engine is closed on the way out
            serve_then_close(_Engine(events), lambda: (_ for _ in ()).throw(KeyboardInterrupt))
        assert events == ["engine closed"]
    finally:
        signal.signal(signal.SIGTERM, outer)


@pytest.fixture
def scripted_server(tiny_models):
    """The app over a scripted model (it calls get_weather, then answers from the tool's result), served by uvicorn
    on a thread."""
    from tunesmith.serve.app import create_app

    chat = scripted_chat(tiny_models, "qwen2", weather_script)
    with serve_on_a_thread(create_app(chat, {"weather-bot": None}, api_key="sk-scripted")) as port:
        yield f"http://127.0.0.1:{port}/v1"
    chat.close()  # the app does not close the engine it was given: its builder does


@pytest.mark.slow
def test_tool_call_round_trip_through_the_openai_client(scripted_server):
    import openai

    client = openai.OpenAI(base_url=scripted_server, api_key="sk-scripted", max_retries=0)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="weather-bot", messages=msgs, tools=WEATHER, temperature=0,
                                           max_tokens=60)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    stream = client.chat.completions.create(model="weather-bot", messages=msgs, tools=WEATHER, temperature=0,
                                            max_tokens=60, stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})}]
    second = client.chat.completions.create(model="weather-bot", messages=msgs, tools=WEATHER, temperature=0,
                                            max_tokens=60)
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    # a lowercase bearer scheme is the same key
    status, _ = http_json("GET", f"{scripted_server}/models", headers={"Authorization": "bearer sk-scripted"})
    assert status == 200


HOSTILE = [  # (name, method, path, body: dict or raw bytes, status)
    ("seed 2^64", "POST", "/v1/chat/completions", {"seed": 2 ** 64}, 200),
    ("body not UTF-8", "POST", "/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", '
                                                       b'"content": "\xff\xfe"}]}', 400),
    ("unknown path", "POST", "/v1/nope", {}, 404),
    ("GET on chat", "GET", "/v1/chat/completions", None, 405),
    ("broken JSON", "POST", "/v1/chat/completions", b'{"model": ', 400),
    ("JSON list", "POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("max_tokens -1", "POST", "/v1/chat/completions", {"max_tokens": -1}, 400),
    ("n 10000", "POST", "/v1/chat/completions", {"n": 10000}, 400),
    ("temperature -1", "POST", "/v1/chat/completions", {"temperature": -1}, 400),
    ("temperature NaN", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("top_p 2", "POST", "/v1/chat/completions", {"top_p": 2}, 400),
    ("unknown model", "POST", "/v1/chat/completions", {"model": "zz"}, 404),
    ("no messages", "POST", "/v1/chat/completions", {"messages": []}, 400),
    ("unknown role", "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("content 5", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("top_logprobs 1000", "POST", "/v1/chat/completions", {"logprobs": True, "top_logprobs": 1000}, 400),
    ("10 MB body", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 5_000_000}]},
     413),
    ("2 MB prompt", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 1_000_000}]},
     400),
    ("deep JSON", "POST", "/v1/chat/completions", b'{"a":' * 100000 + b"1" + b"}" * 100000, 400),
    ("bad API key", "GET", "/v1/models", None, 401),
    ("no API key", "POST", "/v1/chat/completions", {}, 401),
    # wrong JSON types are refused, not coerced (OpenAI's strictness); an int is a fine float
    ("n '3'", "POST", "/v1/chat/completions", {"n": "3"}, 400),
    ("logprobs 'yes'", "POST", "/v1/chat/completions", {"logprobs": "yes"}, 400),
    ("logprobs 1", "POST", "/v1/chat/completions", {"logprobs": 1}, 400),
    ("max_tokens '4'", "POST", "/v1/chat/completions", {"max_tokens": "4"}, 400),
    ("seed true", "POST", "/v1/chat/completions", {"seed": True}, 400),
    ("stream 'false'", "POST", "/v1/chat/completions", {"stream": "false"}, 400),
    ("temperature '0.5'", "POST", "/v1/chat/completions", {"temperature": "0.5"}, 400),
    ("temperature 1 (int)", "POST", "/v1/chat/completions", {"temperature": 1}, 200),
    ("completions n '2'", "POST", "/v1/completions", {"prompt": "hi", "n": "2"}, 400),
    ("top_logprobs alone", "POST", "/v1/chat/completions", {"top_logprobs": 2}, 400),
    ("top_logprobs, logprobs false", "POST", "/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, 400),
    ("user without content", "POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("system content null", "POST", "/v1/chat/completions",
     {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]}, 400),
    ("tool without content", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                   {"role": "tool", "tool_call_id": "c1"}]}, 400),
    ("assistant without content or calls", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "x"}]}, 400),
    ("lone surrogate", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "cut \\ud800 emoji"}]}', 400),
    ("lone surrogate in prompt", "POST", "/v1/completions", b'{"model": "m", "prompt": "x\\udfff"}', 400),
    ("max_tokens 1e12", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e12}', 400),
    ("max_completion_tokens 10^12", "POST", "/v1/chat/completions", {"max_completion_tokens": 10 ** 12}, 400),
    ("completions max_tokens 10^12", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 12}, 400),
    ("max_tokens 1.5", "POST", "/v1/chat/completions", {"max_tokens": 1.5}, 400),
]

# what a refusal must say: name -> (param, code, a fragment of the message)
HOSTILE_SAYS = {
    "n '3'": ("n", "invalid_type", "n: expected an integer, got a string"),
    "logprobs 'yes'": ("logprobs", "invalid_type", "logprobs: Input should be a valid boolean"),
    "seed true": ("seed", "invalid_type", "expected an integer, got a boolean"),
    "temperature '0.5'": ("temperature", "invalid_type", "expected a number, got a string"),
    "top_logprobs alone": ("top_logprobs", "invalid_request_error", "top_logprobs needs logprobs: true"),
    "user without content": ("messages[0].content", "invalid_request_error",
                             "messages[0].content is missing: a user message needs content"),
    "tool without content": ("messages[2].content", "invalid_request_error", "a tool message needs content"),
    "assistant without content or calls": ("messages[1].content", "invalid_request_error",
                                           "only an assistant message with tool_calls may leave it null"),
    "lone surrogate": ("messages[0].content", "invalid_request_error",
                       "messages[0].content: holds an unpaired surrogate"),
    "lone surrogate in prompt": ("prompt", "invalid_request_error", "prompt: holds an unpaired surrogate"),
    "max_tokens 1e12": ("max_tokens", "context_length_exceeded",
                        "This model's maximum context length is 4096 tokens. However, you requested 10000000000"),
    "max_completion_tokens 10^12": ("max_completion_tokens", "context_length_exceeded",
                                    "in the messages, 1000000000000 in the completion)"),
    "completions max_tokens 10^12": ("max_tokens", "context_length_exceeded", "in the prompt, 1000000000000 in"),
}

# requests uvicorn's HTTP parser refuses before the app sees them: answered in OpenAI's shape all the same
BAD_HTTP = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
]


def _bad_http(port, request: bytes):
    """(status, headers, body) of a raw request uvicorn's parser refuses."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1").lower(), body


def _raw(port, method, path, body, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    plain = {"messages": [{"role": "user", "content": "hi"}]} if "/chat/" in path else {}  # completions: a prompt
    data = body if isinstance(body, bytes) or body is None else json.dumps(
        {"model": "m", **plain, "max_tokens": 4, **body})
    conn.request(method, path, data, {"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def _rss_mib(pid):
    with open(f"/proc/{pid}/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.slow
def test_hostile_requests_get_openai_errors_and_memory_returns(tiny_models, monkeypatch):
    """Every hostile request answers with the right status and OpenAI's error body, never a 5xx; a body over
    --max_request_bytes is refused before it is read (chunked too), a prompt that cannot fit before it is
    tokenised; 20 requests of 10 MB leave the server's memory within 20% of where it started. The API key comes
    from TUNESMITH_API_KEY (kept out of the process list), its scheme case-insensitive."""
    monkeypatch.setenv("TUNESMITH_API_KEY", "sk-env")
    proc, port = _start(tiny_models("qwen2"))
    try:
        good = {"Authorization": "Bearer sk-env"}
        assert "sk-env" not in open(f"/proc/{proc.pid}/cmdline", "rb").read().decode(errors="replace")
        baseline = _rss_mib(proc.pid)
        for name, method, path, body, want in HOSTILE:
            headers = {} if name == "no API key" else {"Authorization": "Bearer nope"} if name == "bad API key" \
                else good
            status, raw = _raw(port, method, path, body, headers)
            assert status == want, (name, status, raw[:300])
            if status != 200:
                err = json.loads(raw)["error"]
                assert err["message"] and err["type"] and "code" in err, (name, raw[:300])
            if name in HOSTILE_SAYS:
                param, code, fragment = HOSTILE_SAYS[name]
                assert err["type"] == "invalid_request_error" and (err["param"], err["code"]) == (param, code), err
                assert fragment in err["message"], err
                assert "surrogates not allowed" not in err["message"]  # not the tokenizer's own words
        for request in BAD_HTTP:
            status, head, raw = _bad_http(port, request)
            err = json.loads(raw)["error"]
            assert status == 400 and "application/json" in head and err["type"] == "invalid_request_error", raw
            assert err["code"] == "invalid_http_request" and "Content-Length" in err["message"], raw
        assert _raw(port, "GET", "/v1/models", None, {"Authorization": "bEaReR sk-env"})[0] == 200
        for _ in range(20):
            status, raw = _raw(port, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "x " * 5_000_000}]}, good)
            assert status == 413 and b"--max_request_bytes" in raw
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", (b"x" * (1 << 20) for _ in range(12)),
                     {"Content-Type": "application/json", **good}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
        assert _rss_mib(proc.pid) < baseline * 1.2, (baseline, _rss_mib(proc.pid))
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_unparsable_http_gets_openai_errors_with_h11_too():
    """uvicorn answers what its HTTP parser refuses before any app sees it; deploy's protocol class (httptools
    above, h11 here) shapes that 400 as OpenAI's error body."""
    from tunesmith.serve.app import openai_http_protocol

    async def app(scope, receive, send):  # never reached by these requests
        raise AssertionError(scope)

    with serve_on_a_thread(app, log_level="error", lifespan="off", http=openai_http_protocol("h11")) as port:
        for request in BAD_HTTP:
            status, head, raw = _bad_http(port, request)
            err = json.loads(raw)["error"]
            assert status == 400 and "application/json" in head and err["code"] == "invalid_http_request", raw


@pytest.mark.slow
def test_a_model_with_nan_weights_is_refused_at_start(tiny_models, tmp_path):
    """deploy checks once, before listening, that the model's output is finite: NaN weights are named (and a
    checkpoint that training marked diverged.json says so) instead of a server whose every answer fails."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models("qwen2")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    bad = str(tmp_path / "nan-model")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(src).save_pretrained(bad)
    for marked in (False, True):
        if marked:
            (tmp_path / "nan-model" / "diverged.json").write_text(json.dumps({"step": 7}))
        out = subprocess.run([sys.executable, "-m", "tunesmith", "deploy", "--model", bad, "--port",
                              str(free_port())], capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode == 1 and "Traceback" not in text, text
        assert (f"{bad}: its weights gave a non-finite loss at step 7 (diverged.json)" if marked else
                f"{bad}: the weight model.norm.weight holds NaN or inf, so every request would fail; nothing was "
                f"served") in text, text


def test_a_request_whose_output_is_nan_gets_an_openai_error(tiny_models):
    """A model whose forward gives NaN for some inputs (here: two words, as float16 activations can overflow on
    some prompts): that request gets OpenAI's error body (code model_output_not_finite; a stream ends with an error
    event), greedy or sampled — never a silent arg-max over NaN — and the server answers the next request."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine
    from tunesmith.serve.app import create_app

    src = tiny_models("qwen2")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    chat = ChatEngine(model, tok)
    normal = set(chat.prompt([{"role": "user", "content": "hi"}]).ids)
    poison = torch.tensor([t for t in tok("zebra quagga", add_special_tokens=False)["input_ids"] if t not in normal])
    assert len(poison)
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: out.masked_fill(torch.isin(args[0], poison)[..., None], float("nan")))
    assert chat.non_finite_problem() is None  # the start-up check passes: only these words overflow
    with serve_on_a_thread(create_app(chat, {"m": None})) as port:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for temperature in (0, 0.8):
            body = {"model": "m", "messages": [{"role": "user", "content": "a zebra quagga"}], "max_tokens": 4,
                    "temperature": temperature}
            status, out = http_json("POST", url, body)
            err = out["error"]
            assert status == 500 and err["code"] == "model_output_not_finite", out
            assert "the model's output holds NaN or inf at generated token 1" in err["message"], out
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                         {"Content-Type": "application/json"})
            events = [json.loads(line[6:]) for line in conn.getresponse().read().decode().splitlines()
                      if line.startswith("data: {")]
            conn.close()
            assert events[-1]["error"]["code"] == "model_output_not_finite", events
        status, out = http_json("POST", url, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4, "temperature": 0})
        assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str)
    chat.close()


USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASKED = {"role": "assistant", "content": None, "tool_calls": [CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}

# what OpenAI answers 400 and this server used to answer 200: (name, path, fields over a plain chat request,
# param, a fragment of the message)
REFUSED = [
    ("tool without function", "/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0].function",
     "Missing required parameter: 'tools[0].function'."),
    ("function without name", "/v1/chat/completions",
     {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools[0].function.name",
     "Missing required parameter: 'tools[0].function.name'."),
    ("function name empty", "/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": ""}}]},
     "tools[0].function.name", "'tools[0].function.name'"),
    ("tool type", "/v1/chat/completions", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
     "tools[0].type", "Supported values are: 'function'."),
    ("tool not an object", "/v1/chat/completions", {"tools": ["get_weather"]}, "tools[0]", "expected an object"),
    ("tools empty", "/v1/chat/completions", {"tools": []}, "tools", "Invalid 'tools': empty array"),
    ("parameters not an object", "/v1/chat/completions",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}]},
     "tools[0].function.parameters", "expected an object"),
    ("tool message without id or call", "/v1/chat/completions",
     {"messages": [USER, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id",
     "Missing required parameter: 'messages[1].tool_call_id'"),
    ("tool message without a call before it", "/v1/chat/completions",
     {"messages": [USER, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}, "messages[1].role",
     "messages with role 'tool' must be a response to a preceding message with 'tool_calls'"),
    ("tool_call_id of no call", "/v1/chat/completions",
     {"messages": [USER, ASKED, {**RESULT, "tool_call_id": "call_9"}]}, "messages[2].tool_call_id",
     "'call_9' answers none of the unanswered calls of messages[1] (their ids: 'call_1')"),
    ("call never answered", "/v1/chat/completions", {"messages": [USER, ASKED, {"role": "user", "content": "and?"}]},
     "messages[1].tool_calls", "The following tool_call_ids did not have response messages: call_1"),
    ("arguments not JSON", "/v1/chat/completions",
     {"messages": [USER, {**ASKED, "tool_calls": [{**CALL, "function": {"name": "get_weather",
                                                                         "arguments": "{bad"}}]}, RESULT]},
     "messages[1].tool_calls[0].function.arguments", "is not valid JSON"),
    ("arguments a JSON list", "/v1/chat/completions",
     {"messages": [USER, {**ASKED, "tool_calls": [{**CALL, "function": {"name": "get_weather",
                                                                         "arguments": "[1]"}}]}, RESULT]},
     "messages[1].tool_calls[0].function.arguments", "expected a JSON object of arguments"),
    ("call without id", "/v1/chat/completions",
     {"messages": [USER, {**ASKED, "tool_calls": [{"type": "function", "function": CALL["function"]}]}]},
     "messages[1].tool_calls[0].id", "Missing required parameter: 'messages[1].tool_calls[0].id'"),
    ("tool_calls on a user message", "/v1/chat/completions", {"messages": [{**USER, "tool_calls": [CALL]}]},
     "messages[0].tool_calls", "only an assistant message may carry tool_calls"),
    ("unknown field", "/v1/chat/completions", {"foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
    ("two unknown fields", "/v1/completions", {"messages": None, "bar": []}, "messages",
     "Unrecognized request arguments supplied: messages, bar"),
    ("vLLM's min_p", "/v1/chat/completions", {"min_p": 0.1}, "min_p", "min_p is not supported by this server"),
    ("functions (deprecated)", "/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "use tools"),
    ("stream_options without stream", "/v1/chat/completions", {"stream_options": {"include_usage": True}},
     "stream_options", "only allowed when 'stream' is enabled"),
]

# what OpenAI's and vLLM's clients send and must keep working: (name, path, fields)
ACCEPTED = [
    ("OpenAI's optional fields", "/v1/chat/completions",
     {"user": "u1", "seed": 3, "n": 1, "logprobs": False, "response_format": {"type": "text"}, "metadata": {"a": "b"},
      "service_tier": "auto", "store": False, "parallel_tool_calls": True, "presence_penalty": 0,
      "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 4}),
    ("vLLM's extras", "/v1/chat/completions", {"top_k": -1, "repetition_penalty": 1.0, "enable_thinking": False,
                                               "chat_template_kwargs": {}, "min_p": 0}),
    ("a whole tool round", "/v1/chat/completions", {"messages": [USER, ASKED, RESULT], "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}),
    ("arguments as an object", "/v1/chat/completions", {"messages": [
        USER, {**ASKED, "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        RESULT]}),
    ("completions' fields", "/v1/completions", {"echo": False, "best_of": 1, "suffix": "", "logprobs": None,
                                                "user": "u1"}),
]


def test_what_openai_refuses_is_a_400_naming_the_param_and_what_clients_send_is_accepted(tiny_models):
    """Each request of REFUSED got 200 (an invented tool, a result without its call, unparsable arguments, an
    unknown field read as nothing); now a 400 in OpenAI's error shape naming the param. Every request of ACCEPTED
    still gets 200."""
    from tunesmith.serve.app import create_app

    chat = scripted_chat(tiny_models, "qwen2", weather_script)
    with serve_on_a_thread(create_app(chat, {"m": None})) as port:
        url = f"http://127.0.0.1:{port}"

        def post(path, fields):
            """(status, body) of a plain request to path (a user message, or a prompt) with `fields` over it."""
            base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
            return http_json("POST", url + path, {"model": "m", "max_tokens": 1, **base, **fields}) \
                if not fields.get("stream") else _raw(port, "POST", path, fields, {})

        for name, path, fields, param, fragment in REFUSED:
            status, body = post(path, fields)
            assert status == 400, (name, status, body)
            err = body["error"]
            assert (err["type"], err["param"]) == ("invalid_request_error", param), (name, err)
            assert fragment in err["message"], (name, err["message"])
        for name, path, fields in ACCEPTED:
            status, body = post(path, fields)
            assert status == 200, (name, body)
    chat.close()

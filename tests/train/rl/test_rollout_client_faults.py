"""The rollout client's start checks and recovery against `tunesmith rollout` on a thread: a server that serves
another base model is refused at connect (GET /get_model_info/), the same model at another path is accepted, a
server without the endpoint gets a note, and a server that dies and comes back within --vllm_server_timeout gets
the push / request again instead of ending the run."""
import shutil
import threading
import time

import pytest

from conftest import serve_on_a_thread
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError


@pytest.fixture(scope="module")
def rollout(tiny_models):
    """`tunesmith rollout --model <tiny qwen2>` on a thread: (model dir, port, its app)."""
    from tunesmith.commands.rollout import build

    model = tiny_models("qwen2")
    engine, app, _ = build(parse_args("rollout", ["--model", model, "--verbose", "false"]))
    with serve_on_a_thread(app) as port:
        yield model, port, app
    engine.close()


def _client(model_dir, port, timeout=5.0, lora=True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.train.rl.rollout_client import RolloutServer, ServerConfig

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["v_proj"]))
    return RolloutServer(ServerConfig(f"http://127.0.0.1:{port}", timeout), policy, model_dir)


@pytest.mark.parametrize("family,seed,why", [("llama3", 0, "architectures"), ("qwen2", 1, "the weights differ")])
def test_a_server_of_another_model_is_refused_at_connect(rollout, tiny_models, family, seed, why):
    model, port, _ = rollout
    other = tiny_models(family, seed=seed)
    with pytest.raises(ConfigError, match=rf"serves .*another model than this run's --model {other} \({why}.*"
                                          rf"tunesmith rollout --model {other}") as e:
        _client(other, port).connect()
    assert "\n" not in str(e.value)


def test_the_same_model_at_another_path_is_accepted(rollout, tmp_path):
    model, port, _ = rollout
    copy = shutil.copytree(model, tmp_path / "copy")
    assert _client(str(copy), port).connect()["server"] == "tunesmith"
    assert _client(str(copy), port, lora=False).connect()["server"] == "tunesmith"


def test_a_server_without_model_info_gets_a_note(tiny_models, capsys):
    from fastapi import FastAPI

    app = FastAPI()
    app.get("/health/")(lambda: {"status": "ok"})
    app.post("/get_engine_type/")(lambda: {"server": "tunesmith", "model": "m"})
    with serve_on_a_thread(app) as port:
        assert _client(tiny_models("qwen2"), port).connect()["model"] == "m"
    assert "does not say which model it serves" in capsys.readouterr().err


class _OnPort:
    """An ASGI app served by uvicorn on a thread at a fixed loopback port, started and stopped at will."""

    def __init__(self, app, port):
        self.app, self.port, self.srv, self.thread = app, port, None, None

    def start(self):
        import uvicorn

        self.srv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.srv.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.srv.started

    def stop(self):
        self.srv.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_a_server_that_comes_back_gets_the_adapter_again(rollout, tmp_path, capsys):
    """The server stops mid-run: the next push waits for /health/ (one note), then goes to the restarted server;
    a round whose server restarted meanwhile pushes the adapter again and is sampled; one that never comes back
    within --vllm_server_timeout fails with the connection error."""
    from conftest import free_port
    from tunesmith.train.rl.rollout_client import RolloutServerError

    model, _, app = rollout
    server = _OnPort(app, free_port())
    server.start()
    client = _client(model, server.port, timeout=20.0)
    client.connect()
    client.sync()
    server.stop()
    threading.Timer(1.5, server.start).start()
    with __import__("torch").no_grad():
        next(p for n, p in client.model.named_parameters() if "lora_B" in n).add_(0.1)
    assert client.sync() is not None and client.pushes == 2
    assert capsys.readouterr().err.count("stopped answering") == 1
    out = client.generate([([5, 6, 7], 11, [{"role": "user", "content": "x"}])], {"max_tokens": 3}, 2)
    assert len(out) == 2
    server.stop()
    threading.Timer(1.5, server.start).start()
    client.adapter = "policy-999999"  # the restarted server knows no version: pushed again, then sampled
    out = client.generate([([5, 6, 7], 11, [{"role": "user", "content": "x"}])], {"max_tokens": 3}, 2)
    assert len(out) == 2 and client.pushes == 3
    server.stop()
    client = _client(model, server.port, timeout=1.0)
    with pytest.raises(RolloutServerError, match="did not answer /infer/ .*ConnectionRefusedError"):
        client.generate([([5, 6, 7], 11, [{"role": "user", "content": "x"}])], {"max_tokens": 3}, 2, adapter=None)

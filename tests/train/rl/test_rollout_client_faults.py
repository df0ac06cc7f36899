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

"""GRPO's rollouts from a server (`--use_vllm true --vllm_mode server`) against `tunesmith rollout` on the same
machine: the run equals the colocated run (tunesmith's own engine in the training process) — the same completions,
rewards and losses, step after step, so after a step the server samples the updated adapter (ms-swift #9855's bug
cannot happen) — and the rollout server's protocol: ms-swift's /infer/ shapes, adapter pushes, NCCL endpoints
refused with what to use, a client that disconnects freeing its sequences, the API key, and the errors a trainer
gets fast (no server, a vLLM server, bad flags). Servers are uvicorn on a thread, on loopback."""
import http.client
import json
import os
import socket
import time
from unittest import mock

import pytest

from conftest import free_port, http_json, read_jsonl, serve_on_a_thread, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe
from fakes import EVEN_TOKENS_PLUGIN

pytestmark = pytest.mark.usefixtures("no_charts")

@pytest.fixture(scope="module")
def rollout(tiny_models):
    """`tunesmith rollout --model <tiny qwen2>` built as the command builds it, served on a thread:
    (model dir, port, its ChatEngine)."""
    from tunesmith.commands.rollout import build

    model = tiny_models("qwen2")
    engine, app, _ = build(parse_args("rollout", ["--model", model, "--verbose", "false"]))
    with serve_on_a_thread(app) as port:
        yield model, port, engine
    engine.close()


@pytest.fixture
def setup(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": "even"} for i in range(16)])
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EVEN_TOKENS_PLUGIN)
    return data, str(plugin)


def _grpo(model, data, plugin, out, *flags):
    argv = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "10", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out), "--external_plugins", plugin,
            "--reward_funcs", "even_tokens", "--learning_rate", "5e-2", "--log_completions", "true", *flags]
    return recipe.main(parse_args("rlhf", argv))


def _server_flags(port):
    return ["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1",
            "--vllm_server_port", str(port)]


@pytest.mark.slow
def test_server_rollouts_equal_the_colocated_run_and_follow_the_updated_adapter(rollout, setup, tmp_path):
    """Three steps with --vllm_mode server equal three colocated steps: every round's completions (so every
    reward, advantage and loss), the first round's included. Rounds 2 and 3 are sampled after the policy moved, so
    the server sampled the pushed adapter, not the base; and what the server samples now equals the trainer's engine
    over checkpoint-2's adapter, and differs from the base model's."""
    model, port, engine = rollout
    data, plugin = setup
    common = ["--max_steps", "3", "--save_steps", "1"]
    local = _grpo(model, data, plugin, tmp_path / "local", *common)
    before = http_json("POST", f"http://127.0.0.1:{port}/get_engine_type/")[1]["adapter"]
    remote = _grpo(model, data, plugin, tmp_path / "remote", *common, *_server_flags(port))
    after = http_json("POST", f"http://127.0.0.1:{port}/get_engine_type/")[1]["adapter"]
    pushed = int(after.split("-")[1]) - (int(before.split("-")[1]) if before else 0)
    assert pushed == 3  # one adapter version per round: the weights changed at every step
    a = read_jsonl(os.path.join(local["run_dir"], "completions.jsonl"))
    b = read_jsonl(os.path.join(remote["run_dir"], "completions.jsonl"))
    assert len(a) == len(b) == 3 * 16  # 8 per micro-batch x 2 (a total batch of 16) per step
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert [r["advantage"] for r in a] == [r["advantage"] for r in b]
    logs = [[r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
            for res in (local, remote)]
    for x, y in zip(*logs):
        for key in ("loss", "reward", "grad_norm"):
            assert abs(x[key] - y[key]) < 1e-6, (x["global_step"], key, x[key], y[key])
    _server_samples_checkpoint(model, port, os.path.join(remote["run_dir"], "checkpoint-2"))


@pytest.mark.slow
def test_full_weight_server_rollouts_equal_the_colocated_run(tiny_models, setup, tmp_path):
    """--train_type full: the trainable weights go to a fresh server before each round (POST /update_params/), and
    two steps equal two colocated steps."""
    from tunesmith.commands.rollout import build

    model = tiny_models("qwen2")
    data, plugin = setup
    from safetensors.torch import load_file

    common = ["--max_steps", "2", "--save_steps", "1", "--train_type", "full", "--learning_rate", "1e-3"]
    engine, app, _ = build(parse_args("rollout", ["--model", model, "--verbose", "false"]))
    try:
        with serve_on_a_thread(app) as port:
            remote = _grpo(model, data, plugin, tmp_path / "remote", *common, *_server_flags(port))
        # the last push came before round 2: the server holds checkpoint-1's weights, not the base model's
        served = dict(engine.engine.model.named_parameters())
        ckpt = load_file(os.path.join(remote["run_dir"], "checkpoint-1", "model.safetensors"))
        base = load_file(os.path.join(model, "model.safetensors"))
        shared = [k for k in ckpt if k in served]
        assert shared and all((served[k] == ckpt[k]).all() for k in shared)
        assert any(not (served[k] == base[k]).all() for k in shared)
    finally:
        engine.close()
    local = _grpo(model, data, plugin, tmp_path / "local", *common)
    a = read_jsonl(os.path.join(local["run_dir"], "completions.jsonl"))
    b = read_jsonl(os.path.join(remote["run_dir"], "completions.jsonl"))
    assert len(a) == 2 * 16 and [r["completion"] for r in a] == [r["completion"] for r in b]
    assert [r["completion"] for r in a[:16]] != [r["completion"] for r in a[16:]]
    logs = [[r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
            for res in (local, remote)]
    for x, y in zip(*logs):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and x["reward"] == y["reward"], (x, y)


def _server_samples_checkpoint(model, port, ckpt):
    """/infer/ now (the adapter pushed before round 3: checkpoint-2's weights) equals the trainer's engine over
    that checkpoint, with the same seeds; the base model samples something else."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine, GenConfig

    tok = AutoTokenizer.from_pretrained(model)
    messages = [[{"role": "user", "content": f"say something {i}"}] for i in range(4)]
    status, body = http_json("POST", f"http://127.0.0.1:{port}/infer/", {
        "infer_requests": [{"messages": m} for m in messages],
        "request_config": {"max_tokens": 10, "temperature": 0.9, "seed": 100, "n": 2, "return_details": True}})
    assert status == 200, body
    served = [c["token_ids"] for o in body for c in o["response"]["choices"]]

    def local(m):
        chat = ChatEngine(m, tok)
        try:
            out = []
            for i, msgs in enumerate(messages):
                handles = chat.submit(chat.prompt(msgs), GenConfig(max_new_tokens=10, temperature=0.9,
                                                                   seed=100 + 2 * i, n=2))
                out += [h.result().token_ids for h in handles]
            return out
        finally:
            chat.close()

    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), ckpt).eval()
    assert served == local(trained)
    assert served != local(AutoModelForCausalLM.from_pretrained(model).eval())


def test_infer_answers_in_ms_swifts_shapes_and_weights_arrive_over_http_only(rollout):
    model, port, engine = rollout
    url = f"http://127.0.0.1:{port}"
    assert http_json("GET", f"{url}/health/") == (200, {"status": "ok"})
    assert http_json("GET", f"{url}/get_world_size/") == (200, {"world_size": 1})
    status, info = http_json("POST", f"{url}/get_engine_type/")
    assert status == 200 and info["server"] == "tunesmith" and info["engine_type"] == "LLMEngine"
    status, body = http_json("POST", f"{url}/infer/", {
        "infer_requests": [{"messages": [{"role": "user", "content": "hi"}], "uuid": "a", "data_dict": {"x": 1}},
                           {"messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": [5, 6, 7],
                            "seed": 3}],
        "request_config": {"max_tokens": 4, "temperature": 1.0, "seed": 3, "n": 2, "return_details": True},
        "use_tqdm": False})
    assert status == 200 and len(body) == 2
    out = body[0]
    assert set(out) >= {"response", "messages", "response_token_ids", "rollout_infos"}
    response = out["response"]
    assert response["object"] == "chat.completion" and response["prompt_token_ids"]
    assert response["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in response["choices"])
    assert [c["index"] for c in response["choices"]] == [0, 1]
    for c in response["choices"]:
        assert c["finish_reason"] in ("stop", "length") and c["message"]["role"] == "assistant"
        assert 1 <= len(c["token_ids"]) <= 4 and isinstance(c["message"]["content"], str)
    # request 0's completions have seeds 3, 4 (request_config.seed + i·n + k); request 1 asked for seed 3 itself
    assert body[1]["response"]["prompt_token_ids"] == [5, 6, 7]
    for path in ("/init_communicator/", "/update_named_param/", "/update_adapter_flattened_param/",
                 "/update_flattened_params/"):
        status, err = http_json("POST", url + path, {"host": "0.0.0.0", "port": 51216, "world_size": 2})
        assert status == 501 and "NCCL" in err["error"]["message"] and "/update_adapter/" in err["error"]["message"]
    status, err = http_json("POST", f"{url}/update_adapter/", raw=b"not safetensors at all")
    assert status == 400 and "safetensors" in err["error"]["message"]
    status, err = http_json("POST", f"{url}/infer/", {"infer_requests": [{"messages": [{"role": "user",
                                                                                         "content": "hi"}]}],
                                                       "request_config": {"presence_penalty": 0.5}})
    assert status == 400 and "presence_penalty" in err["error"]["message"]
    assert http_json("POST", f"{url}/reset_prefix_cache/")[0] == 200


def test_an_adapter_that_does_not_fit_is_refused_and_the_server_goes_on(rollout, tmp_path):
    import torch

    from tunesmith.inference.live_adapters import pack_adapter

    model, port, engine = rollout
    url = f"http://127.0.0.1:{port}"
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    wrong = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 999)}
    status, err = http_json("POST", f"{url}/update_adapter/", raw=pack_adapter(config, wrong),
                            headers={"Content-Type": "application/octet-stream"})
    assert status == 400 and "cannot be loaded" in err["error"]["message"], err
    status, body = http_json("POST", f"{url}/infer/", {"infer_requests": [{"messages": [{"role": "user",
                                                                                          "content": "hi"}]}],
                                                        "request_config": {"max_tokens": 3}})
    assert status == 200 and body[0]["response"]["choices"]


def test_a_client_that_disconnects_frees_its_sequences(rollout, monkeypatch):
    """A long /infer/ (16 sequences of up to 3000 tokens, each decoding step slowed to 20 ms) whose client goes
    away: its sequences leave the engine within seconds, not after the minute they would take."""
    model, port, engine = rollout
    gen = engine.engine
    step = gen._step

    def slow_step(state, admitted):
        step(state, admitted)
        time.sleep(0.02)

    monkeypatch.setattr(gen, "_step", slow_step)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"infer_requests": [{"messages": [{"role": "user", "content": "go on and on"}]}],
            "request_config": {"max_tokens": 3000, "temperature": 1.0, "n": 16, "seed": 1}}
    conn.request("POST", "/infer/", json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.time() + 60
    while not (gen._state is not None and len(gen._state.rows) >= 8) and time.time() < deadline:
        time.sleep(0.05)
    assert gen._state.rows, "the request never started generating"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 20
    while gen._state.rows and time.time() < deadline:
        time.sleep(0.05)
    assert not gen._state.rows and not gen._pending


def test_the_api_key_guards_every_path_but_health(rollout):
    from tunesmith.serve.rollout import create_rollout_app

    _, _, engine = rollout
    with serve_on_a_thread(create_rollout_app(engine, "m", api_key="sk-rollout")) as port:
        url = f"http://127.0.0.1:{port}"
        assert http_json("GET", f"{url}/health/")[0] == 200
        assert http_json("POST", f"{url}/get_engine_type/")[0] == 401
        assert http_json("POST", f"{url}/update_adapter/", raw=b"x")[0] == 401
        assert http_json("POST", f"{url}/get_engine_type/", headers={"Authorization": "Bearer sk-rollout"})[0] == 200
        # a trainer without the key (or with a wrong one) is told to set it, not that this is a vLLM server
        from tunesmith.train.rl.rollout_client import API_KEY_ENV, RolloutServer, ServerConfig

        for key in (None, "wrong"):
            env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV} | ({API_KEY_ENV: key} if key else {})
            with mock.patch.dict(os.environ, env, clear=True):
                with pytest.raises(ConfigError, match=f"needs an API key .*set {API_KEY_ENV}"):
                    RolloutServer(ServerConfig(url, 5.0), None, "m").connect()


def test_no_server_is_a_clear_error_at_once(tiny_models, setup, tmp_path, capsys):
    data, plugin = setup
    port = free_port()  # nothing listens there
    start = time.time()
    with pytest.raises(ConfigError, match=rf"no rollout server answers at http://127\.0\.0\.1:{port} .*"
                                          rf"tunesmith rollout --model .* --port {port}"):
        _grpo(tiny_models("qwen2"), data, plugin, tmp_path / "out", "--max_steps", "1", *_server_flags(port),
              "--vllm_server_timeout", "1")
    assert time.time() - start < 60
    assert capsys.readouterr().err.count("waiting up to 1 s (--vllm_server_timeout)") == 1


def test_a_vllm_rollout_server_is_refused_with_the_reason():
    """`swift rollout` answers /health/ and /get_engine_type/ without "server": its weights sync over NCCL only."""
    from fastapi import FastAPI

    from tunesmith.train.rl.rollout_client import RolloutServer, ServerConfig

    app = FastAPI()
    app.get("/health/")(lambda: {"status": "ok"})
    app.post("/get_engine_type/")(lambda: {"engine_type": "LLMEngine", "enable_multi_turn": False,
                                           "use_gym_env": False, "enable_lora": True})
    with serve_on_a_thread(app) as port:
        with pytest.raises(ConfigError, match="not a tunesmith rollout server .*NCCL.*tunesmith rollout --model m"):
            RolloutServer(ServerConfig(f"http://127.0.0.1:{port}", 5.0), None, "m").connect()


@pytest.mark.parametrize("flags,message", [
    (["--vllm_mode", "server"], "--vllm_mode server needs the rollout server's --vllm_server_host"),
    (["--vllm_mode", "server", "--vllm_server_host", "a", "b", "--vllm_server_port", "1", "2"],
     "one rollout server is supported yet"),
    (["--vllm_mode", "server", "--vllm_server_host", "a", "--train_type", "vera"],
     "other tuners' weights are not synced to a server yet"),
    (["--vllm_mode", "server", "--vllm_server_base_url", "localhost:8000"], "the server's root, http://HOST:PORT"),
    (["--vllm_mode", "server", "--vllm_server_base_url", "http://127.0.0.1:8000/v1"], "(no path)"),
    (["--vllm_mode", "server", "--vllm_server_host", "a", "--vllm_server_port", "70000"], "a TCP port, 1 to 65535"),
    (["--vllm_mode", "server", "--vllm_server_host", "a", "--multi_turn_scheduler", "tool_call_scheduler"],
     "multi-turn rollouts run in the training process"),
    (["--vllm_mode", "server", "--vllm_server_host", "a", "--vllm_server_timeout", "0"], "more than 0"),
])
def test_what_server_rollouts_cannot_do_is_a_flag_error(tiny_models, flags, message):
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               "--reward_funcs", "format", "--use_vllm", "true", *flags])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        recipe.configure(args)


def test_rollout_flags(tiny_models):
    from tunesmith.commands.rollout import refuse_backend
    from tunesmith.config.parser import ArgError

    args = parse_args("rollout", ["--model", "m", "--port", "8001", "--vllm_enable_lora", "true",
                                  "--vllm_max_lora_rank", "64"])
    assert (args.port, args.infer_backend) == (8001, "transformers")
    with pytest.raises(ConfigError, match="pass --vllm_enable_lora true .*NCCL"):
        refuse_backend(parse_args("rollout", ["--model", "m", "--infer_backend", "vllm"]))
    refuse_backend(parse_args("rollout", ["--model", "m", "--infer_backend", "vllm", "--vllm_enable_lora", "true"]))
    with pytest.raises(ConfigError, match="tunesmith's own engine"):
        refuse_backend(parse_args("rollout", ["--model", "m", "--infer_backend", "sglang"]))
    with pytest.raises(ArgError, match="NCCL port"):
        parse_args("rlhf", ["--vllm_server_group_port", "51216"])
    with pytest.raises(ArgError, match="does not support"):
        parse_args("rollout", ["--multi_turn_scheduler", "x"])
    args = parse_args("rlhf", ["--vllm_server_base_url", "http://h:1", "--vllm_server_timeout", "5"])
    assert (args.vllm_server_base_url, args.vllm_server_port, args.vllm_server_timeout) == (["http://h:1"], [8000], 5)


def test_on_vllm_each_pushed_adapter_becomes_a_lora_request(tiny_models, monkeypatch):
    """--infer_backend vllm --vllm_enable_lora true, dry run (a stand-in for vLLM: this machine has no GPU): each
    upload is written as an adapter folder and the following /infer/ requests carry a LoRA request with a new id
    whose folder holds exactly the pushed weights; two versions are kept; full weights are refused (NCCL only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import tunesmith.inference.backends as B
    from fakes import FakeVllm, fake_vllm
    from tunesmith.commands.rollout import build
    from tunesmith.inference.live_adapters import pack_adapter, policy_adapter

    fake = FakeVllm(script=(5, 6, 7))
    built = fake_vllm(monkeypatch, fake, gpu=False)
    monkeypatch.setattr(B, "check_backend", lambda *a, **k: None)
    model = tiny_models("qwen2")
    engine, app, _ = build(parse_args("rollout", ["--model", model, "--infer_backend", "vllm", "--vllm_enable_lora",
                                                  "true", "--vllm_max_lora_rank", "8", "--verbose", "false"]))
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj"]))
    ask = {"infer_requests": [{"messages": [{"role": "user", "content": "hi"}]}],
           "request_config": {"max_tokens": 3, "return_details": True}}
    try:
        with serve_on_a_thread(app) as port:
            url = f"http://127.0.0.1:{port}"
            assert built["engine_args"].kw["enable_lora"] and built["engine_args"].kw["max_lora_rank"] == 8
            paths = []
            for version in range(1, 4):
                with torch.no_grad():
                    for n, p in policy.named_parameters():
                        if "lora_B" in n:
                            p.fill_(0.01 * version)
                status, answer = http_json("POST", f"{url}/update_adapter/", raw=pack_adapter(*policy_adapter(policy)),
                                           headers={"Content-Type": "application/octet-stream"})
                assert status == 200 and answer["adapter"] == f"policy-{version}", answer
                status, body = http_json("POST", f"{url}/infer/", ask)
                assert status == 200 and body[0]["response"]["choices"][0]["token_ids"] == [5, 6, 7]
                name, lora_id, path = fake.calls[-1]["lora"].args
                assert name == f"policy-{version}" and load_file(os.path.join(path, "adapter_model.safetensors"))\
                    .keys() == policy_adapter(policy)[1].keys()
                sent = load_file(os.path.join(path, "adapter_model.safetensors"))
                assert all((v == policy_adapter(policy)[1][k]).all() for k, v in sent.items())
                paths.append((lora_id, path))
            assert len({i for i, _ in paths}) == 3 and not os.path.exists(paths[0][1]) and os.path.exists(paths[2][1])
            status, err = http_json("POST", f"{url}/update_params/", raw=pack_adapter({}, {"x": torch.zeros(1)}))
            assert status == 400 and "NCCL" in err["error"]["message"]
            big = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=16,
                                                                                         target_modules=["q_proj"]))
            status, err = http_json("POST", f"{url}/update_adapter/", raw=pack_adapter(*policy_adapter(big)))
            assert status == 400 and "--vllm_max_lora_rank 16" in err["error"]["message"]
    finally:
        engine.close()


def test_a_version_pushed_mid_request_leaves_running_sequences_on_theirs(tiny_models, monkeypatch):
    """An adapter installed while a sequence of the previous version is generating: the sequence ends exactly as it
    would have alone on its own version (it is pinned to it), requests after the install sample the new one, and
    the old version is dropped at the next install once nothing uses it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine, GenConfig
    from tunesmith.inference.live_adapters import LiveAdapters, policy_adapter

    model = tiny_models("qwen2")
    tok = AutoTokenizer.from_pretrained(model)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules="all-linear"))
    chat = ChatEngine(AutoModelForCausalLM.from_pretrained(model).eval(), tok)
    live = LiveAdapters(chat.engine)
    prompt = chat.prompt([{"role": "user", "content": "tell me everything"}])
    cfg = GenConfig(max_new_tokens=60, temperature=0)

    def push(scale):
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    torch.manual_seed(int(scale * 100))
                    p.copy_(torch.randn_like(p) * scale)
        return live.load(*policy_adapter(policy))

    step = chat.engine._step

    def slow_step(state, admitted):  # 60 steps take over a second: the install lands mid-sequence
        step(state, admitted)
        time.sleep(0.02)

    try:
        v1 = push(0.5)
        alone = chat.submit(prompt, cfg, v1)[0].result().token_ids
        monkeypatch.setattr(chat.engine, "_step", slow_step)
        handle = chat.submit(prompt, cfg, v1)[0]
        seen = []
        for token in handle:
            seen.append(token)
            if len(seen) == 5:
                v2 = push(1.0)  # installed between two steps of this very sequence
                assert live.names() == [v1, v2] and live.current == v2  # v1 is in use: kept
        assert handle.completion.token_ids == alone and len(seen) > 5
        after = chat.submit(prompt, cfg, None)[0].result().token_ids  # None: the newest version
        assert after == chat.submit(prompt, cfg, v2)[0].result().token_ids != alone
        v3 = push(1.5)
        assert live.names() == [v3]
    finally:
        chat.close()


def test_a_version_the_server_lost_is_pushed_again(rollout):
    """A server that no longer holds the version the trainer names (restarted, or another trainer's upload dropped
    it) answers /infer/ with a 400; the client pushes the adapter again and the round is sampled from it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.train.rl.rollout_client import RolloutServer, ServerConfig

    model, port, _ = rollout
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["v_proj"]))
    client = RolloutServer(ServerConfig(f"http://127.0.0.1:{port}", 5.0), policy, model)
    assert client.connect()["server"] == "tunesmith"
    first = client.sync()
    assert client.sync() == first and client.pushes == 1  # unchanged weights are not pushed again
    client.adapter = "policy-999999"  # what a restarted server would not know
    out = client.generate([([5, 6, 7], 11, [{"role": "user", "content": "x"}])],
                          {"max_tokens": 3, "temperature": 1.0}, 2)
    assert len(out) == 2 and client.pushes == 2 and client.adapter not in (first, "policy-999999")
    assert all(1 <= len(c.token_ids) <= 3 and c.prompt_tokens == 3 for c in out)

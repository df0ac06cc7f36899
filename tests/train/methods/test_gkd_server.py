"""GKD with the teacher behind a server (`--teacher_model_server`) against an in-process `tunesmith deploy` of the
teacher: ms-swift's request (POST /infer/ with prompt_logprobs) answered in vLLM's shape; the run's losses equal
the local teacher's with the same --gkd_logits_topk (ms-swift's top-k divergence is a log-softmax over the k
entries, the same for the server's log-probs as for the local teacher's logits: 1e-4), and with k the whole
vocabulary the full-vocabulary run's; several teachers routed by --teacher_tag_key, and ms-swift's errors; and
GRPO's OPD-RL from the same server equals its local teacher."""
import os
import random

import pytest
import torch

from conftest import http_json, read_jsonl, serve_on_a_thread, train, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("no_charts")

WORDS = "red green blue cat dog sun moon tree river stone bird fish".split()


def _rows(n, seed, tag=None):
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(5))}],
             **({"dataset": tag(i)} if tag else {})} for i in range(n)]


@pytest.fixture(scope="module")
def deploy(tiny_models):
    """`tunesmith deploy` of the teacher (the tiny qwen2 initialised with seed 1), --max_logprobs 4096, on a
    thread: (teacher dir, base URL)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine
    from tunesmith.serve.app import create_app

    teacher = tiny_models("qwen2", seed=1)
    chat = ChatEngine(AutoModelForCausalLM.from_pretrained(teacher).eval(), AutoTokenizer.from_pretrained(teacher))
    try:
        with serve_on_a_thread(create_app(chat, {"teacher": None}, max_logprobs=4096)) as port:
            yield teacher, f"http://127.0.0.1:{port}"
    finally:
        chat.close()


def _gkd(model, data, out, *flags):
    return train("rlhf", "--rlhf_type", "gkd", "--model", model, "--dataset", data,
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                 "--max_completion_length", "8", "--logging_steps", "1", "--report_to", "none",
                 "--max_steps", "4", "--output_dir", str(out), *flags)


def _losses(res):
    return [(r["loss"], r["jsd"]) for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "jsd" in r]


def test_infer_answers_vllms_prompt_logprobs(deploy):
    """ms-swift's teacher request: the actual token first (any rank), then the k most likely, log-softmax of the
    teacher's logits (nats); a conversation ending with the reply is rendered whole; k over --max_logprobs, 400."""
    from transformers import AutoModelForCausalLM

    teacher, url = deploy
    ids = [5, 9, 17, 33, 2, 8, 100]
    status, body = http_json("POST", f"{url}/infer/", {
        "infer_requests": [{"messages": [{"role": "user", "content": ""}], "prompt_token_ids": ids}],
        "request_config": {"prompt_logprobs": 3, "max_tokens": 1, "temperature": 0.0}})
    assert status == 200, body
    lps = body[0]["prompt_logprobs"]
    assert lps[0] is None and len(lps) == len(ids) and len(body[0]["choices"]) == 1
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(teacher)(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    for t in range(1, len(ids)):
        entries = list(lps[t].items())
        assert entries[0][0] == str(ids[t]) and abs(entries[0][1]["logprob"] - float(ref[t - 1, ids[t]])) < 1e-4
        top = ref[t - 1].topk(3)
        for v, i in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(lps[t][str(i)]["logprob"] - v) < 1e-4
        assert entries[0][1]["rank"] == int((ref[t - 1] > ref[t - 1, ids[t]]).sum()) + 1
    status, body = http_json("POST", f"{url}/infer/", {
        "infer_requests": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
        "request_config": {"prompt_logprobs": 0, "max_tokens": 1}})
    assert status == 200 and all(len(e) == 1 for e in body[0]["prompt_logprobs"][1:])
    # ms-swift's on-policy form: the reply as token ids in the assistant message (replace_assistant_response_with_ids)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    for content in ([7, 8, 9], {"input_ids": [7, 8, 9], "loss_scale": [1, 1, 1]}):
        status, body = http_json("POST", f"{url}/infer/", {
            "infer_requests": [{"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": content}]}],
            "request_config": {"prompt_logprobs": 0, "max_tokens": 1, "return_details": True}})
        assert status == 200, body
        assert body[0]["prompt_token_ids"] == prompt + [7, 8, 9]
        assert [list(e)[0] for e in body[0]["prompt_logprobs"][-3:]] == ["7", "8", "9"]
    status, err = http_json("POST", f"{url}/infer/", {"infer_requests": [{"messages": [{"role": "user",
                                                                                         "content": "x"}]}],
                                                       "request_config": {"prompt_logprobs": 5000}})
    assert status == 400 and "--max_logprobs" in err["error"]["message"]


@pytest.mark.slow
def test_teacher_server_equals_the_local_teacher(deploy, tiny_models, tmp_path):
    """Four steps (--lmbda 0.5: on-policy and dataset steps both) with the teacher server equal the runs with the
    local --teacher_model: with the same --gkd_logits_topk 5, and with k the whole vocabulary against the
    full-vocabulary run (no top-k), each step's loss and jsd within 1e-4."""
    teacher, url = deploy
    student = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", _rows(16, 0))
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(teacher))
    for k, local_flags in ((5, ["--gkd_logits_topk", "5"]), (vocab, [])):
        remote = _losses(_gkd(student, data, tmp_path / f"remote{k}", "--teacher_model_server", url,
                              "--gkd_logits_topk", str(k)))
        local = _losses(_gkd(student, data, tmp_path / f"local{k}", "--teacher_model", teacher, *local_flags))
        assert len(remote) == len(local) == 4
        for (a, b), (c, d) in zip(remote, local):
            assert abs(a - c) < 1e-4 and abs(b - d) < 1e-4, (k, remote, local)


@pytest.mark.slow
def test_several_teacher_servers_route_rows_by_tag(deploy, tiny_models, tmp_path):
    """A JSON list of teachers routes each row by its --teacher_tag_key column: two entries for the same server
    with tags a and b equal one teacher; a row whose tag no teacher takes is refused when the data is prepared, with its file and line."""
    teacher, url = deploy
    student = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", _rows(16, 0, tag=lambda i: "ab"[i % 2]))
    servers = f'[{{"url": "{url}", "tags": ["a"]}}, {{"url": "{url}/", "tags": ["b"]}}]'
    one = _losses(_gkd(student, data, tmp_path / "one", "--teacher_model_server", url, "--gkd_logits_topk", "5"))
    two = _losses(_gkd(student, data, tmp_path / "two", "--teacher_model_server", servers, "--gkd_logits_topk", "5"))
    assert one == two
    bad = write_jsonl(tmp_path / "bad.jsonl", _rows(8, 0, tag=lambda i: "c"))
    with pytest.raises(DataError, match="bad\\.jsonl:1: field 'dataset': 'c' matches no teacher server \\(tags "
                                        "\\['a', 'b'\\]\\)"):
        _gkd(student, bad, tmp_path / "bad", "--teacher_model_server", servers, "--gkd_logits_topk", "5")


@pytest.mark.parametrize("flags, message", [
    (["--teacher_model_server", "http://127.0.0.1:9"], "--gkd_logits_topk is required when using"),
    (["--teacher_model_server", "http://127.0.0.1:9", "--teacher_model", "T", "--gkd_logits_topk", "5"],
     "setting both --teacher_model and --teacher_model_server"),
    (["--teacher_model_server", '[{"url": "http://a"}, {"url": "http://b", "tags": ["x"]}]',
      "--gkd_logits_topk", "5"], 'teacher_model_server\\[0\\]: "tags" must be non-empty with multiple teachers'),
    (["--teacher_model_server", '[{"url": "http://a", "tags": ["x"]}, {"url": "http://b", "tags": ["x"]}]',
      "--gkd_logits_topk", "5"], 'tag "x" appears in both teacher\\[0\\] and teacher\\[1\\]'),
    (["--teacher_model_server", "[]", "--gkd_logits_topk", "5"], "the JSON list is empty"),
    (["--teacher_model_server", '[{"tags": ["x"]}]', "--gkd_logits_topk", "5"], '"url" is required'),
])
def test_teacher_server_flag_errors(tiny_models, flags, message):
    """ms-swift's checks (parse_teacher_model_server, _check_teacher, _check_gkd), as flag errors."""
    from tunesmith.train.recipe import configure

    model = tiny_models("qwen2")
    flags = [model if f == "T" else f for f in flags]
    with pytest.raises(ConfigError, match=message):
        configure(parse_args("rlhf", ["--rlhf_type", "gkd", "--model", model, "--dataset", "x.jsonl", *flags]))


@pytest.mark.slow
def test_grpo_opd_rl_from_a_teacher_server_equals_the_local_teacher(deploy, tiny_models, tmp_path):
    """GRPO's OPD-RL (pure distillation: no reward functions) with --teacher_model_server: the server's log-probs of
    the sampled tokens (prompt_logprobs 0, temperature 1 as ms-swift's API teacher) equal the local teacher's at
    --temperature 1, so three steps' loss and teacher_kl equal the --teacher_model run's (1e-4)."""
    teacher, url = deploy
    student = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": f"say {w}"}]}
                                              for w in WORDS[:8]])

    def run(out, *flags):
        res = train("rlhf", "--rlhf_type", "grpo", "--model", student, "--dataset", data, "--num_generations", "4",
                    "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                    "--max_completion_length", "8", "--temperature", "1.0", "--max_steps", "3",
                    "--logging_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / out), *flags)
        return [(r["loss"], r["teacher_kl"]) for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))
                if "teacher_kl" in r]

    remote, local = run("remote", "--teacher_model_server", url), run("local", "--teacher_model", teacher)
    assert len(remote) == len(local) == 3 and any(abs(d) > 1e-3 for _, d in local)  # the teacher differs
    for (a, b), (c, d) in zip(remote, local):
        assert abs(a - c) < 1e-4 and abs(b - d) < 1e-4, (remote, local)


def test_infer_refuses_an_over_long_prompt_before_the_forward_pass_and_serves_others_meanwhile(deploy):
    """100,000 prompt_token_ids (a 600 KB body): 400 naming the model's limit, refused before anything runs on them
    (no between-steps forward pass, where the 100k² attention stalled every client) — and a chat request sent
    alongside is answered. Over-long messages are refused before the forward pass too (the character bound)."""
    import threading
    import time

    _, url = deploy
    big = {"infer_requests": [{"prompt_token_ids": [5] * 100_000}],
           "request_config": {"prompt_logprobs": 2, "max_tokens": 1}}
    results = {}

    def post():
        results["big"] = http_json("POST", f"{url}/infer/", big)

    start = time.time()
    thread = threading.Thread(target=post)
    thread.start()
    chat = http_json("POST", f"{url}/v1/chat/completions",
                     {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    thread.join(60)
    assert chat[0] == 200, chat
    status, err = results["big"]
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
    assert "100000 tokens" in err["error"]["message"] and "the model's limit is" in err["error"]["message"]
    assert time.time() - start < 30   # generous: the refusal itself takes well under a second
    status, err = http_json("POST", f"{url}/infer/", {
        "infer_requests": [{"messages": [{"role": "user", "content": "red " * 200_000}]}],
        "request_config": {"prompt_logprobs": 0, "max_tokens": 1}})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err


def test_infer_takes_prompt_token_ids_without_messages(deploy):
    """The documented shape — prompt_token_ids alone, or with `messages: []` — is scored; a request with neither
    is refused with one error naming both fields."""
    _, url = deploy
    cfg = {"prompt_logprobs": 2, "max_tokens": 1}
    for req in ({"prompt_token_ids": [1, 2, 3]}, {"messages": [], "prompt_token_ids": [1, 2, 3]}):
        status, body = http_json("POST", f"{url}/infer/", {"infer_requests": [req], "request_config": cfg})
        assert status == 200, body
        assert len(body[0]["prompt_logprobs"]) == 3 and list(body[0]["prompt_logprobs"][1])[0] == "2"
    for req in ({}, {"messages": []}):
        status, err = http_json("POST", f"{url}/infer/", {"infer_requests": [req], "request_config": cfg})
        assert status == 400, err
        assert err["error"]["message"] == "infer_requests[0]: give its messages (at least one) or its prompt_token_ids"


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_a_teacher_server_with_an_api_key_says_to_set_tunesmith_api_key(key, monkeypatch):
    """A deploy started with --api_key answers the trainer's /infer/ 401: the trainer's error names
    TUNESMITH_API_KEY (and whether a key was sent), as the rollout client's does."""
    from tunesmith.serve.app import create_app
    from tunesmith.train.rl.rollout_client import API_KEY_ENV, RolloutServerError
    from tunesmith.train.rl.teacher_server import _post

    if key:
        monkeypatch.setenv(API_KEY_ENV, key)
    else:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
    with serve_on_a_thread(create_app(None, {"teacher": None}, api_key="sk-teacher")) as port:
        with pytest.raises(RolloutServerError, match=f"HTTP 401.*{'a wrong' if key else 'no'} API key was sent: "
                                                     f"set {API_KEY_ENV} to the server's --api_key") as e:
            _post(f"http://127.0.0.1:{port}", "/infer/", b"{}")
    assert e.value.status == 401 and "\n" not in str(e.value)

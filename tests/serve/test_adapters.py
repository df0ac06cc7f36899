"""`tunesmith deploy --adapters a1=… a2=…`: several LoRA adapters served side by side, each request choosing its own
per row of a shared batch. Every combination the trainer makes is served (one adapter with --modules_to_save beside
one without, different ranks and target modules) and answers as that adapter alone; what cannot share one model is
refused at start, in one message, before anything loads."""
import concurrent.futures as cf
import json
import os

import pytest

from conftest import EXAMPLES, http_json, serve_on_a_thread, train

CAPITALS = os.path.join(EXAMPLES, "capitals_messages.jsonl")
QUESTIONS = [f"What is the capital of country number {i}?" + " Tell me." * (i % 3) for i in range(6)]


def _fake_adapter(path, base, **config):
    """An adapter folder with only an adapter_config.json (what the start-up checks read; nothing loads)."""
    os.makedirs(path)
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": 4,
                   "target_modules": ["q_proj"], "bias": "none", **config}, fh)
    return str(path)


def _deploy_exit(capsys, *argv):
    """`tunesmith deploy ARGV` in this process: (exit code, stderr)."""
    from tunesmith.cli import main

    code = main(["deploy", *argv, "--port", "0"])
    return code, capsys.readouterr().err


def test_bad_adapter_names_are_refused_at_start_all_at_once(tiny_models, tmp_path, capsys):
    base = tiny_models("qwen2")
    x, y = _fake_adapter(tmp_path / "x", base), _fake_adapter(tmp_path / "y", base)
    code, err = _deploy_exit(capsys, "--model", base, "--adapters", f"a={x}", f"a={y}", f"={x}", "b=",
                             f"{os.path.basename(base)}={x}")
    assert code == 2, err
    assert f"--adapters a={x} a={y}: the name 'a' is given twice" in err  # not one of them silently dropped
    assert f"--adapters ={x}: the adapter's name is empty; write NAME=PATH" in err
    assert "--adapters b=: no path after the name" in err
    assert f"{os.path.basename(base)!r} is also the base model's served name" in err
    assert "Traceback" not in err
    code, err = _deploy_exit(capsys, "--model", base, "--adapters", f"m={x}", "--served_model_name", "m")
    assert code == 2 and "'m' is also the base model's served name" in err


def test_adapters_that_cannot_share_a_model_are_refused_at_start(tiny_models, tmp_path, capsys):
    base = tiny_models("qwen2")
    ok = _fake_adapter(tmp_path / "ok", base)
    rm = _fake_adapter(tmp_path / "rm", base, task_type="SEQ_CLS", modules_to_save=["score"])
    dora = _fake_adapter(tmp_path / "dora", base, use_dora=True)
    bias = _fake_adapter(tmp_path / "bias", base, bias="all")
    experts = _fake_adapter(tmp_path / "experts", base, target_parameters=["mlp.experts.gate_up_proj"])
    other = _fake_adapter(tmp_path / "other", "/models/Another-Model-7B")
    code, err = _deploy_exit(capsys, "--model", base, "--adapters", f"ok={ok}", f"dora={dora}",
                             f"bias={bias}", f"experts={experts}", f"other={other}")
    assert code == 2, err
    assert f"--adapters dora={dora}: a DoRA adapter" in err and f"--adapters {dora} (no name=)" in err
    assert f"--adapters bias={bias}: trained with --lora_bias all" in err
    assert f"--adapters experts={experts}: LoRA on raw parameters (--target_parameters" in err
    assert f"ok was trained on {base} but other on /models/Another-Model-7B" in err
    assert "Traceback" not in err
    # a reward model is refused by every inference command alike, before anything loads (models.checkpoint)
    code, err = _deploy_exit(capsys, "--model", base, "--adapters", f"ok={ok}", f"rm={rm}")
    assert code == 1 and f"--adapters {rm} is a reward model" in err and "Traceback" not in err, err
    not_adapter = tmp_path / "plain_folder"
    not_adapter.mkdir()
    code, err = _deploy_exit(capsys, "--model", base, "--adapters", f"ok={ok}", f"x={not_adapter}")
    assert code == 1 and f"--adapters {not_adapter}: this is a full model checkpoint, not a LoRA adapter" in err


def test_the_same_model_written_two_ways_is_one_base(tmp_path):
    from tunesmith.models.checkpoint import side_by_side_problems

    a = _fake_adapter(tmp_path / "a", "Qwen/Qwen2.5-0.5B")
    b = _fake_adapter(tmp_path / "b", "/root/.cache/modelscope/hub/Qwen/Qwen2___5-0___5B")
    assert side_by_side_problems({"a": a, "b": b}) == []


@pytest.fixture(scope="module")
def two_adapters(tiny_models, tmp_path_factory):
    """Two LoRA adapters trained on the tiny qwen2: `plain` (rank 4, all linear layers) and `saved` (rank 8, the
    attention projections only, and a trained copy of embed_tokens through --modules_to_save)."""
    base = tiny_models("qwen2")
    out = {}
    for name, extra in (("plain", ["--lora_rank", "4"]),
                        ("saved", ["--lora_rank", "8", "--target_modules", "q_proj", "v_proj",
                                   "--modules_to_save", "embed_tokens"])):
        res = train("sft", "--model", base, "--dataset", CAPITALS, "--max_steps", "4", "--learning_rate", "2e-2",
                    "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path_factory.mktemp(name)),
                    "--report_to", "none", *extra)
        out[name] = res["state"].last_model_checkpoint
    return base, out


def _engine(command, *argv):
    """build_engine for `tunesmith COMMAND ARGV` (greedy, 12 new tokens): (ChatEngine, served {model id: adapter})."""
    from tunesmith.commands.deploy import served_models
    from tunesmith.config.parser import parse_args
    from tunesmith.inference.chat import build_engine

    args = parse_args(command, [*argv, "--max_new_tokens", "12", "--temperature", "0", "--max_batch_size", "16"])
    engine, args, ckpt, named = build_engine(args)
    return engine, served_models(args, named, ckpt) if command == "deploy" else None


def _alone(adapter, question):
    """The reply of `tunesmith infer --adapters ADAPTER` alone (greedy): (content, completion tokens)."""
    chat, _ = _engine("infer", "--adapters", adapter)
    try:
        reply = chat.generate([[{"role": "user", "content": question}]])[0]
        return reply.content, reply.completion_tokens
    finally:
        chat.close()


@pytest.mark.slow
def test_an_adapter_with_modules_to_save_and_one_without_both_answer_as_alone(two_adapters):
    """peft #1378 / vLLM #7169: with one adapter trained with --modules_to_save, every request to the other got
    HTTP 500 KeyError. Rows of both adapters and the base, interleaved and concurrent, share batches; each answer
    equals that adapter's lone run token for token."""
    from tunesmith.serve.app import create_app

    base, ckpt = two_adapters
    with open(os.path.join(ckpt["saved"], "adapter_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["modules_to_save"]  # the case of the bug report
    chat, served = _engine("deploy", "--adapters", f"a1={ckpt['plain']}", f"a2={ckpt['saved']}",
                           "--served_model_name", "base")
    assert served == {"base": "", "a1": "a1", "a2": "a2"}
    jobs = [(model, q) for q in QUESTIONS for model in ("a1", "a2", "base")]
    try:
        with serve_on_a_thread(create_app(chat, served)) as port:
            def ask(job):
                status, body = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions", {
                    "model": job[0], "messages": [{"role": "user", "content": job[1]}], "temperature": 0,
                    "max_tokens": 12})
                assert status == 200, body
                return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]

            with cf.ThreadPoolExecutor(len(jobs)) as pool:
                answers = dict(zip(jobs, pool.map(ask, jobs)))
            assert [ask(job) for job in jobs[:6]] == [answers[job] for job in jobs[:6]]  # one at a time, too
    finally:
        chat.close()
    lone = {"a1": ckpt["plain"], "a2": ckpt["saved"]}
    for (model, q), answer in answers.items():
        if model in lone:
            assert answer == _alone(lone[model], q), (model, q)
    plain_base, _ = _engine("infer", "--model", base)
    try:
        for q in QUESTIONS[:2]:
            reply = plain_base.generate([[{"role": "user", "content": q}]])[0]
            assert answers[("base", q)] == (reply.content, reply.completion_tokens)
    finally:
        plain_base.close()
    assert any(len({answers[(m, q)] for m in ("a1", "a2", "base")}) == 3 for q in QUESTIONS)  # they do differ


@pytest.mark.slow
def test_a_plain_adapter_under_named_ones_is_merged_into_the_served_base(two_adapters):
    """`--adapters PATH a2=…`: the plain adapter is part of the served base model (merged), the named one applies
    on top; before, the named adapter failed to load (a traceback at start)."""
    _, ckpt = two_adapters
    chat, served = _engine("deploy", "--adapters", ckpt["plain"], f"a2={ckpt['saved']}", "--served_model_name", "b")
    try:
        q = [{"role": "user", "content": QUESTIONS[0]}]
        assert served == {"b": "", "a2": "a2"}
        assert chat.generate([q], adapter="")[0].content == _alone(ckpt["plain"], QUESTIONS[0])[0]
        assert chat.generate([q], adapter="a2")[0].finish_reason in ("stop", "length")
    finally:
        chat.close()

"""After training: `tunesmith export` (merge), `tunesmith infer` (batch and chat) and `tunesmith deploy` (a real
server process, driven by the official openai client) on tiny in-process models."""
import concurrent.futures as cf
import io
import json
import os

import pytest
import torch

from conftest import EXAMPLES, http_json, read_jsonl, start_deploy
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError

CAPITALS = os.path.join(EXAMPLES, "capitals_messages.jsonl")


def _sft(model_dir, out, *extra):
    from tunesmith.train import recipe
    res = recipe.main(parse_args("sft", ["--model", model_dir, "--dataset", CAPITALS, "--max_steps", "12",
                                      "--learning_rate", "2e-2", "--per_device_train_batch_size", "4",
                                      "--gradient_accumulation_steps", "1", "--output_dir", str(out),
                                      "--report_to", "none", "--system", "You answer in one sentence.",
                                      "--split_dataset_ratio", "0.25", *extra]))
    return res["state"].last_model_checkpoint


@pytest.fixture(scope="module")
def lora_ckpt(tiny_models, tmp_path_factory):
    return _sft(tiny_models("qwen2"), tmp_path_factory.mktemp("sft"))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_export_merges_to_a_plain_hf_model_with_equal_logits(tiny_models, lora_ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.cli import main

    out = str(tmp_path / "merged")
    assert main(["export", "--adapters", lora_ckpt, "--merge_lora", "true", "--output_dir", out,
                 "--max_shard_size", "200KB"]) == 0
    files = os.listdir(out)
    assert "config.json" in files and "generation_config.json" in files and "tokenizer.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1 and "model.safetensors.index.json" in files  # sharded
    assert not any(f.startswith("adapter_") for f in files)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # written atomically
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), lora_ckpt)
    ids = AutoTokenizer.from_pretrained(out)("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    a, m = _logits(adapter, ids), _logits(merged, ids)
    assert (a - m).abs().max().item() < 1e-5
    assert (a - _logits(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), ids)).abs().max() > 1e-2
    assert json.load(open(os.path.join(out, "args.json")))["system"] == "You answer in one sentence."
    with pytest.raises(ConfigError, match="already exists.*--exist_ok"):
        from tunesmith.commands import export
        export.main(parse_args("export", ["--adapters", lora_ckpt, "--merge_lora", "true", "--output_dir", out]))
    # default output: <ckpt>-merged, and `merge-lora` is the ms-swift short form
    assert main(["merge-lora", "--adapters", lora_ckpt]) == 0
    assert os.path.isfile(os.path.join(lora_ckpt + "-merged", "config.json"))


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_unquantised_base(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tunesmith.commands import export

    ckpt = _sft(tiny_models("qwen2"), tmp_path / "q", "--quant_method", "bnb", "--quant_bits", "4")
    out = str(tmp_path / "m")
    export.main(parse_args("export", ["--adapters", ckpt, "--merge_lora", "true", "--output_dir", out]))
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), ckpt)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert (_logits(ref, ids) - _logits(merged, ids)).abs().max().item() < 1e-5


@pytest.mark.slow
def test_wrong_flag_for_a_checkpoint_is_explained(tiny_models, lora_ckpt, tmp_path):
    from tunesmith.commands import export
    from tunesmith.commands import infer
    merged = str(tmp_path / "full")
    export.main(parse_args("export", ["--adapters", lora_ckpt, "--merge_lora", "true", "--output_dir", merged]))
    with pytest.raises(ConfigError, match="full model checkpoint.*--model"):
        infer.main(parse_args("infer", ["--adapters", merged]))
    with pytest.raises(ConfigError, match="LoRA adapter.*--adapters"):
        infer.main(parse_args("infer", ["--model", lora_ckpt]))


@pytest.mark.slow
def test_batch_infer_writes_every_row_deterministically(lora_ckpt, tmp_path, capsys):
    from tunesmith.cli import main

    argv = ["infer", "--adapters", lora_ckpt, "--val_dataset", CAPITALS, "--max_new_tokens", "10",
            "--temperature", "0", "--max_batch_size", "3"]
    assert main(argv + ["--result_path", str(tmp_path / "a.jsonl")]) == 0
    assert "model='" in capsys.readouterr().err  # said what it inherited from args.json
    assert main(argv + ["--result_path", str(tmp_path / "b.jsonl"), "--max_batch_size", "1"]) == 0
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    src = read_jsonl(CAPITALS)
    assert len(a) == len(src) and [r["response"] for r in a] == [r["response"] for r in b]  # greedy, batched or not
    for row, rec in zip(a, src):
        assert set(row) >= {"response", "labels", "logprobs", "messages"}
        assert row["labels"] == rec["messages"][-1]["content"]
        assert row["messages"][:-1] == rec["messages"][:-1]
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
        assert row["finish_reason"] in ("stop", "length")
    # --load_data_args: the run's own validation split, result next to the checkpoint by default
    assert main(["infer", "--adapters", lora_ckpt, "--load_data_args", "true", "--max_new_tokens", "4"]) == 0
    results = os.listdir(os.path.join(lora_ckpt, "infer_result"))
    val = read_jsonl(os.path.join(os.path.dirname(lora_ckpt), "val_dataset.jsonl"))
    assert len(read_jsonl(os.path.join(lora_ckpt, "infer_result", results[0]))) == len(val) == 2


@pytest.mark.slow
def test_interactive_chat_streams_multi_turn_and_commands(lora_ckpt):
    from tunesmith.inference.chat import build_engine
    from tunesmith.commands.infer import chat

    args = parse_args("infer", ["--adapters", lora_ckpt, "--max_new_tokens", "6", "--temperature", "0"])
    engine, _, _, _ = build_engine(args)
    out = io.StringIO()
    chat(engine, args, None, stdin=io.StringIO("What is the capital of France?\nAnd of Japan?\nclear\nexit\n"),
         stdout=out)
    text = out.getvalue()
    assert text.count(">>> ") == 2 and "(history cleared)" in text
    assert engine.encoder.system == "You answer in one sentence."  # the run's system prompt came with args.json


def test_reasoning_is_returned_separately():
    from tunesmith.inference.reply import OutputParser
    from tunesmith.testing import build_tokenizer

    def split(parser, raw):
        p = parser.parse(raw, tools=False, final=True)
        return p.content, p.reasoning

    qwen3 = OutputParser(build_tokenizer("qwen3"))
    assert split(qwen3, "<think>\nadd 2 and 2\n</think>\n\nIt is 4.<|im_end|>") == ("It is 4.", "add 2 and 2")
    assert split(qwen3, "Just 4.<|im_end|>") == ("Just 4.", None)
    harmony = OutputParser(build_tokenizer("gpt_oss"))
    raw = "<|channel|>analysis<|message|>think here<|end|><|start|>assistant<|channel|>final<|message|>Answer.<|return|>"
    assert split(harmony, raw) == ("Answer.", "think here")


@pytest.mark.slow
def test_stop_words_and_length_limits(lora_ckpt):
    from tunesmith.inference.chat import GenConfig, PromptTooLong, build_engine

    engine, _, _, _ = build_engine(parse_args("infer", ["--adapters", lora_ckpt, "--temperature", "0",
                                                        "--max_model_len", "256"]))
    conv = [[{"role": "user", "content": "What is the capital of France?"}]]
    full = engine.generate(conv, GenConfig(max_new_tokens=12, temperature=0))[0]
    word = full.content.split()[1]
    cut = engine.generate(conv, GenConfig(max_new_tokens=12, temperature=0, stop=[word]))[0]
    assert cut.content == full.content[:full.content.find(word)].rstrip() and cut.finish_reason == "stop"
    pieces = list(engine.stream(conv[0], GenConfig(max_new_tokens=12, temperature=0, stop=[word])))
    assert "".join(p for p in pieces[:-1]) == pieces[-1].content == cut.content  # streaming shows the same text
    short = engine.generate(conv, GenConfig(max_new_tokens=2, temperature=0))[0]
    assert short.finish_reason == "length" and short.completion_tokens == 2
    with pytest.raises(PromptTooLong):
        engine.generate([[{"role": "user", "content": "word " * 3000}]], GenConfig(temperature=0))


# ------------------------------------------------------------------ deploy: a real server process

@pytest.fixture(scope="module")
def server(lora_ckpt, tiny_models):
    proc, port = start_deploy("--adapters", f"capitals={lora_ckpt}", "--model", tiny_models("qwen2"),
                              "--served_model_name", "base", "--api_key", "sk-test-key", "--max_new_tokens", "8",
                              "--verbose", "false", "--max_model_len", "512")
    yield f"http://127.0.0.1:{port}/v1", lora_ckpt
    proc.terminate()
    out = proc.communicate(timeout=20)[0]
    assert "sk-test-key" not in out  # the key is never printed


@pytest.mark.slow
def test_openai_client_against_deploy(server, tiny_models):
    import openai
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine, GenConfig

    url, ckpt = server
    client = openai.OpenAI(base_url=url, api_key="sk-test-key")
    assert sorted(m.id for m in client.models.list()) == ["base", "capitals"]
    q = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="capitals", messages=q, temperature=0)
    # the same reply as local generation with the same model, template and system prompt (inherited from args.json)
    local = ChatEngine(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), ckpt),
                   AutoTokenizer.from_pretrained(ckpt), system="You answer in one sentence.")
    want = local.generate([q], GenConfig(max_new_tokens=8, temperature=0))[0]
    assert r.choices[0].message.content == want.content
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == want.completion_tokens and r.usage.prompt_tokens == want.prompt_tokens
    base = client.chat.completions.create(model="base", messages=q, temperature=0).choices[0].message.content
    assert base != r.choices[0].message.content  # the base model is served without the adapter
    stream = client.chat.completions.create(model="capitals", messages=q, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.content
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    comp = client.completions.create(model="capitals", prompt="What is the capital of France?", temperature=0)
    assert comp.choices[0].text == want.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong").models.list()


@pytest.mark.slow
def test_deploy_serves_concurrent_requests_each_its_own(server):
    import openai
    url, _ = server
    client = openai.OpenAI(base_url=url, api_key="sk-test-key", max_retries=0, timeout=120)
    questions = [f"What is the capital of {c}?" for c in ("France", "Japan", "Italy", "Spain")] * 8

    def ask(q):
        r = client.chat.completions.create(model="capitals", messages=[{"role": "user", "content": q}],
                                           temperature=0, max_tokens=6)
        return r.choices[0].message.content

    alone = {q: ask(q) for q in set(questions)}
    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, questions))
    assert answers == [alone[q] for q in questions]


@pytest.mark.slow
def test_deploy_rejects_bad_requests_and_keeps_serving(server):
    url, _ = server
    auth = {"Authorization": "Bearer sk-test-key"}
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (http_json("POST", f"{url}/chat/completions", raw=b"{not json", headers=auth), 400),
        (http_json("POST", f"{url}/chat/completions", {"model": "capitals", "messages": []}, auth), 400),
        (http_json("POST", f"{url}/chat/completions", {"model": "capitals", "temperature": 9, "messages": hi},
                   auth), 400),
        (http_json("POST", f"{url}/chat/completions", {"model": "nope", "messages": hi}, auth), 404),
        (http_json("POST", f"{url}/chat/completions",
                   {"model": "capitals", "messages": [{"role": "user", "content": "word " * 3000}]}, auth), 400),
        (http_json("GET", f"{url}/models"), 401),
    ]
    for (status, body), want in cases:
        assert status == want, body
        assert body["error"]["message"] and body["object"] == "error"
    status, body = http_json("POST", f"{url}/chat/completions", {"model": "capitals", "messages": hi}, auth)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_infer_says_how_many_bad_rows_it_dropped(lora_ckpt, tmp_path, capsys):
    from tunesmith.cli import main

    rows = read_jsonl(CAPITALS)[:2]
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join([json.dumps(rows[0]), "{broken", json.dumps(rows[1])]) + "\n")
    assert main(["infer", "--adapters", lora_ckpt, "--val_dataset", str(val), "--max_new_tokens", "4",
                 "--strict", "false", "--result_path", str(tmp_path / "r.jsonl")]) == 0
    assert "--val_dataset: 1 bad row(s) dropped (--strict false)" in capsys.readouterr().err
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 2

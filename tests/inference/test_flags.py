"""The value checks of infer, deploy, eval and export (tunesmith.inference.flags): every flag with a valid range is
checked before anything loads — exit 2, one message naming every bad flag and what was expected — and
--max_new_tokens against the model's context once its config.json is read, before the weights."""
import json

import pytest

from tunesmith.cli import main


def _run(capsys, argv, model):
    rc = main([argv[0], "--model", model, *argv[1:]])
    err = capsys.readouterr().err
    return rc, err


# (command line, fragments of the one message): each a value the command used to start with
CASES = [
    (["deploy", "--max_request_bytes", "0"], ["--max_request_bytes 0: expected 1 <= max_request_bytes; the default "
                                              "is 8388608 (8 MiB)"]),
    (["deploy", "--max_logprobs", "-3"], ["--max_logprobs -3: expected 0 <= max_logprobs"]),
    (["deploy", "--max_batch_size", "0"], ["--max_batch_size 0: expected 1 <= max_batch_size; or auto (the default: "
                                           "sized from memory), or -1 for no cap"]),
    (["deploy", "--max_batch_size", "many"], ["--max_batch_size: expected auto or an integer, got 'many'"]),
    (["deploy", "--served_model_name", ""], ["--served_model_name is empty; clients send it as the model id"]),
    (["deploy", "--host", " "], ["--host is empty; give the address to listen on"]),
    (["deploy", "--ssl_keyfile", "key.pem"], ["--ssl_keyfile and --ssl_certfile go together",
                                              "--ssl_keyfile key.pem: no such file"]),
    (["eval", "--eval_limit", "-1"], ["--eval_limit -1: expected 1 <= eval_limit; leave it out to evaluate every "
                                      "sample"]),
    (["eval", "--eval_limit", "0", "--eval_num_proc", "0", "--eval_url", "localhost:8000/v1", "--api_key", ""],
     ["4 problems with the flags", "--eval_limit 0", "--eval_num_proc 0",
      "--eval_url 'localhost:8000/v1': expected an http:// or https:// address", "--api_key is empty"]),
    (["eval", "--eval_generation_config", '{"max_tokens": 0, "top_p": 2}'],
     ["--eval_generation_config max_tokens 0: expected 1 <= max_tokens",
      "--eval_generation_config top_p 2: expected 0 < top_p <= 1"]),
    (["eval", "--max_batch_size", "-2", "--temperature", "-1"], ["--max_batch_size -2: expected 1 <= max_batch_size; "
                                                                 "or -1 for no cap", "--temperature -1.0"]),
    (["infer", "--top_k", "-5", "--seed", "-1", "--stop_words", ""],
     ["--top_k -5: expected -1 <= top_k; 0 or -1 turn it off", "--seed -1: expected 0 <= seed <= 4294967295",
      "--stop_words holds an empty string"]),
    (["infer", "--vllm_gpu_memory_utilization", "1.5", "--sglang_tp_size", "0", "--lmdeploy_session_len", "0"],
     ["--vllm_gpu_memory_utilization 1.5: expected 0 < vllm_gpu_memory_utilization <= 1", "--sglang_tp_size 0",
      "--lmdeploy_session_len 0"]),
    (["infer", "--max_model_len", "0", "--attn_impl", "flash", "--bnb_4bit_compute_dtype", "float8"],
     ["--max_model_len 0", "--attn_impl flash: expected one of sdpa", "--bnb_4bit_compute_dtype float8: expected "
                                                                      "one of bfloat16"]),
    (["infer", "--max_length", "0", "--data_seed", "-3"], ["--max_length 0", "--data_seed -3"]),
    (["infer", "--temperature", "x", "--n", "0"], ["2 problems with the flags", "--temperature: expected a number",
                                                   "--n 0"]),
    (["export", "--merge_lora", "true", "--output_dir", "", "--top_p", "0", "--quant_bits", "3"],
     ["3 problems with the flags", "--output_dir is empty", "--top_p 0.0", "--quant_bits goes with --quant_method"]),
]


@pytest.mark.parametrize("argv,fragments", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_impossible_values_exit_2_before_anything_loads(tmp_path, capsys, monkeypatch, argv, fragments):
    """The model does not exist: a run that got past the checks would fail on it instead."""
    monkeypatch.chdir(tmp_path)
    rc, err = _run(capsys, argv, str(tmp_path / "no-model"))
    assert rc == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err and "no-model" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_the_defaults_and_the_no_limit_values_pass(tmp_path, capsys):
    """Every command's defaults, and the documented special values (-1: no batch limit, top_k 0/-1: off, port 0),
    are accepted: the run gets as far as the missing model."""
    qa = tmp_path / "qa"
    qa.mkdir()
    (qa / "qa.jsonl").write_text(json.dumps({"query": "Capital of France?", "response": "Paris"}) + "\n")
    for argv in (["infer"], ["deploy", "--max_batch_size", "-1", "--top_k", "-1", "--port", "0"],
                 ["eval", "--eval_dataset", "general_qa", "--eval_limit", "1", "--top_k", "0", "--eval_dataset_args",
                  json.dumps({"general_qa": {"local_path": str(qa)}})],
                 ["export", "--merge_lora", "true", "--adapters", str(tmp_path)]):
        rc, err = _run(capsys, argv, str(tmp_path / "no-model"))
        assert rc == 1 and "problem" not in err and "expected" not in err, (argv, err)


def test_max_new_tokens_over_the_context_is_refused_before_the_weights_load(tiny_models, tmp_path, capsys):
    """infer --max_new_tokens 10^12 used to start generating (deploy answers 400 for such a request): the model's
    context is read from its config.json (or --max_model_len) before the weights load."""
    model = tiny_models("qwen2")
    with open(f"{model}/config.json") as fh:
        context = json.load(fh)["max_position_embeddings"]
    rc, err = _run(capsys, ["infer", "--max_new_tokens", "1000000000000"], model)  # a count no run finishes
    assert rc == 2 and "Traceback" not in err and "--max_new_tokens 1000000000000: expected" in err, err
    assert "generation:" not in err  # no engine was built
    rc, err = _run(capsys, ["infer", "--max_new_tokens", "1000000"], model)  # a count, but past the context
    assert rc == 2 and "Traceback" not in err, err
    assert f"--max_new_tokens 1000000: expected 1 <= max_new_tokens <= {context}; the model's context is " \
           f"{context} tokens (max_position_embeddings in the model's config.json; --max_model_len overrides it)" in err
    assert "generation:" not in err
    rc, err = _run(capsys, ["deploy", "--port", "0", "--max_new_tokens", "64", "--max_model_len", "32"], model)
    assert rc == 2 and "--max_new_tokens 64: expected 1 <= max_new_tokens <= 32; the model's context is 32 tokens " \
                       "(--max_model_len)" in err, err

"""--infer_backend vllm|sglang|lmdeploy on a CPU machine: ms-swift's flags parse, translate to each engine's
constructor kwargs with ms-swift's defaults, LoRA adapters map to the engines' native multi-LoRA, the native server
command lines carry the same settings (secrets redacted), and a missing package or GPU is one clear error.

The engines themselves run against FAKE vllm / sglang / lmdeploy modules (injected into sys.modules) that mimic the
API surface tunesmith.inference.backends calls: streamed token outputs, abort, LoRA requests, sampling settings. What only a
GPU can show (the real engines' outputs) is not tested here."""
import asyncio
import importlib.util
import json
import os
import sys

import pytest

from fakes import FakeLmdeploy, FakeSglang, FakeVllm, fake_lmdeploy, fake_module, fake_sglang, fake_vllm
from tunesmith.inference import backends as B
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError


def _adapter(tmp_path, name: str, r: int = 8) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 32}))
    return str(d)


def _deploy(*flags: str):
    return parse_args("deploy", ["--model", "/models/Qwen2.5-7B-Instruct", *flags])


# ------------------------------------------------------------------ parsing

@pytest.mark.parametrize("command", ["infer", "deploy", "eval"])
def test_ms_swift_engine_flags_parse(command):
    flags = ("--infer_backend vllm --vllm_gpu_memory_utilization 0.8 --vllm_tensor_parallel_size 2 "
             "--vllm_pipeline_parallel_size 1 --vllm_max_model_len 4096 --vllm_max_num_seqs 64 --vllm_enforce_eager "
             "true --vllm_enable_prefix_caching true --vllm_max_lora_rank 32 --vllm_enable_lora true "
             "--vllm_disable_custom_all_reduce false --vllm_quantization fp8 --vllm_reasoning_parser qwen3 "
             "--vllm_disable_cascade_attn true --vllm_use_async_engine true --vllm_enable_expert_parallel false "
             "--vllm_data_parallel_size 1 --vllm_mm_processor_cache_gb 4 --vllm_limit_mm_per_prompt {\"image\":2} "
             "--vllm_speculative_config {\"method\":\"ngram\"} --vllm_engine_kwargs {\"swap_space\":4} "
             "--sglang_tp_size 2 --sglang_pp_size 1 --sglang_dp_size 1 --sglang_ep_size 1 --sglang_enable_ep_moe "
             "false --sglang_mem_fraction_static 0.7 --sglang_context_length 8192 --sglang_disable_cuda_graph true "
             "--sglang_quantization fp8 --sglang_kv_cache_dtype fp8_e5m2 --sglang_enable_dp_attention false "
             "--sglang_disable_custom_all_reduce true --sglang_speculative_algorithm EAGLE "
             "--sglang_speculative_num_steps 3 --sglang_speculative_eagle_topk 1 "
             "--sglang_speculative_num_draft_tokens 4 "
             "--lmdeploy_tp 2 --lmdeploy_session_len 4096 --lmdeploy_cache_max_entry_count 0.5 "
             "--lmdeploy_quant_policy 8 --lmdeploy_vision_batch_size 2")
    args = parse_args(command, ["--model", "m", *flags.split()])
    assert args.vllm_engine_kwargs == {"swap_space": 4} and args.sglang_context_length == 8192
    assert args.lmdeploy_quant_policy == 8 and args.vllm_limit_mm_per_prompt == {"image": 2}


def test_ms_swift_3x_names_and_dashes():
    args = parse_args("deploy", "--model m --infer_backend lmdeploy --tp 2 --session-len 2048 "
                                "--cache-max-entry-count 0 --quant_policy 4 --vision_batch_size 3".split())
    assert (args.lmdeploy_tp, args.lmdeploy_session_len, args.lmdeploy_cache_max_entry_count,
            args.lmdeploy_quant_policy, args.lmdeploy_vision_batch_size) == (2, 2048, 0.0, 4, 3)
    args = parse_args("infer", "--model m --gpu_memory_utilization 0.7 --tensor_parallel_size 4 "
                               "--max_num_seqs 8 --enforce_eager --enable_prefix_caching false "
                               "--disable_custom_all_reduce false --pipeline-parallel-size 2".split())
    assert (args.vllm_gpu_memory_utilization, args.vllm_tensor_parallel_size, args.vllm_max_num_seqs,
            args.vllm_enforce_eager, args.vllm_enable_prefix_caching, args.vllm_disable_custom_all_reduce,
            args.vllm_pipeline_parallel_size) == (0.7, 4, 8, True, False, False, 2)


# ------------------------------------------------------------------ vLLM

def test_vllm_defaults_are_ms_swifts():
    kw = B.vllm_engine_args(_deploy(), "/models/Qwen2.5-7B-Instruct", {})
    assert kw == {"model": "/models/Qwen2.5-7B-Instruct", "tokenizer": "/models/Qwen2.5-7B-Instruct",
                  "dtype": "auto", "gpu_memory_utilization": 0.9, "tensor_parallel_size": 1,
                  "pipeline_parallel_size": 1, "max_model_len": None, "max_num_seqs": 256,
                  "disable_custom_all_reduce": True, "enforce_eager": False, "trust_remote_code": False,
                  "disable_log_stats": True, "seed": 42}


def test_vllm_flags_to_kwargs():
    args = _deploy("--vllm_gpu_memory_utilization", "0.5", "--vllm_tensor_parallel_size", "2",
                   "--vllm_max_model_len", "4096", "--vllm_max_num_seqs", "8", "--vllm_enforce_eager", "true",
                   "--vllm_enable_prefix_caching", "false", "--torch_dtype", "bf16", "--trust_remote_code", "true",
                   "--seed", "7", "--vllm_quantization", "awq", "--vllm_engine_kwargs", '{"max_num_seqs": 3}')
    kw = B.vllm_engine_args(args, "/m")
    assert kw["gpu_memory_utilization"] == 0.5 and kw["tensor_parallel_size"] == 2
    assert kw["max_model_len"] == 4096 and kw["enforce_eager"] is True and kw["enable_prefix_caching"] is False
    assert kw["dtype"] == "bfloat16" and kw["trust_remote_code"] is True and kw["seed"] == 7
    assert kw["quantization"] == "awq"
    assert kw["max_num_seqs"] == 3  # --vllm_engine_kwargs is applied last and wins
    assert "enable_lora" not in kw


def test_vllm_max_model_len_falls_back_to_the_3x_flag():
    assert B.vllm_engine_args(_deploy("--max_model_len", "2048"), "/m")["max_model_len"] == 2048
    kw = B.vllm_engine_args(_deploy("--max_model_len", "2048", "--vllm_max_model_len", "1024"), "/m")
    assert kw["max_model_len"] == 1024


def test_vllm_lora(tmp_path):
    a, b = _adapter(tmp_path, "a"), _adapter(tmp_path, "b")
    args = _deploy("--adapters", f"sql={a}", f"chat={b}")
    lora = B.engine_adapters(args)
    assert lora == {"sql": a, "chat": b}
    kw = B.vllm_engine_args(args, "/m", lora)
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"]) == (True, 2, 16)
    assert B.vllm_lora_requests(lora) == {"sql": {"lora_name": "sql", "lora_int_id": 1, "lora_path": a},
                                          "chat": {"lora_name": "chat", "lora_int_id": 2, "lora_path": b}}
    big = _adapter(tmp_path, "big", r=64)
    with pytest.raises(ConfigError, match="--vllm_max_lora_rank 64"):
        B.vllm_engine_args(_deploy("--adapters", big), "/m", {"big": big})
    assert B.vllm_engine_args(_deploy("--vllm_max_lora_rank", "64"), "/m", {"big": big})["max_lora_rank"] == 64
    with pytest.raises(ConfigError, match="--vllm_enable_lora false"):
        B.vllm_engine_args(_deploy("--vllm_enable_lora", "false"), "/m", {"big": big})


def test_plain_adapters(tmp_path):
    a, b = _adapter(tmp_path, "checkpoint-20"), _adapter(tmp_path, "checkpoint-40")
    assert B.engine_adapters(_deploy("--adapters", a)) == {"checkpoint-20": a}
    with pytest.raises(ConfigError, match="one LoRA adapter per request"):
        B.engine_adapters(_deploy("--adapters", a, b))


# ------------------------------------------------------------------ SGLang

def test_sglang_defaults_and_flags(tmp_path):
    kw = B.sglang_engine_args(_deploy(), "/m")
    assert kw == {"model_path": "/m", "dtype": "auto", "tp_size": 1, "dp_size": 1, "ep_size": 1,
                  "mem_fraction_static": None, "context_length": None, "disable_cuda_graph": False,
                  "quantization": None, "kv_cache_dtype": "auto", "enable_dp_attention": False,
                  "disable_custom_all_reduce": True, "speculative_algorithm": None, "speculative_num_steps": None,
                  "speculative_eagle_topk": None, "speculative_num_draft_tokens": None, "log_level": "error",
                  "skip_tokenizer_init": True, "trust_remote_code": False, "random_seed": 42}
    args = _deploy("--sglang_tp_size", "4", "--sglang_pp_size", "2", "--sglang_mem_fraction_static", "0.6",
                   "--sglang_context_length", "8192", "--sglang_disable_cuda_graph", "true",
                   "--torch_dtype", "float16")
    a = _adapter(tmp_path, "a")
    kw = B.sglang_engine_args(args, "/m", {"sql": a})
    assert (kw["tp_size"], kw["pp_size"], kw["mem_fraction_static"], kw["context_length"]) == (4, 2, 0.6, 8192)
    assert kw["disable_cuda_graph"] is True and kw["dtype"] == "float16"
    assert kw["lora_paths"] == [f"sql={a}"] and kw["max_loras_per_batch"] == 8


# ------------------------------------------------------------------ LMDeploy

def test_lmdeploy_defaults_flags_and_lora(tmp_path):
    assert B.lmdeploy_engine_config(_deploy(), "/m") == (
        "turbomind", {"tp": 1, "session_len": None, "cache_max_entry_count": 0.8, "quant_policy": 0})
    args = _deploy("--tp", "2", "--session-len", "2048", "--cache-max-entry-count", "0.5", "--quant_policy", "8",
                   "--torch_dtype", "bfloat16")
    assert B.lmdeploy_engine_config(args, "/m") == (
        "turbomind", {"tp": 2, "session_len": 2048, "cache_max_entry_count": 0.5, "quant_policy": 8,
                      "dtype": "bfloat16"})
    a = _adapter(tmp_path, "a")
    backend, kw = B.lmdeploy_engine_config(_deploy("--lmdeploy_tp", "2"), "/m", {"sql": a})
    assert backend == "pytorch" and kw["adapters"] == {"sql": a} and kw["tp"] == 2
    with pytest.raises(ConfigError, match="PyTorch engine"):
        B.lmdeploy_engine_config(args, "/m", {"sql": a})


# ------------------------------------------------------------------ native server commands

def test_native_commands_carry_the_settings_and_redact_secrets(tmp_path):
    a = _adapter(tmp_path, "a")
    args = _deploy("--vllm_gpu_memory_utilization", "0.8", "--vllm_tensor_parallel_size", "2",
                   "--vllm_max_model_len", "4096", "--vllm_enable_prefix_caching", "false", "--port", "9000",
                   "--host", "0.0.0.0", "--api_key", "sk-very-secret", "--hub_token", "hf_secret",
                   "--served_model_name", "qwen", "--sglang_tp_size", "2", "--tp", "2", "--session_len", "4096")
    cmd = B.native_serve_command("vllm", args, "/m", {"sql": a})
    line = B.format_command(cmd)
    assert cmd[:3] == ["vllm", "serve", "/m"]
    for part in ("--gpu-memory-utilization 0.8", "--tensor-parallel-size 2", "--max-model-len 4096",
                 "--no-enable-prefix-caching", "--enable-lora", "--max-lora-rank 16", f"--lora-modules sql={a}",
                 "--served-model-name qwen", "--host 0.0.0.0", "--port 9000", "--api-key '<redacted>'"):
        assert part in line, part
    sg = B.format_command(B.native_serve_command("sglang", args, "/m", {"sql": a}))
    assert sg.startswith("python -m sglang.launch_server --model-path /m") and "--tp-size 2" in sg
    assert f"--lora-paths sql={a}" in sg and "skip-tokenizer" not in sg
    lm = B.format_command(B.native_serve_command("lmdeploy", args, "/m", {}))
    assert lm.startswith("lmdeploy serve api_server /m --backend turbomind") and "--session-len 4096" in lm
    assert "--tp 2" in lm and "--cache-max-entry-count 0.8" in lm and "--server-port 9000" in lm
    lm = B.format_command(B.native_serve_command("lmdeploy", args, "/m", {"sql": a}))
    assert "--backend pytorch" in lm and f"--adapters sql={a}" in lm
    for text in (line, sg, lm):
        assert "sk-very-secret" not in text and "hf_secret" not in text
    with pytest.raises(ConfigError):
        B.native_serve_command("tgi", args, "/m", {})


# ------------------------------------------------------------------ availability on this CPU machine

def _installed(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("backend", B.BACKENDS)
def test_check_backend_missing_package(backend):
    if _installed(backend):
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(ConfigError) as e:
        B.check_backend(backend)
    msg = str(e.value)
    assert f"pip install '{B.PACKAGES[backend][1]}' on a CUDA machine" in msg
    assert "--infer_backend transformers" in msg and "\n" not in msg


def test_check_backend_no_gpu_old_version_unknown(monkeypatch):
    fake_module(monkeypatch, "vllm")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*on CPU use --infer_backend transformers"):
        B.check_backend("vllm")
    fake_module(monkeypatch, "vllm", version="0.4.3", gpu=True)
    with pytest.raises(ConfigError, match="older than ms-swift supports; pip install -U 'vllm>=0.5.1'"):
        B.check_backend("vllm")
    fake_module(monkeypatch, "lmdeploy", version="0.7.2.post1", gpu=True)
    assert B.check_backend("lmdeploy") is None
    with pytest.raises(ConfigError, match="not supported"):
        B.check_backend("tgi")


@pytest.mark.parametrize("command", ["deploy", "infer"])
def test_cli_backend_error_is_one_line(command, tmp_path, capsys):
    from tunesmith.cli import main

    if _installed("vllm"):
        pytest.skip("vllm is installed here")
    extra = ["--port", "0"] if command == "deploy" else []
    (tmp_path / "config.json").write_text("{}")  # a model folder (an empty one is a flag problem, found first)
    rc = main([command, "--model", str(tmp_path), "--infer_backend", "vllm", *extra])
    err = capsys.readouterr().err.strip()
    # tunesmith.cli exits 1 for errors raised while a command runs (ConfigError), 2 for argument errors
    assert rc == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"tunesmith {command}: error: --infer_backend vllm") and "pip install" in err


@pytest.fixture
def tok(tiny_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_models("qwen2"))


def _sp(**kw):
    from tunesmith.inference.engine import SamplingParams
    return SamplingParams(**{"max_new_tokens": 16, **kw})


# ------------------------------------------------------------------ vLLM engine

def test_vllm_streams_tokens_logprobs_and_finish(monkeypatch, tok):
    fake = FakeVllm(script=(5, 6, 7), finish="length")
    built = fake_vllm(monkeypatch, fake)
    eng = B.VllmEngine(_deploy("--vllm_max_num_seqs", "8"), "/m", tok, [2, 3], max_model_len=100)
    try:
        assert built["engine_args"].kw["max_num_seqs"] == 8 and built["engine_args"].kw["model"] == "/m"
        assert eng.max_model_len == 512  # the engine's own limit wins
        h = eng.submit([1, 2, 3], _sp(top_logprobs=1))
        assert list(h) == [5, 6, 7]
        c = h.completion
        assert c.finish_reason == "length" and c.token_ids == [5, 6, 7] and c.prompt_tokens == 3
        assert [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs] == [(t, -0.5, [(t, -0.5)]) for t in (5, 6, 7)]
        assert fake.calls[0]["prompt"] == {"prompt_token_ids": [1, 2, 3]} and fake.calls[0]["lora"] is None
        assert fake.aborted == []  # the engine finished it: nothing to abort
        with pytest.raises(ValueError, match="limit is 512"):
            eng.submit(list(range(512)), _sp())
        with pytest.raises(ValueError, match="no adapter named 'x'"):
            eng.submit([1], _sp(), adapter="x")
    finally:
        eng.close()
    assert fake.shut
    with pytest.raises(RuntimeError):
        eng.submit([1], _sp())


def test_vllm_sampling_translation(monkeypatch, tok):
    fake = FakeVllm()
    fake_vllm(monkeypatch, fake)
    eng = B.VllmEngine(_deploy(), "/m", tok, [2, 3], max_model_len=100)
    try:
        greedy = eng.sampling_params(_sp(max_new_tokens=9))
        assert greedy.kw == {"n": 1, "max_tokens": 9, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                             "repetition_penalty": 1.0, "stop": None, "stop_token_ids": [2, 3], "seed": None,
                             "logprobs": None, "skip_special_tokens": False,
                             "output_kind": sys.modules["vllm.sampling_params"].RequestOutputKind.DELTA}
        s = eng.sampling_params(_sp(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1, stop=("END",),
                                    stop_token_ids=(9, 2), seed=11, logprobs=True))
        assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.stop, s.stop_token_ids, s.seed,
                s.logprobs) == (0.7, 0.9, 20, 1.1, ["END"], [2, 3, 9], 11, 0)
        # the engine's max_tokens is clamped to the room left, as GenerationEngine does
        h = eng.submit([1] * 500, _sp(max_new_tokens=100))
        h.result()
        assert fake.calls[-1]["sp"].max_tokens == 12
        with pytest.raises(ValueError, match="beam search"):
            eng.submit([1], _sp(num_beams=2))
    finally:
        eng.close()


def test_vllm_cancel_aborts_and_stop_strings_end_early(monkeypatch, tok):
    fake = FakeVllm(script=(5, 6), hang=True)
    fake_vllm(monkeypatch, fake)
    eng = B.VllmEngine(_deploy(), "/m", tok, [2], max_model_len=100)
    try:
        h = eng.submit([1, 2], _sp())
        it = iter(h)
        assert next(it) == 5
        h.cancel()
        assert list(it) in ([], [6])
        assert h.completion.finish_reason == "abort"
        _wait(lambda: fake.aborted == [h.request_id])
        # our stop semantics: a stop id ends the sequence even if the engine streams on, and the engine is told
        h = eng.submit([1], _sp(stop_token_ids=(6,)))
        c = h.result()
        assert (c.finish_reason, c.token_ids) == ("stop", [5, 6])
        _wait(lambda: h.request_id in fake.aborted)
        # a stop string in the decoded tail (checked with tunesmith's tokenizer)
        text = tok.decode([5, 6], skip_special_tokens=False)
        h = eng.submit([1], _sp(stop=(text,)))
        c = h.result()
        assert (c.finish_reason, c.stop_hit) == ("stop", text)
        # max_new_tokens counted by us
        c = eng.submit([1], _sp(max_new_tokens=1)).result()
        assert (c.finish_reason, c.token_ids) == ("length", [5])
    finally:
        eng.close()


def test_vllm_engine_stop_reason_and_async_consumer(monkeypatch, tok):
    fake = FakeVllm(script=(5, 6), finish="stop", stop_reason="</s>")
    fake_vllm(monkeypatch, fake)
    eng = B.VllmEngine(_deploy(), "/m", tok, [2], max_model_len=100)

    async def consume():
        h = eng.submit([1], _sp(), loop=asyncio.get_running_loop())
        return [t async for t in h], h.completion

    try:
        tokens, c = asyncio.run(consume())
        assert tokens == [5, 6] and (c.finish_reason, c.stop_hit) == ("stop", "</s>")
    finally:
        eng.close()


def test_vllm_adapters_map_to_lora_requests(monkeypatch, tok, tmp_path):
    fake = FakeVllm(script=(5,))
    built = fake_vllm(monkeypatch, fake)
    a, b = _adapter(tmp_path, "a"), _adapter(tmp_path, "b")
    eng = B.VllmEngine(_deploy(), "/m", tok, [2], adapters={"a": a, "sql": b}, default_adapter="a",
                       max_model_len=100)
    try:
        assert built["engine_args"].kw["enable_lora"] is True and built["engine_args"].kw["max_loras"] == 2
        for adapter, expect in ((None, ("a", 1, a)), ("", None), ("sql", ("sql", 2, b)), ("a", ("a", 1, a))):
            eng.submit([1], _sp(), adapter=adapter).result()
            lora = fake.calls[-1]["lora"]
            assert (lora.args if lora is not None else None) == expect, adapter
    finally:
        eng.close()


def _wait(cond, timeout=120.0):  # the wait is for cond; the timeout only bounds a hang
    import time
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


# ------------------------------------------------------------------ SGLang and LMDeploy engines

def test_sglang_engine(monkeypatch, tok, tmp_path):
    fake = FakeSglang(script=(5, 6, 7))
    built = fake_sglang(monkeypatch, fake)
    a = _adapter(tmp_path, "a")
    eng = B.SglangEngine(_deploy(), "/m", tok, [2], adapters={"sql": a}, max_model_len=100)
    try:
        assert built["skip_tokenizer_init"] is True and built["lora_paths"] == [f"sql={a}"]
        h = eng.submit([1, 2], _sp(top_logprobs=1, seed=3, top_k=0, stop=("zz",)), adapter="sql")
        assert list(h) == [5, 6, 7]
        c = h.completion
        assert c.finish_reason == "length" and [lp.top for lp in c.logprobs] == [[(t, -0.25)] for t in (5, 6, 7)]
        call = fake.calls[-1]
        assert call["input_ids"] == [1, 2] and call["lora_path"] == "sql" and call["stream"] is True
        assert call["rid"] == h.request_id and call["top_logprobs_num"] == 1 and call["logprob_start_len"] == 2
        # stop strings stay with tunesmith (SGLang refuses them without its tokenizer); greedy; top_k off = -1
        assert call["sampling_params"] == {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                           "repetition_penalty": 1.0, "stop_token_ids": [2],
                                           "skip_special_tokens": False, "sampling_seed": 3}
        eng.submit([1], _sp(), adapter="").result()
        assert "lora_path" not in fake.calls[-1] and "return_logprob" not in fake.calls[-1]
        fake.hang = True
        h = eng.submit([1], _sp())
        next(iter(h))
        h.cancel()
        assert h.result().finish_reason == "abort"
        _wait(lambda: fake.aborted == [h.request_id])
    finally:
        eng.close()
    assert fake.shut


def test_lmdeploy_engine(monkeypatch, tok, tmp_path):
    fake = FakeLmdeploy(script=(5, 6))
    built = fake_lmdeploy(monkeypatch, fake)
    a = _adapter(tmp_path, "a")
    eng = B.LmdeployEngine(_deploy("--session_len", "300"), "/m", tok, [2], adapters={"sql": a},
                           default_adapter="sql")
    try:
        assert type(built["config"]).__name__ == "PytorchEngineConfig" and built["config"].adapters == {"sql": a}
        assert eng.max_model_len == 300
        h = eng.submit([1, 2], _sp(temperature=0.5, top_k=0, seed=4, logprobs=True, stop=("zz",)))
        assert list(h) == [5, 6]
        c = h.completion
        assert c.finish_reason == "stop" and [lp.logprob for lp in c.logprobs] == [-0.75, -0.75]
        call = fake.calls[-1]
        assert call["ids"] == [1, 2] and call["adapter"] == "sql" and call["do_preprocess"] is False
        g = call["gen"]
        assert (g.do_sample, g.temperature, g.top_k, g.random_seed, g.stop_words, g.stop_token_ids, g.logprobs,
                g.max_new_tokens) == (True, 0.5, 0, 4, ["zz"], [2], 1, 16)
        eng.submit([1], _sp(), adapter="").result()
        assert fake.calls[-1]["adapter"] is None and fake.calls[-1]["gen"].do_sample is False
        fake.hang = True
        h = eng.submit([1], _sp())
        next(iter(h))
        h.cancel()
        assert h.result().finish_reason == "abort"
        _wait(lambda: fake.stopped == [fake.calls[-1]["session"]])
    finally:
        eng.close()
    assert fake.closed


# ------------------------------------------------------------------ behind ChatEngine

def test_chat_engine_over_a_backend(monkeypatch, tok, tiny_models):
    from transformers import GenerationConfig

    from tunesmith.inference.chat import ChatEngine, GenConfig

    hello = tok("hello there", add_special_tokens=False)["input_ids"]
    fake = FakeVllm(script=(*hello, tok.eos_token_id), finish="stop")
    fake_vllm(monkeypatch, fake)
    eng = B.VllmEngine(_deploy(), "/m", tok, [tok.eos_token_id], max_model_len=100)
    gen = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8, eos_token_id=tok.eos_token_id)
    chat = ChatEngine(None, tok, engine=eng, generation_config=gen)
    try:
        assert chat.engine is eng and chat.max_model_len == 512 and chat.stop_ids == [tok.eos_token_id]
        replies = chat.generate([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
                                GenConfig(max_new_tokens=8))
        assert [r.content for r in replies] == ["hello there"] * 2
        assert all(r.finish_reason == "stop" and r.completion_tokens == len(hello) + 1 for r in replies)
        # the checkpoint's generation_config gives the defaults
        sp = fake.calls[-1]["sp"]
        assert (sp.temperature, sp.top_p) == (0.6, 0.8)
        with pytest.raises(ConfigError, match="--infer_backend transformers"):
            chat.device
    finally:
        chat.close()


def test_build_engine_with_vllm(monkeypatch, tiny_models, capsys):
    from tunesmith.inference.chat import ChatEngine, build_engine

    fake = FakeVllm(script=(5,))
    built = fake_vllm(monkeypatch, fake)
    model = tiny_models("qwen2")
    args = parse_args("deploy", ["--model", model, "--infer_backend", "vllm", "--vllm_gpu_memory_utilization",
                                 "0.5", "--max_new_tokens", "7"])
    chat, _, ckpt, named = build_engine(args)
    try:
        assert isinstance(chat, ChatEngine) and isinstance(chat.engine, B.VllmEngine)
        assert built["engine_args"].kw["gpu_memory_utilization"] == 0.5
        assert built["engine_args"].kw["model"] == os.path.abspath(model)
        assert chat.tok.eos_token_id in chat.engine.stop_ids and named == {}
        assert chat.defaults.max_new_tokens == 7
        assert "vLLM engine (--infer_backend vllm)" in capsys.readouterr().err
        r = chat.generate([[{"role": "user", "content": "hi"}]])[0]
        assert r.completion_tokens == 1
    finally:
        chat.close()


def test_build_engine_names_the_alternative_when_the_engine_fails(monkeypatch, tiny_models):
    from tunesmith.inference.chat import build_engine

    fake_vllm(monkeypatch, FakeVllm())

    def broken(engine_args):
        raise RuntimeError("CUDA out of memory\nmore lines")
    sys.modules["vllm"].AsyncLLMEngine.from_engine_args = staticmethod(broken)
    model = tiny_models("qwen2")
    args = parse_args("deploy", ["--model", model, "--infer_backend", "vllm", "--api_key", "sk-very-secret"])
    with pytest.raises(ConfigError) as e:
        build_engine(args)
    msg = str(e.value)
    assert msg.startswith("--infer_backend vllm: vLLM failed to start (RuntimeError: CUDA out of memory)")
    assert f"vllm serve {os.path.abspath(model)}" in msg or f"vllm serve {model}" in msg
    assert "sk-very-secret" not in msg and "--infer_backend transformers" in msg


def test_build_engine_checks_the_backend_first(monkeypatch, tiny_models):
    from tunesmith.inference.chat import build_engine

    fake_vllm(monkeypatch, FakeVllm(), gpu=False)
    args = parse_args("infer", ["--model", tiny_models("qwen2"), "--infer_backend", "vllm"])
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        build_engine(args)

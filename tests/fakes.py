"""Test doubles shared by several test folders: fake vllm / sglang / lmdeploy modules (tests/inference/test_backends.py,
and GRPO's --use_vllm rollouts in tests/train/rl/test_grpo.py) that mimic the API surface
tunesmith.inference.backends calls, and a Scripted model whose greedy output follows a script chosen from the prompt
(tests/inference/test_engine.py, tests/serve/test_serve.py). Imported as `from fakes import ...` (pytest puts tests/
on sys.path)."""
import asyncio
import sys
import types

import torch


def fake_module(monkeypatch, name: str, version: str = "0.8.5", gpu: bool = False):
    """An empty module `name` with that __version__ in sys.modules, and torch.cuda.is_available() answering gpu (both
    undone by monkeypatch)."""
    mod = types.ModuleType(name)
    mod.__version__ = version
    monkeypatch.setitem(sys.modules, name, mod)
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)


class Rec:
    """A keyword-argument recorder: the fakes' SamplingParams / configs."""

    def __init__(self, *args, **kw):
        self.args, self.kw = args, kw
        self.__dict__.update(kw)


class Logprob:
    """vLLM's Logprob: the log-probability of one candidate token."""

    def __init__(self, logprob):
        self.logprob = logprob


class FakeVllm:
    """AsyncLLMEngine: generate() streams one token per RequestOutput (DELTA) and hangs after the script when
    `hang` (so cancel has something to abort); the last output carries finish_reason."""

    def __init__(self, script=(5, 6, 7), finish="length", hang=False, stop_reason=None):
        self.script, self.finish, self.hang, self.stop_reason = list(script), finish, hang, stop_reason
        self.calls, self.aborted, self.shut = [], [], False
        self.model_config = types.SimpleNamespace(max_model_len=512)

    async def generate(self, prompt, sp, request_id, lora_request=None):
        self.calls.append({"prompt": prompt, "sp": sp, "rid": request_id, "lora": lora_request})
        for i, t in enumerate(self.script):
            await asyncio.sleep(0)
            last = i == len(self.script) - 1 and not self.hang
            lps = [{t: Logprob(-0.5), 99: Logprob(-1.5)}] if sp.logprobs is not None else None
            out = types.SimpleNamespace(token_ids=[t], logprobs=lps, finish_reason=self.finish if last else None,
                                        stop_reason=self.stop_reason if last else None)
            yield types.SimpleNamespace(outputs=[out], finished=last)
        if self.hang:
            await asyncio.sleep(3600)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def shutdown(self):
        self.shut = True


def fake_vllm(monkeypatch, engine: FakeVllm, gpu: bool = True):
    """A fake `vllm` package whose AsyncLLMEngine.from_engine_args returns engine; returns a dict that receives the
    engine_args tunesmith built."""
    import enum

    fake_module(monkeypatch, "vllm", version="0.8.5", gpu=gpu)
    vllm = sys.modules["vllm"]
    built = {}

    class AsyncLLMEngine:
        @staticmethod
        def from_engine_args(engine_args):
            built["engine_args"] = engine_args
            return engine

    vllm.SamplingParams, vllm.AsyncEngineArgs, vllm.AsyncLLMEngine = Rec, Rec, AsyncLLMEngine
    sp_mod = types.ModuleType("vllm.sampling_params")
    sp_mod.RequestOutputKind = enum.Enum("RequestOutputKind", "CUMULATIVE DELTA FINAL_ONLY")
    lora_pkg, lora_mod = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    lora_mod.LoRARequest = Rec
    for name, mod in (("vllm.sampling_params", sp_mod), ("vllm.lora", lora_pkg), ("vllm.lora.request", lora_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    return built


class FakeSglang:
    """sglang.Engine: async_generate(stream=True) returns an async iterator of cumulative output_ids dicts."""

    def __init__(self, script=(5, 6, 7), finish=None, hang=False, **kw):
        self.kw, self.script, self.hang = kw, list(script), hang
        self.finish = finish or {"type": "length", "length": len(self.script)}
        self.calls, self.aborted, self.shut = [], [], False
        self.tokenizer_manager = types.SimpleNamespace(abort_request=self.aborted.append)

    async def async_generate(self, **kw):
        self.calls.append(kw)

        async def gen():
            for i in range(len(self.script)):
                await asyncio.sleep(0)
                last = i == len(self.script) - 1 and not self.hang
                meta = {"completion_tokens": i + 1, "finish_reason": self.finish if last else None}
                if kw.get("return_logprob"):
                    meta["output_token_logprobs"] = [(-0.25, t, None) for t in self.script[:i + 1]]
                    meta["output_top_logprobs"] = [[(-0.25, t, None), (-2.0, 98, None)] for t in self.script[:i + 1]]
                yield {"output_ids": self.script[:i + 1], "meta_info": meta}
            if self.hang:
                await asyncio.sleep(3600)
        return gen()

    def shutdown(self):
        self.shut = True


class FakeLmdeploy:
    """lmdeploy AsyncEngine (< 0.16): generate(..., input_ids=) streams GenOut-like objects, then a final one."""

    def __init__(self, script=(5, 6, 7), finish="stop", hang=False):
        self.script, self.finish, self.hang = list(script), finish, hang
        self.calls, self.stopped, self.closed = [], [], False

    async def generate(self, messages, session_id, gen_config, stream_response=True, do_preprocess=True,
                       adapter_name=None, input_ids=None):
        self.calls.append({"session": session_id, "gen": gen_config, "adapter": adapter_name, "ids": input_ids,
                           "messages": messages, "do_preprocess": do_preprocess})
        for i, t in enumerate(self.script):
            await asyncio.sleep(0)
            lps = [{t: -0.75, 97: -3.0}] if gen_config.logprobs else None
            yield types.SimpleNamespace(token_ids=[t], generate_token_len=i + 1, logprobs=lps, finish_reason=None)
        if self.hang:
            await asyncio.sleep(3600)
        yield types.SimpleNamespace(token_ids=[], generate_token_len=len(self.script), logprobs=None,
                                    finish_reason=self.finish)

    async def stop_session(self, session_id):
        self.stopped.append(session_id)

    def close(self):
        self.closed = True


def fake_sglang(monkeypatch, engine: FakeSglang):
    """A fake `sglang` package whose Engine(**kw) returns engine; returns a dict that receives the kw."""
    fake_module(monkeypatch, "sglang", version="0.4.9", gpu=True)
    built = {}

    def Engine(**kw):
        built.update(kw)
        return engine
    sys.modules["sglang"].Engine = Engine
    return built


def fake_lmdeploy(monkeypatch, engine: FakeLmdeploy):
    """A fake `lmdeploy` package whose pipeline() returns engine; returns a dict that receives its arguments."""
    fake_module(monkeypatch, "lmdeploy", version="0.7.2", gpu=True)
    mod = sys.modules["lmdeploy"]
    built = {}

    def pipeline(model_dir, backend_config=None, **kw):
        built.update(model=model_dir, config=backend_config, **kw)
        return engine
    mod.pipeline, mod.GenerationConfig = pipeline, Rec
    mod.TurbomindEngineConfig = type("TurbomindEngineConfig", (Rec,), {})
    mod.PytorchEngineConfig = type("PytorchEngineConfig", (Rec,), {})
    return built


# ------------------------------------------------------------------ a scripted model

class Scripted(torch.nn.Module):
    """A tiny real model whose greedy output follows a script chosen from the prompt: the test double for 'the
    model decided to call a tool / to think'. The KV cache and batching are the real model's; only the final
    logits are replaced: each (fed token, position) pair is mapped, at prefill, to the script's next token."""

    def __init__(self, model, tokenizer, choose):
        super().__init__()
        self.inner, self.tok, self.choose = model, tokenizer, choose
        self.config, self.generation_config = model.config, model.generation_config
        self.next: dict = {}

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **kw):
        from tunesmith.inference.engine import _cache_keyword

        if cache is not None:  # the KV cache under the inner model's own keyword (no deprecated name passed)
            kw[_cache_keyword(self.inner)] = cache
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        logits = torch.full((input_ids.shape[0], 1, out.logits.shape[-1]), -1e4)
        for i in range(input_ids.shape[0]):
            pos = int(position_ids[i, -1])
            if input_ids.shape[1] > 1:  # prefill: choose the script for this prompt
                real = input_ids[i][attention_mask[i].bool()].tolist()
                script = self.tok(self.choose(self.tok.decode(real)), add_special_tokens=False)["input_ids"]
                for k in range(len(script) - 1):
                    self.next[(script[k], pos + 1 + k)] = script[k + 1]
                logits[i, 0, script[0]] = 0
            else:
                logits[i, 0, self.next.get((int(input_ids[i, -1]), pos), self.tok.eos_token_id)] = 0
        out.logits = logits
        return out


def scripted_chat(tiny_models, family, choose, **kw):
    """A ChatEngine over a Scripted tiny model of `family` (official chat template): choose(prompt text) -> the reply
    text the model will generate greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine
    d = tiny_models(family, official_template=True)
    tok = AutoTokenizer.from_pretrained(d)
    return ChatEngine(Scripted(AutoModelForCausalLM.from_pretrained(d), tok, choose), tok, **kw)


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


def weather_script(prompt: str) -> str:
    """The script of a model that calls get_weather for Paris, then answers from the tool's result."""
    if "<tool_response>" in prompt:
        return "It is sunny in Paris.<|im_end|>"
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


# An ms-swift 3.x ORM plugin file (unchanged form): the share of even token ids in each completion, a reward a tiny
# model can raise. GRPO, PPO, the rollout-server and W&B tests train against it.
EVEN_TOKENS_PLUGIN = '''
from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids=None, **kwargs):
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in response_token_ids]


orms["even_tokens"] = EvenTokens
'''

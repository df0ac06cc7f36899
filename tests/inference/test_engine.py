"""The generation engine and template-aware replies, in-process: batched greedy output equals one-at-a-time output
(base, LoRA, two adapters in one batch, requests joining a running batch), n, log-probs, seeds, gpt-oss and Qwen3
reasoning, tool calls (official templates), `infer` result lines."""
import json

import pytest
import torch

from conftest import read_jsonl, write_jsonl
from fakes import WEATHER, scripted_chat, weather_script

Q = [[{"role": "user", "content": f"question {i}: " + "word " * (i % 5)}] for i in range(10)]


def _chat(model_dir, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine
    return ChatEngine(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gpt_oss", "llama"])
def test_batched_greedy_equals_alone_and_transformers_generate(tiny_models, family):
    from tunesmith.inference.chat import GenConfig

    chat = _chat(tiny_models(family), max_batch_size=4)  # 10 prompts, 4 at a time: rows join and leave
    try:
        cfg = GenConfig(max_new_tokens=12, temperature=0)
        batched = chat.generate(Q, cfg)
        alone = [chat.generate([q], cfg)[0] for q in Q]
        assert [r.content for r in batched] == [r.content for r in alone]
        p = chat.prompt(Q[3])
        ids = torch.tensor([p.ids])
        ref = chat.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  eos_token_id=chat.stop_ids, pad_token_id=chat.tok.pad_token_id)
        assert chat.engine.generate([p.ids], chat.sampling(cfg))[0].token_ids == ref[0, len(p.ids):].tolist()
    finally:
        chat.close()


def _adapter(model_dir, out, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                       LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    m.save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_two_adapters_and_the_base_share_one_batch(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine, GenConfig

    base_dir = tiny_models("qwen2")
    a, b = _adapter(base_dir, tmp_path / "a", 1), _adapter(base_dir, tmp_path / "b", 2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    chat = ChatEngine(model, AutoTokenizer.from_pretrained(base_dir), max_batch_size=16)
    cfg = GenConfig(max_new_tokens=10, temperature=0)
    try:
        names = ["a", "b", ""] * 3
        prompts = [chat.prompt(q) for q in Q[:9]]
        handles = [chat.submit(p, cfg, adapter=n)[0] for p, n in zip(prompts, names)]
        mixed = [chat.reply(h.result(), p, cfg).content for h, p in zip(handles, prompts)]
        for name in ("a", "b", ""):
            idx = [i for i, n in enumerate(names) if n == name]
            alone = [chat.generate([Q[i]], cfg, adapter=name)[0].content for i in idx]
            assert [mixed[i] for i in idx] == alone
        assert len({mixed[0], mixed[1], mixed[2]}) == 3  # the adapters do differ
    finally:
        chat.close()
    plain = _chat(base_dir)  # "" is the base model without any adapter
    try:
        assert [plain.generate([Q[i]], cfg)[0].content for i in (2, 5)] == [mixed[2], mixed[5]]
    finally:
        plain.close()


def test_n_logprobs_seed_and_stop(tiny_models):
    from transformers import AutoModelForCausalLM
    from tunesmith.inference.chat import GenConfig

    d = tiny_models("qwen2")
    chat = _chat(d)
    try:
        p = chat.prompt(Q[1])
        cfg = GenConfig(max_new_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=3)
        a, b = [chat.reply(h.result(), p, cfg) for h in chat.submit(p, cfg)]
        assert a.content == b.content and len(a.logprobs) == 6
        # log-probs equal the model's own log-softmax over the full sequence, token by token
        ids = p.ids + [lp.token_id for lp in a.logprobs]
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(d)(input_ids=torch.tensor([ids])).logits[0].float()
        want = torch.log_softmax(logits, -1)
        for k, lp in enumerate(a.logprobs):
            row = want[len(p.ids) - 1 + k]
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
            assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
        sampled = GenConfig(max_new_tokens=8, temperature=1.0, seed=7, n=3)
        first = [chat.reply(h.result(), p, sampled).content for h in chat.submit(p, sampled)]
        again = [chat.reply(h.result(), p, sampled).content for h in chat.submit(p, sampled)]
        assert first == again and len(set(first)) > 1  # seeded per choice, whatever the batch
    finally:
        chat.close()


def test_a_training_model_generates_in_eval_mode_and_is_given_back_in_training_mode(tiny_models):
    """The engine runs every step in eval mode (dropout off); a model that was training (GRPO's policy) is put
    back in training mode after each step, and one already in eval mode stays so."""
    from tunesmith.inference.chat import GenConfig

    chat = _chat(tiny_models("qwen2"))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training)) for m in chat.model.modules()]
    try:
        cfg = GenConfig(max_new_tokens=4, temperature=0.7, seed=1)
        for training in (True, False):
            chat.model.train(training)
            seen.clear()
            chat.generate([Q[0], Q[1]], cfg)
            assert seen and not any(seen)
            assert chat.model.training is training and all(m.training is training for m in chat.model.modules())
    finally:
        for h in hooks:
            h.remove()
        chat.close()


def test_gpt_oss_returns_the_final_channel_with_reasoning_apart(tiny_models):
    from tunesmith.inference.chat import GenConfig

    harmony = ("<|channel|>analysis<|message|>The user asks for a capital.<|end|><|start|>assistant"
               "<|channel|>final<|message|>Paris.<|return|>")
    chat = scripted_chat(tiny_models, "gpt_oss", lambda prompt: harmony)
    try:
        assert "<|end|>" not in chat.tok.convert_ids_to_tokens(chat.stop_ids)  # ends a message, not the turn
        reply = chat.generate([[{"role": "user", "content": "Capital of France?"}]],
                              GenConfig(max_new_tokens=64, temperature=0))[0]
        assert (reply.content, reply.reasoning, reply.finish_reason) == \
            ("Paris.", "The user asks for a capital.", "stop")
    finally:
        chat.close()


def _streamed(chat, messages, cfg, tools=None):
    prompt = chat.prompt(messages, tools)
    handle = chat.submit(prompt, cfg)[0]
    state = chat.stream_state(prompt, cfg)
    deltas = [state.feed(t) for t in handle]
    reply, last = state.finish(handle.completion)
    deltas.append(last)
    return reply, deltas


def test_qwen3_stream_and_whole_reply_agree_on_reasoning_and_content(tiny_models):
    from tunesmith.inference.chat import GenConfig

    chat = scripted_chat(tiny_models, "qwen3",
                          lambda p: "<think>\nTwo plus two.\n</think>\n\nIt is 4.<|im_end|>")
    cfg = GenConfig(max_new_tokens=40, temperature=0)
    msgs = [{"role": "user", "content": "2+2?"}]
    try:
        whole = chat.generate([msgs], cfg)[0]
        assert (whole.reasoning, whole.content) == ("Two plus two.", "It is 4.")
        reply, deltas = _streamed(chat, msgs, cfg)
        assert "".join(d.get("reasoning_content", "") for d in deltas) == whole.reasoning
        assert "".join(d.get("content", "") for d in deltas) == whole.content
        assert not any("<think>" in d.get("content", "") for d in deltas)
        # --enable_thinking false reaches the template: the prompt carries the empty think block
        assert chat.prompt(msgs, template_kwargs={"enable_thinking": False}).ids != chat.prompt(msgs).ids
    finally:
        chat.close()


def test_tool_calls_are_parsed_streamed_and_the_history_reaches_the_template(tiny_models):
    from tunesmith.inference.chat import GenConfig

    chat = scripted_chat(tiny_models, "qwen2", weather_script)
    cfg = GenConfig(max_new_tokens=60, temperature=0)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    try:
        r = chat.generate([msgs], cfg, tools=WEATHER)[0]
        assert r.finish_reason == "tool_calls" and r.content == ""
        (call,) = r.tool_calls
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        _, deltas = _streamed(chat, msgs, cfg, WEATHER)
        streamed = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [c["function"]["arguments"] for c in streamed] == [call["function"]["arguments"]]
        assert not any(d.get("content") for d in deltas)
        # round 2: the assistant's call (arguments as a JSON string, as OpenAI clients send it) and the result
        history = msgs + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny"}'}]
        text = chat.tok.decode(chat.prompt(history, WEATHER).ids)
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
        assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in text
        final = chat.generate([history], cfg, tools=WEATHER)[0]
        assert (final.content, final.finish_reason, final.tool_calls) == ("It is sunny in Paris.", "stop", [])
        # without tools offered, nothing is parsed: the text stays content
        plain = chat.generate([msgs], cfg)[0]
        assert plain.tool_calls == [] and "get_weather" in plain.content and plain.finish_reason == "stop"
    finally:
        chat.close()


@pytest.mark.parametrize("raw,calls,content", [
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', [("f", {"x": 1})], ""),
    ('Sure.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", '
     '"arguments": {"y": "z"}}\n</tool_call>', [("f", {}), ("g", {"y": "z"})], "Sure."),
    ("<tool_call>\nnot json\n</tool_call>", [], "<tool_call>\nnot json\n</tool_call>"),
])
def test_hermes_tool_call_parsing(raw, calls, content):
    from tunesmith.inference.reply import OutputParser
    from tunesmith.testing import build_tokenizer

    p = OutputParser(build_tokenizer("qwen2", official_template=True)).parse(raw, tools=True, final=True)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.tool_calls] == calls
    assert p.content == content


def test_a_stray_end_of_think_is_text_unless_a_think_block_opened():
    """A vocabulary may hold `</think>` without the template using it, and a think model may emit a stray one:
    only a reply that opened `<think>` (or a prompt that did) is split, so a stream never sends text twice."""
    from tunesmith.inference.reply import OutputParser
    from tunesmith.testing import build_tokenizer

    llama = OutputParser(build_tokenizer("llama"))  # its vocabulary has </think>; its template has no think block
    assert llama.reasoning_style == "none"
    assert llama.parse("a b</think> c", tools=False, final=True).content == "a b</think> c"
    qwen3 = OutputParser(build_tokenizer("qwen3"))
    p = qwen3.parse("plain</think> text", tools=False, final=True)
    assert (p.content, p.reasoning) == ("plain</think> text", None)
    p = qwen3.parse("thinking</think>answer", tools=False, final=True, in_think=True)
    assert (p.content, p.reasoning) == ("answer", "thinking")


def test_llama_and_harmony_tool_calls():
    from tunesmith.inference.reply import OutputParser
    from tunesmith.testing import build_tokenizer

    llama = OutputParser(build_tokenizer("llama", official_template=True))
    assert llama.tool_style == "llama3_json"
    p = llama.parse('{"name": "get_weather", "parameters": {"city": "Rome"}}', tools=True, final=True)
    assert p.tool_calls[0]["function"]["name"] == "get_weather" and p.content == ""
    assert llama.parse("Rome is sunny.", tools=True, final=True).content == "Rome is sunny."
    harmony = OutputParser(build_tokenizer("gpt_oss", official_template=True))
    raw = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
           "<|channel|>commentary json<|message|>{\"city\": \"Rome\"}<|call|>")
    p = harmony.parse(raw, tools=True, final=True)
    assert p.reasoning == "Need weather." and p.content == ""
    assert p.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


def test_infer_keeps_columns_and_computes_the_metric(tiny_models, tmp_path, capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "query": "What is the capital of France?", "response": "Paris", "topic": "geo"},
        {"id": "q2", "query": "2+2?", "response": "4"}])
    out = tmp_path / "r.jsonl"
    assert main(["infer", "--model", tiny_models("qwen2"), "--val_dataset", data, "--max_new_tokens", "4",
                 "--temperature", "0", "--result_path", str(out), "--metric", "acc", "--logprobs", "true"]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["q1", "q2"] and rows[0]["topic"] == "geo"
    assert len(rows[0]["logprobs"]["content"]) >= 1
    assert "--metric acc" in capsys.readouterr().err
    assert main(["infer", "--model", tiny_models("qwen2"), "--val_dataset", data, "--max_new_tokens", "4",
                 "--temperature", "0", "--result_path", str(tmp_path / "s.jsonl"), "--stream", "true"]) == 0
    assert main(["infer", "--model", tiny_models("qwen2"), "--val_dataset", data, "--stream", "true", "--n", "2",
                 "--result_path", str(tmp_path / "n.jsonl")]) == 1  # refused with a message, not silently n=1
    assert [r["response"] for r in read_jsonl(tmp_path / "s.jsonl")] == [r["response"] for r in rows]


def test_chunked_greedy_head_equals_the_full_logits():
    """Greedy rows take the arg-max vocabulary chunk by chunk; it equals torch.argmax over the full logits,
    ties (a repeated output row) included."""
    from tunesmith.inference.last_output import LastOutput, chunked_argmax

    torch.manual_seed(0)
    weight = torch.randn(1000, 16)
    weight[700] = weight[3]  # a tie across chunks: the lower id wins, as torch.argmax decides
    hidden = torch.randn(6, 16)
    hidden[0] = weight[3] * 10
    full = hidden @ weight.T
    got = chunked_argmax(hidden, weight, chunk=128)
    assert got.tolist() == full.argmax(-1).tolist() and got[0] == 3
    assert LastOutput(hidden=hidden).argmax(list(range(6)), (None, weight)).tolist() == got.tolist()
    assert torch.allclose(LastOutput(hidden=hidden).logits_of([1, 4], (None, weight)), full[[1, 4]], atol=1e-5)


def _engine(tiny_models, **kw):
    """A GenerationEngine over the tiny qwen2 model with no stop ids: every row runs to max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.inference.engine import GenerationEngine

    d = tiny_models("qwen2")
    return GenerationEngine(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d), [],
                            max_model_len=512, **kw)


def test_admission_stops_at_the_kv_budget_and_resumes_as_rows_finish(tiny_models):
    """With a KV budget of 3 rows x 28 tokens, ten 12-token prompts with 16 new tokens each run 3 at a time (not 8,
    the plan's rows), every one finishing, each equal to its lone run; a longer row counts every row at its length
    (one of 44 tokens runs alone), and a budget of nothing runs one at a time."""
    import dataclasses
    from tunesmith.inference.engine import SamplingParams

    alone_engine = _engine(tiny_models, max_batch_size=1)
    params = SamplingParams(max_new_tokens=16)
    prompts = [[20 + i] + list(range(30, 41)) for i in range(10)]  # 12 tokens each: 28 at their longest
    alone = [alone_engine.generate([p], params)[0].token_ids for p in prompts]
    per_token = alone_engine.plan.kv_bytes_per_token
    plan = dataclasses.replace(alone_engine.plan, max_rows=8, kv_budget=3 * 28 * per_token)
    engine = _engine(tiny_models, plan=plan)
    try:
        out = engine.generate(prompts, params)
        assert engine.peak_rows == 3  # the budget stopped admission, below the 8 rows
        assert [c.finish_reason for c in out] == ["length"] * 10 and [c.token_ids for c in out] == alone
    finally:
        engine.close()
    engine = _engine(tiny_models, plan=plan)
    try:
        long = engine.submit(prompts[0], SamplingParams(max_new_tokens=32))  # 44 tokens: 2 x 44 > 3 x 28
        short = [engine.submit(p, params) for p in prompts[1:3]]
        assert long.result().finish_reason == "length" and [h.result().token_ids for h in short] == alone[1:3]
        assert engine.peak_rows == 2  # the long row ran alone, then the two short ones together
    finally:
        engine.close()
    engine = _engine(tiny_models, plan=dataclasses.replace(plan, kv_budget=0))
    try:
        assert [c.token_ids for c in engine.generate(prompts[:3], params)] == alone[:3] and engine.peak_rows == 1
    finally:
        engine.close()
        alone_engine.close()


def test_auto_batch_greedy_equals_alone_under_many_concurrent_requests(tiny_models):
    """The default (--max_batch_size auto) takes all 24 concurrent requests into one batch on this model; each
    greedy reply equals the reply to the request alone."""
    from tunesmith.inference.chat import GenConfig

    chat = _chat(tiny_models("qwen2"))
    try:
        plan = chat.engine.plan
        assert plan.cap is None and plan.max_rows >= 24 and plan.kv_budget > 0
        questions = [[{"role": "user", "content": f"question {i}: " + "word " * (i % 7)}] for i in range(24)]
        cfg = GenConfig(max_new_tokens=10, temperature=0)
        batched = [r.content for r in chat.generate(questions, cfg)]
        assert chat.engine.peak_rows > 12  # rows did share the batch
        assert batched == [chat.generate([q], cfg)[0].content for q in questions]
    finally:
        chat.close()

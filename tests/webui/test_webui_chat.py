"""The Chat page's model: loaded from infer's flags onto the engine deploy serves, a reply streamed token by token
that ends equal to the engine's own greedy reply, sampling settings checked as infer's flags are, reasoning and
tool calls shown apart from the answer."""
import pytest

from tunesmith.errors import ConfigError, FlagError
from tunesmith.webui.chat import ChatSession, conversation, gen_config, parse_tools, shown, stream_turn
from tunesmith.webui.labels import labels

WORDS = labels("en")


@pytest.mark.slow
def test_streamed_reply_equals_the_engine_s_reply(tiny_models):
    session = ChatSession()
    said = session.load(["--model", tiny_models("llama")])  # its random weights say words (qwen2's: newlines)
    try:
        assert said.startswith("loaded ")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        cfg = gen_config({"max_new_tokens": 12, "temperature": 0})
        steps = list(stream_turn(session.engine, messages, cfg))
        (whole,) = session.engine.generate([messages], cfg)
        assert len(steps) >= 2  # pieces arrive while it generates
        assert [s["content"] for s in steps] == sorted([s["content"] for s in steps], key=len)
        assert steps[-1]["content"] == whole.content and steps[-1]["finish_reason"] == whole.finish_reason
        # closing the stream early (the page's Stop) cancels the sequence and leaves the engine serving
        it = stream_turn(session.engine, messages, gen_config({"max_new_tokens": 200, "temperature": 0}))
        next(it)
        it.close()
        assert session.engine.generate([messages], cfg)[0].content == whole.content
    finally:
        session.close()
    assert session.engine is None


def test_sampling_settings_are_checked_as_infer_s_flags():
    with pytest.raises(FlagError, match=r"2 problems with the flags:\n  - --temperature -1.0: expected 0 <= "
                                        r"temperature; 0 is greedy\n  - --top_p 1.5: expected 0 < top_p <= 1"):
        gen_config({"top_p": "1.5", "temperature": "-1"})
    with pytest.raises(ConfigError, match="--top_k: expected an integer, got 'x'"):
        gen_config({"top_k": "x"})
    cfg = gen_config({"max_new_tokens": 7, "temperature": "0", "seed": "3", "stop": ["\n\n", ""]})
    assert (cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.stop) == (7, 0.0, 3, ["\n\n"])
    assert gen_config({}).seed is None and gen_config({}).temperature is None


def test_reasoning_and_tool_calls_are_shown_apart():
    reply = {"reasoning": "think", "content": "", "finish_reason": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                           "arguments": '{"city": "Paris"}'}}]}
    msgs = shown(reply, WORDS)
    assert msgs[0] == {"role": "assistant", "content": "think",
                       "metadata": {"title": "Reasoning", "status": "pending"}}
    assert msgs[1]["metadata"] == {"title": "Tool call: get_weather"} and '"city": "Paris"' in msgs[1]["content"]
    assert len(msgs) == 2
    done = shown({**reply, "content": "It is sunny.", "tool_calls": [], "finish_reason": "stop"}, WORDS)
    assert done[0]["metadata"]["status"] == "done" and done[-1] == {"role": "assistant", "content": "It is sunny."}
    # what goes back to the model: the system prompt, the turns, not the folded displays
    history = [{"role": "user", "content": "hi"}, *done]
    assert conversation(history, "Be brief.") == [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "It is sunny."}]


def test_tools_box():
    assert parse_tools("  ") is None
    assert parse_tools('{"type": "function", "function": {"name": "f"}}') == [{"type": "function",
                                                                                "function": {"name": "f"}}]
    with pytest.raises(ConfigError, match="tools: not JSON"):
        parse_tools("[{")

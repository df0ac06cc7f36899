"""The batch sized from memory (`--max_batch_size auto`): bytes per token and per row from model configs (a tiny
model, Qwen2.5-0.5B's and Qwen2.5-7B's shapes), the rows and KV-cache budget on small and large memory, the flag as
a cap, the start-up line, and the readings of a live model and of this machine's memory."""
import pytest

from tunesmith.inference.budget import (GIB, ROW_CAP, UNKNOWN_MEMORY_ROWS, Memory, ModelShape, measure_memory,
                                        model_shape, plan_batch)

PREFILL = 16384  # tokens, the engine's MAX_PREFILL_TOKENS
CONTEXT = 32768


def _qwen(**kw):
    from transformers import Qwen2Config
    return Qwen2Config(**kw)


# Qwen2.5-0.5B: 24 layers, 14 heads of 64, 2 KV heads, MLP 4,864, 151,936 rows; Qwen2.5-7B: 28 layers, 28 heads of
# 128, 4 KV heads, MLP 18,944, 152,064 rows; both bf16
Q05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
           num_key_value_heads=2)
Q7 = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
          num_key_value_heads=4)


def test_bytes_per_token_and_per_row_from_the_config():
    from tunesmith.testing import build_config

    q05 = ModelShape.from_config(_qwen(**Q05), 2)
    assert (q05.head_dim, q05.kv_bytes_per_token) == (64, 12288)  # 2 x 24 x 2 x 64 x 2 bytes = 12 KiB
    assert q05.row_step_bytes == 151936 * 6  # bf16 logits and their float32 copy: 0.91 MB a row
    q7 = ModelShape.from_config(_qwen(**Q7), 2)
    assert (q7.head_dim, q7.kv_bytes_per_token, q7.row_step_bytes) == (128, 57344, 152064 * 6)  # 56 KiB a token
    tiny = ModelShape.from_config(build_config("qwen2", 2048), 4)  # hidden 64, 4 heads, 2 KV heads, 2 layers, fp32
    assert (tiny.kv_bytes_per_token, tiny.row_step_bytes) == (2 * 2 * 2 * 16 * 4, 2048 * 8)
    qwen3 = ModelShape.from_config(build_config("qwen3", 2048, hidden=64, heads=4), 2)  # head_dim given apart
    assert qwen3.head_dim == 16
    assert ModelShape.from_config(object(), 2) is None  # a config that says too little: no plan from it


def test_large_memory_runs_256_sequences_with_the_rest_as_kv_cache():
    shape = ModelShape.from_config(_qwen(**Q05), 2)
    gpu = Memory(80 * GIB, "free on cuda:0", reserved=8 * GIB)  # an empty 80 GiB GPU at --gpu_memory_utilization 0.9
    plan = plan_batch(shape, gpu, None, CONTEXT, PREFILL)
    reserve = PREFILL * (4 * 896 + 3 * 4864) * 2  # prefill activations: 568 MiB
    assert (plan.max_rows, plan.limited_by, plan.reserve) == (ROW_CAP, "cap", reserve)
    assert plan.kv_budget == 72 * GIB - reserve - 256 * 151936 * 6 == 76_480_446_464  # 71.2 GiB
    assert plan.kv_budget // (CONTEXT * 12288) == 189  # sequences of the full context at once
    q7 = plan_batch(ModelShape.from_config(_qwen(**Q7), 2), gpu, None, CONTEXT, PREFILL)
    assert (q7.max_rows, q7.kv_budget // (CONTEXT * 57344)) == (256, 39)


def test_small_memory_gives_fewer_sequences():
    q05 = ModelShape.from_config(_qwen(**Q05), 2)
    cpu = Memory(2 * GIB, "RAM available", fraction=0.5)  # 1 GiB usable
    plan = plan_batch(q05, cpu, None, CONTEXT, PREFILL)
    room = GIB - PREFILL * (4 * 896 + 3 * 4864) * 2
    assert room // (911616 + 256 * 12288) == 117
    assert (plan.max_rows, plan.limited_by) == (117, "memory")
    assert plan.kv_budget == room - 117 * 911616 and plan.tokens_per_row(117) == 258
    # 7B on a 24 GiB GPU with 6 GiB left after its weights
    q7 = plan_batch(ModelShape.from_config(_qwen(**Q7), 2),
                    Memory(6 * GIB, "free on cuda:0", reserved=int(0.1 * 24 * GIB)), None, CONTEXT, PREFILL)
    assert (q7.max_rows, q7.limited_by) == (98, "memory")
    # less than the prefill reserve: one sequence at a time, with no KV budget beyond it
    starved = plan_batch(ModelShape.from_config(_qwen(**Q7), 2), cpu, None, CONTEXT, PREFILL)
    assert (starved.max_rows, starved.kv_budget) == (1, 0)


def test_the_flag_caps_the_rows_and_minus_one_lifts_the_cap_but_not_memory():
    q05 = ModelShape.from_config(_qwen(**Q05), 2)
    big, small = Memory(80 * GIB, "free", reserved=8 * GIB), Memory(2 * GIB, "RAM available", fraction=0.5)
    capped = plan_batch(q05, big, 64, CONTEXT, PREFILL)
    assert (capped.max_rows, capped.limited_by) == (64, "flag")
    assert plan_batch(q05, small, 1000, CONTEXT, PREFILL).max_rows == 117  # memory still limits an explicit cap
    uncapped = plan_batch(q05, big, -1, CONTEXT, PREFILL)
    assert uncapped.max_rows == (72 * GIB - PREFILL * (4 * 896 + 3 * 4864) * 2) // (911616 + 256 * 12288) == 18907
    assert uncapped.limited_by == "memory" and uncapped.kv_budget >= 0


def test_without_a_memory_reading_the_fixed_default_runs_without_budget():
    q05 = ModelShape.from_config(_qwen(**Q05), 2)
    for shape, memory in ((q05, None), (None, Memory(GIB, "RAM available"))):
        plan = plan_batch(shape, memory, None, CONTEXT, PREFILL)
        assert (plan.max_rows, plan.kv_budget, plan.limited_by) == (UNKNOWN_MEMORY_ROWS, None, "unknown")
        assert plan.fits(10_000, CONTEXT)
    assert plan_batch(q05, None, 8, CONTEXT, PREFILL).max_rows == 8
    assert plan_batch(q05, None, -1, CONTEXT, PREFILL).max_rows >= 1 << 30
    assert "could not be read" in plan_batch(q05, None, None, CONTEXT, PREFILL).describe()


def test_fits_counts_every_row_at_the_longest_one():
    plan = plan_batch(ModelShape.from_config(_qwen(**Q05), 2), Memory(2 * GIB, "RAM", fraction=0.5), None, CONTEXT,
                      PREFILL)
    per_token = 12288
    longest = plan.kv_budget // (4 * per_token)  # 4 rows of this length fill the budget
    assert plan.fits(4, longest) and not plan.fits(5, longest) and not plan.fits(4, longest + 1)
    assert plan.fits(1, 1000) and plan.fits(117, 258)


def test_the_start_up_line_says_what_was_chosen_and_why():
    q05 = ModelShape.from_config(_qwen(**Q05), 2)
    line = plan_batch(q05, Memory(80 * GIB, "free on cuda:0", reserved=8 * GIB), None, CONTEXT, PREFILL).describe()
    assert line.startswith("batch: up to 256 sequences in flight (--max_batch_size auto, limited by the "
                           "256-sequence cap); KV-cache budget 71.2 GiB of 72.0 GiB usable (80.0 GiB free on cuda:0 "
                           "less 8.0 GiB kept free, --gpu_memory_utilization), 12 KiB per token: ")
    assert "189 sequences at the full 32,768-token context" in line and "--max_batch_size N caps" in line
    small = plan_batch(q05, Memory(2 * GIB, "RAM available", fraction=0.5), 500, CONTEXT, PREFILL).describe()
    assert "up to 117 sequences in flight (--max_batch_size 500, limited by memory)" in small
    assert "0.5 × 2.0 GiB RAM available" in small
    assert "a request of the full 32,768-token context runs alone" in small


def test_the_live_readings():
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.testing import build_config

    model = AutoModelForCausalLM.from_config(build_config("qwen2", 2048))
    assert model_shape(model).dtype_bytes == 4
    assert model_shape(model.to(torch.bfloat16)).dtype_bytes == 2
    ram = measure_memory(torch.device("cpu"), 0.9)
    if ram is None:
        pytest.skip("no memory reading on this system")
    assert ram.available > 0 and ram.fraction == 0.5 and ram.usable == ram.available // 2

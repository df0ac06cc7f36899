"""GRPO (`tunesmith rlhf --rlhf_type grpo`) end to end on a tiny model: the mean reward of a reward the model can
reach rises, the KL to the reference rises from 0, a resumed run equals the uninterrupted one, plugins written for
ms-swift and TRL-style module.function rewards run, and what GRPO cannot do is a flag error before anything loads.
The loss and advantage formulas are checked against hand computations in test_grpo_losses.py, the reward
functions in test_rewards.py."""
import json
import math
import os

import pytest

from conftest import read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe

# a reward a random tiny model can climb: the share of its completion's tokens with an even id — in ms-swift's
# documented plugin form (3.x import path), run without ms-swift installed
PLUGIN = '''
from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids=None, **kwargs):
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in response_token_ids]


orms["even_tokens"] = EvenTokens
'''


pytestmark = pytest.mark.usefixtures("no_charts")


@pytest.fixture
def setup(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": "even"} for i in range(16)])
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    return tiny_models("qwen2"), data, str(plugin)


def _grpo(model, data, out, *flags):
    argv = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "8",
            "--per_device_train_batch_size", "32", "--max_completion_length", "12", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out), *flags]
    return recipe.main(parse_args("rlhf", argv))


def _log(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "reward" in r]


@pytest.mark.slow
def test_grpo_raises_a_reachable_reward_and_the_kl_rises_from_zero(setup, tmp_path):
    model, data, plugin = setup
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--train_type", "full", "--learning_rate", "5e-3", "--max_steps", "40", "--save_strategy", "no",
                "--log_completions", "true")
    log = _log(res["run_dir"])
    first = sum(r["reward"] for r in log[:5]) / 5
    last = sum(r["reward"] for r in log[-5:]) / 5
    assert first < 0.55 and last > first + 0.15, (first, last)  # measured: 0.47 -> 0.75
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0.1  # the policy starts as the reference, then moves
    assert {"reward_std", "rewards/EvenTokens/mean", "rewards/EvenTokens/std", "completions/mean_length",
            "completions/min_length", "completions/max_length", "completions/clipped_ratio",
            "clip_ratio/region_mean", "frac_reward_zero_std"} <= set(log[0])
    assert log[0]["completions/min_length"] <= log[0]["completions/mean_length"] <= log[0]["completions/max_length"]
    rollouts = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    assert len(rollouts) == 40 * 32 and set(rollouts[0]) == {"round", "prompt", "completion", "rewards", "reward",
                                                             "advantage"}
    assert rollouts[0]["prompt"][0]["role"] == "user" and "EvenTokens" in rollouts[0]["rewards"]
    group = rollouts[:8]  # one prompt's G completions: advantages are centred within the group
    assert abs(sum(r["advantage"] for r in group)) < 1e-6
    from tunesmith.runs.report import _completions_table, load_run
    table = _completions_table(load_run(res["run_dir"]))
    assert "Last 24 rollouts" in table and rollouts[-1]["completion"][:10] in table.replace("&#x27;", "'")


@pytest.mark.slow
def test_a_resumed_grpo_run_equals_the_uninterrupted_one(setup, tmp_path):
    """Each completion has its own seed and a round starts from the weights of its step, so resuming at a step
    regenerates exactly the rollouts the uninterrupted run trained on (LoRA, β > 0, two iterations per round)."""
    model, data, plugin = setup
    common = ["--external_plugins", plugin, "--reward_funcs", "even_tokens", "--learning_rate", "2e-2",
              "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "16"]
    full = _grpo(model, data, tmp_path / "full", *common)
    ckpt = os.path.join(full["run_dir"], "checkpoint-2")
    resumed = _grpo(model, data, tmp_path / "resumed", *common, "--resume_from_checkpoint", ckpt)
    a = {r["global_step"]: r for r in _log(full["run_dir"])}
    b = {r["global_step"]: r for r in _log(resumed["run_dir"])}
    assert sorted(b) == [1, 2, 3, 4]  # 1-2 from the checkpoint: the whole curve
    for step in b:
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])


@pytest.mark.slow
def test_trl_style_module_function_rewards_and_builtins(setup, tmp_path, monkeypatch):
    model, data, _ = setup
    (tmp_path / "my_rewards.py").write_text(
        "STEPS = []\n"
        "def short(completions, trainer_state=None, **kwargs):\n"
        "    STEPS.append((trainer_state.global_step, trainer_state.max_steps))\n"
        "    return [1.0 / (1 + len(c[0]['content'])) for c in completions]\n")  # TRL's form: message lists
    monkeypatch.syspath_prepend(str(tmp_path))
    res = _grpo(model, data, tmp_path / "out", "--reward_funcs", "my_rewards.short", "format", "format",
                "--reward_weights", "1", "0.5", "0.25", "--max_steps", "2", "--save_strategy", "no",
                "--per_device_train_batch_size", "16")
    log = _log(res["run_dir"])
    assert len(log) == 2 and "rewards/short/mean" in log[0] and "rewards/Format/mean" in log[0]
    assert "rewards/Format_2/mean" in log[0]  # the same reward twice: two keys
    import my_rewards
    assert my_rewards.STEPS == [(0, 2), (1, 2)]  # transformers' TrainerState attributes, optimiser steps
    args = json.load(open(os.path.join(res["run_dir"], "args.json")))
    assert args["reward_funcs"] == ["my_rewards.short", "format", "format"] and args["beta"] == 0.04
    assert args["loss_type"] == ["grpo"] and args["scale_rewards"] == "group"
    cfg, method = recipe.configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model, "--dataset", data,
                                                       "--reward_funcs", "format", "--scale_rewards", "false"]))
    assert method.scale_rewards == "none"  # ms-swift 3.x's boolean


@pytest.mark.parametrize("flags,message", [
    ([], "GRPO needs --reward_funcs"),
    (["--reward_funcs", "acuracy"], "acuracy.*accuracy"),
    (["--reward_funcs", "accuracy", "--num_generations", "3", "--per_device_train_batch_size", "4",
      "--steps_per_generation", "1"], "must hold whole groups of --num_generations 3"),
    (["--reward_funcs", "accuracy", "--loss_type", "dapoo"], "did you mean dapo"),
    (["--reward_funcs", "accuracy", "--per_device_train_batch_size", "3"],  # default accumulation 6: 18 completions
     r"\(3 completions per micro-batch x 6 micro-batches per generation = 18\) must hold whole groups"),
    (["--reward_model", "."], "no config.json or adapter_config.json in it"),
    (["--reward_model", "MODEL"], r"not a reward model \(config.json has architectures \['Qwen2ForCausalLM'\]\)"),
    (["--reward_funcs", "accuracy", "--num_infer_workers", "2"], "--num_infer_workers 2"),
    (["--reward_funcs", "accuracy", "--top_entropy_quantile", "1.5"],
     "top_entropy_quantile 1.5: expected 0 <= top_entropy_quantile <= 1"),
    (["--reward_funcs", "accuracy", "--top_entropy_quantile", "-0.1"], "expected 0 <= top_entropy_quantile"),
    (["--reward_funcs", "accuracy", "format", "--reward_weights", "1"], "one weight per function"),
    (["--reward_funcs", "accuracy", "--external_plugins", "/nonexistent/plugin.py"], "plugin.py"),
    (["--reward_funcs", "accuracy", "--top_p", "1.5", "--repetition_penalty", "0"], "repetition_penalty 0.0: expected 0 <"),
])
def test_what_grpo_cannot_do_is_a_flag_error(tiny_models, tmp_path, flags, message):
    flags = [tiny_models("qwen2") if f == "MODEL" else f for f in flags]
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               *flags])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)


def test_prompts_keep_the_solution_and_columns(tiny_models, tmp_path):
    """A row's final assistant reply becomes `solution` (unless it has one); other columns reach the rewards."""
    from tunesmith.data.load import load_datasets
    from tunesmith.train.rl.grpo import prompt_record

    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "id": 7},
        {"query": "2+2?", "solution": "4"},
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
         "solution": "\\boxed{6}"}])
    loaded = load_datasets([data], need_reply=False, keep_columns=True)
    recs = [prompt_record(r, s)[0] for r, s in zip(loaded.records, loaded.sources)]
    assert recs[0] == {"messages": [{"role": "user", "content": "1+1?"}], "columns": {"id": 7, "solution": "2"}}
    assert recs[1]["messages"] == [{"role": "user", "content": "2+2?"}] and recs[1]["columns"]["solution"] == "4"
    assert recs[2]["columns"]["solution"] == "\\boxed{6}"


# ------------------------------------------------------------------ token entropy, --top_entropy_quantile

T = 0.7  # a sampling temperature other than 1: the entropy is that of softmax(logits / T)


def _entropy_batch(model_dir, seed=0):
    """A tiny policy whose token distributions are peaked and varied (its output weight scaled up), and one
    collated micro-batch of six completions of different lengths after left-padded prompts."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.train.rl.units import Unit, grpo_collate

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    rng = random.Random(seed)
    units = [Unit([rng.randrange(5, 100) for _ in range(rng.randint(2, 5))],
                  [rng.randrange(5, 100) for _ in range(rng.randint(2, 7))], rng.uniform(-1, 1), True,
                  stats={"n": 1}) for _ in range(6)]
    return model, grpo_collate(units, pad_id=0)


def _float64_reference(model, batch):
    """(log p(token), entropy of softmax(logits / T)) [B, C] of each completion token, float64 from the model's full
    logits [B, L, V] (0 on padding): the computation the chunked paths must equal."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double() / T
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = batch["completion_mask"].double()
    p = batch["input_ids"].shape[1] - mask.shape[1]  # completion token p + j is predicted at position p + j - 1
    pred = logp[:, p - 1:-1]
    token = pred.gather(-1, batch["input_ids"][:, p:, None]).squeeze(-1)
    return token * mask, entropy[:, p - 1:-1] * mask


def _method(model_dir, *flags):
    return recipe.configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model_dir, "--dataset", "x.jsonl",
                                                "--reward_funcs", "format", "--temperature", str(T), *flags]))[1]


@pytest.mark.parametrize("chunked", [False, True])
def test_token_entropy_equals_a_float64_computation_from_the_full_logits(tiny_models, chunked, monkeypatch):
    import torch

    import tunesmith.train.ops.token_logps as tl

    model, batch = _entropy_batch(tiny_models("qwen2"))
    assert tl.chunked_head(model) is not None
    monkeypatch.setattr(tl, "chunk_rows", lambda vocab, hidden: 5)  # 5 rows a chunk: many chunks
    want_logps, want_entropy = _float64_reference(model, batch)
    keep = batch["completion_mask"].bool()
    out = tl.token_logps(model, batch, chunked=chunked, temperature=T, entropy=True)
    assert out.entropy.shape == out.logps.shape == (int(keep.sum()),) and out.entropy.dtype == torch.float32
    assert torch.allclose(out.entropy.double(), want_entropy[keep], atol=1e-5, rtol=0)
    assert torch.allclose(out.logps.double(), want_logps[keep], atol=1e-5, rtol=0)
    assert not out.entropy.requires_grad and out.logps.requires_grad
    assert want_entropy[keep].max() - want_entropy[keep].min() > 1.0  # varied: the quantile tests below mean something
    assert tl.token_logps(model, batch, chunked=chunked, temperature=T).entropy is None  # only when asked

    from tunesmith.train.rl.units import completion_logps, completion_logps_and_entropy
    logps, entropy = completion_logps_and_entropy(model, batch, T)
    assert torch.allclose(entropy.double(), want_entropy, atol=1e-5, rtol=0)
    assert torch.equal(logps, completion_logps(model, batch, T))


def _hand_quantile(values, q):
    """torch.quantile's default (linear interpolation between the two nearest ranks), by hand."""
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_top_entropy_quantile_trains_the_high_entropy_tokens_only(tiny_models, loss_type):
    """q = 0.5: the policy-gradient term keeps exactly the completion tokens whose entropy is at or above the
    median of the micro-batch's; the loss is grpo_loss with that mask (the KL and the normalisation keep every
    token); entropy/threshold is the median."""
    import torch

    from tunesmith.train.ops import losses as L
    from tunesmith.train.rl.grpo import _count, grpo_loss_terms, grpo_metrics

    model_dir = tiny_models("qwen2")
    method = _method(model_dir, "--top_entropy_quantile", "0.5", "--loss_type", loss_type)
    model, batch = _entropy_batch(model_dir)
    want_logps, want_entropy = _float64_reference(model, batch)
    mask = batch["completion_mask"]
    keep = mask.bool()
    gen = torch.Generator().manual_seed(1)
    batch["old_logps"] = ((want_logps + 0.3 * torch.randn(mask.shape, generator=gen, dtype=torch.float64)) * mask).float()
    batch["ref_logps"] = ((want_logps + 0.5 * torch.randn(mask.shape, generator=gen, dtype=torch.float64)) * mask).float()
    parts, stats = grpo_loss_terms(method, None, model, batch)

    threshold = _hand_quantile(want_entropy[keep].tolist(), 0.5)
    hand = (want_entropy >= threshold) & keep
    assert int(hand.sum()) == (int(keep.sum()) + 1) // 2  # half the tokens, the upper half
    (unit, scale), = _count(method, batch).items()
    common = dict(old_logps=batch["old_logps"].double(), ref_logps=batch["ref_logps"].double(),
                  advantages=batch["advantages"].double(), mask=mask.double(), beta=method.beta,
                  epsilon_low=method.epsilon, epsilon_high=method.epsilon_high,
                  max_completion_length=method.max_completion_length, num_items_in_batch=mask.sum())
    want, _ = L.grpo_loss(loss_type, logps=want_logps, entropy_mask=hand.double(), **common)
    assert parts[unit].item() / scale == pytest.approx(want.item(), abs=1e-6)
    unmasked, _ = L.grpo_loss(loss_type, logps=want_logps, **common)
    assert abs(unmasked.item() - want.item()) > 1e-3  # the mask made a difference
    assert stats["entropy/threshold_sum"] == pytest.approx(threshold, abs=1e-5)
    assert grpo_metrics(stats)["entropy/threshold"] == pytest.approx(threshold, abs=1e-5)
    assert "entropy/mean" not in grpo_metrics(stats)  # those are --log_entropy's


@pytest.mark.slow
def test_top_entropy_quantile_one_leaves_the_loss_unchanged_and_log_entropy_logs_the_completions(tiny_models):
    """q = 1 (the default) is the loss as before, bit for bit, also with --log_entropy, whose entropy/mean, /max
    and /min are the mean, max and min over the completions of each one's mean token entropy (ms-swift)."""
    import torch

    from tunesmith.train.ops import losses as L
    from tunesmith.train.rl.grpo import grpo_loss_terms, grpo_metrics
    from tunesmith.train.rl.units import completion_logps

    model_dir = tiny_models("qwen2")
    model, batch = _entropy_batch(model_dir)
    plain, logged = _method(model_dir), _method(model_dir, "--log_entropy", "true")
    mask = batch["completion_mask"]
    before, _ = L.grpo_loss("grpo", logps=completion_logps(model, batch, T).float(),
                            old_logps=completion_logps(model, batch, T).float(), ref_logps=None,
                            advantages=batch["advantages"].float(), mask=mask, beta=plain.beta,
                            epsilon_low=plain.epsilon, epsilon_high=plain.epsilon_high,
                            max_completion_length=plain.max_completion_length, num_items_in_batch=mask.sum())
    for method in (plain, logged):
        parts, stats = grpo_loss_terms(method, None, model, batch)
        assert torch.equal(parts["completions"], before * batch["n_completions"])
        assert "entropy/threshold_sum" not in stats
    assert not any(k.startswith("entropy/") for k in grpo_loss_terms(plain, None, model, batch)[1])
    _, want_entropy = _float64_reference(model, batch)
    per_completion = (want_entropy.sum(-1) / mask.sum(-1)).tolist()
    metrics = grpo_metrics(stats)
    assert metrics["entropy/mean"] == pytest.approx(sum(per_completion) / len(per_completion), abs=1e-5)
    assert metrics["entropy/max"] == pytest.approx(max(per_completion), abs=1e-5)
    assert metrics["entropy/min"] == pytest.approx(min(per_completion), abs=1e-5)


def _gather_threshold_worker(rank, port, out_dir):
    """One of two gloo processes: its own completion tokens' entropies; the threshold must be that of both's."""
    import torch
    import torch.distributed as dist

    from tunesmith.train.rl import grpo as G

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    entropy = torch.tensor([[[0.1, 2.0, 0.5, 9.0], [1.0, 0.2, 0.0, 0.0]],
                            [[3.0, 4.0, 0.3, 0.0], [0.7, 0.0, 0.0, 0.0]]][rank])
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]]][rank], dtype=torch.float32)
    method = type("M", (), {"log_entropy": True, "top_entropy_quantile": 0.5})()
    keep, stats = G.entropy_terms(method, entropy, mask)
    torch.save({"keep": keep, "stats": stats}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_entropy_threshold_is_taken_over_every_process(tmp_path):
    """Under two processes (gloo) the threshold and the --log_entropy statistics are those of the global
    micro-batch, as TRL's gathered quantile; they are counted once (rank 0), so the logged sums stay whole."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_threshold_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    every = [0.1, 2.0, 0.5, 1.0, 0.2, 3.0, 4.0, 0.3, 0.7]  # the 9 completion tokens of both processes
    threshold = _hand_quantile(every, 0.5)  # 0.7
    assert r0["stats"]["entropy/threshold_sum"] == pytest.approx(threshold)
    assert r0["keep"].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]] and r1["keep"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    means = [2.6 / 3, 0.6, 7.3 / 3, 0.7]  # each completion's mean token entropy
    assert r0["stats"]["entropy/mean_sum"] == pytest.approx(sum(means) / 4)
    assert r0["stats"]["entropy/max_sum"] == pytest.approx(max(means))
    assert r0["stats"]["entropy/min_sum"] == pytest.approx(min(means))
    assert r1["stats"] == {}  # rank 0 counts them: summing the ranks' statistics leaves one value per batch


@pytest.mark.slow
def test_a_grpo_run_with_top_entropy_quantile_logs_the_entropy(setup, tmp_path):
    model, data, plugin = setup
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--top_entropy_quantile", "0.2", "--log_entropy", "true", "--max_steps", "2",
                "--save_strategy", "no", "--per_device_train_batch_size", "16")
    log = _log(res["run_dir"])
    assert len(log) == 2
    for r in log:
        assert 0 < r["entropy/min"] <= r["entropy/mean"] <= r["entropy/max"] and r["entropy/threshold"] > 0
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm"))
    args = json.load(open(os.path.join(res["run_dir"], "args.json")))
    assert args["top_entropy_quantile"] == 0.2 and args["log_entropy"] is True


@pytest.mark.slow
def test_two_ddp_processes_run_grpo_like_one_process_with_the_same_global_batch(setup, tmp_path):
    """Each process generates its share of the round's groups (with the seeds one process would use), the round is
    gathered, and each process trains its slice: the logged rewards, KL and losses equal one process's."""
    from conftest import launch, run_dir_of

    model, data, plugin = setup
    common = ["rlhf", "--rlhf_type", "grpo", "--model", model, "--dataset", data, "--external_plugins", plugin,
              "--reward_funcs", "even_tokens", "--num_generations", "8", "--max_completion_length", "8",
              "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "2e-2", "--save_strategy", "no",
              "--report_to", "none", "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0"]
    launch([*common, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "one")], nproc=1)
    launch([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "two")], nproc=2)
    one, two = _log(run_dir_of(str(tmp_path / "one"))), _log(run_dir_of(str(tmp_path / "two")))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "kl", "grad_norm", "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a[key], b[key])


@pytest.mark.slow
def test_use_vllm_samples_each_round_from_the_policys_current_adapter(setup, tmp_path, monkeypatch):
    """--use_vllm (colocate): a fake vLLM (this machine has no GPU) records what each request carried. Every round
    gets a new LoRA id whose folder holds the adapter the policy had when the round started — equal to the
    checkpoint saved at that step — and every completion its own seed; the sampled tokens are what is trained."""
    import asyncio
    import types

    from safetensors.torch import load_file
    from fakes import FakeVllm, fake_vllm

    import tunesmith.inference.backends as B

    seen = []

    class PolicyVllm(FakeVllm):
        async def generate(self, prompt, sp, request_id, lora_request=None):
            name, lora_id, path = lora_request.args
            weights = load_file(os.path.join(path, "adapter_model.safetensors"))
            seen.append({"name": name, "id": lora_id, "seed": sp.seed, "weights": weights})
            ids = [10 + (sp.seed + i) % 20 for i in range(sp.max_tokens)]  # in the tiny vocabulary
            for i, t in enumerate(ids):
                await asyncio.sleep(0)
                last = i == len(ids) - 1
                out = types.SimpleNamespace(token_ids=[t], logprobs=None, finish_reason="length" if last else None,
                                            stop_reason=None)
                yield types.SimpleNamespace(outputs=[out], finished=last)

    built = fake_vllm(monkeypatch, PolicyVllm(), gpu=False)
    monkeypatch.setattr(B, "check_backend", lambda *a, **k: None)  # the fake is the GPU engine here
    model, data, plugin = setup
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--use_vllm", "true", "--vllm_gpu_memory_utilization", "0.4", "--learning_rate", "2e-2",
                "--max_steps", "3", "--save_steps", "1", "--per_device_train_batch_size", "16",
                "--log_completions", "true")
    kw = built["engine_args"].kw
    assert kw["enable_lora"] and kw["gpu_memory_utilization"] == 0.4 and kw["max_lora_rank"] == 16
    rounds = [[s for s in seen if s["name"] == f"policy-{r + 1}"] for r in range(3)]
    assert [len(r) for r in rounds] == [16, 16, 16] and len(seen) == 48
    assert len({r[0]["id"] for r in rounds}) == 3  # a new id each round: vLLM reloads the adapter
    assert all(len({s["seed"] for s in r}) == 16 for r in rounds)  # each completion its own seed
    for r in (1, 2):  # round r starts from the weights saved as checkpoint-r
        ckpt = load_file(os.path.join(res["run_dir"], f"checkpoint-{r}", "adapter_model.safetensors"))
        sent = rounds[r][0]["weights"]
        assert sent.keys() == ckpt.keys() and all((sent[k] == ckpt[k]).all() for k in ckpt)
    moved = rounds[0][0]["weights"]
    assert any(not (moved[k] == rounds[2][0]["weights"][k]).all() for k in moved)
    logged = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    assert len(logged) == 48 and _log(res["run_dir"])[0]["completions/clipped_ratio"] == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--vllm_mode", "server"], "--vllm_mode server needs the rollout server's --vllm_server_host"),
    (["--train_type", "full"], "syncing full weights into vLLM is not supported yet; use --train_type lora"),
    (["--lora_rank", "32"], "pass --vllm_max_lora_rank 32"),
    (["--vllm_enable_lora", "false"], "--vllm_enable_lora false"),
    ([], "--use_vllm true: vLLM is not installed; pip install 'vllm>=0.5.1' on a CUDA machine"),
])
def test_what_vllm_rollouts_cannot_do_is_a_flag_error(tiny_models, flags, message):
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               "--reward_funcs", "format", "--use_vllm", "true", *flags])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        recipe.configure(args)


@pytest.mark.slow
def test_dynamic_sample_replaces_the_groups_without_reward_differences(setup, tmp_path, monkeypatch):
    """DAPO's dynamic sampling: half the prompts get a constant reward (their groups teach nothing); with
    --dynamic_sample every trained group is one whose rewards differ, drawn again from the dataset."""
    model, _, _ = setup
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "flat": i % 2 == 0} for i in range(16)])
    (tmp_path / "half_rewards.py").write_text(
        "def half_flat(completions, completion_ids=None, flat=None, **kwargs):\n"
        "    return [1.0 if f else sum(t % 2 == 0 for t in ids) / max(len(ids), 1)\n"
        "            for ids, f in zip(completion_ids, flat)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--reward_funcs", "half_rewards.half_flat", "--max_steps", "2", "--save_strategy", "no",
              "--per_device_train_batch_size", "32", "--log_completions", "true"]
    plain = _grpo(model, data, tmp_path / "plain", *common)
    assert sum(r["frac_reward_zero_std"] for r in _log(plain["run_dir"])) / 2 >= 0.25
    dyn = _grpo(model, data, tmp_path / "dyn", *common, "--dynamic_sample", "true", "--max_resample_times", "8")
    log = _log(dyn["run_dir"])
    assert [r["frac_reward_zero_std"] for r in log] == [0.0, 0.0]
    trained = read_jsonl(os.path.join(dyn["run_dir"], "completions.jsonl"))
    assert len(trained) == 64 and all(int(r["prompt"][0]["content"].split()[-1]) % 2 for r in trained)


@pytest.mark.slow
def test_validation_prompts_are_sampled_and_scored_at_each_evaluation(setup, tmp_path):
    """--split_dataset_ratio (or --val_dataset) with GRPO: each evaluation samples G completions of every held-out
    prompt with the current weights and logs their rewards and loss (ms-swift's GRPO evaluation); nothing of it
    reaches the training log of completions. The split is kept in the run as val_dataset.jsonl, readable again."""
    model, data, plugin = setup
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--split_dataset_ratio", "0.25", "--max_steps", "2", "--save_steps", "1", "--eval_steps", "1",
                "--per_device_train_batch_size", "16", "--log_completions", "true")
    log = read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))
    evals = [r for r in log if "eval_loss" in r]
    assert [r["global_step"] for r in evals] == [1, 2]
    assert {"eval_reward", "eval_reward_std", "eval_rewards/EvenTokens/mean", "eval_completions/mean_length",
            "eval_frac_reward_zero_std"} <= set(evals[0])
    assert 0 <= evals[0]["eval_reward"] <= 1
    val = read_jsonl(os.path.join(res["run_dir"], "val_dataset.jsonl"))
    assert len(val) == 4 and all(r["solution"] == "even" and r["messages"][0]["role"] == "user" for r in val)
    logged = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    assert len(logged) == 2 * 16 and {r["round"] for r in logged} == {0, 1}
    held_out = {r["messages"][0]["content"] for r in val}
    assert not held_out & {r["prompt"][0]["content"] for r in logged}


@pytest.mark.slow
def test_a_round_overlong_filter_empties_is_reported(setup, tmp_path, capsys):
    """--overlong_filter with completions that all hit --max_completion_length: nothing is trained, and the run
    says so (once) with the fix, instead of logging a loss of 0 without a word."""
    model, data, plugin = setup
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--overlong_filter", "true", "--max_completion_length", "2", "--max_steps", "2",
                "--save_strategy", "no", "--per_device_train_batch_size", "16")
    err = capsys.readouterr().err
    assert err.count("every completion of this round reached --max_completion_length 2") == 1
    assert all(r["completions/clipped_ratio"] == 1.0 for r in _log(res["run_dir"]))


@pytest.mark.slow
def test_a_resume_inside_a_generation_round_trains_on_the_same_round(setup, tmp_path, capsys):
    """Two optimiser steps per round (--num_iterations 2, or --steps_per_generation): a checkpoint between them
    carries the round in progress, so the resumed run trains its second step on the very completions (and
    old log-probs) of the uninterrupted run — not on a round sampled again from the moved weights."""
    model, data, plugin = setup
    common = ["--external_plugins", plugin, "--reward_funcs", "even_tokens", "--learning_rate", "2e-2",
              "--max_steps", "4", "--save_steps", "1", "--per_device_train_batch_size", "16",
              "--num_iterations", "2", "--beta", "0.1"]
    full = _grpo(model, data, tmp_path / "full", *common)
    a = {r["global_step"]: r for r in _log(full["run_dir"])}
    for ckpt in ("checkpoint-1", "checkpoint-3"):  # inside rounds 0 and 1
        resumed = _grpo(model, data, tmp_path / f"from-{ckpt}", *common, "--resume_from_checkpoint",
                        os.path.join(full["run_dir"], ckpt))
        b = {r["global_step"]: r for r in _log(resumed["run_dir"])}
        for step in b:
            for key in ("loss", "reward", "kl", "grad_norm", "clip_ratio/region_mean"):
                assert abs(a[step][key] - b[step][key]) < 1e-5, (ckpt, step, key, a[step][key], b[step][key])
    assert "not the uninterrupted one" not in capsys.readouterr().err


@pytest.mark.slow
def test_prompts_are_fitted_to_max_length_before_training(setup, tmp_path, capsys):
    """--max_length bounds the prompt (ms-swift's GRPO): a longer prompt is dropped at start with a note (it used
    to stop the run mid-way), and the completion still gets its whole --max_completion_length on top."""
    model, _, plugin = setup
    rows = [{"messages": [{"role": "user", "content": f"say something {i}"}]} for i in range(16)]
    rows[5]["messages"][0]["content"] = "long " * 300
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--max_length", "40", "--max_completion_length", "12", "--max_steps", "2", "--save_strategy", "no",
                "--per_device_train_batch_size", "16", "--log_completions", "true")
    assert "1 prompt(s) longer than --max_length 40 tokens dropped" in capsys.readouterr().err
    log = _log(res["run_dir"])
    assert max(r["completions/max_length"] for r in log) == 12  # not cut to what 40 leaves after the prompt
    assert all("long long" not in r["prompt"][0]["content"] for r in
               read_jsonl(os.path.join(res["run_dir"], "completions.jsonl")))
    cfg, _ = recipe.configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model, "--dataset", data,
                                                   "--reward_funcs", "format"]))
    assert cfg.output.metric_for_best_model == "reward"  # ms-swift's default for GRPO (loss elsewhere)


@pytest.mark.slow
def test_non_finite_sampling_stops_like_a_non_finite_loss(setup, tmp_path, monkeypatch):
    """Diverged weights can break GRPO's sampling (inf/NaN probabilities) before any loss shows it: the run stops
    with the divergence message, and the checkpoint holding those weights is marked (diverged.json), as for a NaN
    loss — it used to end in the sampler's RuntimeError traceback."""
    import json

    from tunesmith.train import loop
    from tunesmith.train.rl.rollouts import Rollouts

    real = Rollouts._generate

    def failing(self, ids, seed, r, images=None):
        if self.rounds_done == 2:
            raise loop.NonFiniteSampling("probability tensor contains either inf, nan or element < 0")
        return real(self, ids, seed, r, images)

    monkeypatch.setattr(Rollouts, "_generate", failing)
    model, data, plugin = setup
    with pytest.raises(loop.TrainingDiverged) as e:
        _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
              "--max_steps", "4", "--save_steps", "1", "--per_device_train_batch_size", "16")
    msg = str(e.value)
    assert msg.startswith("sampling became impossible (probability tensor contains") and "step 3" in msg, msg
    assert "checkpoint-2 holds the weights that gave it" in msg and "checkpoint-1." in msg, msg
    run_dir = next((tmp_path / "out").iterdir())
    assert json.load(open(run_dir / "checkpoint-2" / "diverged.json"))["step"] == 3

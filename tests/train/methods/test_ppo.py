"""PPO (`tunesmith rlhf --rlhf_type ppo`): GAE equals an independent per-completion loop (and TRL's own loop where the
two layouts agree); the clipped policy and value losses, their statistics and gradients equal TRL's PPOTrainer
formulas on the same tensors; the per-token rewards and whitening are TRL's; ms-swift's flags parse with its
defaults and what PPO cannot do is one flag error; a tiny model's reachable reward rises by a stated margin with the
value loss and KL logged; a resumed run equals the uninterrupted one (inside a round and across rounds, value model
included); a reward model (full or a LoRA adapter of --rlhf_type rm) scores and starts the value model."""
import json
import os
import random

import pytest
import torch

from conftest import read_jsonl, train, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from fakes import EVEN_TOKENS_PLUGIN

pytestmark = pytest.mark.usefixtures("no_charts")

# a reward a random tiny model can climb: the share of its completion's tokens with an even id (ms-swift's plugin
# form, as tests/train/rl/test_grpo.py)
@pytest.fixture
def setup(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": "even"} for i in range(16)])
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EVEN_TOKENS_PLUGIN)
    return tiny_models("qwen2"), data, str(plugin)


def _ppo(model, data, out, *flags):
    return train("rlhf", "--rlhf_type", "ppo", "--model", model, "--dataset", data,
                 "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "16",
                 "--max_completion_length", "12", "--logging_steps", "1", "--report_to", "none",
                 "--output_dir", str(out), *flags)


def _log(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "objective/scores" in r]


# ------------------------------------------------------------------ the arithmetic against TRL's

def _batch(seed, b=5, c=7, full=False):
    """Random per-token tensors [b, c] and a mask of completions of random lengths (all c with full)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [c] * b if full else [int(torch.randint(1, c + 1, (1,), generator=g)) for _ in range(b)]
    mask = torch.tensor([[1.0] * n + [0.0] * (c - n) for n in lengths])
    return g, mask, lengths


def test_gae_equals_an_independent_loop_over_each_completion():
    """Each completion's advantages and returns from a plain Python loop over its own tokens (Schulman et al. 2016
    eq. 16, the state after the last token terminal): the same values (1e-6) in the padded batch."""
    from tunesmith.train.ops.gae import gae

    g, mask, lengths = _batch(0)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = (r[t] + 0.9 * v[t + 1] - v[t]) + 0.9 * 0.8 * running
            expected[t] = running
        assert torch.allclose(adv[i, :n], torch.tensor(expected), atol=1e-6)
        assert torch.allclose(ret[i, :n], torch.tensor(expected) + values[i, :n], atol=1e-6)
        assert not adv[i, n:].any() and not ret[i, n:].any()


def test_gae_equals_trls_loop_where_the_layouts_agree():
    """Completions that fill the batch's width (where TRL's score position and ours coincide): TRL 0.29's loop of
    PPOTrainer.train, verbatim, on the same rewards and values gives our advantages and returns."""
    from tunesmith.train.ops.gae import gae

    g, mask, _ = _batch(1, full=True)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    gamma, lam = 1.0, 0.95
    lastgaelam, advantages_reversed, gen_length = 0, [], rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    ours, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(ours, advantages, atol=1e-6) and torch.allclose(returns, advantages + values, atol=1e-6)


def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_masked_whiten(values, mask, shift_mean=True):
    """TRL 0.29's masked_whiten (unbiased masked variance), verbatim in substance."""
    mean = _trl_masked_mean(values, mask)
    var = _trl_masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def test_rewards_kl_and_whitening_are_trls():
    """k1 KL = log π − log π_ref at each token, the non-score reward −kl_coef·KL, the score added at the last token;
    masked whitening with and without the mean shift as TRL's (1e-6); k3 is (r − 1) − log r."""
    from tunesmith.train.ops import gae as G

    g, mask, lengths = _batch(2)
    logps, ref = -torch.rand(5, 7, generator=g) * 3, -torch.rand(5, 7, generator=g) * 3
    scores = torch.randn(5, generator=g)
    kl = G.kl_per_token(logps, ref, mask)
    assert torch.allclose(kl, (logps - ref) * mask)
    k3 = G.kl_per_token(logps, ref, mask, "k3")
    assert torch.allclose(k3, ((ref - logps).exp() - 1 - (ref - logps)) * mask, atol=1e-6)
    rewards = G.token_rewards(kl, scores, mask, 0.05)
    for i, n in enumerate(lengths):
        expected = -0.05 * kl[i].clone()
        expected[n - 1] += scores[i]
        assert torch.allclose(rewards[i], expected, atol=1e-6)
    x = torch.randn(5, 7, generator=g)
    for shift in (True, False):
        assert torch.allclose(G.masked_whiten(x, mask, shift)[mask.bool()],
                              _trl_masked_whiten(x, mask, shift)[mask.bool()], atol=1e-5)


def test_policy_and_value_losses_equal_trls_formulas_and_gradients():
    """TRL 0.29 PPOTrainer.train's micro-batch loss on the same tensors (its padding mask the complement of ours):
    pg_loss, vf_loss, both clip fractions, approxkl and the mean ratio (1e-6), and the gradients of pg + vf_coef·vf
    with respect to the new log-probs and values (1e-6)."""
    from tunesmith.train.ops.gae import policy_loss, value_loss

    g, mask, _ = _batch(3, full=True)
    new = (-torch.rand(5, 7, generator=g) * 2).requires_grad_()
    old = new.detach() + torch.randn(5, 7, generator=g) * 0.3
    adv, ret = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    vpred = torch.randn(5, 7, generator=g).requires_grad_()
    old_values = vpred.detach() + torch.randn(5, 7, generator=g) * 0.3
    pg, pst = policy_loss(new, old, adv, mask, 0.2)
    vf, vst = value_loss(vpred, old_values, ret, mask, 0.2)
    keep = mask  # TRL: ~padding_mask (and ~padding_mask_p1 for the value head, the same mask for full completions)
    vpredclipped = torch.clamp(vpred, old_values - 0.2, old_values + 0.2)
    vf_losses1, vf_losses2 = torch.square(vpred - ret), torch.square(vpredclipped - ret)
    trl_vf = 0.5 * _trl_masked_mean(torch.max(vf_losses1, vf_losses2), keep)
    logprobs_diff = new - old
    ratio = torch.exp(logprobs_diff)
    pg_losses, pg_losses2 = -adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)
    trl_pg = _trl_masked_mean(torch.max(pg_losses, pg_losses2), keep)
    assert abs(pg.item() - trl_pg.item()) < 1e-6 and abs(vf.item() - trl_vf.item()) < 1e-6
    assert abs(pst["clipfrac"] - _trl_masked_mean((pg_losses2 > pg_losses).float(), keep)) < 1e-6
    assert abs(vst["clipfrac"] - _trl_masked_mean((vf_losses2 > vf_losses1).float(), keep)) < 1e-6
    assert abs(pst["approxkl"] - 0.5 * (logprobs_diff ** 2).mean()) < 1e-6
    assert abs(pst["ratio"] - ratio.mean()) < 1e-6 and 0 < pst["clipfrac"] < 1 and 0 < vst["clipfrac"] < 1
    ours = torch.autograd.grad(pg + 0.1 * vf, (new, vpred))
    theirs = torch.autograd.grad(trl_pg + 0.1 * trl_vf, (new, vpred))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)


def test_padding_takes_no_part_in_the_losses():
    """Values at padded positions change neither loss: a micro-batch with padding equals its completions' own
    tokens only."""
    from tunesmith.train.ops.gae import policy_loss, value_loss

    g, mask, _ = _batch(4)
    t = [torch.randn(5, 7, generator=g) for _ in range(5)]
    noise = [x + 100 * (1 - mask) * torch.randn(5, 7, generator=g) for x in t]
    for a, b in ((t, noise),):
        assert abs(policy_loss(a[0], a[1], a[2], mask, 0.2)[0] - policy_loss(b[0], b[1], b[2], mask, 0.2)[0]) < 1e-6
        assert abs(value_loss(a[3], a[4], a[2], mask, 0.2)[0] - value_loss(b[3], b[4], b[2], mask, 0.2)[0]) < 1e-6


# ------------------------------------------------------------------ flags

def test_ms_swift_ppo_flags_parse_with_its_defaults():
    """ms-swift 4.6's PPOArguments defaults (arguments/rlhf_args.py), --response_length winning over
    --max_completion_length as its _init_max_completion_length does, and rlhf_type ppo among the choices."""
    args = parse_args("rlhf", ["--rlhf_type", "ppo"])
    assert (args.num_ppo_epochs, args.whiten_rewards, args.kl_coef, args.cliprange, args.vf_coef,
            args.cliprange_value, args.gamma, args.lam, args.num_mini_batches, args.local_rollout_forward_batch_size,
            args.num_sample_generations, args.response_length, args.missing_eos_penalty, args.temperature,
            args.max_completion_length) == (4, False, 0.05, 0.2, 0.1, 0.2, 1.0, 0.95, 1, 64, 10, None, None, 0.9, 512)
    from tunesmith.train.methods.ppo import PPO

    problems = []
    method = PPO.from_args(parse_args("rlhf", ["--rlhf_type", "ppo", "--reward_funcs", "format",
                                               "--response_length", "77", "--max_completion_length", "9"]), problems)
    assert problems == [] and method.max_completion_length == 77 and method.reward_weights == (1.0,)
    PPO.from_args(parse_args("rlhf", ["--rlhf_type", "ppo", "--reward_funcs", "format", "--response_length", "0"]),
                  problems)  # 0 is a length, not "unset": refused like --max_completion_length 0
    assert any("response_length" in p for p in problems), problems
    assert method.needs_reference and not PPO.from_args(
        parse_args("rlhf", ["--rlhf_type", "ppo", "--reward_funcs", "format", "--kl_coef", "0"]), []).needs_reference


@pytest.mark.parametrize("flags,message", [
    ([], "PPO needs a reward: --reward_model"),
    (["--reward_funcs", "format", "--cliprange", "0"], "--cliprange 0"),
    (["--reward_funcs", "format", "--gamma", "1.5"], "--gamma 1.5"),
    (["--reward_funcs", "format", "--num_ppo_epochs", "0"], "--num_ppo_epochs 0"),
    (["--reward_funcs", "format", "--num_mini_batches", "0"], "--num_mini_batches 0"),
    (["--reward_funcs", "format", "--reward_weights", "1", "2"], "give 1 finite weight"),
    (["--reward_funcs", "nope_reward"], "nope_reward"),
    (["--reward_funcs", "format", "--whiten_rewards", "true", "--per_device_train_batch_size", "2",
      "--gradient_accumulation_steps", "2"], "--whiten_rewards needs at least 8 completions"),
    (["--reward_funcs", "format", "--use_vllm", "true"], "--use_vllm with --rlhf_type ppo"),
    (["--reward_funcs", "format", "--train_type", "adalora"], "--train_type adalora is not supported yet"),
    (["--reward_funcs", "format", "--deepspeed", "zero2"], "PPO runs on one process for now"),
    (["--reward_funcs", "format", "--packing", "true", "--max_length", "64"], "--packing/--padding_free"),
    (["--reward_model", "a", "b"], "PPO takes one reward model"),
    (["--reward_model", "/no/such/folder"], "not a local checkpoint directory"),
])
def test_what_ppo_cannot_do_is_a_flag_error(tiny_models, tmp_path, flags, message):
    from tunesmith.train.recipe import configure

    args = parse_args("rlhf", ["--rlhf_type", "ppo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl", *flags,
                               "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        configure(args)


def test_a_lora_reward_model_with_full_training_is_refused(tmp_path):
    from tunesmith.train.rl.ppo_value import value_source

    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base", "task_type": "SEQ_CLS"}))
    from types import SimpleNamespace

    with pytest.raises(ConfigError, match="train with --train_type lora") as e:
        value_source(SimpleNamespace(train_type="full"), str(folder))
    assert "export" not in str(e.value)  # export does not merge a reward model's adapter: not suggested


# ------------------------------------------------------------------ training

@pytest.mark.slow
def test_ppo_raises_a_reachable_reward_with_value_loss_and_kl_logged(setup, tmp_path):
    """40 rounds of 32 rollouts (--num_ppo_epochs 1, full training, lr 1e-2): the mean score of the last 10 rounds
    is above the first 10's by MARGIN (measured on this machine: 0.515 -> 0.628, +0.11); value loss, KL (0 at the
    first round: the policy starts as the reference, then above 0) and TRL's other metrics are in logging.jsonl;
    the completions log holds every rollout; the last checkpoint holds the value model."""
    model, data, plugin = setup
    res = _ppo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
               "--train_type", "full", "--learning_rate", "1e-2", "--max_steps", "40", "--num_ppo_epochs", "1",
               "--per_device_train_batch_size", "32", "--save_steps", "40", "--log_completions", "true")
    log = _log(res["run_dir"])
    scores = [r["objective/scores"] for r in log]
    first, last = sum(scores[:10]) / 10, sum(scores[-10:]) / 10
    print(f"\nPPO mean score: first 10 rounds {first:.3f}, last 10 rounds {last:.3f}")
    assert last > first + MARGIN, (first, last)
    assert log[0]["objective/kl"] == 0.0 and max(r["objective/kl"] for r in log) > 0.1
    assert {"loss/value_avg", "loss/policy_avg", "objective/entropy", "objective/rlhf_reward",
            "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
            "val/clipfrac_avg", "val/ratio", "rewards/EvenTokens/mean", "completions/mean_length"} <= set(log[0])
    assert all(r["loss/value_avg"] > 0 for r in log) and log[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    rollouts = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    assert len(rollouts) == 40 * 32 and {"round", "prompt", "completion", "rewards", "reward"} <= set(rollouts[0])
    value = os.path.join(res["run_dir"], "checkpoint-40", "value_model")
    assert os.path.isfile(os.path.join(value, "model.safetensors")) and os.path.isfile(os.path.join(value,
                                                                                                    "optimizer.pt"))


MARGIN = 0.07


@pytest.mark.slow
def test_a_resumed_ppo_run_equals_the_uninterrupted_one(setup, tmp_path):
    """LoRA (policy and value model), 2 PPO epochs × 2 mini-batches per round (4 steps a round): resuming from
    checkpoint-2 (inside the first round: its rollouts come from the checkpoint) and from checkpoint-4 (a round's
    end) gives the uninterrupted run's losses, scores, KL and value losses at every later step (1e-5)."""
    model, data, plugin = setup
    common = ["--external_plugins", plugin, "--reward_funcs", "even_tokens", "--learning_rate", "2e-2",
              "--max_steps", "8", "--save_steps", "2", "--per_device_train_batch_size", "4",
              "--gradient_accumulation_steps", "2", "--num_ppo_epochs", "2", "--num_mini_batches", "2"]
    full = _ppo(model, data, tmp_path / "full", *common)
    a = {r["global_step"]: r for r in _log(full["run_dir"])}
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        resumed = _ppo(model, data, tmp_path / ckpt, *common,
                       "--resume_from_checkpoint", os.path.join(full["run_dir"], ckpt))
        b = {r["global_step"]: r for r in _log(resumed["run_dir"])}
        assert sorted(b) == list(range(1, 9))
        for step in range(int(ckpt.split("-")[1]) + 1, 9):
            for key in ("loss", "grad_norm", "objective/scores", "objective/kl", "loss/value_avg", "loss/policy_avg"):
                assert abs(a[step][key] - b[step][key]) < 1e-5, (ckpt, step, key, a[step][key], b[step][key])


def _reward_checkpoint(tiny_models, tmp_path, kind):
    """A reward model: `full`, the tiny model as a sequence classifier with a seeded score head, saved; `lora`, a
    --rlhf_type rm run's LoRA adapter (2 steps on random pairs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = tiny_models("qwen2")
    if kind == "full":
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
        folder = str(tmp_path / "rm-full")
        rm.save_pretrained(folder)
        AutoTokenizer.from_pretrained(model).save_pretrained(folder)
        return folder
    rng = random.Random(0)
    words = "red green blue cat dog sun".split()
    pairs = [{"messages": [{"role": "user", "content": rng.choice(words)},
                           {"role": "assistant", "content": rng.choice(words)}],
              "rejected_response": rng.choice(words)} for _ in range(8)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    res = train("rlhf", "--rlhf_type", "rm", "--model", model, "--dataset", pairs, "--train_type", "lora",
                "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
                "--output_dir", str(tmp_path / "rm"))
    return os.path.join(res["run_dir"], "checkpoint-2")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_reward_model_scores_and_starts_the_value_model(setup, tiny_models, tmp_path, kind):
    """--reward_model (ms-swift's PPO reward): the rollouts' scores are the reward model's own scores of the
    conversations (RewardModelScorer), and the value model starts as a trainable copy of it — a full classifier's
    score head equals the reward model's at the start; a LoRA adapter of --rlhf_type rm is continued. Validation
    prompts are sampled and scored at each evaluation (eval_objective/scores)."""
    from tunesmith.train.methods.rm import RewardModelScorer

    model, data, _ = setup
    rm = _reward_checkpoint(tiny_models, tmp_path, kind)
    seen = {}
    real = RewardModelScorer.__call__

    def spy(self, completions, messages=None, **kw):
        out = real(self, completions, messages=messages, **kw)
        seen.setdefault("scores", []).extend(out)
        return out
    RewardModelScorer.__call__ = spy
    try:
        res = _ppo(model, data, tmp_path / "out", "--reward_model", rm, "--train_type",
                   "full" if kind == "full" else "lora", "--max_steps", "2", "--num_ppo_epochs", "1",
                   "--val_dataset", data, "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no")
    finally:
        RewardModelScorer.__call__ = real
    log = _log(res["run_dir"])
    assert log[0]["objective/scores"] == pytest.approx(sum(seen["scores"][:16]) / 16, abs=1e-5)
    value = res["reference"].value
    assert "copy of the reward model" in value.describe
    if kind == "lora":
        assert "LoRA adapter continued" in value.describe and hasattr(value.model, "peft_config")
    records = read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))
    assert any("eval_objective/scores" in r for r in records)


@pytest.mark.slow
def test_the_value_model_starts_as_the_reward_models_copy(tiny_models, tmp_path):
    """A full reward model: before training, the value model's score head and every weight equal the reward
    model's, and the value of each completion token is the reward model's own score of the sequence before that
    token (the state it is sampled in)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.config.slices import ModelConfig, take
    from tunesmith.train.rl.ppo_value import build_value_model
    from tunesmith.train.recipe import configure

    rm = _reward_checkpoint(tiny_models, tmp_path, "full")
    args = parse_args("rlhf", ["--rlhf_type", "ppo", "--model", tiny_models("qwen2"), "--reward_model", rm,
                               "--train_type", "full", "--dataset", "x.jsonl", "--output_dir", str(tmp_path / "o")])
    cfg, _ = configure(args)
    tok = AutoTokenizer.from_pretrained(rm)
    value = build_value_model(take(ModelConfig, cfg.args), rm, tok, cfg.optim, torch.device("cpu"))
    ref = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    theirs = dict(ref.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in value.model.named_parameters())
    ids = torch.tensor([tok.encode("hello there friend")])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.ones(1, ids.shape[1] - 1)}
    with torch.no_grad():
        v = value.values(batch)  # completion token j's value: the state before it, prompt + tokens < j
        pooled = [float(ref(input_ids=ids[:, :k + 1]).logits[0, 0]) for k in range(ids.shape[1] - 1)]
    assert v.shape == (1, ids.shape[1] - 1) and torch.allclose(v[0], torch.tensor(pooled), atol=1e-5)


def test_data_validate_reads_ppo_rows_as_prompts(tmp_path):
    """`tunesmith data validate --rlhf_type ppo` reads rows as PPO does: GRPO's prompts (no reply needed)."""
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["data", "validate", "--dataset", data, "--rlhf_type", "ppo"]) == 0

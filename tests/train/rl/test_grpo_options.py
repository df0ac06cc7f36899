"""GRPO's further options wired into runs (#33): --kl_in_reward's defaults and its place in the advantages, the
engine's own log-probs for the rollout importance-sampling correction (equal to the training forward's under the
same weights), --num_generations_eval, --loss_type real/fipo/luspo end to end, --min_p in vLLM's kwargs. The formulas
themselves are checked in tests/train/ops/test_grpo_variants.py."""
import math
import os

import pytest

from conftest import read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe

pytestmark = pytest.mark.usefixtures("no_charts")

REWARD = ("def even_share(completions, completion_ids=None, **kwargs):\n"
          "    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]\n")


@pytest.fixture
def setup(tiny_models, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}]} for i in range(16)])
    (tmp_path / "variant_rewards.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tiny_models("qwen2"), data


def _grpo(model, data, out, *flags, reward=True):
    argv = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "4",
            "--per_device_train_batch_size", "16", "--max_completion_length", "8", "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--output_dir", str(out), *flags]
    if reward:
        argv += ["--reward_funcs", "variant_rewards.even_share"]
    return recipe.main(parse_args("rlhf", argv))


def _method(model_dir, *flags):
    return recipe.configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model_dir, "--dataset", "x.jsonl",
                                                "--reward_funcs", "format", *flags]))[1]


def test_kl_in_reward_defaults_follow_the_estimator_as_ms_swift(tiny_models):
    model = tiny_models("qwen2")
    assert _method(model).kl_in_reward is False
    assert _method(model, "--advantage_estimator", "rloo").kl_in_reward is True
    assert _method(model, "--advantage_estimator", "reinforce_plus_plus").kl_in_reward is True
    assert _method(model, "--advantage_estimator", "rloo", "--kl_in_reward", "false").kl_in_reward is False
    assert _method(model, "--kl_in_reward", "true").kl_in_reward is True
    assert _method(model, "--kl_in_reward", "true", "--scale_rewards", "gdpo").kl_in_reward is False
    real = _method(model, "--loss_type", "real", "--per_device_train_batch_size", "8", "--scale_rewards", "group")
    assert real.scale_rewards == "none" and real.variants.real_tau == 0.5
    fipo = _method(model, "--loss_type", "fipo", "--fipo_decay_rate", "16")
    assert fipo.variants.fipo_gamma == pytest.approx(2 ** (-1 / 16))


@pytest.mark.parametrize("flags,message", [
    (["--loss_type", "real", "--per_device_train_batch_size", "4"], "must be a multiple of --num_generations 8"),
    (["--loss_type", "real", "--per_device_train_batch_size", "8", "--split_dataset_ratio", "0.2",
      "--num_generations_eval", "3"], "--per_device_eval_batch_size 1 must be a multiple of the validation group"),
    (["--num_generations_eval", "0"], "num_generations_eval 0"),
    (["--min_p", "1.5"], "min_p 1.5"),
    (["--real_tau", "0"], "real_tau 0"),
    (["--rollout_importance_sampling_threshold", "0"], "rollout_importance_sampling_threshold 0"),
])
def test_bad_variant_flags_are_flag_errors(tiny_models, flags, message):
    with pytest.raises(ConfigError, match=message):
        _method(tiny_models("qwen2"), *flags)


@pytest.mark.slow
def test_kl_in_reward_moves_the_kl_into_the_rewards_and_the_advantages(setup, tmp_path):
    """rloo with β > 0 (kl_in_reward by default): the logged reward of each completion is its reward less β·KL, the
    advantages are the leave-one-out ones of those rewards, and kl is the mean summed KL (0 in the first round,
    when the policy is the reference)."""
    model, data = setup
    beta = 0.5
    res = _grpo(model, data, tmp_path / "out", "--advantage_estimator", "rloo", "--beta", str(beta),
                "--train_type", "full", "--learning_rate", "5e-3", "--max_steps", "3", "--log_completions", "true")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert log[0]["kl"] == 0 and log[-1]["kl"] != 0
    rows = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    last = [r for r in rows if r["round"] == 2]
    penalties = [r["rewards"]["even_share"] - r["reward"] for r in last]
    assert any(abs(p) > 1e-6 for p in penalties)  # the KL reached the rewards
    assert sum(penalties) / len(penalties) == pytest.approx(beta * log[-1]["kl"], rel=1e-3, abs=1e-6)
    for k in range(0, len(last), 4):
        group = [r["reward"] for r in last[k:k + 4]]
        for r, reward in zip(last[k:k + 4], group):
            assert r["advantage"] == pytest.approx((reward - sum(group) / 4) * 4 / 3, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_the_engines_log_probs_equal_the_training_forwards_and_the_correction_is_logged(setup, tmp_path,
                                                                                     monkeypatch):
    """Our engine's processed log-probs (temperature applied) of the sampled tokens equal the training forward's
    under the same weights, so with tunesmith's engine the rollout correction is ~1 and its diagnostics ~0; they
    are logged under ms-swift's names. (With --top_k/--top_p/--min_p the engine's distribution is the truncated
    one, as vLLM's processed_logprobs, so the two differ by its renormalisation.)"""
    import torch

    from tunesmith.train.rl import rollouts as R

    model, data = setup
    seen = []
    original = R.Rollouts._add_logps

    def spy(self, units):
        original(self, units)
        seen.extend(units)

    monkeypatch.setattr(R.Rollouts, "_add_logps", spy)
    res = _grpo(model, data, tmp_path / "out", "--rollout_importance_sampling_mode", "token_truncate",
                "--temperature", "0.7", "--max_steps", "2", "--num_iterations", "2",
                "--beta", "0")
    assert seen and all(len(u.rollout_logps) == len(u.completion_ids) == len(u.old_logps) for u in seen)
    gap = max(abs(a - b) for u in seen for a, b in zip(u.rollout_logps, u.old_logps))
    assert gap < 1e-4
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    names = {"rollout_correction/" + k for k in ("kl", "k3_kl", "training_ppl", "rollout_ppl", "chi2_token",
                                                  "chi2_seq", "ess", "is_weight_mean", "clipped_frac",
                                                  "log_ppl_diff_max")}
    assert names <= set(log[0])
    assert abs(log[0]["rollout_correction/kl"]) < 1e-4 and log[0]["rollout_correction/ess"] > 0.999
    assert log[0]["rollout_correction/training_ppl"] == pytest.approx(log[0]["rollout_correction/rollout_ppl"],
                                                                    rel=1e-3)
    assert torch.isfinite(torch.tensor(log[-1]["loss"]))


@pytest.mark.slow
def test_validation_samples_num_generations_eval_completions_per_prompt(setup, tmp_path, monkeypatch):
    from tunesmith.train.rl import rollouts as R

    model, data = setup
    sizes = []
    original = R.Rollouts.evaluation_units

    def spy(self, prompts):
        units = original(self, prompts)
        sizes.append((len(prompts), len(units)))
        return units

    monkeypatch.setattr(R.Rollouts, "evaluation_units", spy)
    res = _grpo(model, data, tmp_path / "out", "--split_dataset_ratio", "0.25", "--num_generations_eval", "2",
                "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--save_strategy", "steps")
    assert sizes == [(4, 8), (4, 8)]
    evals = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "eval_loss" in r]
    assert evals and math.isfinite(evals[0]["eval_reward"])


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,extra", [("real", []), ("fipo", ["--fipo_decay_rate", "4"]),
                                             ("luspo", ["--importance_sampling_level", "sequence"])])
def test_the_new_loss_types_train(setup, tmp_path, loss_type, extra):
    model, data = setup
    res = _grpo(model, data, tmp_path / "out", "--loss_type", loss_type, "--max_steps", "2", "--num_iterations", "2",
                "--off_policy_sequence_mask_delta", "0.05", *extra)
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    if loss_type == "fipo":
        assert {"fipo/future_kl_mean", "fipo/influence_weight_mean", "fipo/safety_keep_ratio"} <= set(log[0])


def test_vllm_rollouts_get_min_p_and_processed_log_probs():
    from tunesmith.config.slices import EngineConfig, take
    from tunesmith.inference.backends.vllm import VllmEngine
    from tunesmith.inference.engine import SamplingParams
    from tunesmith.train.rl.vllm_sync import processed_logprobs_config

    cfg = take(EngineConfig, parse_args("rlhf", ["--rlhf_type", "grpo", "--vllm_engine_kwargs",
                                                 '{"swap_space": 2}']))
    out = processed_logprobs_config(cfg)
    assert out.vllm_engine_kwargs == {"swap_space": 2, "logprobs_mode": "processed_logprobs"}
    engine = VllmEngine.__new__(VllmEngine)
    engine.stop_ids = set()
    kw = engine.sampling_kwargs(SamplingParams(max_new_tokens=4, temperature=0.9, min_p=0.1, logprobs=True))
    assert kw["min_p"] == 0.1 and kw["logprobs"] == 0


# ------------------------------------------------------------------ CHORD

def test_mu_schedule_is_a_warmup_then_a_cosine_decay():
    from tunesmith.train.rl.chord import mu_schedule

    warm, decay, peak, valley = 4, 10, 0.9, 0.1
    for step in range(20):
        if step < warm:
            want = step / warm * peak
        elif step >= warm + decay:
            want = valley
        else:
            want = valley + (peak - valley) * (1 + math.cos(math.pi * (step - warm) / decay)) / 2
        assert mu_schedule(step, warm, decay, peak, valley) == pytest.approx(want, rel=1e-15)
    assert mu_schedule(0, 0, 0, 0.5, 0.2) == 0.2 and mu_schedule(3, 0, 6, 0.5, 0.2) == pytest.approx(0.35)


@pytest.mark.parametrize("phi", [False, True])
def test_chord_sft_loss_equals_the_token_mean_cross_entropy_from_the_full_logits(tiny_models, phi):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.train.rl.chord import chord_sft_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"), dtype=torch.float32)
    ids = torch.tensor([[5, 9, 14, 3, 77, 2], [8, 8, 30, 41, 0, 0]])
    labels = torch.tensor([[-100, -100, 14, 3, 77, 2], [-100, 8, 30, 41, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (labels != -200).long() * torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
             "labels": labels}
    got = chord_sft_loss(model, batch, phi)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="none")
    keep = labels[:, 1:].reshape(-1) != -100
    ce = ce[keep]
    if phi:
        p = torch.exp(-ce)
        ce = ce * p * (1 - p)
    assert got.item() == pytest.approx(ce.mean().item(), rel=1e-5)


def test_chord_flags_need_the_mu_schedule(tiny_models):
    with pytest.raises(ConfigError, match="--chord_sft_dataset needs μ's schedule: give --chord_mu_peak"):
        _method(tiny_models("qwen2"), "--chord_sft_dataset", "x.jsonl", "--chord_mu_warmup_steps", "0",
                "--chord_mu_decay_steps", "10", "--chord_mu_valley", "0.1")
    m = _method(tiny_models("qwen2"), "--chord_sft_dataset", "x.jsonl", "--chord_mu_warmup_steps", "0",
                "--chord_mu_decay_steps", "10", "--chord_mu_peak", "0.5", "--chord_mu_valley", "0.1",
                "--per_device_train_batch_size", "8")
    assert (m.chord.batch_size, m.chord.peak, m.chord.phi) == (8, 0.5, False)


@pytest.mark.slow
def test_chord_mixes_sft_on_expert_rows_into_grpo_and_learns_them(setup, tmp_path):
    """μ = 1 throughout (peak = valley = 1): the GRPO term is weighted 0 and each step trains the expert rows'
    cross-entropy, which falls; chord/mu and chord/sft_loss are logged; a resumed run draws the same expert
    batches as the uninterrupted one (the stream's position is in the checkpoint)."""
    model, data = setup
    expert = write_jsonl(tmp_path / "expert.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"},
                      {"role": "assistant", "content": "two four six eight"}]} for i in range(6)])
    chord = ["--chord_sft_dataset", expert, "--chord_mu_warmup_steps", "0", "--chord_mu_decay_steps", "0",
             "--chord_mu_peak", "1", "--chord_mu_valley", "1", "--chord_sft_per_device_train_batch_size", "4",
             "--learning_rate", "3e-3", "--train_type", "full"]
    res = _grpo(model, data, tmp_path / "out", *chord, "--max_steps", "6", "--save_strategy", "steps",
                "--save_steps", "3")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert all(r["chord/mu"] == 1 for r in log)
    sft = [r["chord/sft_loss"] for r in log]
    assert sft[-1] < sft[0] - 0.5 and log[0]["loss"] == pytest.approx(sft[0], rel=1e-4)
    resumed = _grpo(model, data, tmp_path / "resumed", *chord, "--max_steps", "6", "--resume_from_checkpoint",
                    os.path.join(res["run_dir"], "checkpoint-3"))
    again = {r["global_step"]: r for r in read_jsonl(os.path.join(resumed["run_dir"], "logging.jsonl"))
             if "reward" in r}
    for r in log[3:]:
        assert again[r["global_step"]]["chord/sft_loss"] == pytest.approx(r["chord/sft_loss"], abs=1e-5)


# ------------------------------------------------------------------ OPD-RL (a teacher on GRPO)

def _teacher(model_dir, out):
    """A teacher with the tiny model's tokenizer and different weights (its output layer shifted by seeded noise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        head = teacher.get_output_embeddings().weight
        head.add_(torch.randn_like(head) * 2 * head.std())
    teacher.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("flags,message", [
    (["--loss_type", "fipo"], "OPD-RL\\) with --loss_type fipo"),
    (["--off_policy_sequence_mask_delta", "0.1"], "OPD-RL\\) with --off_policy_sequence_mask_delta"),
    (["--dynamic_sample", "true"], "--dynamic_sample without reward functions"),
])
def test_what_a_teacher_on_grpo_cannot_do_is_a_flag_error(tiny_models, flags, message):
    model = tiny_models("qwen2")
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model, "--dataset", "x.jsonl", "--teacher_model",
                               model, *flags])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)
    # pure distillation (a teacher, no reward function) is a GRPO run
    m = recipe.configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model, "--dataset", "x.jsonl",
                                             "--teacher_model", model, "--teacher_kl_coef", "0.5"]))[1]
    assert (m.teacher_model, m.teacher_kl_coef, m.reward_funcs) == (model, 0.5, ())


@pytest.mark.slow
def test_opd_rl_adds_the_teachers_log_ratio_to_each_tokens_advantage_and_moves_towards_it(setup, tmp_path,
                                                                                       monkeypatch):
    """OPD-RL's pure distillation (no reward function): each completion token's advantage is
    teacher_kl_coef · (log p_teacher − log p_policy) at --temperature — recomputed here from the two models — and
    teacher_kl is the token mean of the k3 distance of those log-ratios."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.train.rl import rollouts as R

    model, data = setup
    teacher = _teacher(model, tmp_path / "teacher")
    rounds = []
    original = R.Rollouts._round

    def spy(self, prompts, seed, r, training=True):
        units = original(self, prompts, seed, r, training)
        rounds.append(units)
        return units

    monkeypatch.setattr(R.Rollouts, "_round", spy)
    res = _grpo(model, data, tmp_path / "out", "--teacher_model", teacher, "--teacher_kl_coef", "0.5",
                "--train_type", "full", "--learning_rate", "1e-2", "--max_steps", "8", "--temperature", "1.0",
                "--beta", "0", reward=False)
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "teacher_kl" in r]
    assert len(log) == 8 and all(math.isfinite(r["loss"]) for r in log)
    gaps = [d for u in rounds[0] for d in u.teacher_gap]
    assert log[0]["teacher_kl"] == pytest.approx(sum(math.exp(d) - d - 1 for d in gaps) / len(gaps), rel=1e-4)
    units = rounds[0][:4]
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tmodel = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    for u in units:
        ids = torch.tensor([u.prompt_ids + u.completion_ids])
        n, p = len(u.completion_ids), len(u.prompt_ids)

        def logps(m):
            lp = torch.log_softmax(m(input_ids=ids).logits[0, p - 1:p - 1 + n].double(), -1)
            return lp.gather(-1, torch.tensor(u.completion_ids)[:, None]).squeeze(-1)

        want = 0.5 * (logps(tmodel) - logps(policy))
        assert u.advantage == 0.0  # no reward: the advantage is the teacher's signal alone
        assert torch.allclose(torch.tensor(u.token_advantages, dtype=torch.float64), want, atol=2e-4)


def test_the_teachers_per_token_signal_lowers_the_reverse_kl_to_the_teacher():
    """The OPD-RL advantage log p_teacher − log p_policy through grpo_loss is a score-function estimate of
    −∇ KL(π ‖ π_teacher): a free categorical policy trained with it moves to the teacher (toy, exact KL)."""
    import torch

    from tunesmith.train.ops import losses as L

    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(50) * 2, -1)
    logits = torch.zeros(50, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)

    def kl():
        lp = torch.log_softmax(logits, -1)
        return float((lp.exp() * (lp - teacher)).sum())

    start = kl()
    for _ in range(150):
        lp = torch.log_softmax(logits, -1)
        y = torch.multinomial(lp.exp().detach(), 256, replacement=True)
        tok = lp[y].unsqueeze(-1)  # [N, 1]: one-token completions
        adv = (teacher[y].unsqueeze(-1) - tok).detach()  # teacher_kl_coef 1
        loss, _ = L.grpo_loss("grpo", logps=tok, old_logps=tok.detach(), ref_logps=None, advantages=adv,
                              mask=torch.ones_like(tok), beta=0.0, epsilon_low=0.2, epsilon_high=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl() < 0.2 * start


# ------------------------------------------------------------------ self-distillation on a teacher_prompt (OPSD)

@pytest.fixture
def privileged(tmp_path):
    """Prompts whose teacher_prompt column (ms-swift's OPSD column) shows the answer."""
    return write_jsonl(tmp_path / "privileged.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}],
         "teacher_prompt": f"say something {i}; hint: use even tokens"} for i in range(16)])


def _spy_rounds(monkeypatch):
    from tunesmith.train.rl import rollouts as R

    rounds = []
    original = R.Rollouts._round

    def spy(self, prompts, seed, r, training=True):
        units = original(self, prompts, seed, r, training)
        rounds.append(units)
        return units

    monkeypatch.setattr(R.Rollouts, "_round", spy)
    return rounds


def _view_logps(model_dir, prompt_ids, completion_ids):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids + completion_ids])
    p, n = len(prompt_ids), len(completion_ids)
    lp = torch.log_softmax(m(input_ids=ids).logits[0, p - 1:p - 1 + n].double() / 0.9, -1)
    return lp.gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)


@pytest.mark.slow
def test_rlsd_reweights_by_the_policy_on_the_teacher_prompt(setup, privileged, tmp_path, monkeypatch):
    """--advantage_reweight rlsd without --teacher_model: the teacher is the policy itself on each row's
    teacher_prompt (dynamic self-distillation); each token's advantage is A·((1 − λ) + λ·clip(e^{sign(A)·Δ}))
    with Δ recomputed here from the model on the two prompts."""
    model, _ = setup
    rounds = _spy_rounds(monkeypatch)
    res = _grpo(model, privileged, tmp_path / "out", "--advantage_reweight", "rlsd", "--rlsd_lambda", "0.8",
                "--beta", "0", "--max_steps", "2")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert log[0]["rlsd_lambda"] == 0.8 and "teacher_kl" in log[0]
    for u in rounds[0][:3]:
        assert u.teacher_prompt_ids != u.prompt_ids
        gap = _view_logps(model, u.teacher_prompt_ids, u.completion_ids) - _view_logps(model, u.prompt_ids,
                                                                                      u.completion_ids)
        assert gap.tolist() == pytest.approx(u.teacher_gap, abs=2e-4)
        a = u.advantage
        want = [a * (0.2 + 0.8 * min(max(math.exp(math.copysign(1, a) * g), 0.8), 1.2)) for g in u.teacher_gap]
        assert u.token_advantages == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("flags,key", [(["--sdar_loss_coef", "0.1"], "sdar/gate_mean"),
                                       (["--teacher_kl_coef", "0.5"], "teacher_kl")])
def test_sdar_and_the_additive_signal_on_a_teacher_prompt(setup, privileged, tmp_path, monkeypatch, flags, key):
    """SDAR adds its gated loss (sdar/* logged, the advantages left per completion); without RLSD or SDAR the
    teacher_prompt column gives OPD-RL's additive signal A + coef·Δ (ms-swift's rule for such rows)."""
    model, _ = setup
    rounds = _spy_rounds(monkeypatch)
    res = _grpo(model, privileged, tmp_path / "out", *flags, "--max_steps", "2")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert key in log[0] and all(math.isfinite(r["loss"]) for r in log)
    u = rounds[0][0]
    if key == "teacher_kl":
        assert u.token_advantages == pytest.approx([u.advantage + 0.5 * g for g in u.teacher_gap], rel=1e-9)
    else:
        assert u.token_advantages is None and len(u.teacher_logps) == len(u.completion_ids)
        assert 0 < log[0]["sdar/gate_mean"] < 1 and log[0]["sdar/coef"] == 0.1


def test_a_teacher_prompt_with_a_per_completion_loss_is_refused(setup, privileged, tmp_path):
    model, _ = setup
    with pytest.raises(ConfigError, match="teacher_prompt column.*--loss_type fipo"):
        _grpo(model, privileged, tmp_path / "out", "--loss_type", "fipo", "--max_steps", "1")
    with pytest.raises(ConfigError, match="--advantage_reweight rlsd needs --reward_funcs"):
        _grpo(model, privileged, tmp_path / "out2", "--advantage_reweight", "rlsd", "--teacher_model", model,
              reward=False)

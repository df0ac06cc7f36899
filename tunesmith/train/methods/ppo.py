"""The PPO method (`tunesmith rlhf --rlhf_type ppo`): Proximal Policy Optimization (Schulman et al. 2017,
arXiv:1707.06347) for language models as TRL's PPOTrainer runs it under ms-swift (Ziegler et al. 2019; Ouyang et
al. 2022), with ms-swift's flags and defaults: --num_ppo_epochs 4, --whiten_rewards false, --kl_coef 0.05,
--cliprange 0.2, --vf_coef 0.1, --cliprange_value 0.2, --gamma 1.0, --lam 0.95, --num_mini_batches 1,
--local_rollout_forward_batch_size 64, --temperature 0.9, --max_completion_length 512 (--response_length, its
deprecated name, wins when given), --missing_eos_penalty none.

Each round, as TRL's PPOTrainer.train:
1. Take round_size = per-device batch × gradient_accumulation_steps × --num_mini_batches prompts (the dataset's
   conversations without their final reply, which becomes `solution` for reward functions), in a seeded order.
2. Sample one completion of each with the policy's current weights (LoRA included) through the generation engine,
   each with its own seed (exact resume).
3. Score each: --reward_model (a --rlhf_type rm checkpoint, ms-swift's way) and/or --reward_funcs (GRPO's reward
   functions), combined with --reward_weights; --missing_eos_penalty off a completion cut at the length limit.
4. Without gradient: the sampling policy's log-probs and the reference's (at --temperature), and the value
   model's values (train/rl/ppo_value.py: a trainable copy of the reward model, ms-swift's value model).
5. Per-token rewards −kl_coef · KL (k1) plus the score at the last token, GAE advantages and returns, the
   advantages whitened over the round (train/ops/gae.py).
6. --num_ppo_epochs passes over the round, each in a fresh seeded order, each pass --num_mini_batches optimiser
   steps (per-device batch × gradient_accumulation_steps completions each); the loss of a micro-batch is TRL's:
   clipped policy surrogate + vf_coef · clipped value loss, each a mean over its completion tokens; the loop
   averages over the step's micro-batches. The value model steps with its own optimiser after the policy's.

Logged under TRL's names: objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward,
objective/scores, policy/approxkl_avg, policy/clipfrac_avg, policy/entropy_avg, loss/policy_avg, loss/value_avg,
val/clipfrac_avg, val/ratio, plus rewards/<function>/mean and completions/mean_length, clipped_ratio.

Differences from TRL, each on purpose: --num_mini_batches adds optimiser steps per pass (PPO's minibatch SGD)
instead of splitting TRL's batch of per-device × accumulation completions, whose gradients TRL's accelerate
accumulation then sums into one update anyway; the learning-rate schedule moves per optimiser step, not per round;
the score sits on a completion's last token (see ops/gae.py); one process only for now.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

from tunesmith.config.checks import between
from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.train import loop
from tunesmith.train.setup import Batches


@dataclass
class PPORun:
    """What a PPO run trains against: the reference (None at --kl_coef 0), the value model, the rollouts."""
    reference: Any
    value: Any
    rollouts: Any

    @property
    def describe(self) -> str:
        """The reference and the value model, as the log header shows them."""
        ref = self.reference.describe if self.reference is not None else "none (--kl_coef 0: no KL penalty)"
        return f"reference: {ref}; value model: {self.value.describe}"


def ppo_loss(method: "PPO", run: PPORun, model, batch: dict) -> tuple[dict, dict]:
    """({"micro_batches": this micro-batch's loss}, summed statistics) for one micro-batch of `ppo_collate`:
    pg + vf_coef · vf, with pg the clipped surrogate over the completion tokens (log-probs at --temperature) and vf
    the clipped value loss (ops/gae.py), each a mean over the micro-batch's completion tokens (TRL's
    masked_mean); statistics per micro-batch (averaged over micro-batches in the log, as TRL) and per completion."""
    from tunesmith.train.ops import gae as G
    from tunesmith.train.rl.units import completion_logps_and_entropy

    mask = batch["completion_mask"]
    logps, entropy = completion_logps_and_entropy(model, batch, method.temperature)
    pg, pst = G.policy_loss(logps.float(), batch["old_logps"], batch["advantages"], mask, method.cliprange)
    vpred = run.value.values(batch)
    vf, vst = G.value_loss(vpred, batch["values"], batch["returns"], mask, method.cliprange_value)
    loss = pg + method.vf_coef * vf
    stats = {"micro_batches": 1, "pg_loss": float(pg.detach()), "vf_loss": float(vf.detach()),
             "pg_clipfrac": float(pst["clipfrac"]), "approxkl": float(pst["approxkl"]), "ratio": float(pst["ratio"]),
             "vf_clipfrac": float(vst["clipfrac"]),
             "token_entropy": float(G.masked_mean(entropy, mask))}
    stats.update({k: float(v) for k, v in batch["stats"].items()})
    return {"micro_batches": loss}, stats


def ppo_metrics(st: dict) -> dict:
    """TRL's PPO metrics from the summed statistics: per completion (objective/*: kl and entropy summed over a
    completion's tokens, nats; scores and rewards), per micro-batch (policy/*, loss/*, val/*), rewards/<function>/
    mean, completions/mean_length (tokens) and clipped_ratio (share cut at --max_completion_length)."""
    n, mb = max(st.get("n", 0), 1), max(st.get("micro_batches", 0), 1)
    out = {}
    if st.get("n"):
        out.update({"objective/kl": loop.signif(st["kl"] / n), "objective/entropy": loop.signif(st["entropy"] / n),
                    "objective/non_score_reward": loop.signif(st["non_score_reward"] / n),
                    "objective/rlhf_reward": loop.signif((st["non_score_reward"] + st["score"]) / n),
                    "objective/scores": loop.signif(st["score"] / n)})
    for key, name in (("approxkl", "policy/approxkl_avg"), ("pg_clipfrac", "policy/clipfrac_avg"),
                      ("token_entropy", "policy/entropy_avg"), ("pg_loss", "loss/policy_avg"),
                      ("vf_loss", "loss/value_avg"), ("vf_clipfrac", "val/clipfrac_avg"), ("ratio", "val/ratio")):
        if key in st:
            out[name] = loop.signif(st[key] / mb)
    for k, v in st.items():
        if k.startswith("rewards/") and k.endswith("/sum"):
            name = k[len("rewards/"):-len("/sum")]
            count = st.get(f"rewards/{name}/count", 0)
            out[f"rewards/{name}/mean"] = round(v / count, 6) if count else float("nan")
    if st.get("n"):
        out["completions/mean_length"] = round(st["length"] / n, 2)
        out["completions/clipped_ratio"] = round(st["clipped"] / n, 4)
    return out


def _count(batch: dict) -> dict:
    return {"micro_batches": 1}


@dataclass(frozen=True)
class PPO:
    """PPO on prompts: a policy, a value model, a reference (--kl_coef > 0), a reward model or functions."""
    num_ppo_epochs: int
    whiten_rewards: bool
    kl_coef: float
    cliprange: float
    vf_coef: float
    cliprange_value: float
    gamma: float
    lam: float
    num_mini_batches: int
    local_rollout_forward_batch_size: int
    max_completion_length: int
    temperature: float
    reward_funcs: tuple
    reward_weights: tuple                     # one per --reward_funcs, then one for --reward_model
    external_plugins: tuple
    reward_args: Any
    reward_models: tuple = ()
    missing_eos_penalty: Optional[float] = None
    ref_model: Optional[str] = None
    ref_adapters: tuple = ()
    log_completions: bool = False
    kl_estimator = "k1"                       # TRL's default; ms-swift does not expose kl_estimator
    name = "ppo"
    best_metric = None                        # ms-swift: no metric_for_best_model for ppo
    head = "causal_lm"
    rows = "prompt"
    default_loss_scale = "last_round"

    @property
    def needs_reference(self) -> bool:
        """A reference for the KL penalty (--kl_coef > 0)."""
        return self.kl_coef != 0

    @classmethod
    def from_args(cls, args, problems: list) -> "PPO":
        """PPO's flags with ms-swift's defaults, checked (every problem appended); --response_length wins over
        --max_completion_length (ms-swift's _init_max_completion_length). Reward functions are resolved here, so a
        bad name or plugin is a flag problem before anything loads."""
        from tunesmith.train.rl.grpo import _reward_args

        length = args.max_completion_length if args.response_length is None else args.response_length
        between(problems, "num_ppo_epochs", args.num_ppo_epochs, 1, None)
        between(problems, "num_mini_batches", args.num_mini_batches, 1, None)
        between(problems, "local_rollout_forward_batch_size", args.local_rollout_forward_batch_size, 1, None)
        between(problems, "kl_coef", args.kl_coef, 0, None)
        between(problems, "cliprange", args.cliprange, 0, None, lo_open=True)
        between(problems, "vf_coef", args.vf_coef, 0, None)
        between(problems, "cliprange_value", args.cliprange_value, 0, None, lo_open=True)
        between(problems, "gamma", args.gamma, 0, 1)
        between(problems, "lam", args.lam, 0, 1)
        between(problems, "temperature", args.temperature, 0, None, lo_open=True)
        between(problems, "max_completion_length" if args.response_length is None else "response_length", length,
                1, None)
        if args.missing_eos_penalty is not None:
            between(problems, "missing_eos_penalty", args.missing_eos_penalty, 0, None)
        reward_args = _reward_args(args)
        funcs, specs = _reward_problems(args, reward_args, problems)
        _ppo_problems(args, problems)
        return cls(args.num_ppo_epochs, args.whiten_rewards, args.kl_coef, args.cliprange, args.vf_coef,
                   args.cliprange_value, args.gamma, args.lam, args.num_mini_batches,
                   args.local_rollout_forward_batch_size, length, args.temperature, tuple(funcs),
                   tuple(args.reward_weights or [1.0] * (len(funcs) + len(args.reward_model))),
                   tuple(args.external_plugins), reward_args, specs, args.missing_eos_penalty,
                   args.ref_model, tuple(args.ref_adapters), args.log_completions)

    def resolved_flags(self) -> dict:
        """The lengths and weights as applied, for args.json."""
        return {"max_completion_length": self.max_completion_length, "response_length": self.max_completion_length,
                "reward_weights": list(self.reward_weights), "beta": None, "rpo_alpha": None}

    def shape_records(self, loaded):
        """Each record as a prompt, as GRPO reads them (grpo.prompt_record: the final reply becomes `solution`)."""
        from tunesmith.data.load import map_records
        from tunesmith.train.rl.grpo import prompt_record

        return map_records(loaded, prompt_record)

    def batches(self, cfg, prepared, model, reference) -> Batches:
        """The rollouts (generated as the loop reads them), their collator, the value model; dropout off in the
        policy (an unchanged policy's ratio must be exactly 1). Raises ConfigError for a vision-language model."""
        from tunesmith.models.load import default_device
        from tunesmith.train.reference import disable_dropout
        from tunesmith.train.rl.ppo_rollouts import PPORollouts, PPOValidation, ppo_collate
        from tunesmith.train.rl.ppo_value import build_value_model

        if prepared.encoder.images is not None:
            raise ConfigError("--rlhf_type ppo on a vision-language model is not supported yet (the value model and "
                              "the rollouts would need the pictures); train a text model, or use --rlhf_type grpo")
        disable_dropout(model, has_reference=self.needs_reference)
        value = build_value_model(cfg.model, self.reward_models[0] if self.reward_models else None,
                                  prepared.tokenizer, cfg.optim, default_device(),
                                  resume_optimizer=not cfg.output.resume_only_model)
        rollouts = PPORollouts(self, prepared.train_rows, model, prepared.tokenizer, reference, value, cfg)
        val = PPOValidation(rollouts, prepared.eval_rows) if prepared.eval_rows else []
        return Batches(rollouts, val, partial(ppo_collate, pad_id=rollouts.pad), PPORun(reference, value, rollouts),
                       on_run_dir=rollouts.log_to, hooks=(rollouts, value))

    def objective(self, reference: PPORun, cfg) -> loop.Objective:
        """The PPO loss per micro-batch, averaged over the step's micro-batches; the value model's update after
        each policy update."""
        return loop.Objective("ppo", loss=partial(ppo_loss, self, reference), count=_count, metrics=ppo_metrics,
                              after_update=(reference.value.update,))

    def header(self, prepared, batches) -> str:
        """The run's header: the loss settings, the rewards, the reference and value model, the rounds."""
        train = batches.train
        names = ", ".join(f"{f.spec}×{w:g}" for f, w in zip(train.reward_fns, self.reward_weights))
        return (f"[tunesmith] rlhf ppo: {self.num_ppo_epochs} epochs × {self.num_mini_batches} mini-batch(es) per "
                f"round, cliprange {self.cliprange:g}, vf_coef {self.vf_coef:g} (cliprange_value "
                f"{self.cliprange_value:g}), kl_coef {self.kl_coef:g}, γ {self.gamma:g}, λ {self.lam:g}, temperature "
                f"{self.temperature:g}, max_completion_length {self.max_completion_length}\n"
                f"[tunesmith] rewards: {names}\n[tunesmith] {batches.reference.describe}\n"
                f"[tunesmith] {len(train.prompts)} prompts; {train.round_size} completions per round")


def _reward_problems(args, reward_args, problems: list) -> tuple:
    """(the --reward_funcs, resolved now; the --reward_model specs, reward_models.reward_model_specs) with their
    checks: at least one reward, one reward model at most (ms-swift's rule for ppo: its copy is the value model) with
    one --reward_adapters at most (the value model continues it), one weight per reward."""
    from tunesmith.train.rl.grpo import _checked_rewards
    from tunesmith.train.rl.ppo_value import is_adapter_folder
    from tunesmith.train.rl.reward_models import reward_model_specs

    n = len(args.reward_funcs) + len(args.reward_model)
    if n == 0:
        problems.append("PPO needs a reward: --reward_model (a --rlhf_type rm checkpoint, as ms-swift; it also "
                        "starts the value model) or --reward_funcs (GRPO's reward functions, e.g. a plugin's)")
        return [], ()
    if len(args.reward_model) > 1:
        problems.append(f"--reward_model: PPO takes one reward model (ms-swift's rule; its copy is the value "
                        f"model), {len(args.reward_model)} given; combine other rewards with --reward_funcs")
    specs = reward_model_specs(args, problems, plugins=False)
    if len(args.reward_adapters) > 1:
        problems.append(f"--reward_adapters: PPO's value model continues the reward model's one LoRA adapter; "
                        f"{len(args.reward_adapters)} given: pass one (GRPO merges several into its reward model)")
    elif args.reward_adapters and args.reward_model and is_adapter_folder(args.reward_model[0]):
        problems.append(f"--reward_model {args.reward_model[0]} is a LoRA adapter, and --reward_adapters "
                        f"{args.reward_adapters[0]} another: PPO's value model continues one adapter, so it cannot "
                        f"start from both; pass one of them (the adapter alone as --reward_model, or its base as "
                        f"--reward_model with --reward_adapters); GRPO merges both into its reward model")
    if args.reward_weights and (len(args.reward_weights) != n or not all(map(math.isfinite, args.reward_weights))):
        problems.append(f"--reward_weights {' '.join(map(str, args.reward_weights))}: give {n} finite weight(s), one "
                        f"per --reward_funcs, then one for --reward_model")
    return (_checked_rewards(args, reward_args, problems) if args.reward_funcs else []), specs


def _ppo_problems(args, problems: list) -> None:
    """What PPO cannot run with, each one problem; GRPO's sampling flags that change nothing here, a note."""
    from tunesmith.train.config import _zero3

    if args.train_type not in ("lora", "full"):
        problems.append(f"--rlhf_type ppo with --train_type {args.train_type} is not supported yet (the value model "
                        f"is trained with the policy's tuner): use lora or full")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or args.deepspeed or args.fsdp or _zero3(args.deepspeed):
        problems.append("PPO runs on one process for now (the value model trains beside the policy with its own "
                        "optimiser, which DDP, DeepSpeed and FSDP would not synchronise); drop --deepspeed/--fsdp "
                        "and run a single process")
    if args.async_generate:
        problems.append("--async_generate true with --rlhf_type ppo: asynchronous rounds are GRPO's (--vllm_mode "
                        "server); PPO samples in the training process; drop the flag")
    if args.use_vllm:
        problems.append("--use_vllm with --rlhf_type ppo is not supported (ms-swift samples PPO's rollouts with "
                        "transformers too); drop --use_vllm")
    if args.packing or args.padding_free:
        problems.append("--packing/--padding_free: PPO trains on its generated completions, padded; drop the flag")
    if args.sync_ref_model:
        problems.append("--sync_ref_model with --rlhf_type ppo is not supported yet; drop the flag")
    if args.whiten_rewards:
        gas = args.gradient_accumulation_steps or max(1, math.ceil(16 / max(args.per_device_train_batch_size, 1)))
        if args.per_device_train_batch_size * gas < 8:
            problems.append(f"--whiten_rewards needs at least 8 completions per optimiser step (TRL's rule), "
                            f"{args.per_device_train_batch_size} × {gas} given: raise --per_device_train_batch_size "
                            f"or --gradient_accumulation_steps")
    ignored = [f"--{k}" for k, v in (("top_p", args.top_p), ("top_k", args.top_k),
                                     ("repetition_penalty", args.repetition_penalty), ("loss_type", args.loss_type),
                                     ("beta", args.beta), ("num_generations", args.num_generations != 8),
                                     ("num_iterations", args.num_iterations != 1),
                                     ("steps_per_generation", args.steps_per_generation)) if v]
    if ignored:
        note(f"--rlhf_type ppo: {', '.join(ignored)} change nothing here (TRL's PPOTrainer samples one completion "
             f"per prompt at --temperature with no top-k/top-p cut; its loss has no β: --kl_coef weighs the KL)")

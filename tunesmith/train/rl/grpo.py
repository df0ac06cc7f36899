"""The GRPO method (`tunesmith rlhf --rlhf_type grpo`): reinforcement learning from reward functions (GRPO, Shao et
al. 2024, arXiv:2402.03300), with ms-swift's flags and defaults.

Each generation round, as ms-swift's and TRL's GRPOTrainer:
1. Take generation_batch_size / G prompts (the dataset's conversations without their final reply, which becomes
   `solution` for the rewards), in a seeded shuffled order.
2. Sample G completions of each with the policy's current weights (LoRA included) through the generation engine,
   batched; each completion has its own seed, so a round depends only on the weights and the seed (exact resume).
3. Score them with every reward function, combine with --reward_weights, and turn the rewards into advantages
   within each group (`losses.group_advantages`).
4. Log-probs of the completions under the sampling policy (when it changes before they are trained on:
   --num_iterations > 1 or --steps_per_generation > --gradient_accumulation_steps) and under the reference (β > 0).
5. Train on the round's completions: --steps_per_generation micro-batches, --num_iterations times, with the
   clipped surrogate of `losses.grpo_loss` (with --top_entropy_quantile < 1, its policy-gradient term on the
   micro-batch's high-entropy tokens only: `entropy_terms`).

The units the loop reads are completions (`Rollouts.epoch`): the loop cuts them into micro-batches like a stream's
rows, and each micro-batch's loss terms are divided by their units over the whole step, as for every method.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

from tunesmith.data.load import LoadResult, map_records
from tunesmith.errors import ConfigError, DataError
from tunesmith.log import note
from tunesmith.train import loop
from tunesmith.config.checks import between
from tunesmith.train.rl.chord import ChordSpec, with_chord
from tunesmith.train.rl.variants import (PER_BATCH, grpo_teacher, sdar_terms, teacher_fields, variant_fields,
                                         variant_metrics)
from tunesmith.train.setup import Batches
from tunesmith.train.rl.reward_models import reward_model_specs
from tunesmith.train.rl.rollout_client import async_problems, server_config, server_problems

# how each loss type's scalar becomes a summed term and its unit (the loop divides by the units of the whole step):
# grpo/sapo/dr_grpo average over completions, bnpo over micro-batches (ms-swift normalises each micro-batch by its
# own tokens), dapo/cispo over the completion tokens of the step
_UNIT = {"grpo": "completions", "sapo": "completions", "dr_grpo": "completions", "bnpo": "micro_batches",
         "dapo": "tokens", "cispo": "tokens", "fipo": "tokens", "real": "micro_batches", "luspo": "completions"}
_DEFAULT_SCALE = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}


def prompt_record(rec: dict, src: tuple) -> list[dict]:
    """A dataset record as a GRPO prompt: the conversation up to the last user (or tool) turn; a final assistant
    reply, when there is one, is dropped and its text kept as `solution` (unless the row has a `solution` column).
    The row's other columns stay under "columns" for the reward functions. Raises DataError when no prompt is left."""
    messages = list(rec["messages"])
    columns = dict(rec.get("columns") or {})
    if messages and messages[-1]["role"] == "assistant":
        reply = messages.pop()
        columns.setdefault("solution", reply.get("content") or "")
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise DataError(src[0], src[1], "messages", "has no prompt to complete: GRPO generates the reply to the "
                        "last user message.", "end each row's messages with the user's turn (a final assistant "
                        "reply is taken as the solution).")
    out = {"messages": messages, "columns": columns}
    if rec.get("tools"):
        out["tools"] = rec["tools"]
    if rec.get("images"):  # the prompt's pictures (a vision-language model samples with them)
        out["images"] = rec["images"]
    return [out]


def grpo_loss_terms(method: "GRPO", reference, model, batch: dict) -> tuple[dict, dict]:
    """({unit: summed loss term}, summed statistics) of one micro-batch from `grpo_collate`. The policy's
    per-token entropy comes from the same forward when --log_entropy or --top_entropy_quantile < 1 ask for it
    (ms-swift's compute_entropy); the entropy mask multiplies only the policy-gradient term (`entropy_terms`).
    Added terms, as ms-swift adds them after the policy loss: SDAR's (--sdar_loss_coef, unit sdar_batches), then
    CHORD's mix (--chord_sft_dataset, training only: every term × (1 − μ), + μ·SFT in chord_batches)."""
    from tunesmith.train.ops import losses as L
    from tunesmith.train.rl.units import completion_logps, completion_logps_and_entropy

    mask = batch["completion_mask"]
    entropy_mask, entropy_stats = None, {}
    if method.log_entropy or method.top_entropy_quantile < 1.0:
        logps, entropy = completion_logps_and_entropy(model, batch, method.temperature)
        entropy_mask, entropy_stats = entropy_terms(method, entropy, mask)
    else:
        logps = completion_logps(model, batch, method.temperature)
    logps = logps.float()
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()
    ntok = mask.sum()
    loss, metrics = L.grpo_loss(method.loss_type, logps=logps, old_logps=old, ref_logps=batch.get("ref_logps"),
                                advantages=batch["advantages"].float(), mask=mask, beta=method.beta,
                                epsilon_low=method.epsilon, epsilon_high=method.epsilon_high, delta=method.delta,
                                importance_sampling_level=method.importance_sampling_level,
                                max_completion_length=method.max_completion_length, num_items_in_batch=ntok,
                                entropy_mask=entropy_mask, tau_pos=method.tau_pos, tau_neg=method.tau_neg,
                                variants=method.variants, rollout_logps=batch.get("rollout_logps"))
    unit = _UNIT[method.loss_type]
    terms = {unit: loss * _count(method, batch)[unit]}
    if "teacher_logps" in batch and method.distill.sdar_coef > 0:  # SDAR: + coef · the gated distillation loss
        terms, metrics = sdar_terms(method.distill, logps, batch, terms, metrics)
    if "chord" in batch and model.training:  # CHORD: (1 − μ)·GRPO + μ·SFT on expert rows (train/rl/chord.py)
        from tunesmith.train.rl.chord import chord_terms

        terms, chord_metrics = chord_terms(batch["chord"], model, terms, logps.device)
        metrics = {**metrics, **chord_metrics}
    stats = {k: float(v) for k, v in batch["stats"].items()}
    stats["tokens"] = float(ntok)
    for k, v in metrics.items():
        if k.startswith(PER_BATCH):  # one value per micro-batch, averaged over those logged (ms-swift's log())
            stats[f"{k}/sum"], stats[f"{k.split('/')[0]}/batches"] = float(v), 1
        else:
            stats[k] = float(v) * float(ntok)  # token means, weighted by this batch's tokens
    stats.update(entropy_stats)
    return terms, stats


def entropy_terms(method: "GRPO", entropy, mask) -> tuple:
    """(entropy mask [B, C] float or None, statistics) of one micro-batch from its completion tokens' entropies
    [B, C] (nats; mask [B, C] the completion mask).

    --top_entropy_quantile q < 1: `losses.high_entropy_mask` with the threshold over the completion tokens of the
    micro-batch on every process (gathered: the same threshold as one process with the global batch, TRL 0.29
    grpo_trainer.py:986-1002; ms-swift 4.6 takes each process's own, grpo_trainer.py:958-962); entropy/threshold is
    that threshold. --log_entropy: over the micro-batch's completions (every process) with at least one token,
    the mean, max and min of each completion's mean token entropy (ms-swift grpo_trainer.py:945-956: nanmean per
    completion, gathered, then nanmean/nanmax/nanmin). Each is one value per micro-batch, averaged over the
    micro-batches logged (ms-swift's log()); they are counted on the main process only, so summing the statistics
    over processes leaves them whole."""
    from tunesmith.train import distributed as D
    from tunesmith.train.ops import losses as L

    keep, stats, main = mask.bool(), {}, D.is_main()
    entropy = entropy.detach().float()
    if method.log_entropy:
        n = keep.sum(-1)
        per_completion = D.gather_cat(((entropy * keep).sum(-1) / n.clamp(min=1))[n > 0])
        if per_completion.numel() and main:
            stats.update({"entropy/batches": 1, "entropy/mean_sum": float(per_completion.mean()),
                          "entropy/max_sum": float(per_completion.max()),
                          "entropy/min_sum": float(per_completion.min())})
    if method.top_entropy_quantile >= 1.0:
        return None, stats
    high, threshold = L.high_entropy_mask(entropy, keep, method.top_entropy_quantile,
                                          values=D.gather_cat(entropy[keep]))
    if threshold is not None and main:
        stats.update({"entropy/threshold_batches": 1, "entropy/threshold_sum": float(threshold)})
    return high.to(mask.dtype), stats


def _count(method: "GRPO", batch: dict) -> dict:
    """{the loss type's unit: how many in this batch} (completions, 1 micro-batch, or completion tokens), and with
    CHORD one chord_batches (its SFT term is a mean over the step's micro-batches)."""
    unit = _UNIT[method.loss_type]
    n = {"completions": batch["n_completions"], "micro_batches": 1,
         "tokens": int(batch["completion_mask"].sum())}[unit]
    out = {unit: n, "chord_batches": 1} if "chord" in batch else {unit: n}
    if "teacher_logps" in batch:  # SDAR's term: a mean over the step's micro-batches, as ms-swift
        out["sdar_batches"] = 1
    return out


def grpo_metrics(stats: dict) -> dict:
    """Means of the summed statistics, under ms-swift's names: reward, reward_std (population std of the
    completions' total rewards), rewards/<function>/mean and /std, completions/mean_length, min_length and
    max_length (each round's extreme, averaged over the rounds logged), clipped_ratio, frac_reward_zero_std, kl
    and the clip ratios (token means), and entropy/mean, /max, /min (--log_entropy) and entropy/threshold
    (--top_entropy_quantile < 1), nats, averaged over the micro-batches logged (see `entropy_terms`); the
    variants' (kl with --kl_in_reward, teacher_kl, rlsd_lambda, fipo/*, rollout_correction/*, chord/*, sdar/*):
    variants.variant_metrics."""
    n = max(stats.get("n", 0), 1)
    out = {}
    if "reward" in stats:
        mean = stats["reward"] / n
        out["reward"] = round(mean, 6)
        out["reward_std"] = round(math.sqrt(max(stats["reward_sq"] / n - mean * mean, 0.0)), 6)
    for k, v in stats.items():
        if k.startswith("rewards/") and k.endswith("/sum"):
            name = k[len("rewards/"):-len("/sum")]
            count = stats.get(f"rewards/{name}/count", 0)
            mean = v / count if count else float("nan")
            out[f"rewards/{name}/mean"] = round(mean, 6)
            if count:
                out[f"rewards/{name}/std"] = round(math.sqrt(max(stats[f"rewards/{name}/sq"] / count - mean ** 2,
                                                                 0.0)), 6)
    if "length" in stats:
        out["completions/mean_length"] = round(stats["length"] / n, 2)
        if stats.get("rounds"):
            out["completions/min_length"] = round(stats["round_min_length"] / stats["rounds"], 2)
            out["completions/max_length"] = round(stats["round_max_length"] / stats["rounds"], 2)
        out["completions/clipped_ratio"] = round(stats["clipped"] / n, 4)
        out["frac_reward_zero_std"] = round(stats["zero_std"] / n, 4)
    if "num_turns" in stats:  # multi-turn rollouts: model turns per completion (ms-swift's num_turns)
        out["num_turns"] = round(stats["num_turns"] / n, 4)
    tokens = max(stats.get("tokens", 0), 1)
    for k in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"):
        if k in stats:
            out[k] = loop.signif(stats[k] / tokens)
    out.update(variant_metrics(stats, n))
    for name in ("mean", "max", "min", "threshold"):  # one value per micro-batch (`entropy_terms`), averaged
        count = stats.get("entropy/threshold_batches" if name == "threshold" else "entropy/batches")
        if count:
            out[f"entropy/{name}"] = round(stats[f"entropy/{name}_sum"] / count, 6)
    return out


@dataclass(frozen=True)
class GRPO:
    """GRPO and its variants (--loss_type grpo | bnpo | dr_grpo | dapo | cispo | sapo | real | fipo | luspo) on
    prompts, with reward functions; a reference (β > 0) for the KL term (or, --kl_in_reward, the KL penalty in the
    reward); `variants` holds the loss options of train/ops/grpo_variants.py (train/rl/variants.py resolves them)."""
    loss_type: str
    beta: float
    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: Optional[float]
    top_k: Optional[int]
    repetition_penalty: Optional[float]
    epsilon: float
    epsilon_high: float
    delta: Optional[float]
    num_iterations: int
    steps_per_generation: Optional[int]       # None: --gradient_accumulation_steps (Rollouts resolves it)
    advantage_estimator: str
    scale_rewards: str
    importance_sampling_level: str
    top_entropy_quantile: float
    overlong_filter: bool
    log_completions: bool
    reward_funcs: tuple
    reward_weights: tuple                     # one per --reward_funcs, then one per --reward_model
    external_plugins: tuple
    reward_args: Any
    reward_models: tuple = ()                 # reward_models.RewardModelSpec, one per --reward_model
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    ref_model: Optional[str] = None
    ref_adapters: tuple = ()
    use_vllm: bool = False                    # rollouts from vLLM (colocate, the LoRA adapter synced each round)
    server: Any = None                        # --vllm_mode server: rollout_client.ServerConfig, else None
    async_generate: bool = False              # the server samples round r + 1 while round r trains (ahead.py)
    dynamic_sample: bool = False              # DAPO: replace groups without reward differences (max_resample_times)
    max_resample_times: int = 3
    log_entropy: bool = False                 # entropy/mean, /max, /min (ms-swift's --log_entropy)
    kl_in_reward: bool = False                # β·KL subtracted from the rewards, no KL term in the loss
    num_generations_eval: Optional[int] = None  # G of the validation rounds (None: num_generations)
    min_p: float = 0.0                        # min-p sampling of the rollouts (0: off)
    variants: Any = None                      # grpo_variants.GRPOVariants (REAL, FIPO, masking, rollout IS)
    chord: Any = None                         # chord.ChordSpec (--chord_sft_dataset), None: no CHORD
    teacher_model: Optional[str] = None       # OPD-RL: the teacher whose log-probs join each token's advantage
    teacher_adapters: tuple = ()
    teacher_revision: Optional[str] = None
    offload_teacher: bool = False
    teacher_kl_coef: float = 1.0
    teacher_servers: Optional[tuple] = None   # OPD-RL's teacher behind servers (teacher_server.TeacherServer each)
    teacher_tag_key: str = "dataset"          # the prompt column that routes a row among several teacher servers
    distill: Any = None                       # variants.SelfDistill: RLSD / SDAR / OPD-RL's additive signal
    multi_turn_scheduler: Optional[str] = None  # multi-turn rollouts: the scheduler's name (train/rl/schedulers.py)
    max_turns: Optional[int] = None           # model turns per trajectory; None: no limit
    completion_length_limit_scope: str = "per_round"  # max_completion_length: per model turn, or "total"
    gym_env: Optional[str] = None             # gym_scheduler's default environment
    use_gym_env: bool = False                 # rollout_infos' total_reward as a reward (gym_reward), weighted last
    name = "grpo"
    best_metric = "reward"                    # --metric_for_best_model's default (ms-swift's rule)
    head = "causal_lm"
    rows = "prompt"
    default_loss_scale = "last_round"

    @property
    def eval_generations(self) -> int:
        """G of a validation round: --num_generations_eval, else --num_generations."""
        return self.num_generations_eval or self.num_generations

    @property
    def needs_reference(self) -> bool:
        """A reference only for the KL term (β > 0), as ms-swift."""
        return self.beta != 0

    @classmethod
    def from_args(cls, args, problems: list) -> "GRPO":
        """The GRPO flags, checked (every problem appended), with ms-swift's dependent defaults filled in:
        β 0.04, loss_type grpo, epsilon_high = epsilon, steps_per_generation from --generation_batch_size or
        --gradient_accumulation_steps, scale_rewards by estimator. Reward functions are resolved here, so a bad
        name or plugin is a flag problem before anything loads."""
        from tunesmith.train.ops.losses import GRPO_LOSS_TYPES

        loss_type = _one_loss_type(args, problems, GRPO_LOSS_TYPES)
        beta = 0.04 if args.beta is None else args.beta
        between(problems, "beta", beta, 0, None)
        between(problems, "num_generations", args.num_generations, 2, None)
        between(problems, "max_completion_length", args.max_completion_length, 1, None)
        between(problems, "temperature", args.temperature, 0, None, lo_open=True)
        between(problems, "epsilon", args.epsilon, 0, None)
        if args.epsilon_high is not None:
            between(problems, "epsilon_high", args.epsilon_high, 0, None)
        if args.top_p is not None:
            between(problems, "top_p", args.top_p, 0, 1, lo_open=True)
        if args.repetition_penalty is not None:
            between(problems, "repetition_penalty", args.repetition_penalty, 0, None, lo_open=True)
        if args.generation_batch_size is not None:
            between(problems, "generation_batch_size", args.generation_batch_size, 1, None)
        between(problems, "num_iterations", args.num_iterations, 1, None)
        between(problems, "max_resample_times", args.max_resample_times, 0, None)
        # torch.quantile's q = 1 − top_entropy_quantile must lie in [0, 1]; 0 keeps only the highest entropy
        between(problems, "top_entropy_quantile", args.top_entropy_quantile, 0, 1)
        steps = _steps_per_generation(args, problems)
        _check_unsupported(args, problems)
        scale_rewards = "none" if loss_type == "real" else \
            ({"true": "group", "false": "none"}.get(args.scale_rewards, args.scale_rewards)
             or _DEFAULT_SCALE[args.advantage_estimator])
        reward_args = _reward_args(args)
        use_gym = args.use_gym_env if args.use_gym_env is not None else args.gym_env is not None
        reward_models = reward_model_specs(args, problems)
        reward_funcs = _checked_rewards(args, reward_args, problems, use_gym)
        _check_multi_turn(args, problems, use_gym)
        return cls(loss_type, beta, args.num_generations, args.max_completion_length, args.temperature, args.top_p,
                   args.top_k, args.repetition_penalty, args.epsilon,
                   args.epsilon if args.epsilon_high is None else args.epsilon_high, args.delta,
                   args.num_iterations, steps, args.advantage_estimator, scale_rewards, args.importance_sampling_level,
                   args.top_entropy_quantile, args.overlong_filter, args.log_completions, tuple(reward_funcs),
                   tuple(args.reward_weights or [1.0] * (len(reward_funcs) + len(args.reward_model) + use_gym)),
                   tuple(args.external_plugins), reward_args, reward_models, args.tau_pos, args.tau_neg,
                   args.ref_model, tuple(args.ref_adapters), args.use_vllm,
                   log_entropy=args.log_entropy, dynamic_sample=args.dynamic_sample,
                   max_resample_times=args.max_resample_times, server=server_config(args),
                   async_generate=args.async_generate,
                   **variant_fields(args, problems), chord=ChordSpec.from_args(args, problems),
                   **teacher_fields(args, problems), multi_turn_scheduler=args.multi_turn_scheduler,
                   max_turns=args.max_turns, completion_length_limit_scope=args.completion_length_limit_scope,
                   gym_env=args.gym_env, use_gym_env=use_gym)

    def resolved_flags(self) -> dict:
        """The GRPO defaults as applied, for args.json."""
        return {"beta": self.beta, "loss_type": [self.loss_type], "epsilon_high": self.epsilon_high,
                "steps_per_generation": self.steps_per_generation, "scale_rewards": self.scale_rewards,
                "kl_in_reward": self.kl_in_reward,
                **({"chord_sft_per_device_train_batch_size": self.chord.batch_size} if self.chord else {}),
                "reward_weights": list(self.reward_weights), "rpo_alpha": None}

    def shape_records(self, loaded: LoadResult) -> LoadResult:
        """Each record as a prompt (`prompt_record`); bad rows follow --strict. Preference pairs are read as their
        prompt and chosen reply (the `solution`), with a note: the rejected reply has no use in GRPO."""
        pairs = sum(1 for r in loaded.records if "rejected_messages" in r)
        if pairs:
            note(f"GRPO: {pairs} row(s) are preference pairs; each gives its prompt, and its chosen reply as "
                 f"`solution` (for rewards such as accuracy); the rejected reply is not used")
        prompts = map_records(loaded, prompt_record)
        if self.teacher_servers and len(self.teacher_servers) > 1:  # every row routes to one teacher server
            from tunesmith.train.rl.teacher_server import tag_check

            prompts = map_records(prompts, tag_check(self.teacher_servers, self.teacher_tag_key))
        return prompts

    def batches(self, cfg, prepared, model, reference) -> Batches:
        """The rollouts (generated as the loop reads them) and their collator; dropout off (the ratio of an
        unchanged policy must be exactly 1, as TRL's disable_dropout)."""
        from tunesmith.train.reference import disable_dropout
        from tunesmith.train.rl.rollouts import Rollouts, ValidationRollouts
        from tunesmith.train.rl.units import grpo_collate

        disable_dropout(model, has_reference=self.needs_reference)
        teacher = grpo_teacher(self, cfg, model, prepared.tokenizer)
        rollouts = Rollouts(self, prepared.train_rows, model, prepared.tokenizer, reference, cfg, prepared.model_dir,
                            images=prepared.encoder.images, teacher=teacher)
        val = ValidationRollouts(rollouts, prepared.eval_rows) if prepared.eval_rows else []
        pad = _pad_id(prepared.tokenizer)
        collate, hooks = with_chord(self.chord, pad, partial(grpo_collate, pad_id=pad), (rollouts,), prepared, cfg)
        return Batches(rollouts, val, collate, reference, on_run_dir=rollouts.log_to, hooks=hooks)

    def objective(self, reference, cfg) -> loop.Objective:
        """GRPO's objective: the loss type's terms over completions, micro-batches or tokens."""
        return loop.Objective("grpo", loss=partial(grpo_loss_terms, self, reference), count=partial(_count, self),
                              metrics=grpo_metrics)

    def header(self, prepared, batches) -> str:
        """The run's header: the loss, the group size, the reward functions, the reference."""
        names = ", ".join(f"{f.spec}×{w:g}" for f, w in zip(batches.train.reward_fns, self.reward_weights))
        if any(f.spec == "accuracy" for f in batches.train.reward_fns):
            from tunesmith.train.rl.rewards import accuracy_backend
            names += " (accuracy checked with " + ("math_verify)" if accuracy_backend() == "math_verify" else
                                                    "tunesmith's own answer comparison; pip install math-verify "
                                                    "for LaTeX equivalence)")
        ref = batches.reference.describe if batches.reference is not None else "none (beta 0: no KL term)"
        if batches.train.teacher is not None:
            sd = self.distill
            how = "RLSD (advantages reweighted)" if sd is not None and sd.reweight == "rlsd" else \
                f"SDAR (sdar_loss_coef {sd.sdar_coef:g})" if sd is not None and sd.sdar_coef > 0 else \
                f"OPD-RL, teacher_kl_coef {self.teacher_kl_coef:g}"
            ref += f"\n[tunesmith] teacher ({how}): {batches.train.teacher.describe}"
        return (f"[tunesmith] rlhf grpo: loss_type={self.loss_type}, β={self.beta:g}, G={self.num_generations}, "
                f"ε=[{self.epsilon:g}, {self.epsilon_high:g}], advantages {self.advantage_estimator}/"
                f"{self.scale_rewards}, temperature {self.temperature:g}, max_completion_length "
                f"{self.max_completion_length}\n[tunesmith] rewards: {names}\n[tunesmith] reference: {ref}\n"
                + (f"[tunesmith] multi-turn rollouts: scheduler {self.multi_turn_scheduler}, max_turns "
                   f"{self.max_turns or 'unlimited'}, completion length limit {self.completion_length_limit_scope}\n"
                   if self.multi_turn_scheduler else "") +
                f"[tunesmith] {len(prepared.train_rows)} prompts; {batches.train.prompts_per_round} per generation "
                f"round ({batches.train.round_size} completions)")


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _one_loss_type(args, problems: list, allowed: tuple) -> str:
    import difflib

    types = list(args.loss_type) or ["grpo"]
    if len(types) > 1:
        problems.append(f"--rlhf_type grpo takes one --loss_type ({', '.join(allowed)})")
    if types[0] not in allowed:
        near = difflib.get_close_matches(types[0], allowed, n=1)
        problems.append(f"--loss_type {types[0]}: not a GRPO loss" + (f"; did you mean {near[0]}?" if near else "")
                        + f" (one of {', '.join(allowed)})")
        return "grpo"
    return types[0]


def _steps_per_generation(args, problems: list) -> Optional[int]:
    """ms-swift's rule (rlhf_trainers/args_mixin.py:205-231): one of --steps_per_generation and
    --generation_batch_size; None (one generation per optimiser step: --gradient_accumulation_steps, known once
    the processes are) when neither is given. The generation batch must hold whole groups (checked by Rollouts
    when the default applies)."""
    per_step = args.per_device_train_batch_size
    steps = args.steps_per_generation
    if args.generation_batch_size is not None:
        if args.generation_batch_size % per_step:
            problems.append(f"--generation_batch_size {args.generation_batch_size} must be a multiple of "
                            f"--per_device_train_batch_size {per_step} (x processes)")
        elif steps is not None and steps != args.generation_batch_size // per_step:
            problems.append("give --steps_per_generation or --generation_batch_size, not both")
        steps = max(1, args.generation_batch_size // per_step)
    if steps is None:
        # one generation per optimiser step: the step's completions (all processes) must hold whole groups; the
        # default accumulation is resolve()'s (a total batch of 16), the processes torchrun's
        world = max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
        gas = args.gradient_accumulation_steps or max(1, math.ceil(16 / max(per_step, 1) / world))
        if per_step >= 1 and (per_step * world * gas) % max(args.num_generations, 1):
            from tunesmith.train.rl.units import generation_batch_problem

            problems.append(generation_batch_problem(per_step * world, gas, args.num_generations))
        return None
    if steps < 1:
        problems.append(f"--steps_per_generation {steps}: must be 1 or more")
        return 1
    if (per_step * steps) % max(args.num_generations, 1):
        from tunesmith.train.rl.units import generation_batch_problem

        problems.append(generation_batch_problem(per_step, steps, args.num_generations))
    return steps


def _check_unsupported(args, problems: list) -> None:
    async_problems(args, problems)
    if args.use_vllm:
        _vllm_problems(args, problems)
    if args.num_infer_workers != 1:
        problems.append(f"--num_infer_workers {args.num_infer_workers}: one vLLM per training process is what "
                        f"tunesmith runs (--use_vllm, colocate); drop the flag")
    if args.packing or args.padding_free:
        problems.append("--packing/--padding_free: GRPO trains on its generated completions, padded; drop the flag")
    if args.streaming:
        problems.append("--streaming: GRPO reads its prompts up front; drop --streaming")
    n = len(args.reward_funcs) + len(args.reward_model) + bool(
        args.use_gym_env if args.use_gym_env is not None else args.gym_env is not None)  # gym_reward: the last
    if args.reward_weights and not all(math.isfinite(w) for w in args.reward_weights):
        problems.append(f"--reward_weights {' '.join(map(str, args.reward_weights))}: each weight must be a finite "
                        f"number")
    if args.reward_weights and len(args.reward_weights) != n:
        problems.append(f"--reward_weights has {len(args.reward_weights)} value(s) for {n} reward function(s) and "
                        f"model(s); give one weight per function, then one per --reward_model (then one for "
                        f"gym_reward with --use_gym_env)")
    if args.delta is not None and args.delta <= 1 + (args.epsilon_high or args.epsilon):
        problems.append(f"--delta {args.delta}: must be > 1 + epsilon_high (it bounds the ratio above the clip)")


def _check_multi_turn(args, problems: list, use_gym: bool) -> None:
    """--multi_turn_scheduler names a scheduler that loads (after the reward plugins ran: a plugin file may
    register both); --max_turns >= 1; --max_turns, --completion_length_limit_scope total, --gym_env and
    --use_gym_env only with a scheduler (they would change nothing)."""
    from tunesmith.train.rl.schedulers import load_scheduler

    if args.max_turns is not None:
        between(problems, "max_turns", args.max_turns, 1, None)
    if args.multi_turn_scheduler is None:
        if (args.max_turns is not None or args.completion_length_limit_scope != "per_round"
                or args.gym_env is not None or use_gym):
            problems.append("--max_turns, --completion_length_limit_scope, --gym_env and --use_gym_env shape "
                            "multi-turn rollouts: give --multi_turn_scheduler NAME too (e.g. tool_call_scheduler, "
                            "or gym_scheduler for a gym environment), or drop them")
        return
    try:
        load_scheduler(args.multi_turn_scheduler, list(args.external_plugins), args.max_turns, gym_env=args.gym_env)
    except ConfigError as e:
        problems.append(str(e))


def _vllm_problems(args, problems: list) -> None:
    """--use_vllm: what tunesmith's vLLM rollouts need (ms-swift's colocate mode with --vllm_enable_lora: the
    policy's LoRA adapter is handed to vLLM each round; server mode: `_server_problems`), each missing piece one
    problem."""
    from tunesmith.inference.backends import check_backend

    if args.vllm_mode == "server":
        server_problems(args, problems)
        return
    drop = "drop --use_vllm (tunesmith's own batched engine generates the rollouts)"
    off = "or " + drop
    if args.train_type != "lora":
        problems.append(f"--use_vllm with --train_type {args.train_type}: tunesmith hands the policy to vLLM as a "
                        f"LoRA adapter each round; syncing full weights into vLLM is not supported yet; use "
                        f"--train_type lora, {off}")
    elif args.vllm_enable_lora is False:
        problems.append("--vllm_enable_lora false: tunesmith syncs the policy into vLLM as a LoRA adapter (merged "
                        "weights are not supported yet); drop the flag")
    elif args.lora_rank > args.vllm_max_lora_rank:
        problems.append(f"--lora_rank {args.lora_rank} is above --vllm_max_lora_rank {args.vllm_max_lora_rank}: "
                        f"vLLM could not load the adapter; pass --vllm_max_lora_rank {args.lora_rank}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append(f"--use_vllm under torchrun ({os.environ['WORLD_SIZE']} processes): one vLLM per training "
                        f"process is not supported yet; run one process, {off}")
    try:
        check_backend("vllm", flag="--use_vllm true", fallback=drop)
    except ConfigError as e:
        problems.append(str(e))


def _reward_args(args):
    from tunesmith.train.rl.rewards import RewardArgs

    return RewardArgs(cosine_min_len_value_wrong=args.cosine_min_len_value_wrong,
                      cosine_max_len_value_wrong=args.cosine_max_len_value_wrong,
                      cosine_min_len_value_correct=args.cosine_min_len_value_correct,
                      cosine_max_len_value_correct=args.cosine_max_len_value_correct,
                      cosine_max_len=args.cosine_max_len, repetition_n_grams=args.repetition_n_grams,
                      repetition_max_penalty=args.repetition_max_penalty, soft_max_length=args.soft_max_length,
                      soft_cache_length=args.soft_cache_length, max_completion_length=args.max_completion_length)


def _checked_rewards(args, reward_args, problems: list, use_gym: bool = False) -> list:
    """The --reward_funcs names (resolved now, so a typo or a broken plugin is reported with the other flag
    problems); an empty list is a problem: GRPO learns nothing without a reward."""
    from tunesmith.train.rl.rewards import load_reward_functions

    if not args.reward_funcs:
        if not args.reward_model and not use_gym and not (args.teacher_model or args.teacher_model_server):
            problems.append("GRPO needs --reward_funcs (or --reward_model): e.g. --reward_funcs accuracy format "
                            "(built-ins), a name an --external_plugins file registers, or module.function")
        return []
    try:
        load_reward_functions(list(args.reward_funcs), list(args.external_plugins), reward_args)
    except ConfigError as e:
        problems.append(str(e))
    return list(args.reward_funcs)

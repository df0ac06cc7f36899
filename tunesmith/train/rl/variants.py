"""GRPO's further options, resolved once from the flags into the GRPO method (train/rl/grpo.py): the KL in the reward,
validation's group size, min-p sampling, and the loss variants of train/ops/grpo_variants.py (REAL, FIPO, off-policy
sequence masking, rollout importance sampling). ms-swift 4.6's names, defaults and dependent defaults
(arguments/rlhf_args.py `_init_grpo`, rlhf_trainers/grpo_trainer.py `_prepare_algorithm_params`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tunesmith.train import loop

from tunesmith.config.checks import between
from tunesmith.errors import ConfigError
from tunesmith.log import note


PER_BATCH = ("rollout_correction/", "fipo/", "chord/", "sdar/")  # metrics averaged per micro-batch, not per token


def variant_metrics(stats: dict, n: float) -> dict:
    """The variants' logged values from the summed statistics (n: completions counted): teacher_kl (OPD-RL, the
    token mean of e^d − d − 1), rlsd_lambda (RLSD's λ when the rounds were generated), kl with --kl_in_reward (the
    mean of each completion's summed KL, ms-swift's), and the PER_BATCH families (one value per micro-batch and
    process, averaged over those logged)."""
    out = {}
    if stats.get("teacher_kl_tokens"):
        out["teacher_kl"] = loop.signif(stats["teacher_kl"] / stats["teacher_kl_tokens"])
    if stats.get("rlsd_lambda_count"):
        out["rlsd_lambda"] = loop.signif(stats["rlsd_lambda_sum"] / stats["rlsd_lambda_count"])
    if "kl_in_reward" in stats:
        out["kl"] = loop.signif(stats["kl_in_reward"] / n)
    for k, v in stats.items():
        head = k.split("/")[0] + "/"
        if head in PER_BATCH and k.endswith("/sum") and stats.get(f"{head}batches"):
            out[k[:-len("/sum")]] = loop.signif(v / stats[f"{head}batches"])
    return out


@dataclass(frozen=True)
class SelfDistill:
    """How the teacher's per-token log-ratio Δ = log p_teacher − log p_old enters GRPO (ms-swift's OPD-RL family):
    reweight "rlsd" (RLSD: `grpo_variants.rlsd_reweight`, λ scheduled by `grpo_variants.rlsd_lambda`), sdar_coef > 0
    (SDAR: + sdar_coef · `grpo_variants.sdar_loss`), else OPD-RL's additive A + teacher_kl_coef·Δ."""
    reweight: str = ""
    lam: float = 0.5
    clip_range: float = 0.2
    warmup_steps: int = 0
    decay_steps: int = 0
    negative_only: bool = False
    sdar_coef: float = 0.0
    sdar_beta: float = 5.0


def variant_fields(args, problems: list) -> dict:
    """The GRPO dataclass's kl_in_reward, num_generations_eval, min_p and variants (grpo_variants.GRPOVariants)
    from the flags, each problem appended to `problems`:
      --kl_in_reward: default false for --advantage_estimator grpo, true for rloo and reinforce_plus_plus; with
        --scale_rewards gdpo it is off (ms-swift turns it off with a warning; a note here);
      --num_generations_eval ≥ 1; --min_p in [0, 1]; --real_tau > 0; --fipo_decay_rate > 0 (tokens);
      --fipo_clip_range ≥ 0; --rollout_importance_sampling_threshold > 0 (its reciprocal bounds the ESS weights);
      --loss_type real needs each micro-batch to hold whole groups (per-device train batch, and eval batch when
      validating, multiples of the group size), since REAL compares the completions of a group."""
    from tunesmith.train.ops.grpo_variants import GRPOVariants, fipo_gamma

    loss_type = (list(args.loss_type) or ["grpo"])[0]
    kl_in_reward = args.kl_in_reward
    if kl_in_reward is None:
        kl_in_reward = args.advantage_estimator in ("rloo", "reinforce_plus_plus")
    if kl_in_reward and args.scale_rewards == "gdpo":
        if args.kl_in_reward:
            note("GRPO: --scale_rewards gdpo normalises each reward function apart, so the KL cannot join the "
                 "rewards: --kl_in_reward is off (the KL stays a loss term), as ms-swift")
        kl_in_reward = False
    if loss_type == "real" and args.scale_rewards not in (None, "none", "false"):
        note(f"GRPO --loss_type real: --scale_rewards {args.scale_rewards} is replaced by none (REAL uses the sign "
             f"of the advantage only), as ms-swift")
    if args.num_generations_eval is not None:
        between(problems, "num_generations_eval", args.num_generations_eval, 1, None)
    between(problems, "min_p", args.min_p, 0, 1)
    between(problems, "real_tau", args.real_tau, 0, None, lo_open=True)
    between(problems, "fipo_decay_rate", args.fipo_decay_rate, 0, None, lo_open=True)
    if args.fipo_clip_range is not None:
        between(problems, "fipo_clip_range", args.fipo_clip_range, 0, None)
    between(problems, "rollout_importance_sampling_threshold", args.rollout_importance_sampling_threshold, 0, None,
            lo_open=True)
    if loss_type == "real":
        _real_groups(args, problems)
    if args.use_vllm and args.vllm_mode == "server":  # the rollout server does not sample with min-p
        if args.min_p:
            problems.append(f"--min_p {args.min_p} with --vllm_mode server: the rollout server does not sample with "
                            f"min-p yet; use --top_p or --top_k, or sample in the trainer")
    variants = GRPOVariants(
        num_generations=args.num_generations, real_tau=args.real_tau,
        fipo_gamma=fipo_gamma(args.fipo_decay_rate) if args.fipo_decay_rate > 0 else 0.0,
        fipo_clip_range=args.fipo_clip_range, fipo_clip_high_only=args.fipo_clip_high_only,
        fipo_safety_threshold=args.fipo_safety_threshold,
        off_policy_sequence_mask_delta=args.off_policy_sequence_mask_delta,
        rollout_is_mode=args.rollout_importance_sampling_mode,
        rollout_is_threshold=args.rollout_importance_sampling_threshold,
        log_rollout_offpolicy_metrics=args.log_rollout_offpolicy_metrics)
    return {"kl_in_reward": bool(kl_in_reward), "num_generations_eval": args.num_generations_eval,
            "min_p": args.min_p, "variants": variants}


def _real_groups(args, problems: list) -> None:
    """REAL's loss is over the groups of a micro-batch: its completions must be whole groups."""
    g = args.num_generations
    if args.per_device_train_batch_size % max(g, 1):
        problems.append(f"--loss_type real compares the completions of each group within a micro-batch: "
                        f"--per_device_train_batch_size {args.per_device_train_batch_size} must be a multiple of "
                        f"--num_generations {g}")
    g_eval = args.num_generations_eval or g
    validating = bool(args.val_dataset) or args.split_dataset_ratio > 0
    if validating and args.per_device_eval_batch_size % max(g_eval, 1):
        problems.append(f"--loss_type real with validation: --per_device_eval_batch_size "
                        f"{args.per_device_eval_batch_size} must be a multiple of the validation group size "
                        f"{g_eval} (--num_generations_eval, else --num_generations)")


def teacher_fields(args, problems: list) -> dict:
    """OPD-RL (ms-swift's on-policy distillation as RL: a teacher on a GRPO run) — the GRPO dataclass's teacher_model,
    teacher_adapters, teacher_revision, offload_teacher and teacher_kl_coef, each problem appended. What ms-swift
    refuses with a teacher (arguments/rlhf_args.py `_check_opd_rl`) is refused here too: --loss_type real or fipo
    and --off_policy_sequence_mask_delta (they need one advantage per completion, the teacher's is per token), and
    without reward functions (pure distillation) --dynamic_sample and --scale_rewards gdpo (no reward variance)."""
    if args.teacher_adapters and not args.teacher_model:
        problems.append("--teacher_adapters needs --teacher_model (the model they are merged into)")
    servers = _teacher_servers(args, problems)
    if args.teacher_model or servers:
        loss_type = (list(args.loss_type) or ["grpo"])[0]
        if loss_type in ("real", "fipo"):
            problems.append(f"--teacher_model (OPD-RL) with --loss_type {loss_type}: its loss needs one advantage "
                            f"per completion, and the teacher's signal is per token; use another loss type")
        if args.off_policy_sequence_mask_delta is not None:
            problems.append("--teacher_model (OPD-RL) with --off_policy_sequence_mask_delta: the mask needs one "
                            "advantage per completion, and the teacher's signal is per token; drop one of them")
        if not args.reward_funcs and not args.reward_model:
            if args.dynamic_sample:
                problems.append("--dynamic_sample without reward functions: pure distillation (--teacher_model "
                                "alone) has no reward differences to sample for; add --reward_funcs or drop it")
            if args.scale_rewards == "gdpo":
                problems.append("--scale_rewards gdpo without reward functions: pure distillation has no rewards "
                                "to normalise; add --reward_funcs or drop it")
    return {"teacher_model": args.teacher_model, "teacher_adapters": tuple(args.teacher_adapters),
            "teacher_revision": args.teacher_model_revision, "offload_teacher": args.offload_teacher_model,
            "teacher_kl_coef": args.teacher_kl_coef, "distill": _self_distill(args, problems),
            "teacher_servers": servers, "teacher_tag_key": args.teacher_tag_key}


def _teacher_servers(args, problems: list):
    """--teacher_model_server for OPD-RL (teacher_server.parse_teacher_servers), not with --teacher_model
    (ms-swift's rule); None without it."""
    if args.teacher_model_server is None:
        return None
    from tunesmith.train.rl.teacher_server import parse_teacher_servers

    if args.teacher_model:
        problems.append("setting both --teacher_model and --teacher_model_server is not supported (ms-swift's "
                        "rule); give one")
    try:
        return parse_teacher_servers(args.teacher_model_server)
    except ConfigError as e:
        problems.append(str(e))
        return None


def _self_distill(args, problems: list) -> SelfDistill:
    """RLSD's and SDAR's flags, checked as ms-swift's `_check_rlsd` and `_check_sdar` (arguments/rlhf_args.py):
    λ in [0, 1], ε_w ≥ 0, steps ≥ 0; RLSD needs reward functions (it uses the sign of the advantage) and refuses
    --loss_type real/fipo and --off_policy_sequence_mask_delta; SDAR needs gate β > 0 and not RLSD too."""
    loss_type = (list(args.loss_type) or ["grpo"])[0]
    if args.advantage_reweight == "rlsd":
        between(problems, "rlsd_lambda", args.rlsd_lambda, 0, 1)
        between(problems, "rlsd_reweight_clip_range", args.rlsd_reweight_clip_range, 0, None)
        between(problems, "rlsd_lambda_warmup_steps", args.rlsd_lambda_warmup_steps, 0, None)
        between(problems, "rlsd_lambda_decay_steps", args.rlsd_lambda_decay_steps, 0, None)
        if not args.reward_funcs:
            problems.append("--advantage_reweight rlsd needs --reward_funcs: it reweights by the sign of the "
                            "reward's advantage")
        if loss_type in ("real", "fipo") or args.off_policy_sequence_mask_delta is not None:
            problems.append("--advantage_reweight rlsd with --loss_type real/fipo or --off_policy_sequence_mask_delta: "
                            "they reduce the advantage to one per completion; drop one of them")
        if args.beta:
            note(f"GRPO RLSD: the reference RLSD setup has no KL (--beta 0); this run keeps --beta {args.beta:g}")
    if args.sdar_loss_coef > 0:
        between(problems, "sdar_gate_beta", args.sdar_gate_beta, 0, None, lo_open=True)
        if args.advantage_reweight == "rlsd":
            problems.append("--sdar_loss_coef with --advantage_reweight rlsd: pick one teacher-distillation "
                            "mechanism (SDAR adds a loss, RLSD reweights the advantage)")
    return SelfDistill(args.advantage_reweight or "", args.rlsd_lambda, args.rlsd_reweight_clip_range,
                       args.rlsd_lambda_warmup_steps, args.rlsd_lambda_decay_steps, args.rlsd_negative_only,
                       args.sdar_loss_coef, args.sdar_gate_beta)


def grpo_teacher(method, cfg, model, tokenizer):
    """OPD-RL's teacher (reference.setup_teacher: GKD's rules — the same model with LoRA is the model with the
    adapter switched off) when --teacher_model is given, else None (rows with a teacher_prompt column then use the
    policy itself). Raises ConfigError as setup_teacher."""
    if method.teacher_servers:  # OPD-RL from a server: the sampled tokens' log-probs over HTTP
        from tunesmith.train.rl.teacher_server import ServerTeacher, TeacherClient

        client = TeacherClient(method.teacher_servers, method.teacher_tag_key)
        client.connect(tokenizer)
        return ServerTeacher(client)
    if not method.teacher_model:
        return None
    from tunesmith.train.reference import setup_teacher

    return setup_teacher(cfg.model, method.teacher_model, list(method.teacher_adapters), method.teacher_revision,
                         method.offload_teacher, model, tokenizer)


def sdar_terms(distill: SelfDistill, logps, batch: dict, terms: dict, metrics: dict) -> tuple[dict, dict]:
    """(terms with SDAR's, metrics with sdar/*): + sdar_coef · `grpo_variants.sdar_loss` of the policy's log-probs
    logps [B, C] against the batch's teacher_logps [B, C] over its completion mask, in the unit sdar_batches (a mean
    over the step's micro-batches, as ms-swift adds it after the policy loss)."""
    from tunesmith.train.ops.grpo_variants import sdar_loss

    loss, more = sdar_loss(logps, batch["teacher_logps"].float(), batch["completion_mask"], distill.sdar_beta)
    return {**terms, "sdar_batches": distill.sdar_coef * loss}, {**metrics, **more, "sdar/coef": distill.sdar_coef}


def teacher_signal(u, method, step: int) -> None:
    """The teacher's per-token signal on a unit (units.Unit), as ms-swift 4.6 grpo_trainer.py:259-303 — RLSD
    (--advantage_reweight rlsd): the advantages `grpo_variants.rlsd_reweight` [C] with λ at optimiser step `step`;
    SDAR (--sdar_loss_coef > 0): none here (the loss adds its term); otherwise OPD-RL
    (rl_core/advantage.py expand_advantage_to_per_token): A + teacher_kl_coef·(log p_teacher − log p_old) [C]. And
    its teacher_kl statistics — the k3 estimate e^d − d − 1 of each token, d = log p_teacher − log p_old
    (compute_teacher_kl_per_token), summed with its token count."""
    import torch

    from tunesmith.train.ops.grpo_variants import rlsd_lambda, rlsd_reweight

    sd = method.distill
    if sd is not None and sd.reweight == "rlsd":
        gap = torch.tensor([u.teacher_gap], dtype=torch.float64)
        lam = rlsd_lambda(step, sd.lam, sd.warmup_steps, sd.decay_steps)
        u.token_advantages = rlsd_reweight(torch.tensor([u.advantage], dtype=torch.float64), torch.ones_like(gap),
                                           gap, torch.zeros_like(gap), lam, sd.clip_range, sd.negative_only)[0].tolist()
        u.stats.update({"rlsd_lambda_sum": lam, "rlsd_lambda_count": 1})
    elif sd is None or sd.sdar_coef <= 0:
        u.token_advantages = [u.advantage + method.teacher_kl_coef * g for g in u.teacher_gap]
    u.stats["teacher_kl"] = sum(math.exp(d) - d - 1 for d in u.teacher_gap)
    u.stats["teacher_kl_tokens"] = len(u.teacher_gap)


def opsd_problems(method) -> None:
    """Rows with a teacher_prompt column turn on OPD-RL's teacher signal (ms-swift's OPSD); what needs one advantage
    per completion cannot take it. Raises ConfigError (ms-swift raises at the loss)."""
    if method.loss_type in ("real", "fipo") or method.variants.off_policy_sequence_mask_delta is not None:
        raise ConfigError(f"the rows have a teacher_prompt column, which turns on OPD-RL's per-token teacher signal "
                          f"(ms-swift's self-distillation); --loss_type {method.loss_type} / "
                          f"--off_policy_sequence_mask_delta need one advantage per completion: drop one of them "
                          f"(or the column)")
    note("GRPO: the rows have a teacher_prompt column: the policy on that prompt is the teacher of each completion "
         "token (ms-swift's OPSD self-distillation; --teacher_model names another teacher)" if method.teacher_model
         is None and not method.teacher_servers else "GRPO: the rows have a teacher_prompt column: --teacher_model scores each completion after it")

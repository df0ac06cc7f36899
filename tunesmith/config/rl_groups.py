"""The flag groups of `tunesmith rlhf`: the method, its loss variants and reference model (RLHFArgs), GRPO's
rollouts, rewards and variants (GRPOArgs, also read by PPO), GKD's teacher (GKDArgs) and PPO's value model and
schedule (PPOArgs). Frozen dataclasses like those of tunesmith.config.groups, with the same `_f`; only the standard
library is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from tunesmith.config.groups import _f


@dataclass(frozen=True)
class RLHFArgs:
    """Preference training (`tunesmith rlhf`): the method, its loss variants and weights, the reference model."""
    rlhf_type: str = _f("dpo", help="Method: dpo (with --loss_type variants), simpo, orpo, cpo, kto, grpo "
                                    "(reinforcement learning with reward functions), ppo (with a value model), gkd "
                                    "(on-policy distillation from a teacher) or rm (a reward model).",
                        choices=("dpo", "simpo", "orpo", "cpo", "kto", "grpo", "ppo", "gkd", "rm"))
    beta: Optional[float] = _f(help="Default 0.1 (SimPO 2.0; GRPO 0.04, ms-swift's default — TRL's is 0: "
                                    "the weight of the k3 KL to the reference, none at 0; GKD 0.5: the generalised "
                                    "JSD's interpolation, 0 forward KL(teacher ‖ student), 1 reverse KL).")
    loss_type: List[str] = _f(help="DPO loss variant(s): sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, "
                                   "sppo_hard, apo_zero, apo_down, discopop, sft; several with --loss_weights. "
                                   "CPO/SimPO: one of sigmoid, hinge, ipo, simpo. GRPO: one of grpo, bnpo, "
                                   "dr_grpo, dapo, cispo, sapo, real, fipo, luspo.",
                              list_default=[])
    loss_weights: List[float] = _f(help="One weight per --loss_type (default 1 each).", list_default=[])
    label_smoothing: float = _f(0.0, help="Probability (0-0.5) that a preference label is flipped: cDPO, robust, "
                                          "exo_pair; also CPO and SimPO.")
    rpo_alpha: Optional[float] = _f(help="Adds rpo_alpha * NLL(chosen) (logged separately as nll_loss).")
    ld_alpha: Optional[float] = _f(help="LD-DPO (DPO only): weight (0-1) of the log-probs of tokens beyond the "
                                        "shorter reply's length.")
    discopop_tau: float = _f(0.05, help="DiscoPOP (--loss_type discopop): temperature of the mixing sigmoid.")
    ref_model: Optional[str] = _f(help="Reference model for full training (default: --model).")
    ref_model_type: Optional[str] = _f(help="ms-swift's model type of --ref_model. Compatibility only (see the table "
                                            "at the end).")
    ref_adapters: List[str] = _f(help="Reference adapters (e.g. the SFT checkpoint given to --adapters).",
                                 list_default=[])
    cpo_alpha: float = _f(1.0, help="CPO: weight of the NLL over the chosen reply.")
    center_rewards_coefficient: Optional[float] = _f(help="Reward model (--rlhf_type rm): weight of the mean "
                                                          "squared reward, which centres rewards near 0 (Eisenstein "
                                                          "et al. 2023); default none.")
    simpo_gamma: float = _f(1.0, help="SimPO: target reward margin (gamma).")
    desirable_weight: float = _f(1.0, help="KTO: loss weight of desirable replies (lambda_D).")
    undesirable_weight: float = _f(1.0, help="KTO: loss weight of undesirable replies (lambda_U).")
    sync_ref_model: bool = _f(False, help="TR-DPO (Gorbatovski et al. 2024): every --ref_model_sync_steps steps "
                                          "the reference becomes α·policy + (1 − α)·reference. Full training (a "
                                          "separate reference model) only, as TRL.")
    ref_model_sync_steps: int = _f(512, help="--sync_ref_model: optimiser steps between reference updates.")
    ref_model_mixup_alpha: float = _f(0.6, help="--sync_ref_model: α, the policy's share of the new reference (0-1].")
    precompute_ref_log_probs: bool = _f(False, help="Compute the reference log-probs once before training (no "
                                                    "reference forward pass per step).")
    prefix_sharing: Optional[bool] = _f(help="Run each pair as one sequence [prompt, chosen, rejected] so the prompt "
                                             "is computed once (exact). Default: on with --packing or "
                                             "--padding_free where the attention implementation takes a custom "
                                             "mask (sdpa, eager).")


@dataclass(frozen=True)
class GRPOArgs:
    """GRPO (`--rlhf_type grpo`): ms-swift's flags and defaults; where TRL's defaults differ, the help says so."""
    num_generations: int = _f(8, help="GRPO: completions sampled per prompt (G, the group).")
    max_completion_length: int = _f(512, help="GRPO, PPO and GKD: most tokens generated per completion.")
    temperature: float = _f(0.9, help="GRPO and PPO: sampling temperature of the rollouts (ms-swift 0.9; TRL 1.0). "
                                      "GKD: of the student's samples and of both distributions in the divergence.")
    epsilon: float = _f(0.2, help="GRPO: clipping range of the importance ratio, [1 - epsilon, 1 + epsilon_high].")
    epsilon_high: Optional[float] = _f(help="GRPO: upper clipping range (DAPO's clip-higher); default --epsilon.")
    delta: Optional[float] = _f(help="GRPO: upper bound of the unclipped ratio (two-sided clipping, "
                                     "INTELLECT-2); should be > 1 + epsilon.")
    num_iterations: int = _f(1, help="GRPO: optimisation passes over each generated batch (mu).")
    steps_per_generation: Optional[int] = _f(help="GRPO: micro-batches trained on each generated batch "
                                                  "(default --gradient_accumulation_steps: one generation per step).")
    generation_batch_size: Optional[int] = _f(help="GRPO: completions generated at once (default "
                                                   "per_device_train_batch_size x processes x steps_per_generation).")
    advantage_estimator: str = _f("grpo", help="GRPO: advantage estimator (grpo: reward minus the group mean; rloo: "
                                               "leave-one-out; reinforce_plus_plus).",
                                  choices=("grpo", "rloo", "reinforce_plus_plus"))
    scale_rewards: Optional[str] = _f(help="GRPO: divide advantages by the std of the group, the batch or nothing "
                                           "(default: group for grpo, none for rloo, batch for reinforce_plus_plus; "
                                           "gdpo normalises each reward function apart; ms-swift 3.x's true/false "
                                           "mean group/none).",
                                      choices=("group", "batch", "none", "gdpo", "true", "false"))
    importance_sampling_level: str = _f("token", help="GRPO: one importance ratio per token, or per sequence "
                                                      "(GSPO; sequence_token: GSPO-token).",
                                        choices=("token", "sequence", "sequence_token"))
    top_entropy_quantile: float = _f(1.0, help="GRPO: the policy-gradient term trains only the completion tokens "
                                               "whose entropy (at --temperature) is in this top quantile of each "
                                               "micro-batch's, e.g. 0.2 (Wang et al. 2025, the 80/20 rule); the KL "
                                               "term and the normalisation keep every token. 0 <= q <= 1; 1.0: all "
                                               "tokens. Logs entropy/threshold.")
    log_entropy: bool = _f(False, help="GRPO: log entropy/mean, entropy/max and entropy/min (over the "
                                       "completions of each micro-batch, of each completion's mean token entropy "
                                       "at --temperature, nats), as ms-swift.")
    overlong_filter: bool = _f(False, help="GRPO: truncated completions (no end of turn within "
                                           "--max_completion_length) are left out of the loss (TRL: "
                                           "mask_truncated_completions).", aliases=("mask_truncated_completions",))
    reward_funcs: List[str] = _f(help="GRPO and PPO: reward functions: built-ins (accuracy, format, react_format, "
                                      "cosine, repetition, soft_overlong), names an --external_plugins file "
                                      "registers in `orms`, or module.function (TRL style).", list_default=[])
    reward_weights: List[float] = _f(help="GRPO and PPO: one weight per reward function (default 1 each).",
                                     list_default=[])
    external_plugins: List[str] = _f(help="GRPO and PPO: Python files that register reward functions in `orms` "
                                          "(ms-swift's plugin form: `from swift.rewards import ORM, orms` or `from "
                                          "swift.plugin import ...` work without ms-swift installed).",
                                     list_default=[])
    reward_model: List[str] = _f(help="GRPO and PPO (one; its copy is PPO's value model): reward models (a "
                                      "checkpoint of --rlhf_type rm, or any sequence-classification model) scoring "
                                      "each conversation; their weights follow --reward_funcs' in --reward_weights.",
                                 list_default=[])
    reward_model_revision: List[str] = _f(help="GRPO and PPO: the hub revision of each --reward_model (one per "
                                               "reward model, in order), as --model_revision is --model's.",
                                          list_default=[])
    reward_model_type: List[str] = _f(help="GRPO and PPO: ms-swift's model type of each --reward_model (one per "
                                           "reward model). Checked for its count only: the architecture is read "
                                           "from the reward model's config.json, as for --model_type.",
                                      list_default=[])
    reward_adapters: List[str] = _f(help="GRPO and PPO: LoRA adapters merged into every --reward_model (ms-swift's "
                                         "rule), e.g. a --rlhf_type rm adapter over its base model.",
                                    list_default=[])
    reward_template: List[str] = _f(help="GRPO and PPO: the chat template each --reward_model renders its "
                                         "conversations with (one per reward model): a built-in family's official "
                                         "template (qwen2_5, qwen3, llama3_1, gpt_oss, ...); default the reward "
                                         "model's own.", list_default=[])
    reward_model_plugin: List[str] = _f(help="GRPO: how each --reward_model scores (one per reward model): default "
                                             "(its score head), genrm (a generative judge prompted to write "
                                             "'Reward: x'), or a name an --external_plugins file registers in "
                                             "ms-swift's rm_plugins.", list_default=[])
    log_completions: bool = _f(False, help="GRPO, GKD and PPO: write every rollout (prompt, completion, rewards, "
                                           "advantage) to completions.jsonl in the run directory; GRPO and GKD "
                                           "with --report_to wandb: also each logging step's completions as a W&B "
                                           "table (`completions`, as ms-swift).")
    wandb_log_unique_prompts: bool = _f(False, help="GRPO and GKD with --log_completions true and --report_to "
                                                    "wandb: keep only each prompt's first completion in the W&B "
                                                    "table (completions.jsonl keeps every one).")
    cosine_min_len_value_wrong: float = _f(-0.5, help="GRPO cosine reward: reward of a wrong answer of length 0.")
    cosine_max_len_value_wrong: float = _f(0.0, help="GRPO cosine reward: reward of a wrong answer at the "
                                                     "maximum length.")
    cosine_min_len_value_correct: float = _f(1.0, help="GRPO cosine reward: reward of a correct answer of length 0.")
    cosine_max_len_value_correct: float = _f(0.5, help="GRPO cosine reward: reward of a correct answer at the "
                                                       "maximum length.")
    cosine_max_len: Optional[int] = _f(help="GRPO cosine reward: the maximum length (default "
                                            "--max_completion_length), tokens.")
    repetition_n_grams: int = _f(3, help="GRPO repetition reward: n-gram size.")
    repetition_max_penalty: float = _f(-1.0, help="GRPO repetition reward: the most negative reward.")
    soft_max_length: Optional[int] = _f(help="GRPO soft_overlong reward: the length (tokens) past which the "
                                             "penalty is full (default --max_completion_length).")
    soft_cache_length: Optional[int] = _f(help="GRPO soft_overlong reward: the tokens before soft_max_length over "
                                               "which the penalty grows (DAPO's L_cache).")
    tau_pos: float = _f(1.0, help="GRPO --loss_type sapo: gate temperature for positive advantages.")
    tau_neg: float = _f(1.05, help="GRPO --loss_type sapo: gate temperature for negative advantages.")
    kl_in_reward: Optional[bool] = _f(help="GRPO: subtract β x each completion's KL to the reference (summed over "
                                           "its tokens, from the sampling policy) from its reward before the "
                                           "advantages, instead of a KL term in the loss. Default: false for "
                                           "--advantage_estimator grpo, true for rloo and reinforce_plus_plus "
                                           "(ms-swift); off with --scale_rewards gdpo.")
    num_generations_eval: Optional[int] = _f(help="GRPO: completions sampled per validation prompt (default "
                                                  "--num_generations).")
    min_p: float = _f(0.0, help="GRPO: min-p sampling of the rollouts: tokens less likely than min_p x the most "
                                "likely token's probability are never sampled (0: off).")
    real_tau: float = _f(0.5, help="GRPO --loss_type real: temperature tau of REAL's group loss (the gradient weight "
                                   "of each completion is bounded by 1/tau).")
    fipo_decay_rate: float = _f(32.0, help="GRPO --loss_type fipo: half-life (tokens) of the Future-KL discount.")
    fipo_clip_range: Optional[float] = _f(0.2, help="GRPO --loss_type fipo: clip of the influence weight, [1 - c, "
                                                    "1 + c] (0: none).")
    fipo_clip_high_only: bool = _f(True, help="GRPO --loss_type fipo: clip the influence weight to [1, 1 + c] "
                                              "only.")
    fipo_safety_threshold: Optional[float] = _f(4.0, help="GRPO --loss_type fipo: tokens with a negative "
                                                          "advantage and a ratio above this keep a weight in "
                                                          "[0.8, 1].")
    off_policy_sequence_mask_delta: Optional[float] = _f(help="GRPO: leave out of the loss the completions with a "
                                                              "negative advantage whose mean log-ratio (sampler − "
                                                              "policy) exceeds this (DeepSeek-V3.2); default off.")
    rollout_importance_sampling_mode: Optional[str] = _f(help="GRPO: correct for the sampling engine's log-probs "
                                                              "differing from the training forward's: "
                                                              "token_truncate, token_mask, sequence_truncate or "
                                                              "sequence_mask (default off).",
                                                         choices=("token_truncate", "token_mask",
                                                                  "sequence_truncate", "sequence_mask"))
    rollout_importance_sampling_threshold: float = _f(2.0, help="GRPO --rollout_importance_sampling_mode: the "
                                                                "truncation / mask threshold C of the ratio.")
    teacher_kl_coef: float = _f(1.0, help="GRPO with --teacher_model (OPD-RL): each completion token's advantage "
                                          "gains teacher_kl_coef x (log p_teacher - log p_policy) of that token.")
    advantage_reweight: Optional[str] = _f(help="GRPO: rlsd reweights each token's advantage by the teacher's "
                                                "log-ratio (RLSD; the teacher: --teacher_model, or the policy on the "
                                                "rows' teacher_prompt column).", choices=("rlsd",))
    rlsd_lambda: float = _f(0.5, help="GRPO RLSD: mixing weight (0: plain GRPO, 1: full reweighting).")
    rlsd_reweight_clip_range: float = _f(0.2, help="GRPO RLSD: the token weight is clipped to [1 - c, 1 + c].")
    rlsd_lambda_warmup_steps: int = _f(0, help="GRPO RLSD: optimiser steps of lambda's linear warmup from 0.")
    rlsd_lambda_decay_steps: int = _f(0, help="GRPO RLSD: optimiser steps of lambda's linear decay to 0 after "
                                              "the warmup (0: none).")
    rlsd_negative_only: bool = _f(False, help="GRPO RLSD: reweight only completions with a negative advantage.")
    sdar_loss_coef: float = _f(0.0, help="GRPO SDAR: weight of the confidence-gated distillation loss toward the "
                                         "teacher (0: off).")
    sdar_gate_beta: float = _f(5.0, help="GRPO SDAR: sharpness of the sigmoid gate on the teacher's log-ratio.")
    chord_sft_dataset: List[str] = _f(help="GRPO CHORD: expert SFT data; each training micro-batch's loss becomes "
                                           "(1 - mu) x GRPO + mu x the cross-entropy of a batch of these rows.",
                                      list_default=[])
    chord_sft_per_device_train_batch_size: Optional[int] = _f(help="GRPO CHORD: expert rows per micro-batch "
                                                                   "(default --per_device_train_batch_size).")
    chord_enable_phi_function: bool = _f(False, help="GRPO CHORD-phi: weight each expert token's cross-entropy by "
                                                     "p(1 - p).")
    chord_mu_warmup_steps: Optional[int] = _f(help="GRPO CHORD: optimiser steps over which mu rises linearly to "
                                                   "--chord_mu_peak.")
    chord_mu_decay_steps: Optional[int] = _f(help="GRPO CHORD: optimiser steps of mu's cosine decay to "
                                                  "--chord_mu_valley.")
    chord_mu_peak: Optional[float] = _f(help="GRPO CHORD: mu's peak (0-1).")
    chord_mu_valley: Optional[float] = _f(help="GRPO CHORD: mu after the decay (0-1).")
    log_rollout_offpolicy_metrics: bool = _f(False, help="GRPO: log rollout_correction/* (KL, perplexities, chi²) "
                                                         "between the sampling engine and the training forward "
                                                         "without correcting.")
    dynamic_sample: bool = _f(False, help="GRPO: DAPO's dynamic sampling: replace the groups whose completions all "
                                          "got the same reward by the groups of further prompts.")
    max_resample_times: int = _f(3, help="GRPO --dynamic_sample: most resamplings per round; a round still short "
                                         "of informative groups is trained as first generated.")
    multi_turn_scheduler: Optional[str] = _f(help="GRPO: multi-turn rollouts driven by this scheduler (ms-swift's "
                                                  "interface): tool_call_scheduler (runs the tools a subclass "
                                                  "registers), or a name an --external_plugins file registers as "
                                                  "multi_turns['name'] = Cls (see docs/grpo.md).")
    max_turns: Optional[int] = _f(help="GRPO multi-turn: most model turns per trajectory (default: no limit).")
    completion_length_limit_scope: str = _f("per_round", help="GRPO multi-turn: --max_completion_length bounds each "
                                                              "model turn (per_round) or the whole completion after "
                                                              "the prompt, tool turns included (total).",
                                            choices=("per_round", "total"))
    gym_env: Optional[str] = _f(help="GRPO multi-turn with --multi_turn_scheduler gym_scheduler: the gym environment "
                                     "(a name an --external_plugins file registers as envs['name'] = MyEnv) of rows "
                                     "whose env_config names none; implies --use_gym_env.")
    use_gym_env: Optional[bool] = _f(help="GRPO multi-turn: the environment's summed rewards (rollout_infos' "
                                          "total_reward) are a reward, gym_reward, after --reward_funcs and "
                                          "--reward_model (default: true with --gym_env).")
    use_vllm: bool = _f(False, help="GRPO: generate rollouts with vLLM in the training process (colocate; LoRA "
                                    "training, a CUDA GPU and vllm installed; see docs/grpo.md).")
    vllm_mode: str = _f("colocate", help="GRPO with --use_vllm: colocate (vLLM in the training process) or server "
                                         "(rollouts from `tunesmith rollout`, the LoRA adapter pushed over HTTP each "
                                         "round; see docs/grpo.md).", choices=("colocate", "server"))
    vllm_server_host: List[str] = _f(help="GRPO --vllm_mode server: the rollout server's host (one server).",
                                     list_default=[])
    vllm_server_port: List[int] = _f(help="GRPO --vllm_mode server: the rollout server's port.",
                                     list_default=[8000])
    vllm_server_base_url: List[str] = _f(help="GRPO --vllm_mode server: the rollout server's URL, e.g. "
                                              "http://127.0.0.1:8000 (instead of --vllm_server_host/port).",
                                         list_default=[])
    vllm_server_timeout: float = _f(240.0, help="GRPO --vllm_mode server: seconds to wait for the rollout server's "
                                               "/health/ at start.")
    async_generate: bool = _f(False, help="GRPO --vllm_mode server: the rollout server samples the next round "
                                          "while this one trains, from the weights pushed before it (rollouts one "
                                          "round off-policy, as ms-swift); not with --multi_turn_scheduler.")
    vllm_device: List[str] = _f(help="ms-swift 3.x: the GPUs vLLM rollouts run on. Compatibility only (see the table "
                                     "at the end).", list_default=["auto"])
    num_infer_workers: int = _f(1, help="ms-swift 3.x: vLLM rollout workers per node (only 1 is supported).")
    move_model_batches: Optional[int] = _f(help="ms-swift: batches of weights moved into vLLM per sync. "
                                                "Compatibility only (see the table at the end).")


@dataclass(frozen=True)
class GKDArgs:
    """GKD (`--rlhf_type gkd`, Agarwal et al. 2024): on-policy distillation from a teacher, ms-swift's flags and
    defaults (its --beta 0.5, --temperature 0.9 and --max_completion_length 512 are the shared rlhf flags)."""
    lmbda: float = _f(0.5, help="GKD: the share (0-1) of optimiser steps trained on the student's own "
                                "completions of the batch's prompts (on-policy); the others train on the "
                                "dataset's replies. Drawn per step from --seed and the step, as ms-swift.")
    seq_kd: bool = _f(False, help="GKD: sequential KD (the teacher generates the replies). Deprecated and not "
                                  "implemented in ms-swift either: true is refused.", choices=(False,))
    sft_alpha: float = _f(0.0, help="GKD: adds sft_alpha x the NLL of the dataset's reply tokens (the steps not "
                                    "on-policy), ms-swift's gkd_loss + sft_alpha * sft_loss.")
    teacher_model: Optional[str] = _f(help="GKD: the teacher, a local folder or hub id with the student's "
                                           "tokenizer (loaded frozen, with the student's --torch_dtype and "
                                           "quantisation). The same as --model with LoRA: the model with the "
                                           "adapter switched off (no copy). None: ms-swift's self-distillation, "
                                           "the student as it is now.")
    teacher_adapters: List[str] = _f(help="GKD: LoRA adapters merged into --teacher_model (e.g. an SFT "
                                          "checkpoint of it).", list_default=[])
    teacher_model_type: Optional[str] = _f(help="ms-swift's model type of --teacher_model. Compatibility only (see "
                                                "the table at the end).")
    teacher_model_revision: Optional[str] = _f(help="GKD: the hub revision of --teacher_model.")
    teacher_model_server: Optional[str] = _f(help="GKD (and GRPO's OPD-RL): the teacher behind a server (e.g. `tunesmith deploy --model "
                                                  "TEACHER`), its top --gkd_logits_topk log-probs fetched over HTTP "
                                                  "instead of loading --teacher_model; a URL, or a JSON list of "
                                                  "{\"url\", \"tags\"} routing rows by --teacher_tag_key.")
    teacher_tag_key: str = _f("dataset", help="GKD with a --teacher_model_server list: the row column whose value "
                                              "picks the teacher (the one whose tags hold it).")
    offload_teacher_model: bool = _f(False, help="GKD: keep the teacher in CPU memory and move it to the GPU only "
                                                 "for its forward passes (less GPU memory, slower).")
    teacher_deepspeed: Optional[str] = _f(help="GKD: the teacher's own DeepSpeed config (zero0..zero3_offload, "
                                               "or a JSON file or string), inference only: ZeRO-3 shards the "
                                               "frozen teacher across the processes (other stages: a whole copy "
                                               "on each, ms-swift's rule). Needs --deepspeed.")
    gkd_logits_topk: Optional[int] = _f(help="GKD: the divergence over the teacher's k most likely tokens only "
                                             "(both distributions renormalised over them); default the whole "
                                             "vocabulary.")


@dataclass(frozen=True)
class PPOArgs:
    """PPO (`--rlhf_type ppo`, Schulman et al. 2017, as TRL's PPOTrainer that ms-swift runs): ms-swift's flags and
    defaults (its --temperature 0.9 and --max_completion_length 512 are the shared rlhf flags)."""
    num_ppo_epochs: int = _f(4, help="PPO: optimisation passes over each batch of rollouts (K).")
    whiten_rewards: bool = _f(False, help="PPO: whiten the per-token rewards of each batch of rollouts (their "
                                          "variance scaled to 1, the mean kept) before the advantages.")
    kl_coef: float = _f(0.05, help="PPO: weight of the per-token KL penalty to the reference in the reward (k1: "
                                   "log pi - log pi_ref at each sampled token); 0: no reference.")
    cliprange: float = _f(0.2, help="PPO: clipping range of the policy's importance ratio, [1 - c, 1 + c].")
    vf_coef: float = _f(0.1, help="PPO: weight of the value loss in the loss.")
    cliprange_value: float = _f(0.2, help="PPO: the value prediction is clipped to old value +- this.")
    gamma: float = _f(1.0, help="PPO: discount factor of the per-token rewards (GAE's gamma).")
    lam: float = _f(0.95, help="PPO: GAE's lambda (bias-variance trade-off of the advantages).")
    num_mini_batches: int = _f(1, help="PPO: optimiser steps per pass over a batch of rollouts; each step "
                                       "trains on per_device_train_batch_size x gradient_accumulation_steps of "
                                       "them, so a batch holds num_mini_batches such steps.")
    local_rollout_forward_batch_size: int = _f(64, help="PPO: completions per forward pass without gradient "
                                                        "(log-probs, reference, values) and per generation batch.")
    num_sample_generations: int = _f(10, help="PPO (TRL): debugging sample generations over training. "
                                              "Compatibility only (see the table at the end).")
    response_length: Optional[int] = _f(help="PPO: ms-swift's deprecated name of --max_completion_length (it wins "
                                             "when given).")
    missing_eos_penalty: Optional[float] = _f(help="PPO: subtracted from the score of a completion that ends "
                                                   "without an end-of-turn token (cut at the length limit).")

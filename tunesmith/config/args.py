"""Typed arguments for every command, filled alike by flags, YAML/JSON config files and a saved args.json.

Flag names follow ms-swift (3.x names, with the 4.x renames as aliases). Parsing follows the semantics of
transformers' HfArgumentParser that ms-swift scripts rely on (`--flag true|false`, a bare `--flag` meaning true,
space-separated lists, JSON dicts, unique prefixes), but is implemented here on the standard library only: this
module must import in milliseconds so that `tunesmith --help` and argument errors answer at once.

What lives here: the field groups and each command's dataclass (every flag with its ms-swift meaning and units as
help text); COMPATIBILITY_ONLY (and COMPATIBILITY_ONLY_IN, per command), the flags accepted for ms-swift
compatibility that change nothing (with why); NOT_SUPPORTED_YET and NOT_SUPPORTED_VALUES, ms-swift flags and values
that are errors saying what to use instead; value aliases; parse_args, to_record and format_help. Every flag of
ms-swift 4.6 (tests/data/ms_swift_flags.json, from bench/extract_swift_flags.py) is one of these or a real flag.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union


class ArgError(ValueError):
    """A bad command line or config file. The CLI prints it as one line and exits with status 2."""


# Field groups. Each is a plain dataclass of fields; commands compose them (one level, fields only).

def _f(default=None, help: str = "", aliases: tuple = (), choices: tuple = (), secret: bool = False, list_default=None):
    """A flag: its default (list_default for lists), help text (ms-swift's meaning, units), other accepted names,
    allowed values, and whether it is a secret (redacted in args.json)."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "secret": secret}
    if list_default is not None:
        return field(default_factory=lambda: list(list_default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    model: Optional[str] = _f(help="Local model directory or hub id (ModelScope by default; --use_hf for Hugging Face).",
                              aliases=("model_id_or_path", "model_dir"))
    model_type: Optional[str] = _f(help="ms-swift's model type name. Compatibility only (see the table at the end).")
    model_revision: Optional[str] = _f(help="Hub revision.")
    torch_dtype: Optional[str] = _f(help="bfloat16, float16, float32 or auto (bf16 on GPUs that support it, fp32 on CPU).",
                                    choices=("bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "auto"))
    attn_impl: Optional[str] = _f(help="Attention: sdpa, eager, flash_attn (flash_attention_2), flash_attention_3.")
    use_hf: bool = _f(False, help="Download from the Hugging Face hub instead of ModelScope.")
    hub_token: Optional[str] = _f(help="Hub token (never written to disk).", secret=True)
    model_kwargs: Optional[dict] = _f(help="JSON dict passed to from_pretrained.")
    device_map: Optional[str] = _f(help="Device map for from_pretrained (e.g. auto).")
    max_model_len: Optional[int] = _f(help="Override the model's maximum length.")
    trust_remote_code: bool = _f(False, help="Allow model repositories that ship their own code.")
    new_special_tokens: List[str] = _f(help="Special tokens to add to the tokenizer.", list_default=[])


@dataclass
class QuantArgs:
    quant_method: Optional[str] = _f(help="bnb for QLoRA (4-bit or 8-bit bitsandbytes).", choices=("bnb",))
    quant_bits: Optional[int] = _f(help="4 or 8.", choices=(4, 8))
    bnb_4bit_compute_dtype: Optional[str] = _f(help="Defaults to --torch_dtype.")
    bnb_4bit_quant_type: str = _f("nf4", help="4-bit data type: nf4 (NormalFloat4, as in QLoRA) or fp4.",
                                  choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = _f(True, help="Quantise the quantisation constants too (about 0.4 bit per "
                                                    "weight saved).")
    bnb_4bit_quant_storage: Optional[str] = _f(help="dtype the packed 4-bit weights are stored in (default uint8); "
                                                    "ZeRO-3 QLoRA needs it equal to --torch_dtype.",
                                               choices=("uint8", "int8", "float16", "bfloat16", "float32"))


@dataclass
class TemplateArgs:
    template: Optional[str] = _f(help="ms-swift's template name. Training and inference use the model's own chat "
                                      "template; `tunesmith data` without --model uses it to pick the built-in tiny "
                                      "tokenizer (qwen2 by default).")
    system: Optional[str] = _f(help="Default system prompt: the text (a literal \\n in it becomes a newline) or a .txt "
                                    "file, read when the command starts (args.json keeps the text, not the path). As "
                                    "in ms-swift, a value ending in .txt must be an existing file. A system message in "
                                    "the data wins.")
    max_length: Optional[int] = _f(help="Token limit per row (each of chosen/rejected for preference data).")
    truncation_strategy: str = _f("delete", help="delete drops over-long rows (counted); left/right cut tokens.",
                                  choices=("delete", "left", "right"))
    loss_scale: Optional[str] = _f(help="default | last_round | all, optionally +ignore_empty_think. "
                                        "Default: default for sft, last_round for rlhf.")
    padding_side: str = _f("right", help="Side padding goes in a training batch.", choices=("left", "right"))
    use_chat_template: bool = _f(True, help="Render rows with the chat template (false: plain text, as swift pt).")
    enable_thinking: Optional[bool] = _f(help="Passed to chat templates that support it (Qwen3).")
    padding_free: bool = _f(False, help="Concatenate the rows of each batch into one sequence (no padding); "
                                        "attention stays within each row.")
    packing: bool = _f(False, help="Pack rows into sequences of up to --packing_length tokens before batching "
                                   "(padding-free, attention within each row; exact).")
    packing_length: Optional[int] = _f(help="Tokens per packed sequence (default --max_length).")


@dataclass
class DataArgs:
    dataset: List[str] = _f(help="Files, folders or hub ids; `path#N` samples N rows. Several are mixed.", list_default=[])
    val_dataset: List[str] = _f(help="Validation data (disables --split_dataset_ratio).", list_default=[])
    split_dataset_ratio: float = _f(0.0, help="Fraction of --dataset split off for validation.")
    data_seed: int = _f(42, help="Seed for sampling, splitting and shuffling data.")
    dataset_num_proc: int = _f(1, help="Processes for tokenisation.")
    load_from_cache_file: bool = _f(False, help="Reuse the rows an earlier run encoded from the same files with the "
                                    "same tokenizer, template and encoding flags (kept under "
                                    "$HF_DATASETS_CACHE/tunesmith-encoded; the path is printed; `tunesmith data "
                                    "cache` lists and cleans them). Default false: encode afresh, as ms-swift.")
    dataset_shuffle: bool = _f(True, help="Shuffle the training rows each epoch (seeded by --seed and the epoch; "
                                          "with --streaming within a buffer of --shuffle_buffer_size rows).")
    streaming: bool = _f(False, help="Read, encode (and with --packing pack) the training rows on the fly, each "
                                     "epoch, instead of encoding them all up front: for corpora that do not fit on "
                                     "disk or in memory. Needs --max_steps; validation comes from --val_dataset "
                                     "(read whole). sft only; `data stats` measures the first --num_rows rows.")
    shuffle_buffer_size: int = _f(1000, help="--streaming with --dataset_shuffle: rows shuffled together (a buffer "
                                             "of this many rows, as datasets' IterableDataset.shuffle).")
    val_dataset_shuffle: bool = _f(False, help="ms-swift: shuffle the validation rows. Compatibility only (see "
                                               "the table at the end).")
    columns: Optional[dict] = _f(help='JSON rename map applied before format detection, e.g. {"q": "query"}.')
    strict: bool = _f(True, help="true: the first bad row stops with its file:line. false: bad rows are dropped and counted.")
    remove_unused_columns: bool = _f(True, help="ms-swift: drop dataset columns the model does not take. "
                                                "Compatibility only (see the table at the end).")
    model_name: List[str] = _f(help="Only for swift/self-cognition data ({{NAME}}).", list_default=[])
    model_author: List[str] = _f(help="Only for swift/self-cognition data ({{AUTHOR}}).", list_default=[])
    lazy_tokenize: Optional[bool] = _f(help="ms-swift: tokenise rows when a batch needs them. Compatibility only "
                                            "(see the table at the end).")


@dataclass
class TunerArgs:
    train_type: str = _f("lora", help="lora or full.", aliases=("tuner_type", "sft_type"), choices=("lora", "full"))
    lora_rank: int = _f(8, help="LoRA rank r (inner dimension of the A and B matrices).")
    lora_alpha: int = _f(32, help="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with "
                                  "--use_rslora).")
    lora_dropout: float = _f(0.05, help="Dropout probability (0-1) on the LoRA branch's input.")
    lora_bias: str = _f("none", help="none, or all: also train every bias of the model (saved with the adapter).",
                        choices=("none", "all"))
    lora_dtype: Optional[str] = _f(help="dtype of the trained LoRA weights (A, B; DoRA magnitude), cast after the "
                                        "adapter is built. Default: peft's, float32 on a float16/bfloat16 base.",
                                   choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
    use_rslora: bool = _f(False, help="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = _f(False, help="DoRA: learn each weight's magnitude apart from its direction (slower).")
    init_weights: str = _f("true", help="true, gaussian, pissa, olora, loftq, ... (peft init_lora_weights).")
    target_modules: List[str] = _f(help="all-linear (no lm_head, no MoE routers) or module names.",
                                   list_default=["all-linear"])
    target_regex: Optional[str] = _f(help="Regex over module names (overrides --target_modules).")
    target_parameters: List[str] = _f(help="Parameter names for LoRA on raw parameters (MoE experts).",
                                      list_default=[])
    modules_to_save: List[str] = _f(help="Modules trained fully and saved with the adapter (all-embedding, all-norm).",
                                    list_default=[])
    adapters: List[str] = _f(help="Adapter checkpoints to start from (weights only).", list_default=[])
    gradient_checkpointing: bool = _f(True, help="Recompute activations in the backward pass: less memory, "
                                                 "about 30% slower.")
    use_liger_kernel: bool = _f(False, help="Liger fused kernels (GPU only; skipped with a note on CPU).")
    router_aux_loss_coef: float = _f(0.0, help="MoE load-balancing loss weight (gpt-oss example: 1e-3).")


@dataclass
class TrackArgs:
    report_to: List[str] = _f(help="tensorboard, swanlab, wandb, mlflow, trackio, all, none.",
                              list_default=["tensorboard"])
    swanlab_token: Optional[str] = _f(help="SwanLab API key (or SWANLAB_API_KEY); never written to disk.", secret=True)
    swanlab_project: str = _f("tunesmith", help="SwanLab project name.")
    swanlab_workspace: Optional[str] = _f(help="SwanLab workspace (organisation); default your own.")
    swanlab_exp_name: Optional[str] = _f(help="SwanLab experiment name (default --run_name, else the run "
                                              "folder's name).")
    swanlab_mode: str = _f("cloud", help="cloud (upload), local (local dashboard), offline (files only) or "
                                         "disabled.", choices=("cloud", "local", "offline", "disabled"))
    run_name: Optional[str] = _f(help="Run name shown in W&B, MLflow, SwanLab and Trackio (default the run folder's "
                                      "name, vN-YYYYMMDD-HHMMSS).")
    project: Optional[str] = _f(help="Trackio project (as transformers' --project; default tunesmith). Trackio writes "
                                     "to its local store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio; view "
                                     "with `trackio show`).")
    trackio_space_id: Optional[str] = _f(help="Trackio: also log live to this Hugging Face Space (user/name; needs "
                                              "network and a Hugging Face login). Default: local only.")
    trackio_bucket_id: Optional[str] = _f(help="Trackio: the Hugging Face Bucket behind --trackio_space_id "
                                               "(default: Trackio's choice).")


@dataclass
class OptimArgs:
    """The optimisation: batches, steps, optimiser, schedule, clipping, the loss's extra terms, seeds."""
    num_train_epochs: float = _f(3.0, help="Passes over the training data (fractions allowed).")
    max_steps: int = _f(-1, help="Optimiser steps; overrides --num_train_epochs when > 0.")
    per_device_train_batch_size: int = _f(1, help="Rows (or packed sequences) per micro-batch per process.",
                                          aliases=("batch_size",))
    per_device_eval_batch_size: int = _f(1, help="Rows per evaluation batch per process.")
    gradient_accumulation_steps: Optional[int] = _f(help="Default: total batch of 16 (ceil(16 / batch / processes)).")
    learning_rate: Optional[float] = _f(help="Default 1e-4 for LoRA, 1e-5 for full.")
    lr_scheduler_type: str = _f("cosine", help="Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant", "constant_with_warmup",
                                                   "cosine_with_min_lr", "polynomial", "inverse_sqrt"))
    lr_scheduler_kwargs: Optional[dict] = _f(help='e.g. {"min_lr_rate": 0.1} for cosine_with_min_lr.')
    warmup_ratio: float = _f(0.0, help="Fraction (0-1) of the optimiser steps spent warming up linearly from 0.")
    warmup_steps: int = _f(0, help="Warm-up optimiser steps (overrides --warmup_ratio when > 0).")
    weight_decay: float = _f(0.1, help="AdamW decoupled weight decay (not on biases and norms).")
    adam_beta1: float = _f(0.9, help="AdamW beta1 (first-moment decay).")
    adam_beta2: float = _f(0.95, help="AdamW beta2 (second-moment decay).")
    adam_epsilon: float = _f(1e-8, help="AdamW epsilon (added to the denominator).")
    optim: str = _f("adamw_torch", help="Optimiser; the 8-bit and paged ones need bitsandbytes.", choices=("adamw_torch", "adamw_torch_fused", "adamw", "adamw_hf", "sgd",
                                            "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit"))
    max_grad_norm: float = _f(1.0, help="Clip the gradient's global L2 norm to this (0: no clipping).")
    seed: int = _f(42, help="Seed for LoRA init, data order each epoch and dropout.")
    dataloader_num_workers: Optional[int] = _f(help="Default 0 on CPU, 1 on GPU.")


@dataclass
class OutputArgs:
    """Where a run writes and when: the output folder, checkpoints, evaluation, logging, resuming."""
    output_dir: Optional[str] = _f(help="Default output/<model name>; a vN-YYYYMMDD-HHMMSS run folder is made inside.")
    add_version: bool = _f(True, help="Make the vN-date run folder inside --output_dir.")
    save_strategy: str = _f("steps", help="When to save a checkpoint: every --save_steps, each epoch, never, or "
                                          "when --metric_for_best_model improves (best); all but no also save the last step.",
                            choices=("steps", "epoch", "no", "best"))
    save_steps: int = _f(500, help="Optimiser steps between checkpoints (--save_strategy steps).")
    save_total_limit: Optional[int] = _f(help="Keep this many newest checkpoints (plus the best).")
    save_only_model: bool = _f(False, help="Skip optimiser/scheduler/RNG state (no exact resume).")
    eval_strategy: Optional[str] = _f(help="Default: same as --save_strategy; no when there is no validation data.",
                                      aliases=("evaluation_strategy",), choices=("steps", "epoch", "no"))
    eval_steps: Optional[int] = _f(help="Default: same as --save_steps.")
    logging_steps: int = _f(5, help="Optimiser steps between log records (means over the window).")
    logging_first_step: bool = _f(True, help="Also log step 1.")
    resume_from_checkpoint: Optional[str] = _f(help="Checkpoint to continue: weights, optimiser, scheduler, RNG, data position.")
    resume_only_model: bool = _f(False, help="With --resume_from_checkpoint: weights only (data already seen is still skipped).")
    ignore_data_skip: bool = _f(False, help="On resume, start the data from the epoch's beginning instead of "
                                            "skipping the rows already seen.")
    metric_for_best_model: Optional[str] = _f(help="Validation metric that picks the best checkpoint (eval_ prefix "
                                                   "optional), e.g. loss, token_acc, rewards/accuracies (default: "
                                                   "reward for GRPO, else loss — ms-swift's rule).")
    greater_is_better: Optional[bool] = _f(help="Whether a larger --metric_for_best_model is better (default: "
                                                "false for names ending in loss, else true).")
    create_checkpoint_symlink: bool = _f(False, help="Make output_dir/best and output_dir/last links.")
    acc_strategy: str = _f("token", help="ms-swift: token accuracy or whole-sequence accuracy. Compatibility only "
                                         "(see the table at the end).", choices=("token", "seq"))
    max_new_tokens: Optional[int] = _f(help="ms-swift: generation length (tokens) for --predict_with_generate, which "
                                            "tunesmith does not support; training never generates, so it changes "
                                            "nothing here.")
    temperature: Optional[float] = _f(help="ms-swift: sampling temperature for --predict_with_generate; changes "
                                           "nothing in training (see --max_new_tokens).")


@dataclass
class DistArgs:
    """How training is spread over processes (torchrun sets the process count)."""
    deepspeed: Optional[str] = _f(help="zero0, zero1, zero2, zero3, zero2_offload, zero3_offload (presets), or a "
                                       "DeepSpeed JSON file or string; \"auto\" values come from these flags.")
    fsdp: List[str] = _f(help="PyTorch FSDP2 (fully_shard): full_shard (weights, gradients and optimiser state "
                              "sharded, as ZeRO-3) or shard_grad_op (kept whole between forward and backward, as "
                              "ZeRO-2), with auto_wrap (each decoder layer its own unit) and offload (to CPU memory); "
                              "or fsdp2 (ms-swift's preset: full_shard auto_wrap with activation checkpointing), or "
                              "a JSON file or string {\"fsdp\": ..., \"fsdp_config\": {...}}.",
                         list_default=[])
    fsdp_config: Optional[str] = _f(help="FSDP settings as a JSON file or string: reshard_after_forward, "
                                         "auto_wrap_policy (TRANSFORMER_BASED_WRAP | NO_WRAP), "
                                         "transformer_layer_cls_to_wrap, activation_checkpointing, offload_params, "
                                         "state_dict_type (weights are always saved whole, as Hugging Face "
                                         "folders; the optimiser state sharded).")


@dataclass
class RLHFArgs:
    rlhf_type: str = _f("dpo", help="Method: dpo (with --loss_type variants), simpo, orpo, cpo, kto, grpo "
                                    "(reinforcement learning with reward functions) or rm (a reward model).",
                        choices=("dpo", "simpo", "orpo", "cpo", "kto", "grpo", "rm"))
    beta: Optional[float] = _f(help="Default 0.1 (SimPO 2.0; GRPO 0.04, ms-swift's default — TRL's is 0: "
                                    "the weight of the k3 KL to the reference, none at 0).")
    loss_type: List[str] = _f(help="DPO loss variant(s): sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, "
                                   "sppo_hard, apo_zero, apo_down, discopop, sft; several with --loss_weights. "
                                   "CPO/SimPO: one of sigmoid, hinge, ipo, simpo.",
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


@dataclass
class GRPOArgs:
    """GRPO (`--rlhf_type grpo`): ms-swift's flags and defaults; where TRL's defaults differ, the help says so."""
    num_generations: int = _f(8, help="GRPO: completions sampled per prompt (G, the group).")
    max_completion_length: int = _f(512, help="GRPO: most tokens generated per completion.")
    temperature: float = _f(0.9, help="GRPO: sampling temperature of the rollouts (ms-swift 0.9; TRL 1.0).")
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
    reward_funcs: List[str] = _f(help="GRPO: reward functions: built-ins (accuracy, format, react_format, cosine, "
                                      "repetition, soft_overlong), names an --external_plugins file registers in "
                                      "`orms`, or module.function (TRL style).", list_default=[])
    reward_weights: List[float] = _f(help="GRPO: one weight per reward function (default 1 each).", list_default=[])
    external_plugins: List[str] = _f(help="GRPO: Python files that register reward functions in `orms` (ms-swift's "
                                          "plugin form: `from swift.rewards import ORM, orms` or `from swift.plugin "
                                          "import ...` work without ms-swift installed).", list_default=[])
    reward_model: List[str] = _f(help="GRPO: reward models (a checkpoint of --rlhf_type rm, or any "
                                      "sequence-classification model) scoring each conversation; their weights "
                                      "follow --reward_funcs' in --reward_weights.", list_default=[])
    log_completions: bool = _f(False, help="GRPO: write every rollout (prompt, completion, rewards, advantage) to "
                                           "completions.jsonl in the run directory.")
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
    dynamic_sample: bool = _f(False, help="GRPO: DAPO's dynamic sampling: replace the groups whose completions all "
                                          "got the same reward by the groups of further prompts.")
    max_resample_times: int = _f(3, help="GRPO --dynamic_sample: most resamplings per round; a round still short "
                                         "of informative groups is trained as first generated.")
    use_vllm: bool = _f(False, help="GRPO: generate rollouts with vLLM in the training process (colocate; LoRA "
                                    "training, a CUDA GPU and vllm installed; see the README).")
    vllm_mode: str = _f("colocate", help="GRPO with --use_vllm: colocate (in the training process) or server.",
                        choices=("colocate", "server"))
    vllm_device: List[str] = _f(help="ms-swift 3.x: the GPUs vLLM rollouts run on. Compatibility only (see the table "
                                     "at the end).", list_default=["auto"])
    num_infer_workers: int = _f(1, help="ms-swift 3.x: vLLM rollout workers per node (only 1 is supported).")
    move_model_batches: Optional[int] = _f(help="ms-swift: batches of weights moved into vLLM per sync. "
                                                "Compatibility only (see the table at the end).")


@dataclass
class GenerationArgs:
    max_new_tokens: Optional[int] = _f(help="Most tokens generated per reply (default: up to the model's limit).")
    temperature: Optional[float] = _f(help="Sampling temperature; 0 = greedy.")
    top_k: Optional[int] = _f(help="Sample from the k most likely tokens only.")
    top_p: Optional[float] = _f(help="Nucleus sampling: the smallest token set with this much probability (0-1).")
    repetition_penalty: Optional[float] = _f(help="Penalty (> 1 discourages, 1 = none) on tokens already in the "
                                                  "prompt or reply, as in transformers.")
    num_beams: int = _f(1, help="Beam search width (1: no beam search).")
    stream: Optional[bool] = _f(help="Stream replies as they are generated (chat; batch inference prints each row's "
                                     "reply as it streams, one row at a time).")
    stop_words: List[str] = _f(help="Stop strings (the reply is cut before them).", list_default=[])
    logprobs: bool = _f(False, help="Return each reply token's log-probability (nats) in the result lines.")
    top_logprobs: Optional[int] = _f(help="Also return this many most likely alternatives per token.")
    n: int = _f(1, help="Replies per prompt (batch inference writes them under `choices`).")
    seed: int = _f(42, help="Seeds sampling once at start-up (a request's own seed reseeds that request).")


@dataclass
class CheckpointArgs:
    adapters: List[str] = _f(help="LoRA checkpoints (name=path pairs for deploy).", list_default=[])
    ckpt_dir: Optional[str] = _f(help="ms-swift 2.x/3.x name: an adapter or a full checkpoint (resolved to "
                                      "--adapters or --model).")
    load_args: bool = _f(True, help="Read the checkpoint's args.json (base model, template, system, dtype).")
    load_data_args: bool = _f(False, help="Also reuse the run's data arguments (infer on its validation split).")


@dataclass
class VllmArgs:
    # ms-swift's VllmArguments with its defaults (3.x names as aliases): the engine of `--infer_backend vllm` (infer,
    # deploy, eval) and of GRPO's `--use_vllm` rollouts; tunesmith/backends.py turns them into vLLM's kwargs.
    vllm_gpu_memory_utilization: float = _f(0.9, help="vLLM: fraction (0-1) of each GPU's memory for weights and "
                                                      "KV cache.", aliases=("gpu_memory_utilization",))
    vllm_tensor_parallel_size: int = _f(1, help="vLLM: GPUs the model is split across.",
                                        aliases=("tensor_parallel_size",))
    vllm_pipeline_parallel_size: int = _f(1, help="vLLM: pipeline stages.", aliases=("pipeline_parallel_size",))
    vllm_enable_expert_parallel: bool = _f(False, help="vLLM: expert parallelism for MoE layers.")
    vllm_max_num_seqs: int = _f(256, help="vLLM: sequences per scheduling step.", aliases=("max_num_seqs",))
    vllm_max_model_len: Optional[int] = _f(help="vLLM: context length in tokens (default --max_model_len, else "
                                                "the model's).")
    vllm_disable_custom_all_reduce: bool = _f(True, help="vLLM: use NCCL instead of the custom all-reduce kernel "
                                                         "(ms-swift's default, for stability).",
                                              aliases=("disable_custom_all_reduce",))
    vllm_enforce_eager: bool = _f(False, help="vLLM: no CUDA graphs (less memory, slower).",
                                  aliases=("enforce_eager",))
    vllm_limit_mm_per_prompt: Optional[dict] = _f(help="vLLM: JSON, multimodal items per prompt.",
                                                  aliases=("limit_mm_per_prompt",))
    vllm_max_lora_rank: int = _f(16, help="vLLM: largest LoRA rank served (must be >= each adapter's r).")
    vllm_enable_lora: Optional[bool] = _f(help="vLLM: LoRA support; default on when --adapters are given.")
    vllm_enable_prefix_caching: Optional[bool] = _f(help="vLLM: automatic prefix caching (default: vLLM's).",
                                                    aliases=("enable_prefix_caching",))
    vllm_use_async_engine: Optional[bool] = _f(help="vLLM: use AsyncLLMEngine. Compatibility only (see the table "
                                                    "at the end).")
    vllm_quantization: Optional[str] = _f(help="vLLM: quantization method (awq, gptq, fp8, ...).")
    vllm_reasoning_parser: Optional[str] = _f(help="vLLM: reasoning parser name (e.g. qwen3). Compatibility only "
                                                    "(see the table at the end).")
    vllm_disable_cascade_attn: bool = _f(False, help="vLLM: disable cascade attention.")
    vllm_mm_processor_cache_gb: Optional[float] = _f(help="vLLM: multimodal processor cache (GiB).")
    vllm_speculative_config: Optional[dict] = _f(help="vLLM: JSON speculative-decoding config.")
    vllm_engine_kwargs: Optional[dict] = _f(help="vLLM: JSON of extra engine arguments (win over the flags).")
    vllm_data_parallel_size: int = _f(1, help="vLLM: data parallel replicas (ms-swift rollout).")


@dataclass
class InferBackendArgs(VllmArgs):
    # ms-swift's engine flags (VllmArguments, SglangArguments, LmdeployArguments) with its defaults; the 3.x names
    # are aliases. tunesmith/backends.py turns them into each engine's constructor kwargs.
    infer_backend: str = _f("transformers", help="transformers (pt; built in), or vllm, sglang, lmdeploy (an NVIDIA "
                                                 "GPU and that package installed).",
                            choices=("pt", "transformers", "vllm", "sglang", "lmdeploy"))
    max_batch_size: int = _f(32, help="Sequences generated together (continuous batching: new requests join between "
                                      "decoding steps, finished ones leave). -1: no limit.")
    result_path: Optional[str] = _f(help="infer: the result jsonl. deploy: one jsonl line per finished request.")
    write_batch_size: int = _f(1000, help="ms-swift: rows per write of the result file. Compatibility only (see "
                                          "the table at the end).")
    metric: Optional[str] = _f(help="infer: score the replies against the labels: acc (exact match) or rouge "
                                    "(ROUGE-1/2/L, BLEU-4).", choices=("acc", "rouge"))
    # SGLang
    sglang_tp_size: int = _f(1, help="SGLang: tensor parallel GPUs.")
    sglang_pp_size: int = _f(1, help="SGLang: pipeline parallel stages.")
    sglang_dp_size: int = _f(1, help="SGLang: data parallel replicas.")
    sglang_ep_size: int = _f(1, help="SGLang: expert parallel size.")
    sglang_enable_ep_moe: bool = _f(False, help="SGLang: expert parallelism for MoE (removed in recent SGLang).")
    sglang_mem_fraction_static: Optional[float] = _f(help="SGLang: fraction (0-1) of GPU memory for weights and KV "
                                                          "cache; lower it on out-of-memory.")
    sglang_context_length: Optional[int] = _f(help="SGLang: context length in tokens (default --max_model_len, "
                                                   "else the model's).")
    sglang_disable_cuda_graph: bool = _f(False, help="SGLang: no CUDA graphs.")
    sglang_quantization: Optional[str] = _f(help="SGLang: quantization method.")
    sglang_kv_cache_dtype: str = _f("auto", help="SGLang: KV cache dtype (auto, fp8_e5m2, fp8_e4m3).")
    sglang_enable_dp_attention: bool = _f(False, help="SGLang: data-parallel attention (dp_size must equal tp_size).")
    sglang_disable_custom_all_reduce: bool = _f(True, help="SGLang: use NCCL instead of the custom all-reduce.")
    sglang_speculative_algorithm: Optional[str] = _f(help="SGLang: EAGLE, EAGLE3, NEXTN, STANDALONE or NGRAM.")
    sglang_speculative_num_steps: Optional[int] = _f(help="SGLang: draft steps per speculative round.")
    sglang_speculative_eagle_topk: Optional[int] = _f(help="SGLang: EAGLE draft branches kept per step.")
    sglang_speculative_num_draft_tokens: Optional[int] = _f(help="SGLang: draft tokens verified per round.")
    # LMDeploy (ms-swift 4.x names; the 3.x names and their dashed spellings are aliases)
    lmdeploy_tp: int = _f(1, help="LMDeploy: tensor parallel GPUs.", aliases=("tp",))
    lmdeploy_session_len: Optional[int] = _f(help="LMDeploy: longest session in tokens (prompt + reply; default "
                                                  "--max_model_len, else the model's).", aliases=("session_len",))
    lmdeploy_cache_max_entry_count: float = _f(0.8, help="LMDeploy: fraction (0-1) of free GPU memory for the KV "
                                                         "cache.", aliases=("cache_max_entry_count",))
    lmdeploy_quant_policy: int = _f(0, help="LMDeploy: KV cache quantisation: 0 (none), 4 or 8 bits.",
                                    aliases=("quant_policy",), choices=(0, 4, 8))
    lmdeploy_vision_batch_size: int = _f(1, help="LMDeploy: images per vision-encoder batch. Compatibility only "
                                                 "(see the table at the end).",
                                         aliases=("vision_batch_size",))


@dataclass
class DeployServerArgs:
    host: str = _f("127.0.0.1", help="Listen address; 0.0.0.0 exposes the server to the network.")
    port: int = _f(8000, help="TCP port to listen on.")
    api_key: Optional[str] = _f(help="Require 'Authorization: Bearer KEY' (never written to disk; or set "
                                     "TUNESMITH_API_KEY, which keeps it out of the process list).", secret=True)
    served_model_name: Optional[str] = _f(help="Model id clients send (default the model or checkpoint "
                                               "folder's name).")
    ssl_keyfile: Optional[str] = _f(help="TLS private key file (PEM), with --ssl_certfile: serve HTTPS.")
    ssl_certfile: Optional[str] = _f(help="TLS certificate file (PEM).")
    owned_by: str = _f("tunesmith", help="owned_by field of /v1/models.")
    log_interval: int = _f(20, help="ms-swift: seconds between throughput log lines. Compatibility only (see the "
                                    "table at the end).")
    max_logprobs: int = _f(20, help="Largest top_logprobs a request may ask for.")
    max_request_bytes: int = _f(8 << 20, help="Largest request body in bytes (default 8 MiB); a larger one is "
                                              "refused (413) before it is read or tokenised. 0: no limit.")
    verbose: bool = _f(True, help="Log each HTTP request (uvicorn info level).")


@dataclass
class ExportOutputArgs:
    output_dir: Optional[str] = _f(help="Default <checkpoint>-merged.")
    merge_lora: bool = _f(False, help="Merge the --adapters into the base weights and save a full model.")
    safe_serialization: bool = _f(True, help="Save .safetensors (false: PyTorch .bin).")
    max_shard_size: str = _f("5GB", help="Largest weight file, e.g. 5GB or 500MB.")
    exist_ok: bool = _f(False, help="Write into an existing --output_dir instead of stopping.")
    to_peft_format: bool = _f(False, help="ms-swift: export in PEFT format. Compatibility only (see the table at the "
                                          "end).")


# ms-swift flags that tunesmith accepts but that change nothing: each is listed with why in COMPATIBILITY_ONLY (or,
# where the same name does something in another command, in that command's COMPATIBILITY_ONLY_IN). A flag whose
# value matters is pinned by `choices` to what tunesmith does, so that any other value is an error (the reason is
# in NOT_SUPPORTED_VALUES).

@dataclass
class SwiftCompatArgs:
    """ms-swift flags of every command that change nothing in tunesmith."""
    tuner_backend: str = _f("peft", help="ms-swift: peft or unsloth. Compatibility only (see the table at the end).",
                            choices=("peft",))
    use_swift_lora: bool = _f(False, help="ms-swift: its own LoRA layers. Compatibility only (see the table at the "
                                          "end).", choices=(False,))
    template_backend: str = _f("swift", help="ms-swift: its own templates (swift) or the tokenizer's (jinja). "
                                             "Compatibility only (see the table at the end).",
                               choices=("swift", "jinja"))
    packing_strategy: str = _f("binpack", help="ms-swift: binpack (best-fit decreasing) or sequential. "
                                               "Compatibility only (see the table at the end).", choices=("binpack",))
    packing_num_proc: int = _f(1, help="ms-swift: processes for --packing. Compatibility only (see the table at the "
                                       "end).")
    enable_npu_model_patch: bool = _f(True, help="ms-swift: Ascend NPU model patches. Compatibility only (see the "
                                                 "table at the end).")
    is_binary_loss_scale: Optional[bool] = _f(help="ms-swift: whether the loss scale is 0/1 per token. "
                                                   "Compatibility only (see the table at the end).")
    log_level: Optional[str] = _f(help="ms-swift/transformers: log verbosity. Compatibility only (see the table at "
                                       "the end).")


@dataclass
class TrainerCompatArgs:
    """transformers Trainer / ms-swift trainer flags that change nothing in tunesmith's training loop."""
    average_tokens_across_devices: bool = _f(True, help="transformers: divide the loss by the tokens of all "
                                                        "processes. Compatibility only (see the table at the end).",
                                             choices=(True,))
    gradient_checkpointing_kwargs: Optional[dict] = _f(help="transformers: JSON for gradient_checkpointing_enable. "
                                                            "Compatibility only (see the table at the end).")
    ddp_find_unused_parameters: Optional[bool] = _f(help="DDP find_unused_parameters. Compatibility only (see the "
                                                         "table at the end).")
    ddp_broadcast_buffers: Optional[bool] = _f(help="DDP broadcast_buffers. Compatibility only (see the table at the "
                                                    "end).")
    ddp_bucket_cap_mb: Optional[int] = _f(help="DDP bucket_cap_mb. Compatibility only (see the table at the end).")
    ddp_static_graph: Optional[bool] = _f(help="DDP static_graph. Compatibility only (see the table at the end).")
    dataloader_pin_memory: bool = _f(True, help="transformers: pinned host memory for batches. Compatibility only "
                                                "(see the table at the end).")
    dataloader_persistent_workers: bool = _f(True, help="transformers: keep loader workers between epochs. "
                                                        "Compatibility only (see the table at the end).")
    dataloader_prefetch_factor: Optional[int] = _f(help="transformers: batches prefetched per worker. Compatibility "
                                                        "only (see the table at the end).")
    dataloader_multiprocessing_context: Optional[str] = _f(help="transformers: start method of loader workers. "
                                                                "Compatibility only (see the table at the end).",
                                                           choices=("fork", "spawn", "forkserver"))
    dataloader_in_order: Optional[bool] = _f(help="transformers: yield streamed batches in dispatch order. "
                                                  "Compatibility only (see the table at the end).")
    disable_tqdm: Optional[bool] = _f(help="transformers: no progress bar. Compatibility only (see the table at the "
                                           "end).")
    log_level_replica: Optional[str] = _f(help="transformers: log verbosity of the other ranks. Compatibility only "
                                               "(see the table at the end).")
    log_on_each_node: bool = _f(True, help="transformers: log on each node. Compatibility only (see the table at the "
                                           "end).")
    skip_memory_metrics: bool = _f(True, help="transformers: skip the memory profiler. Compatibility only (see the "
                                              "table at the end).")
    check_model: bool = _f(True, help="ms-swift: check local model files against the hub. Compatibility only (see "
                                      "the table at the end).")
    torch_empty_cache_steps: Optional[int] = _f(help="transformers: empty the CUDA cache every N steps. "
                                                     "Compatibility only (see the table at the end).")
    local_rank: int = _f(-1, help="transformers: this process's local rank. Compatibility only (see the table at "
                                  "the end).")
    do_train: bool = _f(False, help="transformers: for example scripts. Compatibility only (see the table at the "
                                    "end).")
    do_eval: bool = _f(False, help="transformers: for example scripts. Compatibility only (see the table at the "
                                   "end).")
    do_predict: bool = _f(False, help="transformers: for example scripts. Compatibility only (see the table at the "
                                      "end).")
    prediction_loss_only: bool = _f(False, help="transformers: evaluation returns the loss only. Compatibility only "
                                                "(see the table at the end).")
    eval_accumulation_steps: Optional[int] = _f(help="transformers: move predictions to the CPU every N steps. "
                                                     "Compatibility only (see the table at the end).")
    eval_do_concat_batches: bool = _f(True, help="transformers: concatenate predictions across batches. "
                                                 "Compatibility only (see the table at the end).")
    eval_use_gather_object: bool = _f(False, help="transformers: gather non-tensor predictions. Compatibility only "
                                                  "(see the table at the end).")
    batch_eval_metrics: bool = _f(False, help="transformers: compute_metrics per batch. Compatibility only (see the "
                                              "table at the end).")
    include_for_metrics: List[str] = _f(help="transformers: extra inputs for compute_metrics. Compatibility only "
                                             "(see the table at the end).", list_default=[])
    label_names: List[str] = _f(help="transformers: the batch keys holding labels. Compatibility only (see the "
                                     "table at the end).", list_default=[])
    restore_callback_states_from_checkpoint: bool = _f(False, help="transformers: restore callback states on "
                                                                   "resume. Compatibility only (see the table at "
                                                                   "the end).")
    ds3_gather_for_generation: bool = _f(True, help="ms-swift: gather ZeRO-3 weights to generate. Compatibility only "
                                                    "(see the table at the end).")
    use_logits_to_keep: Optional[bool] = _f(help="ms-swift: compute logits only from the first label on. "
                                                 "Compatibility only (see the table at the end).")
    generation_max_length: Optional[int] = _f(help="transformers: --predict_with_generate length. Compatibility only "
                                                   "(see the table at the end).")
    generation_num_beams: Optional[int] = _f(help="transformers: --predict_with_generate beams. Compatibility only "
                                                  "(see the table at the end).")


@dataclass
class TrainGenerationCompatArgs:
    """ms-swift's generation flags, which training accepts for --predict_with_generate: they change nothing here."""
    top_k: Optional[int] = _f(help="GRPO: sample rollouts from the k most likely tokens (other methods: ms-swift's "
                                   "--predict_with_generate only).")
    top_p: Optional[float] = _f(help="GRPO: nucleus sampling of the rollouts (other methods: ms-swift's "
                                     "--predict_with_generate only).")
    repetition_penalty: Optional[float] = _f(help="GRPO: repetition penalty of the rollouts (other methods: "
                                                  "ms-swift's --predict_with_generate only).")
    num_beams: int = _f(1, help="ms-swift: beam width for --predict_with_generate.")
    stream: bool = _f(True, help="ms-swift: stream replies (inference only).")
    stop_words: List[str] = _f(help="ms-swift: stop strings for --predict_with_generate.", list_default=[])
    logprobs: bool = _f(False, help="ms-swift: return log-probabilities (inference only).")
    top_logprobs: Optional[int] = _f(help="ms-swift: alternatives per token (inference only).")
    generation_config: Optional[str] = _f(help="transformers: a GenerationConfig for --predict_with_generate.")


@dataclass
class EvalServerCompatArgs:
    """ms-swift's eval deploys the model behind a local server first; tunesmith's evaluates in-process."""
    host: str = _f("127.0.0.1", help="ms-swift: the evaluation server's address.")
    port: int = _f(8000, help="ms-swift: the evaluation server's port.")
    served_model_name: Optional[str] = _f(help="ms-swift: the evaluation server's model id.")
    ssl_keyfile: Optional[str] = _f(help="ms-swift: the evaluation server's TLS key.")
    ssl_certfile: Optional[str] = _f(help="ms-swift: the evaluation server's TLS certificate.")
    owned_by: str = _f("swift", help="ms-swift: the evaluation server's owned_by field.")
    max_logprobs: int = _f(20, help="ms-swift: the evaluation server's top_logprobs limit.")
    log_interval: int = _f(20, help="ms-swift: seconds between the evaluation server's throughput lines.")


@dataclass
class EvalArgs:
    eval_backend: str = _f("Native", help="Native (tunesmith's own evaluator).",
                           choices=("Native", "OpenCompass", "VLMEvalKit"))
    eval_dataset: List[str] = _f(help="ceval, cmmlu, mmlu, gsm8k, general_mcq, general_qa, humaneval.",
                                 list_default=[])
    eval_limit: Optional[int] = _f(help="At most this many samples per subset (the first ones).")
    eval_dataset_args: Optional[dict] = _f(help='JSON per dataset, e.g. {"ceval": {"local_path": "data/ceval", '
                                                '"subset_list": ["law"], "few_shot_num": 0}}.')
    eval_generation_config: Optional[dict] = _f(help='JSON: max_tokens, temperature, top_p, top_k, stop, seed.')
    eval_output_dir: Optional[str] = _f(help="Default <checkpoint>/eval_output (or ./eval_output); a <time> "
                                             "folder is made inside.")
    eval_url: Optional[str] = _f(help="An OpenAI-compatible endpoint to evaluate, e.g. http://127.0.0.1:8000/v1 "
                                      "(--model names the served model; default its first).")
    eval_num_proc: int = _f(16, help="Concurrent requests to --eval_url; processes for code tests.")
    extra_eval_args: Optional[dict] = _f(help="EvalScope backend options (not used by the native evaluator).")
    local_dataset: bool = _f(False, help="ms-swift: use EvalScope's downloaded dataset archive. Compatibility only "
                                         "(see the table at the end).")
    mcq_scoring: Optional[str] = _f(help="Multiple choice: likelihood of each option letter (default for local "
                                         "models) or generation + extraction (the only way for --eval_url).",
                                    choices=("likelihood", "generation"))
    compare_base: bool = _f(True, help="With --adapters, also evaluate the base model (adapter off) side by side.")
    base_model: Optional[str] = _f(help="Evaluate this model as the base next to --model (e.g. a merged export).")
    allow_code_execution: bool = _f(False, help="humaneval: run the generated code (in a subprocess with limits).")
    api_key: Optional[str] = _f(help="Bearer key for --eval_url (never written to disk).", secret=True)
    max_batch_size: int = _f(8, help="Local models: questions per forward pass / generation batch.")


@dataclass
class SftArguments(ModelArgs, QuantArgs, TemplateArgs, DataArgs, TunerArgs, TrackArgs, OutputArgs, OptimArgs,
                   DistArgs, SwiftCompatArgs, TrainerCompatArgs, TrainGenerationCompatArgs):
    """`tunesmith sft`."""


@dataclass
class RLHFArguments(VllmArgs, GRPOArgs, RLHFArgs, SftArguments):
    """`tunesmith rlhf` (and `tunesmith dpo`)."""


@dataclass
class InferArguments(GenerationArgs, InferBackendArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs, DataArgs,
                     SwiftCompatArgs):
    """`tunesmith infer`: interactive chat, or batch over --val_dataset."""


@dataclass
class DeployArguments(DeployServerArgs, InferArguments):
    """`tunesmith deploy`: OpenAI-compatible server."""


@dataclass
class ExportArguments(ExportOutputArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs, SwiftCompatArgs,
                      GenerationArgs, DataArgs):
    """`tunesmith export`: merge LoRA adapters into the base model."""


@dataclass
class DataCommandArguments(ModelArgs, TemplateArgs, DataArgs):
    """`tunesmith data ACTION`: inspect, validate, convert, split, stats, cache."""
    action: Optional[str] = _f(help="inspect | validate | convert | split | stats | cache",
                               choices=("inspect", "validate", "convert", "split", "stats", "cache"))
    output: Optional[str] = _f(help="Output file (convert) or folder (split).", aliases=("output_dir",))
    row: int = _f(0, help="inspect: which row to show, 0-based among the usable rows (with --strict false bad rows "
                              "are skipped; each row shown names its file:line).")
    num_rows: Optional[int] = _f(help="inspect: how many rows to show (default 1). stats --streaming true: how "
                                      "many rows to measure, from the start (default 10000).")
    val_ratio: float = _f(0.1, help="split: fraction for validation (default 9:1).")
    clean: bool = _f(False, help="cache: remove the encoded datasets kept for --load_from_cache_file (all of them, "
                                 "or those unused for --older_than_days).")
    older_than_days: Optional[float] = _f(help="cache --clean true: only entries not used for this many days.")
    rlhf: bool = _f(False, help="Treat the data as preference data (chosen/rejected).")
    rlhf_type: Optional[str] = _f(help="The preference method the data is for (implies --rlhf): dpo, simpo, orpo "
                                       "or cpo need a rejected reply in every row, kto a label or a pair.",
                                  choices=("dpo", "simpo", "orpo", "cpo", "kto"))


@dataclass
class ReportArguments:
    """`tunesmith report RUN_DIR [RUN_DIR ...]`: rebuild a run's plots and report.html, or compare runs."""
    runs: List[str] = _f(help="Run directories (output/<model>/vN-…); also given positionally.", list_default=[])
    output: Optional[str] = _f(help="Comparison report path (default compare_report.html; one run: its report.html).")


def _same(reason: str, *names: str) -> dict:
    """{name: reason} for flags that share one reason."""
    return dict.fromkeys(names, reason)


_GRPO = ("that GRPO option is not implemented yet; tunesmith's GRPO (--rlhf_type grpo) has the flags tunesmith "
         "rlhf --help lists")
_PPO = ("PPO (--rlhf_type ppo) is not planned yet; tunesmith rlhf trains dpo, simpo, orpo, cpo, kto and grpo "
        "(reinforcement learning with reward functions)")
_GKD = "GKD distillation (--rlhf_type gkd) is not implemented; tunesmith rlhf trains dpo, simpo, orpo, cpo and kto"
_TUNER = ("that ms-swift tuner is not implemented; tunesmith trains --train_type lora (also --use_dora, --use_rslora, "
          "--init_weights pissa/olora/loftq) or full")
_MULTIMODAL = "multimodal models are not supported yet; tunesmith trains text-only causal language models"
_HUB = ("pushing to a hub is not implemented; upload the output folder afterwards, e.g. `huggingface-cli upload "
        "REPO_ID OUTPUT_DIR` or `modelscope upload REPO_ID OUTPUT_DIR`")
_TASK = ("only chat/causal language modelling is supported (task_type causal_lm); classification, embedding and "
         "reranker models are not")
_EVAL_IN_TRAINING = ("benchmarks do not run during training; evaluate a checkpoint afterwards with `tunesmith eval "
                     "--adapters CKPT --eval_dataset ...` (validation loss and token_acc are logged during training)")
_MCORE = "Megatron-Core conversion is not supported: tunesmith reads and writes Hugging Face checkpoints only"
_QUANT_EXPORT = ("quantised export (awq, gptq, fp8, bnb) is not supported yet; tunesmith export merges LoRA "
                 "adapters (--merge_lora true)")
_CACHED = ("pre-tokenised dataset caches are not supported; pass the data itself with --dataset (tunesmith tokenises "
           "it once before training; `tunesmith data stats` shows the token counts)")
_RAY = "Ray is not supported; launch several processes with NPROC_PER_NODE (and NNODES) as with ms-swift"
_SAMPLING = ("length-grouped or sorted sampling is not implemented; training batches are drawn in a seeded shuffled "
             "order (--dataset_shuffle false keeps the file order)")

# ms-swift flags that exist upstream but that tunesmith does not implement yet. They are errors, never silently
# ignored: a script relying on them must hear that the behaviour is not there. The value says what to do instead.
# (A name that is a real flag of some command is an error only in the commands that lack it.)
NOT_SUPPORTED_YET = {
    "custom_dataset_info": "pass the data files directly with --dataset",
    "custom_register_path": "tunesmith uses the model's own chat template; no plugins are needed",
    "neftune_noise_alpha": "NEFTune embedding noise is not implemented; drop the flag",
    "lorap_lr_ratio": "LoRA+ is not implemented; use --learning_rate for both LoRA matrices",
    "predict_with_generate": "use tunesmith infer on the checkpoint",
    "freeze_llm": _MULTIMODAL,
    "freeze_vit": _MULTIMODAL,
    "freeze_aligner": _MULTIMODAL,
    "max_pixels": _MULTIMODAL,
    "agent_template": "agent templates are not supported yet; tool calls are rendered by the model's own chat "
                      "template",
    "sequence_parallel_size": "sequence parallelism is not supported; use --deepspeed zero3 and "
                              "--gradient_checkpointing for long sequences",
    "lora_modules": "removed in ms-swift 3.x; use --adapters",
    "f_divergence_type": "only DPO's reverse-KL objective is implemented",
    "use_weighting": "WPO weighting is not implemented",
    # tuners other than LoRA, and optimiser plugins
    **_same(_TUNER, "adalora_beta1", "adalora_beta2", "adalora_deltaT", "adalora_init_r", "adalora_orth_reg_weight",
            "adalora_target_r", "adalora_tfinal", "adalora_tinit", "adapter_act", "adapter_length", "boft_block_num",
            "boft_block_size", "boft_dropout", "boft_n_butterfly_factor", "fourier_n_frequency", "fourier_scaling",
            "llamapro_num_groups", "llamapro_num_new_blocks", "reft_args", "reft_intervention_type", "reft_layer_key",
            "reft_layers", "reft_rank", "vera_d_initial", "vera_dropout", "vera_projection_prng_key", "vera_rank"),
    **_same("LoRA-GA initialisation is not implemented; --init_weights takes true, gaussian, pissa, olora, loftq, ...",
            "lora_ga_batch_size", "lora_ga_direction", "lora_ga_iters", "lora_ga_max_length", "lora_ga_scale",
            "lora_ga_stable_gamma"),
    **_same("GaLore is not implemented; for low memory use --train_type lora (or QLoRA: --quant_method bnb "
            "--quant_bits 4), or full training with --deepspeed zero2/zero3 and an 8-bit --optim",
            "use_galore", "galore_cos_threshold", "galore_gamma_proj", "galore_optim_per_parameter",
            "galore_proj_bits", "galore_proj_group_size", "galore_proj_quant", "galore_proj_type",
            "galore_quantization", "galore_queue_size", "galore_rank", "galore_scale", "galore_target_modules",
            "galore_update_proj_gap", "galore_with_embedding"),
    **_same("LISA layer sampling is not implemented; use --train_type lora or full",
            "lisa_activated_layers", "lisa_step_interval"),
    **_same("optimiser plugins (GaLore, APOLLO, LoRA+, Muon, ...) are not implemented; --optim chooses adamw_torch, "
            "adamw_torch_fused, sgd, adamw_8bit, paged_adamw_8bit or paged_adamw_32bit",
            "optimizer", "optim_args", "optim_target_modules"),
    **_same("partial full fine-tuning (freezing or unfreezing parameters by name) is not implemented; use --train_type "
            "lora (with --modules_to_save for modules trained fully) or full",
            "freeze_parameters", "freeze_parameters_ratio", "freeze_parameters_regex", "trainable_parameters",
            "trainable_parameters_regex"),
    **_same(_MULTIMODAL, "vit_lr", "aligner_lr", "vit_gradient_checkpointing", "norm_bbox"),
    # losses, metrics and trainer plugins
    "enable_dft_loss": "the DFT loss is not implemented; sft trains the plain cross-entropy",
    "enable_channel_loss": "per-channel losses are not implemented; sft logs one loss",
    "mrl_dims": _TASK,
    "eval_metric": "metric plugins are not supported; validation logs loss and token_acc",
    "callbacks": "trainer callback plugins are not supported; logging.jsonl and --report_to carry every record",
    "early_stop_interval": "early stopping is not implemented; --save_strategy best (with --metric_for_best_model) "
                           "keeps the best checkpoint",
    "label_smoothing_factor": "label smoothing is not implemented for sft (in rlhf, --label_smoothing is cDPO's)",
    "liger_kernel_config": "--use_liger_kernel applies Liger's default kernels; they cannot be chosen",
    # what the training loop does its own way
    **_same("use --torch_dtype bfloat16 or float16: tunesmith trains in the model's dtype and has no separate "
            "mixed-precision switch", "bf16", "fp16"),
    **_same("evaluation runs in --torch_dtype", "bf16_full_eval", "fp16_full_eval"),
    "tf32": "TF32 matmuls follow PyTorch's default; set torch.backends.cuda.matmul.allow_tf32 yourself if needed",
    **_same("torch.compile is not wired in yet; drop the flag", "torch_compile", "torch_compile_backend",
            "torch_compile_mode"),
    "auto_find_batch_size": "set --per_device_train_batch_size yourself (tunesmith does not retry after running out "
                            "of memory); --gradient_accumulation_steps keeps the total batch",
    "full_determinism": "runs are seeded (--seed, --data_seed) but deterministic kernels are not forced; drop the flag",
    "debug": "transformers' debug modes are not available; logging.jsonl records every step",
    "use_cpu": "tunesmith uses the GPU when there is one; hide the GPUs with CUDA_VISIBLE_DEVICES= to train on the CPU",
    "max_epochs": "use --num_train_epochs (or --max_steps)",
    **_same("logging is every --logging_steps optimiser steps; drop the flag", "logging_strategy"),
    "logging_dir": "TensorBoard logs go to RUN_DIR/runs (RUN_DIR: the vN-... folder under --output_dir)",
    "logging_nan_inf_filter": "logged losses are never replaced; a non-finite loss stops the run with a message",
    **_same("evaluation runs every --eval_steps (or each epoch, --eval_strategy) and at the end; it cannot be "
            "delayed or run before step 1", "eval_delay", "eval_on_start"),
    "load_best_model_at_end": "the best checkpoint is kept (--save_strategy best, or --metric_for_best_model with "
                              "--save_total_limit) and linked as best with --create_checkpoint_symlink; load it with "
                              "--adapters (or --model) pointing there",
    "dataloader_drop_last": "the last incomplete batch of an epoch is always trained on; drop the flag",
    "train_dataloader_shuffle": "use --dataset_shuffle false to keep the training rows in file order",
    **_same(_SAMPLING, "group_by_length", "length_column_name", "train_sampling_strategy", "sortish_sampler"),
    "save_on_each_node": "checkpoints are written by the global rank 0 only; put --output_dir on storage every node "
                         "shares",
    **_same("checkpoints are written every --save_steps (or --save_strategy); resume with --resume_from_checkpoint",
            "enable_jit_checkpoint", "use_flash_ckpt"),
    "accelerator_config": "tunesmith configures Accelerate itself; the distributed setup comes from torchrun "
                          "(NPROC_PER_NODE) and --deepspeed",
    "parallelism_config": "tensor/context parallelism is not supported; use --deepspeed zero3",
    "deepspeed_autotp_size": "DeepSpeed AutoTP is not supported; use --deepspeed zero3",
    "zero_hpz_partition_size": "ZeRO++ hierarchical partitioning is not supported; use --deepspeed zero3",
    "ddp_backend": "the process group uses nccl on GPUs and gloo on the CPU; drop the flag",
    "ddp_timeout": "the process group uses PyTorch's default collective timeout; drop the flag",
    "include_num_input_tokens_seen": "the tokens seen are not logged per step (the run's summary has "
                                     "train_tokens_per_second); drop the flag",
    "use_cache": "tunesmith turns the KV cache off for training and on for generation itself; drop the flag",
    "eval_use_evalscope": _EVAL_IN_TRAINING,
    **_same(_HUB, "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_always_push",
            "hub_revision", "commit_message"),
    **_same("SwanLab notifications are not wired in; set them up in SwanLab's web settings",
            "swanlab_notification_method", "swanlab_webhook_url", "swanlab_secret", "swanlab_receiver_email",
            "swanlab_sender_email", "swanlab_smtp_server", "swanlab_smtp_port", "swanlab_email_language"),
    "trackio_static_space_id": "publish the Trackio project after training with `trackio sync --project PROJECT "
                               "--space-id SPACE_ID --sdk static`",
    # model loading
    "experts_impl": "pass --model_kwargs '{\"experts_implementation\": \"grouped_mm\"}' (given to from_pretrained)",
    "max_memory": "pass --model_kwargs '{\"max_memory\": {\"0\": \"20GB\"}}' with --device_map auto",
    "rope_scaling": "set rope scaling in the model's config.json",
    "init_strategy": "models whose weights do not all load are refused; tunesmith initialises nothing but new "
                     "tokens' embeddings",
    "local_repo_path": "models that need a GitHub repository are not supported; pass a model folder with --model",
    "hqq_axis": "HQQ quantisation is not supported; QLoRA uses --quant_method bnb",
    "ref_model_revision": "download that revision and pass its folder with --ref_model",
    **_same(_TASK, "task_type", "num_labels", "problem_type", "reranker_use_activation"),
    # data and templates
    **_same(_CACHED, "cached_dataset", "cached_val_dataset", "to_cached_dataset", "template_mode"),
    **_same("datasets are concatenated (sample each with FILE#N); interleaving is not implemented",
            "interleave_prob", "stopping_strategy"),
    "download_mode": "hub datasets are downloaded once and reused; delete the cached copy to download again",
    "disable_auto_column_mapping": "tunesmith always detects the data format from its fields; rename fields with "
                                   "--columns",
    **_same("ms-swift's decision-task data augmentation is not supported", "decision_drop_instructions",
            "decision_shuffle_fields", "decision_state_as_text", "decision_subsample_options"),
    "add_non_thinking_prefix": "replies are rendered exactly as the model's chat template renders them (see "
                               "`tunesmith data inspect`); the prefix cannot be switched",
    "disable_ignore_empty_think": "empty think blocks are excluded from the loss only with --loss_scale "
                                  "...+ignore_empty_think; drop the flag",
    "preserve_thinking": "earlier turns' thinking is kept or dropped as the model's chat template does (see "
                         "`tunesmith data inspect`)",
    "response_prefix": "the reply starts as the model's chat template starts it (--enable_thinking for Qwen3)",
    "structured_outputs_regex": "guided decoding is not supported yet",
    "val_dataset_sample": "sample rows with --val_dataset FILE#N (eval: --eval_limit N)",
    "ignore_args_error": "tunesmith always stops at a flag it does not know, so that no setting is silently lost",
    **_same(_RAY, "use_ray", "ray_exp_name", "device_groups"),
    **_same(_MCORE, "to_mcore", "to_hf", "mcore_model", "mcore_adapter", "thread_count", "test_convert_precision",
            "test_convert_dtype", "save_missing_weights"),
    "to_ollama": "Ollama export is not supported yet; merge with `tunesmith export --merge_lora true` and convert "
                 "the merged folder with Ollama's or llama.cpp's own tools",
    **_same(_QUANT_EXPORT, "quant_n_samples", "quant_batch_size", "group_size"),
    # preference training beyond DPO/SimPO/ORPO/CPO/KTO
    **_same(_GRPO, "advantage_reweight", "async_generate", "chord_enable_phi_function", "chord_mu_decay_steps",
            "chord_mu_peak", "chord_mu_valley", "chord_mu_warmup_steps", "chord_sft_dataset",
            "chord_sft_per_device_train_batch_size", "completion_length_limit_scope",
            "enable_flattened_weight_sync", "fipo_clip_high_only", "fipo_clip_range", "fipo_decay_rate",
            "fipo_safety_threshold", "gym_env", "kl_in_reward", "log_rollout_offpolicy_metrics",
            "max_turns", "min_p", "multi_turn_scheduler", "multi_turn_func", "mini_batch_size", "use_lmdeploy",
            "num_generations_eval", "off_policy_sequence_mask_delta", "offload_model", "offload_optimizer",
            "real_tau", "reward_model_plugin", "rlsd_lambda", "rlsd_lambda_decay_steps", "rlsd_lambda_warmup_steps",
            "rlsd_negative_only", "rlsd_reweight_clip_range", "rollout_importance_sampling_mode",
            "rollout_importance_sampling_threshold", "sdar_gate_beta", "sdar_loss_coef", "sleep_level",
            "teacher_kl_coef", "teacher_tag_key", "use_gym_env", "wandb_log_unique_prompts",
            "gc_collect_after_offload"),
    **_same("rollouts from a separate `swift rollout` vLLM server are not supported yet; --use_vllm true runs vLLM "
            "inside the training process (--vllm_mode colocate)", "vllm_server_base_url", "vllm_server_group_port",
            "vllm_server_host", "vllm_server_pass_dataset", "vllm_server_port", "vllm_server_timeout"),
    **_same(_PPO, "cliprange", "cliprange_value", "gamma", "lam", "kl_coef", "local_rollout_forward_batch_size",
            "missing_eos_penalty", "num_mini_batches", "num_ppo_epochs", "num_sample_generations", "response_length",
            "vf_coef", "whiten_rewards"),
    **_same("GRPO's --reward_model takes a local checkpoint (a --rlhf_type rm checkpoint, adapter or full); its "
            "revision, type, separate adapters and template options are not supported yet",
            "reward_model_revision", "reward_model_type", "reward_adapters", "reward_template"),
    **_same(_GKD, "gkd_logits_topk", "lmbda", "seq_kd", "sft_alpha", "teacher_adapters", "teacher_deepspeed",
            "teacher_model", "teacher_model_revision", "teacher_model_server", "teacher_model_type",
            "offload_teacher_model"),
}

# Names that are real flags of some tunesmith commands but that ms-swift also has in commands where tunesmith does
# not implement them: there (and only there, since a command's own flags are resolved first) they are errors with
# this reason. NOT_SUPPORTED_YET holds the names that no tunesmith command has.
NOT_SUPPORTED_ELSEWHERE = {
    "external_plugins": "plugins register GRPO reward functions (tunesmith rlhf --rlhf_type grpo --reward_funcs); "
                        "elsewhere tunesmith uses the model's own chat template and needs none",
    "loss_type": "sft trains the cross-entropy of the trained tokens; ms-swift's loss plugins are not implemented "
                 "(in rlhf, --loss_type picks the DPO variant)",
    **_same("training takes every setting from its own flags and never reads a checkpoint's args.json (infer, "
            "deploy, export and eval do); drop the flag", "load_args", "load_data_args"),
    **_same(_EVAL_IN_TRAINING, "eval_dataset", "eval_dataset_args", "eval_limit",
            "eval_generation_config", "extra_eval_args"),
    **_same("the checkpoint says how it was trained: pass an adapter folder (adapter_config.json) with --adapters "
            "and a full model with --model; drop the flag", "tuner_type", "train_type", "sft_type"),
    **_same("only tunesmith export writes full model weights (pass it there); training checkpoints are always "
            "safetensors, and infer/deploy/eval write no weights", "safe_serialization", "max_shard_size"),
    "merge_lora": "infer, deploy and eval apply the adapter unmerged (same outputs); for a merged model run "
                  "`tunesmith export --adapters CKPT --merge_lora true` and pass the merged folder with --model",
}

# ms-swift flags that tunesmith accepts (so ms-swift scripts and args.json files run unchanged) but that change
# nothing: flag -> why. This is the one list of them; `tunesmith <command> --help` prints the entries of that
# command's flags at the end, and a test checks that every other flag is read somewhere in tunesmith/.
COMPATIBILITY_ONLY = {
    "model_type": "the architecture is read from the model's config.json",
    "lazy_tokenize": "rows are tokenised up front, once, before training starts (bad rows are found before step 1); "
                     "with --streaming they are tokenised as they are read",
    "remove_unused_columns": "columns other than the conversation's are ignored when rows are encoded, so none "
                             "ever reaches the model",
    "val_dataset_shuffle": "validation always covers every row, and its summed loss and metrics do not depend on "
                           "the order",
    "acc_strategy": "training logs token accuracy (token_acc, the fraction of trained tokens predicted exactly); "
                    "sequence accuracy (seq) is not computed",
    "local_dataset": "the native evaluator reads local files from --eval_dataset_args local_path and downloads nothing",
    "write_batch_size": "result lines are written and flushed as each window of rows finishes",
    "log_interval": "deploy logs each request (--verbose) and no periodic throughput line",
    "vllm_use_async_engine": "tunesmith always drives vLLM through its AsyncLLMEngine",
    "vllm_device": "with --use_vllm, vLLM runs in the training process, on its GPU (ms-swift's colocate mode)",
    "move_model_batches": "with --use_vllm tunesmith hands vLLM the LoRA adapter, not the model's weights, so "
                          "there are no weight batches to move",
    "vllm_reasoning_parser": "reasoning is split from the answer by tunesmith's own parser, chosen from the chat "
                             "template, for every backend alike",
    "lmdeploy_vision_batch_size": "multimodal models are not supported, so there is no vision encoder to batch",
    # every command (SwiftCompatArgs)
    "tuner_backend": "adapters are always built with peft (ms-swift's default); unsloth is refused",
    "use_swift_lora": "adapters are always peft's LoRA layers (ms-swift's default); true is refused",
    "template_backend": "tunesmith renders every conversation with the model's own chat template from its "
                        "tokenizer (as ms-swift's jinja backend does; see --template); there is no second renderer",
    "packing_strategy": "--packing always packs best-fit decreasing, ms-swift's binpack; sequential is refused",
    "packing_num_proc": "packing is one fast pass in the main process",
    "enable_npu_model_patch": "Ascend NPUs are not supported, so there is nothing to patch",
    "is_binary_loss_scale": "tunesmith's loss scales (default, last_round, all, +ignore_empty_think) weigh each token "
                            "0 or 1 already",
    "log_level": "tunesmith prints its progress and warnings at one level (deploy's --verbose switches the request "
                 "log)",
    # training (TrainerCompatArgs)
    "average_tokens_across_devices": "every loss term is always divided by its units (trained tokens, pairs) summed "
                                     "over all processes and micro-batches, which is what true asks for; false is "
                                     "refused",
    "gradient_checkpointing_kwargs": "gradient checkpointing always runs with use_reentrant=False (what ms-swift's "
                                     "examples pass); either setting gives the same gradients",
    "ddp_find_unused_parameters": "tunesmith sets it itself: on for mixture-of-experts models (an expert may get no "
                                  "tokens), off otherwise",
    "ddp_broadcast_buffers": "the models tunesmith trains hold no buffers that differ between processes",
    "ddp_bucket_cap_mb": "gradient all-reduce uses DDP's default bucket size (a speed setting only)",
    "ddp_static_graph": "DDP runs without the static-graph optimisation (a speed setting only)",
    "dataloader_pin_memory": "batches are always pinned when a GPU is used (a speed setting only)",
    "dataloader_persistent_workers": "the loader's workers only collate rows tokenised before training (a speed "
                                     "setting only)",
    "dataloader_prefetch_factor": "the loader's workers only collate rows tokenised before training (a speed "
                                  "setting only)",
    "dataloader_multiprocessing_context": "the loader's workers only collate rows tokenised before training and "
                                          "start with PyTorch's default method",
    "dataloader_in_order": "it only affects streamed (iterable) data, which tunesmith does not read",
    "disable_tqdm": "the progress bar is drawn only when stderr is a terminal, on rank 0; logging.jsonl and the log "
                    "lines are written either way",
    "log_level_replica": "only rank 0 prints progress and warnings",
    "log_on_each_node": "only the global rank 0 prints progress and warnings",
    "skip_memory_metrics": "no memory profiler runs; the peak GPU memory is logged as memory(GiB)",
    "check_model": "model files are never compared with the hub",
    "torch_empty_cache_steps": "the CUDA cache is left to PyTorch's allocator (a memory setting only)",
    "local_rank": "each process reads its rank from the LOCAL_RANK variable that torchrun sets",
    "do_train": "transformers' Trainer does not read it either: training always trains",
    "do_eval": "transformers' Trainer does not read it either: evaluation follows --eval_strategy",
    "do_predict": "transformers' Trainer does not read it either; prediction is tunesmith infer",
    "prediction_loss_only": "validation computes the loss and token_acc as running sums; no predictions are kept",
    "eval_accumulation_steps": "validation computes the loss and token_acc as running sums; no predictions are kept",
    "eval_do_concat_batches": "validation computes the loss and token_acc as running sums; no predictions are kept",
    "eval_use_gather_object": "validation computes the loss and token_acc as running sums; no predictions are kept",
    "batch_eval_metrics": "validation computes the loss and token_acc as running sums; no predictions are kept",
    "include_for_metrics": "validation computes the loss and token_acc as running sums; there is no compute_metrics",
    "label_names": "tunesmith's batches carry their labels under fixed names",
    "restore_callback_states_from_checkpoint": "there are no trainer callbacks; resuming restores the loop's own "
                                               "state",
    "ds3_gather_for_generation": "training never generates (ZeRO-3 weights are gathered only to generate)",
    "use_logits_to_keep": "it trims logits that the loss ignores (a memory setting only; the loss is the same)",
    "generation_max_length": "training never generates (--predict_with_generate is not supported)",
    "generation_num_beams": "training never generates (--predict_with_generate is not supported)",
    "to_peft_format": "ms-swift itself keeps it for compatibility only; it changes nothing there either",
    "ref_model_type": "the reference model's architecture is read from its config.json",
}

# Flags that change nothing in one command although the same name does something in another (so they cannot be in
# COMPATIBILITY_ONLY, which is checked against every reader in tunesmith/): command -> {flag: why}. `tunesmith
# COMMAND --help` lists them only in its compatibility table.
_NO_GENERATION_IN_TRAINING = ("training never generates: ms-swift uses it only with --predict_with_generate, which "
                              "tunesmith does not support (tunesmith infer and eval generate)")
_TRAIN_SCOPED = dict.fromkeys(["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
                               "stream", "stop_words", "logprobs", "top_logprobs", "generation_config"],
                              _NO_GENERATION_IN_TRAINING)
_ROLLOUT_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")
_DATA_FIELDS = ["dataset", "val_dataset", "split_dataset_ratio", "data_seed", "dataset_num_proc",
                "load_from_cache_file", "dataset_shuffle", "val_dataset_shuffle", "columns", "strict",
                "remove_unused_columns", "model_name", "model_author", "lazy_tokenize", "streaming",
                "shuffle_buffer_size"]
_STREAMING_IN_INFERENCE = {
    "streaming": "inference reads its rows (--val_dataset) whole, in order; only training (sft) streams",
    "shuffle_buffer_size": "it sizes training's --streaming shuffle buffer; inference keeps the rows' order"}
COMPATIBILITY_ONLY_IN = {
    "sft": _TRAIN_SCOPED,
    # GRPO samples its rollouts with them (--rlhf_type grpo); for the other methods they change nothing
    "rlhf": {k: v for k, v in _TRAIN_SCOPED.items() if k not in _ROLLOUT_SAMPLING},
    "dpo": _TRAIN_SCOPED,
    "infer": _STREAMING_IN_INFERENCE,
    "deploy": _STREAMING_IN_INFERENCE,
    "data": {"shuffle_buffer_size": "the data commands read rows in order (`data stats --streaming true` measures "
                                    "the first --num_rows); it sizes training's --streaming shuffle buffer"},
    "export": {
        **dict.fromkeys(["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
                         "stream", "stop_words", "logprobs", "top_logprobs", "n"],
                        "export generates nothing and copies the model's generation_config.json unchanged (sampling "
                        "is set in tunesmith infer and deploy)"),
        "seed": "merging is deterministic; nothing is sampled",
        **dict.fromkeys(_DATA_FIELDS, "merging reads no data (ms-swift uses it for quantisation calibration and "
                                      "--to_cached_dataset, which tunesmith export does not support yet)"),
    },
    "eval": {
        **dict.fromkeys(_DATA_FIELDS, "tunesmith eval reads its benchmarks from --eval_dataset (local files via "
                                      "--eval_dataset_args local_path), never training data"),
        **dict.fromkeys(["host", "port", "served_model_name", "ssl_keyfile", "ssl_certfile", "owned_by",
                         "max_logprobs", "log_interval"],
                        "tunesmith eval runs the model in-process and starts no server (ms-swift's eval deploys "
                        "one first); to evaluate a running server use --eval_url"),
    },
}

# ms-swift values that tunesmith does not implement: the error says so instead of only listing the choices.
NOT_SUPPORTED_VALUES = {
    **{("rlhf_type", t): f"ms-swift's {t} is not supported by tunesmith yet" for t in ("ppo", "gkd")},
    **{("train_type", t): f"ms-swift's {t} tuner is not supported by tunesmith yet; use lora or full"
       for t in ("longlora", "adalora", "llamapro", "adapter", "vera", "boft", "fourierft", "reft", "bone")},
    **{("quant_method", q): f"{q} quantisation is not supported by tunesmith yet; QLoRA uses bnb, and quantised "
                            f"export is not available"
       for q in ("hqq", "eetq", "quanto", "fp8", "awq", "gptq", "gptq_v2")},
    ("truncation_strategy", "split"): "splitting over-long rows is not supported yet; use delete, left or right",
    ("tuner_backend", "unsloth"): "unsloth is not supported; adapters are built with peft",
    ("use_swift_lora", True): "swift's own LoRA layers are not supported; adapters are peft's",
    ("packing_strategy", "sequential"): "tunesmith packs best-fit decreasing (binpack) only",
    ("average_tokens_across_devices", False): "tunesmith always divides the loss by the tokens of all processes",
}

# Values that ms-swift accepts as aliases (value rewrites, not flag renames).
VALUE_ALIASES = {
    ("torch_dtype", "bf16"): "bfloat16", ("torch_dtype", "fp16"): "float16", ("torch_dtype", "fp32"): "float32",
    ("attn_impl", "flash_attn"): "flash_attention_2",
    ("lora_dtype", "bf16"): "bfloat16", ("lora_dtype", "fp16"): "float16", ("lora_dtype", "fp32"): "float32",
    ("infer_backend", "pt"): "transformers",
}

@dataclass
class EvalArguments(EvalArgs, GenerationArgs, InferBackendArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs,
                    TrackArgs, SwiftCompatArgs, DataArgs, EvalServerCompatArgs):
    """`tunesmith eval`: benchmarks from local files; the base and the tuned model side by side."""
    verbose: bool = _f(False, help="ms-swift: EvalScope's debug output. The native evaluator prints the same "
                                   "either way.")
    # ms-swift's eval has no --report_to (EvalScope keeps its own reports), so nothing is logged unless asked
    report_to: List[str] = _f(help="Log the score table (each model's score and the delta, per dataset, subset and "
                                   "metric) to tensorboard, swanlab, wandb, mlflow or all, under the eval's output "
                                   "folder. Default none: ms-swift's eval has no --report_to.", list_default=["none"])


COMMAND_ARGS = {"sft": SftArguments, "data": DataCommandArguments, "rlhf": RLHFArguments, "dpo": RLHFArguments,
                "infer": InferArguments, "deploy": DeployArguments, "export": ExportArguments,
                "report": ReportArguments, "eval": EvalArguments}


# ---------------------------------------------------------------- type handling

_TRUE = {"true", "yes", "1", "y", "on"}
_FALSE = {"false", "no", "0", "n", "off"}


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, is_list) for Optional[X], List[X], X."""
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(inner[0])
    if origin in (list, List):
        return (typing.get_args(tp) or (str,))[0], True
    return tp, False


def _convert(name: str, inner, raw: Any, source: str):
    if raw is None:
        return None
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ArgError(f"{source}--{name}: expected true or false, got {raw!r}")
    if inner is int:
        if isinstance(raw, bool):
            raise ArgError(f"{source}--{name}: expected an integer, got {raw!r}")
        try:
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            return int(str(raw).strip())
        except ValueError:
            try:
                f = float(str(raw))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
            raise ArgError(f"{source}--{name}: expected an integer, got {raw!r}") from None
    if inner is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ArgError(f"{source}--{name}: expected a number, got {raw!r}") from None
    if inner in (dict, Dict) or typing.get_origin(inner) in (dict, Dict):
        if isinstance(raw, dict):
            return raw
        try:
            value = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as e:
            raise ArgError(f"{source}--{name}: expected a JSON object such as '{{\"key\": 1}}', got {raw!r} ({e})") from None
        if not isinstance(value, dict):
            raise ArgError(f"{source}--{name}: expected a JSON object, got {raw!r}")
        return value
    return str(raw) if not isinstance(raw, str) else raw


@dataclass
class _Field:
    name: str
    inner: Any
    is_list: bool
    choices: tuple
    help: str
    default: Any


@functools.lru_cache(maxsize=None)
def _fields(cls) -> dict[str, _Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        inner, is_list = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = _Field(f.name, inner, is_list, tuple(f.metadata.get("choices", ())), f.metadata.get("help", ""), default)
    return out


@functools.lru_cache(maxsize=None)
def _aliases(cls) -> dict[str, str]:
    out = {}
    for f in dataclasses.fields(cls):
        for a in f.metadata.get("aliases", ()):
            out[a] = f.name
    return out


def secret_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("secret")}


_OFF_VALUES = {"false", "0", "none", "null", ""}


def _turns_off_unsupported(cls, raw_name: str, vals: list) -> bool:
    """An ms-swift flag tunesmith lacks, set to its off value (`--dynamic_sample false`, `--sleep_level 0`), as
    ms-swift scripts often spell out defaults: it asks for nothing tunesmith does not do, so it is accepted."""
    name = raw_name.replace("-", "_")
    # only features no tunesmith command has: elsewhere "false" can be a real request (--safe_serialization false)
    if name in _fields(cls) or name not in NOT_SUPPORTED_YET:
        return False
    return len(vals) == 1 and (vals[0] is None or vals[0] is False or vals[0] == 0 or
                               (isinstance(vals[0], str) and vals[0].strip().lower() in _OFF_VALUES))


def _resolve_name(cls, command: str, raw_name: str, source: str) -> str:
    name = raw_name.replace("-", "_")
    fields = _fields(cls)
    if name in fields:
        return name
    aliases = _aliases(cls)
    if name in aliases:
        return aliases[name]
    reason = NOT_SUPPORTED_YET.get(name) or NOT_SUPPORTED_ELSEWHERE.get(name)
    if reason:
        where = "" if name in NOT_SUPPORTED_YET else f" in '{command}'"
        raise ArgError(f"{source}--{name} is an ms-swift flag that tunesmith does not support{where} yet: {reason}.")
    # argparse's allow_abbrev, which ms-swift inherits: a unique prefix of a flag name is accepted.
    candidates = [n for n in list(fields) + list(aliases) if n.startswith(name)]
    targets = {aliases.get(c, c) for c in candidates}
    if len(targets) == 1 and len(name) >= 3:
        return targets.pop()
    known = list(fields) + list(aliases)
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" Did you mean --{near[0]}?" if near else ""
    if len(targets) > 1:
        hint = f" It is a prefix of several flags: {', '.join('--' + t for t in sorted(targets))}."
    raise ArgError(f"{source}unknown flag --{name} for 'tunesmith {command}'.{hint} "
                   f"See 'tunesmith {command} --help'.")


def _set_value(cls, values: dict, name: str, raw: Any, source: str):
    spec = _fields(cls)[name]
    if spec.is_list:
        items = raw if isinstance(raw, list) else [raw]
        converted = [_convert(name, spec.inner, v, source) for v in items]
    else:
        if isinstance(raw, list):
            if len(raw) != 1:
                raise ArgError(f"{source}--{name} takes one value, got {len(raw)}: {' '.join(map(str, raw))}")
            raw = raw[0]
        converted = _convert(name, spec.inner, raw, source)
        converted = VALUE_ALIASES.get((name, converted), converted) if isinstance(converted, str) else converted
    if spec.choices:
        for v in (converted if spec.is_list else [converted]):
            if v is not None and v not in spec.choices:
                hint = NOT_SUPPORTED_VALUES.get((name, v), "")
                raise ArgError(f"{source}--{name}: {v!r} is not one of {', '.join(map(str, spec.choices))}"
                               + (f" ({hint})" if hint else ""))
    values[name] = converted


# Keys that tunesmith writes into args.json for the record but that are not inputs.
RECORD_ONLY_KEYS = {"tunesmith_version", "model_dir", "output_run_dir", "world_size", "library_versions",
                    "command", "rlhf_type_resolved", "data_stats", "model_parameter_info", "merged_from"}
REDACTED = "<redacted>"


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ArgError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # small, only needed for YAML configs
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - re-raised as one clear line
        raise ArgError(f"{path}: cannot parse config file: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgError(f"{path}: a config file must hold a mapping of flag names to values")
    env = data.pop("ENV", None) or data.pop("env", None)
    if env:  # ms-swift 4.x YAML may carry an ENV block; set what is not already set by the caller.
        for k, v in env.items():
            os.environ.setdefault(str(k), str(v))
    return data


def looks_like_system_file(value: Optional[str]) -> bool:
    """ms-swift's rule: a --system value ending in .txt names a file (only one line: a prompt text is never one)."""
    return bool(value) and value.endswith(".txt") and "\n" not in value


def resolve_system(value: Optional[str], source: str = "") -> Optional[str]:
    """--system as every stage uses it: a .txt file's content (verbatim, as ms-swift reads it), else the text with
    literal \\n turned into newlines (shell scripts write it so). A relative path is relative to the working
    directory. Raises ArgError when a .txt value is not an existing file: ms-swift stops there too, and a mistyped
    path must not silently become the system prompt."""
    if value is None:
        return None
    if looks_like_system_file(value):
        if not os.path.isfile(value):
            raise ArgError(f"{source}--system {value}: no such file (from {os.getcwd()}). A value ending in .txt is "
                           f"read as a file: fix the path (or give an absolute one), or pass the prompt text itself")
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    return value.replace("\\n", "\n")


def _split_argv(argv: list[str]) -> tuple[list[tuple[str, list[str], bool]], list[str]]:
    """(flags as (name as written, values, had '=')), positionals) of a command line."""
    flags: list[tuple[str, list[str], bool]] = []
    positionals = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and len(tok) > 2:
            body = tok[2:]
            if "=" in body:
                name, val = body.split("=", 1)
                flags.append((name, [val], True))
                i += 1
                continue
            vals = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
                vals.append(argv[i])
                i += 1
            flags.append((body, vals, False))
        else:
            positionals.append(tok)
            i += 1
    return flags, positionals


def problems_message(found: list[str]) -> str:
    """One message for every problem found (a single problem is its own message)."""
    if len(found) == 1:
        return found[0]
    return f"{len(found)} problems with the flags:\n  - " + "\n  - ".join(found)


def deferred_problems(args) -> list[str]:
    """The flag problems `parse_args(..., defer_problems=True)` found (each flag left at its default), for the
    command's own value checks to report together with theirs."""
    return list(getattr(args, "_deferred_problems", ()))


def _set_config_values(cls, command: str, config_path: str, values: dict, found: list) -> None:
    """The config file's values into `values`; each bad key or value appended to `found`."""
    src = f"{config_path}: "
    secrets = secret_fields(cls)
    for key, raw in load_config_file(config_path).items():
        if key in RECORD_ONLY_KEYS or _turns_off_unsupported(cls, str(key), [raw]):
            continue
        try:
            name = _resolve_name(cls, command, str(key), src)
            if name in secrets and raw == REDACTED:
                continue
            _set_value(cls, values, name, raw, src)
        except ArgError as e:
            found.append(str(e))


def _set_flag_values(cls, command: str, flags: list, values: dict, found: list) -> bool:
    """The command line's flags into `values` (over the config file's); each bad flag or value appended to
    `found`. Returns whether --system was given on the command line."""
    system_here = False
    for raw_name, vals, _ in (f for f in flags if not _turns_off_unsupported(cls, f[0], f[1])):
        try:
            name = _resolve_name(cls, command, raw_name, "")
            spec = _fields(cls)[name]
            if not vals:
                if spec.inner is bool and not spec.is_list:
                    vals = ["true"]
                elif not spec.is_list:
                    raise ArgError(f"--{name} needs a value")
            _set_value(cls, values, name, vals, "")
            system_here = system_here or name == "system"
        except ArgError as e:
            found.append(str(e))
    return system_here


def parse_args(command: str, argv: list[str], cls=None, defer_problems: bool = False):
    """Parse `argv` (flags after the subcommand) into the command's dataclass.

    Precedence: dataclass defaults < config file (positional .yaml/.yml/.json or --config) < flags. Every flag
    problem (an unknown flag, a value of the wrong type or not among the flag's choices) is found, and all are raised
    as one ArgError; with `defer_problems` they are kept on the returned arguments instead (`deferred_problems`,
    the flags left at their defaults) so that the command reports them together with its value checks.
    """
    cls = cls or COMMAND_ARGS[command]
    values: dict[str, Any] = {}
    found: list[str] = []
    flags, positionals = _split_argv(list(argv))
    # positional config file (ms-swift: `swift sft x.yaml`)
    k = next((i for i, p in enumerate(positionals) if p.lower().endswith((".yaml", ".yml", ".json"))), None)
    config_path = None if k is None else positionals[k]
    rest_pos = [p for i, p in enumerate(positionals) if i != k]
    cfg_flags = [f for f in flags if f[0].replace("-", "_") == "config"]
    if cfg_flags:
        if not cfg_flags[-1][1]:
            raise ArgError("--config needs a file path")
        config_path = cfg_flags[-1][1][0]
        flags = [f for f in flags if f[0].replace("-", "_") != "config"]
    if config_path:
        _set_config_values(cls, command, config_path, values, found)
    system_src = f"{config_path}: " if "system" in values else ""  # where --system came from, for its error
    if rest_pos:
        if command == "data" and "action" not in values:
            try:
                _set_value(cls, values, "action", rest_pos.pop(0), "")
            except ArgError as e:
                found.append(str(e))
        if rest_pos:
            raise ArgError(f"unexpected argument {rest_pos[0]!r} for 'tunesmith {command}' "
                           f"(flags start with --; a config file ends in .yaml, .yml or .json)")
    if _set_flag_values(cls, command, flags, values, found):
        system_src = ""
    if values.get("system") is not None:
        # read once here, so that no stage (and no args.json) ever sees the path: a checkpoint used from another
        # directory keeps the prompt
        try:
            values["system"] = resolve_system(values["system"], system_src)
        except ArgError as e:
            found.append(str(e))
            del values["system"]
    if found and not defer_problems:
        raise ArgError(problems_message(found))
    try:
        args = cls(**values)
    except TypeError as e:  # pragma: no cover - a programming error, not a user one
        raise ArgError(str(e)) from None
    if found:
        args._deferred_problems = tuple(found)
    return args


def to_record(args) -> dict:
    """The arguments as a JSON-ready dict with every secret redacted (what args.json holds)."""
    secrets = secret_fields(type(args))
    out = {}
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if f.name in secrets and v:
            v = REDACTED
        out[f.name] = v
    return out


def format_help(command: str) -> str:
    """`tunesmith COMMAND --help`: every flag with its type, choices, other names, default and help, then the
    command's compatibility-only flags with why each changes nothing. Raises KeyError for an unknown command."""
    cls = COMMAND_ARGS[command]
    lines = [f"usage: tunesmith {command} [CONFIG.yaml|CONFIG.json] [--flag value ...]", ""]
    doc = (cls.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    aliases: dict[str, list[str]] = {}
    for a, target in _aliases(cls).items():
        aliases.setdefault(target, []).append(a)
    scoped = COMPATIBILITY_ONLY_IN.get(command, {})
    for name, spec in _fields(cls).items():
        if name in scoped:  # listed only in the compatibility table below
            continue
        tname = getattr(spec.inner, "__name__", str(spec.inner))
        tname = f"{tname} ..." if spec.is_list else tname
        al = f" (also --{', --'.join(aliases[name])})" if name in aliases else ""
        default = "" if spec.default in (None, [], "") else f" [default: {spec.default}]"
        choices = f" {{{','.join(map(str, spec.choices))}}}" if spec.choices else ""
        lines.append(f"  --{name} {tname}{choices}{al}{default}")
        if spec.help:
            lines.append(f"      {spec.help}")
    compat = {name: scoped.get(name) or COMPATIBILITY_ONLY[name] for name in _fields(cls)
              if name in COMPATIBILITY_ONLY or name in scoped}
    if compat:
        lines += ["", "compatibility only: accepted so that ms-swift scripts run unchanged, but changing nothing:"]
        for name, why in compat.items():
            lines += [f"  --{name}", f"      {why}"]
    return "\n".join(lines)

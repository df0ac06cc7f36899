"""Typed arguments for every command, filled alike by flags, YAML/JSON config files and a saved args.json.

Flag names follow ms-swift (3.x names, with the 4.x renames as aliases). Parsing follows the semantics of
transformers' HfArgumentParser that ms-swift scripts rely on (`--flag true|false`, a bare `--flag` meaning true,
space-separated lists, JSON dicts, unique prefixes), but is implemented here on the standard library only: this
module must import in milliseconds so that `tunesmith --help` and argument errors answer at once.

What lives here: the field groups and each command's dataclass (every flag with its ms-swift meaning and units as
help text); COMPATIBILITY_ONLY, the one list of flags accepted for ms-swift compatibility that change nothing (with
why); NOT_SUPPORTED_YET, ms-swift flags that are errors; value aliases; parse_args, to_record and format_help.
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
    load_from_cache_file: bool = _f(False, help="Reuse the datasets map cache.")
    dataset_shuffle: bool = _f(True, help="Shuffle the training rows each epoch (seeded by --seed and the epoch).")
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
    report_to: List[str] = _f(help="tensorboard, swanlab, wandb, mlflow, all, none.", list_default=["tensorboard"])
    swanlab_token: Optional[str] = _f(help="SwanLab API key (or SWANLAB_API_KEY); never written to disk.", secret=True)
    swanlab_project: str = _f("tunesmith", help="SwanLab project name.")
    swanlab_workspace: Optional[str] = _f(help="SwanLab workspace (organisation); default your own.")
    swanlab_exp_name: Optional[str] = _f(help="SwanLab experiment name (default --run_name, else the run "
                                              "folder's name).")
    swanlab_mode: str = _f("cloud", help="cloud (upload), local (local dashboard), offline (files only) or "
                                         "disabled.", choices=("cloud", "local", "offline", "disabled"))
    run_name: Optional[str] = _f(help="Run name shown in W&B, MLflow and SwanLab (default the run folder's name, "
                                      "vN-YYYYMMDD-HHMMSS).")


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
    metric_for_best_model: str = _f("loss", help="Validation metric that picks the best checkpoint (eval_ "
                                                 "prefix optional), e.g. loss, token_acc, rewards/accuracies.")
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


@dataclass
class RLHFArgs:
    rlhf_type: str = _f("dpo", help="Preference method: dpo (with --loss_type variants), simpo, orpo, cpo or kto.",
                        choices=("dpo", "simpo", "orpo", "cpo", "kto"))
    beta: Optional[float] = _f(help="Default 0.1 (SimPO 2.0).")
    loss_type: List[str] = _f(help="DPO loss variant(s): sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, "
                                   "sppo_hard, apo_zero, apo_down, discopop, sft; several with --loss_weights.",
                              list_default=[])
    loss_weights: List[float] = _f(help="One weight per --loss_type (default 1 each).", list_default=[])
    label_smoothing: float = _f(0.0, help="Probability (0-0.5) that a preference label is flipped: cDPO, robust, "
                                          "exo_pair; also CPO and SimPO.")
    rpo_alpha: Optional[float] = _f(help="Adds rpo_alpha * NLL(chosen) (logged separately as nll_loss).")
    ld_alpha: Optional[float] = _f(help="LD-DPO (DPO only): weight (0-1) of the log-probs of tokens beyond the "
                                        "shorter reply's length.")
    discopop_tau: float = _f(0.05, help="DiscoPOP (--loss_type discopop): temperature of the mixing sigmoid.")
    ref_model: Optional[str] = _f(help="Reference model for full training (default: --model).")
    ref_adapters: List[str] = _f(help="Reference adapters (e.g. the SFT checkpoint given to --adapters).",
                                 list_default=[])
    cpo_alpha: float = _f(1.0, help="CPO: weight of the NLL over the chosen reply.")
    simpo_gamma: float = _f(1.0, help="SimPO: target reward margin (gamma).")
    desirable_weight: float = _f(1.0, help="KTO: loss weight of desirable replies (lambda_D).")
    undesirable_weight: float = _f(1.0, help="KTO: loss weight of undesirable replies (lambda_U).")
    precompute_ref_log_probs: bool = _f(False, help="Compute the reference log-probs once before training (no "
                                                    "reference forward pass per step).")
    prefix_sharing: Optional[bool] = _f(help="Run each pair as one sequence [prompt, chosen, rejected] so the prompt "
                                             "is computed once (exact). Default: on with --packing or "
                                             "--padding_free where the attention implementation takes a custom "
                                             "mask (sdpa, eager).")


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
class InferBackendArgs:
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
    # vLLM
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
    api_key: Optional[str] = _f(help="Require 'Authorization: Bearer KEY' (never written to disk).", secret=True)
    served_model_name: Optional[str] = _f(help="Model id clients send (default the model or checkpoint "
                                               "folder's name).")
    ssl_keyfile: Optional[str] = _f(help="TLS private key file (PEM), with --ssl_certfile: serve HTTPS.")
    ssl_certfile: Optional[str] = _f(help="TLS certificate file (PEM).")
    owned_by: str = _f("tunesmith", help="owned_by field of /v1/models.")
    log_interval: int = _f(20, help="ms-swift: seconds between throughput log lines. Compatibility only (see the "
                                    "table at the end).")
    max_logprobs: int = _f(20, help="Largest top_logprobs a request may ask for.")
    verbose: bool = _f(True, help="Log each HTTP request (uvicorn info level).")


@dataclass
class ExportOutputArgs:
    output_dir: Optional[str] = _f(help="Default <checkpoint>-merged.")
    merge_lora: bool = _f(False, help="Merge the --adapters into the base weights and save a full model.")
    safe_serialization: bool = _f(True, help="Save .safetensors (false: PyTorch .bin).")
    max_shard_size: str = _f("5GB", help="Largest weight file, e.g. 5GB or 500MB.")
    exist_ok: bool = _f(False, help="Write into an existing --output_dir instead of stopping.")


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
                   DistArgs):
    """`tunesmith sft`."""


@dataclass
class RLHFArguments(RLHFArgs, SftArguments):
    """`tunesmith rlhf` (and `tunesmith dpo`)."""


@dataclass
class InferArguments(GenerationArgs, InferBackendArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs, DataArgs):
    """`tunesmith infer`: interactive chat, or batch over --val_dataset."""


@dataclass
class DeployArguments(DeployServerArgs, InferArguments):
    """`tunesmith deploy`: OpenAI-compatible server."""


@dataclass
class ExportArguments(ExportOutputArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs):
    """`tunesmith export`: merge LoRA adapters into the base model."""


@dataclass
class DataCommandArguments(ModelArgs, TemplateArgs, DataArgs):
    """`tunesmith data ACTION`: inspect, validate, convert, split, stats."""
    action: Optional[str] = _f(help="inspect | validate | convert | split | stats",
                               choices=("inspect", "validate", "convert", "split", "stats"))
    output: Optional[str] = _f(help="Output file (convert) or folder (split).", aliases=("output_dir",))
    row: int = _f(0, help="inspect: which row (0-based) to show.")
    num_rows: int = _f(1, help="inspect: how many rows to show.")
    val_ratio: float = _f(0.1, help="split: fraction for validation (default 9:1).")
    rlhf: bool = _f(False, help="Treat the data as preference data (chosen/rejected).")


@dataclass
class ReportArguments:
    """`tunesmith report RUN_DIR [RUN_DIR ...]`: rebuild a run's plots and report.html, or compare runs."""
    runs: List[str] = _f(help="Run directories (output/<model>/vN-…); also given positionally.", list_default=[])
    output: Optional[str] = _f(help="Comparison report path (default compare_report.html; one run: its report.html).")


# ms-swift flags that exist upstream but that tunesmith does not implement yet. They are errors, never silently
# ignored: a script relying on them must hear that the behaviour is not there. The value says what to do instead.
NOT_SUPPORTED_YET = {
    "fsdp": "FSDP is not wired in yet; use --deepspeed zero3 (the same sharding of weights, gradients and "
            "optimiser state)",
    "streaming": "stream the data into a file and pass the file",
    "custom_dataset_info": "pass the data files directly with --dataset",
    "custom_register_path": "tunesmith uses the model's own chat template; no plugins are needed",
    "external_plugins": "tunesmith uses the model's own chat template; no plugins are needed",
    "neftune_noise_alpha": "not implemented",
    "lorap_lr_ratio": "LoRA+ is not implemented",
    "predict_with_generate": "use tunesmith infer on the checkpoint",
    "freeze_llm": "multimodal models are not supported",
    "freeze_vit": "multimodal models are not supported",
    "freeze_aligner": "multimodal models are not supported",
    "max_pixels": "multimodal models are not supported",
    "agent_template": "agent templates are not supported yet",
    "sequence_parallel_size": "sequence parallelism is not supported",
    "lora_modules": "removed in ms-swift 3.x; use --adapters",
    "sync_ref_model": "TR-DPO reference syncing is not implemented; the reference stays fixed",
    "ref_model_sync_steps": "TR-DPO reference syncing is not implemented; the reference stays fixed",
    "ref_model_mixup_alpha": "TR-DPO reference syncing is not implemented; the reference stays fixed",
    "f_divergence_type": "only DPO's reverse-KL objective is implemented",
    "use_weighting": "WPO weighting is not implemented",
    "center_rewards_coefficient": "reward-model training (--rlhf_type rm) is not supported",
}

# ms-swift flags that tunesmith accepts (so ms-swift scripts and args.json files run unchanged) but that change
# nothing: flag -> why. This is the one list of them; `tunesmith <command> --help` prints the entries of that
# command's flags at the end, and a test checks that every other flag is read somewhere in tunesmith/.
COMPATIBILITY_ONLY = {
    "model_type": "the architecture is read from the model's config.json",
    "lazy_tokenize": "rows are tokenised up front, once, before training starts (bad rows are found before step 1)",
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
    "vllm_reasoning_parser": "reasoning is split from the answer by tunesmith's own parser, chosen from the chat "
                             "template, for every backend alike",
    "lmdeploy_vision_batch_size": "multimodal models are not supported, so there is no vision encoder to batch",
}

# ms-swift values that tunesmith does not implement: the error says so instead of only listing the choices.
NOT_SUPPORTED_VALUES = {("rlhf_type", t): f"ms-swift's {t} is not supported by tunesmith yet"
                        for t in ("rm", "ppo", "grpo", "gkd")}

# Values that ms-swift accepts as aliases (value rewrites, not flag renames).
VALUE_ALIASES = {
    ("torch_dtype", "bf16"): "bfloat16", ("torch_dtype", "fp16"): "float16", ("torch_dtype", "fp32"): "float32",
    ("attn_impl", "flash_attn"): "flash_attention_2",
    ("lora_dtype", "bf16"): "bfloat16", ("lora_dtype", "fp16"): "float16", ("lora_dtype", "fp32"): "float32",
    ("infer_backend", "pt"): "transformers",
}

@dataclass
class EvalArguments(EvalArgs, GenerationArgs, InferBackendArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs,
                    TrackArgs):
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


def _resolve_name(cls, command: str, raw_name: str, source: str) -> str:
    name = raw_name.replace("-", "_")
    fields = _fields(cls)
    if name in fields:
        return name
    aliases = _aliases(cls)
    if name in aliases:
        return aliases[name]
    if name in NOT_SUPPORTED_YET:
        raise ArgError(f"{source}--{name} is an ms-swift flag that tunesmith does not support yet: {NOT_SUPPORTED_YET[name]}.")
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


def parse_args(command: str, argv: list[str], cls=None):
    """Parse `argv` (flags after the subcommand) into the command's dataclass.

    Precedence: dataclass defaults < config file (positional .yaml/.yml/.json or --config) < flags.
    """
    cls = cls or COMMAND_ARGS[command]
    values: dict[str, Any] = {}
    argv = list(argv)
    config_path = None
    positionals = []
    flags: list[tuple[str, list[str], bool]] = []  # (name as written, values, had '=')
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
    # positional config file (ms-swift: `swift sft x.yaml`)
    rest_pos = []
    for p in positionals:
        if config_path is None and p.lower().endswith((".yaml", ".yml", ".json")):
            config_path = p
        else:
            rest_pos.append(p)
    cfg_flags = [f for f in flags if f[0].replace("-", "_") == "config"]
    if cfg_flags:
        if not cfg_flags[-1][1]:
            raise ArgError("--config needs a file path")
        config_path = cfg_flags[-1][1][0]
        flags = [f for f in flags if f[0].replace("-", "_") != "config"]
    if config_path:
        src = f"{config_path}: "
        secrets = secret_fields(cls)
        for key, raw in load_config_file(config_path).items():
            if key in RECORD_ONLY_KEYS:
                continue
            name = _resolve_name(cls, command, str(key), src)
            if name in secrets and raw == REDACTED:
                continue
            _set_value(cls, values, name, raw, src)
    system_src = f"{config_path}: " if "system" in values else ""  # where --system came from, for its error
    if rest_pos:
        if command == "data" and "action" not in values:
            _set_value(cls, values, "action", rest_pos.pop(0), "")
        if rest_pos:
            raise ArgError(f"unexpected argument {rest_pos[0]!r} for 'tunesmith {command}' "
                           f"(flags start with --; a config file ends in .yaml, .yml or .json)")
    for raw_name, vals, _ in flags:
        name = _resolve_name(cls, command, raw_name, "")
        spec = _fields(cls)[name]
        if not vals:
            if spec.inner is bool and not spec.is_list:
                vals = ["true"]
            elif spec.is_list:
                vals = []
            else:
                raise ArgError(f"--{name} needs a value")
        _set_value(cls, values, name, vals, "")
        system_src = "" if name == "system" else system_src
    if values.get("system") is not None:
        # read once here, so that no stage (and no args.json) ever sees the path: a checkpoint used from another
        # directory keeps the prompt
        values["system"] = resolve_system(values["system"], system_src)
    try:
        return cls(**values)
    except TypeError as e:  # pragma: no cover - a programming error, not a user one
        raise ArgError(str(e)) from None


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
    for name, spec in _fields(cls).items():
        tname = getattr(spec.inner, "__name__", str(spec.inner))
        tname = f"{tname} ..." if spec.is_list else tname
        al = f" (also --{', --'.join(aliases[name])})" if name in aliases else ""
        default = "" if spec.default in (None, [], "") else f" [default: {spec.default}]"
        choices = f" {{{','.join(map(str, spec.choices))}}}" if spec.choices else ""
        lines.append(f"  --{name} {tname}{choices}{al}{default}")
        if spec.help:
            lines.append(f"      {spec.help}")
    compat = [name for name in _fields(cls) if name in COMPATIBILITY_ONLY]
    if compat:
        lines += ["", "compatibility only: accepted so that ms-swift scripts run unchanged, but changing nothing:"]
        for name in compat:
            lines += [f"  --{name}", f"      {COMPATIBILITY_ONLY[name]}"]
    return "\n".join(lines)

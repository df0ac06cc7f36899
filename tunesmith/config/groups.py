"""The flag groups: each a frozen dataclass of flags (name, type, default; ms-swift's meaning and units as help
text, other accepted names, allowed values, whether it is a secret). A command takes the groups of
tunesmith.config.commands; a stage of tunesmith takes a group, or a slice of several (tunesmith.config.slices).

ms-swift's flags that change nothing here are in tunesmith.config.swift_compat, next to their tables. Only the
standard library is imported: `tunesmith --help` builds these classes at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


def _f(default=None, help: str = "", aliases: tuple = (), choices: tuple = (), secret: bool = False, list_default=None,
       auto: bool = False):
    """A flag: its default (list_default for lists), help text (ms-swift's meaning, units), other accepted names,
    allowed values, whether it is a secret (redacted in args.json), and whether the word `auto` is accepted as a
    value, meaning None: tunesmith chooses (the default of such a flag is None). Shared with swift_compat and
    commands."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "secret": secret, "auto": auto}
    if list_default is not None:
        return field(default_factory=lambda: list(list_default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelArgs:
    """What model to load and how: the folder or hub id, dtype, attention, hub access, from_pretrained's extras."""
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
    max_pixels: Optional[int] = _f(help="Vision-language models: resize each image to at most this many pixels "
                                        "(aspect kept; default: the environment's MAX_PIXELS, Qwen3-VL's "
                                        "IMAGE_MAX_TOKEN_NUM in tokens, else the model's image processor).")


@dataclass(frozen=True)
class QuantArgs:
    """QLoRA: the base model loaded quantised by bitsandbytes (4 or 8 bits)."""
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


@dataclass(frozen=True)
class TemplateArgs:
    """How a conversation becomes tokens: the system prompt, length limits, the trained tokens, packing."""
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
                                        "attention stays within each row. KTO: two sequences, its replies and "
                                        "the KL term's mismatched ones.")
    packing: bool = _f(False, help="Pack rows into sequences of up to --packing_length tokens before batching "
                                   "(padding-free, attention within each row; exact).")
    packing_length: Optional[int] = _f(help="Tokens per packed sequence (default --max_length).")


@dataclass(frozen=True)
class DataArgs:
    """What data to read: files, folders or hub ids, validation split, seeds, strictness, streaming, caching."""
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
                                     "(read whole). sft and pt only; `data stats` measures the first --num_rows rows.")
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
    interleave_prob: List[float] = _f(help="Several --dataset: draw rows from them at random with these "
                                           "probabilities (one per dataset, summing to 1), seeded by --data_seed, as "
                                           "datasets' interleave_datasets; default: concatenate them.",
                                      list_default=[])
    stopping_strategy: str = _f("first_exhausted", help="--interleave_prob: stop when the first dataset runs out "
                                                        "(first_exhausted) or when every one has been used up, "
                                                        "restarting the others (all_exhausted).",
                                choices=("first_exhausted", "all_exhausted"))


@dataclass(frozen=True)
class TrackArgs:
    """Where metrics go besides logging.jsonl: --report_to's trackers and their settings."""
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class GenerationArgs:
    """Sampling for infer, deploy, eval and export: lengths, temperature, top-k/p, stops, log-probs."""
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


@dataclass(frozen=True)
class CheckpointArgs:
    """A checkpoint to run (infer, deploy, export, eval): adapters, and what its args.json passes on."""
    adapters: List[str] = _f(help="LoRA checkpoints (name=path pairs for deploy).", list_default=[])
    ckpt_dir: Optional[str] = _f(help="ms-swift 2.x/3.x name: an adapter or a full checkpoint (resolved to "
                                      "--adapters or --model).")
    load_args: bool = _f(True, help="Read the checkpoint's args.json (base model, template, system, dtype).")
    load_data_args: bool = _f(False, help="Also reuse the run's data arguments (infer on its validation split).")


@dataclass(frozen=True)
class VllmArgs:
    """ms-swift's VllmArguments with its defaults (3.x names as aliases): the engine of `--infer_backend vllm` (infer,
    deploy, eval) and of GRPO's `--use_vllm` rollouts; tunesmith.inference.backends turns them into vLLM's kwargs."""
    vllm_gpu_memory_utilization: float = _f(0.9, help="Fraction (0-1) of each GPU's memory for weights and KV "
                                                      "cache: vLLM's, and the built-in engine's automatic "
                                                      "--max_batch_size.", aliases=("gpu_memory_utilization",))
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


@dataclass(frozen=True)
class InferBackendArgs(VllmArgs):
    """The inference engine (infer, deploy, eval): batching, result files, and ms-swift's engine flags
    (VllmArguments, SglangArguments, LmdeployArguments) with its defaults, the 3.x names as aliases;
    tunesmith.inference.backends turns them into each engine's constructor kwargs."""
    infer_backend: str = _f("transformers", help="transformers (pt; built in), or vllm, sglang, lmdeploy (an NVIDIA "
                                                 "GPU and that package installed).",
                            choices=("pt", "transformers", "vllm", "sglang", "lmdeploy"))
    max_batch_size: Optional[int] = _f(help="Sequences generated together (continuous batching: new requests join "
                                            "between decoding steps, finished ones leave). auto (the default): as "
                                            "many as memory holds, up to 256, each request joining only while the "
                                            "batch's KV cache fits (docs/serving.md); N: at most N of them; -1: no "
                                            "cap but memory.", auto=True)
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


@dataclass(frozen=True)
class DeployServerArgs:
    """`tunesmith deploy`'s HTTP server: address, TLS, API key, limits, request log."""
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
    max_logprobs: int = _f(20, help="Largest top_logprobs a request may ask for (0: none).")
    max_request_bytes: int = _f(8 << 20, help="Largest request body in bytes (default 8 MiB); a larger one is "
                                              "refused (413) before it is read or tokenised. Also the largest "
                                              "picture (decoded bytes, from a data URL or an http(s) URL; 400).")
    verbose: bool = _f(True, help="Log each HTTP request (uvicorn info level).")


@dataclass(frozen=True)
class ExportOutputArgs:
    """`tunesmith export`: where the merged model goes and how its weights are written."""
    output_dir: Optional[str] = _f(help="Default <checkpoint>-merged, -gguf, -ollama or -<method>-int<bits> (fp8: "
                                        "-fp8), next to the checkpoint.")
    merge_lora: bool = _f(False, help="Merge the --adapters into the base weights and save a full model.")
    safe_serialization: bool = _f(True, help="Save .safetensors (false: PyTorch .bin).")
    max_shard_size: str = _f("5GB", help="Largest weight file, e.g. 5GB or 500MB.")
    exist_ok: bool = _f(False, help="Write into an existing --output_dir instead of stopping.")
    to_peft_format: bool = _f(False, help="ms-swift: export in PEFT format. Compatibility only (see the table at the "
                                          "end).")
    to_gguf: bool = _f(False, help="Write GGUF files for llama.cpp, Ollama, LM Studio and Jan (Qwen2/2.5, Qwen3, "
                                   "Llama 3.x, gpt-oss); --adapters are merged on the way. Default <checkpoint>-gguf.")
    gguf_quant: List[str] = _f(help="GGUF types, one file each from one load: f32 f16 bf16 q8_0 (written by the "
                                    "gguf package), and through llama.cpp's quantiser (tunesmith[gguf]): q4_0 q4_1 "
                                    "q5_0 q5_1 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k iq3_s "
                                    "iq3_m iq4_nl iq4_xs mxfp4_moe.", list_default=["q8_0"])
    to_ollama: bool = _f(False, help="Write an Ollama Modelfile (FROM, TEMPLATE for the chat format, stop tokens, "
                                     "SYSTEM, sampling defaults) next to the GGUF, or with the merged weights in "
                                     "<checkpoint>-ollama.")
    # export's --quant_method is the quantisation to write (ms-swift's export flag; it takes the place of QuantArgs'
    # in ExportArguments); a QLoRA checkpoint's own quant_method, inherited from its args.json, only says how it was
    # trained: export merges it unquantised
    quant_method: Optional[str] = _f(help="Write a quantised Hugging Face checkpoint: bnb (bitsandbytes 4/8-bit), "
                                          "fp8, gptq or gptq_v2 (calibrated on --dataset); awq is refused with "
                                          "what to use. Default <checkpoint>-<method>-int<bits>.",
                                     choices=("bnb", "fp8", "gptq", "gptq_v2", "awq"))
    quant_bits: Optional[int] = _f(help="Required with --quant_method (as in ms-swift), except fp8: bnb 4 or 8; "
                                        "gptq 2, 3, 4 or 8; fp8 8.", choices=(2, 3, 4, 8))
    quant_n_samples: int = _f(256, help="--quant_method gptq: calibration rows taken from --dataset.")
    quant_batch_size: int = _f(1, help="--quant_method gptq: calibration batch size.")
    group_size: int = _f(128, help="--quant_method gptq: weights sharing one scale (-1: one group per row).")



@dataclass(frozen=True)
class EvalArgs:
    """`tunesmith eval`: the benchmarks, their limits and scoring, an endpoint or local models, the base side by
    side."""
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



@dataclass(frozen=True)
class UIServerArgs:
    """`tunesmith web-ui` and `tunesmith app`: where the page is served and who may open it (ms-swift's
    WebUIArguments; safe by default: this machine only)."""
    server_name: str = _f("127.0.0.1", help="Address the page listens on: 127.0.0.1 (the default; ms-swift's is "
                                            "0.0.0.0) serves this machine only; any other address (0.0.0.0: every "
                                            "network interface) needs --api_key.")
    server_port: int = _f(7860, help="TCP port of the page (gradio's default, 7860).")
    share: bool = _f(False, help="gradio's public *.gradio.live link to the page: needs the internet and --api_key "
                                 "(refused offline, saying so).")
    lang: str = _f("en", help="Language of the page's own labels, en or zh (flag help texts stay English; "
                              "ms-swift's web-ui defaults to zh).", choices=("en", "zh"))
    api_key: Optional[str] = _f(help="Password of the page (log in with any user name and this key; or set "
                                     "TUNESMITH_API_KEY, which keeps it out of the process list). Never written to "
                                     "disk, shown or logged.", secret=True)
    ssl_keyfile: Optional[str] = _f(help="TLS private key file (PEM), with --ssl_certfile: serve the page over HTTPS.")
    ssl_certfile: Optional[str] = _f(help="TLS certificate file (PEM).")


@dataclass(frozen=True)
class WebUIFolderArgs:
    """`tunesmith web-ui`: the folders the page works in; it reads and starts nothing outside them."""
    output_dir: List[str] = _f(help="Folders the Train page starts runs in (the first is the default: <it>/<model "
                                    "name>, as training's own output/<model name>) and the Runs page lists runs "
                                    "from (every folder with args.json and logging.jsonl, up to 4 levels down). A "
                                    "run's --output_dir must be inside one.", list_default=["output"])
    allowed_paths: List[str] = _f(help="Folders the page may read models, datasets and checkpoints from (besides "
                                       "--output_dir; default the current folder): a local path outside them is "
                                       "refused (a hub id is not a path).", list_default=["."])
    max_upload_mb: int = _f(100, help="Largest dataset upload, in MiB; uploads are kept under <first "
                                      "--output_dir>/uploads.")


@dataclass(frozen=True)
class AppArgs:
    """`tunesmith app`: ms-swift's AppArguments besides the server's."""
    studio_title: Optional[str] = _f(help="Title of the chat page (default the model's or checkpoint's name).")
    base_url: Optional[str] = _f(help="ms-swift: chat with an OpenAI-compatible server already running instead of "
                                      "loading the model. Not supported yet (refused): pass --model/--adapters.")
    is_multimodal: bool = _f(False, help="ms-swift: whether the model takes images. Compatibility only (see the "
                                         "table at the end).", choices=(False,))

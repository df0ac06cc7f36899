"""ms-swift compatibility: the flags tunesmith accepts but that change nothing (their groups, and
COMPATIBILITY_ONLY / COMPATIBILITY_ONLY_IN saying why, per flag and per command), the ms-swift flags and values that
are errors saying what to use instead (NOT_SUPPORTED_YET, NOT_SUPPORTED_ELSEWHERE, NOT_SUPPORTED_VALUES) and value
aliases (VALUE_ALIASES). Every flag of ms-swift 4.6 (tests/fixtures/ms_swift_flags.json, from
bench/extract_swift_flags.py) is one of these or a real flag of tunesmith.config.groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from tunesmith.config.groups import _f


# ms-swift flags that tunesmith accepts but that change nothing: each is listed with why in COMPATIBILITY_ONLY (or,
# where the same name does something in another command, in that command's COMPATIBILITY_ONLY_IN). A flag whose
# value matters is pinned by `choices` to what tunesmith does, so that any other value is an error (the reason is
# in NOT_SUPPORTED_VALUES).

@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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



def _same(reason: str, *names: str) -> dict:
    """{name: reason} for flags that share one reason."""
    return dict.fromkeys(names, reason)


_VLLM_MEMORY = ("this frees GPU memory between a colocated vLLM's rollouts and training (vLLM's sleep mode, moving "
                "the policy or its optimizer states to the CPU while vLLM samples); tunesmith's --use_vllm does not "
                "do that juggling yet — lower --vllm_gpu_memory_utilization instead, or leave --use_vllm false "
                "(tunesmith's own engine samples with the training model's weights, no second copy)")
_ADAPTER = ("ms-swift's Adapter tuner (its own bottleneck layers) is not supported yet: no maintained library for it "
            "installs beside transformers 5 (AdapterHub's adapters 1.3 pins transformers ~=4.57); use --train_type "
            "lora, or another peft tuner (docs/tuners.md)")
_REFT = ("ReFT is not supported yet: pyreft 0.1.0, its library, pins transformers==4.45.1, which tunesmith cannot run "
         "with; use --train_type lora, or another peft tuner (docs/tuners.md)")
_LONGLORA = ("LongLoRA is not supported yet: it is ms-swift's own patch of Llama's attention (shifted sparse "
             "attention), which no maintained library provides and tunesmith does not patch models; use --train_type "
             "lora (with --attn_impl flash_attn for long sequences)")
_MULTIMODAL = ("that multimodal input is not supported yet; tunesmith trains text models and the vision-language "
               "models Qwen2-VL, Qwen2.5-VL and Qwen3-VL on images (docs/vision.md)")
_HUB = ("pushing to a hub is not implemented; upload the output folder afterwards, e.g. `huggingface-cli upload "
        "REPO_ID OUTPUT_DIR` or `modelscope upload REPO_ID OUTPUT_DIR`")
_TASK = ("only chat/causal language modelling is supported (task_type causal_lm); classification, embedding and "
         "reranker models are not")
_EVAL_IN_TRAINING = ("benchmarks do not run during training; evaluate a checkpoint afterwards with `tunesmith eval "
                     "--adapters CKPT --eval_dataset ...` (validation loss and token_acc are logged during training)")
_MCORE = "Megatron-Core conversion is not supported: tunesmith reads and writes Hugging Face checkpoints only"
_QUANT_EXPORT = ("quantised and local-runtime export is `tunesmith export`'s: after training, `tunesmith export "
                 "--adapters CKPT --to_gguf true --to_ollama true` (or --quant_method bnb|gptq|fp8)")
_CACHED = ("pre-tokenised dataset caches are not supported; pass the data itself with --dataset (tunesmith tokenises "
           "it once before training; `tunesmith data stats` shows the token counts)")
_RAY = "Ray is not supported; launch several processes with NPROC_PER_NODE (and NNODES) as with ms-swift"
_SAMPLING = ("that sampling switch is not implemented; training batches are drawn in a seeded shuffled order "
             "(--group_by_length true groups rows of similar length, with each row's length in tokens; "
             "--dataset_shuffle false keeps the file order)")

# ms-swift flags that exist upstream but that tunesmith does not implement yet. They are errors, never silently
# ignored: a script relying on them must hear that the behaviour is not there. The value says what to do instead.
# (A name that is a real flag of some command is an error only in the commands that lack it.)
NOT_SUPPORTED_YET = {
    "custom_dataset_info": "pass the data files directly with --dataset",
    "custom_register_path": "tunesmith uses the model's own chat template; no plugins are needed",
    "predict_with_generate": "use tunesmith infer on the checkpoint",
    "agent_template": "agent templates are not supported yet; tool calls are rendered by the model's own chat "
                      "template",
    "sequence_parallel_size": "sequence parallelism is not supported; use --deepspeed zero3 and "
                              "--gradient_checkpointing for long sequences",
    "lora_modules": "removed in ms-swift 3.x; use --adapters",
    "f_divergence_type": "only DPO's reverse-KL objective is implemented",
    "use_weighting": "WPO weighting is not implemented",
    # tuners other than LoRA, and optimiser plugins
    **_same(_ADAPTER, "adapter_act", "adapter_length"),
    **_same(_REFT, "reft_args", "reft_intervention_type", "reft_layer_key", "reft_layers"),
    **_same("Q-GaLore (GaLore with 8-bit weights and quantised projections) needs q-galore-torch's 8-bit CUDA "
            "optimiser and is not supported; --use_galore true trains with galore-torch's GaLoreAdamW",
            "galore_cos_threshold", "galore_gamma_proj", "galore_proj_bits", "galore_proj_group_size",
            "galore_proj_quant", "galore_quantization", "galore_queue_size"),
    "optim_target_modules": "that is transformers' --optim galore_* form; use --use_galore true with "
                            "--galore_target_modules",
    "norm_bbox": "grounding boxes are not supported yet: images are trained as pictures, box coordinates as text",
    # losses, metrics and trainer plugins
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
    **_same(_SAMPLING, "length_column_name", "train_sampling_strategy", "sortish_sampler"),
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
    # preference training beyond DPO/SimPO/ORPO/CPO/KTO
    "mini_batch_size": "ms-swift 3.x's GRPO mini-batches were replaced by --steps_per_generation (micro-batches "
                       "trained per generated batch) and --generation_batch_size, which tunesmith has; use those",
    **_same(_VLLM_MEMORY, "sleep_level", "offload_model", "offload_optimizer", "gc_collect_after_offload"),
    "use_lmdeploy": "ms-swift 3.x's LMDeploy rollouts for GRPO were removed in ms-swift 4; tunesmith samples GRPO's "
                    "rollouts with its own engine or, with --use_vllm true, with vLLM; drop the flag",
    "enable_flattened_weight_sync": "this tunes how full weights are flattened for a `swift rollout` vLLM server's "
                                    "NCCL broadcast; tunesmith's --vllm_mode server pushes the policy to `tunesmith "
                                    "rollout` over HTTP (and --use_vllm colocate hands vLLM the LoRA adapter), so "
                                    "there is nothing to flatten; drop the flag",
    "multi_turn_func": "ms-swift 3.x's multi_turn_func became --multi_turn_scheduler: name a scheduler class "
                       "(multi_turns['name'] = Cls in an --external_plugins file, or tool_call_scheduler)",
    "vllm_server_group_port": "it is the NCCL port of a `swift rollout` vLLM server's weight broadcast (GPU to "
                              "GPU); tunesmith's --vllm_mode server pushes the policy's LoRA adapter to "
                              "`tunesmith rollout` over HTTP and needs no group port",
    "vllm_server_pass_dataset": "it hands the rows' extra columns to a multi-turn scheduler running on the rollout "
                                "server; tunesmith runs multi-turn rollouts in the trainer (--multi_turn_scheduler), "
                                "not on the server, and rewards get the columns there",
    "context_manager": "ms-swift 4 removed it (its own error: change the conversation between turns in a "
                       "MultiTurnScheduler's step/run and pass --multi_turn_scheduler); tunesmith runs such "
                       "schedulers in the trainer (tunesmith rlhf --rlhf_type grpo --multi_turn_scheduler NAME)",
}

# Names that are real flags of some tunesmith commands but that ms-swift also has in commands where tunesmith does
# not implement them: there (and only there, since a command's own flags are resolved first) they are errors with
# this reason. NOT_SUPPORTED_YET holds the names that no tunesmith command has.
NOT_SUPPORTED_ELSEWHERE = {
    **_same("multi-turn rollouts (their scheduler and gym environment) run in the training process, not on "
            "`tunesmith rollout`: pass the flag to tunesmith rlhf --rlhf_type grpo", "multi_turn_scheduler",
            "max_turns", "gym_env", "use_gym_env"),
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
    **_same(_QUANT_EXPORT, "quant_n_samples", "quant_batch_size", "group_size", "to_ollama", "to_gguf",
            "gguf_quant"),
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
    "num_sample_generations": "PPO: TRL prints a table of a few near-greedy validation samples that many times during "
                              "training; tunesmith writes every rollout with its rewards to completions.jsonl "
                              "(--log_completions true) and scores the validation prompts at each evaluation "
                              "(eval_objective/scores)",
    "move_model_batches": "with --use_vllm tunesmith hands vLLM the LoRA adapter, not the model's weights, so "
                          "there are no weight batches to move",
    "vllm_reasoning_parser": "reasoning is split from the answer by tunesmith's own parser, chosen from the chat "
                             "template, for every backend alike",
    "lmdeploy_vision_batch_size": "tunesmith's LMDeploy backend takes text only, so there is no vision encoder to "
                                  "batch; with --infer_backend transformers a prefill batch runs all its pictures "
                                  "through the vision tower together",
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
    "teacher_model_type": "the GKD teacher's architecture is read from its config.json",
    "seq_kd": "GKD trains on the dataset's replies or the student's own (--lmbda), as ms-swift; true (the teacher "
              "generates) is deprecated in ms-swift and refused",
    "galore_optim_per_parameter": "tunesmith's one GaLoreAdamW already keeps each parameter's state and projection "
                                  "apart, so every parameter gets the update its own optimiser would give; layer-wise "
                                  "steps during the backward pass (true) are refused",
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
                "shuffle_buffer_size", "interleave_prob", "stopping_strategy"]
_INTERLEAVE_IN_TRAINING = "it mixes training's --dataset files (sft, pt, rlhf); this command reads its rows in order"
_STREAMING_IN_INFERENCE = {
    "streaming": "inference reads its rows (--val_dataset) whole, in order; only training (sft) streams",
    "shuffle_buffer_size": "it sizes training's --streaming shuffle buffer; inference keeps the rows' order",
    "interleave_prob": _INTERLEAVE_IN_TRAINING, "stopping_strategy": _INTERLEAVE_IN_TRAINING}
COMPATIBILITY_ONLY_IN = {
    "sft": _TRAIN_SCOPED,
    "pt": _TRAIN_SCOPED,
    # GRPO samples its rollouts with them (--rlhf_type grpo); for the other methods they change nothing
    "rlhf": {k: v for k, v in _TRAIN_SCOPED.items() if k not in _ROLLOUT_SAMPLING},
    "dpo": _TRAIN_SCOPED,
    "infer": _STREAMING_IN_INFERENCE,
    "deploy": _STREAMING_IN_INFERENCE,
    "rollout": _STREAMING_IN_INFERENCE,
    "data": {"shuffle_buffer_size": "the data commands read rows in order (`data stats --streaming true` measures "
                                    "the first --num_rows); it sizes training's --streaming shuffle buffer",
             "interleave_prob": _INTERLEAVE_IN_TRAINING, "stopping_strategy": _INTERLEAVE_IN_TRAINING},
    "export": {
        **dict.fromkeys(["num_beams", "stream", "logprobs", "top_logprobs", "n"],
                        "export generates nothing; the sampling defaults it writes (the Ollama Modelfile's "
                        "PARAMETER lines) are --temperature, --top_k, --top_p, --repetition_penalty, "
                        "--max_new_tokens and --stop_words"),
        "seed": "export is deterministic; nothing is sampled",
        **dict.fromkeys([f for f in _DATA_FIELDS if f != "dataset"],
                        "export reads rows only for GPTQ calibration: the first --quant_n_samples of --dataset"),
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
    ("seq_kd", True): "sequential KD (the teacher generates the replies) is deprecated in ms-swift and not "
                      "implemented there either (it raises NotImplementedError); drop the flag: --lmbda sets the "
                      "share of steps on the student's own completions",
    ("train_type", "longlora"): _LONGLORA, ("train_type", "adapter"): _ADAPTER, ("train_type", "reft"): _REFT,
    **{("quant_method", q): f"QLoRA trains on a bnb-quantised base; {q} is not supported for training"
       for q in ("hqq", "eetq", "quanto")},
    **{("quant_method", q): f"QLoRA trains on a bnb-quantised base; to write a {q} checkpoint after training use "
                            f"`tunesmith export --quant_method {q}`"
       for q in ("fp8", "awq", "gptq", "gptq_v2")},
    ("truncation_strategy", "split"): "splitting over-long rows is not supported yet; use delete, left or right",
    ("tuner_backend", "unsloth"): "unsloth is not supported; adapters are built with peft",
    ("use_swift_lora", True): "swift's own LoRA layers are not supported; adapters are peft's",
    ("packing_strategy", "sequential"): "tunesmith packs best-fit decreasing (binpack) only",
    ("average_tokens_across_devices", False): "tunesmith always divides the loss by the tokens of all processes",
    ("galore_optim_per_parameter", True): "layer-wise GaLore (an optimiser step per parameter during the backward "
                                          "pass) cannot clip the whole gradient or accumulate micro-batches; drop the "
                                          "flag: one GaLoreAdamW gives each parameter the same update",
    ("optimizer", "muonclip"): "MuonClip (Muon with QK-clip) is not supported; --optimizer muon is",
}

# Values that ms-swift accepts as aliases (value rewrites, not flag renames).
VALUE_ALIASES = {
    ("torch_dtype", "bf16"): "bfloat16", ("torch_dtype", "fp16"): "float16", ("torch_dtype", "fp32"): "float32",
    ("attn_impl", "flash_attn"): "flash_attention_2",
    ("lora_dtype", "bf16"): "bfloat16", ("lora_dtype", "fp16"): "float16", ("lora_dtype", "fp32"): "float32",
    ("infer_backend", "pt"): "transformers",
}

# `tunesmith app`: ms-swift's app deploys a server and chats with it over HTTP; tunesmith's chat page runs the engine
# in its own process, so the server's flags and the data flags change nothing there.
_APP_TEXT_ONLY = ("the chat page takes text only: pictures are not supported on it yet; chat with pictures through "
                  "`tunesmith infer` (interactive) or `tunesmith deploy` (docs/vision.md)")
COMPATIBILITY_ONLY["is_multimodal"] = _APP_TEXT_ONLY + "; true is refused"
NOT_SUPPORTED_VALUES[("is_multimodal", True)] = _APP_TEXT_ONLY
COMPATIBILITY_ONLY_IN["app"] = {
    **dict.fromkeys(["host", "port", "served_model_name", "owned_by", "max_logprobs", "max_request_bytes",
                     "result_path"],
                    "the chat page runs the model in its own process and starts no API server (ms-swift's app "
                    "deploys one first); for an API use tunesmith deploy"),
    **dict.fromkeys(["n", "logprobs", "top_logprobs", "metric"], "the chat page shows one reply per turn, as text"),
    **dict.fromkeys(_DATA_FIELDS + ["load_data_args"], "the chat page reads no dataset: you type the conversation"),
}

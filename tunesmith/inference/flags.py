"""The value checks of the commands that run a trained model — infer, deploy, eval, export: every flag of their
groups (tunesmith.config.groups) that has a valid range, checked before anything loads, every problem at once
(FlagError: exit 2), in the style of training's (tunesmith.train.config). `check_inference_flags` runs first in each
command's main; `check_reply_room` once the model's context length is known (its config, before the weights load).

Flags without a range (paths, names the engines check, booleans, choices the parser checks) are not repeated here;
ms-swift's compatibility-only flags are ignored (with a note), so their values are not judged either."""
from __future__ import annotations

import os
from typing import Optional

from tunesmith.config.checks import SEED_MAX, between, empty_problem, model_problems, raise_problems
from tunesmith.config.groups import DeployServerArgs, EvalArgs, ExportOutputArgs, InferBackendArgs
from tunesmith.config.slices import flag_values


def check_inference_flags(args, extra: list[str] = ()) -> None:
    """Raise FlagError naming every flag value of an infer, deploy, eval or export command outside its range
    (with the flag problems parse_args deferred, deploy's adapter names, the paths to read and write, and the
    command's own `extra` problems); nothing has loaded yet. Returns None when all are fine."""
    from tunesmith.config.parser import deferred_problems
    from tunesmith.models.checkpoint import named_adapter_problems

    out: list[str] = deferred_problems(args) + list(extra)
    out += named_adapter_problems(list(flag_values(args).get("adapters") or []), served_base_name(args))
    out += path_problems(args)
    out += generation_problems(args)
    out += model_problems(args)
    out += _data_problems(args)
    if isinstance(args, InferBackendArgs):
        out += _backend_problems(args)
    if isinstance(args, DeployServerArgs):
        out += _server_problems(args)
    if isinstance(args, EvalArgs):
        out += _eval_problems(args)
    if isinstance(args, ExportOutputArgs):
        out += empty_problem("output_dir", args.output_dir, "give a folder (or leave the flag out for "
                                                            "<checkpoint>-merged, -gguf, -ollama or "
                                                            "-<method>-int<bits>)")
    raise_problems(out)


def generation_problems(args) -> list[str]:
    """The sampling flags (GenerationArgs): temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0, top_k >= -1,
    counts at least 1, top_logprobs >= 0, a 32-bit seed, no empty stop word."""
    out: list[str] = []
    for name, value, lo, hi, lo_open, hint in (
            ("temperature", args.temperature, 0, None, False, "0 is greedy"),
            ("top_p", args.top_p, 0, 1, True, ""),
            ("repetition_penalty", args.repetition_penalty, 0, None, True, "1 is no penalty"),
            ("top_k", args.top_k, -1, None, False, "0 or -1 turn it off"),
            ("max_new_tokens", args.max_new_tokens, 1, None, False, ""),
            ("top_logprobs", args.top_logprobs, 0, None, False, "")):
        if value is not None:
            between(out, name, value, lo, hi, lo_open=lo_open, hint=hint)
    for name, value in (("n", args.n), ("num_beams", args.num_beams)):
        between(out, name, value, 1, None)
    if args.seed is not None:
        between(out, "seed", args.seed, 0, SEED_MAX)
    if any(not str(w) for w in args.stop_words or []):
        out.append("--stop_words holds an empty string, which would end every reply before its first token; give "
                   "the stop strings themselves")
    return out


def _data_problems(args) -> list[str]:
    """The data and template flags these commands share with training (--val_dataset rows, --load_data_args)."""
    out: list[str] = []
    values = flag_values(args)
    for name in ("max_length", "packing_length"):
        if values[name] is not None:
            between(out, name, values[name], 1, None)
    between(out, "split_dataset_ratio", args.split_dataset_ratio, 0, 1, hi_open=True)
    between(out, "data_seed", args.data_seed, 0, SEED_MAX)
    between(out, "dataset_num_proc", args.dataset_num_proc, 1, None)
    between(out, "shuffle_buffer_size", args.shuffle_buffer_size, 1, None)
    return out


# the engines' counts (at least 1) and fractions of GPU memory (0 < f <= 1); None values are the engine's default
_ENGINE_COUNTS = ("vllm_tensor_parallel_size", "vllm_pipeline_parallel_size", "vllm_max_num_seqs", "vllm_max_model_len",
                  "vllm_max_lora_rank", "vllm_data_parallel_size", "sglang_tp_size", "sglang_pp_size",
                  "sglang_dp_size", "sglang_ep_size", "sglang_context_length", "sglang_speculative_num_steps",
                  "sglang_speculative_eagle_topk", "sglang_speculative_num_draft_tokens", "lmdeploy_tp",
                  "lmdeploy_session_len")
_ENGINE_FRACTIONS = ("vllm_gpu_memory_utilization", "sglang_mem_fraction_static", "lmdeploy_cache_max_entry_count")


def _backend_problems(args) -> list[str]:
    """--max_batch_size (auto, at least 1, or -1: no cap) and the vLLM/SGLang/LMDeploy counts and memory
    fractions."""
    out: list[str] = []
    if args.max_batch_size not in (None, -1):
        between(out, "max_batch_size", args.max_batch_size, 1, None,  # eval's is its own flag, without auto
                hint="or -1 for no cap" if isinstance(args, EvalArgs) else
                "or auto (the default: sized from memory), or -1 for no cap")
    values = flag_values(args)
    for name in _ENGINE_COUNTS:
        if values[name] is not None:
            between(out, name, values[name], 1, None)
    for name in _ENGINE_FRACTIONS:
        if values[name] is not None:
            between(out, name, values[name], 0, 1, lo_open=True, hint="a fraction of the GPU's memory")
    if args.vllm_mm_processor_cache_gb is not None:
        between(out, "vllm_mm_processor_cache_gb", args.vllm_mm_processor_cache_gb, 0, None)
    out += _image_limit_problems(args.vllm_limit_mm_per_prompt)
    return out


def _image_limit_problems(limit) -> list[str]:
    """--vllm_limit_mm_per_prompt: a JSON object whose "image" entry (the pictures per prompt, also for the built-in
    engine) is a whole number >= 0, or vLLM's {"count": N, ...}."""
    if limit is None:
        return []
    if not isinstance(limit, dict):
        return [f"--vllm_limit_mm_per_prompt {limit!r}: expected a JSON object such as '{{\"image\": 4}}'"]
    value = limit.get("image")
    count = value.get("count") if isinstance(value, dict) else value
    if value is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        return [f"--vllm_limit_mm_per_prompt image {value!r}: expected the pictures per prompt, a whole number >= 0 "
                f"(0 refuses every picture)"]
    return []


def _server_problems(args) -> list[str]:
    """deploy's server: the address, port, served name, request limits, API key and TLS files."""
    import os

    out = empty_problem("host", args.host, "give the address to listen on (127.0.0.1, or 0.0.0.0 for the network)")
    if args.port is not None:
        between(out, "port", args.port, 0, 65535)
    out += empty_problem("served_model_name", args.served_model_name, "clients send it as the model id: give a name "
                         "(or leave the flag out for the model folder's name)")
    between(out, "max_logprobs", args.max_logprobs, 0, None, hint="0 refuses every top_logprobs request")
    between(out, "max_request_bytes", args.max_request_bytes, 1, None, hint=f"the default is {8 << 20} (8 MiB)")
    if args.api_key is not None and not str(args.api_key).strip():
        out.append("--api_key is empty: the server would take any request; give a key (or leave the flag out)")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        out.append("--ssl_keyfile and --ssl_certfile go together: HTTPS needs the private key and its certificate")
    for name, path in (("ssl_keyfile", args.ssl_keyfile), ("ssl_certfile", args.ssl_certfile)):
        if path and not os.path.isfile(path):
            out.append(f"--{name} {path}: no such file")
    return out


def _eval_problems(args) -> list[str]:
    """eval's counts, endpoint, key and output folder, and the values of --eval_generation_config."""
    out: list[str] = []
    if args.eval_limit is not None:
        between(out, "eval_limit", args.eval_limit, 1, None, hint="leave it out to evaluate every sample")
    between(out, "eval_num_proc", args.eval_num_proc, 1, None)
    url = args.eval_url
    if url is not None and not str(url).startswith(("http://", "https://")):
        out.append(f"--eval_url {url!r}: expected an http:// or https:// address, e.g. http://127.0.0.1:8000/v1")
    out += empty_problem("eval_output_dir", args.eval_output_dir, "give a folder (or leave the flag out)")
    out += empty_problem("api_key", args.api_key, "give --eval_url's key (or leave the flag out)")
    gen = args.eval_generation_config or {}
    for key, lo, lo_open, hi in (("max_tokens", 1, False, None), ("max_new_tokens", 1, False, None),
                                 ("temperature", 0, False, None), ("top_p", 0, True, 1), ("top_k", -1, False, None),
                                 ("repetition_penalty", 0, True, None), ("seed", 0, False, SEED_MAX)):
        if gen.get(key) is not None:
            found: list[str] = []
            between(found, key, gen[key], lo, hi, lo_open=lo_open)
            out += [f"--eval_generation_config {key} {gen[key]}: {p.split(': ', 1)[1]}" for p in found]
    return out


def check_reply_room(max_new_tokens, context: int, source: str) -> None:
    """Raise FlagError when --max_new_tokens is over the model's context length (context tokens, from source): a
    reply shares the context with its prompt, so no request could ask for that many (deploy answers such a request
    with 400, as vLLM does). None (all the room left) is fine."""
    if max_new_tokens is None:
        return
    found: list[str] = []
    between(found, "max_new_tokens", max_new_tokens, 1, context,
            hint=f"the model's context is {context} tokens ({source}), shared by the prompt and the reply; leave "
                 f"the flag out for all the room the prompt leaves")
    raise_problems(found)


def context_length(config, max_model_len) -> tuple[int, str]:
    """(the context length in tokens ChatEngine will use, where it comes from): --max_model_len, else the config's
    max_position_embeddings, else 4096."""
    if max_model_len:
        return int(max_model_len), "--max_model_len"
    n = getattr(config, "max_position_embeddings", None)
    if n:
        return int(n), "max_position_embeddings in the model's config.json; --max_model_len overrides it"
    return 4096, "the default when the config names none; --max_model_len sets it"


def check_model_reply_room(args, model_dir: str) -> None:
    """check_reply_room for the model in model_dir (its config.json read, not its weights). A config that cannot
    be read is left for the loader to report."""
    if args.max_new_tokens is None:
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    except Exception:  # noqa: BLE001 - no or a broken config.json: the model loader says what is wrong
        if not args.max_model_len:
            return
        config = None
    check_reply_room(args.max_new_tokens, *context_length(config, args.max_model_len))


def served_base_name(args) -> Optional[str]:
    """The name deploy serves the base model under when named adapters are given (--served_model_name, else the
    --model folder's name), or None when it is not known yet (the model comes from a checkpoint's args.json) or
    args is not a deploy command."""
    from tunesmith.models.checkpoint import model_suffix

    if not isinstance(args, DeployServerArgs):
        return None
    model = flag_values(args).get("model")
    return args.served_model_name or (model_suffix(model) if model else None)


def path_problems(args) -> list[str]:
    """The paths infer, deploy and eval are given, before anything loads: --result_path a file that can be
    written, no empty --val_dataset name, a local --model folder that can be read and holds a model."""
    from tunesmith.config.checks import empty_names
    from tunesmith.data.load import check_spec
    from tunesmith.errors import DataError, FlagError
    from tunesmith.files import unwritable
    from tunesmith.models.load import model_dir_problem

    out: list[str] = []
    values = flag_values(args)  # infer, deploy and eval do not share every one of these flags
    result_path = values.get("result_path")
    if result_path is not None:
        why = unwritable(result_path) if str(result_path).strip() else "is empty; give the file to write"
        if why:
            out.append(f"--result_path {result_path}: {why}")
    empty_names(out, "val_dataset", values.get("val_dataset"))
    for spec in values.get("val_dataset") or []:  # a local file that is not there, before the model loads
        if str(spec).strip():
            try:
                check_spec(str(spec), "--val_dataset")
            except DataError as e:
                out.append(f"--val_dataset {spec}: {e}")
            except FlagError:  # an empty name ('hf::'): empty_names above said so
                pass
    model = values.get("model")
    if model and os.path.isdir(model):
        out += [m for m in [model_dir_problem(model)] if m]
    return out

"""A training run's configuration, resolved once: parse (tunesmith.config.parser) → `resolve` (every problem reported
at once, then ms-swift's dependent defaults) → a frozen `TrainConfig` split into typed slices
(tunesmith.config.slices). Each stage takes only its slice: `prepare_data` the data slice, `prepare_model` the model
slice, the loop the optimisation and output slices, the accelerator the distributed slice; the method object holds
its own flags (train/methods/sft.py, dpo.py, …).

What lives here: TrainConfig, the value checks (`problems`) and `resolve`. What must not: loading anything, joining
the process group (the recipe does that before resolving), or changing the parsed arguments — `resolve` returns a
new object and nothing changes a slice afterwards (they are frozen dataclasses).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from tunesmith.config.commands import RLHFArguments, SftArguments
from tunesmith.config.training_groups import TunerArgs
from tunesmith.config.parser import deferred_problems
from tunesmith.config.slices import DataConfig, DistConfig, ModelConfig, OptimConfig, OutputConfig, flag_values, take
from tunesmith.config.checks import between, empty_names, model_problems, raise_problems
from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.models.tuners import MUTATING_INITS, RESUME_SAME, WHOLE_MODEL
from tunesmith.train.knob_checks import data_knob_problems, knob_problems, planned_world, tuner_problems


@dataclass(frozen=True)
class TrainConfig:
    """One training run's resolved configuration. `args` is the whole resolved command (what args.json records;
    RLHFArguments for rlhf and dpo); the stages read their slice."""
    args: SftArguments
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    output: OutputConfig
    dist: DistConfig
    world_size: int


def _adapter_base(adapters) -> "str | None":
    """The base model the first --adapters checkpoint names (its args.json, else adapter_config.json), or None.
    Training never takes settings from a checkpoint silently; this only makes the missing --model's message exact."""
    import json

    for path in list(adapters or [])[:1]:
        for name, key in (("args.json", "model"), ("adapter_config.json", "base_model_name_or_path")):
            try:
                with open(os.path.join(str(path).split("=")[-1], name), encoding="utf-8") as fh:
                    value = json.load(fh).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            if value:
                return str(value)
    return None


def _checkpoint_files(args, ckpt: str, flag: str) -> list[str]:
    """The files a resume reads, present and readable: args.json and trainer_state.json (valid JSON), the weights
    (*.safetensors, each with a readable header) and — unless --resume_only_model — the optimiser (or DeepSpeed's
    shards), scheduler and RNG states."""
    import json

    out = []
    for name in ("args.json", "trainer_state.json"):
        try:
            with open(os.path.join(ckpt, name), encoding="utf-8") as fh:
                json.load(fh)
        except FileNotFoundError:
            out.append(f"{flag}: {name} is missing, so it is not a complete checkpoint of a tunesmith (or ms-swift) "
                       f"run; resume from another checkpoint-N")
        except (OSError, ValueError) as e:
            out.append(f"{flag}: {name} is damaged ({e}); resume from another checkpoint-N")
    weights = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    if not weights:
        out.append(f"{flag}: no weights in it (*.safetensors); resume from another checkpoint-N")
    for f in weights:
        try:
            from safetensors import safe_open

            with safe_open(os.path.join(ckpt, f), "pt") as fh:
                fh.keys()
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file, whatever safetensors raises
            out.append(f"{flag}: {f} is damaged ({type(e).__name__}: {e}); resume from another checkpoint-N")
    if not args.resume_only_model:
        optimiser = "deepspeed" if os.path.isdir(os.path.join(ckpt, "deepspeed")) else \
            "optimizer_0" if os.path.isdir(os.path.join(ckpt, "optimizer_0")) else "optimizer.pt"
        mine = "deepspeed" if args.deepspeed else "optimizer_0" if args.fsdp else "optimizer.pt"
        run_kind = {"deepspeed": "--deepspeed", "optimizer_0": "--fsdp", "optimizer.pt": "neither --deepspeed nor "
                    "--fsdp"}
        if optimiser != mine and os.path.exists(os.path.join(ckpt, optimiser)):
            out.append(f"{flag}: its optimiser state was saved by a run with {run_kind[optimiser]} ({optimiser}), "
                       f"this run has {run_kind[mine]}; resume the same way, or pass --resume_only_model true to "
                       f"resume the weights alone (with a fresh optimiser)")
            return out
        for name in (optimiser, "scheduler.pt", "rng_state.pth"):
            if not os.path.exists(os.path.join(ckpt, name)):
                out.append(f"{flag}: {name} is missing (a checkpoint saved with --save_only_model?); pass "
                           f"--resume_only_model true to resume the weights alone")
    return out




def resume_problems(args) -> list[str]:
    """--resume_from_checkpoint must be a complete checkpoint (trainer_state.json, weights, no unfinished save,
    not marked diverged.json) of the same kind of run: the method, the tuner and its shapes, the model (by its
    folder or hub name). Returns one problem per mismatch, each naming both values."""
    import json

    from tunesmith.models.checkpoint import model_suffix

    ckpt = args.resume_from_checkpoint
    flag = f"--resume_from_checkpoint {ckpt}"
    if not os.path.isdir(ckpt):
        return [f"{flag}: no such checkpoint directory"]
    if os.path.basename(os.path.normpath(ckpt)).startswith(".tmp-"):
        return [f"{flag}: an unfinished save that a stopped run left behind (checkpoints are renamed into place "
                f"only when complete); resume from a checkpoint-N folder next to it"]
    if not os.path.isfile(os.path.join(ckpt, "trainer_state.json")):
        return [f"{flag}: not a training checkpoint (no trainer_state.json) — a model folder? Pass a model with "
                f"--model and an adapter with --adapters; resume from a run's checkpoint-N folder"]
    if os.path.isfile(os.path.join(ckpt, "diverged.json")):
        with open(os.path.join(ckpt, "diverged.json"), encoding="utf-8") as fh:
            info = json.load(fh)
        good = info.get("last_good_checkpoint")
        return [f"{flag}: its weights gave a non-finite loss at step {info.get('step')} (diverged.json), so it "
                f"would stop again; resume from " + (good if good else "an earlier checkpoint, or start afresh")
                + " with a lower --learning_rate"]
    out = _checkpoint_files(args, ckpt, flag)
    if out:
        return out
    with open(os.path.join(ckpt, "args.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    theirs, ours = saved.get("rlhf_type") or "sft", args.rlhf_type if isinstance(args, RLHFArguments) else "sft"
    if theirs != ours:
        out.append(f"{flag}: a {theirs} checkpoint, but this run trains {ours}; to train {ours} from it, pass its "
                   f"weights (--adapters {ckpt}, or --model for full training) instead of resuming")
    ours_now = flag_values(args)
    # what the checkpoint must share with this run: the tuner and the flags that shape (and mean) its weights
    for key in ("train_type",) + RESUME_SAME.get(saved.get("train_type") or "lora", ()):
        if key in saved and saved[key] != ours_now[key]:
            out.append(f"{flag}: the checkpoint has --{key} {saved[key]}, this run --{key} {ours_now[key]}; "
                       f"resume with the checkpoint's settings")
    world = planned_world()
    if saved.get("world_size") and saved["world_size"] != world and not args.ignore_data_skip:
        out.append(f"{flag}: saved by a run on {saved['world_size']} processes, this run has {world}; the data "
                   f"position counts each process's batches, so resume on {saved['world_size']} processes, or add "
                   f"--ignore_data_skip true (the epoch starts over, with the weights and optimiser restored)")
    if saved.get("model") and args.model and model_suffix(saved["model"]) != model_suffix(args.model):
        out.append(f"{flag}: the checkpoint was trained from --model {saved['model']}, this run loads "
                   f"{args.model}; resume with the same model")
    return out + _resume_step_problems(args, ckpt, flag, saved)


def _resume_step_problems(args, ckpt: str, flag: str, saved: dict) -> list[str]:
    """--max_steps at or below the checkpoint's step: the resumed run counts on from that step (unless
    --resume_only_model with --ignore_data_skip starts it from 0), so it would stop at once, having trained nothing."""
    import json

    if args.max_steps <= 0 or (args.resume_only_model and args.ignore_data_skip):
        return []
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
        step = json.load(fh).get("global_step")
    if not isinstance(step, int) or args.max_steps > step:
        return []
    weights = f"--model {ckpt}" if saved.get("train_type") in WHOLE_MODEL else f"--adapters {ckpt}"
    return [f"{flag}: the checkpoint is at step {step} and --max_steps {args.max_steps} ends "
            f"{'there' if args.max_steps == step else 'before it'}, so there is nothing left to train (a resumed run "
            f"counts on from the checkpoint's step). To train on, give --max_steps above {step} (the total, e.g. "
            f"--max_steps {2 * step}); to start a new run from these weights, pass {weights} instead of resuming"]


def _range_problems(args) -> list[str]:
    """The counts, sizes, rates and seeds that must lie in a range (batch sizes and steps at least 1, the Adam betas
    in [0, 1), seeds within 32 bits, ...), one problem per value outside its range."""
    out: list[str] = []
    v = flag_values(args)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"):
        between(out, name, v[name], 1, None)
    for name in ("gradient_accumulation_steps", "eval_steps", "max_length", "packing_length"):
        if v[name] is not None:
            between(out, name, v[name], 1, None)
    if args.save_strategy in ("steps", "best"):
        between(out, "save_steps", args.save_steps, 1, None)
    for name in ("adam_beta1", "adam_beta2"):
        between(out, name, v[name], 0, 1, hi_open=True)
    for name in ("adam_epsilon", "weight_decay", "max_grad_norm", "warmup_steps", "router_aux_loss_coef"):
        between(out, name, v[name], 0, None)
    between(out, "warmup_ratio", args.warmup_ratio, 0, 1)
    between(out, "split_dataset_ratio", args.split_dataset_ratio, 0, 1, hi_open=True)
    for name in ("seed", "data_seed"):
        between(out, name, v[name], 0, 2 ** 32 - 1)
    return out


MAX_EPOCHS = 10 ** 6  # more passes over the data than any run finishes (and a step count that overflows)


def _more_value_problems(args) -> list[str]:
    """The remaining counts and names: --max_steps (-1 = no limit), --save_total_limit, workers and processes,
    --loss_scale, --max_new_tokens, the model flags (config.checks.model_problems: --attn_impl, ...)."""
    from tunesmith.data.encode import parse_loss_scale

    out: list[str] = []
    if args.max_steps < -1:
        out.append(f"--max_steps {args.max_steps}: expected a number of steps, or -1 (the default) for "
                   f"--num_train_epochs to decide")
    elif args.max_steps > 0:
        between(out, "max_steps", args.max_steps, 1, None)
    if args.save_total_limit is not None:
        between(out, "save_total_limit", args.save_total_limit, 1, None, hint="leave it out to keep every checkpoint")
    between(out, "dataloader_num_workers", args.dataloader_num_workers or 0, 0, None)
    between(out, "dataset_num_proc", args.dataset_num_proc, 1, None)
    if args.max_new_tokens is not None:
        between(out, "max_new_tokens", args.max_new_tokens, 1, None)
    out += model_problems(args)
    try:
        parse_loss_scale(args.loss_scale, "default")
    except ConfigError as e:
        out.append(str(e))
    return out


def _scheduler_problems(args) -> list[str]:
    """--lr_scheduler_type with --lr_scheduler_kwargs: built once on a stand-in optimiser, so a keyword the
    schedule does not take (or a value of the wrong type) is a flag problem, not a traceback after the run
    directory exists."""
    if not args.lr_scheduler_kwargs:
        return []
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    try:
        sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=1, num_training_steps=10,
                              scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs))
        for _ in range(3):
            opt.step()
            sched.step()
    except (TypeError, ValueError) as e:
        return [f"--lr_scheduler_kwargs {args.lr_scheduler_kwargs}: not accepted by --lr_scheduler_type "
                f"{args.lr_scheduler_type} ({e})"]
    return []


def _output_problems(output_dir) -> list[str]:
    """--output_dir must be writable (it, or the nearest folder above it that exists): found now, not after the
    model has loaded."""
    if output_dir is not None and not str(output_dir).strip():
        return ["--output_dir is empty; give a folder (or leave the flag out for output/<model>)"]
    from tunesmith.files import unwritable

    why = unwritable(output_dir or "output", folder=True)
    return [f"--output_dir {output_dir}: {why}"] if why else []


def _earlier_run_problems(args) -> list[str]:
    """--add_version false writes into --output_dir itself: refused when the folder already holds another run's
    record (args.json, logging.jsonl) and this run does not continue one of its checkpoints, since the two runs'
    logs, curves and checkpoints would mix in one folder."""
    d = args.output_dir
    if args.add_version or not d or not str(d).strip():
        return []
    held = [f for f in ("args.json", "logging.jsonl") if os.path.isfile(os.path.join(d, f))]
    ckpt = args.resume_from_checkpoint
    if not held or (ckpt and os.path.abspath(os.path.dirname(os.path.normpath(ckpt))) == os.path.abspath(d)):
        return []
    return [f"--output_dir {d} already holds a run ({', '.join(held)}) and --add_version false writes into it: the "
            f"two runs' logs, curves and checkpoints would mix. Choose an empty folder, drop --add_version false (a "
            f"new v<N>-<time> folder is made inside), or continue that run with --resume_from_checkpoint "
            f"{os.path.join(d, 'checkpoint-N')}"]


def _tracker_problems(report_to) -> list[str]:
    """--report_to names only trackers tunesmith writes to (track.py), `all` or `none`."""
    import difflib

    from tunesmith.runs.track import ALL_TRACKERS

    known = (*ALL_TRACKERS, "all", "none")
    out = []
    for name in report_to or []:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            out.append(f"--report_to {name}: not a tracker tunesmith writes to" + (f"; did you mean {near[0]}?" if
                       near else "") + f" (one or more of {', '.join(known)})")
    return out


def _combination_notes(args) -> None:
    """Settings ms-swift accepts together although one makes the other moot: said, not refused."""
    kind = args.train_type
    if kind != "lora":  # LoRA's flags: only AdaLoRA reads some, the other tuners only the targets
        read = {"adalora": ("lora_alpha", "lora_dropout", "lora_bias", "target_modules"),
                "full": (), "llamapro": ()}.get(kind, ("target_modules",))
        fields = dataclasses.fields(TunerArgs)
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in fields if (f.name.startswith("lora_") or f.name == "target_modules") and f.name not in read}
        values = flag_values(args)
        given = [k for k, v in defaults.items() if values[k] != v]
        if given:
            flags, one = ", ".join("--" + k for k in given), len(given) == 1
            note(f"--train_type full trains every weight: {flags} {'has' if one else 'have'} no effect"
                 if kind == "full" else
                 f"--train_type {kind} does not read LoRA's {flags}: {'it has' if one else 'they have'} no effect")
    if args.packing and args.padding_free:
        note("--packing already trains without padding: --padding_free adds nothing")


def _vision_rate_problems(out: list, vit_lr, aligner_lr, optimizer, model) -> None:
    """--vit_lr and --aligner_lr, when given: positive finite rates like --learning_rate, for a vision-language
    model (a local --model folder whose config.json has no vision tower is told before anything loads)."""
    for name, value in (("vit_lr", vit_lr), ("aligner_lr", aligner_lr)):
        if value is not None:
            between(out, name, value, 0, None, lo_open=True, hint="ms-swift's examples use 1e-5")
    asked = [f for f, v in (("--vit_lr", vit_lr), ("--aligner_lr", aligner_lr),
                            ("--optimizer multimodal", optimizer == "multimodal" or None)) if v is not None]
    config = os.path.join(model or "", "config.json")
    if asked and model and os.path.isfile(config):
        import json

        try:
            with open(config, encoding="utf-8") as fh:
                text_only = "vision_config" not in json.load(fh)
        except (OSError, ValueError):
            return
        if text_only:
            out.append(f"{' / '.join(asked)}: --model {model} is a text model (no vision tower); these set a "
                       f"vision-language model's vision tower and aligner learning rates")


def problems(args) -> list[str]:
    """Every problem with the generic training flags (values out of range, required flags missing, combinations
    that cannot run), as one message each; [] when there is none. The method's own flags are checked by the
    method (`from_args`)."""
    out: list[str] = []
    if not args.model:
        base = _adapter_base(args.adapters)
        out.append("pass the model with --model (a local directory or a hub id)" +
                   (f"; the adapter {args.adapters[0]} was trained on {base}: add --model {base}" if base else ""))
    elif os.path.isfile(os.path.join(args.model, "adapter_config.json")) and \
            not os.path.isfile(os.path.join(args.model, "config.json")):
        out.append(f"--model {args.model} is a LoRA adapter checkpoint, not a model: pass the base model with "
                   f"--model and the adapter with --adapters to train on from it (or --resume_from_checkpoint to "
                   f"continue that run)")
    if not args.dataset:
        out.append("pass the training data with --dataset FILE [FILE ...]")
    empty_names(out, "dataset", args.dataset)
    empty_names(out, "val_dataset", args.val_dataset)
    if not args.streaming and not (isinstance(args, RLHFArguments) and args.rlhf_type == "grpo"):  # the encoded rows go to the cache
        from tunesmith.data.store import cache_problem

        out += [m for m in [cache_problem()] if m]
    if args.model and os.path.isdir(args.model):
        from tunesmith.models.load import model_dir_problem

        out += [m for m in [model_dir_problem(args.model)] if m]
    if args.learning_rate is not None:
        usual = "the usual value for full training is 1e-5" if args.train_type == "full" else \
            "the usual LoRA value is 1e-4"
        between(out, "learning_rate", args.learning_rate, 0, None, lo_open=True, hint=usual)
    _vision_rate_problems(out, args.vit_lr, args.aligner_lr, args.optimizer, args.model)
    if args.train_type in ("lora", "adalora"):
        between(out, "lora_alpha", args.lora_alpha, 0, None, lo_open=True, hint="usually 2-4x --lora_rank")
        between(out, "lora_dropout", args.lora_dropout, 0, 1, hi_open=True)
    if args.train_type == "lora":
        between(out, "lora_rank", args.lora_rank, 1, None, hint="8 or 16 are usual")
    out += tuner_problems(args)
    if args.max_steps <= 0 and args.streaming:
        out.append("--streaming needs --max_steps N: the number of rows in a stream is not known before it is read "
                   "(ms-swift requires it too)")
    elif args.max_steps <= 0:
        between(out, "num_train_epochs", args.num_train_epochs, 0, MAX_EPOCHS, lo_open=True,
                 hint="or give --max_steps N")
    if args.streaming and args.split_dataset_ratio > 0:
        out.append("--split_dataset_ratio cannot split a stream (--streaming); pass validation data with "
                   "--val_dataset, as ms-swift requires")
    if args.streaming:
        between(out, "shuffle_buffer_size", args.shuffle_buffer_size, 1, None)
    out += _range_problems(args)
    out += _more_value_problems(args)
    out += _scheduler_problems(args)
    if args.train_type == "full" and args.torch_dtype in ("float16",):
        out.append("full training in float16 has no loss scaling for fp16 weights; use --torch_dtype bfloat16 "
                   "(or float32)")
    if args.quant_method and args.train_type != "lora":
        out.append(f"--quant_method bnb trains LoRA adapters on a quantised base (QLoRA); --train_type "
                   f"{args.train_type} on a quantised base is not supported yet: use --train_type lora with it")
    from tunesmith.models.checkpoint import diverged_problem

    out += [m for m in (diverged_problem(a, "--adapters") for a in args.adapters or []) if m]
    if args.adapters and args.train_type in WHOLE_MODEL:
        out.append(f"--adapters starts from an adapter; with --train_type {args.train_type} pass the model (a full "
                   f"checkpoint too) with --model")
    elif args.adapters:
        from tunesmith.models.checkpoint import adapter_problem

        out += [m for m in (adapter_problem(a, "--adapters", args.train_type) for a in args.adapters) if m]
    if args.deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            out.append("--deepspeed needs DeepSpeed: pip install deepspeed (or pip install 'tunesmith[deepspeed]')")
    out += _fsdp_problems(args)
    out += knob_problems(args) + data_knob_problems(args)
    if args.resume_from_checkpoint:
        out += resume_problems(args)
    out += _tracker_problems(args.report_to)
    out += _output_problems(args.output_dir) + _earlier_run_problems(args)
    _combination_notes(args)
    return out


def _fsdp_problems(args) -> list[str]:
    """--fsdp/--fsdp_config: readable settings (distributed.fsdp_settings), not together with --deepspeed, QLoRA
    with a float storage dtype (FSDP shards tensors of one dtype), and — GRPO's vLLM and TR-DPO — what is not wired
    to sharded weights yet."""
    from tunesmith.train import distributed as D

    try:
        settings = D.fsdp_settings(args.fsdp, args.fsdp_config)
    except ConfigError as e:
        return [str(e)]
    if settings is None:
        if args.fsdp_config:
            note("--fsdp_config without --fsdp changes nothing (as in ms-swift); add --fsdp full_shard auto_wrap "
                 "to shard the model")
        return []
    out = []
    if args.deepspeed:
        out.append("--fsdp and --deepspeed both shard the model: choose one")
    if args.quant_bits == 4 and (args.bnb_4bit_quant_storage or "uint8") not in ("bfloat16", "float16", "float32"):
        out.append("--fsdp with 4-bit QLoRA: FSDP shards the packed 4-bit weights together with the others only "
                   "when they are stored in a float dtype; add --bnb_4bit_quant_storage "
                   f"{args.torch_dtype if args.torch_dtype in ('bfloat16', 'float16') else 'bfloat16'}")
    rlhf = args if isinstance(args, RLHFArguments) else None
    if rlhf and rlhf.sync_ref_model:
        out.append("--sync_ref_model with --fsdp is not supported yet (the policy's weights are sharded); use DDP "
                   "or --deepspeed zero2")
    if rlhf and rlhf.rlhf_type == "grpo":
        out.append("GRPO with --fsdp is not supported yet (each process samples its own prompts, and a sharded "
                   "model would need every process in each forward step); run GRPO on several processes without "
                   "--fsdp (DDP)")
    elif rlhf and rlhf.use_vllm:
        out.append("--use_vllm with --fsdp is not supported yet (the adapter handed to vLLM would be a shard); "
                   "drop --use_vllm (rollouts then run on the training model)")
    return out


def check(args, method_cls):
    """Every problem with the flags at once — the generic ones (`problems`) and the method's own — raised as one
    ConfigError before anything heavy is imported; returns the method object (`method_cls.from_args`)."""
    found = deferred_problems(args) + problems(args)
    if any(p.startswith("--rlhf_type") for p in deferred_problems(args)):
        raise_problems(found)  # the method's own checks would judge the flags by the wrong method
    method = method_cls.from_args(args, found)
    if args.streaming and not getattr(method, "streams", False):
        found.append(f"--streaming: {method.name} reads its rows up front (pairs are checked and measured before "
                     f"training, the reference is precomputed over them); stream with tunesmith sft, or drop "
                     f"--streaming")
    if isinstance(args, RLHFArguments) and args.sync_ref_model:
        _sync_ref_problems(args, method, found)
    if isinstance(args, RLHFArguments) and args.rlhf_type != "gkd":
        _teacher_flag_problems(args, found)
    if isinstance(args, RLHFArguments) and args.wandb_log_unique_prompts:
        _unique_prompts_note(args)
    adapter_off = getattr(method, "needs_reference", False) and args.train_type == "lora" and \
        not (args.adapters or args.ref_adapters)  # the reference is the model with the adapter switched off
    if adapter_off and str(args.init_weights).lower().startswith(MUTATING_INITS):
        found.append(f"--init_weights {args.init_weights} moves part of every targeted weight into the adapter, so the "
                     f"reference ({method.name}'s: the model with the adapter switched off) would be the base "
                     f"without that part, not the model training starts from; use --init_weights true here, or "
                     f"start from an SFT adapter (--adapters CKPT), which is then the reference")
    raise_problems(found)
    return method


def _sync_ref_problems(args, method, found: list) -> None:
    """--sync_ref_model (TR-DPO) needs a reference that is a separate model to mix the policy into: full
    training, a method with a reference, the reference not precomputed (as TRL's DPOTrainer requires)."""
    between(found, "ref_model_sync_steps", args.ref_model_sync_steps, 1, None)
    between(found, "ref_model_mixup_alpha", args.ref_model_mixup_alpha, 0, 1, lo_open=True)
    if not method.needs_reference:
        found.append(f"--sync_ref_model: {method.name} trains without a reference model here"
                     + (" (β = 0)" if method.name == "grpo" else "") + "; drop the flag")
    elif args.train_type != "full":
        found.append("--sync_ref_model with LoRA: the reference is the base model with the adapter switched off, "
                     "not a separate model to mix the policy into (TRL refuses this too); use --train_type full, or "
                     "drop the flag")
    if args.precompute_ref_log_probs:
        found.append("--sync_ref_model with --precompute_ref_log_probs: the reference moves during training, so "
                     "log-probs computed once would be stale; drop one of them")
    if _zero3(args.deepspeed):
        found.append("--sync_ref_model under DeepSpeed ZeRO-3 is not supported yet (the policy's weights are "
                     "partitioned); use zero2 or DDP")


def _unique_prompts_note(args) -> None:
    """--wandb_log_unique_prompts de-duplicates GRPO's and GKD's W&B completions table: said when there is none (as
    in ms-swift, it is accepted and changes nothing then)."""
    missing = [m for m, lacking in (
        (f"--rlhf_type grpo or gkd (not {args.rlhf_type})", args.rlhf_type not in ("grpo", "gkd")),
        ("--log_completions true", not args.log_completions),
        ("--report_to wandb", not {"wandb", "all"} & {n.lower() for n in args.report_to or []})) if lacking]
    if missing:
        note(f"--wandb_log_unique_prompts true de-duplicates the W&B completions table, which needs "
             f"{' and '.join(missing)}: it changes nothing here")


def _teacher_flag_problems(args, found: list) -> None:
    """GKD's flags given to another method: GRPO takes the teacher's (ms-swift's OPD-RL); for the others they change
    nothing (ms-swift ignores them there too, with a warning)."""
    given = [f"--{k}" for k, v in (("teacher_model", args.teacher_model), ("teacher_adapters", args.teacher_adapters),
                                   ("teacher_model_revision", args.teacher_model_revision),
                                   ("offload_teacher_model", args.offload_teacher_model),
                                   ("teacher_model_server", args.teacher_model_server),
                                   ("gkd_logits_topk", args.gkd_logits_topk), ("sft_alpha", args.sft_alpha),
                                   ("lmbda", args.lmbda != 0.5)) if v]
    if args.teacher_deepspeed and args.rlhf_type == "grpo":
        found.append("--teacher_deepspeed with --rlhf_type grpo is not supported yet (a sharded teacher needs every "
                     "process in each of its forward passes, which GRPO's rollouts do not keep in step); run "
                     "OPD-RL's teacher whole on each process, or behind --teacher_model_server")
    elif args.teacher_deepspeed:
        given.append("--teacher_deepspeed")
    if args.rlhf_type == "grpo":  # OPD-RL: GRPO takes the teacher flags (train/rl/grpo.py checks them)
        given = [g for g in given if g not in ("--teacher_model", "--teacher_adapters", "--teacher_model_revision",
                                               "--offload_teacher_model", "--teacher_model_server")]
    if given:
        note(f"{', '.join(given)}: GKD's flags (--rlhf_type gkd) change nothing for --rlhf_type {args.rlhf_type}")


def _fsdp_or_none(args):
    """The checked FSDP settings (`_fsdp_problems` reported any problem before), or None."""
    from tunesmith.train import distributed as D

    return D.fsdp_settings(args.fsdp, args.fsdp_config)


def _zero3(spec) -> bool:
    """Whether --deepspeed (a preset, a JSON file or string) asks for ZeRO stage 3."""
    import re

    if not spec:
        return False
    text = str(spec)
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            return False
    return text.replace("default-", "").startswith("zero3") or re.search(r'"stage"\s*:\s*3', text) is not None


def resolve(args, method, world_size: int, cuda: bool) -> TrainConfig:
    """The frozen TrainConfig for checked flags (`check`): the method's resolved flags and the defaults that
    depend on other flags, filled as ms-swift does (learning rate by train type, a total batch of 16, eval
    following save, output/<model>, the method's loss scale). `args` is not changed.

    world_size: processes in the run (for the default gradient accumulation). cuda: whether this process trains on
    a CUDA device (data-loader workers, Liger kernels)."""
    from tunesmith.models.checkpoint import model_suffix

    changes = dict(method.resolved_flags())
    if args.learning_rate is None:
        changes["learning_rate"] = 1e-5 if args.train_type == "full" else 1e-4
    if args.gradient_accumulation_steps is None:
        changes["gradient_accumulation_steps"] = max(1, math.ceil(16 / args.per_device_train_batch_size / world_size))
    if args.loss_scale is None:
        changes["loss_scale"] = method.default_loss_scale
    if args.eval_steps is None:
        changes["eval_steps"] = args.save_steps
    if args.metric_for_best_model is None:  # ms-swift's _init_metric_for_best_model: reward for GRPO, else loss
        changes["metric_for_best_model"] = getattr(method, "best_metric", "loss")
    if args.eval_strategy is None:
        has_validation = bool(args.val_dataset) or args.split_dataset_ratio > 0
        # ms-swift: no when there is no validation data, else following --save_strategy
        changes["eval_strategy"] = {"best": "steps"}.get(args.save_strategy, args.save_strategy) \
            if has_validation else "no"
    if args.output_dir is None:
        changes["output_dir"] = os.path.join("output", model_suffix(args.model))
    if args.dataloader_num_workers is None:
        changes["dataloader_num_workers"] = 1 if cuda else 0
    fsdp = _fsdp_or_none(args)
    if fsdp is not None and fsdp.activation_checkpointing and not args.gradient_checkpointing:
        # FSDP's activation_checkpointing is the same recomputation, per decoder layer, non-reentrant
        changes["gradient_checkpointing"] = True
    if args.use_liger_kernel and not cuda:
        note("--use_liger_kernel: Liger kernels run only on CUDA GPUs; skipped on this CPU run")
        changes["use_liger_kernel"] = False
    if args.attn_impl in ("flash_attn", "flash_attention_2", "flash_attention_3") and not cuda:
        # FlashAttention's kernels are CUDA-only; transformers would try to fetch a kernel from the hub instead
        note(f"--attn_impl {args.attn_impl}: FlashAttention runs only on CUDA GPUs; sdpa on this CPU run")
        changes["attn_impl"] = "sdpa"
    if args.streaming and args.load_from_cache_file:
        note("--load_from_cache_file: nothing is cached with --streaming (rows are encoded as they are read); "
             "--val_dataset, read whole, is cached as usual")
    if args.model_name or args.model_author:
        note("--model_name/--model_author only fill {{NAME}}/{{AUTHOR}} in swift/self-cognition data; "
             "your data has none, so they change nothing")
    resolved = dataclasses.replace(args, **changes)
    cfg = TrainConfig(resolved, take(DataConfig, resolved), take(ModelConfig, resolved), take(OptimConfig, resolved),
                      take(OutputConfig, resolved), take(DistConfig, resolved), world_size)
    return cfg

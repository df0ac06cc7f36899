"""What every training method does around the loop: resolve defaults (ms-swift's), load and encode the data, load
the model and adapter, open the run (`start_run`: directory, args.json, trackers) and close it (`finish_run`:
report, summary). Shared by sft and the preference methods; the loop itself is train/loop.py."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Optional

from tunesmith import __version__
from tunesmith.data.encode import ChatEncoder, encode_records
from tunesmith.data.load import LoadResult, load_datasets, split_train_val, write_jsonl
from tunesmith.errors import ConfigError, DataError
from tunesmith.log import note
from tunesmith.model import (attach_lora, count_parameters, load_model, load_tokenizer, resolve_model_dir,
                             unwrap_model)
from tunesmith.runs import is_adapter_dir, make_run_dir, model_suffix, save_args


def finalise_args(args, world_size: Optional[int] = None, default_loss_scale: str = "default") -> None:
    """Fill the defaults that depend on other flags, exactly as ms-swift does (ms-swift-compat.md §1d). Under torchrun
    this is where each process joins the process group."""
    import torch

    from tunesmith.train import distributed as D

    D.init_process_group()
    world_size = world_size or D.world_size()

    if not args.model:
        raise ConfigError("pass the model with --model (a local directory or a hub id)")
    if not args.dataset:
        raise ConfigError("pass the training data with --dataset FILE [FILE ...]")
    if args.learning_rate is None:
        args.learning_rate = 1e-5 if args.train_type == "full" else 1e-4
    if args.gradient_accumulation_steps is None:
        args.gradient_accumulation_steps = max(1, math.ceil(16 / args.per_device_train_batch_size / world_size))
    if args.loss_scale is None:
        args.loss_scale = default_loss_scale
    if args.eval_steps is None:
        args.eval_steps = args.save_steps
    if args.eval_strategy is None:
        args.eval_strategy = {"best": "steps"}.get(args.save_strategy, args.save_strategy)
    if args.output_dir is None:
        args.output_dir = os.path.join("output", model_suffix(args.model))
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 1 if torch.cuda.is_available() else 0
    if args.train_type == "full" and args.torch_dtype in ("float16",):
        raise ConfigError("full training in float16 has no loss scaling for fp16 weights; use --torch_dtype "
                          "bfloat16 (or float32)")
    if args.quant_method and args.train_type == "full":
        raise ConfigError("--quant_method bnb trains LoRA adapters on a quantised base (QLoRA); "
                          "use --train_type lora with it")
    if args.use_liger_kernel and not torch.cuda.is_available():
        note("--use_liger_kernel: Liger kernels run only on CUDA GPUs; skipped on this CPU run")
        args.use_liger_kernel = False
    if args.resume_from_checkpoint and not os.path.isdir(args.resume_from_checkpoint):
        raise ConfigError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint directory")
    if args.model_name or args.model_author:
        note("--model_name/--model_author only fill {{NAME}}/{{AUTHOR}} in swift/self-cognition data; "
             "your data has none, so they change nothing")


@dataclass
class Prepared:
    model_dir: str
    tokenizer: Any
    encoder: ChatEncoder
    train_rows: list
    eval_rows: list
    val_records: Optional[LoadResult]
    data_stats: dict


def _report_drops(what: str, loaded: LoadResult, stats: dict, max_length) -> None:
    if loaded.dropped:
        note(f"{what}: {loaded.dropped} bad row(s) dropped (--strict false); first reasons:\n  "
             + "\n  ".join(loaded.reasons))
    if stats["too_long"]:
        note(f"{what}: {stats['too_long']} row(s) longer than --max_length {max_length} dropped "
             f"(--truncation_strategy delete)")
    if stats["nothing_to_train"]:
        note(f"{what}: {stats['nothing_to_train']} row(s) with no trained tokens dropped (the prompt fills "
             f"--max_length {max_length} after truncation, or --loss_scale / per-message loss trains nothing)")
    if stats["bad"]:
        note(f"{what}: {stats['bad']} row(s) failed to encode and were dropped; first reasons:\n  "
             + "\n  ".join(stats["reasons"]))


def _unpair(loaded: LoadResult) -> LoadResult:
    """KTO learns from single replies labelled desirable or not: a labelled row stays, a preference pair becomes
    its chosen reply (desirable) and its rejected reply (undesirable). Rows with neither are an error."""
    records, sources = [], []
    for rec, src in zip(loaded.records, loaded.sources):
        if "label" in rec:
            records.append({k: v for k, v in rec.items() if k != "rejected_messages"})
            sources.append(src)
        elif "rejected_messages" in rec:
            records += [{"messages": rec["messages"], "label": True, "tools": rec.get("tools")},
                        {"messages": rec["rejected_messages"], "label": False, "tools": rec.get("tools")}]
            sources += [src, src]
        else:
            raise DataError(src[0], src[1], "label", "is missing: KTO needs each reply labelled desirable or not.",
                            'add "label": true or false (or give chosen/rejected pairs).')
    return LoadResult(records=records, sources=sources, dropped=loaded.dropped, reasons=loaded.reasons)


def prepare_data(args, kind: str = "sft", default_loss_scale: str = "default") -> Prepared:
    model_dir = resolve_model_dir(args.model, args.use_hf, args.model_revision, args.hub_token)
    tok = load_tokenizer(args, model_dir)
    max_length = args.max_length
    if max_length is None:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        max_length = getattr(cfg, "max_position_embeddings", None)
    encoder = ChatEncoder(tok, loss_scale=args.loss_scale, default_loss_scale=default_loss_scale,
                          max_length=max_length, truncation_strategy=args.truncation_strategy,
                          system=args.system,  # the text: parse_args read a --system file
                          use_chat_template=args.use_chat_template)
    common = dict(strict=args.strict, columns=args.columns, seed=args.data_seed, use_hf=args.use_hf,
                  hub_token=args.hub_token)
    train = load_datasets(args.dataset, **common)
    val: Optional[LoadResult] = None
    if args.val_dataset:
        val = load_datasets(args.val_dataset, what="--val_dataset", **common)
    elif args.split_dataset_ratio > 0:
        dropped, reasons = train.dropped, train.reasons
        train, val = split_train_val(train, args.split_dataset_ratio, args.data_seed)
        train.dropped, train.reasons = dropped, reasons
    if kind == "preference":
        bad = [src for rec, src in zip(train.records, train.sources) if "rejected_messages" not in rec]
        if bad:
            raise DataError(bad[0][0], bad[0][1], "rejected_response",
                            "is missing: preference training needs a rejected reply for every row.",
                            "add rejected_response (or use prompt/chosen/rejected).")
    if kind == "kto":
        train = _unpair(train)
        val = _unpair(val) if val is not None else None
    if args.load_from_cache_file:
        note("--load_from_cache_file: tunesmith encodes the data afresh on every run (no map cache is read)")
    num_proc = max(1, args.dataset_num_proc)
    train_rows, tstats = encode_records(encoder, train.records, train.sources, kind=kind, strict=args.strict,
                                        num_proc=num_proc)
    _report_drops("--dataset", train, tstats, max_length)
    if not train_rows:
        raise DataError(" ".join(args.dataset), None, "", "no rows left to train on after encoding "
                        f"({tstats['too_long']} too long, {tstats['nothing_to_train']} with nothing to train).",
                        "raise --max_length, use --truncation_strategy left/right, or check --loss_scale.")
    eval_rows = []
    if val is not None:
        eval_rows, vstats = encode_records(encoder, val.records, val.sources, kind=kind, strict=args.strict,
                                           num_proc=num_proc)
        _report_drops("validation data", val, vstats, max_length)
    if not eval_rows and args.eval_strategy != "no":
        args.eval_strategy = "no"  # ms-swift: forced to no when there is no validation data
    stats = {"train_rows": len(train_rows), "val_rows": len(eval_rows), "dropped_bad": train.dropped,
             "dropped_too_long": tstats["too_long"], "dropped_nothing_to_train": tstats["nothing_to_train"],
             "max_length": max_length}
    return Prepared(model_dir, tok, encoder, train_rows, eval_rows, val, stats)


def prepare_model(args, model_dir: str, tokenizer):
    if args.adapters and args.train_type == "full":
        raise ConfigError("--adapters starts from a LoRA adapter; with --train_type full pass the model with --model")
    for a in args.adapters:
        if not is_adapter_dir(a):
            raise ConfigError(f"--adapters {a}: not an adapter directory (no adapter_config.json); a full "
                              f"checkpoint is passed with --model")
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's random init (and anything else drawn here) is the same for the same --seed
    model = load_model(args, model_dir, tokenizer, for_training=True)
    if args.train_type == "lora":
        model = attach_lora(model, args)
    if args.gradient_checkpointing:
        # transformers 5.x renamed the method and its kwargs; keep working on 4.x too
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if args.use_liger_kernel:
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            note("--use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); skipped")
        else:
            base = unwrap_model(model)
            _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    info = count_parameters(model)
    if info["trainable"] == 0:
        raise ConfigError("the model has no trainable parameters (check --target_modules / --target_regex)")
    note(f"parameters: {info['trainable']:,} trainable of {info['total']:,} ({info['trainable_percent']}%)")
    return model, info


def batching(args, train_rows: list, eval_rows: list, padded, flat, packed, length, max_length):
    """(training units, validation units, collate) for --packing, --padding_free or plain padding.

    --packing groups rows to fill --packing_length (default --max_length); a batch is
    --per_device_train_batch_size such packed rows. --padding_free concatenates each batch into one sequence.
    Every mode trains on exactly the same tokens with the same loss normalisation; only the padding (and its
    compute) differs."""
    from tunesmith.data.collate import pack_groups

    if args.packing:
        capacity = args.packing_length or max_length
        if not capacity:
            raise ConfigError("--packing needs --max_length (or --packing_length): the size of a packed sequence")
        units = []
        for rows in (train_rows, eval_rows):
            groups = pack_groups([length(r) for r in rows], capacity)
            units.append([[rows[i] for i in g] for g in groups])
        total = sum(length(r) for r in train_rows)
        note(f"--packing: {len(train_rows)} rows -> {len(units[0])} sequences of up to {capacity} tokens "
             f"({100 * total / max(len(units[0]) * capacity, 1):.0f}% filled)")
        return units[0], units[1], packed
    if args.padding_free:
        return train_rows, eval_rows, flat
    return train_rows, eval_rows, padded


def make_run(args, prepared: Prepared, param_info: dict) -> tuple[str, dict]:
    """The run directory (made by rank 0; its name, with rank 0's clock, is shared with every rank)."""
    from tunesmith.train import distributed as D

    run_dir = D.broadcast(make_run_dir(args.output_dir, args.add_version) if D.is_main() else None)
    import torch
    import transformers

    extra = {"tunesmith_version": __version__, "model_dir": prepared.model_dir, "output_run_dir": run_dir,
             "data_stats": prepared.data_stats, "model_parameter_info": param_info,
             "library_versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__}}
    if D.is_main():
        save_args(run_dir, args, extra)
        if prepared.val_records is not None and not args.val_dataset:
            write_jsonl(os.path.join(run_dir, "val_dataset.jsonl"), prepared.val_records.records)
    return run_dir, extra


def say(text: str) -> None:
    """A progress line on stdout, as given (no prefix added), from rank 0 only."""
    note(text, file=sys.stdout, prefix="")


def make_trackers(run_dir: str, args, prepared: Prepared):
    """logging.jsonl and the --report_to trackers, on rank 0 only (other ranks get a disabled fan-out)."""
    from tunesmith.args import to_record
    from tunesmith.track import Trackers
    from tunesmith.train import distributed as D

    return Trackers(run_dir, args.report_to, {**to_record(args), **prepared.data_stats}, args, enabled=D.is_main())


def save_model_fn(tokenizer):
    from transformers.utils import logging as hf_logging

    def save(model, path: str, state_dict=None) -> None:
        """state_dict: the full weights gathered from every rank (DeepSpeed ZeRO-3 partitions them)."""
        hf_logging.disable_progress_bar()  # our own progress bar is running; theirs would interleave with it
        kw = {"safe_serialization": True} if state_dict is None else {"safe_serialization": True,
                                                                       "state_dict": state_dict}
        if len(getattr(model, "peft_config", {})) > 1:
            # a frozen reference adapter ("ref") rides along in preference training; only the trained one is saved
            model.save_pretrained(path, selected_adapters=["default"], **kw)
        else:
            model.save_pretrained(path, **kw)
        tokenizer.save_pretrained(path)
    return save


@dataclass
class RunOutputs:
    """Where a run writes: its directory, the extra args.json fields, and the opened trackers."""
    run_dir: str
    args_extra: dict
    trackers: Any


@contextlib.contextmanager
def start_run(args, prepared: Prepared, param_info: dict, header):
    """The run directory (args.json), the trackers, and the header line (`header(run_dir)`); the trackers are
    closed when the block ends, however it ends."""
    run_dir, extra = make_run(args, prepared, param_info)
    trackers = make_trackers(run_dir, args, prepared)
    say(header(run_dir))
    try:
        yield RunOutputs(run_dir, extra, trackers)
    finally:
        trackers.close()


def finish_run(state, run_dir: str, metric_for_best_model: Optional[str] = None) -> None:
    """Plots and report.html for the run, then the summary on stderr (rank 0 only). A plotting failure never fails
    a finished run.

    The best checkpoint is labelled with the metric that chose it, named as the loop logs it (eval_ prefixed):
    metric_for_best_model, or when not given, --metric_for_best_model from the run's args.json (default loss)."""
    from tunesmith.report import write_run_report
    from tunesmith.train import distributed as D

    if not D.is_main():
        return
    metric = metric_for_best_model
    if not metric:  # the callers pass the run directory only; make_run wrote the arguments into its args.json
        try:
            with open(os.path.join(run_dir, "args.json"), encoding="utf-8") as fh:
                metric = json.load(fh).get("metric_for_best_model")
        except (OSError, ValueError, AttributeError):  # no or unreadable args.json: the default below
            metric = None
    metric = metric or "loss"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"  # as the loop names it

    try:
        report = write_run_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the weights are saved; the report can be rebuilt with `tunesmith report`
        report = f"not written ({type(e).__name__}: {e}); rebuild with: tunesmith report {run_dir}"
    lines = [f"done: {state.global_step} steps",
             f"  run directory:    {run_dir}",
             f"  last checkpoint:  {state.last_model_checkpoint}",
             f"  best checkpoint:  {state.best_model_checkpoint}"
             + (f" ({metric} {state.best_metric:.4f})" if state.best_metric is not None else ""),
             f"  log:              {os.path.join(run_dir, 'logging.jsonl')}",
             f"  report:           {report}"]
    print("\n".join(lines), file=sys.stderr)

"""What every training method does around the loop, each step taking its slice of the resolved config
(train/config.py): load and encode the data (`prepare_data`), load the model and attach LoRA (`prepare_model`),
cut rows into batches (`batching`), open the run (`start_run`: directory, args.json, trackers) and close it
(`finish_run`: report, summary). Nothing method-specific lives here (that is each method's file), and nothing here
changes the configuration; the loop itself is train/loop.py."""
from __future__ import annotations

import contextlib
import json
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
from tunesmith.runs import is_adapter_dir, make_run_dir, save_args


@dataclass(frozen=True)
class Batches:
    """What a method trains on: its training and validation units (rows, pairs, packed groups) and the collator
    that turns a list of units into a batch; `reference` is the reference to train against (it may have become a
    cache of precomputed log-probs), None for methods without one."""
    train: list
    eval: list
    collate: Any
    reference: Any = None


@dataclass
class Prepared:
    """The encoded data and what it was encoded with. train_rows/eval_rows hold what the method's `rows` kind
    encodes to: Encoded rows (sft), (chosen, rejected) pairs (preference), (Encoded, desirable) (kto)."""
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


def prepare_data(data, model, method) -> Prepared:
    """Load the tokenizer (model slice) and the data (data slice: --dataset, --val_dataset or a split), shape the
    records for the method (`method.shape_records`: pairs checked, KTO's pairs split) and encode every row with the
    chat template as `method.rows` says ("sft" | "preference" | "kto"). max_length defaults to the model's
    max_position_embeddings (tokens). Raises DataError for bad rows (--strict true), rows the method cannot use,
    or nothing left to train on."""
    model_dir = resolve_model_dir(model.model, model.use_hf, model.model_revision, model.hub_token)
    tok = load_tokenizer(model, model_dir)
    max_length = data.max_length
    if max_length is None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code)
        max_length = getattr(config, "max_position_embeddings", None)
    kind = method.rows
    encoder = ChatEncoder(tok, loss_scale=data.loss_scale, default_loss_scale=method.default_loss_scale,
                          max_length=max_length, truncation_strategy=data.truncation_strategy,
                          system=data.system,  # the text: parse_args read a --system file
                          use_chat_template=data.use_chat_template)
    common = dict(strict=data.strict, columns=data.columns, seed=data.data_seed, use_hf=model.use_hf,
                  hub_token=model.hub_token)
    train = load_datasets(data.dataset, **common)
    val: Optional[LoadResult] = None
    if data.val_dataset:
        val = load_datasets(data.val_dataset, what="--val_dataset", **common)
    elif data.split_dataset_ratio > 0:
        dropped, reasons = train.dropped, train.reasons
        train, val = split_train_val(train, data.split_dataset_ratio, data.data_seed)
        train.dropped, train.reasons = dropped, reasons
    train = method.shape_records(train)
    val = method.shape_records(val) if val is not None else None
    if data.load_from_cache_file:
        note("--load_from_cache_file: tunesmith encodes the data afresh on every run (no map cache is read)")
    num_proc = max(1, data.dataset_num_proc)
    train_rows, tstats = encode_records(encoder, train.records, train.sources, kind=kind, strict=data.strict,
                                        num_proc=num_proc)
    _report_drops("--dataset", train, tstats, max_length)
    if not train_rows:
        raise DataError(" ".join(data.dataset), None, "", "no rows left to train on after encoding "
                        f"({tstats['too_long']} too long, {tstats['nothing_to_train']} with nothing to train).",
                        "raise --max_length, use --truncation_strategy left/right, or check --loss_scale.")
    eval_rows = []
    if val is not None:
        eval_rows, vstats = encode_records(encoder, val.records, val.sources, kind=kind, strict=data.strict,
                                           num_proc=num_proc)
        _report_drops("validation data", val, vstats, max_length)
    stats = {"train_rows": len(train_rows), "val_rows": len(eval_rows), "dropped_bad": train.dropped,
             "dropped_too_long": tstats["too_long"], "dropped_nothing_to_train": tstats["nothing_to_train"],
             "max_length": max_length}
    return Prepared(model_dir, tok, encoder, train_rows, eval_rows, val, stats)


def prepare_model(model_cfg, model_dir: str, tokenizer, seed: int):
    """The model to train (model slice): loaded, LoRA attached (--train_type lora) with the seeded init,
    gradient checkpointing and Liger kernels as asked. Returns (model, parameter counts). Raises ConfigError for an
    --adapters path that is not an adapter, or a model with nothing to train."""
    for a in model_cfg.adapters:
        if not is_adapter_dir(a):
            raise ConfigError(f"--adapters {a}: not an adapter directory (no adapter_config.json); a full "
                              f"checkpoint is passed with --model")
    from transformers import set_seed

    set_seed(seed)  # LoRA's random init (and anything else drawn here) is the same for the same --seed
    model = load_model(model_cfg, model_dir, tokenizer, for_training=True)
    if model_cfg.train_type == "lora":
        model = attach_lora(model, model_cfg)
    if model_cfg.gradient_checkpointing:
        # transformers 5.x renamed the method and its kwargs; keep working on 4.x too
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if model_cfg.use_liger_kernel:
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


def batching(data, train_rows: list, eval_rows: list, padded, flat, packed, length, max_length):
    """(training units, validation units, collate) for --packing, --padding_free or plain padding.

    --packing groups rows to fill --packing_length (default --max_length); a batch is
    --per_device_train_batch_size such packed rows. --padding_free concatenates each batch into one sequence.
    Every mode trains on exactly the same tokens with the same loss normalisation; only the padding (and its
    compute) differs."""
    from tunesmith.data.collate import pack_groups

    if data.packing:
        capacity = data.packing_length or max_length
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
    if data.padding_free:
        return train_rows, eval_rows, flat
    return train_rows, eval_rows, padded


def make_run(cfg, prepared: Prepared, param_info: dict) -> tuple[str, dict]:
    """The run directory (made by rank 0; its name, with rank 0's clock, is shared with every rank), its args.json
    (cfg.args, secrets redacted, plus the record-only fields returned) and, for a split, val_dataset.jsonl."""
    from tunesmith.train import distributed as D

    run_dir = D.broadcast(make_run_dir(cfg.output.output_dir, cfg.output.add_version) if D.is_main() else None)
    import torch
    import transformers

    extra = {"tunesmith_version": __version__, "model_dir": prepared.model_dir, "output_run_dir": run_dir,
             "data_stats": prepared.data_stats, "model_parameter_info": param_info,
             "library_versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__}}
    if D.is_main():
        save_args(run_dir, cfg.args, extra)
        if prepared.val_records is not None and not cfg.data.val_dataset:
            write_jsonl(os.path.join(run_dir, "val_dataset.jsonl"), prepared.val_records.records)
    return run_dir, extra


def say(text: str) -> None:
    """A progress line on stdout, as given (no prefix added), from rank 0 only."""
    note(text, file=sys.stdout, prefix="")


def make_trackers(run_dir: str, cfg, prepared: Prepared):
    """logging.jsonl and the --report_to trackers (output slice), on rank 0 only (other ranks get a disabled
    fan-out); the trackers' config is args.json's record plus the data statistics."""
    from tunesmith.args import to_record
    from tunesmith.track import Trackers
    from tunesmith.train import distributed as D

    return Trackers(run_dir, cfg.output.report_to, {**to_record(cfg.args), **prepared.data_stats}, cfg.output,
                    enabled=D.is_main())


def save_model_fn(tokenizer):
    """save(model, path, state_dict=None): the trained weights (adapter only for LoRA) and the tokenizer, as
    safetensors, into `path` (a checkpoint's temporary folder)."""
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
def start_run(cfg, prepared: Prepared, param_info: dict, header):
    """The run directory (args.json), the trackers, and the header line (`header(run_dir)`); the trackers are
    closed when the block ends, however it ends."""
    run_dir, extra = make_run(cfg, prepared, param_info)
    trackers = make_trackers(run_dir, cfg, prepared)
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

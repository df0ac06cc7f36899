"""What every training method does around the loop, each step taking its slice of the resolved config
(train/config.py): load the tokenizer and prepare the data (`prepare_data`: the loading, encoding and cache are
data/prepare.py's), check the disk (`check_disk`), load the model and attach LoRA (`prepare_model`), cut rows into
batches (`batching`), open the run (`start_run`: directory, args.json, trackers) and close it (`finish_run`: report,
summary). Nothing method-specific lives here (that is each method's file), and nothing here changes the
configuration; the loop itself is train/loop.py."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional

from tunesmith import __version__
from tunesmith.data.load import write_jsonl
from tunesmith.data.prepare import MethodRows, Prepared, prepare_rows
from tunesmith.errors import ConfigError, DataError, FlagError
from tunesmith.log import note
from tunesmith.models.load import (attach_lora, count_parameters, load_model, load_tokenizer, resolve_model_dir, unwrap_model)
from tunesmith.models.checkpoint import is_adapter_dir
from tunesmith.runs.run_dir import make_run_dir, save_args


@dataclass(frozen=True)
class Batches:
    """What a method trains on: its training and validation units (rows, pairs, packed groups) and the collator
    that turns a list of units into a batch; `reference` is the reference to train against (it may have become a
    cache of precomputed log-probs), None for methods without one."""
    train: list
    eval: list
    collate: Any
    reference: Any = None
    on_run_dir: Any = None  # called with (run directory, trackers) once they exist (the completions log)
    hooks: tuple = ()       # training state the checkpoints carry (loop.Objective.hooks): GRPO's round in progress


def prepare_data(data, model, method) -> Prepared:
    """Load the tokenizer (model slice) and the data (data slice: --dataset, --val_dataset or a split), shape the
    records for the method (`method.shape_records`: pairs checked, KTO's pairs split) and encode every row with the
    chat template as `method.rows` says ("sft" | "preference" | "kto"): data.prepare.prepare_rows. max_length
    defaults to the model's max_position_embeddings (tokens). With --streaming the training rows are read and
    encoded on the fly instead; only --val_dataset is encoded here. Raises DataError for bad rows (--strict true),
    rows the method cannot use, or nothing left to train on."""
    from tunesmith.train import distributed as D

    model_dir = resolve_model_dir(model.model, model.use_hf, model.model_revision, model.hub_token)
    tok = load_tokenizer(model, model_dir)
    from transformers import AutoConfig
    from tunesmith.models.vision import check_supported, image_tokens, is_vision_language, text_config

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code)
    check_supported(config, model.model)
    max_length = data.max_length
    if max_length is None:
        max_length = getattr(text_config(config), "max_position_embeddings", None)
    images = image_tokens(model_dir, config, tok, model.max_pixels) if is_vision_language(config) else None
    if images is not None:
        note(f"images: {images.limits['min_pixels']:,} to {images.limits['max_pixels']:,} pixels each "
             f"(--max_pixels / MAX_PIXELS), counted in --max_length")
    extra = method.rows_key if hasattr(method, "rows_key") else ""  # GKD's teacher routing column, if any
    rows = MethodRows(method.name, method.rows, method.default_loss_scale, method.shape_records,
                      type(method).__name__ + (f":{extra}" if extra else ""), keep_columns=bool(extra))
    return prepare_rows(data, model, rows, model_dir, tok, max_length, broadcast=D.broadcast, images=images)


def prepare_model(model_cfg, model_dir: str, tokenizer, seed: int, head: str = "causal_lm", train_rows=None):
    """The model to train (model slice): loaded with the method's head ("causal_lm", or "seq_cls" for a reward
    model), its tuner attached with the seeded init (`attach`; train_rows: the encoded training rows, which
    --init_weights lora-ga estimates its start from), gradient checkpointing, Liger kernels and the training knobs
    (`apply_knobs`) as asked. Returns (model, parameter counts). Raises ConfigError for an --adapters path that is
    not an adapter, or a model with nothing to train."""
    for a in model_cfg.adapters:
        if not is_adapter_dir(a):
            raise ConfigError(f"--adapters {a}: not an adapter directory (no adapter_config.json); a full "
                              f"checkpoint is passed with --model")
    from transformers import set_seed

    set_seed(seed)  # LoRA's random init (and anything else drawn here) is the same for the same --seed
    model = load_model(model_cfg, model_dir, tokenizer, for_training=True, head=head)
    model = attach(model, model_cfg, train_rows, tokenizer.pad_token_id)
    if model_cfg.gradient_checkpointing:
        # transformers 5.x renamed the method and its kwargs; keep working on 4.x too
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        _vision_checkpointing(model, model_cfg)
    if model_cfg.use_liger_kernel:
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            note("--use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); skipped")
        else:
            base = unwrap_model(model)
            _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    apply_knobs(model, model_cfg)  # freezing, NEFTune, --torch_compile
    info = count_parameters(model)
    if info["trainable"] == 0:
        raise ConfigError("the model has no trainable parameters (check --target_modules / --target_regex, or with "
                          "--train_type full the --freeze_parameters* / --trainable_parameters* flags)")
    note(f"parameters: {info['trainable']:,} trainable of {info['total']:,} ({info['trainable_percent']}%)")
    return model, info


def _vision_checkpointing(model, model_cfg) -> None:
    """--vit_gradient_checkpointing false with --gradient_checkpointing: the vision tower runs without it (ms-swift's
    default follows --gradient_checkpointing)."""
    if model_cfg.vit_gradient_checkpointing is False:
        visual = getattr(getattr(unwrap_model(model), "model", None), "visual", None)
        for m in (visual.modules() if visual is not None else ()):
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False


def apply_knobs(model, knobs) -> None:
    """ms-swift's training knobs on the model (model slice), in place: a vision-language model's frozen parts
    (--freeze_vit/--freeze_aligner/--freeze_llm, full training; LoRA's are its targets), partial full fine-tuning
    (--freeze_parameters ..., knobs/freeze.py), NEFTune's embedding noise (knobs/neftune.py) and compiled decoder
    layers (--torch_compile, knobs/compile.py)."""
    from tunesmith.models.vision import PARTS, freeze_parts, trained_parts

    kind = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if knobs.train_type == "full" and kind in PARTS:
        trained = trained_parts(knobs.freeze_vit, knobs.freeze_aligner, knobs.freeze_llm)
        frozen = freeze_parts(model, PARTS[kind], trained)
        note(f"vision-language model: training the {', '.join(sorted(trained))} ({frozen} tensors of the other parts "
             f"frozen; --freeze_vit/--freeze_aligner/--freeze_llm)")
    if knobs.train_type == "full" and (knobs.freeze_parameters or knobs.freeze_parameters_regex or
                                       knobs.freeze_parameters_ratio > 0 or knobs.trainable_parameters or
                                       knobs.trainable_parameters_regex):
        from tunesmith.train.knobs.freeze import apply_freezing

        apply_freezing(model, knobs)
    if knobs.neftune_noise_alpha:
        from tunesmith.train.knobs.neftune import add_neftune

        add_neftune(model, knobs.neftune_noise_alpha)
    if knobs.torch_compile:
        from tunesmith.train.knobs.compile import compile_layers

        compile_layers(model, knobs.torch_compile_backend, knobs.torch_compile_mode)


def attach(model, model_cfg, train_rows=None, pad_id: int = 0):
    """--train_type on the loaded model: LoRA (models.load.attach_lora; with --init_weights lora-ga, from the
    gradients of the first train_rows, padded with pad_id), a peft tuner (models.tuners.attach_tuner: adalora,
    vera, boft, fourierft, bone), LLaMA-Pro's new blocks, the only weights trained (models.tuners.expand_blocks; a
    reward model's new score head trains too), or nothing for full training."""
    from tunesmith.models.tuners import PEFT_CONFIGS, attach_tuner, expand_blocks, lora_ga_rows, lora_ga_step

    kind = model_cfg.train_type
    if kind == "lora":
        lora_ga = str(model_cfg.init_weights).lower() in ("lora-ga", "lora_ga") and not model_cfg.adapters
        step = lora_ga_step(model, lora_ga_rows(train_rows, model_cfg), model_cfg, pad_id) if lora_ga else None
        return attach_lora(model, model_cfg, step)
    if kind in PEFT_CONFIGS:
        return attach_tuner(model, model_cfg)
    if kind == "llamapro":
        added = expand_blocks(model, model_cfg.llamapro_num_new_blocks, model_cfg.llamapro_num_groups)
        note(f"--train_type llamapro: {len(added)} new decoder blocks at layers {', '.join(map(str, added))}, "
             f"the only ones trained ({model.config.num_hidden_layers} layers now)")
        if hasattr(model, "score"):  # a reward model's score head is new: it trains with the blocks
            model.score.requires_grad_(True)
    return model


def batching(data, train_rows, eval_rows, padded, flat, packed, length, max_length):
    """(training units, validation units, collate) for --packing, --padding_free or plain padding.

    --packing groups rows to fill --packing_length (default --max_length); a batch is
    --per_device_train_batch_size such packed rows (read lazily: `Grouped`). --padding_free concatenates each batch
    into one sequence. Every mode trains on exactly the same tokens with the same loss normalisation; only the
    padding (and its compute) differs. length(row) -> tokens; None: the rows give theirs (`rows.lengths()`).
    --streaming training rows (a StreamingRows) are packed as they are read, PACK_BUFFER_ROWS rows at a time.
    Raises ConfigError for --packing without a length."""
    from tunesmith.data.collate import Grouped, pack_groups

    if data.packing:
        capacity = data.packing_length or max_length
        if not capacity:
            raise ConfigError("--packing needs --max_length (or --packing_length): the size of a packed sequence")
        if data.streaming:  # packed PACK_BUFFER_ROWS rows at a time as they are read
            from tunesmith.data.stream import PACK_BUFFER_ROWS

            note(f"--packing --streaming: every {PACK_BUFFER_ROWS} rows read are packed into sequences of up to "
                 f"{capacity} tokens")
            eval_units = Grouped(eval_rows, pack_groups(length_of(eval_rows, length), capacity))
            return train_rows.packed(capacity, length or _tokens), eval_units, packed
        units, total = [], 0
        for rows in (train_rows, eval_rows):
            lengths = length_of(rows, length)
            total = total or sum(lengths)
            units.append(Grouped(rows, pack_groups(lengths, capacity)))
        note(f"--packing: {len(train_rows)} rows -> {len(units[0])} sequences of up to {capacity} tokens "
             f"({100 * total / max(len(units[0]) * capacity, 1):.0f}% filled)")
        return units[0], units[1], packed
    if data.padding_free:
        return train_rows, eval_rows, flat
    return train_rows, eval_rows, padded


def length_of(rows, length) -> list[int]:
    """Tokens per row of a sized sequence of rows: length(row) each, or the rows' own `lengths()`."""
    return [length(r) for r in rows] if length else (rows.lengths() if len(rows) else [])


def _tokens(row) -> int:
    """An Encoded row's tokens (a streamed row's length for packing)."""
    return len(row.input_ids)


def make_run(cfg, prepared: Prepared, param_info: dict) -> tuple[str, dict]:
    """The run directory (made by rank 0; its name, with rank 0's clock, is shared with every rank), its args.json
    (cfg.args, secrets redacted, plus the record-only fields returned) and, for a split, val_dataset.jsonl."""
    from tunesmith.train import distributed as D

    if D.is_main():  # unfinished saves of runs killed mid-checkpoint: removed, and said
        from tunesmith.runs.run_dir import remove_leftovers

        ckpt = cfg.output.resume_from_checkpoint
        gone = remove_leftovers([cfg.output.output_dir] + ([os.path.dirname(os.path.abspath(ckpt))] if ckpt else []))
        if gone:
            note(f"removed {len(gone)} unfinished checkpoint save(s) left by stopped runs: "
                 + ", ".join(os.path.relpath(g) for g in gone[:3]) + (" …" if len(gone) > 3 else ""))
    run_dir = D.broadcast(make_run_dir(cfg.output.output_dir, cfg.output.add_version) if D.is_main() else None)
    import torch
    import transformers

    extra = {"tunesmith_version": __version__, "model_dir": prepared.model_dir, "output_run_dir": run_dir,
             "data_stats": prepared.data_stats, "model_parameter_info": param_info, "world_size": D.world_size(),
             "library_versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__}}
    if prepared.encoder.images is not None:  # the budget as applied (--max_pixels, or MAX_PIXELS & co.)
        extra["image_pixels"] = dict(prepared.encoder.images.limits)
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
    fan-out); the trackers' config is args.json's record plus the data statistics; --wandb_log_unique_prompts
    de-duplicates W&B's completions table."""
    from tunesmith.config.parser import to_record
    from tunesmith.runs.track import Trackers
    from tunesmith.train import distributed as D

    return Trackers(run_dir, cfg.output.report_to, {**to_record(cfg.args), **prepared.data_stats}, cfg.output,
                    enabled=D.is_main(), unique_prompts=cfg.output.wandb_log_unique_prompts)


def save_model_fn(tokenizer, initial=None, model_dir: Optional[str] = None):
    """save(model, path, state_dict=None): the trained weights (the adapter as peft writes it for a peft tuner, the
    whole model for full training and LLaMA-Pro) and the tokenizer, as safetensors, into `path` (a checkpoint's
    temporary folder). initial: models.tuners.initial_adapter's folder (PiSSA, OLoRA, LoRA-GA), which the adapter is
    converted against; where peft's adapter is not the training form (that converted one, AdaLoRA's trimmed one),
    the training weights are saved beside it for an exact resume (models.tuners.TRAINING_WEIGHTS). model_dir: the
    base model's folder, whose image-processor files a vision-language checkpoint carries too (infer, export)."""
    from transformers.utils import logging as hf_logging

    from tunesmith.models.tuners import needs_training_weights, save_adapter, save_training_weights

    def save(model, path: str, state_dict=None) -> None:
        """state_dict: the full weights gathered from every rank (DeepSpeed ZeRO-3 partitions them)."""
        hf_logging.disable_progress_bar()  # our own progress bar is running; theirs would interleave with it
        kw = {"safe_serialization": True} if state_dict is None else {"safe_serialization": True,
                                                                       "state_dict": state_dict}
        if not hasattr(model, "peft_config"):
            model.save_pretrained(path, **kw)
        else:
            # a frozen reference adapter ("ref") rides along in preference training; only the trained one is saved
            save_adapter(model, path, initial, **kw, **({"selected_adapters": ["default"]}
                                                       if len(model.peft_config) > 1 else {}))
            if needs_training_weights(model):
                save_training_weights(model, path, state_dict)
        _save_beside(tokenizer, model_dir, path)
    return save


def _save_beside(tokenizer, model_dir: Optional[str], path: str) -> None:
    """What a checkpoint holds besides the weights: the tokenizer, and a vision-language model's processor files."""
    from tunesmith.models.vision import copy_processor_files

    tokenizer.save_pretrained(path)
    if model_dir and os.path.isdir(model_dir):
        copy_processor_files(model_dir, path)


@dataclass
class RunOutputs:
    """Where a run writes: its directory, the extra args.json fields, and the opened trackers."""
    run_dir: str
    args_extra: dict
    trackers: Any


def checkpoint_bytes(model_dir: str, train_type: str, save_only_model: bool) -> int:
    """About how large one checkpoint of this run is (bytes): full training saves the weights (as large as the
    model's weight files) plus AdamW's two fp32 moments per parameter; LLaMA-Pro the expanded model and the new
    blocks' moments, taken as 1.7x the weights (4 new blocks on 32 bf16 layers: 1.125x saved, 0.5x moments); LoRA
    and the other peft tuners save an adapter and its optimiser state, taken as 2% of the weights (a rank-64
    all-linear adapter of a 7B model with AdamW is ~1.3%)."""
    import json

    weights = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                  if f.endswith((".safetensors", ".bin", ".pt"))) if os.path.isdir(model_dir) else 0
    if train_type == "llamapro":
        return int(weights * 1.7)
    if train_type != "full":
        return int(weights * 0.02)
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        dtype = config.get("torch_dtype") or config.get("dtype")
    except (OSError, ValueError):
        dtype = None
    per_param = 4 if dtype in (None, "float32") else 2
    return int(weights * (1 + (0 if save_only_model else 8 / per_param)))


def check_disk(cfg, model_dir: str) -> None:
    """Before the model loads: the output folder's disk must hold at least one checkpoint (`checkpoint_bytes`).
    Raises ConfigError naming the free and the needed GiB and the ways out."""
    import shutil as sh

    if cfg.output.save_strategy == "no":
        return
    from tunesmith.files import existing_ancestor

    path = existing_ancestor(cfg.output.output_dir)
    need = checkpoint_bytes(model_dir, cfg.model.train_type, cfg.output.save_only_model)
    free = sh.disk_usage(path).free
    if need > free:
        gib = 1 << 30
        raise ConfigError(f"--output_dir {cfg.output.output_dir}: {free / gib:.1f} GiB free on its disk, but one "
                          f"checkpoint of this run takes about {need / gib:.1f} GiB (the weights"
                          + ("" if cfg.output.save_only_model or cfg.model.train_type != "full" else
                             " and AdamW's state; --save_only_model true drops the latter") +
                          "); free some space or choose another --output_dir")


@contextlib.contextmanager
def start_run(cfg, prepared: Prepared, param_info: dict, header):
    """The run directory (args.json), the trackers, and the header line (`header(run_dir)`); the trackers are
    closed when the block ends, however it ends."""
    run_dir, extra = make_run(cfg, prepared, param_info)
    trackers = make_trackers(run_dir, cfg, prepared)
    say(header(run_dir))
    failed = None
    try:
        yield RunOutputs(run_dir, extra, trackers)
    except (DataError, FlagError) as e:  # --streaming: a row met mid-run (strict); flags that do not fit the data
        failed = e
    finally:
        trackers.close()
    if failed is not None:
        raise _stopped_on_data(failed, run_dir) from None


def _stopped_on_data(e, run_dir: str):
    """A bad row met during training (--streaming, --strict true), or flags found not to fit the data before the
    first step (FlagError: a resume with no steps left): a run with no checkpoint yet leaves nothing behind (its
    directory is removed, as for data refused before training); otherwise the error says how to go on from the last
    checkpoint."""
    from tunesmith.train import distributed as D

    checkpoints = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    if not checkpoints:
        if D.is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
        return e
    if isinstance(e, FlagError):
        return e
    return DataError(e.source, e.line, e.field, e.problem,
                     f"{e.fix} Training stopped at this row; after fixing it (or with --strict false, which drops "
                     f"bad rows), continue with --resume_from_checkpoint {checkpoints[-1]}.".strip())


def finish_run(state, run_dir: str, metric_for_best_model: Optional[str] = None) -> None:
    """Plots and report.html for the run, then the summary on stderr (rank 0 only). A plotting failure never fails
    a finished run.

    The best checkpoint is labelled with the metric that chose it, named as the loop logs it (eval_ prefixed):
    metric_for_best_model, or when not given, --metric_for_best_model from the run's args.json (default loss)."""
    from tunesmith.runs.report import write_run_report
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

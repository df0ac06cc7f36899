"""`tunesmith sft`: supervised fine-tuning (LoRA, QLoRA, full, MoE experts).

The objective: summed next-token cross-entropy over the trained label positions (plus the MoE router loss when
--router_aux_loss_coef > 0); the loop divides by the trained tokens of the whole accumulated step.
"""
from __future__ import annotations

from functools import partial

from tunesmith.args import SftArguments
from tunesmith.data.collate import PackedCollate, flat_collate, pad_collate
from tunesmith.train import loop
from tunesmith.train.token_logps import token_logps
from tunesmith.train.setup import (batching, finalise_args, finish_run, prepare_data, prepare_model,
                                   save_model_fn, start_run)


def token_loss(model, batch: dict, aux_coef: float = 0.0):
    """({"tokens": summed CE over trained positions}, {"correct", "n_tokens"}) for one batch."""
    out = token_logps(model, batch)
    loss_sum = -out.logps.sum()
    n = int(out.logps.numel())
    if aux_coef and out.aux_loss is not None:
        # the router loss is a per-batch mean: weight it by this batch's tokens so the step mean stays a mean
        loss_sum = loss_sum + aux_coef * out.aux_loss.float() * n
    return {"tokens": loss_sum}, {"correct": int(out.correct.sum()), "n_tokens": n}


def objective(aux_coef: float = 0.0) -> loop.Objective:
    return loop.Objective(
        "sft", loss=lambda m, b: token_loss(m, b, aux_coef), count=lambda b: {"tokens": b["n_tokens"]},
        metrics=lambda st: {"token_acc": round(st.get("correct", 0) / max(st.get("n_tokens", 0), 1), 6)})


def main(args: SftArguments):
    finalise_args(args, default_loss_scale="default")
    prepared = prepare_data(args, kind="sft", default_loss_scale="default")
    model, param_info = prepare_model(args, prepared.model_dir, prepared.tokenizer)
    pad_id = prepared.tokenizer.pad_token_id
    train_rows, eval_rows, collate = batching(
        args, prepared.train_rows, prepared.eval_rows, partial(pad_collate, pad_id=pad_id,
                                                               padding_side=args.padding_side),
        flat_collate, PackedCollate(pad_id), lambda r: len(r.input_ids), prepared.data_stats["max_length"])
    stats = prepared.data_stats
    header = lambda d: (f"[tunesmith] sft: {stats['train_rows']} training rows, {stats['val_rows']} validation "  # noqa: E731
                        f"rows; run directory {d}")
    with start_run(args, prepared, param_info, header) as out:
        state = loop.train(args=args, model=model, objective=objective(args.router_aux_loss_coef),
                           train_rows=train_rows, eval_rows=eval_rows, collate=collate, run_dir=out.run_dir,
                           save_model=save_model_fn(prepared.tokenizer), trackers=out.trackers,
                           args_extra=out.args_extra)
    finish_run(state, out.run_dir, args.metric_for_best_model)
    run_dir = out.run_dir
    return {"run_dir": run_dir, "state": state, "model": model, "tokenizer": prepared.tokenizer}

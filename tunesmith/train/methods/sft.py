"""The SFT method (`tunesmith sft`): supervised fine-tuning — LoRA, QLoRA, full, MoE experts.

Its objective: the summed next-token cross-entropy over the trained label positions (plus, with
--router_aux_loss_coef > 0, the MoE router's load-balancing loss weighted per token); the loop divides it by the
trained tokens of the whole accumulated step, so the logged loss is nats per trained token. What must not live
here: anything another method shares (data, model, the loop: setup.py, loop.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tunesmith.data.collate import PackedCollate, flat_collate, pad_collate
from tunesmith.train import loop
from tunesmith.train.setup import Batches, batching


def token_loss(model, batch: dict, aux_coef: float = 0.0) -> tuple[dict, dict]:
    """({"tokens": summed cross-entropy in nats over the trained positions}, {"correct", "n_tokens"}) for one
    batch (`input_ids`/`labels` [B, T], or packed/flat rows). The router loss, a per-batch mean, is weighted by
    this batch's trained tokens so that the step's loss per token stays a mean."""
    from tunesmith.train.ops.token_logps import token_logps

    out = token_logps(model, batch, summed=True)  # the loss is −Σ log p: one upstream gradient for every token
    loss_sum = -out.logps.sum()
    n = int(out.logps.numel())
    if aux_coef and out.aux_loss is not None:
        loss_sum = loss_sum + aux_coef * out.aux_loss.float() * n
    return {"tokens": loss_sum}, {"correct": int(out.correct.sum()), "n_tokens": n}


def _count(batch: dict) -> dict:
    return {"tokens": batch["n_tokens"]}


def _metrics(stats: dict) -> dict:
    """token_acc: the fraction of trained tokens whose arg-max prediction is the label."""
    return {"token_acc": round(stats.get("correct", 0) / max(stats.get("n_tokens", 0), 1), 6)}


def objective(aux_coef: float = 0.0) -> loop.Objective:
    """SFT's loss: summed cross-entropy per trained token (units: tokens), logging token_acc."""
    return loop.Objective("sft", loss=partial(token_loss, aux_coef=aux_coef), count=_count, metrics=_metrics)


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: single rows, every assistant turn trained by default, no reference."""
    aux_coef: float = 0.0
    name = "sft"
    head = "causal_lm"
    rows = "sft"
    default_loss_scale = "default"
    needs_reference = False
    streams = True  # --streaming: rows are read, encoded (and packed) on the fly

    @classmethod
    def from_args(cls, args, problems: list) -> "SFT":
        """SFT has no flags of its own beyond the shared ones."""
        return cls(aux_coef=args.router_aux_loss_coef or 0.0)

    def resolved_flags(self) -> dict:
        """Nothing: SFT resolves no flag of its own."""
        return {}

    def shape_records(self, loaded):
        """Rows as loaded: any supported format is an SFT row."""
        return loaded

    def batches(self, cfg, prepared, model, reference):
        """Rows padded per batch, concatenated (--padding_free) or packed (--packing)."""
        pad_id = prepared.tokenizer.pad_token_id
        train, evals, collate = batching(
            cfg.data, prepared.train_rows, prepared.eval_rows,
            partial(pad_collate, pad_id=pad_id, padding_side=cfg.data.padding_side), flat_collate,
            PackedCollate(pad_id), None, prepared.data_stats["max_length"])
        return Batches(train, evals, collate)

    def objective(self, reference, cfg) -> loop.Objective:
        """Summed cross-entropy per trained token (+ the router loss), logging token_acc."""
        return objective(self.aux_coef)

    def header(self, prepared, batches) -> str:
        """The run's header line: the training and validation rows."""
        stats = prepared.data_stats
        return f"[tunesmith] sft: {stats['train_rows']} training rows, {stats['val_rows']} validation rows"

"""The SFT method (`tunesmith sft`): supervised fine-tuning — LoRA, QLoRA, full, MoE experts.

Its objective: the summed next-token cross-entropy over the trained label positions (or DFT's probability-weighted
one, --enable_dft_loss; with --enable_channel_loss each row's `channel` also gets its own logged loss; plus, with
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


def token_loss(model, batch: dict, aux_coef: float = 0.0, dft: bool = False,
               channels: bool = False) -> tuple[dict, dict]:
    """({"tokens": summed loss in nats over the trained positions}, {"correct", "n_tokens", …}) for one batch
    (`input_ids`/`labels` [B, T], or packed/flat rows). The loss is the cross-entropy −Σ log p, or with `dft`
    DFT's −Σ sg(p)·log p (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective with
    Reward Rectification", arXiv:2508.05629, eq. 9: each token's cross-entropy weighted by its own probability,
    detached; ms-swift's --enable_dft_loss). The router loss, a per-batch mean, is weighted by this batch's trained
    tokens so that the step's loss per token stays a mean. With `channels`, the statistics also hold each channel's
    summed per-token loss and tokens (`channel_stats`)."""
    from tunesmith.train.ops.token_logps import token_logps

    # the cross-entropy is −Σ log p: one upstream gradient for every token (summed); DFT's weights differ per token
    out = token_logps(model, batch, summed=not dft)
    per_token = -out.logps * out.logps.detach().exp() if dft else -out.logps
    loss_sum = per_token.sum()
    n = int(out.logps.numel())
    if aux_coef and out.aux_loss is not None:
        loss_sum = loss_sum + aux_coef * out.aux_loss.float() * n
    stats = {"correct": int(out.correct.sum()), "n_tokens": n}
    if channels:
        stats.update(channel_stats(per_token.detach(), out.rows, batch.get("channels")))
    return {"tokens": loss_sum}, stats


def channel_stats(per_token, rows, names) -> dict:
    """{"channel_loss/<c>": summed per-token loss, "channel_tokens/<c>": tokens} for each channel c of the batch:
    per_token [N] and rows [N] (the sequence of each trained token) as token_logps gives them, names the batch's
    per-sequence `channels` (None: no row gives one; a row without one is channel None, ms-swift's loss_None)."""
    out: dict = {}
    for seq, (total, count) in _per_sequence(per_token, rows).items():
        c = names[seq] if names is not None else None
        out[f"channel_loss/{c}"] = out.get(f"channel_loss/{c}", 0.0) + total
        out[f"channel_tokens/{c}"] = out.get(f"channel_tokens/{c}", 0) + count
    return out


def _per_sequence(per_token, rows) -> dict:
    import torch

    seqs, inverse = torch.unique(rows, return_inverse=True)
    totals = torch.zeros(len(seqs), dtype=torch.float64, device=per_token.device)
    totals.index_add_(0, inverse, per_token.double())
    counts = torch.bincount(inverse, minlength=len(seqs))
    return {int(s): (float(t), int(k)) for s, t, k in zip(seqs.tolist(), totals.tolist(), counts.tolist())}


def _count(batch: dict) -> dict:
    return {"tokens": batch["n_tokens"]}


def _metrics(stats: dict) -> dict:
    """token_acc: the fraction of trained tokens whose arg-max prediction is the label; loss_<channel>: each
    channel's mean per-token loss (--enable_channel_loss)."""
    out = {"token_acc": round(stats.get("correct", 0) / max(stats.get("n_tokens", 0), 1), 6)}
    for key in sorted(k for k in stats if k.startswith("channel_loss/")):
        c = key.split("/", 1)[1]
        out[f"loss_{c}"] = round(stats[key] / max(stats.get(f"channel_tokens/{c}", 0), 1), 6)
    return out


def objective(aux_coef: float = 0.0, dft: bool = False, channels: bool = False) -> loop.Objective:
    """SFT's loss: summed cross-entropy (or DFT's weighted one) per trained token (units: tokens), logging
    token_acc and, with `channels`, loss_<channel>."""
    return loop.Objective("sft", loss=partial(token_loss, aux_coef=aux_coef, dft=dft, channels=channels),
                          count=_count, metrics=_metrics)


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: single rows, every assistant turn trained by default, no reference."""
    aux_coef: float = 0.0
    dft: bool = False       # --enable_dft_loss
    channels: bool = False  # --enable_channel_loss
    command: str = "sft"    # the command that trains it: sft, or pt (the same method with pt's defaults)
    name = "sft"
    head = "causal_lm"
    rows = "sft"
    default_loss_scale = "default"
    needs_reference = False
    streams = True  # --streaming: rows are read, encoded (and packed) on the fly

    @classmethod
    def from_args(cls, args, problems: list) -> "SFT":
        """SFT's own flags: --enable_dft_loss and --enable_channel_loss (the loss variants of sft and pt)."""
        from tunesmith.config.commands import PretrainArguments

        return cls(aux_coef=args.router_aux_loss_coef or 0.0, dft=args.enable_dft_loss,
                   channels=args.enable_channel_loss, command="pt" if isinstance(args, PretrainArguments) else "sft")

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
        """Summed cross-entropy (or DFT's) per trained token (+ the router loss), logging token_acc (and the
        channels' losses)."""
        return objective(self.aux_coef, self.dft, self.channels)

    def header(self, prepared, batches) -> str:
        """The run's header line: the training and validation rows."""
        stats = prepared.data_stats
        return f"[tunesmith] {self.command}: {stats['train_rows']} training rows, {stats['val_rows']} validation rows"

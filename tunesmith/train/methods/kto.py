"""The KTO method (`tunesmith rlhf --rlhf_type kto`): KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on single
replies labelled desirable or undesirable (`"label": true/false`; a preference pair is split into one of each).

Per batch of B examples, following TRL's KTOTrainer:
1. Reference log-probs (no gradient) of the B real sequences and of B mismatched ones — each prompt followed by the
   previous example's completion — in one forward pass of the reference.
2. The policy's log-probs of the mismatched sequences without gradient; z₀ = mean(policy − reference) over them,
   clamped at 0 and detached: the batch estimate of KL(policy ‖ reference).
3. The policy's log-probs of the real sequences with gradient; each example's loss comes from `losses.kto` and
   the loop averages over examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

from tunesmith.data.collate import pad_collate, segments_collate
from tunesmith.data.encode import IGNORE, Encoded
from tunesmith.data.load import LoadResult, rows_for
from tunesmith.log import note
from tunesmith.train import loop
from tunesmith.config.checks import between
from tunesmith.train.methods.pairs import preference_flags
from tunesmith.train.reference import Reference, disable_dropout, sequence_logps
from tunesmith.train.setup import Batches


def _first_trained(enc: Encoded) -> int:
    return next(i for i, x in enumerate(enc.labels) if x != IGNORE)


def kto_collate(rows: list[tuple[Encoded, bool]], pad_id: int, padding_side: str = "right",
                flat: bool = False) -> dict:
    """[real_1..B, mismatched_1..B] padded into `input_ids`/`labels`/`attention_mask` [2B, T]: mismatched_i is
    prompt_i + the completion of example i−1 (TRL's KL pairs); `desirable` [B] bool, `n_examples` B.

    flat (--padding_free): no padding between sequences — the real sequences one after another in row 0 (sequence
    ids 0..B−1) and the mismatched ones in row 1 (B..2B−1), position_ids restarting at each, as segments_collate
    lays them out ([2, T], T = the longer row's tokens): the same log-probs as the padded batch, without the
    padded positions' compute."""
    import torch

    encs = [e for e, _ in rows]
    mismatched = []
    for i, e in enumerate(encs):
        other = encs[i - 1]
        p, q = _first_trained(e), _first_trained(other)
        limit = max(len(e.input_ids), len(other.input_ids))
        mismatched.append(Encoded((e.input_ids[:p] + other.input_ids[q:])[:limit],
                                  ([IGNORE] * p + other.labels[q:])[:limit], images=e.images))  # the prompt's
    n = len(rows)
    if flat:
        b = segments_collate([list(enumerate(encs)), [(n + i, m) for i, m in enumerate(mismatched)]], pad_id, 2 * n)
    else:
        b = pad_collate(encs + mismatched, pad_id, padding_side)
    b["n_examples"] = n
    b["desirable"] = torch.tensor([d for _, d in rows], dtype=torch.bool)
    return b


def _half(batch: dict, lo: int, hi: int) -> dict:
    """Sequences lo..hi−1 (the real half 0..B−1 or the mismatched half B..2B−1) of a kto_collate batch. A flat
    batch holds each half in its own row: that row, cut after its last real token, its sequence ids made to start
    at 0."""
    from tunesmith.data.vision import slice_sequences

    if "seq_ids" not in batch:
        return slice_sequences(batch, lo, hi)
    row = 0 if lo == 0 else 1
    end = max(int((batch["seq_ids"][row] >= 0).sum()), 1)  # segments_collate pads a row at its end only
    seq = batch["seq_ids"][row:row + 1, :end]
    return {"input_ids": batch["input_ids"][row:row + 1, :end], "labels": batch["labels"][row:row + 1, :end],
            "position_ids": batch["position_ids"][row:row + 1, :end], "seq_ids": seq.where(seq < 0, seq - lo),
            "n_seq": hi - lo}


_STAT_KEYS = ("reward_good", "reward_bad", "n_good", "n_bad", "logps_good", "logps_bad", "kl")


def kto_loss(method: "KTO", reference: Reference, model, batch: dict) -> tuple[dict, dict]:
    """({"examples": summed per-example KTO loss (nats)}, summed statistics) for one batch from `kto_collate`."""
    import torch

    from tunesmith.train.ops import losses as L

    n, desirable, beta = batch["n_examples"], batch["desirable"], method.beta
    ref = reference.logps(model, batch).float()
    with torch.no_grad():
        kl_policy = sequence_logps(model, _half(batch, n, 2 * n)).logps
    kl = (kl_policy.float() - ref[n:]).mean().clamp(min=0)
    out = sequence_logps(model, _half(batch, 0, n))
    logratio = out.logps - ref[:n]
    per_example = L.kto(logratio, desirable, kl, beta, method.desirable_weight, method.undesirable_weight)
    rewards = beta * logratio.detach()
    good, bad = desirable.float(), (~desirable).float()
    vals = torch.stack([x.float() for x in (
        (rewards * good).sum(), (rewards * bad).sum(), good.sum(), bad.sum(),
        (out.logps.detach() * good).sum(), (out.logps.detach() * bad).sum(), kl)]).tolist()
    return {"examples": per_example.sum()}, {"batches": 1, **dict(zip(_STAT_KEYS, vals))}


def kto_metrics(st: dict) -> dict:
    """rewards/* and logps/* per desirable (chosen) or undesirable (rejected) example, the mean KL estimate."""
    g, b = max(st.get("n_good", 0), 1), max(st.get("n_bad", 0), 1)
    m = {"rewards/chosen": st.get("reward_good", 0.0) / g, "rewards/rejected": st.get("reward_bad", 0.0) / b,
         "logps/chosen": st.get("logps_good", 0.0) / g, "logps/rejected": st.get("logps_bad", 0.0) / b,
         "kl": st.get("kl", 0.0) / max(st.get("batches", 0), 1)}
    m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return {k: round(v, 6) for k, v in m.items()}


def _count(batch: dict) -> dict:
    return {"examples": batch["n_examples"]}


def unpair(loaded: LoadResult) -> LoadResult:
    """KTO learns from single replies labelled desirable or not: a labelled row stays, a preference pair becomes
    its chosen reply (desirable) and its rejected reply (undesirable). A row with neither is a bad row
    (load.rows_for): DataError (file, line) when the load was strict, else dropped and counted with its reason."""
    return rows_for(loaded, "kto")



@dataclass(frozen=True)
class KTO:
    """KTO on labelled single replies (pairs split), with a reference; the last assistant turn is trained."""
    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ref_model: Optional[str] = None
    ref_adapters: tuple = ()
    padding_free: bool = False  # --padding_free: each batch's sequences unpadded (kto_collate flat)
    name = "kto"
    head = "causal_lm"
    rows = "kto"
    default_loss_scale = "last_round"
    needs_reference = True

    @classmethod
    def from_args(cls, args, problems: list) -> "KTO":
        """beta (default 0.1), the weights; padded batches of 2 or more (the KL term needs other examples)."""
        beta, _ = preference_flags(args, problems, ("kto",), "kto")
        if args.packing:
            problems.append("--packing is not supported for KTO (its KL term pairs each reply with another row's "
                            "prompt in the same batch, so rows cannot be packed across batches); --padding_free true "
                            "drops the padding within each batch instead")
        if args.per_device_train_batch_size < 2:
            problems.append("KTO estimates the KL term from the other examples of the same batch, so it needs "
                            "--per_device_train_batch_size 2 or more (with 1 the KL term equals the reward itself)")
        for name, weight in (("desirable_weight", args.desirable_weight),
                             ("undesirable_weight", args.undesirable_weight)):
            between(problems, name, weight, 0, None)
        if args.desirable_weight == 0 and args.undesirable_weight == 0:
            problems.append("--desirable_weight and --undesirable_weight are both 0: nothing would be learned")
        if args.precompute_ref_log_probs:
            note("--precompute_ref_log_probs: KTO's mismatched pairs change with the batch; reference log-probs are "
                 "computed during training")
        return cls(beta, args.desirable_weight, args.undesirable_weight, args.ref_model, tuple(args.ref_adapters),
                   bool(args.padding_free))

    def resolved_flags(self) -> dict:
        """beta, the loss type kto, rpo_alpha cleared (DPO only), for args.json."""
        return {"beta": self.beta, "loss_type": ["kto"], "rpo_alpha": None}

    def shape_records(self, loaded: LoadResult) -> LoadResult:
        """Labelled rows kept, pairs split into a desirable and an undesirable reply (`unpair`)."""
        return unpair(loaded)

    def batches(self, cfg, prepared, model, reference) -> Batches:
        """Batches of real and mismatched sequences (`kto_collate`: padded, or flat with --padding_free); dropout
        off. Raises ConfigError for --padding_free on a vision-language model (its pictures follow padded rows)."""
        from tunesmith.errors import ConfigError

        if self.padding_free and prepared.encoder.images is not None:
            raise ConfigError("--padding_free is not supported for KTO on a vision-language model yet; drop the flag "
                              "(KTO then trains padded)")
        disable_dropout(model, has_reference=True)
        collate = partial(kto_collate, pad_id=prepared.tokenizer.pad_token_id, padding_side=cfg.data.padding_side,
                          flat=self.padding_free)
        return Batches(prepared.train_rows, prepared.eval_rows, collate, reference)

    def objective(self, reference, cfg) -> loop.Objective:
        """KTO's objective: mean loss per example, with the KL estimate from mismatched pairs."""
        return loop.Objective("kto", loss=partial(kto_loss, self, reference), count=_count, metrics=kto_metrics)

    def header(self, prepared, batches) -> str:
        """The run's header lines (and a note when one side of the labels is missing)."""
        n_good = sum(prepared.train_rows.column("desirable"))  # a stored column: no row is decoded
        n_bad = len(prepared.train_rows) - n_good
        if not n_good or not n_bad:
            note(f"KTO data has {n_good} desirable and {n_bad} undesirable replies; it learns best from both")
        return (f"[tunesmith] rlhf kto: β={self.beta:g}, desirable_weight={self.desirable_weight:g}, "
                f"undesirable_weight={self.undesirable_weight:g}\n[tunesmith] reference: "
                f"{batches.reference.describe}\n[tunesmith] {n_good} desirable and {n_bad} undesirable training "
                f"replies, {len(prepared.eval_rows)} validation replies")

"""`tunesmith rlhf --rlhf_type kto`: KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on single replies labelled
desirable or undesirable (`"label": true/false`; a preference pair is split into one of each).

Per batch of B examples, following TRL's KTOTrainer:
1. Reference log-probs (no gradient) of the B real sequences and of B mismatched ones — each prompt followed by the
   previous example's completion — in one forward pass of the reference.
2. The policy's log-probs of the mismatched sequences without gradient; z₀ = mean(policy − reference) over them,
   clamped at 0 and detached: the batch estimate of KL(policy ‖ reference).
3. The policy's log-probs of the real sequences with gradient; each example's loss comes from `losses.kto` and
   the loop averages over examples.
"""
from __future__ import annotations

from functools import partial

from tunesmith.args import RLHFArguments
from tunesmith.data.collate import pad_collate
from tunesmith.data.encode import IGNORE, Encoded
from tunesmith.errors import ConfigError
from tunesmith.model import note
from tunesmith.train import loop
from tunesmith.train.preference import finalise_preference_args
from tunesmith.train.reference import Reference, disable_dropout, sequence_logps, setup_reference
from tunesmith.train.setup import finalise_args, finish_run, prepare_data, prepare_model, save_model_fn, start_run


def _first_trained(enc: Encoded) -> int:
    return next(i for i, x in enumerate(enc.labels) if x != IGNORE)


def kto_collate(rows: list[tuple[Encoded, bool]], pad_id: int, padding_side: str = "right") -> dict:
    """[real_1..B, mismatched_1..B]: mismatched_i is prompt_i + the completion of example i−1 (TRL's KL pairs)."""
    import torch

    encs = [e for e, _ in rows]
    mismatched = []
    for i, e in enumerate(encs):
        other = encs[i - 1]
        p, q = _first_trained(e), _first_trained(other)
        limit = max(len(e.input_ids), len(other.input_ids))
        mismatched.append(Encoded((e.input_ids[:p] + other.input_ids[q:])[:limit],
                                  ([IGNORE] * p + other.labels[q:])[:limit]))
    b = pad_collate(encs + mismatched, pad_id, padding_side)
    n = len(rows)
    b["n_examples"] = n
    b["desirable"] = torch.tensor([d for _, d in rows], dtype=torch.bool)
    return b


def _half(batch: dict, lo: int, hi: int) -> dict:
    return {k: batch[k][lo:hi] for k in ("input_ids", "attention_mask", "labels")}


def kto_objective(args, reference: Reference) -> loop.Objective:
    import torch

    from tunesmith.train import losses as L

    beta = args.beta

    def loss(model, batch):
        n = batch["n_examples"]
        desirable = batch["desirable"]
        ref = reference.logps(model, batch).float()
        with torch.no_grad():
            kl_policy = sequence_logps(model, _half(batch, n, 2 * n)).logps
        kl = (kl_policy.float() - ref[n:]).mean().clamp(min=0)
        out = sequence_logps(model, _half(batch, 0, n))
        logratio = out.logps - ref[:n]
        per_example = L.kto(logratio, desirable, kl, beta, args.desirable_weight, args.undesirable_weight)
        rewards = beta * logratio.detach()
        good, bad = desirable.float(), (~desirable).float()
        vals = torch.stack([x.float() for x in (
            (rewards * good).sum(), (rewards * bad).sum(), good.sum(), bad.sum(),
            (out.logps.detach() * good).sum(), (out.logps.detach() * bad).sum(), kl)]).tolist()
        keys = ("reward_good", "reward_bad", "n_good", "n_bad", "logps_good", "logps_bad", "kl")
        return {"examples": per_example.sum()}, {"batches": 1, **dict(zip(keys, vals))}

    def metrics(st: dict) -> dict:
        g, b = max(st.get("n_good", 0), 1), max(st.get("n_bad", 0), 1)
        m = {"rewards/chosen": st.get("reward_good", 0.0) / g, "rewards/rejected": st.get("reward_bad", 0.0) / b,
             "logps/chosen": st.get("logps_good", 0.0) / g, "logps/rejected": st.get("logps_bad", 0.0) / b,
             "kl": st.get("kl", 0.0) / max(st.get("batches", 0), 1)}
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
        return {k: round(v, 6) for k, v in m.items()}

    return loop.Objective("kto", loss=loss, count=lambda b: {"examples": b["n_examples"]}, metrics=metrics)


def main(args: RLHFArguments):
    finalise_preference_args(args)
    if args.packing or args.padding_free:
        raise ConfigError("--packing/--padding_free are not supported for KTO yet (its KL pairs are built per batch); "
                          "train KTO padded")
    if args.per_device_train_batch_size < 2:
        raise ConfigError("KTO estimates the KL term from the other examples of the same batch, so it needs "
                          "--per_device_train_batch_size 2 or more (with 1 the KL term equals the reward itself)")
    if args.precompute_ref_log_probs:
        note("--precompute_ref_log_probs: KTO's mismatched pairs change with the batch; reference log-probs are "
             "computed during training")
    finalise_args(args, default_loss_scale="last_round")
    prepared = prepare_data(args, kind="kto", default_loss_scale="last_round")
    model, param_info = prepare_model(args, prepared.model_dir, prepared.tokenizer)
    reference = setup_reference(args, model, prepared.tokenizer)
    disable_dropout(model)
    n_good = sum(1 for _, d in prepared.train_rows if d)
    n_bad = len(prepared.train_rows) - n_good
    if not n_good or not n_bad:
        note(f"KTO data has {n_good} desirable and {n_bad} undesirable replies; it learns best from both")
    collate = partial(kto_collate, pad_id=prepared.tokenizer.pad_token_id, padding_side=args.padding_side)
    header = lambda d: (f"[tunesmith] rlhf kto: β={args.beta:g}, desirable_weight={args.desirable_weight:g}, "  # noqa: E731
                        f"undesirable_weight={args.undesirable_weight:g}\n[tunesmith] reference: {reference.describe}\n"
                        f"[tunesmith] {n_good} desirable and {n_bad} undesirable training replies, "
                        f"{len(prepared.eval_rows)} validation replies; run directory {d}")
    with start_run(args, prepared, param_info, header) as out:
        state = loop.train(args=args, model=model, objective=kto_objective(args, reference),
                           train_rows=prepared.train_rows, eval_rows=prepared.eval_rows, collate=collate,
                           run_dir=out.run_dir, save_model=save_model_fn(prepared.tokenizer), trackers=out.trackers,
                           args_extra=out.args_extra)
    finish_run(state, out.run_dir, args.metric_for_best_model)
    run_dir = out.run_dir
    return {"run_dir": run_dir, "state": state, "model": model, "tokenizer": prepared.tokenizer,
            "reference": reference}

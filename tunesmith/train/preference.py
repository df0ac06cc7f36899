"""`tunesmith rlhf` (and `tunesmith dpo`): preference training on pairs — DPO and its loss variants, CPO, SimPO
and ORPO. KTO (unpaired) lives in kto.py; the log-prob and reference code both use lives in reference.py.

One step of the objective, for a batch of B pairs:
1. The reference's log-probs of the 2B sequences: the same weights with the LoRA adapter switched off, a frozen
   copy of the SFT adapter (`--adapters`/`--ref_adapters`), a frozen reference model (full training), or a cache
   computed once before training (`--precompute_ref_log_probs`). Reference-free methods (CPO/SimPO/ORPO) skip it.
2. One forward pass of the policy over the batch: each pair as one sequence [prompt, chosen, rejected] with the
   prompt computed once (prefix sharing, where the attention implementation allows it), or [chosen_1..B,
   rejected_1..B] padded together; log-probs summed over the completion tokens only (the prompt is never trained).
3. The loss: a mean over pairs of the chosen variant(s), plus — only when asked for with --rpo_alpha, the `sft`
   loss type, CPO's cpo_alpha or ORPO — an NLL over the chosen tokens, logged separately as nll_loss.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Optional

from tunesmith.args import RLHFArguments
from tunesmith.data.collate import flat_collate, pad_collate, segments_collate
from tunesmith.data.encode import IGNORE, Encoded
from tunesmith.errors import ConfigError
from tunesmith.model import default_device, note
from tunesmith.train import loop
# SeqLogps is re-exported: tests build the per-sequence log-probs this module's objective consumes
from tunesmith.train.reference import (Reference, SeqLogps, disable_dropout, sequence_logps,  # noqa: F401
                                       setup_reference)
from tunesmith.train.setup import (batching, finalise_args, finish_run, prepare_data, prepare_model,
                                   save_model_fn, start_run)

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


# ------------------------------------------------------------------ data

@dataclass
class Pair:
    chosen: Encoded
    rejected: Encoded
    ref_chosen: Optional[float] = None     # filled by --precompute_ref_log_probs
    ref_rejected: Optional[float] = None


def pair_collate(rows: list[Pair], pad_id: int, padding_side: str = "right", flat: bool = False) -> dict:
    """[chosen_1..B, rejected_1..B] in one batch, so one forward pass serves both sides of every pair: padded
    together, or (flat, for --padding_free) concatenated into one sequence without padding."""
    seqs = [r.chosen for r in rows] + [r.rejected for r in rows]
    return _pair_fields(flat_collate(seqs, pad_id) if flat else pad_collate(seqs, pad_id, padding_side), rows)


class PackedPairCollate:
    """--packing for pairs: each unit is a group of pairs packed into one row; sequence ids keep the order
    [chosen_1..B, rejected_1..B] of the batch whatever row a sequence sits in."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, groups: list[list[Pair]]) -> dict:
        n = sum(len(g) for g in groups)
        rows, j = [], 0
        for group in groups:
            row = []
            for p in group:
                row += [(j, p.chosen), (n + j, p.rejected)]
                j += 1
            rows.append(row)
        return _pair_fields(segments_collate(rows, self.pad_id, 2 * n), [p for g in groups for p in g])


def shared_prefix_length(p: Pair) -> int:
    """How many leading tokens both sides of a pair can share: identical ids and no trained label on either side
    (a position trained for both sequences could not belong to one of them)."""
    c, r = p.chosen, p.rejected
    n = 0
    limit = min(len(c.input_ids), len(r.input_ids)) - 1  # each side keeps at least one token of its own
    while n < limit and c.input_ids[n] == r.input_ids[n] and c.labels[n] == IGNORE and r.labels[n] == IGNORE:
        n += 1
    return n


def shared_length(p: Pair) -> int:
    return len(p.chosen.input_ids) + len(p.rejected.input_ids) - shared_prefix_length(p)


class SharedPairCollate:
    """--prefix_sharing: each pair is one sequence [prompt, chosen, rejected]; the prompt is computed once.

    Rejected positions continue from the prompt (position ids P, P+1, … as in its own sequence), its first token is
    predicted from the prompt's last position (`label_src`), and the attention mask built from `attn_group` /
    `attn_part` keeps rejected from seeing chosen — so every log-prob equals the two-sequence computation.
    Units are pairs (one row each; `flat`: the whole batch in one row) or, with --packing, groups of pairs sharing
    a row. Sequence ids keep the batch order [chosen_1..B, rejected_1..B] that the losses expect."""

    def __init__(self, pad_id: int, packed: bool = False, flat: bool = False):
        self.pad_id, self.packed, self.flat = pad_id, packed, flat

    def __call__(self, units: list) -> dict:
        import torch

        groups = units if self.packed else ([units] if self.flat else [[p] for p in units])
        pairs = [p for g in groups for p in g]
        n = len(pairs)
        longest = max(sum(shared_length(p) for p in g) for g in groups)
        shape = (len(groups), longest)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        pos = torch.zeros(shape, dtype=torch.long)
        seq = torch.full(shape, -1, dtype=torch.long)
        group = torch.full(shape, -1, dtype=torch.long)
        part = torch.zeros(shape, dtype=torch.long)
        src = (torch.arange(longest) - 1).clamp(min=0).repeat(len(groups), 1)
        j = 0
        for row, g in enumerate(groups):
            at = 0
            for p in g:
                k = shared_prefix_length(p)
                c, r = p.chosen, p.rejected
                nc, nr = len(c.input_ids) - k, len(r.input_ids) - k
                a, b_, e = at + k, at + k + nc, at + k + nc + nr  # starts of chosen and rejected, end
                ids[row, at:a], ids[row, a:b_], ids[row, b_:e] = (
                    torch.tensor(c.input_ids[:k]), torch.tensor(c.input_ids[k:]), torch.tensor(r.input_ids[k:]))
                labels[row, a:b_], labels[row, b_:e] = torch.tensor(c.labels[k:]), torch.tensor(r.labels[k:])
                if k == 0:  # nothing shared: neither side's first token has a predictor
                    labels[row, a] = labels[row, b_] = IGNORE
                pos[row, at:b_] = torch.arange(k + nc)
                pos[row, b_:e] = torch.arange(k, k + nr)
                seq[row, a:b_], seq[row, b_:e] = j, n + j
                group[row, at:e] = j
                part[row, a:b_], part[row, b_:e] = 1, 2
                if k:
                    src[row, b_] = at + k - 1  # rejected's first token follows the prompt, not the chosen side
                at, j = e, j + 1
            pos[row, at:] = torch.arange(longest - at)
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq, "n_seq": 2 * n,
                 "label_src": src, "attn_group": group, "attn_part": part}
        return _pair_fields(batch, pairs)


def _pair_fields(b: dict, rows: list[Pair]) -> dict:
    import torch

    b["n_pairs"] = len(rows)
    # trained chosen tokens (the NLL's units), counted as the shifted labels are
    b["n_tokens"] = sum(1 for r in rows for x in r.chosen.labels[1:] if x != IGNORE)
    if rows[0].ref_chosen is not None:
        b["ref_logps"] = torch.tensor([r.ref_chosen for r in rows] + [r.ref_rejected for r in rows],
                                      dtype=torch.float32)
    return b


# ------------------------------------------------------------------ the reference, cached

def precompute_reference(reference: Reference, policy, rows: list[Pair], collate, batch_size: int) -> Reference:
    """--precompute_ref_log_probs: one pass over the rows stores their reference log-probs with them, so training
    runs no reference forward pass (and a full-training reference model is freed afterwards)."""
    from tqdm.auto import tqdm

    device = default_device()
    policy.to(device)
    policy.eval()
    for i in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", disable=None):
        chunk = rows[i:i + batch_size]
        b = loop._to_device(collate(chunk), device)
        ref = reference.logps(policy, b).float().tolist()
        for k, r in enumerate(chunk):
            r.ref_chosen, r.ref_rejected = ref[k], ref[len(chunk) + k]
    policy.train()
    return Reference("cached", reference.describe + ", precomputed once before training")


def choose_prefix_sharing(args, model, pairs: list[Pair], pad_id: int) -> bool:
    """Whether this run uses prefix-shared pairs: by default with --packing/--padding_free where the attention
    implementation takes a custom mask, and only after a check on a few real pairs that it gives the two-sequence
    log-probs."""
    import torch

    from tunesmith.train.token_logps import prefix_sharing_support

    if args.prefix_sharing is False or not pairs:
        return False
    if args.prefix_sharing is None and not (args.packing or args.padding_free):
        # measured on CPU (bench/RESULTS.md): rows of [prompt, chosen, rejected] padded to the longest pair cost
        # more attention than the shared prompt saves; packed rows have a fixed budget, so there it is a gain
        return False
    reason = prefix_sharing_support(model)
    if reason is None:
        sample = pairs[:4]
        device = default_device()
        model.to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            two = sequence_logps(model, loop._to_device(pair_collate(sample, pad_id), device))
            one = sequence_logps(model, loop._to_device(SharedPairCollate(pad_id)(sample), device))
        model.train(was_training)
        per_token = ((two.logps - one.logps).abs() / two.n.clamp(min=1)).max().item()
        tol = 1e-4 if model.get_input_embeddings().weight.dtype == torch.float32 else 3e-2
        if not (per_token <= tol and torch.equal(two.n, one.n)):
            reason = (f"on the first {len(sample)} pairs it differs from two sequences by {per_token:.2g} nats per "
                      f"token (tolerance {tol:g})")
    if reason is None:
        note("prefix sharing: each pair runs as one sequence [prompt, chosen, rejected] (checked against two "
             "sequences on the first pairs)")
        return True
    if args.prefix_sharing:
        raise ConfigError(f"--prefix_sharing true: {reason}. Use --attn_impl sdpa, or --prefix_sharing false")
    note(f"prefix sharing off: {reason}; pairs run as two sequences")
    return False


# ------------------------------------------------------------------ the objective

def finalise_preference_args(args) -> None:
    """ms-swift's defaults for the preference flags, and the start-up guards against settings that cannot learn."""
    if args.rlhf_type == "simpo":
        args.loss_type = ["simpo"]
    if args.beta is None:
        args.beta = 2.0 if args.rlhf_type == "simpo" else 0.1
    if args.beta <= 0:
        raise ConfigError(f"--beta {args.beta}: beta must be > 0. With beta = 0 every reward is 0 and the DPO loss "
                          f"stays at ln 2 = 0.693 for the whole run (trl#1627); the usual value is 0.1")
    if args.rlhf_type == "dpo":
        types = list(args.loss_type) or ["sigmoid"]
        allowed = _dpo_types()
    elif args.rlhf_type in ("cpo", "simpo"):
        types = list(args.loss_type) or ["sigmoid"]
        allowed = CPO_LOSS_TYPES
        if len(types) > 1:
            raise ConfigError(f"--rlhf_type {args.rlhf_type} takes one --loss_type ({', '.join(allowed)})")
    elif args.rlhf_type == "kto":
        types = list(args.loss_type) or ["kto"]
        allowed = ("kto",)
    else:  # orpo has a single fixed loss
        if args.loss_type:
            note("--rlhf_type orpo has one loss (NLL + the odds-ratio term); --loss_type is ignored")
        types, allowed = ["orpo"], ("orpo",)
    for t in types:
        if t not in allowed:
            near = difflib.get_close_matches(t, allowed, n=1)
            raise ConfigError(f"--loss_type {t}: not a loss of --rlhf_type {args.rlhf_type}"
                              + (f"; did you mean {near[0]}?" if near else "") + f" (one of {', '.join(allowed)})")
    args.loss_type = types
    if args.loss_weights and len(args.loss_weights) != len(types):
        raise ConfigError(f"--loss_weights has {len(args.loss_weights)} value(s) for {len(types)} loss type(s) "
                          f"({' '.join(types)}); give one weight per type")
    eps = args.label_smoothing
    if "robust" in types and not 0 <= eps < 0.5:
        raise ConfigError(f"--label_smoothing {eps}: the robust loss needs 0 <= label_smoothing < 0.5")
    if "exo_pair" in types and not 0 < eps < 1:
        raise ConfigError(f"--label_smoothing {eps}: exo_pair needs 0 < label_smoothing < 1 (1e-3 is the usual value)")
    if args.rpo_alpha and args.rlhf_type != "dpo":
        note(f"--rpo_alpha applies to DPO only; ignored for --rlhf_type {args.rlhf_type}")
        args.rpo_alpha = None


def _dpo_types():
    from tunesmith.train.losses import DPO_LOSS_TYPES
    return DPO_LOSS_TYPES


def nll_weight(args) -> float:
    """The weight of the NLL(chosen) term: 0 unless the user mixed one in (never a hidden SFT term)."""
    if args.rlhf_type == "dpo":
        w = args.rpo_alpha or 0.0
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        return w + sum(wt for t, wt in zip(args.loss_type, weights) if t == "sft")
    if args.rlhf_type in ("cpo", "simpo"):
        return args.cpo_alpha
    if args.rlhf_type == "orpo":
        return 1.0
    return 0.0


def describe_objective(args) -> str:
    b = args.beta
    if args.rlhf_type == "dpo":
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        terms = [f"{w:g}·{t}" if w != 1 else t for t, w in zip(args.loss_type, weights) if t != "sft"]
        text = " + ".join(terms) + f" (β={b:g}"
        if args.label_smoothing:
            text += f", label_smoothing={args.label_smoothing:g}"
        if args.ld_alpha is not None:
            text += f", ld_alpha={args.ld_alpha:g}"
        text += ")"
    elif args.rlhf_type == "orpo":
        text = f"ORPO odds-ratio term (λ=β={b:g})"
    else:
        t = args.loss_type[0]
        name = "SimPO" if t == "simpo" else f"CPO ({t})"
        text = f"{name} (β={b:g}" + (f", γ={args.simpo_gamma:g}" if t == "simpo" else "") + ")"
    w = nll_weight(args)
    if w:
        text += f" + {w:g}·NLL(chosen) [logged as nll_loss]" if w != 1 else " + NLL(chosen) [logged as nll_loss]"
    return text


def preference_objective(args, reference: Reference) -> loop.Objective:
    import torch

    from tunesmith.train import losses as L

    beta, eps = args.beta, args.label_smoothing
    rlhf = args.rlhf_type
    types = args.loss_type
    weights = args.loss_weights or [1.0] * len(types)
    w_nll = nll_weight(args)
    aux_coef = args.router_aux_loss_coef or 0.0
    warned = []

    def loss(model, batch):
        n_pairs = batch["n_pairs"]
        ref = reference.logps(model, batch) if reference.kind != "none" else None
        out = sequence_logps(model, batch, ld_alpha=args.ld_alpha if rlhf == "dpo" else None, n_pairs=n_pairs)
        c, r = out.logps[:n_pairs], out.logps[n_pairs:]
        n_c, n_r = out.n[:n_pairs].clamp(min=1), out.n[n_pairs:].clamp(min=1)
        extra = {}
        if rlhf == "dpo":
            ref = ref.to(c.device, c.dtype)
            rc, rr = ref[:n_pairs], ref[n_pairs:]
            pair = torch.zeros_like(c)
            for t, w in zip(types, weights):
                if t != "sft":
                    pair = pair + w * L.dpo_loss(t, chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr,
                                                 chosen_len=n_c, rejected_len=n_r, beta=beta, label_smoothing=eps,
                                                 discopop_tau=args.discopop_tau)
            reward_c, reward_r = beta * (c - rc).detach(), beta * (r - rr).detach()
            shown_c, shown_r = c, r
        elif rlhf == "orpo":
            avg_c, avg_r = c / n_c, r / n_r
            pair = L.orpo(avg_c, avg_r, beta)
            reward_c, reward_r = beta * avg_c.detach(), beta * avg_r.detach()
            shown_c, shown_r = avg_c, avg_r
            log_odds = L.orpo_log_odds(avg_c, avg_r).detach()
            extra = {"log_odds_ratio": float(torch.nn.functional.logsigmoid(log_odds).sum()),
                     "log_odds_chosen": float(log_odds.sum())}
        else:  # cpo / simpo
            t = types[0]
            avg_c, avg_r = c / n_c, r / n_r
            if t == "simpo":
                pair = L.simpo(avg_c, avg_r, beta, args.simpo_gamma, eps)
            elif t == "ipo":
                pair = L.ipo(avg_c - avg_r, beta)
            elif t == "hinge":
                pair = L.hinge(c - r, beta)
            else:
                pair = L.cpo(c, r, beta, eps)
            shown_c, shown_r = (avg_c, avg_r) if t in ("simpo", "ipo") else (c, r)
            reward_c, reward_r = beta * shown_c.detach(), beta * shown_r.detach()
        chosen_rows = out.rows < n_pairs
        nll_sum = -out.token_logps[chosen_rows].sum()
        parts = {"pairs": pair.sum()}
        if w_nll:
            parts["tokens"] = w_nll * nll_sum
        if aux_coef and out.aux_loss is not None:
            parts["pairs"] = parts["pairs"] + aux_coef * out.aux_loss.float() * n_pairs
        vals = torch.stack([x.float() for x in (
            reward_c.sum(), reward_r.sum(), (reward_c > reward_r).sum(), (reward_c - reward_r).sum(),
            shown_c.detach().sum(), shown_r.detach().sum(), out.logits_sum[:n_pairs].sum(),
            out.logits_sum[n_pairs:].sum(), out.n[:n_pairs].sum(), out.n[n_pairs:].sum(), nll_sum.detach(),
            pair.detach().sum())]).tolist()  # one device sync for all statistics
        keys = ("rewards/chosen", "rewards/rejected", "correct", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "chosen_tokens", "rejected_tokens", "nll", "pref_loss")
        stats = {"pairs": n_pairs, **dict(zip(keys, vals)), **extra}
        if ref is not None and torch.is_grad_enabled():
            _check_reference_moves(out.logps.detach(), ref, reference, args, warned)
        return parts, stats

    def metrics(st: dict) -> dict:
        pairs = max(st.get("pairs", 0), 1)
        m = {k: round(st.get(k, 0.0) / pairs, 6) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                          "logps/chosen", "logps/rejected")}
        m["rewards/accuracies"] = round(st.get("correct", 0.0) / pairs, 6)
        m["logits/chosen"] = round(st.get("logits/chosen", 0.0) / max(st.get("chosen_tokens", 0), 1), 6)
        m["logits/rejected"] = round(st.get("logits/rejected", 0.0) / max(st.get("rejected_tokens", 0), 1), 6)
        if w_nll:
            m["nll_loss"] = round(st.get("nll", 0.0) / max(st.get("chosen_tokens", 0), 1), 6)
            m["pref_loss"] = round(st.get("pref_loss", 0.0) / pairs, 6)
        for k in ("log_odds_ratio", "log_odds_chosen"):
            if k in st:
                m[k] = round(st[k] / pairs, 6)
        return m

    def count(batch):
        return {"pairs": batch["n_pairs"], "tokens": batch["n_tokens"]}

    return loop.Objective(rlhf, loss=loss, count=count, metrics=metrics)


def _check_reference_moves(policy_logps, ref_logps, reference: Reference, args, warned: list) -> None:
    """A reference that *is* the policy keeps the DPO loss at ln 2 for the whole run. After three optimiser steps
    the policy must have moved away from the reference on at least some sequence; say so once if it has not."""
    import torch

    reference.calls += 1
    steps_done = (reference.calls - 1) // max(args.gradient_accumulation_steps, 1)
    if warned or steps_done < 3 or not torch.equal(policy_logps.to(ref_logps.dtype), ref_logps):
        return
    warned.append(True)
    note(f"warning: after {steps_done} optimiser steps the policy's log-probs still equal the reference's exactly "
         f"(reference: {reference.describe}). Either the reference is the policy itself, or the updates do not "
         f"change the model (learning rate {args.learning_rate:g}, frozen weights, bf16 rounding). The loss cannot "
         f"move from ln 2 until they differ.")


# ------------------------------------------------------------------ the command

def main(args: RLHFArguments):
    if args.rlhf_type == "kto":
        from tunesmith.train import kto
        return kto.main(args)
    finalise_preference_args(args)
    default_scale = "default" if args.rlhf_type == "orpo" else "last_round"  # ms-swift: ORPO trains every turn
    finalise_args(args, default_loss_scale=default_scale)
    prepared = prepare_data(args, kind="preference", default_loss_scale=default_scale)
    model, param_info = prepare_model(args, prepared.model_dir, prepared.tokenizer)
    reference = setup_reference(args, model, prepared.tokenizer)
    if disable_dropout(model):  # after the reference: a reference adapter brings its own dropout layers
        note("dropout disabled for preference training (as TRL and ms-swift do), so the policy starts equal to "
             "the reference")
    pad_id = prepared.tokenizer.pad_token_id
    train_rows = [Pair(c, r) for c, r in prepared.train_rows]
    eval_rows = [Pair(c, r) for c, r in prepared.eval_rows]
    if choose_prefix_sharing(args, model, train_rows, pad_id):
        collate, flat, packed, length = (SharedPairCollate(pad_id), SharedPairCollate(pad_id, flat=True),
                                         SharedPairCollate(pad_id, packed=True), shared_length)
    else:
        collate, flat, packed = (partial(pair_collate, pad_id=pad_id, padding_side=args.padding_side),
                                 partial(pair_collate, pad_id=pad_id, flat=True), PackedPairCollate(pad_id))
        length = lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids)  # noqa: E731
    if args.precompute_ref_log_probs and reference.kind != "none":
        bs = max(args.per_device_train_batch_size, args.per_device_eval_batch_size)
        cached = precompute_reference(reference, model, train_rows + eval_rows, collate, bs)
        reference.model = None  # free the full-training reference copy
        reference = cached
    train_rows, eval_rows, collate = batching(args, train_rows, eval_rows, collate, flat, packed, length,
                                              prepared.data_stats["max_length"])
    stats = prepared.data_stats
    header = lambda d: (f"[tunesmith] rlhf {args.rlhf_type}: loss = {describe_objective(args)}\n"  # noqa: E731
                        f"[tunesmith] reference: {reference.describe}\n"
                        f"[tunesmith] {stats['train_rows']} training pairs, {stats['val_rows']} validation pairs; "
                        f"run directory {d}")
    with start_run(args, prepared, param_info, header) as out:
        state = loop.train(args=args, model=model, objective=preference_objective(args, reference),
                           train_rows=train_rows, eval_rows=eval_rows, collate=collate, run_dir=out.run_dir,
                           save_model=save_model_fn(prepared.tokenizer), trackers=out.trackers,
                           args_extra=out.args_extra)
    finish_run(state, out.run_dir, args.metric_for_best_model)
    run_dir = out.run_dir
    return {"run_dir": run_dir, "state": state, "model": model, "tokenizer": prepared.tokenizer,
            "reference": reference}

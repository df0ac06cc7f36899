"""What the pair methods (DPO family: dpo.py; CPO and SimPO: cpo.py; ORPO: orpo.py) share: pairs and their
collators, the prefix-shared [prompt, chosen, rejected] layout, the reference cache, and the pair objective.

One step of a pair objective, for a batch of B pairs:
1. The reference's log-probs of the 2B sequences (train/reference.py): the adapter switched off, a frozen copy of
   the SFT adapter, a frozen reference model, or a cache computed once before training
   (--precompute_ref_log_probs). Reference-free methods (CPO/SimPO/ORPO) skip it.
2. One forward pass of the policy over the batch: each pair as one sequence [prompt, chosen, rejected] with the
   prompt computed once (prefix sharing, where the attention implementation allows it), or [chosen_1..B,
   rejected_1..B] padded together; log-probs summed over the completion tokens only (the prompt is never trained).
3. The method's per-pair loss (`method.pair_terms`, from losses.py), a mean over pairs, plus — only when the method
   asks for it (--rpo_alpha, DPO's `sft` loss type, CPO's cpo_alpha, ORPO) — an NLL over the chosen tokens, a mean
   over them, logged separately as nll_loss.
What must not live here: anything one pair method alone decides (its flags, its loss: its own file).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

from tunesmith.data.collate import flat_collate, pad_collate, segments_collate
from tunesmith.data.encode import IGNORE, Encoded
from tunesmith.data.load import LoadResult, rows_for
from tunesmith.errors import ConfigError
from tunesmith.models.load import default_device, note
from tunesmith.train import loop
from tunesmith.train.microbatches import to_device
from tunesmith.train.reference import Reference, disable_dropout, sequence_logps
from tunesmith.train.setup import Batches, batching

REFERENCE_FREE = Reference("none", "none (reference-free method)")


# ------------------------------------------------------------------ data

@dataclass
class Pair:
    """One preference pair as the collators take it; ref_* are the reference's summed log-probs (nats) when
    --precompute_ref_log_probs computed them."""
    chosen: Encoded
    rejected: Encoded
    ref_chosen: Optional[float] = None
    ref_rejected: Optional[float] = None


class PairRows:
    """The encoded (chosen, rejected) rows as a read-only sequence of Pair, read on access (the rows may be Arrow,
    store.EncodedRows); `ref` holds the precomputed reference log-probs, [N] chosen and [N] rejected, once
    `precompute_reference` filled it."""

    def __init__(self, rows):
        self.rows = rows
        self.ref: Optional[tuple[list, list]] = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = range(*i.indices(len(self)))
            return [self._pair(j, c, r) for j, (c, r) in zip(idx, self.rows[i])]
        c, r = self.rows[i]
        return self._pair(i, c, r)

    def __iter__(self):
        return (self._pair(j, c, r) for j, (c, r) in enumerate(self.rows))

    def _pair(self, j: int, chosen: Encoded, rejected: Encoded) -> Pair:
        if self.ref is None:
            return Pair(chosen, rejected)
        return Pair(chosen, rejected, self.ref[0][j], self.ref[1][j])


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
    """Tokens of the pair as one prefix-shared sequence [prompt, chosen, rejected]."""
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

def precompute_reference(reference: Reference, policy, splits: list[PairRows], collate, batch_size: int) -> Reference:
    """--precompute_ref_log_probs: one pass over each split's pairs stores their reference log-probs with them
    (`PairRows.ref`), so training runs no reference forward pass (and a full-training reference model is freed
    afterwards)."""
    from tqdm.auto import tqdm

    device = default_device()
    policy.to(device)
    policy.eval()
    for rows in splits:
        chosen, rejected = [], []
        for i in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", disable=None):
            chunk = rows[i:i + batch_size]
            ref = reference.logps(policy, to_device(collate(chunk), device)).float().tolist()
            chosen += ref[:len(chunk)]
            rejected += ref[len(chunk):]
        rows.ref = (chosen, rejected)
    policy.train()
    return Reference("cached", reference.describe + ", precomputed once before training")


def choose_prefix_sharing(prefix_sharing: Optional[bool], data, model, pairs: list[Pair], pad_id: int) -> bool:
    """Whether this run uses prefix-shared pairs: by default with --packing/--padding_free where the attention
    implementation takes a custom mask, and only after a check on a few real pairs that it gives the two-sequence
    log-probs."""
    import torch

    from tunesmith.train.ops.token_logps import prefix_sharing_support

    if prefix_sharing is False or not pairs:
        return False
    if prefix_sharing is None and not (data.packing or data.padding_free):
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
            two = sequence_logps(model, to_device(pair_collate(sample, pad_id), device))
            one = sequence_logps(model, to_device(SharedPairCollate(pad_id)(sample), device))
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
    if prefix_sharing:
        fix = "Use --prefix_sharing false" if "vision-language" in reason else \
            "Use --attn_impl sdpa, or --prefix_sharing false"
        raise ConfigError(f"--prefix_sharing true: {reason}. {fix}")
    note(f"prefix sharing off: {reason}; pairs run as two sequences")
    return False




# ------------------------------------------------------------------ what the pair methods share

def preference_flags(args, problems: list, allowed: tuple, default_type: str, default_beta: float = 0.1,
                     one_type: bool = False, types: Optional[list] = None) -> tuple[float, list]:
    """(beta, loss types) of a preference method, checked; each problem is appended to `problems` (a bad beta,
    a loss type the method lacks, --loss_weights of the wrong length). `types` overrides --loss_type."""
    import difflib

    beta = args.beta if args.beta is not None else default_beta
    if not 0 < beta < float("inf"):  # also NaN
        problems.append(f"--beta {beta}: beta must be a finite number > 0. With beta = 0 every reward is 0 and the DPO loss stays at "
                        f"ln 2 = 0.693 for the whole run (trl#1627); the usual value is 0.1")
    types = list(types if types is not None else args.loss_type) or [default_type]
    if one_type and len(types) > 1:
        problems.append(f"--rlhf_type {args.rlhf_type} takes one --loss_type ({', '.join(allowed)})")
    for t in types:
        if t not in allowed:
            near = difflib.get_close_matches(t, allowed, n=1)
            problems.append(f"--loss_type {t}: not a loss of --rlhf_type {args.rlhf_type}"
                            + (f"; did you mean {near[0]}?" if near else "") + f" (one of {', '.join(allowed)})")
    if args.loss_weights and len(args.loss_weights) != len(types):
        problems.append(f"--loss_weights has {len(args.loss_weights)} value(s) for {len(types)} loss type(s) "
                        f"({' '.join(types)}); give one weight per type")
    if args.loss_weights and not (all(0 <= w < float("inf") for w in args.loss_weights) and
                                  any(w > 0 for w in args.loss_weights)):
        problems.append(f"--loss_weights {' '.join(map(str, args.loss_weights))}: each weight must be a finite "
                        f"number >= 0, and one at least > 0 (all 0 trains nothing)")
    if args.rpo_alpha and args.rlhf_type != "dpo":
        note(f"--rpo_alpha applies to DPO only; ignored for --rlhf_type {args.rlhf_type}")
    return beta, types


def reference_free_flags(args) -> None:
    """Reference-free methods (CPO, SimPO, ORPO) say so when a reference was given."""
    if args.ref_model or args.ref_adapters:
        note(f"--rlhf_type {args.rlhf_type} uses no reference model; --ref_model/--ref_adapters are ignored")


def check_pairs(loaded: LoadResult) -> LoadResult:
    """Every row must be a pair: a row without a rejected reply cannot train a preference method. Such a row is a
    bad row (load.rows_for, the rule `tunesmith data validate --rlhf` applies too): DataError (file, line) when the
    load was strict, else dropped and counted with its reason."""
    return rows_for(loaded, "preference")


def _pair_length(p: Pair) -> int:
    return len(p.chosen.input_ids) + len(p.rejected.input_ids)


def pair_batches(cfg, prepared, model, reference: Optional[Reference], prefix_sharing: Optional[bool],
                 precompute: bool) -> Batches:
    """The pair methods' batches: dropout off (the policy starts equal to the reference), prefix-shared or
    two-sequence collation, padded / flat (--padding_free) / packed (--packing), and with --precompute_ref_log_probs
    the reference log-probs computed once and carried in the batches."""
    reference = reference or REFERENCE_FREE
    disable_dropout(model, reference.kind != "none")  # after the reference: its adapter brings dropout layers
    pad_id = prepared.tokenizer.pad_token_id
    train_rows, eval_rows = PairRows(prepared.train_rows), PairRows(prepared.eval_rows)
    if choose_prefix_sharing(prefix_sharing, cfg.data, model, train_rows, pad_id):
        collate, flat, packed, length = (SharedPairCollate(pad_id), SharedPairCollate(pad_id, flat=True),
                                         SharedPairCollate(pad_id, packed=True), shared_length)
    else:
        collate, flat, packed, length = (partial(pair_collate, pad_id=pad_id, padding_side=cfg.data.padding_side),
                                         partial(pair_collate, pad_id=pad_id, flat=True), PackedPairCollate(pad_id),
                                         _pair_length)
    if precompute and reference.kind != "none":
        bs = max(cfg.optim.per_device_train_batch_size, cfg.optim.per_device_eval_batch_size)
        from tunesmith.data.vision import with_pixels

        cached = precompute_reference(reference, model, [train_rows, eval_rows],
                                      with_pixels(collate, prepared.encoder.images), bs)
        reference.model = None  # free the full-training reference copy
        reference = cached
    train, evals, collate = batching(cfg.data, train_rows, eval_rows, collate, flat, packed, length,
                                     prepared.data_stats["max_length"])
    return Batches(train, evals, collate, reference)


def pair_header(method, prepared, batches: Batches) -> str:
    """The log header of a pair method: its loss, its reference, the pairs."""
    stats = prepared.data_stats
    return (f"[tunesmith] rlhf {method.name}: loss = {method.describe()}\n"
            f"[tunesmith] reference: {batches.reference.describe}\n"
            f"[tunesmith] {stats['train_rows']} training pairs, {stats['val_rows']} validation pairs")


def describe_nll(text: str, weight: float) -> str:
    """`text` followed by the NLL(chosen) term when its weight is not 0."""
    if not weight:
        return text
    return text + (f" + {weight:g}·NLL(chosen) [logged as nll_loss]" if weight != 1
                   else " + NLL(chosen) [logged as nll_loss]")


@dataclass
class PairTerms:
    """A pair method's per-pair quantities for a batch of B pairs (each [B]): the loss (nats, before averaging over
    pairs), the rewards as logged (detached), the log-probs logged as logps/chosen and logps/rejected (summed or
    per-token averaged, as the method uses them) and any extra summed statistics."""
    loss: Any
    reward_chosen: Any
    reward_rejected: Any
    shown_chosen: Any
    shown_rejected: Any
    extra: dict


_STAT_KEYS = ("rewards/chosen", "rewards/rejected", "correct", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected", "chosen_tokens", "rejected_tokens", "nll", "pref_loss")


def pair_loss(method, reference: Reference, optim, warned: list, model, batch: dict) -> tuple[dict, dict]:
    """({"pairs": summed per-pair loss, "tokens": weighted summed NLL over chosen tokens}, summed statistics) for
    one batch of [chosen_1..B, rejected_1..B]. The router loss (MoE) is weighted by the batch's pairs."""
    import torch

    n_pairs = batch["n_pairs"]
    ref = reference.logps(model, batch) if reference.kind != "none" else None
    out = sequence_logps(model, batch, ld_alpha=method.ld_alpha, n_pairs=n_pairs)
    c, r = out.logps[:n_pairs], out.logps[n_pairs:]
    n_c, n_r = out.n[:n_pairs].clamp(min=1), out.n[n_pairs:].clamp(min=1)
    ref = None if ref is None else ref.to(c.device, c.dtype)
    terms = method.pair_terms(c, r, n_c, n_r, ref)
    nll_sum = -out.token_logps[out.rows < n_pairs].sum()
    parts = {"pairs": terms.loss.sum()}
    if method.nll_weight:
        parts["tokens"] = method.nll_weight * nll_sum
    if method.aux_coef and out.aux_loss is not None:
        parts["pairs"] = parts["pairs"] + method.aux_coef * out.aux_loss.float() * n_pairs
    rc, rr = terms.reward_chosen, terms.reward_rejected
    vals = torch.stack([x.float() for x in (
        rc.sum(), rr.sum(), (rc > rr).sum(), (rc - rr).sum(), terms.shown_chosen.detach().sum(),
        terms.shown_rejected.detach().sum(), out.logits_sum[:n_pairs].sum(), out.logits_sum[n_pairs:].sum(),
        out.n[:n_pairs].sum(), out.n[n_pairs:].sum(), nll_sum.detach(), terms.loss.detach().sum())]).tolist()
    stats = {"pairs": n_pairs, **dict(zip(_STAT_KEYS, vals)), **terms.extra}  # one device sync for all of them
    if ref is not None and torch.is_grad_enabled():
        _check_reference_moves(out.logps.detach(), ref, reference, optim, warned)
    return parts, stats


def pair_metrics(nll_weight: float, st: dict) -> dict:
    """Means of the summed statistics: rewards/* and logps/* per pair, logits/* per token, rewards/accuracies,
    nll_loss per chosen token and pref_loss per pair (when an NLL term is mixed in), ORPO's log odds per pair."""
    pairs = max(st.get("pairs", 0), 1)
    m = {k: round(st.get(k, 0.0) / pairs, 6) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                      "logps/chosen", "logps/rejected")}
    m["rewards/accuracies"] = round(st.get("correct", 0.0) / pairs, 6)
    m["logits/chosen"] = round(st.get("logits/chosen", 0.0) / max(st.get("chosen_tokens", 0), 1), 6)
    m["logits/rejected"] = round(st.get("logits/rejected", 0.0) / max(st.get("rejected_tokens", 0), 1), 6)
    if nll_weight:
        m["nll_loss"] = round(st.get("nll", 0.0) / max(st.get("chosen_tokens", 0), 1), 6)
        m["pref_loss"] = round(st.get("pref_loss", 0.0) / pairs, 6)
    for k in ("log_odds_ratio", "log_odds_chosen"):
        if k in st:
            m[k] = round(st[k] / pairs, 6)
    return m


def _pair_units(batch: dict) -> dict:
    return {"pairs": batch["n_pairs"], "tokens": batch["n_tokens"]}


def pair_objective(method, reference: Reference, optim) -> loop.Objective:
    """The loop's Objective for a pair method (units: pairs for the pair loss, chosen tokens for the NLL)."""
    return loop.Objective(method.name, loss=partial(pair_loss, method, reference, optim, []), count=_pair_units,
                          metrics=partial(pair_metrics, method.nll_weight))


def _check_reference_moves(policy_logps, ref_logps, reference: Reference, optim, warned: list) -> None:
    """A reference that *is* the policy keeps the DPO loss at ln 2 for the whole run. After three optimiser steps
    the policy must have moved away from the reference on at least some sequence; say so once if it has not."""
    import torch

    reference.calls += 1
    steps_done = (reference.calls - 1) // max(optim.gradient_accumulation_steps, 1)
    if warned or steps_done < 3 or not torch.equal(policy_logps.to(ref_logps.dtype), ref_logps):
        return
    warned.append(True)
    note(f"warning: after {steps_done} optimiser steps the policy's log-probs still equal the reference's exactly "
         f"(reference: {reference.describe}). Either the reference is the policy itself, or the updates do not "
         f"change the model (learning rate {optim.learning_rate:g}, frozen weights, bf16 rounding). The loss cannot "
         f"move from ln 2 until they differ.")



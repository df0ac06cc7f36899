"""CHORD in GRPO (--chord_sft_dataset; Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts: Harmonizing
Supervised Fine-Tuning and Reinforcement Learning via Dynamic Weighting", arXiv:2508.11408), as ms-swift 4.6
(rlhf_trainers/utils.py compute_chord_loss, mu_schedule_function; grpo_trainer.py:858, 1223): each training
micro-batch's loss becomes (1 − μ)·L_GRPO + μ·L_SFT, L_SFT the token-mean cross-entropy of a batch of expert rows
drawn from --chord_sft_dataset (optionally weighted per token by φ = p(1 − p), CHORD-φ), μ following a warmup then
cosine-decay schedule over the optimiser steps.

What lives here: the flags (`ChordSpec`), μ's schedule, the SFT term, and the stream of expert batches
(`ChordStream`: a seeded shuffled order, reshuffled each pass, its position saved in checkpoints so a resumed run
draws what the uninterrupted one would). grpo.py adds the term (`chord_terms`)."""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

from tunesmith.config.checks import between

CHORD_UNIT = "chord_batches"  # the SFT term is averaged over the step's micro-batches, as ms-swift


@dataclass(frozen=True)
class ChordSpec:
    """CHORD's flags (ms-swift's names): the expert datasets, rows per SFT batch (--chord_sft_per_device_train_batch_size,
    default --per_device_train_batch_size), φ (--chord_enable_phi_function) and μ's schedule (--chord_mu_warmup_steps,
    --chord_mu_decay_steps, --chord_mu_peak, --chord_mu_valley; optimiser steps and weights in [0, 1])."""
    datasets: tuple
    batch_size: int
    phi: bool
    warmup_steps: int
    decay_steps: int
    peak: float
    valley: float

    @classmethod
    def from_args(cls, args, problems: list) -> Optional["ChordSpec"]:
        """None without --chord_sft_dataset; else the spec, each problem appended: μ's four flags are required (ms-swift
        reads them unchecked and fails on None), steps ≥ 0, weights in [0, 1], batch ≥ 1; one process only."""
        if not args.chord_sft_dataset:
            return None
        schedule = {"chord_mu_warmup_steps": args.chord_mu_warmup_steps,
                    "chord_mu_decay_steps": args.chord_mu_decay_steps, "chord_mu_peak": args.chord_mu_peak,
                    "chord_mu_valley": args.chord_mu_valley}
        missing = [f"--{k}" for k, v in schedule.items() if v is None]
        if missing:
            problems.append(f"--chord_sft_dataset needs μ's schedule: give {', '.join(missing)} (e.g. "
                            f"--chord_mu_warmup_steps 0 --chord_mu_decay_steps 200 --chord_mu_peak 0.9 "
                            f"--chord_mu_valley 0.05)")
            return None
        for k in ("chord_mu_warmup_steps", "chord_mu_decay_steps"):
            between(problems, k, schedule[k], 0, None)
        for k in ("chord_mu_peak", "chord_mu_valley"):
            between(problems, k, schedule[k], 0, 1)
        size = args.chord_sft_per_device_train_batch_size or args.per_device_train_batch_size
        between(problems, "chord_sft_per_device_train_batch_size", size, 1, None)
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            problems.append("--chord_sft_dataset under torchrun: CHORD's second forward pass per micro-batch is not "
                            "supported across processes yet; run one process")
        return cls(tuple(args.chord_sft_dataset), size, args.chord_enable_phi_function, args.chord_mu_warmup_steps,
                   args.chord_mu_decay_steps, args.chord_mu_peak, args.chord_mu_valley)


def mu_schedule(step: int, warmup_steps: int, decay_steps: int, peak: float, valley: float) -> float:
    """μ at optimiser step `step` (the steps done so far), as ms-swift's mu_schedule_function: a linear warmup
    step/warmup · peak, then a cosine decay valley + (peak − valley)·½(1 + cos(π (step − warmup)/decay)), then
    valley from step warmup + decay on."""
    if step < warmup_steps:
        return step / warmup_steps * peak
    if step >= warmup_steps + decay_steps:
        return valley
    return (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps)) + valley


def chord_sft_loss(model, batch: dict, phi: bool):
    """L_SFT (0-dim, nats): the mean over the batch's trained tokens (labels ≠ −100, shifted) of −log p(token), each
    multiplied by φ = p(1 − p) (p detached) with CHORD-φ, as ms-swift's compute_chord_loss (per_token_loss_func,
    then the sum over num_items_in_batch). batch: pad_collate's input_ids, attention_mask, labels [B, T]."""
    import torch

    from tunesmith.train.ops.token_logps import token_logps

    ce = -token_logps(model, batch).logps.float()
    if phi:
        p = torch.exp(-ce.detach())
        ce = ce * p * (1 - p)
    return ce.sum() / max(ce.numel(), 1)


class ChordStream:
    """The expert rows (Encoded, --chord_sft_dataset encoded with the policy's chat template) drawn batch by batch
    in a seeded order that is reshuffled each pass (ms-swift's RandomSampler over a cyclic loader), μ at the
    current optimiser step, and the loop's hooks (begin/after_step keep the step; save/load the draws made)."""
    FILE = "chord_sft.json"

    def __init__(self, spec: ChordSpec, rows: list, pad_id: int, padding_side: str, seed: int):
        self.spec, self.rows, self.pad_id, self.padding_side, self.seed = spec, rows, pad_id, padding_side, seed
        self.step, self.draws = 0, 0
        self._orders: dict = {}

    def begin(self, model, step: int) -> None:
        """The optimiser steps done when the run starts (a resumed run's)."""
        self.step = step

    def after_step(self, model, step: int) -> None:
        """The optimiser steps done: μ follows them."""
        self.step = step

    def save(self, path: str) -> None:
        """The batches drawn so far, into the checkpoint."""
        from tunesmith.files import write_json_atomic

        write_json_atomic(os.path.join(path, self.FILE), {"draws": self.draws})

    def load(self, path: str) -> None:
        """A checkpoint's draws (none in checkpoints of runs without CHORD: from the start)."""
        f = os.path.join(path, self.FILE)
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                self.draws = int(json.load(fh)["draws"])

    def mu(self) -> float:
        """μ now (`mu_schedule` at the steps done)."""
        s = self.spec
        return mu_schedule(self.step, s.warmup_steps, s.decay_steps, s.peak, s.valley)

    def next_batch(self) -> dict:
        """The next SFT batch (pad_collate's dict): rows i·b … (i + 1)·b − 1 of the endless sequence of passes, each
        pass a permutation seeded by (--seed, pass)."""
        from tunesmith.data.collate import pad_collate

        n, b = len(self.rows), self.spec.batch_size
        picks = []
        for i in range(self.draws * b, (self.draws + 1) * b):
            epoch, pos = divmod(i, n)
            if epoch not in self._orders:
                self._orders = {epoch: random.Random(f"{self.seed}/chord/{epoch}").sample(range(n), n)}
            picks.append(self.rows[self._orders[epoch][pos]])
        self.draws += 1
        return pad_collate(picks, self.pad_id, self.padding_side)


def chord_terms(stream: ChordStream, model, terms: dict, device) -> tuple[dict, dict]:
    """(the micro-batch's loss terms with CHORD, its metrics): every GRPO term × (1 − μ), and with μ > 0 the term
    μ·L_SFT (unit `CHORD_UNIT`: one per micro-batch) of the next expert batch; metrics chord/mu and chord/sft_loss
    (one value per micro-batch)."""
    from tunesmith.train.microbatches import to_device

    mu = stream.mu()
    out = {k: (1 - mu) * v for k, v in terms.items()}
    metrics = {"chord/mu": mu}
    if mu > 0:
        sft = chord_sft_loss(model, to_device(stream.next_batch(), device), stream.spec.phi)
        out[CHORD_UNIT] = mu * sft
        metrics["chord/sft_loss"] = float(sft.detach())
    return out, metrics


class WithChord:
    """A collate function whose batches also carry the CHORD stream (`batch["chord"]`): the loss draws the expert
    batch itself, in training only (model.training), as ms-swift's compute_loss."""

    def __init__(self, collate, stream: ChordStream):
        self.collate, self.stream = collate, stream

    def __call__(self, units: list) -> dict:
        """The GRPO batch of `units`, with the stream."""
        return {**self.collate(units), "chord": self.stream}


def chord_stream(spec: ChordSpec, collate, prepared, cfg, pad_id: int) -> tuple:
    """(the collate carrying the stream, the stream — a hook of the loop) of --chord_sft_dataset for this run.
    Raises ConfigError for a vision-language policy (its expert rows would need their pictures' pixels), DataError
    as `load_chord_rows`."""
    from tunesmith.errors import ConfigError

    if prepared.encoder.images is not None:
        raise ConfigError("--chord_sft_dataset with a vision-language model is not supported yet (the expert rows' "
                          "pictures are not fed); train CHORD on a text model, or drop --chord_sft_dataset")
    stream = ChordStream(spec, load_chord_rows(spec, prepared, cfg), pad_id, cfg.data.padding_side, cfg.optim.seed)
    return WithChord(collate, stream), stream


def with_chord(spec: Optional[ChordSpec], pad_id: int, collate, hooks: tuple, prepared, cfg) -> tuple:
    """(collate, hooks) of a GRPO run: as given without CHORD; with it, the collate carrying the expert stream and
    the stream added to the hooks (`chord_stream`)."""
    if spec is None:
        return collate, hooks
    collate, stream = chord_stream(spec, collate, prepared, cfg, pad_id)
    return collate, hooks + (stream,)


def load_chord_rows(spec: ChordSpec, prepared, cfg) -> list:
    """--chord_sft_dataset loaded (the --dataset rules: --columns, --strict, the hub flags) and encoded with the
    policy's chat template and --max_length as SFT rows. Raises DataError for a bad row under --strict true, or when
    no row is left."""
    from tunesmith.data.encode import NothingToTrain, TooLong
    from tunesmith.data.load import load_datasets
    from tunesmith.errors import DataError

    data = cfg.data
    loaded = load_datasets(list(spec.datasets), strict=data.strict, columns=data.columns, seed=data.data_seed,
                           use_hf=cfg.model.use_hf, hub_token=cfg.model.hub_token, what="--chord_sft_dataset")
    rows = []
    for rec in loaded.records:
        try:
            rows.append(prepared.encoder.encode(rec))
        except (TooLong, NothingToTrain, DataError) as e:  # under --strict false such a row is left out
            if data.strict:
                raise DataError(" ".join(spec.datasets), None, "messages", f"a row cannot be trained on ({e})",
                                "fix the row, or pass --strict false to leave such rows out") from e
    if not rows:
        raise DataError(" ".join(spec.datasets), None, "", "no row of --chord_sft_dataset can be trained on",
                        "check the rows (tunesmith data validate --dataset ...)")
    return rows

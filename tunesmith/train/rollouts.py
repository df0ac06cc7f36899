"""GRPO's training units, generated as the loop reads them: each generation round samples the completions of a few
prompts with the policy's current weights (through the generation engine, batched), scores them with the reward
functions, and turns the rewards into advantages (see train/grpo.py for the round's steps).

What lives here: the rounds (which prompts, the seeds, generation, scoring, advantages, the sampling policy's and
the reference's log-probs) and the completions log. What must not: the loss (losses.grpo_loss, grpo.py), the reward
functions themselves (tunesmith.rewards), token scheduling (tunesmith.engine).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterator, Optional

from tunesmith.data.encode import IGNORE
from tunesmith.errors import ConfigError, DataError
from tunesmith.log import note
from tunesmith.train import loop


@dataclass
class Unit:
    """One completion as training reads it: prompt and completion token ids, its advantage, and the per-token
    log-probs [C] of the sampling policy (old) and of the reference, when computed. `stats` feed the metrics."""
    prompt_ids: list
    completion_ids: list
    advantage: float
    trained: bool                       # False: left out of the loss (--overlong_filter on a truncated one)
    old_logps: Optional[list] = None
    ref_logps: Optional[list] = None
    stats: dict = field(default_factory=dict)


def grpo_collate(units: list[Unit], pad_id: int) -> dict:
    """Units → `input_ids`/`attention_mask` [B, P + C] (prompts left-padded to P, completions right-padded to C),
    `labels` (the completion tokens, IGNORE elsewhere), `completion_mask` [B, C], `advantages` [B], and
    `old_logps`/`ref_logps` [B, C] when the units carry them; `stats` summed over the units."""
    import torch

    p = max(len(u.prompt_ids) for u in units)
    c = max(max(len(u.completion_ids) for u in units), 1)
    ids = torch.full((len(units), p + c), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    cmask = torch.zeros(len(units), c)
    for i, u in enumerate(units):
        n, m = len(u.prompt_ids), len(u.completion_ids)
        ids[i, p - n:p] = torch.tensor(u.prompt_ids)
        ids[i, p:p + m] = torch.tensor(u.completion_ids, dtype=torch.long)
        att[i, p - n:p + m] = 1
        if u.trained:
            labels[i, p:p + m] = ids[i, p:p + m]
            cmask[i, :m] = 1
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "completion_mask": cmask,
             "advantages": torch.tensor([u.advantage for u in units]), "n_completions": len(units)}
    for key in ("old_logps", "ref_logps"):
        if units[0].__dict__[key] is not None:
            batch[key] = torch.zeros(len(units), c)
            for i, u in enumerate(units):
                batch[key][i, :len(u.completion_ids)] = torch.tensor(u.__dict__[key])
    stats: dict = {}
    for u in units:
        loop._add(stats, u.stats)
    batch["stats"] = stats
    return batch


def completion_logps(model, batch: dict, temperature: float = 1.0):
    """Per-token log-probs [B, C] (nats) of each completion token under `model` at the sampling temperature
    (log softmax(logits / T), as TRL and ms-swift); 0 where the completion mask is 0. Computed by
    train/token_logps.py without materialising the [tokens x vocabulary] logits."""
    import torch

    from tunesmith.train.token_logps import token_logps

    cmask = batch["completion_mask"]
    flat = token_logps(model, batch, temperature=temperature).logps
    out = torch.zeros(cmask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(cmask.bool(), flat)


def generation_batch_problem(per_step: int, steps: int, g: int) -> str:
    """The message for a generation batch that does not hold whole groups of G completions."""
    return (f"the generation batch ({per_step} completions per micro-batch x {steps} micro-batches per generation "
            f"= {per_step * steps}) must hold whole groups of --num_generations {g}; e.g. "
            f"--per_device_train_batch_size {g}, or --steps_per_generation / --generation_batch_size to match")


def _unique_names(fns: list) -> list:
    """The same reward named twice (e.g. with two weights) logs under name, name_2, … rather than one key."""
    import dataclasses

    seen: dict = {}
    out = []
    for fn in fns:
        seen[fn.name] = seen.get(fn.name, 0) + 1
        out.append(fn if seen[fn.name] == 1 else dataclasses.replace(fn, name=f"{fn.name}_{seen[fn.name]}"))
    return out


class Rollouts:
    """The completions of an epoch of prompts, round by round (a stream of `grpo.Unit`s for the loop).

    A round takes `prompts_per_round` = per-device batch x processes x steps_per_generation / G prompts of the
    epoch's seeded order (the last round of an epoch is filled from its start), generates G completions of each
    (split between the processes by prompt), and yields the round's `round_size` completions num_iterations times
    on every process (the loop gives each its slice of each global batch). Completion k of prompt j in round r is
    sampled with its own seed (from --seed, the epoch, r, j and k), so a round depends only on the weights it
    starts from."""

    def __init__(self, method, prompts, model, tokenizer, reference, cfg):
        from tunesmith.infer import ChatEngine
        from tunesmith.rewards import load_reward_functions
        from tunesmith.train.rm import reward_model_functions

        self.method, self.prompts, self.model, self.tok, self.reference = method, prompts, model, tokenizer, reference
        self.bs, gas = cfg.optim.per_device_train_batch_size, cfg.optim.gradient_accumulation_steps
        self.steps = method.steps_per_generation or gas
        global_batch = self.bs * cfg.world_size  # completions per micro-batch, all processes
        if (global_batch * self.steps) % method.num_generations:
            raise ConfigError(generation_batch_problem(global_batch, self.steps, method.num_generations))
        # the sampling policy's log-probs are needed when the weights move between generation and training
        self.need_old = method.num_iterations > 1 or self.steps > gas
        self.round_size = global_batch * self.steps
        self.prompts_per_round = self.round_size // method.num_generations
        rounds = math.ceil(len(prompts) / self.prompts_per_round)
        self.batches_per_epoch = rounds * self.steps * method.num_iterations
        self.reward_fns = _unique_names(load_reward_functions(list(method.reward_funcs), list(method.external_plugins),
                                                              method.reward_args, tokenizer)
                                        + reward_model_functions(list(method.reward_models)))
        self.max_steps, self.gas = cfg.optim.max_steps, gas
        self.chat = ChatEngine(model, tokenizer, system=cfg.data.system, max_batch_size=self.round_size,
                               max_model_len=cfg.data.max_length)
        self.seed = cfg.optim.seed
        self.log_path: Optional[str] = None
        self.rounds_done = 0
        self.said_flat = False  # the note on a round without any reward differences is given once

    def log_to(self, run_dir: str) -> None:
        """--log_completions: append every round's rollouts to run_dir/completions.jsonl."""
        if self.method.log_completions:
            self.log_path = os.path.join(run_dir, "completions.jsonl")

    def epoch(self, seed: int, shuffle: bool, skip_units: int = 0) -> Iterator:
        """The epoch's units in training order, after the first `skip_units` (a resumed run): whole rounds
        skipped are not generated."""
        order = list(range(len(self.prompts)))
        if shuffle:
            random.Random(seed).shuffle(order)
        per = self.prompts_per_round
        per_round_units = self.round_size * self.method.num_iterations
        for r in range(math.ceil(len(order) / per)):
            chunk = order[r * per:(r + 1) * per]
            chunk += order[:per - len(chunk)]  # the epoch's last round, filled from its start
            if skip_units >= per_round_units:  # trained before a resume: not generated again
                skip_units -= per_round_units
                self.rounds_done += 1
                continue
            if skip_units:
                note(f"resuming inside a generation round ({skip_units} of its {per_round_units} completions "
                     f"already trained): the round is generated again from the checkpoint's weights, so from here "
                     f"the run is not the uninterrupted one (with one round per step — the default "
                     f"--steps_per_generation and --num_iterations 1 — checkpoints fall between rounds and resume "
                     f"is exact)")
            units = self._round([self.prompts[i] for i in chunk], seed, r)
            for _ in range(self.method.num_iterations):
                for u in units[skip_units:]:
                    yield u
                skip_units = max(0, skip_units - len(units))

    # ------------------------------------------------------------------ one round

    def _round(self, prompts: list[dict], seed: int, r: int) -> list:
        """Generate, score and weigh one round's completions (see train/grpo.py). Under several processes each
        rank generates the groups of prompts j ≡ rank (mod processes), with the same per-completion seeds as one
        process would; the groups are then gathered in prompt order on every rank, and the advantages computed
        over the whole round, so every rank holds the same round (the loop gives each its slice of each batch)."""
        from tunesmith.train import distributed as D

        world, rank = D.world_size(), D.rank()
        mine = [j for j in range(len(prompts)) if j % world == rank]
        local = self._groups(prompts, mine, seed, r)
        groups = sorted((g for part in D.gather(local) for g in part), key=lambda g: g[0])
        units = [u for _, us, _, _ in groups for u in us]
        per_func = [row for _, _, rows, _ in groups for row in rows]
        advantages, combined = self._advantages(per_func)
        zero_std = self._zero_std(combined)
        if all(zero_std) and not self.said_flat:
            self.said_flat = True
            note("GRPO: in this round every group's completions got the same reward, so every advantage is 0 and "
                 "nothing is learned from it; if this persists (frac_reward_zero_std 1.0), the reward functions "
                 "cannot tell the completions apart — check them on a few completions (--log_completions true)")
        g = self.method.num_generations
        for i, u in enumerate(units):
            u.advantage = float(advantages[i])
            u.stats.update({"reward": combined[i], "reward_sq": combined[i] ** 2, "zero_std": float(zero_std[i // g])})
        # per-round extremes ride on the round's first unit; the metrics average them over the rounds logged
        lengths = [len(u.completion_ids) for u in units]
        units[0].stats.update({"rounds": 1, "round_min_length": min(lengths), "round_max_length": max(lengths)})
        if D.is_main():
            self._log(prompts, [t for _, _, _, texts in groups for t in texts], per_func, combined, advantages)
        self.rounds_done += 1
        return units

    def _groups(self, prompts: list[dict], which: list[int], seed: int, r: int) -> list:
        """[(j, the G units of prompt j, their rewards [G][F], their texts)] for the prompts `which` of the round:
        generated, scored, with the log-probs the loss needs (advantages are set once the whole round is known)."""
        if not which:  # more processes than prompts in a round: this one only takes part in the gather
            return []
        m = self.method
        ids = {j: self._prompt_ids(prompts[j]) for j in which}
        completions = self._generate(ids, seed, r)
        texts = [self.tok.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        owners = [j for j in which for _ in range(m.num_generations)]
        per_func = self._score([prompts[j] for j in which], texts, completions)
        units = []
        for i, c in enumerate(completions):
            truncated = c.finish_reason == "length"
            stats = {"n": 1, "length": len(c.token_ids), "clipped": float(truncated)}
            for f, fn in enumerate(self.reward_fns):
                v = per_func[i][f]
                if not math.isnan(v):
                    stats[f"rewards/{fn.name}/sum"] = v
                    stats[f"rewards/{fn.name}/sq"] = v * v
                    stats[f"rewards/{fn.name}/count"] = 1
            units.append(Unit(ids[owners[i]], list(c.token_ids), 0.0, not (m.overlong_filter and truncated),
                              stats=stats))
        self._add_logps(units)
        g = m.num_generations
        return [(j, units[k * g:(k + 1) * g], per_func[k * g:(k + 1) * g], texts[k * g:(k + 1) * g])
                for k, j in enumerate(which)]

    def _prompt_ids(self, rec: dict) -> list:
        from tunesmith.infer import PromptTooLong

        try:
            return self.chat.prompt(rec["messages"], rec.get("tools")).ids
        except PromptTooLong as e:
            raise DataError("--dataset", None, "messages", f"a prompt is too long to complete: {e}",
                            "raise --max_length, or shorten the prompt") from None

    def _generate(self, ids: dict, seed: int, r: int) -> list:
        """G completions of each prompt ({j: token ids}, j its place in the round), all submitted at once (the
        engine batches them), each with its own seed: the same completions whichever process generates them."""
        from tunesmith.infer import GenConfig

        m, g = self.method, self.method.num_generations
        handles = []
        for j, prompt in ids.items():
            base = (seed * 1_000_003 + r * 65_537 + j * g) % (2 ** 31)
            cfg = GenConfig(max_new_tokens=m.max_completion_length, temperature=m.temperature, top_p=m.top_p,
                            top_k=m.top_k, repetition_penalty=m.repetition_penalty, seed=base)
            handles += [self.chat.engine.submit(prompt, self.chat.sampling(cfg, k)) for k in range(g)]
        out = [h.result() for h in handles]
        for c in out:
            if c.error is not None:
                raise c.error
        return out

    def _score(self, prompts: list[dict], texts: list[str], completions: list) -> list:
        """The rewards [N][F] (NaN for None) of these prompts' completions (G per prompt, in order)."""
        from tunesmith.rewards import score

        m, g = self.method, self.method.num_generations
        rep = [p for p in prompts for _ in range(g)]
        names = sorted({k for p in rep for k in p.get("columns", {})})
        columns = {k: [p.get("columns", {}).get(k) for p in rep] for k in names}
        if any(p.get("tools") for p in rep):
            columns.setdefault("tools", [p.get("tools") for p in rep])
        messages = [p["messages"] + [{"role": "assistant", "content": t}] for p, t in zip(rep, texts)]
        # what ms-swift hands rewards as trainer_state (transformers' TrainerState): attributes, optimiser steps
        state = SimpleNamespace(global_step=self.rounds_done * self.steps * m.num_iterations // self.gas,
                                max_steps=self.max_steps, rounds_done=self.rounds_done)
        per_func, errors = score(self.reward_fns, texts, prompts=[p["messages"] for p in rep], columns=columns,
                                 messages=messages, trainer_state=state, weights=list(m.reward_weights),
                                 completion_ids=[list(c.token_ids) for c in completions])
        if errors and self.rounds_done == 0:
            note(f"GRPO: {errors[0]} (and {len(errors) - 1} more this round)" if len(errors) > 1 else errors[0])
        return per_func

    def _advantages(self, per_func: list) -> tuple[list[float], list[float]]:
        """(the round's advantages [N], its combined rewards [N]) from its rewards [N][F]
        (losses.combine_rewards, then group_advantages — or gdpo_advantages)."""
        import torch

        from tunesmith.train import losses as L

        m, g = self.method, self.method.num_generations
        rewards = torch.tensor(per_func, dtype=torch.float64)
        combined = L.combine_rewards(rewards, list(m.reward_weights))
        if m.scale_rewards == "gdpo":
            return L.gdpo_advantages(rewards, list(m.reward_weights), g).tolist(), combined.tolist()
        return L.group_advantages(combined, g, m.advantage_estimator, m.scale_rewards).tolist(), combined.tolist()

    def _zero_std(self, combined: list[float]) -> list[bool]:
        g = self.method.num_generations
        return [max(combined[i:i + g]) - min(combined[i:i + g]) < 1e-12 for i in range(0, len(combined), g)]

    def _add_logps(self, units: list) -> None:
        """The sampling policy's per-token log-probs (when the policy moves before these completions are trained
        on) and the reference's (β > 0), in micro-batches, without gradient."""
        import torch

        m = self.method
        need_old = self.need_old
        need_ref = self.reference is not None and m.beta != 0
        if not (need_old or need_ref):
            return
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for s in range(0, len(units), self.bs):
                part = units[s:s + self.bs]
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in grpo_collate(part, pad).items()}
                t = m.temperature
                old = completion_logps(self.model, batch, t).float().cpu() if need_old else None
                ref = self.reference.token_logps(self.model, batch, lambda mod, b: completion_logps(mod, b, t))\
                    .float().cpu() if need_ref else None
                for i, u in enumerate(part):
                    n = len(u.completion_ids)
                    if old is not None:
                        u.old_logps = old[i, :n].tolist()
                    if ref is not None:
                        u.ref_logps = ref[i, :n].tolist()

    def _log(self, prompts, texts, per_func, combined, advantages) -> None:
        if self.log_path is None:
            return
        g = self.method.num_generations
        names = [fn.name for fn in self.reward_fns]
        with open(self.log_path, "a", encoding="utf-8") as fh:
            for i, text in enumerate(texts):
                fh.write(json.dumps({"round": self.rounds_done, "prompt": prompts[i // g]["messages"],
                                     "completion": text,
                                     "rewards": {n: (None if math.isnan(v) else v) for n, v in zip(names, per_func[i])},
                                     "reward": combined[i], "advantage": advantages[i]}, ensure_ascii=False) + "\n")

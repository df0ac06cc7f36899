"""PPO's training units, generated as the loop reads them: each round samples one completion of each of its
prompts with the policy's current weights (through the generation engine, each completion with its own seed),
scores them (reward model and/or reward functions), and turns the scores into per-token advantages with the value
model (GAE), to be trained on --num_ppo_epochs times (see train/methods/ppo.py for the whole step).

What lives here: the rounds (which prompts, the seeds, generation, scoring, the no-gradient forward passes for the
sampling policy's log-probs, the reference's and the values, then rewards, GAE and whitening: ops/gae.py), the
round in progress in the checkpoints, and the completions log. What must not: the loss (ppo.py), the value model
(ppo_value.py), the reward functions (rewards.py, scoring.py).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Iterator, Optional

from tunesmith.log import note
from tunesmith.train.interrupts import raise_sampling_errors
from tunesmith.train.rl.units import read_round, save_round, saved_units


@dataclass
class PPOUnit:
    """One completion as training reads it: prompt and completion token ids and, per completion token [C], the
    sampling policy's log-probs (nats), the value model's values, the (whitened) advantages and the returns (the
    value targets). `stats` feed the metrics."""
    prompt_ids: list
    completion_ids: list
    logps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    advantages: list = field(default_factory=list)
    returns: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def ppo_collate(units: list, pad_id: int) -> dict:
    """Units → GRPO's layout (`units.grpo_collate`: input_ids/attention_mask [B, P + C], prompts left-padded,
    completions right-padded, completion_mask [B, C], `stats` summed) plus `old_logps`, `values`, `advantages`,
    `returns` [B, C] (0 on the padding) where the units carry them."""
    import torch

    from tunesmith.train.rl.units import Unit, grpo_collate

    batch = grpo_collate([Unit(u.prompt_ids, u.completion_ids, 0.0, True, stats=u.stats) for u in units], pad_id)
    c = batch["completion_mask"].shape[1]
    for key, name in (("logps", "old_logps"), ("values", "values"), ("advantages", "advantages"),
                      ("returns", "returns")):
        if units[0].__dict__[key]:
            t = torch.zeros(len(units), c)
            for i, u in enumerate(units):
                t[i, :len(u.completion_ids)] = torch.tensor(u.__dict__[key], dtype=torch.float32)
            batch[name] = t
        else:
            batch.pop(name, None)
    return batch


def _padded(rows: list, width: int):
    """Lists of floats → a [N, width] float32 tensor, right-padded with 0."""
    import torch

    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32)
    return out


class PPORollouts:
    """The completions of an epoch of prompts, round by round (a stream of `PPOUnit`s for the loop).

    A round takes `round_size` = per-device batch × gradient_accumulation_steps × --num_mini_batches prompts of
    the epoch's seeded order (cycled when the dataset is smaller), samples one completion of each, and yields the
    round --num_ppo_epochs times, each pass in its own seeded order: the loop's optimiser steps each take
    per-device batch × gradient_accumulation_steps of them, so a pass is --num_mini_batches steps. The completion of
    prompt j in round r has its own seed (from --seed, the epoch, r and j), so a round depends only on the weights it
    starts from; the round in progress is saved with each checkpoint, so a resume inside it trains on it exactly."""

    ROUND_FILE = "ppo_round.json"

    def __init__(self, method, prompts: list, model, tokenizer, reference, value, cfg):
        from tunesmith.inference.chat import ChatEngine
        from tunesmith.train.methods.rm import reward_model_functions
        from tunesmith.train.rl.rewards import load_reward_functions
        from tunesmith.train.rl.units import _unique_names, fit_prompts, refuse_pictures

        self.method, self.model, self.tok, self.reference, self.value = method, model, tokenizer, reference, value
        self.bs = cfg.optim.per_device_train_batch_size
        self.round_size = self.bs * cfg.optim.gradient_accumulation_steps * method.num_mini_batches
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        max_prompt = cfg.data.max_length  # the prompt's limit, as GRPO; the completion gets its own on top
        self.chat = ChatEngine(model, tokenizer, system=cfg.data.system,
                               max_batch_size=min(self.round_size, method.local_rollout_forward_batch_size),
                               max_model_len=max_prompt + method.max_completion_length if max_prompt else None)
        refuse_pictures(prompts, "--dataset")
        self.fit = partial(fit_prompts, self.chat, max_prompt=max_prompt, truncation=cfg.data.truncation_strategy)
        self.prompts = self.fit(prompts, what="--dataset")
        rounds = math.ceil(len(self.prompts) / self.round_size)
        self.batches_per_epoch = rounds * (self.round_size // self.bs) * method.num_ppo_epochs
        self.reward_fns = _unique_names(load_reward_functions(list(method.reward_funcs), list(method.external_plugins),
                                                              method.reward_args, tokenizer)
                                        + reward_model_functions(list(method.reward_models), plugins=False))
        self.seed, self.max_steps = cfg.optim.seed, cfg.optim.max_steps
        self.rounds_done, self.log_path = 0, None
        self.current: Optional[tuple] = None      # (epoch seed, round, its units): the round being trained
        self.saved_round: Optional[dict] = None   # a checkpoint's round in progress, until its epoch reaches it

    # ------------------------------------------------------------------ the stream the loop reads

    def epoch(self, seed: int, shuffle: bool, skip_units: int = 0) -> Iterator:
        """The epoch's units in training order, after the first `skip_units` (a resumed run): whole rounds
        skipped are not generated; a round resumed inside comes from the checkpoint."""
        order = list(range(len(self.prompts)))
        if shuffle:
            random.Random(seed).shuffle(order)
        per, passes = self.round_size, self.method.num_ppo_epochs
        for r in range(math.ceil(len(order) / per)):
            chunk = [order[(r * per + i) % len(order)] for i in range(per)]
            if skip_units >= per * passes:  # trained before a resume: not generated again
                skip_units -= per * passes
                self.rounds_done += 1
                continue
            units = self._resumed_round(seed, r) if skip_units else None
            if units is None:
                if skip_units:
                    note(f"resuming inside a PPO round ({skip_units} of its {per * passes} units already trained) "
                         f"from a checkpoint that does not hold the round: it is generated again from the "
                         f"checkpoint's weights, so from here the run is not the uninterrupted one")
                units = self._round([self.prompts[i] for i in chunk], seed, r)
            else:
                self.rounds_done += 1
            self.current = (seed, r, units)
            for e in range(passes):  # each pass over the round in its own order (TRL: a fresh permutation)
                perm = list(range(len(units)))
                random.Random(f"{seed}/{r}/{e}").shuffle(perm)
                for i in perm[skip_units:]:
                    yield units[i]
                skip_units = max(0, skip_units - len(units))

    def evaluation_units(self, prompts: list) -> list:
        """Validation: one completion of every validation prompt with the policy's weights now (the same seeds at
        every evaluation), scored and with its advantages, trained on nothing."""
        units, per = [], self.round_size
        for r in range(math.ceil(len(prompts) / per)):
            units += self._round(prompts[r * per:(r + 1) * per], self.seed + 7_919, r, training=False)
        return units

    # ------------------------------------------------------------------ checkpoints (loop.Objective.hooks)

    def begin(self, model, step: int) -> None:
        """Nothing to set up (rounds start when the loop reads them)."""

    def after_step(self, model, step: int) -> None:
        """Nothing moves between steps (rounds start when the loop reads them)."""

    def save(self, path: str) -> None:
        """The round being trained (its completions, log-probs, values, advantages and returns, computed from the
        weights it started with) goes into the checkpoint: a resume inside it trains on exactly these."""
        save_round(path, self.ROUND_FILE, self.current)

    def load(self, path: str) -> None:
        """Keep the checkpoint's round in progress until its epoch reaches it."""
        self.saved_round = read_round(path, self.ROUND_FILE)

    def _resumed_round(self, seed: int, r: int) -> Optional[list]:
        saved, self.saved_round = self.saved_round, None
        return saved_units(saved, seed, r, PPOUnit)

    def log_to(self, run_dir: str, trackers=None) -> None:
        """--log_completions: append every round's rollouts to run_dir/completions.jsonl (PPO logs no W&B table:
        ms-swift's PPO, TRL's PPOTrainer, logs one only for --num_sample_generations, which changes nothing here,
        so `trackers` is not used)."""
        if self.method.log_completions:
            self.log_path = os.path.join(run_dir, "completions.jsonl")

    # ------------------------------------------------------------------ one round

    def _round(self, prompts: list, seed: int, r: int, training: bool = True) -> list:
        """Sample, score and weigh one round's completions: the scores [N] (combined rewards, minus
        --missing_eos_penalty for a completion cut at the length limit), then `_advantages`."""
        import torch

        from tunesmith.train.ops.losses import combine_rewards

        m = self.method
        done = self._generate([p["prompt_ids"] for p in prompts], seed, r)
        texts = [self.tok.decode(c.token_ids, skip_special_tokens=True) for c in done]
        per_func = self._score(prompts, texts, done)
        scores = combine_rewards(torch.tensor(per_func, dtype=torch.float64), list(m.reward_weights)).float()
        truncated = torch.tensor([c.finish_reason == "length" for c in done])
        if m.missing_eos_penalty is not None:
            scores = scores - m.missing_eos_penalty * truncated.float()
        units = [PPOUnit(p["prompt_ids"], list(c.token_ids)) for p, c in zip(prompts, done)]
        self._advantages(units, scores)
        for i, u in enumerate(units):
            u.stats.update({"n": 1, "score": float(scores[i]), "length": len(u.completion_ids),
                            "clipped": float(truncated[i])})
            for f, fn in enumerate(self.reward_fns):
                if not math.isnan(per_func[i][f]):
                    u.stats.update({f"rewards/{fn.name}/sum": per_func[i][f], f"rewards/{fn.name}/count": 1})
        if training:
            self._log(prompts, texts, per_func, units)
            self.rounds_done += 1
        return units

    def _advantages(self, units: list, scores) -> None:
        """Fill each unit's log-probs, values, advantages and returns: per-token rewards (−kl_coef · KL to the
        reference, the score at the last token; whitened with --whiten_rewards), GAE with --gamma and --lam, the
        advantages whitened over the round's tokens (TRL's order); KL and entropy statistics per completion."""
        from tunesmith.train.ops import gae as G

        m = self.method
        logps, ref, values = self._forwards(units)
        width = max(len(u.completion_ids) for u in units)
        mask = _padded([[1.0] * len(u.completion_ids) for u in units], width)
        logps, values = _padded(logps, width), _padded(values, width)
        kl = G.kl_per_token(logps, _padded(ref, width), mask, m.kl_estimator) if ref else logps * 0
        rewards = G.token_rewards(kl, scores, mask, m.kl_coef)
        if m.whiten_rewards:
            rewards = G.masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = G.gae(rewards, values, mask, m.gamma, m.lam)
        advantages = G.masked_whiten(advantages, mask) * mask
        for i, u in enumerate(units):
            n = len(u.completion_ids)
            u.logps, u.values = logps[i, :n].tolist(), values[i, :n].tolist()
            u.advantages, u.returns = advantages[i, :n].tolist(), returns[i, :n].tolist()
            u.stats.update({"kl": float(kl[i].sum()), "non_score_reward": float(-m.kl_coef * kl[i].sum()),
                            "entropy": float(-logps[i].sum())})

    def _forwards(self, units: list) -> tuple:
        """(sampling policy's log-probs, reference's log-probs or None when kl_coef is 0, values), each a list of
        per-token lists, from forward passes without gradient over --local_rollout_forward_batch_size completions
        at a time (log-probs at --temperature, as TRL)."""
        import torch

        from tunesmith.train.microbatches import to_device
        from tunesmith.train.rl.units import completion_logps

        m, t = self.method, self.method.temperature
        device = next(self.model.parameters()).device
        logps, ref, values = [], [], []
        with torch.no_grad():
            for s in range(0, len(units), m.local_rollout_forward_batch_size):
                part = units[s:s + m.local_rollout_forward_batch_size]
                batch = to_device(ppo_collate(part, self.pad), device)
                parts = [completion_logps(self.model, batch, t).float(), self.value.values(batch)]
                if self.reference is not None:
                    parts.append(self.reference.token_logps(self.model, batch,
                                                            lambda mod, b: completion_logps(mod, b, t)).float())
                for i, u in enumerate(part):
                    n = len(u.completion_ids)
                    logps.append(parts[0][i, :n].tolist())
                    values.append(parts[1][i, :n].tolist())
                    if len(parts) > 2:
                        ref.append(parts[2][i, :n].tolist())
        return logps, ref, values

    def _generate(self, prompts: list, seed: int, r: int) -> list:
        """One completion of each prompt (token ids), all submitted at once, prompt j with seed (seed, r, j); the
        policy in eval mode meanwhile. Sampling as TRL's PPOTrainer: --temperature, no top-k/top-p cut, no
        repetition penalty, at most --max_completion_length tokens."""
        from tunesmith.inference.chat import GenConfig

        m = self.method
        training = self.model.training
        if training:
            self.model.eval()
        try:
            handles = []
            for j, ids in enumerate(prompts):
                base = (seed * 1_000_003 + r * 65_537 + j) % (2 ** 31)
                gen = GenConfig(max_new_tokens=m.max_completion_length, temperature=m.temperature, top_p=1.0,
                                top_k=0, repetition_penalty=1.0, seed=base)
                handles.append(self.chat.engine.submit(ids, self.chat.sampling(gen, 0)))
            done = [h.result() for h in handles]
        finally:
            if training:
                self.model.train()
        raise_sampling_errors(done, "policy")
        return done

    def _score(self, prompts: list, texts: list, done: list) -> list:
        """The rewards [N][F] (NaN for None) of the completions, every reward function and model called with
        ms-swift's and TRL's keyword arguments (scoring.score), as GRPO calls them."""
        from tunesmith.train.rl.scoring import score

        names = sorted({k for p in prompts for k in p.get("columns", {})})
        columns = {k: [p.get("columns", {}).get(k) for p in prompts] for k in names}
        if any(p.get("tools") for p in prompts):
            columns.setdefault("tools", [p.get("tools") for p in prompts])
        messages = [p["messages"] + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        state = SimpleNamespace(global_step=self.rounds_done * self.method.num_ppo_epochs
                                * self.method.num_mini_batches, max_steps=self.max_steps, rounds_done=self.rounds_done)
        per_func, errors = score(self.reward_fns, texts, prompts=[p["messages"] for p in prompts], columns=columns,
                                 messages=messages, trainer_state=state, weights=list(self.method.reward_weights),
                                 completion_ids=[list(c.token_ids) for c in done])
        if errors and self.rounds_done == 0:
            note(f"PPO: {errors[0]}" + (f" (and {len(errors) - 1} more this round)" if len(errors) > 1 else ""))
        return per_func

    def _log(self, prompts: list, texts: list, per_func: list, units: list) -> None:
        from tunesmith.train import distributed as D

        if self.log_path is None or not D.is_main():
            return
        names = [fn.name for fn in self.reward_fns]
        with open(self.log_path, "a", encoding="utf-8") as fh:
            for p, text, row, u in zip(prompts, texts, per_func, units):
                fh.write(json.dumps({"round": self.rounds_done, "prompt": p["messages"], "completion": text,
                                     "rewards": {n: (None if math.isnan(v) else v) for n, v in zip(names, row)},
                                     "reward": u.stats["score"],
                                     "advantage": sum(u.advantages) / max(len(u.advantages), 1)},
                                    ensure_ascii=False) + "\n")


class PPOValidation:
    """The validation prompts as the loop's eval rows: `fresh()` samples and scores their completions anew at each
    evaluation; len() is the number of completions."""

    def __init__(self, rollouts: PPORollouts, prompts: list):
        from tunesmith.train.rl.units import refuse_pictures

        refuse_pictures(prompts, "validation prompts")
        self.rollouts, self.prompts = rollouts, rollouts.fit(prompts, what="validation prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def fresh(self) -> list:
        """This evaluation's units, in prompt order."""
        return self.rollouts.evaluation_units(self.prompts)

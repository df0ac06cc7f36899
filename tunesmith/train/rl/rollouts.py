"""GRPO's training units, generated as the loop reads them: each generation round samples the completions of a few
prompts with the policy's current weights (through the generation engine, batched), scores them with the reward
functions, and turns the rewards into advantages (see train/rl/grpo.py for the round's steps).

What lives here: the rounds (which prompts, the seeds, generation, scoring, advantages, the sampling policy's and
the reference's log-probs) and the completions log. What must not: the loss (losses.grpo_loss, grpo.py), the reward
functions themselves (tunesmith.train.rl.rewards), token scheduling (tunesmith.inference.engine).
"""
from __future__ import annotations

import json
import math
import os
import random
from functools import partial
from types import SimpleNamespace
from typing import Iterator, Optional

from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.train.interrupts import raise_sampling_errors
from tunesmith.train.rl.units import (Unit, _completion_seed, _unique_names, completion_logps, epoch_order,
                                     fit_prompts, generation_batch_problem, grpo_collate, read_round, refuse_pictures,
                                     round_chunk, save_round, saved_units)
from tunesmith.train.rl.ahead import Ahead, round_request
from tunesmith.train.rl.teacher_server import ServerTeacher, prompt_tag
from tunesmith.train.rl.variants import opsd_problems, teacher_signal
from tunesmith.train.rl.vllm_sync import VllmSync, processed_logprobs_config


class Rollouts:
    """The completions of an epoch of prompts, round by round (a stream of `grpo.Unit`s for the loop).

    A round takes `prompts_per_round` = per-device batch x processes x steps_per_generation / G prompts of the
    epoch's seeded order (the last round of an epoch is filled from its start), generates G completions of each
    (split between the processes by prompt), and yields the round's `round_size` completions num_iterations times
    on every process (the loop gives each its slice of each global batch). Completion k of prompt j in round r is
    sampled with its own seed (from --seed, the epoch, r, j and k), so a round depends only on the weights it
    starts from."""

    def __init__(self, method, prompts, model, tokenizer, reference, cfg, model_dir: Optional[str] = None,
                 images=None, teacher=None):
        from tunesmith.train.rl.rewards import load_reward_functions
        from tunesmith.train.methods.rm import reward_model_functions

        self.method, self.prompts, self.model, self.tok, self.reference = method, prompts, model, tokenizer, reference
        self.teacher = teacher  # OPD-RL's (reference.setup_teacher), else None
        # OPSD (ms-swift's rule): rows with a teacher_prompt column get a teacher view — the policy itself on that
        # prompt when there is no --teacher_model (dynamic self-distillation)
        self.opsd = any((p.get("columns") or {}).get("teacher_prompt") for p in prompts)
        if self.opsd:
            opsd_problems(method)
        self.images = images  # a vision-language policy's ImageTokens (tunesmith.data.vision), else None
        if images is not None and method.use_vllm:
            raise ConfigError("--use_vllm with a vision-language model: pictures through vLLM rollouts are not "
                              "supported yet; leave --use_vllm false (tunesmith's engine samples with the pictures)")
        self.bs, gas = cfg.optim.per_device_train_batch_size, cfg.optim.gradient_accumulation_steps
        self.steps = method.steps_per_generation or gas
        global_batch = self.bs * cfg.world_size  # completions per micro-batch, all processes
        if (global_batch * self.steps) % method.num_generations:
            raise ConfigError(generation_batch_problem(global_batch, self.steps, method.num_generations))
        # the sampling policy's log-probs are needed when the weights move between generation and training
        self.need_old = method.num_iterations > 1 or self.steps > gas
        self.round_size = global_batch * self.steps
        self.prompts_per_round = self.round_size // method.num_generations
        # --max_length bounds the prompt (ms-swift's GRPO); the completion gets --max_completion_length on top
        self.max_prompt, self.truncation = cfg.data.max_length, cfg.data.truncation_strategy
        # multi-turn rounds of --max_completion_length each (per_round) may outgrow it: the model's context then
        per_round = method.multi_turn_scheduler is not None and method.completion_length_limit_scope == "per_round"
        self.context = self.max_prompt + method.max_completion_length if self.max_prompt and not per_round else None
        self.remote = self._remote(method, model, model_dir)  # --vllm_mode server
        # --async_generate: the round after this one is requested while this one trains (train/rl/ahead.py)
        self.ahead = Ahead(self.remote, bool(method.variants and method.variants.rollout_is_mode)) \
            if method.async_generate and self.remote is not None else None
        self.vllm = VllmSync(model, cfg, model_dir) if method.use_vllm and self.remote is None else None
        if self.vllm is not None and method.variants is not None and method.variants.wants_rollout_logps:
            self.vllm.engine_cfg = processed_logprobs_config(self.vllm.engine_cfg)
        self.group = method.num_generations  # G of the round being generated (validation: eval_generations)
        self.chat = self._chat(cfg)
        if images is None:
            refuse_pictures(prompts, "--dataset")
        self.prompts = prompts = self.fitted(prompts, "--dataset")
        rounds = math.ceil(len(prompts) / self.prompts_per_round)
        self.batches_per_epoch = rounds * self.steps * method.num_iterations
        self.reward_fns = _unique_names(load_reward_functions(list(method.reward_funcs), list(method.external_plugins),
                                                              method.reward_args, tokenizer)
                                        + reward_model_functions(list(method.reward_models),
                                                                 pictures=images is not None)
                                        + self._gym_reward())
        self.multi_turn = None  # multi_turn.MultiTurn when --multi_turn_scheduler names a scheduler
        if method.multi_turn_scheduler is not None:
            from tunesmith.train.rl.multi_turn import MultiTurn
            from tunesmith.train.rl.schedulers import load_scheduler

            self.multi_turn = MultiTurn(load_scheduler(method.multi_turn_scheduler, list(method.external_plugins),
                                                       method.max_turns, tokenizer, method.gym_env),
                                        self.chat, method.multi_turn_scheduler, method.max_turns,
                                        method.completion_length_limit_scope, method.max_completion_length)
        self.max_steps, self.gas = cfg.optim.max_steps, gas
        self.seed = cfg.optim.seed
        self.log_path: Optional[str] = None
        self.trackers = None  # the run's trackers with --log_completions (the W&B table), else None
        self.rounds_done = 0
        self.said_flat = False  # the note on a round without any reward differences is given once
        self.said_resample = False  # and the one on a round --dynamic_sample could not fill
        self.said_truncated = False  # and the one on a round --overlong_filter leaves empty
        self.said_empty: set = set()  # reward functions that gave no value for a whole round (said once each)
        self.training, self.weights, self.evaluations = True, ("round", 0), 0
        self.current: Optional[tuple] = None      # (epoch seed, round, its units): the round being trained
        self.saved_round: Optional[dict] = None   # a checkpoint's round in progress, until its epoch reaches it

    @staticmethod
    def _remote(method, model, model_dir: Optional[str]):
        """The rollout server of --vllm_mode server (tunesmith.train.rl.rollout_client), connected and checked, or
        None. Raises ConfigError when none answers within --vllm_server_timeout, or when it is a vLLM server."""
        if method.server is None:
            return None
        from tunesmith.train.rl.rollout_client import RolloutServer

        server = RolloutServer(method.server, model, model_dir)
        info = server.connect()
        what = "LoRA adapter is" if isinstance(getattr(model, "peft_config", None), dict) else "trainable weights are"
        note(f"GRPO rollouts from the rollout server at {method.server.base_url} (model {info.get('model')}); the "
             f"policy's {what} pushed to it over HTTP whenever they changed")
        return server

    def _gym_reward(self) -> list:
        """[--use_gym_env's gym_reward] (schedulers.gym_reward), or []."""
        if not self.method.use_gym_env:
            return []
        from tunesmith.train.rl.schedulers import gym_reward

        return [gym_reward()]

    def _chat(self, cfg):
        """The chat engine the rounds generate with: tunesmith's own over the policy, or vLLM (--use_vllm)."""
        from tunesmith.inference.chat import ChatEngine

        if self.vllm is None:
            return ChatEngine(self.model, self.tok, system=cfg.data.system, max_batch_size=self.round_size,
                              max_model_len=self.context, images=self.images)
        return self.vllm.chat(self.tok, cfg, self.context)

    def fitted(self, prompts: list[dict], what: str) -> list[dict]:
        """The prompts with their token ids, fitted to --max_length (`fit_prompts`), and with their teacher view
        when they have a teacher_prompt column (`_teacher_view`)."""
        return [{**rec, **self._teacher_view(rec)}
                for rec in fit_prompts(self.chat, prompts, self.max_prompt, self.truncation, what)]

    # ------------------------------------------------------------------ checkpoints (loop.Objective.hooks)

    ROUND_FILE = "grpo_round.json"  # the round in progress: a checkpoint inside it resumes it exactly

    def begin(self, model, step: int) -> None:
        """Nothing to set up before the first step (rounds start when the loop reads them)."""

    def after_step(self, model, step: int) -> None:
        """Nothing moves here between steps (rounds start when the loop reads them)."""

    def save(self, path: str) -> None:
        """The round being trained (its completions, advantages and log-probs, computed from the weights it
        started with) goes into the checkpoint: with several steps per round (--steps_per_generation,
        --num_iterations) a resume inside it trains on exactly these, not on a round sampled again."""
        save_round(path, self.ROUND_FILE, self.current)
        if self.ahead is not None:  # --async_generate: the next round's request and its answer
            self.ahead.save(path)

    def load(self, path: str) -> None:
        """Keep the checkpoint's round in progress for `epoch` (absent in checkpoints of older runs: then the
        round is sampled again, with a note)."""
        self.saved_round = read_round(path, self.ROUND_FILE)
        if self.ahead is not None:
            self.ahead.load(path)

    def _resumed_round(self, seed: int, r: int) -> Optional[list]:
        saved, self.saved_round = self.saved_round, None
        return saved_units(saved, seed, r, Unit)

    def log_to(self, run_dir: str, trackers=None) -> None:
        """--log_completions: append every round's rollouts to run_dir/completions.jsonl, and hand each round's
        rows to the run's trackers (runs.track.Trackers: W&B's completions table at the logging steps)."""
        if self.method.log_completions:
            self.log_path, self.trackers = os.path.join(run_dir, "completions.jsonl"), trackers

    def epoch(self, seed: int, shuffle: bool, skip_units: int = 0) -> Iterator:
        """The epoch's units in training order, after the first `skip_units` (a resumed run): whole rounds
        skipped are not generated."""
        order = epoch_order(len(self.prompts), seed, shuffle)
        per_round_units = self.round_size * self.method.num_iterations
        for r in range(math.ceil(len(order) / self.prompts_per_round)):
            chunk = round_chunk(order, r, self.prompts_per_round)
            if skip_units >= per_round_units:  # trained before a resume: not generated again
                skip_units -= per_round_units
                self.rounds_done += 1
                continue
            units = self._resumed_round(seed, r) if skip_units else None
            if units is None:
                if skip_units:
                    note(f"resuming inside a generation round ({skip_units} of its {per_round_units} completions "
                         f"already trained) from a checkpoint that does not hold the round: it is generated again "
                         f"from the checkpoint's weights, so from here the run is not the uninterrupted one")
                units = self._round([self.prompts[i] for i in chunk], seed, r)
            else:
                self.rounds_done += 1
            if self.ahead is not None:
                self._ask_ahead(seed, r, shuffle)
            self.current = (seed, r, units)
            for _ in range(self.method.num_iterations):
                for u in units[skip_units:]:
                    yield u
                skip_units = max(0, skip_units - len(units))

    def _ask_ahead(self, seed: int, r: int, shuffle: bool) -> None:
        """--async_generate: push the policy's weights as they are now (the weights round r trains from) and send
        the next round's request — round r + 1, or the next epoch's first (its seed: the loop's, --seed + epoch)
        — unless the checkpoint resumed from already holds its answer."""
        rounds = math.ceil(len(self.prompts) / self.prompts_per_round)
        nseed, nr = (seed, r + 1) if r + 1 < rounds else (seed + 1, 0)
        chunk = round_chunk(epoch_order(len(self.prompts), nseed, shuffle), nr, self.prompts_per_round)
        prompts = [self.prompts[i] for i in chunk]
        request = round_request(self.method, {j: p["prompt_ids"] for j, p in enumerate(prompts)}, nseed, nr,
                                       {j: p["messages"] for j, p in enumerate(prompts)}, self.method.num_generations,
                                self._rollout_logps)
        if self.ahead.saved is not None and self.ahead.saved[0] == Ahead.key(*request):
            return
        self.ahead.settle()
        adapter = self.remote.sync(self.weights)
        self.ahead.submit(*request, adapter)

    # ------------------------------------------------------------------ one round

    def _round(self, prompts: list[dict], seed: int, r: int, training: bool = True) -> list:
        """Generate, score and weigh one round's completions (see train/rl/grpo.py). Under several processes each
        rank generates the groups of prompts j ≡ rank (mod processes), with the same per-completion seeds as one
        process would; the groups are then gathered in prompt order on every rank, and the advantages computed
        over the whole round, so every rank holds the same round (the loop gives each its slice of each batch).
        training False (validation, `evaluation_units`): no dynamic sampling, completions log or round count."""
        from tunesmith.train import distributed as D

        self.training = training
        self.group = self.method.num_generations if training else self.method.eval_generations
        if training:
            self.weights = ("round", self.rounds_done)
        groups = self._gathered_groups(prompts, seed, r)
        if self.method.dynamic_sample and training:
            groups, prompts = self._dynamic_sample(groups, prompts, seed, r)
        units = [u for _, us, _, _ in groups for u in us]
        per_func = [row for _, _, rows, _ in groups for row in rows]
        advantages, combined = self._advantages(per_func, [u.stats.get("kl_in_reward", 0.0) for u in units])
        zero_std = self._zero_std(combined)
        if training and not any(u.trained for u in units) and not self.said_truncated:
            self.said_truncated = True
            note(f"GRPO: every completion of this round reached --max_completion_length "
                 f"{self.method.max_completion_length}, and --overlong_filter leaves truncated completions out of "
                 f"the loss, so the round trains nothing; raise --max_completion_length (or drop --overlong_filter)")
        # a teacher's per-token signal (OPD-RL, OPSD, RLSD, SDAR) or CHORD's SFT term still trains such a round
        other_signal = self.teacher is not None or self.opsd or self.method.chord is not None
        if all(zero_std) and not self.said_flat and training and self.reward_fns and not other_signal:
            self.said_flat = True
            note("GRPO: in this round every group's completions got the same reward, so every advantage is 0 and "
                 "nothing is learned from it; if this persists (frac_reward_zero_std 1.0), the reward functions "
                 "cannot tell the completions apart — check them on a few completions (--log_completions true)")
        g = self.group
        for i, u in enumerate(units):
            u.advantage = float(advantages[i])
            if u.teacher_gap is not None:  # OPD-RL, RLSD, SDAR
                teacher_signal(u, self.method, self._global_step())
            u.stats.update({"reward": combined[i], "reward_sq": combined[i] ** 2, "zero_std": float(zero_std[i // g])})
        # per-round extremes ride on the round's first unit; the metrics average them over the rounds logged
        # the trained tokens, as the mean length counts them (a multi-turn completion's tool turns are not)
        lengths = [len(u.completion_ids) if u.completion_mask is None else sum(u.completion_mask) for u in units]
        units[0].stats.update({"rounds": 1, "round_min_length": min(lengths), "round_max_length": max(lengths)})
        if D.is_main() and training:
            texts = [t for _, _, _, texts in groups for t in texts]
            self._log(prompts, texts, per_func, combined, advantages)
            self._table(prompts, texts, per_func, advantages, units)
        if training:
            self.rounds_done += 1
        return units

    def evaluation_units(self, prompts: list[dict]) -> list:
        """GRPO's validation (--val_dataset / --split_dataset_ratio, as ms-swift evaluates GRPO): G completions of
        every validation prompt sampled with the policy's weights now — the same seeds at every evaluation, so
        evaluations differ by the weights only — scored, with their advantages. The loop's evaluate_objective turns
        them into eval_loss, eval_reward, eval_rewards/<function>/mean, eval_completions/mean_length, …"""
        self.evaluations += 1
        self.weights = ("eval", self.evaluations)
        per, units = self.prompts_per_round, []
        for r in range(math.ceil(len(prompts) / per)):
            units += self._round(prompts[r * per:(r + 1) * per], self.seed + 7_919, r, training=False)
        return units

    def _gathered_groups(self, prompts: list[dict], seed: int, key: int) -> list:
        """Every process's `_groups` of these prompts (process p generates prompts j ≡ p mod processes), gathered
        on every rank in prompt order. key: the seeds' round number."""
        from tunesmith.train import distributed as D

        world, rank = D.world_size(), D.rank()
        mine = [j for j in range(len(prompts)) if j % world == rank]
        local = self._groups(prompts, mine, seed, key)
        return sorted((g for part in D.gather(local) for g in part), key=lambda g: g[0])

    def _dynamic_sample(self, groups: list, prompts: list[dict], seed: int, r: int) -> tuple[list, list]:
        """DAPO's dynamic sampling (Yu et al. 2025, "DAPO", §3.2; ms-swift's --dynamic_sample): groups whose
        completions all got the same reward teach nothing, so they are replaced by the groups of further prompts
        — drawn from the dataset with seeds of (--seed, round, attempt), so a resumed run draws the same — up to
        --max_resample_times times. When the round is still not full of informative groups, it is trained as
        first generated (as ms-swift; a note says so once). Returns (groups, their prompts)."""
        m, need = self.method, len(groups)
        kept = [(g, prompts[g[0]]) for g in groups if not self._flat(g[2])]
        for a in range(m.max_resample_times):
            if len(kept) >= need:
                break
            pick = random.Random(f"{seed}/{r}/{a}").choices(range(len(self.prompts)), k=need)
            extra = [self.prompts[i] for i in pick]
            more = self._gathered_groups(extra, seed, r + (a + 1) * 1_000_003)
            kept += [(g, extra[g[0]]) for g in more if not self._flat(g[2])]
        if len(kept) < need:
            if not self.said_resample:
                self.said_resample = True
                note(f"GRPO --dynamic_sample: after {m.max_resample_times} resamplings a round still had fewer "
                     f"than {need} groups whose rewards differ; such rounds are trained as first generated "
                     f"(raise --max_resample_times, or check the rewards)")
            return groups, prompts
        kept = kept[:need]
        return [(k, *g[1:]) for k, (g, _) in enumerate(kept)], [p for _, p in kept]

    def _flat(self, rows: list) -> bool:
        """Whether one group's rewards [G][F] combine to the same total for every completion."""
        import torch

        from tunesmith.train.ops import losses as L

        combined = L.combine_rewards(torch.tensor(rows, dtype=torch.float64), list(self.method.reward_weights))
        return self._zero_std(combined.tolist())[0]

    def _groups(self, prompts: list[dict], which: list[int], seed: int, r: int) -> list:
        """[(j, the G units of prompt j, their rewards [G][F], their texts)] for the prompts `which` of the round:
        generated, scored, with the log-probs the loss needs (advantages are set once the whole round is known)."""
        if not which:  # more processes than prompts in a round: this one only takes part in the gather
            return []
        m = self.method
        ids = {j: prompts[j]["prompt_ids"] for j in which}
        if self.multi_turn is not None:  # trajectories (multi_turn.Trajectory): model and tool turns, masked
            completions = self.multi_turn.generate(self, {j: prompts[j] for j in which}, seed, r)
            texts = [c.text for c in completions]
        elif self.remote is not None:
            completions = self._generate_remote(ids, seed, r, {j: prompts[j]["messages"] for j in which})
            texts = [self.tok.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        else:
            completions = self._generate(ids, seed, r, {j: prompts[j].get("images") for j in which})
            texts = [self.tok.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        owners = [j for j in which for _ in range(self.group)]
        per_func = self._score([prompts[j] for j in which], texts, completions)
        units = []
        for i, c in enumerate(completions):
            truncated = c.finish_reason == "length"
            mask = c.mask if self.multi_turn is not None else None
            stats = {"n": 1, "length": len(c.token_ids) if mask is None else sum(mask), "clipped": float(truncated)}
            if mask is not None:
                stats["num_turns"] = c.turns
            for f, fn in enumerate(self.reward_fns):
                v = per_func[i][f]
                if not math.isnan(v):
                    stats[f"rewards/{fn.name}/sum"] = v
                    stats[f"rewards/{fn.name}/sq"] = v * v
                    stats[f"rewards/{fn.name}/count"] = 1
            units.append(Unit(ids[owners[i]], list(c.token_ids), 0.0, not (m.overlong_filter and truncated),
                              stats=stats, images=prompts[owners[i]].get("images"), completion_mask=mask,
                              rollout_logps=[lp.logprob for lp in c.logprobs]
                              if self._rollout_logps and c.logprobs is not None else None,
                              teacher_prompt_ids=prompts[owners[i]].get("teacher_prompt_ids"),
                              tag=prompt_tag(prompts[owners[i]], m.teacher_tag_key)))
        self._add_logps(units)
        g = self.group
        return [(j, units[k * g:(k + 1) * g], per_func[k * g:(k + 1) * g], texts[k * g:(k + 1) * g])
                for k, j in enumerate(which)]

    def _generate(self, ids: dict, seed: int, r: int, images: Optional[dict] = None) -> list:
        """G completions of each prompt ({j: token ids}, j its place in the round), all submitted at once (the
        engine batches them), each with its own seed: the same completions whichever process generates them (the
        engine's draws are keyed by a row's seed and token index, not by its place in the batch:
        inference/sampling.py). The policy is in eval mode for the round (dropout is off anyway). images: {j: the
        prompt's pictures} of a vision-language policy, decoded here once per prompt for its G completions."""
        from tunesmith.data.vision import pixel_inputs
        from tunesmith.inference.chat import GenConfig

        m, g = self.method, self.group
        adapter = self.vllm.sync(self.weights) if self.vllm is not None else None
        training = self.vllm is None and self.model.training
        if training:  # once for the round, not at each of its decoding steps (the engine's rule)
            self.model.eval()
        try:
            handles = []
            for j, prompt in ids.items():
                base = _completion_seed(seed, r, j, g)
                cfg = GenConfig(max_new_tokens=m.max_completion_length, temperature=m.temperature, top_p=m.top_p,
                                top_k=m.top_k, repetition_penalty=m.repetition_penalty, seed=base, min_p=m.min_p,
                                logprobs=self._rollout_logps)
                refs = (images or {}).get(j)
                pictures = {"images": pixel_inputs([refs], self.images)} if refs else {}
                handles += [self.chat.engine.submit(prompt, self._sampling(cfg, k), adapter, **pictures)
                            for k in range(g)]
            out = [h.result() for h in handles]
        finally:
            if training:
                self.model.train()
        raise_sampling_errors(out, "policy")
        return out

    def _generate_remote(self, ids: dict, seed: int, r: int, messages: dict) -> list:
        """`_generate` through the rollout server (--vllm_mode server): the policy's adapter pushed first when it
        changed, then every prompt of the round in one /infer/ call, as token ids, with the same per-completion
        seeds; the same completions as the trainer's own engine would sample. messages: {j: the prompt's messages}
        (the request's ms-swift fields)."""
        request = round_request(self.method, ids, seed, r, messages, self.group, self._rollout_logps)
        # --async_generate: a training round requested ahead (sampled with the weights before the last update)
        ahead = self.ahead if self.training else None
        out = ahead.take(*request, later=self.rounds_done > 0) if ahead is not None else None
        if out is None:
            if self.ahead is not None:  # no weights move while a request is in flight
                self.ahead.settle()
            self.remote.sync(self.weights)
            out = self.remote.generate(*request)
        raise_sampling_errors(out, "policy")
        return out

    @property
    def _rollout_logps(self) -> bool:
        """Whether the engine returns its own log-probs of the sampled tokens (--rollout_importance_sampling_mode,
        --log_rollout_offpolicy_metrics) — of the distribution it samples from (processed), in training rounds."""
        v = self.method.variants
        return bool(self.training and v is not None and v.wants_rollout_logps)

    def _sampling(self, cfg, k: int):
        """The engine's SamplingParams of choice k, its log-probs those of the processed distribution (vLLM's
        processed_logprobs) when they are asked for."""
        from dataclasses import replace

        params = self.chat.sampling(cfg, k)
        return replace(params, processed_logprobs=True) if cfg.logprobs else params

    def _global_step(self) -> int:
        """The optimiser steps done when this round was generated (what ms-swift's trainer_state says)."""
        m = self.method
        return self.rounds_done * self.steps * m.num_iterations // self.gas

    def _score(self, prompts: list[dict], texts: list[str], completions: list) -> list:
        """The rewards [N][F] (NaN for None) of these prompts' completions (G per prompt, in order)."""
        from tunesmith.train.rl.scoring import score

        m, g = self.method, self.group
        rep = [p for p in prompts for _ in range(g)]
        names = sorted({k for p in rep for k in p.get("columns", {})})
        columns = {k: [p.get("columns", {}).get(k) for p in rep] for k in names}
        if any(p.get("tools") for p in rep):
            columns.setdefault("tools", [p.get("tools") for p in rep])
        if any(p.get("images") for p in rep):  # ms-swift hands reward functions the rows' `images` too
            columns.setdefault("images", [p.get("images") for p in rep])
        messages = [p["messages"] + [{"role": "assistant", "content": t}] for p, t in zip(rep, texts)]
        token_ids = [list(c.token_ids) for c in completions]
        if self.multi_turn is not None:  # ms-swift's: the whole conversation, each turn's tokens, rollout_infos
            messages = [c.messages for c in completions]
            token_ids = [[t for t, k in zip(c.token_ids, c.mask) if k] for c in completions]
            columns.setdefault("response_token_ids", [c.turn_ids for c in completions])  # [turn][token]
            columns.setdefault("rollout_infos", [{**c.infos, "num_turns": c.turns} for c in completions])
        # what ms-swift hands rewards as trainer_state (transformers' TrainerState): attributes, optimiser steps
        state = SimpleNamespace(global_step=self._global_step(),
                                max_steps=self.max_steps, rounds_done=self.rounds_done)
        per_func, errors = score(self.reward_fns, texts, prompts=[p["messages"] for p in rep], columns=columns,
                                 messages=messages, trainer_state=state, weights=list(m.reward_weights),
                                 completion_ids=token_ids)
        if errors and self.rounds_done == 0:
            note(f"GRPO: {errors[0]} (and {len(errors) - 1} more this round)" if len(errors) > 1 else errors[0])
        for f, fn in enumerate(self.reward_fns):
            if fn.name not in self.said_empty and per_func and all(math.isnan(row[f]) for row in per_func):
                self.said_empty.add(fn.name)
                note(f"GRPO: reward {fn.name} gave None (or NaN) for every completion of a round, so it counted for "
                     f"nothing there and rewards/{fn.name} is not logged for it; if that is not meant (e.g. a "
                     f"missing `solution` column, or a 0/0), check the function on a few completions")
        return per_func

    def _advantages(self, per_func: list, kl: list) -> tuple[list[float], list[float]]:
        """(the round's advantages [N], its combined rewards [N]) from its rewards [N][F] and the completions'
        summed KL to the reference [N] (losses.combine_rewards, less β·KL with --kl_in_reward
        (grpo_variants.kl_penalised_rewards), then group_advantages — or gdpo_advantages)."""
        import torch

        from tunesmith.train.ops import losses as L
        from tunesmith.train.ops.grpo_variants import kl_penalised_rewards

        m, g = self.method, self.group
        rewards = torch.tensor(per_func, dtype=torch.float64)
        combined = L.combine_rewards(rewards, list(m.reward_weights))
        if m.kl_in_reward and m.beta != 0 and self.reference is not None:
            combined = kl_penalised_rewards(combined, torch.tensor(kl, dtype=torch.float64), m.beta)
        if m.scale_rewards == "gdpo":
            return L.gdpo_advantages(rewards, list(m.reward_weights), g).tolist(), combined.tolist()
        return L.group_advantages(combined, g, m.advantage_estimator, m.scale_rewards).tolist(), combined.tolist()

    def _zero_std(self, combined: list[float]) -> list[bool]:
        g = self.group
        return [max(combined[i:i + g]) - min(combined[i:i + g]) < 1e-12 for i in range(0, len(combined), g)]

    def _add_logps(self, units: list) -> None:
        """The sampling policy's per-token log-probs (when the policy moves before these completions are trained
        on) and the reference's (β > 0), in micro-batches, without gradient."""
        import torch

        from tunesmith.data.vision import with_pixels

        m = self.method
        need_ref = self.reference is not None and m.beta != 0
        kl_in_reward = need_ref and m.kl_in_reward  # the sampling policy's KL joins the reward (ms-swift's rule)
        keep_old = self.need_old and self.training  # validation trains nothing: its ratio is 1
        need_teacher = self.teacher is not None or self.opsd
        need_old = keep_old or kl_in_reward or need_teacher
        if not (need_old or need_ref):
            return
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        device = next(self.model.parameters()).device
        with torch.no_grad():
            collate = with_pixels(partial(grpo_collate, pad_id=pad), self.images)
            for s in range(0, len(units), self.bs):
                part = units[s:s + self.bs]
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(part).items()}
                t = m.temperature
                old = completion_logps(self.model, batch, t).float().cpu() if need_old else None
                ref = self.reference.token_logps(self.model, batch, lambda mod, b: completion_logps(mod, b, t))\
                    .float().cpu() if need_ref else None
                teacher = self._teacher_logps(part, batch, collate, device) if need_teacher else None
                for i, u in enumerate(part):
                    n = len(u.completion_ids)
                    if teacher is not None:  # OPD-RL: the signed teacher log-ratio of each token
                        u.teacher_gap = (teacher[i, :n] - old[i, :n]).tolist()
                        if m.distill is not None and m.distill.sdar_coef > 0:
                            u.teacher_logps = teacher[i, :n].tolist()
                    if kl_in_reward:  # Σ_t (old − ref) over the whole completion (grpo_variants.sequence_kl)
                        u.stats["kl_in_reward"] = float((old[i, :n].double() - ref[i, :n].double()).sum())
                    if keep_old:
                        u.old_logps = old[i, :n].tolist()
                    if ref is not None and not kl_in_reward:  # in the reward, the loss has no KL term
                        u.ref_logps = ref[i, :n].tolist()

    def _teacher_logps(self, part: list, batch: dict, collate, device):
        """The teacher's log-probs [B, C] (CPU, float) of a micro-batch's completion tokens at --temperature, each
        completion after its teacher view (OPSD: its row's teacher_prompt, else its own prompt): --teacher_model's,
        else the policy's own (dynamic self-distillation, ms-swift's OPSD teacher)."""
        from dataclasses import replace

        t = self.method.temperature
        if isinstance(self.teacher, ServerTeacher):  # the server's log-probs (temperature 1, as ms-swift's API)
            return self.teacher.completion_logps(part, batch["completion_mask"].shape[1])
        if any(u.teacher_prompt_ids for u in part):
            views = [replace(u, prompt_ids=u.teacher_prompt_ids) if u.teacher_prompt_ids else u for u in part]
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(views).items()}
        if self.teacher is not None:
            return self.teacher.token_logps(self.model, batch, lambda mod, b: completion_logps(mod, b, t)).float().cpu()
        return completion_logps(self.model, batch, t).float().cpu()

    def _teacher_view(self, rec: dict) -> dict:
        """{"teacher_prompt_ids": the prompt rendered with the row's teacher_prompt as its last user turn, fitted to
        --max_length as the prompt} for a row with a teacher_prompt column (ms-swift's build_teacher_view), else {}."""
        text = (rec.get("columns") or {}).get("teacher_prompt")
        if not text:
            return {}
        messages = [dict(msg) for msg in rec["messages"]]
        for msg in reversed(messages):
            if msg["role"] == "user":
                msg["content"] = text
                break
        ids = self.chat.prompt(messages, rec.get("tools"), images=rec.get("images"), pixels=False).ids
        if self.max_prompt and len(ids) > self.max_prompt:
            ids = ids[:self.max_prompt] if self.truncation == "right" else ids[-self.max_prompt:]
        return {"teacher_prompt_ids": ids}

    def _log(self, prompts, texts, per_func, combined, advantages) -> None:
        if self.log_path is None:
            return
        g = self.group
        names = [fn.name for fn in self.reward_fns]
        from tunesmith.data.images import describe, url_scheme

        with open(self.log_path, "a", encoding="utf-8") as fh:
            for i, text in enumerate(texts):
                pictures = prompts[i // g].get("images")  # data: URLs cut short (their length said)
                fh.write(json.dumps({"round": self.rounds_done, "prompt": prompts[i // g]["messages"],
                                     **({"images": [describe(p) if url_scheme(p) == "data" else p
                                                    for p in pictures]} if pictures else {}),
                                     "completion": text,
                                     "rewards": {n: (None if math.isnan(v) else v) for n, v in zip(names, per_func[i])},
                                     "reward": combined[i], "advantage": advantages[i]}, ensure_ascii=False) + "\n")

    def _table(self, prompts, texts, per_func, advantages, units) -> None:
        """The round's rows of W&B's completions table (--log_completions with --report_to wandb), with ms-swift's
        columns: the prompt as the chat template renders it, the completion, each reward function's value (None
        where it gave none), `advantages`, and `solution` / `num_turns` when every row has one."""
        if self.trackers is None or not self.trackers.takes_completions:
            return
        g, names = self.group, [fn.name for fn in self.reward_fns]
        rendered = [self.tok.decode(p["prompt_ids"]) for p in prompts]
        solutions = [(p.get("columns") or {}).get("solution") for p in prompts]
        turns = [u.stats.get("num_turns") for u in units]
        rows = [{"prompt": rendered[i // g], "completion": text,
                 **{n: (None if math.isnan(v) else v) for n, v in zip(names, per_func[i])},
                 "advantages": float(advantages[i]),
                 **({"solution": solutions[i // g]} if all(s is not None for s in solutions) else {}),
                 **({"num_turns": turns[i]} if all(t is not None for t in turns) else {})}
                for i, text in enumerate(texts)]
        self.trackers.hold_completions(rows, latest_round=True)


class ValidationRollouts:
    """The validation prompts as the loop's eval rows: `fresh()` samples and scores their completions anew at each
    evaluation (Rollouts.evaluation_units); len() is the number of completions an evaluation trains nothing on."""

    def __init__(self, rollouts: Rollouts, prompts: list[dict]):
        if rollouts.images is None:
            refuse_pictures(prompts, "validation prompts")
        self.rollouts, self.prompts = rollouts, rollouts.fitted(prompts, "validation prompts")

    def __len__(self) -> int:
        return len(self.prompts) * self.rollouts.method.eval_generations

    def fresh(self) -> list:
        """This evaluation's units (`Unit`s, in prompt order)."""
        return self.rollouts.evaluation_units(self.prompts)

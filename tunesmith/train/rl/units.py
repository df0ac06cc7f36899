"""What GRPO's and PPO's rounds are made of, and how a batch of them is read: a `Unit` (one completion of one prompt,
with its advantage and log-probs), `grpo_collate` (units → the loss's padded batch), the completions' per-token
log-probs under a model (`completion_logps`, with entropy), the prompts fitted to --max_length (`fit_prompts`) and
each completion's seed. The rounds themselves live in rollouts.py (GRPO) and ppo_rollouts.py (PPO).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tunesmith.data.encode import IGNORE
from tunesmith.errors import DataError
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
    images: Optional[list] = None       # the prompt's pictures (references), for a vision-language policy
    rollout_logps: Optional[list] = None  # the sampling engine's own [C] (rollout IS correction, diagnostics)
    token_advantages: Optional[list] = None  # OPD-RL: [C], the advantage plus the teacher's per-token signal
    teacher_gap: Optional[list] = None  # OPD-RL: [C], log p_teacher − log p_old of each token (nats)
    teacher_logps: Optional[list] = None  # SDAR: [C], the teacher's log-probs of the tokens
    teacher_prompt_ids: Optional[list] = None  # OPSD: the prompt with the row's teacher_prompt as last user turn
    completion_mask: Optional[list] = None  # [C] 1 trained, 0 not (a multi-turn rollout's tool turns); None: all 1
    tag: Optional[str] = None           # the row's --teacher_tag_key value (routes it among teacher servers)


def refuse_pictures(prompts: list[dict], what: str) -> None:
    """Raise DataError when prompts hold pictures but the policy is a text model (they would be sampled without
    them), naming how many and the first one's pictures."""
    with_pictures = [p for p in prompts if p.get("images")]
    if with_pictures:
        raise DataError(what, None, "images", f"{len(with_pictures)} prompt(s) hold pictures (the first: "
                        f"{', '.join(map(str, with_pictures[0]['images']))[:120]}), but the model takes text only (no "
                        f"vision tower), so they would be sampled without them.",
                        "train a vision-language model (e.g. Qwen/Qwen2.5-VL-7B-Instruct), or drop the images and "
                        "their <image> tags.")


def grpo_collate(units: list[Unit], pad_id: int) -> dict:
    """Units → `input_ids`/`attention_mask` [B, P + C] (prompts left-padded to P, completions right-padded to C),
    `labels` (the completion tokens a unit's completion_mask trains, IGNORE elsewhere), `completion_mask` [B, C]
    (1 on those tokens), `advantages` [B], and `old_logps`/`ref_logps`/`rollout_logps`/`teacher_logps` [B, C] when
    the units carry them; `stats` summed over the units. With OPD-RL's per-token advantages
    (`Unit.token_advantages`), `advantages` is [B, C]."""
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
            keep = torch.ones(m, dtype=torch.bool) if u.completion_mask is None else \
                torch.tensor(u.completion_mask, dtype=torch.bool)
            labels[i, p:p + m] = torch.where(keep, ids[i, p:p + m], IGNORE)
            cmask[i, :m] = keep.float()
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "completion_mask": cmask,
             "advantages": torch.tensor([u.advantage for u in units]), "n_completions": len(units)}
    if units[0].token_advantages is not None:
        batch["advantages"] = torch.zeros(len(units), c)
        for i, u in enumerate(units):
            batch["advantages"][i, :len(u.completion_ids)] = torch.tensor(u.token_advantages)
    if any(u.images for u in units):  # data.vision.WithPixels turns them into the vision tower's inputs
        batch["images"] = [u.images for u in units]
    for key in ("old_logps", "ref_logps", "rollout_logps", "teacher_logps"):
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

    from tunesmith.train.ops.token_logps import token_logps

    cmask = batch["completion_mask"]
    flat = token_logps(model, batch, temperature=temperature).logps
    out = torch.zeros(cmask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(cmask.bool(), flat)


def completion_logps_and_entropy(model, batch: dict, temperature: float = 1.0):
    """(`completion_logps` [B, C], the entropy [B, C] of each completion token's distribution softmax(logits / T)
    in nats, without gradient), both from one forward; 0 where the completion mask is 0. The entropy is TRL's and
    ms-swift's (entropy_from_logits on the temperature-scaled logits), for --top_entropy_quantile and the
    entropy/* metrics."""
    import torch

    from tunesmith.train.ops.token_logps import token_logps

    keep = batch["completion_mask"].bool()
    out = token_logps(model, batch, temperature=temperature, entropy=True)
    logps = torch.zeros(keep.shape, dtype=out.logps.dtype, device=out.logps.device).masked_scatter(keep, out.logps)
    entropy = torch.zeros(keep.shape, dtype=torch.float32, device=out.entropy.device).masked_scatter(keep,
                                                                                                     out.entropy)
    return logps, entropy


def generation_batch_problem(per_step: int, steps: int, g: int) -> str:
    """The message for a generation batch that does not hold whole groups of G completions."""
    return (f"the generation batch ({per_step} completions per micro-batch x {steps} micro-batches per generation "
            f"= {per_step * steps}) must hold whole groups of --num_generations {g}; e.g. "
            f"--per_device_train_batch_size {g}, or --steps_per_generation / --generation_batch_size to match")


def fit_prompts(chat, prompts: list[dict], max_prompt: Optional[int], truncation: str, what: str) -> list[dict]:
    """The prompts with their token ids (`prompt_ids`, rendered with the chat template of `chat`, a ChatEngine),
    fitted to --max_length (max_prompt tokens) as --truncation_strategy says: delete drops a longer one (counted in a
    note), left/right keep its last/first tokens. Raises DataError when no prompt is left (`what` names the data)."""
    from tunesmith.inference.chat import PromptTooLong

    out, dropped = [], 0
    for rec in prompts:
        try:  # pictures are counted from their headers here, decoded when the prompt is sampled
            ids = chat.prompt(rec["messages"], rec.get("tools"), images=rec.get("images"), pixels=False).ids
        except PromptTooLong:  # longer than the whole context: no cut leaves room
            ids = None
        if ids is None or (max_prompt and len(ids) > max_prompt):
            if ids is None or truncation == "delete":
                dropped += 1
                continue
            ids = ids[-max_prompt:] if truncation == "left" else ids[:max_prompt]
        out.append({**rec, "prompt_ids": ids})
    if not out:
        raise DataError(what, None, "messages", f"every prompt is longer than --max_length {max_prompt} "
                        f"tokens (the prompt's limit in GRPO and PPO; the completion gets --max_completion_length on "
                        f"top)", "raise --max_length, or shorten the prompts")
    if dropped:
        note(f"{what}: {dropped} prompt(s) longer than --max_length {max_prompt} tokens dropped "
             f"(--truncation_strategy delete; left or right would cut them instead)")
    return out


def _unique_names(fns: list) -> list:
    """The same reward named twice (e.g. with two weights) logs under name, name_2, … rather than one key."""
    import dataclasses

    seen: dict = {}
    out = []
    for fn in fns:
        seen[fn.name] = seen.get(fn.name, 0) + 1
        out.append(fn if seen[fn.name] == 1 else dataclasses.replace(fn, name=f"{fn.name}_{seen[fn.name]}"))
    return out


def _completion_seed(seed: int, r: int, j: int, g: int) -> int:
    """The seed of prompt j's first completion in round r of the epoch seeded `seed` (completion k: this + k)."""
    return (seed * 1_000_003 + r * 65_537 + j * g) % (2 ** 31)


def save_round(path: str, name: str, current: Optional[tuple]) -> None:
    """Write the round being trained, current = (epoch seed, round, its units: dataclasses), into the checkpoint
    folder `path` as `name` (atomically); nothing when no round has started."""
    import os
    from dataclasses import asdict

    from tunesmith.files import write_json_atomic

    if current is not None:
        seed, r, units = current
        write_json_atomic(os.path.join(path, name), {"epoch_seed": seed, "round": r,
                                                     "units": [asdict(u) for u in units]})


def read_round(path: str, name: str) -> Optional[dict]:
    """The round `save_round` wrote into checkpoint `path`, or None (absent in checkpoints of older runs)."""
    import json
    import os

    f = os.path.join(path, name)
    if not os.path.isfile(f):
        return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def saved_units(saved: Optional[dict], seed: int, r: int, unit_class) -> Optional[list]:
    """The units of a saved round when it is round r of the epoch seeded `seed` (rebuilt as unit_class), else None."""
    if saved is None or (saved["epoch_seed"], saved["round"]) != (seed, r):
        return None
    return [unit_class(**u) for u in saved["units"]]


def epoch_order(n: int, seed: int, shuffle: bool) -> list:
    """An epoch's prompt order: indices 0..n−1, shuffled with the epoch's seed when `shuffle`."""
    import random

    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def round_chunk(order: list, r: int, per: int) -> list:
    """Round r's `per` prompts (indices) in the epoch's order; the epoch's last round is filled from its start."""
    chunk = order[r * per:(r + 1) * per]
    return chunk + order[:per - len(chunk)]

"""Reward-model training (`tunesmith rlhf --rlhf_type rm`): a sequence-classification head with one output scores a
conversation, trained on preference pairs so that the chosen reply scores above the rejected one.

Loss per pair (Bradley–Terry, as in InstructGPT, Ouyang et al. 2022, eq. 1, and TRL's RewardTrainer):
−log σ(r_c − r_r − m) with m the pair's `margin` column (Llama 2, Touvron et al. 2023, eq. 2; 0 when absent), plus --center_rewards_coefficient · (r_c + r_r)² (Eisenstein et al. 2023, arXiv:2312.09244),
which keeps rewards near 0. r is the head's output at the sequence's last token (transformers' own pooling, so
the trained model scores the same way when loaded with AutoModelForSequenceClassification). With LoRA the score
head is trained in full (peft's SEQ_CLS task); the saved checkpoint loads in transformers (with peft installed)
and serves as GRPO's --reward_model. Metrics, under ms-swift's names: rewards/accuracies (share of pairs with
r_c > r_r), rewards/margins (mean r_c − r_r), rewards/chosen, rewards/rejected, center_rewards_loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

from tunesmith.log import note
from tunesmith.train import loop
from tunesmith.train.methods.pairs import check_pairs, pair_collate
from tunesmith.train.setup import Batches


def sequence_rewards(model, batch: dict):
    """The head's score of each sequence ([2B]: chosen then rejected), from `pair_collate`'s batch: padded (the
    model's own pooling at each row's last non-pad token), or padding-free / packed (`seq_ids`: several sequences
    per row, position ids restarting at 0 so attention stays inside each): the final hidden state at each sequence's
    last position, through the same score head — what the padded path reads, without the padding's compute.
    A vision-language reward model gets the batch's pictures (token_logps.vision_inputs)."""
    from tunesmith.train.ops.token_logps import vision_inputs

    if "seq_ids" not in batch:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **vision_inputs(batch, model))
        return out.logits[:, 0].float()
    import torch

    from tunesmith.models.load import unwrap_model

    kw = {"position_ids": batch["position_ids"], **vision_inputs(batch, model)}
    out = model(input_ids=batch["input_ids"], use_cache=False, output_hidden_states=True, **kw)
    seq = batch["seq_ids"]
    n = int(batch["n_seq"])
    flat = torch.arange(seq.numel(), device=seq.device).view_as(seq)
    last = torch.full((n,), -1, dtype=torch.long, device=seq.device).scatter_reduce(
        0, seq[seq >= 0], flat[seq >= 0], reduce="amax")
    hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])[last]
    return unwrap_model(model).score(hidden)[:, 0].float()


def rm_loss(method: "RewardModel", model, batch: dict) -> tuple[dict, dict]:
    """({"pairs": summed per-pair loss (nats)}, summed statistics) for one batch of B pairs: rewards r [2B] from
    `sequence_rewards`, the optional `margin` [B] (ms-swift's reward_trainer.py: −log σ(r_c − r_r − m))."""
    import torch.nn.functional as F

    n = batch["n_pairs"]
    r = sequence_rewards(model, batch)
    chosen, rejected = r[:n], r[n:]
    diff = chosen - rejected
    if batch.get("margin") is not None:
        diff = diff - batch["margin"].to(device=diff.device, dtype=diff.dtype)
    per_pair = -F.logsigmoid(diff)
    stats = {}
    if method.center_rewards_coefficient:
        center = method.center_rewards_coefficient * (chosen + rejected) ** 2
        per_pair = per_pair + center
        stats["center"] = float(center.detach().sum())
    c, rj = chosen.detach(), rejected.detach()
    stats.update({"pairs": n, "correct": float((c > rj).sum()), "margin": float((c - rj).sum()),
                  "chosen": float(c.sum()), "rejected": float(rj.sum())})
    return {"pairs": per_pair.sum()}, stats


def rm_metrics(st: dict) -> dict:
    """Means over pairs, under ms-swift's RewardTrainer names: rewards/accuracies, rewards/margins (r_c − r_r),
    rewards/chosen, rewards/rejected, and center_rewards_loss with --center_rewards_coefficient."""
    n = max(st.get("pairs", 0), 1)
    out = {"rewards/accuracies": round(st.get("correct", 0) / n, 4),
           "rewards/margins": round(st.get("margin", 0) / n, 6),
           "rewards/chosen": round(st.get("chosen", 0) / n, 6), "rewards/rejected": round(st.get("rejected", 0) / n, 6)}
    if "center" in st:
        out["center_rewards_loss"] = round(st["center"] / n, 6)
    return out


@dataclass(frozen=True)
class RewardModel:
    """A reward model on pairs: Bradley–Terry loss, no reference, the whole conversation scored."""
    center_rewards_coefficient: Optional[float] = None
    name = "rm"
    rows = "preference"
    head = "seq_cls"
    default_loss_scale = "last_round"
    needs_reference = False

    @classmethod
    def from_args(cls, args, problems: list) -> "RewardModel":
        """--center_rewards_coefficient (≥ 0); the flags of the other methods are ignored with a note."""
        from tunesmith.config.checks import between

        if args.center_rewards_coefficient is not None:
            between(problems, "center_rewards_coefficient", args.center_rewards_coefficient, 0, None)
        if args.loss_type or args.beta is not None:
            note("--rlhf_type rm trains the Bradley–Terry loss; --loss_type/--beta are ignored")
        return cls(args.center_rewards_coefficient)

    def resolved_flags(self) -> dict:
        """The loss, for args.json."""
        return {"loss_type": ["bradley_terry"], "beta": None, "rpo_alpha": None}

    def shape_records(self, loaded):
        """Every row must be a pair (DataError at the first that is not)."""
        return check_pairs(loaded)

    def batches(self, cfg, prepared, model, reference) -> Batches:
        """Batches [chosen_1..B, rejected_1..B]: padded on the right (the head reads the last non-pad token), or
        --padding_free (one sequence) / --packing (pairs packed into --packing_length rows), which score each
        sequence at its last position without the padding's compute."""
        from tunesmith.train.methods.pairs import PackedPairCollate, PairRows
        from tunesmith.train.setup import batching

        pad = prepared.tokenizer.pad_token_id if prepared.tokenizer.pad_token_id is not None else \
            prepared.tokenizer.eos_token_id
        if not (cfg.data.packing or cfg.data.padding_free):
            return Batches(prepared.train_rows, prepared.eval_rows, partial(_collate, pad_id=pad), None)
        rows = [PairRows(prepared.train_rows), PairRows(prepared.eval_rows)]
        packed = PackedPairCollate(pad)
        train, evals, collate = batching(
            cfg.data, *rows, None, partial(_collate_pairs, pad_id=pad, flat=True),
            lambda groups: _with_margin(packed(groups), [p for g in groups for p in g]),
            lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids), prepared.data_stats["max_length"])
        return Batches(train, evals, collate, None)

    def objective(self, reference, cfg) -> loop.Objective:
        """Mean Bradley–Terry loss per pair; accuracy and margins."""
        return loop.Objective("rm", loss=partial(rm_loss, self), count=lambda b: {"pairs": b["n_pairs"]},
                              metrics=rm_metrics)

    def header(self, prepared, batches) -> str:
        """The run's header line."""
        center = f", center_rewards_coefficient={self.center_rewards_coefficient:g}" \
            if self.center_rewards_coefficient else ""
        return (f"[tunesmith] rlhf rm: Bradley–Terry loss{center}; {len(prepared.train_rows)} training pairs, "
                f"{len(prepared.eval_rows)} validation pairs")


def _collate(rows, pad_id: int) -> dict:
    """(chosen, rejected) rows → pair_collate's padded batch, plus `margin` [B] when some pair has one (0 for those
    without)."""
    from tunesmith.train.methods.pairs import Pair

    return _collate_pairs([Pair(c, r) for c, r in rows], pad_id)


def _collate_pairs(pairs, pad_id: int, flat: bool = False) -> dict:
    """Pairs → pair_collate's batch (padded on the right, or flat: one sequence), with `margin`."""
    return _with_margin(pair_collate(pairs, pad_id, "right", flat=flat), pairs)


def _with_margin(batch: dict, pairs) -> dict:
    """batch plus `margin` [B] in the batch's pair order when some pair has one (0 for those without)."""
    import torch

    if any(p.chosen.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.chosen.margin or 0.0 for p in pairs], dtype=torch.float32)
    return batch


class RewardModelScorer:
    """A trained reward model as a GRPO reward function (`--reward_model PATH`): each conversation (prompt +
    completion, rendered with the reward model's own chat template, or --reward_template's) scored by its head, a
    micro-batch at a time, without gradient. PATH: a full sequence-classification checkpoint, or a LoRA adapter
    trained with --rlhf_type rm (its base is read from adapter_config.json); `spec` adds its revision (a hub id is
    downloaded as --model is), --reward_adapters (merged; a SEQ_CLS adapter brings the score head) and
    --reward_template (train/rl/reward_models.py). A vision-language reward model (Qwen-VL, models/
    vision.sequence_classifier) sees each prompt's pictures (GRPO's `images` column), expanded and fed as in training.
    Raises ConfigError when PATH holds no model with a trained score head."""

    def __init__(self, path: str, batch_size: int = 8, spec=None):
        import torch

        from tunesmith.errors import ConfigError
        from tunesmith.train.rl.reward_models import (RewardModelSpec, adapter_chain, adapter_scores,
                                                      load_reward_model, resolve_folder)

        spec = spec or RewardModelSpec(path)
        folder = resolve_folder(spec)
        try:
            self.model, self.tok, config, info = load_reward_model(spec, folder, "seq_cls")
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--reward_model {path}: cannot load a sequence-classification model from it ({e}); "
                              f"pass a checkpoint trained with --rlhf_type rm, or a model with a score head") from None
        fresh = [k for k in info.get("missing_keys", []) if k.split(".")[-2:-1] in (["score"], ["classifier"])
                 or k.startswith(("score", "classifier"))]
        if fresh and not any(adapter_scores(a) for a in adapter_chain(spec, folder)):
            raise ConfigError(f"--reward_model {path}: has no trained score head ({fresh[0]} would be random); pass a "
                              f"checkpoint trained with --rlhf_type rm")
        self.batch_size, self.torch = batch_size, torch
        self.encoder = _picture_encoder(folder, config, self.tok)
        self.said_unscored = False

    def __call__(self, completions, messages=None, images=None, **kwargs) -> list:
        """One score per completion; `messages` (each conversation ending in its completion) and, for a
        vision-language reward model, `images` (each prompt's pictures, or None) as GRPO passes them."""
        if self.encoder is not None:
            return self._scores_with_pictures(messages, images or [None] * len(messages))
        texts = [self.tok.apply_chat_template(m, tokenize=False) for m in messages]
        self.tok.padding_side = "right"
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def _scores_with_pictures(self, messages: list, images: list) -> list:
        """Each conversation encoded as training encodes it (`<image>` tags expanded to the picture's tokens),
        padded on the right, the pictures decoded per micro-batch (data.vision.with_pixels)."""
        from tunesmith.data.collate import pad_collate
        from tunesmith.data.vision import with_pixels
        from tunesmith.train.ops.token_logps import vision_inputs

        rows = [self._encoded(m, p) for m, p in zip(messages, images)]
        collate = with_pixels(partial(pad_collate, pad_id=self.tok.pad_token_id), self.encoder.images)
        kept = [i for i, r in enumerate(rows) if r is not None]
        out: list = [None] * len(rows)
        with self.torch.no_grad():
            for s in range(0, len(kept), self.batch_size):
                part = kept[s:s + self.batch_size]
                batch = collate([rows[i] for i in part])
                scores = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    **vision_inputs(batch, self.model)).logits[:, 0].float().tolist()
                for i, v in zip(part, scores):
                    out[i] = v
        return out

    def _encoded(self, messages: list, pictures):
        """One conversation encoded with its pictures, or None (no score, said once) when it cannot be: e.g. a
        completion that writes an image tag (`<image>`, `<|image_pad|>`) itself, which no picture fills."""
        from tunesmith.errors import DataError

        try:
            return self.encoder.encode({"messages": messages, **({"images": list(pictures)} if pictures else {})},
                                       truncate=False)
        except DataError as e:
            if not self.said_unscored:
                self.said_unscored = True
                note(f"--reward_model: a completion could not be scored with its prompt's pictures ({e.problem}); "
                     f"such completions get no reward from it (None). A completion that writes an image tag itself "
                     f"is the usual cause")
            return None


def _picture_encoder(path: str, config, tokenizer):
    """For a vision-language reward model: a ChatEncoder whose ImageTokens use the processor settings the reward
    model was trained with (its own folder's preprocessor_config.json, else its base model's, and the --max_pixels
    of its args.json); None for a text one."""
    import os

    from tunesmith.data.encode import ChatEncoder
    from tunesmith.models.vision import image_tokens, is_vision_language
    from tunesmith.train.rl.reward_models import scorer_config

    if not is_vision_language(config):
        return None
    folder = path if os.path.isfile(os.path.join(path, "preprocessor_config.json")) else scorer_config(path)[1]
    return ChatEncoder(tokenizer, images=image_tokens(folder, config, tokenizer, _trained_max_pixels(path)))


def _trained_max_pixels(path: str):
    """The picture budget (pixels) the reward model was trained with — its checkpoint's args.json: the budget as
    applied (`image_pixels`, whether from --max_pixels or MAX_PIXELS & co.), else --max_pixels — or None."""
    import json
    import os

    try:
        with open(os.path.join(path, "args.json"), encoding="utf-8") as fh:
            record = json.load(fh)
        return (record.get("image_pixels") or {}).get("max_pixels") or record.get("max_pixels")
    except (OSError, ValueError, AttributeError):
        return None


def reward_model_functions(specs: list, pictures: bool = False, plugins: bool = True) -> list:
    """--reward_model ...: each as a rewards.RewardFn named reward_model (reward_model_1, … for several), scoring
    with its --reward_model_plugin: default, the score head (RewardModelScorer), unless an --external_plugins file
    registered its own `default` (ms-swift reads the registry after the plugins ran); another, the plugin over the
    model (train/rl/reward_models.plugin_reward). specs: reward_models.RewardModelSpecs (or bare paths). pictures:
    the policy's prompts have pictures; a text reward model among them is said to score the text only. plugins
    False (PPO, as ms-swift's, calls no plugin): the score head always."""
    from tunesmith.train.rl.reward_models import RewardModelSpec, overrides_default, plugin_reward
    from tunesmith.train.rl.scoring import RewardFn

    out = []
    for i, spec in enumerate(specs):
        spec = spec if isinstance(spec, RewardModelSpec) else RewardModelSpec(spec)
        head = not plugins or (spec.plugin == "default" and not overrides_default(spec))
        fn = RewardModelScorer(spec.path, spec=spec) if head else plugin_reward(spec)
        out.append(RewardFn("reward_model" if len(specs) == 1 else f"reward_model_{i + 1}", spec.path, fn))
        if pictures and isinstance(fn, RewardModelScorer) and fn.encoder is None:
            note(f"--reward_model {spec.path}: a text reward model; it scores the completions' text without the "
                 f"prompts' pictures (a vision-language reward model, trained with --rlhf_type rm on image pairs, "
                 f"would see them)")
    return out

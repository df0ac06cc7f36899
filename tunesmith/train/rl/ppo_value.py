"""PPO's value model (the critic): a sequence-classification model whose score head, applied at every position
instead of the last only, gives V(s_t) for each completion token — TRL's PolicyAndValueWrapper/get_reward form.

Where it starts, as ms-swift (pipelines/train/rlhf.py: the value model is `--reward_model` loaded again, trainable,
with the run's tuner): a copy of the reward model, trained with the policy's --train_type (LoRA: a fresh adapter
on it, or the reward model's own LoRA adapter continued, with its score head trained in full; full: every weight).
Starting from the reward model gives the critic a head that already reads the reward off the hidden states, so the
values are useful from the first rounds. With --reward_funcs only (no reward model to copy) it is --model with a
fresh score head (TRL's examples do the same with their SFT model when no reward model fits).

It trains beside the policy, not inside the loop's optimiser: its own optimiser (the run's --optim, learning rate
and schedule; clipped to --max_grad_norm apart from the policy) steps right after the policy's
(loop.Objective.after_update), from the gradient the same backward pass gave it (loss = policy loss + vf_coef ·
value loss). Its trained weights and optimiser state go into every checkpoint (checkpoint-N/value_model/), so a
resumed run continues exactly; the folder also loads on its own as a reward/value model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

from tunesmith.errors import ConfigError
from tunesmith.log import note


def is_adapter_folder(path: str) -> bool:
    """A local LoRA adapter folder: adapter_config.json and no config.json of its own."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and \
        not os.path.isfile(os.path.join(path, "config.json"))


def value_source(model_cfg, reward_model) -> tuple:
    """(the model slice to load the value model with, a description) by ms-swift's rule: the --reward_model
    checkpoint (full: its folder, at --reward_model_revision; a LoRA adapter of --rlhf_type rm — the folder itself,
    or --reward_adapters over it —: its base with the adapter, continued), else --model with a fresh score head (no
    --adapters: an SFT adapter is a causal-LM adapter, not a critic's). reward_model: a reward_models.RewardModelSpec,
    a path, or None. Raises ConfigError for a LoRA reward model with --train_type full (peft cannot train it in
    full), and for an adapter as --reward_model with --reward_adapters (two adapters: the value model continues
    one)."""
    from tunesmith.train.rl.reward_models import RewardModelSpec

    if reward_model is None:
        return dataclasses.replace(model_cfg, adapters=[]), f"{model_cfg.model} with a fresh score head"
    spec = reward_model if isinstance(reward_model, RewardModelSpec) else RewardModelSpec(reward_model)
    path = spec.path
    config = os.path.join(path, "adapter_config.json")
    if not spec.adapters and not os.path.isfile(config):
        return dataclasses.replace(model_cfg, model=path, adapters=[], model_revision=spec.revision), \
            f"a trainable copy of the reward model {path}"
    adapter = spec.adapters[0] if spec.adapters else path
    if spec.adapters and is_adapter_folder(path):
        raise ConfigError(f"--reward_model {path} is a LoRA adapter, and --reward_adapters {adapter} another: PPO's "
                          f"value model continues one adapter; pass one of them")
    if model_cfg.train_type != "lora":
        raise ConfigError(f"--reward_model {path}: its score comes with the LoRA adapter {adapter}, and PPO's value "
                          f"model starts as a copy of it trained with --train_type {model_cfg.train_type}, which "
                          f"peft cannot do to an adapter: train with --train_type lora (the adapter is continued), "
                          f"or give a full reward model (a --rlhf_type rm run with --train_type full)")
    if spec.adapters:
        return dataclasses.replace(model_cfg, model=path, adapters=[adapter], model_revision=spec.revision), \
            f"a trainable copy of the reward model {path} (its LoRA adapter {adapter} continued)"
    with open(config, encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path") or model_cfg.model
    return dataclasses.replace(model_cfg, model=base, adapters=[path]), \
        f"a trainable copy of the reward model {path} (its LoRA adapter continued on {base})"


def build_value_model(model_cfg, reward_model, tokenizer, optim, device,
                      resume_optimizer: bool = True) -> "ValueModel":
    """The value model (`value_source`) loaded as a sequence classifier with one output, the run's tuner attached,
    dropout off, on `device`, with its optimiser (optimisation slice `optim`). resume_optimizer False
    (--resume_only_model): a resumed run restores its weights only, with a new optimiser, as the policy's."""
    from tunesmith.train.reference import disable_dropout
    from tunesmith.train.rl.reward_checks import adapter_fit_problem
    from tunesmith.train.setup import prepare_model

    cfg, describe = value_source(model_cfg, reward_model)
    model_dir = value_model_dir(cfg, reward_model)
    for adapter in cfg.adapters:  # a hub id's shapes are known once it is downloaded
        problem = adapter_fit_problem(adapter, model_dir, shown=getattr(reward_model, "path", reward_model))
        if problem:
            raise ConfigError(problem)
    note(f"PPO value model: {describe}")
    model, _ = prepare_model(cfg, model_dir, tokenizer, optim.seed, head="seq_cls")
    disable_dropout(model, has_reference=False)
    model.to(device)
    model.train()
    return ValueModel(model, optim, describe, resume_optimizer)


def value_model_dir(cfg, reward_model) -> str:
    """The local folder of the value model's weights (`value_source`'s model: downloaded at its revision when a
    hub id). Raises ConfigError naming the flag the folder came from: --reward_model (or its adapter's base), or
    --model when there is no reward model."""
    from tunesmith.models.load import resolve_model_dir

    try:
        return resolve_model_dir(cfg.model, cfg.use_hf, cfg.model_revision, cfg.hub_token)
    except ConfigError as e:
        if reward_model is None:
            raise
        path = getattr(reward_model, "path", reward_model)
        flag = "--reward_model " if cfg.model == path else f"the base model of --reward_model {path}: "
        raise ConfigError(str(e).replace("--model ", flag, 1)) from None


class ValueModel:
    """The critic and its optimiser; a loop hook (begin/after_step/save/load) whose `update` is an
    Objective.after_update."""

    DIR = "value_model"          # in each checkpoint: the trained weights as peft/transformers save them
    OPTIMIZER = "optimizer.pt"   # beside them: the optimiser's state

    def __init__(self, model, optim, describe: str, resume_optimizer: bool = True):
        from tunesmith.train.optim import build_optimizer

        self.model, self.optim, self.describe, self.resume_optimizer = model, optim, describe, resume_optimizer
        self.optimizer = build_optimizer(model, optim)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scheduler = None    # built at the first update, when the run's total steps are known
        self.skipped = 0         # updates left out because the value gradient was not finite

    def values(self, batch: dict):
        """V(s_t) [B, C] (float32) for each completion token of a batch from ppo_rollouts.ppo_collate: the score
        head on the final hidden state at the position before the token (the state the token is sampled in:
        prompt + the completion so far), 0 off the completion mask; with gradient when it is enabled."""
        from tunesmith.models.load import unwrap_model

        inner = unwrap_model(self.model)  # the transformers classifier, LoRA layers in place
        backbone = getattr(inner, inner.base_model_prefix)
        ids, mask = batch["input_ids"], batch["completion_mask"]
        hidden = backbone(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        p = ids.shape[1] - mask.shape[1]
        values = inner.score(hidden[:, p - 1:ids.shape[1] - 1]).squeeze(-1).float()
        return values * mask.to(values.dtype)

    def update(self, policy, step: int, total_steps: int) -> None:
        """After the policy's update of optimiser step `step` (of `total_steps`): clip the value gradient to
        --max_grad_norm, step the value optimiser at the learning rate the policy's step used (the same
        schedule), clear the gradient. A non-finite value gradient is not applied (counted in `skipped`)."""
        import math

        import torch

        from tunesmith.train.optim import build_scheduler

        if self.scheduler is None:  # the schedule as far as the policy's is: step - 1 steps done
            self.scheduler = build_scheduler(self.optimizer, self.optim, total_steps)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": replaying the schedule
                for _ in range(step - 1):
                    self.scheduler.step()
        grads = [p for p in self.params if p.grad is not None]
        limit = self.optim.max_grad_norm if self.optim.max_grad_norm and self.optim.max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(grads, limit)) if grads else 0.0
        if math.isfinite(norm):
            self.optimizer.step()
        else:
            self.skipped += 1
            note(f"PPO: the value model's gradient at step {step} is not finite; its update is skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def begin(self, model, step: int) -> None:
        """Nothing to set up (loop hook)."""

    def after_step(self, model, step: int) -> None:
        """Nothing moves between steps beyond `update` (loop hook)."""

    def save(self, path: str) -> None:
        """The value model's trained weights (save_pretrained: the adapter with its score head, or the whole
        classifier) and its optimiser state into path/value_model."""
        import torch

        out = os.path.join(path, self.DIR)
        self.model.save_pretrained(out, safe_serialization=True)
        torch.save(self.optimizer.state_dict(), os.path.join(out, self.OPTIMIZER))

    def load(self, path: str) -> None:
        """Restore what `save` wrote (a resumed run; the optimiser state unless --resume_only_model). Raises
        ConfigError when the checkpoint has no value model."""
        import torch

        from tunesmith.train.checkpoint import load_model_weights

        folder = os.path.join(path, self.DIR)
        if not os.path.isdir(folder):
            raise ConfigError(f"--resume_from_checkpoint {path}: no {self.DIR}/ in it, so PPO's value model cannot be "
                              f"restored (is it a checkpoint of a --rlhf_type ppo run?)")
        load_model_weights(self.model, folder)
        f = os.path.join(folder, self.OPTIMIZER)
        if self.resume_optimizer and os.path.isfile(f):
            self.optimizer.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))

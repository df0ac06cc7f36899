"""What the preference methods share, and nothing method-specific: per-sequence log-probs of the trained tokens
(`sequence_logps`), the reference model (`Reference`, `setup_reference`: the adapter switched off, a frozen
reference adapter, a separate model, or cached log-probs), GKD's teacher (`setup_teacher`: the same kinds, and the
student itself) and `disable_dropout`. pairs.py (DPO, CPO, SimPO, ORPO), kto.py and gkd.py import from here; this
module imports no method, so there is no import cycle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from tunesmith.errors import ConfigError
from tunesmith.models.load import load_model, note, resolve_model_dir
from tunesmith.models.checkpoint import is_adapter_dir
from tunesmith.models.tuners import MUTATING_INITS, WHOLE_MODEL


@dataclass
class SeqLogps:
    logps: Any          # [S] summed log-probs of each sequence's trained tokens (weighted by ld_alpha if given)
    n: Any              # [S] trained tokens per sequence
    logits_sum: Any     # [S] sum over trained tokens of the vocabulary-mean logit (detached; for logits/*)
    token_logps: Any    # [N] per-token log-probs, N = all trained positions
    rows: Any           # [N] which sequence each trained position belongs to
    aux_loss: Any = None


def sequence_logps(model, batch: dict, ld_alpha: Optional[float] = None, n_pairs: Optional[int] = None) -> SeqLogps:
    """Per-sequence sums of the trained (completion) tokens' log-probs (train/token_logps.py computes them
    without materialising the logits). With ld_alpha (LD-DPO, Liu et al. 2024, arXiv:2409.06411) the tokens of a
    completion beyond the shorter completion of its pair are weighted by ld_alpha (TRL's form)."""
    import torch

    from tunesmith.train.ops.token_logps import token_logps

    t = token_logps(model, batch)
    rows, n_seq = t.rows, t.n_seq
    n = torch.bincount(rows, minlength=n_seq)
    weights = None
    if ld_alpha is not None and n_pairs:
        # the rank of each trained position within its sequence; a sequence's positions are in order but may be
        # interleaved with other sequences' (packed and prefix-shared rows), hence the stable sort
        order = torch.sort(rows, stable=True).indices
        start = torch.cumsum(n, 0) - n                           # first trained position of each sequence
        pos = torch.empty_like(rows)
        pos[order] = torch.arange(rows.numel(), device=rows.device) - start[rows[order]]
        public = torch.minimum(n[:n_pairs], n[n_pairs:]).repeat(2)
        weights = torch.where(pos < public[rows], 1.0, ld_alpha)
    contrib = t.logps if weights is None else t.logps * weights
    logps = torch.zeros(n_seq, device=contrib.device, dtype=contrib.dtype).index_add(0, rows, contrib)
    logits_sum = torch.zeros(n_seq, device=contrib.device).index_add(0, rows, t.logits_mean)
    return SeqLogps(logps, n, logits_sum, t.logps, rows, t.aux_loss)


def unwrap(model):
    """The PeftModel / transformers model under an accelerate/DDP wrapper (peft layer kept: adapters switch)."""
    from tunesmith.models.load import unwrap_model
    return unwrap_model(model, peft=False)


# ------------------------------------------------------------------ the reference

@dataclass
class Reference:
    """Where the reference log-probs come from. kind: none | adapter_off | ref_adapter | model | cached | policy
    (GKD's self-distillation: the policy itself as it is now, without gradient)."""
    kind: str
    describe: str
    model: Any = None
    calls: int = field(default=0)
    sync_steps: int = 0       # --sync_ref_model: optimiser steps between updates (0: the reference stays fixed)
    alpha: float = 0.6        # --ref_model_mixup_alpha
    offload: bool = False     # kind model: kept in CPU memory, on the batch's device only for its forward passes
    placed: bool = False      # kind model: a DeepSpeed engine (--teacher_deepspeed), which keeps its own placement

    # a checkpoint's copy of a moving reference (resume restores it); in a subfolder, so that nothing that reads
    # the checkpoint's own *.safetensors as the policy's weights picks it up
    SYNC_FILE = os.path.join("reference", "model.safetensors")

    def begin(self, policy, step: int) -> None:
        """Nothing to set up before the first step (loop.Objective.hooks)."""

    def after_step(self, policy, step: int) -> None:
        """TR-DPO's reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
        Alignment", eq. 5; TRL's SyncRefModelCallback): every `sync_steps` optimiser steps,
        θ_ref ← α·θ_policy + (1 − α)·θ_ref, parameter by parameter, in place."""
        import torch

        if not self.sync_steps or step % self.sync_steps:
            return
        mine = dict(unwrap(policy).named_parameters())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                src = mine[name]
                p.mul_(1.0 - self.alpha).add_(src.detach().to(device=p.device, dtype=p.dtype), alpha=self.alpha)

    def save(self, path: str) -> None:
        """A moving reference is part of the training state: its weights go into the checkpoint folder."""
        from safetensors.torch import save_model

        if self.sync_steps:
            os.makedirs(os.path.join(path, os.path.dirname(self.SYNC_FILE)), exist_ok=True)
            save_model(self.model, os.path.join(path, self.SYNC_FILE))

    def load(self, path: str) -> None:
        """Restore the reference saved by `save` (raises ConfigError when the checkpoint lacks it)."""
        from safetensors.torch import load_model as load_weights

        if not self.sync_steps:
            return
        f = os.path.join(path, self.SYNC_FILE)
        if not os.path.isfile(f):
            raise ConfigError(f"--resume_from_checkpoint {path}: no {self.SYNC_FILE} in it, so the reference "
                              f"--sync_ref_model moved cannot be restored (was the checkpoint saved without "
                              f"--sync_ref_model?); resume without --sync_ref_model, or from a checkpoint of this run")
        load_weights(self.model, f, device=str(next(self.model.parameters()).device))

    def logps(self, policy, batch: dict):
        """Reference log-probs of the batch's sequences (no gradient). Called before the policy's forward pass
        because switching adapters toggles requires_grad, which must not happen inside a live graph."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.token_logps(policy, batch, lambda model, b: sequence_logps(model, b).logps)

    def token_logps(self, policy, batch: dict, compute):
        """`compute(model, batch)` (any log-prob function: per sequence, per token) run without gradient on the
        reference: the policy with its adapter off, the frozen "ref" adapter, or the separate model."""
        import torch

        with torch.no_grad():
            if self.kind == "adapter_off":
                peft_model = unwrap(policy)
                with peft_model.disable_adapter():
                    return compute(peft_model, batch)
            if self.kind == "ref_adapter":
                peft_model = unwrap(policy)
                peft_model.set_adapter("ref", inference_mode=True)
                try:
                    return compute(peft_model, batch)
                finally:
                    peft_model.set_adapter("default")  # trainable again; "ref" stays frozen
            if self.kind == "model":
                device = batch["input_ids"].device
                if not self.placed and next(self.model.parameters()).device != device:
                    self.model.to(device)
                try:
                    return compute(self.model, batch)
                finally:
                    if self.offload:  # what compute returned holds its own references to the device tensors
                        self.model.to("cpu")
            if self.kind == "policy":
                return compute(policy, batch)
        raise RuntimeError(f"no reference log-probs for reference kind {self.kind!r}")


def setup_reference(model_cfg, ref_model: Optional[str], ref_adapters_flag: list, model, tokenizer,
                    sync: Optional[tuple[int, float]] = None) -> Reference:
    """The reference for this run (model slice plus the method's --ref_model/--ref_adapters), never the policy
    itself and never silently the raw base when training continues from an SFT adapter: with LoRA (or another peft
    tuner) the adapter switched off, or a frozen copy of --ref_adapters / the --adapters start; with full training
    (and LLaMA-Pro) a frozen copy of --ref_model (default --model). sync: (--ref_model_sync_steps, --ref_model_mixup_alpha) with --sync_ref_model
    (full training only; checked by config.check). Raises ConfigError for a reference that is not separate from
    the policy, one whose parameters differ from the policy's when syncing, or flags that do not fit the train
    type."""
    if model_cfg.train_type not in WHOLE_MODEL:  # a peft adapter (LoRA, AdaLoRA, VeRA, ...)
        if ref_model:
            raise ConfigError("--ref_model is for full training. With LoRA the reference is the base model with the "
                              "adapter switched off (no second copy in memory); to use an SFT adapter as the "
                              "reference pass --ref_adapters CKPT")
        ref_adapters = list(ref_adapters_flag) or list(model_cfg.adapters)
        if len(ref_adapters) > 1:
            raise ConfigError("--ref_adapters: pass one adapter (the model the policy starts from)")
        if not ref_adapters:
            return Reference("adapter_off", "--model with the LoRA adapter switched off (shared weights, no copy)")
        path = ref_adapters[0]
        if not is_adapter_dir(path):
            raise ConfigError(f"--ref_adapters {path}: not an adapter directory (no adapter_config.json)")
        if not ref_adapters_flag:
            note(f"reference: the SFT model from --adapters {path} (a frozen copy of the adapter), not the bare base "
                 f"model; pass --ref_adapters to choose another")
        peft_model = unwrap(model)
        try:
            peft_model.load_adapter(path, adapter_name="ref", is_trainable=False)
        except Exception as e:  # e.g. LoRA on raw parameters (MoE experts) cannot hold two adapters (peft#3340)
            raise ConfigError(f"--ref_adapters {path}: peft could not load it as a second, frozen adapter ({e}). "
                              f"Merge it first (tunesmith export --adapters {path} --merge_lora true) and train on "
                              f"the merged model with --model") from None
        peft_model.set_adapter("default")
        _check_not_shared(model, peft_model, "ref")
        return Reference("ref_adapter", f"{path} (a frozen copy of the adapter on the shared base weights)")
    ref_path = ref_model or model_cfg.model
    ref_dir = resolve_model_dir(ref_path, model_cfg.use_hf, model_cfg.model_revision, model_cfg.hub_token)
    ref = load_model(model_cfg, ref_dir, tokenizer, for_training=False)
    describe = f"{ref_path} (a frozen copy)"
    if ref_adapters_flag:
        from peft import PeftModel
        if len(ref_adapters_flag) > 1:
            raise ConfigError("--ref_adapters: pass one adapter")
        ref = PeftModel.from_pretrained(ref, ref_adapters_flag[0]).merge_and_unload()
        describe = f"{ref_path} merged with {ref_adapters_flag[0]} (a frozen copy)"
    ref.eval()
    ref.requires_grad_(False)
    _check_separate(model, ref)
    reference = Reference("model", describe, model=ref)
    if sync is not None:
        _check_mixable(model, ref, ref_path)
        steps, alpha = sync
        reference = Reference("model", describe + f", moved towards the policy every {steps} steps "
                              f"(α = {alpha:g})", model=ref, sync_steps=steps, alpha=alpha)
    return reference


def setup_teacher(model_cfg, teacher_model: Optional[str], teacher_adapters: list, revision: Optional[str],
                  offload: bool, model, tokenizer, wrap=None) -> Reference:
    """GKD's teacher, by ms-swift's rule (arguments/rlhf_args.py `_check_teacher`): no --teacher_model is
    self-distillation (the student itself as it is at each step); --teacher_model equal to --model with LoRA and no
    --teacher_adapters is the model with the adapter switched off (no copy; ms-swift's disable_adapter teacher);
    otherwise a frozen model loaded like the student (--torch_dtype, attention, quantisation) at
    --teacher_model_revision, with --teacher_adapters merged in, in CPU memory between its forward passes with
    `offload`. wrap (--teacher_deepspeed): a function of the loaded teacher giving (its DeepSpeed engine, the ZeRO
    stage), `distributed.teacher_engine`. Raises ConfigError for a teacher whose tokenizer differs from the
    student's, whose output layer has fewer rows than the tokenizer has tokens, or that shares weights with the
    student, and for `wrap` without a separate teacher model to wrap."""
    if teacher_model is None:
        _nothing_to_wrap(wrap)
        return Reference("policy", "the student itself, as it is at each step (self-distillation: no "
                         "--teacher_model)")
    if _is_adapter_off(model_cfg, teacher_model, teacher_adapters):
        if not str(model_cfg.init_weights).lower().startswith(MUTATING_INITS) or model_cfg.adapters:
            _nothing_to_wrap(wrap)
            start = f" (the base under --adapters {model_cfg.adapters[0]})" if model_cfg.adapters else ""
            return Reference("adapter_off", f"--model with the LoRA adapter switched off{start} (shared weights, "
                             f"no copy)")
        note(f"--init_weights {model_cfg.init_weights} moves part of every targeted weight into the adapter, so "
             f"the teacher is a frozen copy of --teacher_model, not the model with the adapter switched off")
    return _load_teacher(model_cfg, teacher_model, list(teacher_adapters), revision, offload, model, tokenizer, wrap)


def _nothing_to_wrap(wrap) -> None:
    """--teacher_deepspeed with a teacher that is the student itself: ConfigError (nothing separate to shard)."""
    if wrap is not None:
        raise ConfigError("--teacher_deepspeed: the teacher here is the student itself (no --teacher_model, or "
                          "--teacher_model equal to --model with LoRA: the adapter switched off), so there is no "
                          "separate teacher model for DeepSpeed to shard; drop --teacher_deepspeed")


def _is_adapter_off(model_cfg, teacher_model: str, teacher_adapters: list) -> bool:
    """Whether the teacher is --model under LoRA with its adapter switched off: --teacher_model names --model (the
    same id, or the same folder) and no --teacher_adapters are merged into it."""
    same = teacher_model == model_cfg.model or (os.path.isdir(teacher_model) and os.path.isdir(model_cfg.model or "")
                                               and os.path.samefile(teacher_model, model_cfg.model))
    return same and model_cfg.train_type == "lora" and not teacher_adapters


def _load_teacher(model_cfg, path: str, adapters: list, revision: Optional[str], offload: bool, model,
                  tokenizer, wrap=None) -> Reference:
    """A separate frozen teacher (`setup_teacher`), checked against the student's tokenizer."""
    import dataclasses

    teacher_dir = resolve_model_dir(path, model_cfg.use_hf, revision, model_cfg.hub_token)
    _check_teacher_vocabulary(path, teacher_dir, tokenizer, model_cfg.trust_remote_code)
    cfg = dataclasses.replace(model_cfg, model=path, model_revision=revision, router_aux_loss_coef=0.0)
    teacher = load_model(cfg, teacher_dir, None, for_training=False)
    describe = f"{path} (frozen)"
    if adapters:
        from peft import PeftModel

        for adapter in adapters:
            teacher = PeftModel.from_pretrained(teacher, adapter).merge_and_unload()
        describe = f"{path} merged with {' and '.join(adapters)} (frozen)"
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ConfigError(f"--teacher_model {path}: its output layer has {rows} rows, fewer than the {len(tokenizer)} "
                          f"tokens of the student's tokenizer, so it has no probability for some of the student's "
                          f"tokens; use a teacher with the student's tokenizer")
    teacher.eval()
    teacher.requires_grad_(False)
    _check_separate(model, teacher)
    if wrap is not None:
        teacher, stage = wrap(teacher)
        describe += (f", sharded across the processes by DeepSpeed ZeRO-3 (--teacher_deepspeed)" if stage == 3 else
                     ", a whole copy on each process under DeepSpeed stage 0 (--teacher_deepspeed: only ZeRO-3 "
                     "shards a frozen model)")
        return Reference("model", describe, model=teacher, placed=True)
    if offload:
        teacher.to("cpu")
        describe += ", in CPU memory between its forward passes (--offload_teacher_model)"
    return Reference("model", describe, model=teacher, offload=offload)


def _check_teacher_vocabulary(path: str, teacher_dir: str, tokenizer, trust_remote_code: bool) -> None:
    """GKD compares the two models' distributions token id by token id: the teacher's tokenizer must map every
    token to the id the student's does (the teacher's output layer may have more padding rows: ms-swift's
    alignment takes care of those). A teacher folder without a tokenizer is checked by its output layer only."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=trust_remote_code).get_vocab()
    except (OSError, ValueError):
        note(f"--teacher_model {path}: no tokenizer in it, so GKD cannot check that it shares the student's "
             f"vocabulary; make sure it does")
        return
    ours = tokenizer.get_vocab()
    if theirs == ours:
        return
    diff = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])
    token, tid = diff[0]
    where = "the teacher's" if theirs.get(token) == tid else "the student's"
    raise ConfigError(f"--teacher_model {path}: its tokenizer differs from the student's ({len(theirs)} tokens "
                      f"against {len(ours)}; e.g. {token!r} is id {tid} in {where} only). GKD compares the two "
                      f"models' next-token distributions token by token, so they need the same vocabulary: use a "
                      f"teacher of the student's family (e.g. Qwen2.5-7B-Instruct for Qwen2.5-0.5B-Instruct)")


def _check_mixable(policy, ref, ref_path: str) -> None:
    """--sync_ref_model mixes parameters by name: the reference must have exactly the policy's (names, shapes)."""
    mine = {n: tuple(p.shape) for n, p in unwrap(policy).named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))
        raise ConfigError(f"--sync_ref_model: the reference {ref_path} does not have the policy's parameters "
                          f"(first difference: {diff[0][0]} {diff[0][1]}), so the policy cannot be mixed into it; "
                          f"use a --ref_model of the same architecture and size, or drop --sync_ref_model")


def _check_separate(policy, ref) -> None:
    """A reference model sharing tensors with the policy moves with it: the loss would stay at ln 2."""
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    if any(p.data_ptr() in policy_storage for p in ref.parameters()):
        raise ConfigError("the reference model shares weights with the policy, so it would move with training "
                          "and the DPO loss would stay at ln 2; it must be a separate frozen copy")


def _check_not_shared(model, peft_model, ref_name: str) -> None:
    """The frozen reference adapter must be its own tensors, never the trained adapter's."""
    trained = {p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    shared = [n for n, p in peft_model.named_parameters() if f".{ref_name}." in n and
              (p.requires_grad or p.data_ptr() in trained)]
    if shared:
        raise ConfigError(f"the reference adapter is not a frozen copy ({shared[0]}); it would move with training")


def disable_dropout(model, has_reference: bool = True) -> int:
    """Set every dropout probability to 0 and say so (TRL's and ms-swift's default for preference training):
    dropout would make the policy differ from the reference for no reason, and the pair terms noisy. Returns the
    number of dropout layers changed."""
    import torch

    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p = 0.0
            changed += 1
    if changed:
        note("dropout disabled for preference and RL training (as TRL and ms-swift do)"
             + (", so the policy starts equal to the reference" if has_reference else ""))
    return changed

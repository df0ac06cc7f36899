"""`tunesmith sft`, `tunesmith rlhf`, `tunesmith dpo`: the one training recipe, read top to bottom.

    check the flags, all problems at once (train/config.py) → join the process group → resolve the flags → load and encode the data (data/prepare.py) → load the model →
    the reference (preference methods) → the method's batches → train (train/loop.py) → finish the run

From here to the optimiser is three frames: recipe.main → loop.train (the epoch/step loop; logging, evaluation and
checkpoints when due) → loop.train_step (forward, backward, clip) → optimizer.step().

Everything a training method decides is in its method object, one per file: sft.py (SFT), dpo.py (the DPO family),
cpo.py (CPO and SimPO), orpo.py (ORPO), kto.py (KTO), grpo.py (GRPO; rollouts.py generates its units), gkd.py (GKD,
distillation from a teacher), ppo.py (PPO; rl/ppo_rollouts.py and rl/ppo_value.py), rm.py (reward models);
pairs.py holds what the pair methods share. The recipe and the loop know nothing method-specific. A method
object has:

    name, rows ("sft" | "preference" | "kto": how rows are encoded; "prompt": prompts to generate from),
    head ("causal_lm" | "seq_cls": the model class trained), default_loss_scale, needs_reference,
    streams (optional, default False: whether --streaming may feed it rows read on the fly)
    from_args(args, problems)   its flags, checked (problems appended) and finalised  [classmethod]
    resolved_flags()            the finalised flags, recorded in args.json
    shape_records(loaded)       the loaded records as the method reads them (pairs checked, KTO's pairs split)
    ref_model, ref_adapters     where needs_reference: the reference flags
    batches(cfg, prepared, model, reference) -> setup.Batches  its units and collator (packing, prefix sharing, …)
    objective(reference, cfg) -> loop.Objective           its loss: summed terms, their units, its metrics
    header(prepared, batches) -> str                      how the run describes itself in the log
"""
from __future__ import annotations

import dataclasses

from tunesmith.config.commands import RLHFArguments
from tunesmith.train import loop
from tunesmith.train.knobs.lisa import lisa_hooks
from tunesmith.train.setup import check_disk, finish_run, prepare_data, prepare_model, save_model_fn, start_run


def method_for(args):
    """The method object class for the parsed command: SFT for `sft`, else by --rlhf_type."""
    if not isinstance(args, RLHFArguments):
        from tunesmith.train.methods.sft import SFT
        return SFT
    kind = args.rlhf_type
    if kind == "dpo":
        from tunesmith.train.methods.dpo import DPO
        return DPO
    if kind in ("cpo", "simpo"):
        from tunesmith.train.methods.cpo import CPO
        return CPO
    if kind == "orpo":
        from tunesmith.train.methods.orpo import ORPO
        return ORPO
    if kind == "kto":
        from tunesmith.train.methods.kto import KTO
        return KTO
    if kind == "grpo":
        from tunesmith.train.rl.grpo import GRPO
        return GRPO
    if kind == "gkd":
        from tunesmith.train.methods.gkd import GKD
        return GKD
    if kind == "ppo":
        from tunesmith.train.methods.ppo import PPO
        return PPO
    if kind == "rm":
        from tunesmith.train.methods.rm import RewardModel
        return RewardModel
    raise ValueError(f"no training method for --rlhf_type {kind!r}")  # the parser's choices stop this earlier


def configure(args, world_size: int = 1, cuda: bool = False):
    """(TrainConfig, method) for a parsed command, as `main` resolves it (for scripts and tests that want the
    resolved configuration without training). Raises ConfigError listing every problem."""
    from tunesmith.train.config import check, resolve

    method = check(args, method_for(args))
    return resolve(args, method, world_size, cuda), method


def main(args) -> dict:
    """Train with the method the command names; return {"run_dir", "state", "model", "tokenizer", "reference"}.
    Raises ConfigError / DataError (bad flags or data, before anything is written) and loop.TrainingDiverged."""
    from tunesmith.models.load import default_device
    from tunesmith.models.tuners import initial_adapter
    from tunesmith.train.allocator import return_freed_tensors_to_the_os
    from tunesmith.train.tuners import with_tuner
    from tunesmith.train import distributed as D
    from tunesmith.train.config import check, resolve
    from tunesmith.train.reference import setup_reference

    method = check(args, method_for(args))  # every flag problem at once, before torch is imported
    return_freed_tensors_to_the_os()  # activations' memory back to the OS when freed (train/allocator.py)
    # under torchrun: join the other processes; DeepSpeed and FSDP need a group even for one process
    D.init_process_group(alone=bool(args.deepspeed or args.fsdp))
    cfg = resolve(args, method, D.world_size(), cuda=default_device().type == "cuda")
    prepared = prepare_data(cfg.data, cfg.model, method)
    check_disk(cfg, prepared.model_dir)
    model, param_info = prepare_model(cfg.model, prepared.model_dir, prepared.tokenizer, cfg.optim.seed, method.head,
                                      prepared.train_rows)
    initial = initial_adapter(model, cfg.model)  # PiSSA, OLoRA, LoRA-GA: checkpoints are converted against it
    sync = (args.ref_model_sync_steps, args.ref_model_mixup_alpha) \
        if isinstance(args, RLHFArguments) and args.sync_ref_model else None
    reference = setup_reference(cfg.model, method.ref_model, method.ref_adapters, model, prepared.tokenizer, sync) \
        if method.needs_reference else None
    batches = method.batches(cfg, prepared, model, reference)
    if prepared.encoder.images is not None:  # a vision-language model: batches also carry their pictures' pixels
        from tunesmith.data.vision import with_pixels

        batches = dataclasses.replace(batches, collate=with_pixels(batches.collate, prepared.encoder.images))
    header = method.header(prepared, batches)
    with start_run(cfg, prepared, param_info, lambda d: f"{header}; run directory {d}") as out:
        if batches.on_run_dir is not None:
            batches.on_run_dir(out.run_dir, out.trackers)
        # training state beyond weights and optimiser, saved and restored with checkpoints: the method's (GRPO's
        # round in progress), a moving reference (--sync_ref_model, updated after each step) and LISA's layers
        hooks = tuple(batches.hooks) + ((batches.reference,) if sync is not None else ()) \
            + lisa_hooks(cfg.optim, model)  # LISA: which decoder layers train (--lisa_activated_layers)
        objective = dataclasses.replace(method.objective(batches.reference, cfg), hooks=hooks)
        objective = with_tuner(objective, model, cfg.model.train_type)  # AdaLoRA's penalty and rank allocation
        state = loop.train(cfg, model=model, objective=objective,
                           train_rows=batches.train, eval_rows=batches.eval, collate=batches.collate,
                           run_dir=out.run_dir, save_model=save_model_fn(prepared.tokenizer, initial, prepared.model_dir),
                           trackers=out.trackers, args_extra=out.args_extra)
    finish_run(state, out.run_dir, cfg.output.metric_for_best_model)
    return {"run_dir": out.run_dir, "state": state, "model": model, "tokenizer": prepared.tokenizer,
            "reference": batches.reference}

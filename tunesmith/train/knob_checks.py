"""The value checks of training's tuners and knobs (docs/tuners.md, docs/training.md "Training knobs"): --train_type
and each tuner's flags (`tuner_problems`), the optimiser plugins, LISA, partial full fine-tuning and NEFTune
(`knob_problems`), dataset interleaving and length grouping (`data_knob_problems`). Each returns one line per
problem; tunesmith.train.config.problems gathers them with the generic checks. Nothing is loaded here.
"""
from __future__ import annotations

import os

from tunesmith.config.checks import between
from tunesmith.config.commands import RLHFArguments
from tunesmith.config.slices import flag_values
from tunesmith.errors import ConfigError


def planned_world() -> int:
    """The processes this run has (WORLD_SIZE under torchrun), or will have once `tunesmith` relaunches itself
    (NPROC_PER_NODE x NNODES, ms-swift's variables)."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    try:
        return max(1, int(os.environ.get("NPROC_PER_NODE") or 1)) * max(1, int(os.environ.get("NNODES") or 1))
    except ValueError:
        return 1


# LoRA initialisations tunesmith does not run, and why (--init_weights)
_INITS_NOT_YET = {
    "loftq": "LoftQ replaces the base weights with their 4-bit quantised form, so its adapter fits only that changed "
             "base, which tunesmith does not save (ms-swift passes no LoftQConfig, so peft refuses it there too); for "
             "a quantised base train QLoRA (--quant_method bnb --quant_bits 4), for a start from the weights' "
             "principal directions use --init_weights pissa",
    "eva": "EVA initialises from the SVD of activations over training batches, a pass that tunesmith does not run "
           "yet (ms-swift does not either: it passes peft no data for it, and has no flags for its settings); use "
           "pissa, olora or lora-ga (which starts from the gradients of the first training rows)",
    "corda": "CorDA initialises from activation covariances over training batches, a pass that tunesmith does not "
             "run yet (ms-swift does not either, and has no flags for its settings); use pissa, olora or lora-ga",
}
_LORA_INITS = ("true", "false", "gaussian", "orthogonal", "pissa", "olora", "lora-ga", "lora_ga")


def tuner_problems(args) -> list[str]:
    """The problems of the tuner flags (--train_type and its ms-swift flags; docs/tuners.md), one line each: values
    out of range, --init_weights the tuner does not take, flags of LoRA alone with another tuner, and AdaLoRA's
    schedule against --max_steps and with DeepSpeed/FSDP (its allocation reads the gradients between the update and
    their clearing, which those engines do in one call)."""
    out: list[str] = []
    kind, init = args.train_type, str(args.init_weights).lower()
    if kind == "lora" and init in _INITS_NOT_YET:
        out.append(f"--init_weights {args.init_weights}: {_INITS_NOT_YET[init]}")
    elif kind == "lora" and init not in _LORA_INITS and not init.startswith("pissa_niter_"):
        out.append(f"--init_weights {args.init_weights}: not a LoRA initialisation; one of "
                   f"{', '.join(_LORA_INITS[:-1])}, pissa_niter_N")
    elif kind == "lora" and init in ("lora-ga", "lora_ga") and not args.adapters:
        out += _lora_ga_problems(args)
    elif kind == "lora" and init == "orthogonal" and args.lora_rank % 2:
        out.append(f"--init_weights orthogonal splits a random rotation in two halves: --lora_rank must be even, "
                   f"not {args.lora_rank}")
    allowed = {"adalora": ("true", "false"), "bone": ("true", "false", "bat")}.get(kind)
    if allowed and init not in allowed:
        out.append(f"--init_weights {args.init_weights}: --train_type {kind} takes {', '.join(allowed)}")
    if kind not in ("lora", "full") and (args.use_dora or args.target_parameters):
        out.append(f"--{'use_dora' if args.use_dora else 'target_parameters'} is LoRA's; --train_type {kind} has no "
                   f"such variant: drop it, or train --train_type lora")
    if kind == "adalora":
        out += _adalora_problems(args)
    elif kind == "vera":
        between(out, "vera_rank", args.vera_rank, 1, None, hint="ms-swift's default is 256")
        between(out, "vera_dropout", args.vera_dropout, 0, 1, hi_open=True)
    elif kind == "boft":
        between(out, "boft_dropout", args.boft_dropout, 0, 1, hi_open=True)
        between(out, "boft_n_butterfly_factor", args.boft_n_butterfly_factor, 1, None)
        if (args.boft_block_size > 0) == (args.boft_block_num > 0):
            out.append(f"--boft_block_size {args.boft_block_size} --boft_block_num {args.boft_block_num}: BOFT takes "
                       f"one of them (peft's rule): give --boft_block_size 0 with --boft_block_num N, or "
                       f"--boft_block_num 0 (the default) with --boft_block_size N")
    elif kind == "fourierft":
        between(out, "fourier_n_frequency", args.fourier_n_frequency, 1, None, hint="ms-swift's default is 2000")
    elif kind == "bone":
        between(out, "reft_rank", args.reft_rank, 1, None, hint="bone's rank; ms-swift's default is 4")
    elif kind == "llamapro":
        between(out, "llamapro_num_new_blocks", args.llamapro_num_new_blocks, 1, None)
        if args.llamapro_num_groups is not None:
            between(out, "llamapro_num_groups", args.llamapro_num_groups, 1, None)
    return out


def _lora_ga_problems(args) -> list[str]:
    """LoRA-GA estimates its start from the gradients of the first training rows before the model is wrapped: the
    rows must be encoded up front, on a full-precision base, for a causal LM."""
    out: list[str] = []
    for name in ("lora_ga_batch_size", "lora_ga_iters", "lora_ga_max_length", "lora_ga_stable_gamma"):
        between(out, name, flag_values(args)[name], 1, None)
    method = args.rlhf_type if isinstance(args, RLHFArguments) else "sft"
    why = ("--streaming (the rows are read as training goes)" if args.streaming else
           "--quant_method (peft needs full-precision gradients)" if args.quant_method else
           f"--rlhf_type {method} (" + ("a reward model has no causal-LM loss" if method == "rm" else
                                         "its rows are prompts, not encoded sequences") + ")"
           if method in ("rm", "grpo") else None)
    if why:
        out.append(f"--init_weights lora-ga estimates its start from the gradients of the first training rows, "
                   f"which cannot be done with {why}; use --init_weights pissa or true")
    return out


def _adalora_problems(args) -> list[str]:
    out: list[str] = []
    between(out, "adalora_init_r", args.adalora_init_r, 1, None, hint="ms-swift's default is 12")
    between(out, "adalora_target_r", args.adalora_target_r, 1, args.adalora_init_r,
            hint="the average rank kept, at most --adalora_init_r")
    between(out, "adalora_deltaT", args.adalora_deltaT, 1, None)
    for name in ("adalora_tinit", "adalora_tfinal", "adalora_orth_reg_weight"):
        between(out, name, flag_values(args)[name], 0, None)
    for name in ("adalora_beta1", "adalora_beta2"):
        between(out, name, flag_values(args)[name], 0, 1, hi_open=True)
    if 0 < args.max_steps <= args.adalora_tinit + args.adalora_tfinal:
        out.append(f"--adalora_tinit {args.adalora_tinit} and --adalora_tfinal {args.adalora_tfinal} leave no step of "
                   f"--max_steps {args.max_steps} for AdaLoRA to allocate ranks in (peft needs tinit below max_steps "
                   f"minus tfinal); lower them or raise --max_steps")
    if args.deepspeed or args.fsdp:
        out.append(f"--train_type adalora with --{'deepspeed' if args.deepspeed else 'fsdp'} is not supported yet: "
                   f"AdaLoRA allocates its ranks from the gradients after each update, which that engine clears in "
                   f"the same call; use DDP (NPROC_PER_NODE alone)")
    return out


def knob_problems(args) -> list[str]:
    """ms-swift's training knobs (issue #32): the optimiser plugins (one at a time; LoRA+ needs LoRA, GaLore and LISA
    full training and one unsharded process group), LISA's counts, partial full fine-tuning (full only, valid
    regexes), NEFTune's alpha, --optim_args (Muon's). One problem per flag."""
    out: list[str] = []
    sharded = args.deepspeed or args.fsdp
    plugins = {p for p in ((args.optimizer if args.optimizer != "default" else None),
                           "lorap" if args.lorap_lr_ratio else None, "galore" if args.use_galore else None) if p}
    if len(plugins) > 1:
        out.append(f"--optimizer/--lorap_lr_ratio/--use_galore ask for {' and '.join(sorted(plugins))}: one "
                   f"optimiser plugin at a time")
    if args.lorap_lr_ratio is not None:
        between(out, "lorap_lr_ratio", args.lorap_lr_ratio, 0, None, lo_open=True, hint="16 is usual")
    if "lorap" in plugins and args.train_type != "lora":
        out.append("LoRA+ (--lorap_lr_ratio) sets the LoRA B matrices' learning rate: use it with --train_type lora")
    if args.optimizer == "lorap" and not args.lorap_lr_ratio:
        out.append("--optimizer lorap needs --lorap_lr_ratio (the B matrices' learning-rate ratio, e.g. 16)")
    if "galore" in plugins:
        out += _galore_problems(args, sharded)
    if args.optimizer == "muon" and sharded:
        out.append("--optimizer muon with --deepspeed/--fsdp is not supported yet (Muon orthogonalises whole "
                   "matrices, which are sharded there); train with DDP or in one process")
    if args.optim_args and args.optimizer != "muon":
        out.append("--optim_args sets Muon's momentum, ns_steps and nesterov: use it with --optimizer muon")
    elif args.optim_args:
        from tunesmith.train.knobs.muon import muon_args

        try:
            muon_args(args.optim_args)
        except ConfigError as e:
            out.append(str(e))
    out += _lisa_problems(args, sharded) + _freeze_problems(args)
    if args.neftune_noise_alpha is not None:
        between(out, "neftune_noise_alpha", args.neftune_noise_alpha, 0, None, hint="5 is usual")
    return out


def _galore_problems(args, sharded) -> list[str]:
    out: list[str] = []
    if args.train_type != "full":
        out.append("GaLore (--use_galore) projects the gradients of full weights: use it with --train_type full "
                   "(LoRA already trains low-rank matrices)")
    if sharded:
        out.append("--use_galore with --deepspeed/--fsdp is not supported (the projection needs each weight "
                   "whole); train with DDP or in one process")
    if args.optim == "sgd":
        out.append("--use_galore trains with GaLore's AdamW: use an AdamW --optim (adamw_torch, or an 8-bit one)")
    between(out, "galore_rank", args.galore_rank, 1, None)
    between(out, "galore_update_proj_gap", args.galore_update_proj_gap, 1, None)
    return out


def _lisa_problems(args, sharded) -> list[str]:
    if args.lisa_activated_layers == 0:
        return []
    out: list[str] = []
    between(out, "lisa_activated_layers", args.lisa_activated_layers, 1, None)
    between(out, "lisa_step_interval", args.lisa_step_interval, 1, None)
    if args.train_type != "full":
        out.append("LISA (--lisa_activated_layers) samples which layers of a full fine-tune train: use it with "
                   "--train_type full (ms-swift requires it too)")
    if sharded or planned_world() > 1:
        out.append("LISA with several processes (DDP, --deepspeed, --fsdp) is not supported yet: the trained "
                   "layers change during the run; train in one process")
    return out


def _freeze_problems(args) -> list[str]:
    import re

    given = args.freeze_parameters or args.freeze_parameters_regex or args.freeze_parameters_ratio or \
        args.trainable_parameters or args.trainable_parameters_regex
    if not given:
        return []
    out: list[str] = []
    between(out, "freeze_parameters_ratio", args.freeze_parameters_ratio, 0, 1)
    if args.train_type != "full":
        out.append("--freeze_parameters/--trainable_parameters choose the trained weights of a full fine-tune "
                   "(ms-swift applies them with --train_type full only): add --train_type full, or with LoRA use "
                   "--target_modules / --modules_to_save")
    for name in ("freeze_parameters_regex", "trainable_parameters_regex"):
        pattern = flag_values(args)[name]
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                out.append(f"--{name} {pattern}: not a valid regular expression ({e})")
    return out


def data_knob_problems(args) -> list[str]:
    """--interleave_prob (one probability per --dataset, summing to 1, no stream), --group_by_length (a shuffled
    order of rows that know their length), the loss variants (sft and pt only)."""
    out: list[str] = []
    probs = list(args.interleave_prob)
    if probs:
        if len(probs) != len(args.dataset):
            out.append(f"--interleave_prob has {len(probs)} probabilities for {len(args.dataset)} --dataset entries: "
                       f"give one per dataset")
        if any(not (0 <= p <= 1) for p in probs) or abs(sum(probs) - 1) > 1e-6:
            out.append(f"--interleave_prob {' '.join(map(str, probs))}: expected probabilities in [0, 1] summing to 1")
        if args.streaming:
            out.append("--interleave_prob with --streaming is not supported yet; without --streaming the datasets are "
                       "interleaved before training")
    if args.group_by_length and (args.streaming or args.packing or not args.dataset_shuffle):
        why = "a stream's rows are not known in advance" if args.streaming else \
            "packed sequences are already filled to --packing_length" if args.packing else \
            "it draws a shuffled order (ms-swift requires shuffling too); drop --dataset_shuffle false"
        out.append(f"--group_by_length: {why}")
    if isinstance(args, RLHFArguments) and args.rlhf_type == "grpo" and (probs or args.group_by_length):
        out.append("--interleave_prob/--group_by_length: GRPO samples its prompts in rounds of its own; drop the flag")
    if isinstance(args, RLHFArguments) and (args.enable_dft_loss or args.enable_channel_loss):
        out.append(f"--enable_dft_loss/--enable_channel_loss change the SFT loss: they apply to tunesmith sft and pt, "
                   f"not to --rlhf_type {args.rlhf_type}")
    return out

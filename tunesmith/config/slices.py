"""The typed slices the stages of tunesmith take instead of a whole command: frozen dataclasses composed of flag
groups (tunesmith.config.groups), so an IDE sees every field, and `take`, the one function that cuts a slice out
of any command's parsed arguments.

    slice          groups                                          taken by
    ModelConfig    Model Quant Tuner ModelKnob                     models.load (loading, LoRA), training's model
    DataConfig     Template Data                                   training's data preparation
    OptimConfig    Optim OptimKnob                                 the training loop's optimiser and schedule
    OutputConfig   Output Track, --wandb_log_unique_prompts        the run directory, checkpoints, trackers
    DistConfig     Dist                                            DeepSpeed / FSDP
    EngineConfig   InferBackend(Vllm) DeployServer Checkpoint      inference.backends (vLLM, SGLang, LMDeploy)
                   Model, and --seed

A slice holds the values of a command's flags; a flag the command does not have keeps the group's default (infer
has no --router_aux_loss_coef: 0.0; GRPO's rollouts have no --host: 127.0.0.1). A stage that needs only one group
takes the group itself (runs.track takes TrackArgs: training's OutputConfig and eval's arguments both are one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from tunesmith.config.groups import (CheckpointArgs, DataArgs, DeployServerArgs, DistArgs, InferBackendArgs,
                                     ModelArgs, OptimArgs, OutputArgs, QuantArgs, TemplateArgs, TrackArgs)
from tunesmith.config.training_groups import ModelKnobArgs, OptimKnobArgs, TunerArgs


@dataclass(frozen=True)
class ModelConfig(ModelArgs, QuantArgs, TunerArgs, ModelKnobArgs):
    """What to load and how to adapt it: the model (folder or hub id, dtype, attention), its quantisation (QLoRA),
    the tuner (LoRA's rank, targets, dtype; full training; --router_aux_loss_coef) and the training knobs on the
    model (--freeze_parameters ..., NEFTune, --torch_compile). Inference commands have no tuner or knob flags: those
    keep their defaults, and load_model reads only --router_aux_loss_coef (0.0) of them."""


@dataclass(frozen=True)
class DataConfig(TemplateArgs, DataArgs):
    """What to read and how to encode it: the data files, validation split and seeds (DataArgs), the chat template's
    system prompt, length limits, trained tokens and packing (TemplateArgs)."""


@dataclass(frozen=True)
class OptimConfig(OptimArgs, OptimKnobArgs):
    """How to step: batch sizes, steps or epochs, the optimiser (and its plugins: LoRA+, GaLore, Muon), LISA, the
    learning-rate schedule, clipping, seeds, length-grouped batches."""


@dataclass(frozen=True)
class OutputConfig(OutputArgs, TrackArgs):
    """Where and when a run writes: the output folder, checkpoints, evaluation and logging steps, resuming, and the
    trackers (--report_to) the records also go to."""
    # rlhf's --wandb_log_unique_prompts (GRPOArgs): the W&B completions table keeps each prompt's first row
    wandb_log_unique_prompts: bool = False


@dataclass(frozen=True)
class DistConfig(DistArgs):
    """How the run is spread over processes: DeepSpeed (--deepspeed) or FSDP (--fsdp, --fsdp_config)."""


@dataclass(frozen=True)
class EngineConfig(InferBackendArgs, DeployServerArgs, CheckpointArgs, ModelArgs):
    """What an accelerated engine (vLLM, SGLang, LMDeploy) is built from, and what the engine's own server command
    repeats: the engine flags, the model and its adapters, deploy's address, key and limits (eval's ms-swift
    server flags of the same names), and the sampling seed."""
    seed: Optional[int] = None  # infer, deploy and eval's --seed (GenerationArgs), rlhf's (OptimArgs)
    # deploy's --max_logprobs (eval's ms-swift server flag of that name); None where there is no server (infer), so
    # the engine's own server command repeats only what was set
    max_logprobs: Optional[int] = None


Slice = TypeVar("Slice")


def take(slice_cls: type[Slice], args: Any) -> Slice:
    """The slice `slice_cls` of a parsed command `args` (any command's frozen dataclass): each field of the slice
    that the command has, read from args; each it lacks, the slice's default. Returns a new frozen slice; args is
    not changed."""
    have = {f.name for f in dataclasses.fields(args)}
    return slice_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(slice_cls) if f.name in have})


def flag_values(args: Any) -> dict[str, Any]:
    """{flag name: value} of a parsed command or slice: for code that walks a list of flag names (value checks, the
    settings a checkpoint passes on). The values are args' own (lists not copied)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}

"""From a page's form to the exact `tunesmith` command line it runs: the training method decides the command
(METHODS: one table, so the GRPO tab can only ever launch `tunesmith rlhf --rlhf_type grpo`, never sft — the bug
of ms-swift #5283), the form's fields add the flags that differ from their defaults, and the output folder is
always spelled out. What is shown on the page is what runs: `Built.line` is built from the same argv.

No shell is involved anywhere: the process runs `[python, -m, tunesmith, *argv]` (launch.py).
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field

from tunesmith.webui.flags import FlagSpec, command_flags, form_argv

# method (the Train page's choice) -> (command, the flags the method fixes). The only place a method becomes a command.
METHODS = {
    "sft": ("sft", ()),
    "dpo": ("rlhf", ("--rlhf_type", "dpo")),
    "cpo": ("rlhf", ("--rlhf_type", "cpo")),
    "simpo": ("rlhf", ("--rlhf_type", "simpo")),
    "orpo": ("rlhf", ("--rlhf_type", "orpo")),
    "kto": ("rlhf", ("--rlhf_type", "kto")),
    "grpo": ("rlhf", ("--rlhf_type", "grpo")),
    "ppo": ("rlhf", ("--rlhf_type", "ppo")),
    "gkd": ("rlhf", ("--rlhf_type", "gkd")),
    "rm": ("rlhf", ("--rlhf_type", "rm")),
}
# flag groups shown only for some methods (the others' flags stay at their defaults and are not sent)
METHOD_GROUPS = {"RLHFArgs": set(METHODS) - {"sft"}, "GRPOArgs": {"grpo", "ppo"}, "VllmArgs": {"grpo"},
                 "GKDArgs": {"gkd"}, "PPOArgs": {"ppo"}}
# flags of another method's group that a method reads too (GKD samples the student as GRPO samples its rollouts)
SHARED_FLAGS = {"gkd": ("temperature", "max_completion_length", "top_p", "top_k", "repetition_penalty",
                        "log_completions", "wandb_log_unique_prompts")}
# the fields the Train page shows first, above the grouped flags
BASICS = ("model", "dataset", "val_dataset", "split_dataset_ratio", "train_type", "num_train_epochs", "max_steps",
          "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_rank",
          "lora_alpha", "output_dir", "save_steps", "logging_steps", "eval_steps", "reward_funcs", "beta")


def method_flags(method: str) -> list[FlagSpec]:
    """The form fields of a training method: its command's flags without the fixed ones and without the groups of
    other methods (GRPO's for dpo, RLHF's for sft). Raises KeyError for an unknown method."""
    command, fixed = METHODS[method]
    specs = command_flags(command, fixed=tuple(f[2:] for f in fixed[::2]))
    return [s for s in specs if method in METHOD_GROUPS.get(s.group, {method})
            or s.name in SHARED_FLAGS.get(method, ())]


@dataclass(frozen=True)
class Built:
    """A command line ready to run: argv after `tunesmith` ([command, *flags]), extra environment (NPROC_PER_NODE),
    the line as shown on the page, and the problems that stop it before the command's own checks."""
    argv: list
    env: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def command(self) -> str:
        """The tunesmith command (sft, rlhf, export, ...)."""
        return self.argv[0]

    @property
    def line(self) -> str:
        """The command line as typed in a shell (quoted), with its environment variables in front."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(["tunesmith", *self.argv])

    def process_argv(self) -> list[str]:
        """What the process runs: this interpreter, `-m tunesmith` and argv (a list: no shell reads it)."""
        return [sys.executable, "-m", "tunesmith", *self.argv]


def default_output(output_root: str, model: str) -> str:
    """training's own default output/<model name>, under the page's first output folder."""
    from tunesmith.models.checkpoint import model_suffix

    return os.path.join(output_root, model_suffix(model) if model else "run")


def build_training(method: str, values: dict, output_root: str, nproc: int = 1) -> Built:
    """The training command of `method` for the form values ({flag: value}), with --output_dir set (the form's, or
    <output_root>/<model name>) and NPROC_PER_NODE in the environment when nproc > 1. Raises KeyError for an
    unknown method."""
    command, fixed = METHODS[method]
    argv, problems = form_argv(method_flags(method), values)
    if "--output_dir" not in argv:
        model = values.get("model")
        argv += ["--output_dir", default_output(output_root, str(model).strip() if model else "")]
    env = {"NPROC_PER_NODE": str(int(nproc))} if nproc and int(nproc) > 1 else {}
    return Built([command, *fixed, *argv], env, problems)


def build_command(command: str, values: dict, fixed: tuple = ()) -> Built:
    """Any other command (export, eval, data) from a form: [command, *fixed, *the flags that differ]."""
    specs = command_flags(command, fixed=tuple(f[2:] for f in fixed if f.startswith("--")))
    argv, problems = form_argv(specs, values)
    return Built([command, *fixed, *argv], {}, problems)


def resume_argv(argv: list, checkpoint: str) -> list:
    """A run's argv continued from `checkpoint`: any --resume_from_checkpoint it had is replaced."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a in ("--resume_from_checkpoint", "--resume-from-checkpoint")
        if not skip:
            out.append(a)
    return [*out, "--resume_from_checkpoint", checkpoint]

"""`tunesmith sft`, `tunesmith pt`, `tunesmith rlhf` and `tunesmith dpo`: the training commands. The story of a run is
tunesmith.train.recipe; this is the command's entry point that the CLI imports."""
from __future__ import annotations

from tunesmith.train import recipe


def main(args):
    """Train as the parsed command says (sft or pt, or rlhf/dpo with its --rlhf_type); returns the exit code."""
    return recipe.main(args)


def check_flags(args) -> None:
    """The training command's value checks (every problem at once), without loading anything: the launcher runs
    them once before torchrun starts the processes. Raises ConfigError (a FlagError for flag values)."""
    from tunesmith.train.config import check

    check(args, recipe.method_for(args))

"""bench/grpo_speed.py's reward as an ms-swift ORM plugin (`swift rlhf --external_plugins
bench/peers/swift_grpo_plugin.py --reward_funcs e_share`): ms-swift's documented plugin form, a class registered in
`orms` that gets the completions (text) and the dataset columns as keyword arguments. It calls the same function
tunesmith and TRL use (bench/peers/grpo_reward.py; this folder is on PYTHONPATH in the benchmark)."""
from swift.rewards import ORM, orms

from grpo_reward import e_share


class EShare(ORM):
    def __call__(self, completions, **kwargs) -> list[float]:
        return e_share(completions)


orms["e_share"] = EShare

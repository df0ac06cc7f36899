"""The reward of bench/grpo_speed.py, shared by tunesmith (`--reward_funcs grpo_reward.e_share`, this folder on
PYTHONPATH) and TRL's GRPOTrainer (`reward_funcs=[e_share]`): the share of a completion's characters that are the
letter 'e'. Deterministic, cheap, and it varies between completions, so every group gets non-zero advantages."""


def e_share(completions, **kwargs):
    """One float per completion. A completion is its text (tunesmith, or TRL on plain-text prompts) or, for chat
    prompts in TRL, a list of messages whose last is the assistant's reply."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(text.count("e") / len(text) if text else 0.0)
    return out

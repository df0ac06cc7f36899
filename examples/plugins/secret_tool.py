"""A multi-turn GRPO plugin in ms-swift's documented form (it runs unchanged under `swift rlhf` and `tunesmith
rlhf`): a scheduler whose step() calls a tool and appends its answer as a tool message, and a reward.

Each trajectory's secret is a fair coin ("even" or "odd", drawn from the trajectory's uuid, which the model never
sees); the tool tells it. The reward is the share of the last turn's tokens whose id has the secret's parity, so a
policy that has not seen the secret scores 0.5 on average whatever it does, and one that reads the tool's answer can
score 1. The tool-call turn carries no information about the reward, so the scheduler leaves it out of the loss
(response_loss_mask 0); the answer turn is trained.

    tunesmith rlhf --rlhf_type grpo --model MODEL --dataset DATA --external_plugins examples/plugins/secret_tool.py \
        --multi_turn_scheduler secret_scheduler --max_turns 2 --reward_funcs secret_parity ...
"""
import random

from swift.rewards import ORM, orms
from swift.rollout import MultiTurnScheduler, multi_turns

SECRETS = ("even", "odd")


def lookup_secret(key: str) -> str:
    """The tool: the trajectory's secret."""
    return random.Random(key).choice(SECRETS)


class SecretScheduler(MultiTurnScheduler):
    """Turn 1 asks the tool (whatever the model said); its answer comes back as a tool message; turn 2 answers."""

    def check_finished(self, infer_request, response_choice, current_turn):
        return current_turn >= 2

    async def on_turn_end(self, infer_request, response_choice, current_turn):
        return {"rollout_infos": {"secret": lookup_secret(infer_request.uuid),
                                  "answer_ids": list(response_choice.token_ids)}}

    def step(self, infer_request, response_choice, current_turn):
        secret = lookup_secret(infer_request.uuid)
        infer_request.messages.append({"role": "tool", "content": (" " + secret) * 8})
        ids = list(response_choice.token_ids)
        return {"infer_request": infer_request, "response_token_ids": ids, "response_loss_mask": [0] * len(ids)}


class SecretParity(ORM):
    """The share of the last turn's tokens whose id has the secret's parity."""

    def __call__(self, completions, rollout_infos=None, **kwargs):
        rewards = []
        for info in rollout_infos:
            want, ids = SECRETS.index(info["secret"]), info["answer_ids"]
            rewards.append(sum(t % 2 == want for t in ids) / max(len(ids), 1))
        return rewards


multi_turns["secret_scheduler"] = SecretScheduler
orms["secret_parity"] = SecretParity

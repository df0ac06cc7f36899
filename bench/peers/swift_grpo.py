"""ms-swift 4.6 peer for bench/grpo_speed.py: `swift rlhf --rlhf_type grpo ARGS` in this process, with one timer
added and nothing else changed.

Usage: bench/.venv-swift/bin/python bench/peers/swift_grpo.py TIMES.json --rlhf_type grpo ARGS...

`swift rlhf` (swift/cli/rlhf.py) is `rlhf_main()` over the command line; this calls `rlhf_main(ARGS)` the same way,
after wrapping ms-swift's generation call (`RolloutTrainerMixin._engine_infer`, the block ms-swift itself profiles
as 'generate': its transformers engine when --use_vllm false) with a timer. Writes TIMES.json at exit:
{"generate_s", "generate_calls"}. Everything else (each step's `step_time`, the reward, `train_runtime`) comes from
ms-swift's own logging.jsonl. The reward is an ms-swift ORM plugin (bench/peers/swift_grpo_plugin.py,
--external_plugins).
"""
import atexit
import json
import sys
import time

from swift.pipelines import rlhf_main
from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin

TIMES = {"generate_s": 0.0, "generate_calls": 0}
_engine_infer = RolloutTrainerMixin._engine_infer


def _timed_engine_infer(self, *args, **kwargs):
    t = time.perf_counter()
    try:
        return _engine_infer(self, *args, **kwargs)
    finally:
        TIMES["generate_s"] += time.perf_counter() - t
        TIMES["generate_calls"] += 1


def _write(path: str) -> None:
    with open(path, "w") as fh:
        json.dump(TIMES, fh)


if __name__ == "__main__":
    times_path, argv = sys.argv[1], sys.argv[2:]
    RolloutTrainerMixin._engine_infer = _timed_engine_infer
    atexit.register(_write, times_path)
    rlhf_main(argv)

"""`python -m tunesmith ARGS` for bench/grpo_speed.py, with one timer added: the wall time spent inside GRPO's
rollout generation (`Rollouts._generate`: all completions of a round, decoded as one continuous batch), written as
JSON to $GRPO_BENCH_TIMES at exit. Nothing else changes; it costs two perf_counter calls per generation round.

Usage: GRPO_BENCH_TIMES=times.json python bench/peers/tunesmith_timed.py rlhf --rlhf_type grpo ...
"""
import atexit
import json
import os
import sys
import time

TIMES = {"generate_s": 0.0, "generate_calls": 0}


def _install() -> None:
    from tunesmith.train.rl import rollouts

    original = getattr(rollouts.Rollouts, "_generate", None)
    if original is None:  # renamed: run untimed (the benchmark then shows no generation rate)
        TIMES["generate_s"] = None
        return

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            TIMES["generate_s"] += time.perf_counter() - t
            TIMES["generate_calls"] += 1

    rollouts.Rollouts._generate = timed


def _write() -> None:
    with open(os.environ["GRPO_BENCH_TIMES"], "w") as fh:
        json.dump(TIMES, fh)


if __name__ == "__main__":
    _install()
    atexit.register(_write)
    from tunesmith.cli import main

    sys.argv = ["tunesmith", *sys.argv[1:]]
    sys.exit(main())

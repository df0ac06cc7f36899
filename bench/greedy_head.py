"""The greedy arg-max over a float32 output layer: the float32 product chunk by chunk (`chunked_argmax`) against
the bfloat16 screen that picks the same token (`OutputScreen`, tunesmith/inference/last_output.py).

    python bench/greedy_head.py                       # Qwen's 151,936-row vocabulary, hidden 128/896, 1-256 rows
    python bench/greedy_head.py --hidden 896 3584 --rows 64 --repeats 30

Random weights scaled as an initialised model's (std 0.02) and hidden states of unit variance: the scores of such a
model are nearly Gaussian, the hardest case for the screen (many near-ties; a trained model's peaked scores settle
sooner). Each case alternates the two paths `--repeats` times and keeps each one's best time; every case first
checks that both pick the same tokens. Prints whether this CPU multiplies bfloat16 natively (the engine only
screens there; elsewhere the screen is emulated and slower).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch

    from tunesmith.inference.last_output import OutputScreen, chunked_argmax, native_bfloat16

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 896])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bfloat16: "
          f"{native_bfloat16(torch.device('cpu'))}")
    print("| hidden | rows | float32 chunks ms | bfloat16 screen ms | speed-up |")
    print("|---|---|---|---|---|")
    for hidden in a.hidden:
        torch.manual_seed(0)
        weight = torch.randn(a.vocab, hidden) * 0.02
        screen = OutputScreen()
        for rows in a.rows:
            h = torch.randn(rows, hidden)
            if screen.argmax(h, weight).tolist() != chunked_argmax(h, weight).tolist():
                print(f"MISMATCH at hidden {hidden}, rows {rows}", file=sys.stderr)
                return 1
            best = {"f32": float("inf"), "screen": float("inf")}
            for _ in range(a.repeats):
                t = time.perf_counter()
                chunked_argmax(h, weight)
                best["f32"] = min(best["f32"], time.perf_counter() - t)
                t = time.perf_counter()
                screen.argmax(h, weight)
                best["screen"] = min(best["screen"], time.perf_counter() - t)
            print(f"| {hidden} | {rows} | {best['f32'] * 1e3:.1f} | {best['screen'] * 1e3:.1f} | "
                  f"×{best['f32'] / best['screen']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

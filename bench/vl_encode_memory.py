"""Encoding an image dataset: peak memory while 2,000 pictures' rows are read, checked, counted and encoded for a
vision-language model — the pictures must not all be held in memory (issue #31).

    python bench/vl_encode_memory.py [--pictures 2000] [--size 640x480]

Each measurement runs in its own process (peak PSS of the process tree, sampled every 0.2 s: encode_scale.py's
run_measured_pss):
- images: `train.setup.prepare_data` for a tiny Qwen2.5-VL (the real Qwen2.5-VL image budget: 3,136 to 12,845,056
          pixels per picture) on N rows "<image>Describe this picture." + a 60-word answer, each with its own JPEG;
- text:   the same rows without the pictures (and without the tag), on the same model: the floor.
It prints both, the difference, and what the decoded pixels alone would take (N × width × height × 3 bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def make_rows(folder: str, n: int, size: tuple[int, int], seed: int = 0) -> tuple[str, str]:
    """(rows with pictures, the same rows as text) as JSON-lines files in folder; the pictures are noisy JPEGs."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    words = "a the picture shows red green blue sky tree car house person dog cat road light".split()
    with_images, text = os.path.join(folder, "images.jsonl"), os.path.join(folder, "text.jsonl")
    noise = np.random.default_rng(seed)
    with open(with_images, "w") as a, open(text, "w") as b:
        for i in range(n):
            path = os.path.join(folder, f"p{i}.jpg")
            Image.fromarray(noise.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=85)
            answer = " ".join(rng.choice(words) for _ in range(60))
            a.write(json.dumps({"messages": [{"role": "user", "content": "<image>Describe this picture."},
                                             {"role": "assistant", "content": answer}], "images": [path]}) + "\n")
            b.write(json.dumps({"messages": [{"role": "user", "content": "Describe this picture."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return with_images, text


def child(model: str, data: str) -> None:
    import time

    from tunesmith.config.parser import parse_args
    from tunesmith.train import recipe
    from tunesmith.train.setup import prepare_data

    t0 = time.time()
    args = parse_args("sft", ["--model", model, "--dataset", data, "--max_length", "32768",
                              "--load_from_cache_file", "false"])
    cfg, method = recipe.configure(args)
    prepared = prepare_data(cfg.data, cfg.model, method)
    rows = prepared.train_rows
    tokens = sum(rows.lengths())
    print(json.dumps({"rows": len(rows), "tokens": tokens, "seconds": round(time.time() - t0, 1)}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pictures", type=int, default=2000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "DATA"))
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    from encode_scale import run_measured_pss
    from tunesmith.testing import build_vl_model

    w, h = (int(x) for x in a.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_vl_model(os.path.join(tmp, "model"), "qwen2_5_vl")
        cfg_path = os.path.join(model, "preprocessor_config.json")
        cfg = json.load(open(cfg_path))  # the released Qwen2.5-VL budget, not the tiny test one
        cfg["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
        json.dump(cfg, open(cfg_path, "w"))
        images, text = make_rows(tmp, a.pictures, (w, h))
        env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(tmp, "cache"))
        out = {}
        for name, data in (("text", text), ("images", images)):
            log = os.path.join(tmp, f"{name}.log")
            peak, anon, rc = run_measured_pss([sys.executable, __file__, "--child", model, data], env, log)
            lines = open(log).read().strip().splitlines()
            if rc != 0:
                print(f"{name}: exit {rc}\n" + "\n".join(lines[-20:]))
                return 1
            out[name] = {**json.loads(lines[-1]), "peak_GiB": round(peak, 3), "peak_anon_GiB": round(anon, 3)}
            print(name, out[name])
        pixels = a.pictures * w * h * 3 / 2 ** 30
        print(f"\n{a.pictures} pictures of {w}x{h} ({pixels:.2f} GiB decoded): peak PSS {out['images']['peak_GiB']} "
              f"GiB with pictures vs {out['text']['peak_GiB']} GiB for the same rows as text "
              f"(+{out['images']['peak_GiB'] - out['text']['peak_GiB']:.3f} GiB); "
              f"{out['images']['tokens'] - out['text']['tokens']} image tokens and tags counted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

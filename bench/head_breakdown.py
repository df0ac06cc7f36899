"""Where a training step's time goes at the real vocabulary: the decoder against the output layer, on the CPU.

    python bench/head_breakdown.py --layers 2 --tokens 512 --repeats 2

Builds bench/train_speed.py's `qwen2.5-0.5b` shape (hidden 896, 151,936-row tied output layer, fp32), attaches
LoRA r 8 on all-linear as every system in the benchmark does, and times one packed row of `--tokens` tokens:
- the decoder (embedding + layers + final norm), forward and backward, with the LoRA weights trained;
- the output layer + log-softmax of the label, forward and backward (into the decoder's last hidden states), as
  tunesmith computes it (`tunesmith.train.ops.token_logps.ChunkedLogps`, its default chunk of CHUNK_FLOATS // vocab
  rows) and with larger chunks, and as the peers do (one [tokens x vocabulary] logits tensor, float32
  log-softmax, gather).
Each is the best of --repeats runs, in seconds and tokens/s, with the largest logits tensor each path allocates.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens in the row (all of them trained)")
    ap.add_argument("--chunks", default="128,1024", help="larger chunk sizes (rows) to compare with the default")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train_speed import SHAPES, Shape, build_shape_model
    from tunesmith.train.ops.token_logps import ChunkedLogps, chunk_rows

    shape = Shape(**{**SHAPES["qwen2.5-0.5b"].__dict__, "layers": a.layers})
    with tempfile.TemporaryDirectory() as work:
        build_shape_model(work, shape)
        model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    decoder = model.base_model.model.model
    weight = model.base_model.model.lm_head.weight  # tied to the embedding, frozen under LoRA
    torch.manual_seed(0)
    ids = torch.randint(0, 151643, (1, a.tokens))
    targets = ids[0, 1:]
    n = a.tokens - 1
    print(f"{torch.get_num_threads()} threads; {a.layers} layers, hidden {shape.hidden}, vocabulary {shape.vocab:,}, "
          f"one row of {a.tokens} tokens, fp32")

    def decoder_step():
        h = decoder(input_ids=ids).last_hidden_state
        h.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    hidden = decoder(input_ids=ids).last_hidden_state[0, :-1].detach()
    rows = []

    def chunked(chunk):
        def step():
            h = hidden.clone().requires_grad_()
            logps, _, _, _ = ChunkedLogps.apply(h, weight, targets, chunk, False, None, (True, False), False)
            logps.sum().backward()
        return step

    def recompute(chunk):
        """The pre-#30 path: forward logits, then in backward the logits again and the hidden-state gradient."""
        def step():
            h = hidden.clone().requires_grad_()
            with torch.no_grad():
                lse = torch.cat([torch.logsumexp((h[s:s + chunk] @ weight.t()).float(), -1)
                                 for s in range(0, n, chunk)])
            grad = torch.empty_like(h)
            for s in range(0, n, chunk):
                logits = (h[s:s + chunk] @ weight.t()).float()
                g = torch.exp(logits - lse[s:s + chunk, None]).neg_()
                g.scatter_add_(-1, targets[s:s + chunk, None], torch.ones_like(g[:, :1]))
                grad[s:s + chunk] = g @ weight
        return step

    def plain():
        h = hidden.clone().requires_grad_()
        logits = (h @ weight.t()).float()  # [tokens x vocabulary], as the peers' model forward returns it
        logps = torch.log_softmax(logits, -1).gather(-1, targets[:, None])
        logps.sum().backward()

    rows.append(("decoder (2 layers, LoRA), forward + backward", best_of(decoder_step, a.repeats), None))
    default = chunk_rows(shape.vocab, shape.hidden)
    for chunk in [default, *(int(c) for c in a.chunks.split(",") if c)]:
        label = f"output layer, chunked by {chunk} rows" + (" (tunesmith's default)" if chunk == default else "")
        rows.append((label, best_of(chunked(chunk), a.repeats), min(chunk, n) * shape.vocab * 4))
    rows.append((f"output layer, chunked by {default} rows, logits recomputed (before #30)",
                 best_of(recompute(default), a.repeats), min(default, n) * shape.vocab * 4))
    rows.append(("output layer, plain [tokens x vocabulary] logits (the peers)", best_of(plain, a.repeats),
                 n * shape.vocab * 4))
    print(f"{'part':64s} {'seconds':>8s} {'tokens/s':>9s} {'largest logits MiB':>19s}")
    for label, s, nbytes in rows:
        print(f"{label:64s} {s:8.2f} {a.tokens / s:9.1f} {'' if nbytes is None else f'{nbytes / 2 ** 20:.0f}':>19s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

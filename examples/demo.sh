#!/usr/bin/env bash
# tunesmith demo: fine-tune a tiny model built on the spot, on CPU, in about a minute.
# Run from the repository root with the package installed (see README).
set -euo pipefail
OUT=${OUT:-demo_output}
MODEL=$OUT/tiny-qwen
DATA="examples/data/capitals_messages.jsonl examples/data/capitals_sharegpt.jsonl examples/data/capitals_alpaca.json"
rm -rf "$OUT"

echo "== 1. build a tiny random Qwen2-shaped model and tokenizer (offline)"
python -m tunesmith.testing "$MODEL" --family qwen2 --hidden 128 --layers 2 >/dev/null 2>&1

echo; echo "== 2. the data: three formats (messages, sharegpt, alpaca), as the tutorials write them"
tunesmith data stats --model "$MODEL" --dataset $DATA
echo; echo "-- what is trained (inside [[ ]]):"
tunesmith data inspect --model "$MODEL" --dataset examples/data/capitals_sharegpt.jsonl

echo; echo "== 3. before training"
python examples/ask.py "$MODEL" "What is the capital of France?" "Name the capital city of Japan."

echo; echo "== 4. tunesmith sft (full fine-tuning; the same command line as ms-swift)"
tunesmith sft --model "$MODEL" --dataset $DATA --train_type full --learning_rate 2e-3 \
    --num_train_epochs 100 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    --warmup_ratio 0.05 --logging_steps 50 --save_steps 1000 \
    --gradient_checkpointing false --output_dir "$OUT/output" --report_to none 2>&1 | grep -v Warning

CKPT=$(ls -d "$OUT"/output/v*/checkpoint-* | sort -V | tail -1)
echo; echo "== 5. after training ($CKPT)"
python examples/ask.py "$CKPT" "What is the capital of France?" "Name the capital city of Japan."
python - "$(dirname "$CKPT")/logging.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(f"  training loss: {rows[0]['loss']:.3f} at step {rows[0]['global_step']} -> {rows[-1]['loss']:.4f} at step {rows[-1]['global_step']}")
PY
echo; echo "Run directory: $(dirname "$CKPT") (args.json, logging.jsonl, checkpoints)"

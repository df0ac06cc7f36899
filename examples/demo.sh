#!/usr/bin/env bash
# tunesmith demo on a tiny model built on the spot, on CPU, in about two minutes:
# data -> sft -> dpo -> merge -> batch inference -> an OpenAI-compatible server answering one request ->
# base vs tuned evaluation -> reports.
# Run from the repository root with the package installed (see README).
set -euo pipefail
OUT=${OUT:-demo_output}
MODEL=$OUT/tiny-qwen
DATA="examples/data/capitals_messages.jsonl examples/data/capitals_sharegpt.jsonl examples/data/capitals_alpaca.json"
QUESTIONS=examples/data/questions.jsonl
rm -rf "$OUT"
answers() {  # print the replies of an infer result file
    python - "$1" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(f"  Q: {r['messages'][-2]['content']}\n  A: {r['response']!r}")
PY
}

echo "== 1. build a tiny random Qwen2-shaped model and tokenizer (offline)"
python -m tunesmith.testing "$MODEL" --family qwen2 --hidden 128 --layers 2 >/dev/null 2>&1

echo; echo "== 2. the data: three formats (messages, sharegpt, alpaca), as the tutorials write them"
tunesmith data stats --model "$MODEL" --dataset $DATA
echo; echo "-- what is trained (inside [[ ]]):"
tunesmith data inspect --model "$MODEL" --dataset examples/data/capitals_sharegpt.jsonl

echo; echo "== 3. before training (tunesmith infer, greedy)"
tunesmith infer --model "$MODEL" --val_dataset $QUESTIONS --max_new_tokens 12 --temperature 0 \
    --result_path "$OUT/before.jsonl"
answers "$OUT/before.jsonl"

echo; echo "== 4. tunesmith sft (full fine-tuning; the same command line as ms-swift)"
tunesmith sft --model "$MODEL" --dataset $DATA --train_type full --learning_rate 2e-3 \
    --num_train_epochs 100 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    --warmup_ratio 0.05 --logging_steps 50 --save_steps 1000 \
    --gradient_checkpointing false --output_dir "$OUT/sft" --report_to none
SFT=$(ls -d "$OUT"/sft/v*/checkpoint-* | sort -V | tail -1)
python - "$(dirname "$SFT")/logging.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(f"  training loss: {rows[0]['loss']:.3f} at step {rows[0]['global_step']} -> {rows[-1]['loss']:.4f} at step {rows[-1]['global_step']}")
PY

echo; echo "== 5. tunesmith dpo on top (LoRA; the reference is the SFT model, the adapter switched off)"
tunesmith dpo --model "$SFT" --dataset examples/data/dpo_messages.jsonl --train_type lora \
    --learning_rate 5e-3 --max_steps 20 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    --logging_steps 5 --gradient_checkpointing false --output_dir "$OUT/dpo" --report_to none
DPO=$(ls -d "$OUT"/dpo/v*/checkpoint-* | sort -V | tail -1)
python - "$(dirname "$DPO")/logging.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"rewards/accuracies"' in l]
for r in (rows[0], rows[-1]):
    print(f"  step {r['global_step']:>2}: loss {r['loss']:.4f}  rewards/accuracies {r['rewards/accuracies']:.2f}  "
          f"rewards/margins {r['rewards/margins']:.3f}")
PY

echo; echo "== 6. tunesmith export --merge_lora true (a plain Hugging Face model directory)"
tunesmith export --adapters "$DPO" --merge_lora true
ls "$DPO-merged"
echo "-- and for a laptop: a GGUF file (llama.cpp, LM Studio, Jan) with an Ollama Modelfile"
tunesmith export --adapters "$DPO" --to_gguf true --gguf_quant q8_0 --to_ollama true
ls "$DPO-gguf"

echo; echo "== 7. tunesmith infer on the merged model (batch over a file; results as jsonl)"
tunesmith infer --model "$DPO-merged" --val_dataset $QUESTIONS --max_new_tokens 12 --temperature 0 \
    --result_path "$OUT/after.jsonl"
answers "$OUT/after.jsonl"

echo; echo "== 8. tunesmith deploy: an OpenAI-compatible server, one request"
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tunesmith deploy --model "$DPO-merged" --served_model_name capitals --port "$PORT" --verbose false \
    > "$OUT/deploy.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python - "$PORT" <<'PY'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):  # wait for the server to load the model
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.5)
body = {"model": "capitals", "messages": [{"role": "user", "content": "What is the capital of Japan?"}],
        "temperature": 0, "max_tokens": 12}
print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=60))
print("  ->", repr(r["choices"][0]["message"]["content"]), r["usage"])
PY

echo; echo "== 9. tunesmith eval: the base model and the tuned one side by side (exact match, BLEU, ROUGE-L, chrF)"
tunesmith eval --model "$DPO-merged" --base_model "$MODEL" --eval_dataset general_qa \
    --eval_dataset_args '{"general_qa": {"local_path": "examples/data/capitals_messages.jsonl"}}' \
    --eval_generation_config '{"max_tokens": 16}' --eval_output_dir "$OUT/eval" 2>&1 | grep -v "^\[tunesmith\]"

echo; echo "== 10. see the runs: plots and an HTML report per run, and both compared"
tunesmith report "$(dirname "$SFT")" "$(dirname "$DPO")" --output "$OUT/compare_report.html"
echo "  $(dirname "$SFT")/report.html      (sft: loss, learning rate, grad norm, tokens/s, memory)"
echo "  $(dirname "$DPO")/report.html      (dpo: also rewards, margins, accuracies)"
echo "  $OUT/compare_report.html  (both runs on the same charts, differing arguments side by side)"
echo; echo "Open a report in any browser; no network needed. Merged model: $DPO-merged"

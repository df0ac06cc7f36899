"""TRL 0.29 peer for bench/grpo_speed.py: GRPOTrainer with the benchmark's settings, on CPU, no vLLM.

Usage: bench/.venv-swift/bin/python bench/peers/trl_grpo.py MODEL DATA.jsonl OUTPUT_DIR SETTINGS.json

SETTINGS.json holds the values shared with the tunesmith side (steps, learning rate, G, batch, lengths, β, seed,
LoRA). Writes OUTPUT_DIR/trl_result.json: the trainer's log history (one record per step, logging_steps 1), the
wall-clock time at the end of each optimiser step (a callback), and the time spent in each of TRL's own profiled
blocks (GRPOTrainer.transformers.generate, ...; TRL logs them only to wandb/mlflow, so they are collected here).
"""
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.extras import profiling  # noqa: E402

from grpo_reward import e_share  # noqa: E402

model_dir, data, out, settings = sys.argv[1:5]
s = json.load(open(settings))
PROFILED = defaultdict(float)
_orig_log = profiling.ProfilingContext._log_metrics


def _log_metrics(self, duration):  # TRL's profiled blocks, summed by name
    PROFILED[self.name] += duration
    _orig_log(self, duration)


profiling.ProfilingContext._log_metrics = _log_metrics


class StepTimes(TrainerCallback):
    def __init__(self):
        self.begin, self.ends = None, []

    def on_train_begin(self, args, state, control, **kw):
        self.begin = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.time())


rows = [json.loads(line) for line in open(data, encoding="utf-8")]
ds = Dataset.from_list([{"prompt": r["messages"]} for r in rows])  # conversational prompts
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
lora = LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                  task_type="CAUSAL_LM")
args = GRPOConfig(
    output_dir=out, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
    num_generations=s["num_generations"], max_completion_length=s["max_completion_length"],
    temperature=s["temperature"], beta=s["beta"], loss_type="grpo", learning_rate=s["learning_rate"],
    max_steps=s["steps"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
    use_vllm=False, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=s["seed"],
    disable_dropout=True, dataloader_num_workers=0, top_p=1.0, top_k=0, repetition_penalty=1.0)
timer = StepTimes()
trainer = GRPOTrainer(model=model, reward_funcs=[e_share], args=args, train_dataset=ds, processing_class=tok,
                      peft_config=lora, callbacks=[timer])
result = trainer.train()
with open(os.path.join(out, "trl_result.json"), "w") as fh:
    json.dump({"log_history": trainer.state.log_history, "train_begin": timer.begin, "step_ends": timer.ends,
               "train_runtime": result.metrics.get("train_runtime"), "profiled": dict(PROFILED)}, fh)

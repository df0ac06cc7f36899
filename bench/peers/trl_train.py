"""TRL 1.16 peer for bench/train_speed.py: SFTTrainer / DPOTrainer with the benchmark's settings.

Usage: python bench/peers/trl_train.py sft|dpo MODEL DATA.jsonl OUTPUT_DIR [MAX_LENGTH (default 1024)]
"""
import json
import sys

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

method, model_dir, data, out = sys.argv[1:5]
max_length = int(sys.argv[5]) if len(sys.argv) > 5 else 1024
rows = [json.loads(line) for line in open(data, encoding="utf-8")]
if method == "sft":  # conversational prompt/completion: the loss is on the reply only, as in tunesmith
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
else:
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
common = dict(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=4, num_train_epochs=1,
              max_length=max_length, learning_rate=1e-4, logging_steps=10, save_strategy="no", report_to="none",
              gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=True, bf16=False)
if method == "sft":
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=model, args=SFTConfig(**common, packing=False), train_dataset=ds,
                         processing_class=tok, peft_config=lora)
else:
    from trl import DPOConfig, DPOTrainer
    trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1), train_dataset=ds, processing_class=tok,
                         peft_config=lora)
trainer.train()

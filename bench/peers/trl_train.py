"""TRL 1.16 peer for bench/train_speed.py: SFTTrainer / DPOTrainer / KTOTrainer / RewardTrainer with the
benchmark's settings.

Usage: python bench/peers/trl_train.py sft|dpo|kto|rm MODEL DATA.jsonl OUTPUT_DIR [MAX_LENGTH (default 1024)]

The data is the benchmark's (ms-swift's formats), converted to TRL's conversational ones:
- sft: `messages` -> prompt (the turns before the reply) / completion (the reply): the loss on the reply only.
- dpo, rm: `prompt`/`chosen`/`rejected` strings -> a user turn and assistant turns (explicit prompt).
- kto: `messages` + `label` -> prompt / completion / label (TRL's unpaired preference format).
"""
import json
import sys

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer

method, model_dir, data, out = sys.argv[1:5]
max_length = int(sys.argv[5]) if len(sys.argv) > 5 else 1024
rows = [json.loads(line) for line in open(data, encoding="utf-8")]
if method == "sft":  # conversational prompt/completion: the loss is on the reply only, as in tunesmith
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
elif method == "kto":
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:],
                             "label": bool(r["label"])} for r in rows])
else:
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(model_dir)
# SEQ_CLS: peft trains the new `score` head in full next to the adapter (as tunesmith and ms-swift do)
lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                  task_type="SEQ_CLS" if method == "rm" else "CAUSAL_LM")
common = dict(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=4, num_train_epochs=1,
              max_length=max_length, learning_rate=1e-4, logging_steps=10, save_strategy="no", report_to="none",
              gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=True, bf16=False)
if method == "rm":
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype="float32")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
if method == "sft":
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=model, args=SFTConfig(**common, packing=False), train_dataset=ds,
                         processing_class=tok, peft_config=lora)
elif method == "dpo":
    from trl import DPOConfig, DPOTrainer
    trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1), train_dataset=ds, processing_class=tok,
                         peft_config=lora)
elif method == "kto":  # KTOConfig's defaults: beta 0.1, weights 1, sequential sampling (the KL pairs need it)
    from trl import KTOConfig, KTOTrainer
    trainer = KTOTrainer(model=model, args=KTOConfig(**common, beta=0.1), train_dataset=ds, processing_class=tok,
                         peft_config=lora)
elif method == "rm":
    from trl import RewardConfig, RewardTrainer
    trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=ds, processing_class=tok,
                            peft_config=lora)
else:
    raise SystemExit(f"unknown method {method!r}: sft, dpo, kto or rm")
trainer.train()

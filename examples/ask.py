"""Ask a model (a directory or a checkpoint) one question with its own chat template; print the reply.

Usage: python examples/ask.py MODEL_OR_CHECKPOINT "question" [...]
"""
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from tunesmith.infer import generate_replies

hf_logging.disable_progress_bar()
path, questions = sys.argv[1], sys.argv[2:]
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
replies = generate_replies(model, tok, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=12,
                           skip_special_tokens=False)
for q, r in zip(questions, replies):
    print(f"  Q: {q}\n  A: {r!r}")

"""Training: the recipe (recipe.py), the resolved configuration (config.py), the loop (loop.py: the epoch/step loop
and train_step) with its checkpoints (checkpoint.py), what stops it (interrupts.py: signals, a full disk, divergence),
its optimiser and schedule (optim.py) and the micro-batches of each step (microbatches.py); one file per method
(methods/: sft, dpo, cpo, orpo, kto, rm; rl/: grpo) and what they share (setup, pairs, reference, ops/, distributed)."""

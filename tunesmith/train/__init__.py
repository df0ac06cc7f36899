"""Training: the recipe (recipe.py), the resolved configuration (config.py), the loop (loop.py), one file per
method (sft, dpo, cpo, orpo, kto) and what they share (setup, pairs, reference, losses, token_logps, distributed)."""

"""NEFTune (`--neftune_noise_alpha`): uniform noise on the input embeddings while training.

Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning" (arXiv:2310.05914), Algorithm 1: the
embeddings X [B, L, d] of a training batch become X + ε·α/sqrt(L·d), ε ~ U(−1, 1) elementwise (L: the batch's
sequence length in tokens, d: the hidden size; for a packed or padding-free row L is the whole row's length). The
noise is transformers' own forward hook (integrations/neftune.py: neftune_post_forward_hook), registered on the
input embedding module; it adds nothing when the module is in eval mode, so validation, generation and the saved
weights never see it.
"""
from __future__ import annotations


def add_neftune(model, alpha: float):
    """Register NEFTune's hook with noise alpha `alpha` on the input embeddings of `model` (peft-wrapped or not);
    returns the hook's handle (handle.remove() takes it off)."""
    from transformers.integrations.neftune import activate_neftune

    return activate_neftune(model, alpha)

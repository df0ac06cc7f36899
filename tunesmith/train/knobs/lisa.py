"""LISA (`--lisa_activated_layers N --lisa_step_interval K`): only N decoder layers train at a time.

Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning"
(arXiv:2403.17919), Algorithm 1, as ms-swift's LISACallback applies it: every K optimiser steps, N of the decoder's
layers are drawn uniformly without replacement and made trainable, every other decoder layer frozen; the
embeddings, final norm and output layer always train. The draw for steps s·K+1 … (s+1)·K depends only on --seed and
s (numpy's default_rng([seed, s])), so a resumed run trains exactly the layers the uninterrupted run trained, with
nothing extra to save. The optimiser holds every parameter (built before the first freeze): a frozen layer gets no
gradient, and AdamW leaves a parameter without one untouched.
"""
from __future__ import annotations

import os


def decoder_layers(model):
    """The decoder's layers: the first torch.nn.ModuleList of the model (ms-swift's rule), or None."""
    import torch

    from tunesmith.models.load import unwrap_model

    return next((m for _, m in unwrap_model(model).named_modules() if isinstance(m, torch.nn.ModuleList)), None)


class LISA:
    """A loop hook (loop.Objective.hooks): `begin` and `after_step` set which decoder layers train next."""

    STATE_FILE = "lisa.json"  # the layers training at the checkpoint (for the record: the draw is recomputed)

    def __init__(self, layers, active: int, interval: int, seed: int):
        if active >= len(layers):
            from tunesmith.log import note

            note(f"--lisa_activated_layers {active}: the model has {len(layers)} decoder layers, so every layer trains "
                 f"at every step (LISA samples nothing); give fewer than {len(layers)}")
        self.layers, self.active, self.interval, self.seed = layers, min(active, len(layers)), interval, seed
        self.current: list[int] = []

    def draw(self, step: int) -> list[int]:
        """The layers (indices, ascending) that train in the optimiser steps after `step`: the draw of block
        step // interval."""
        import numpy as np

        rng = np.random.default_rng([self.seed, step // self.interval])
        return sorted(int(i) for i in rng.choice(len(self.layers), self.active, replace=False))

    def _apply(self, step: int) -> None:
        self.current = self.draw(step)
        for i, layer in enumerate(self.layers):
            layer.requires_grad_(i in self.current)

    def begin(self, model, step: int) -> None:
        """Before the first step of this run (0, or a resumed checkpoint's step): the layers of the next step."""
        self._apply(step)

    def after_step(self, model, step: int) -> None:
        """After optimiser step `step`: a new draw when a block of --lisa_step_interval steps has ended."""
        if step % self.interval == 0:
            self._apply(step)

    def save(self, path: str) -> None:
        """The layers training at this checkpoint, into lisa.json (for the record)."""
        from tunesmith.files import write_json_atomic

        write_json_atomic(os.path.join(path, self.STATE_FILE), {"active_layers": self.current,
                                                                 "interval": self.interval, "seed": self.seed})

    def load(self, path: str) -> None:
        """Nothing to restore: `begin` draws the resumed step's layers again from --seed (lisa.json records them)."""


def lisa_hooks(optim, model) -> tuple:
    """(LISA,) for --lisa_activated_layers > 0 (optimisation slice), else ()."""
    if optim.lisa_activated_layers <= 0:
        return ()
    layers = decoder_layers(model)
    return (LISA(layers, optim.lisa_activated_layers, optim.lisa_step_interval, optim.seed),)

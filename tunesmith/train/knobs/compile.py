"""`--torch_compile`: each decoder layer compiled with torch.compile.

The decoder layers are compiled in place (nn.Module.compile: the module stays the same object, its __call__ goes
through torch.compile), not the whole model: the loss path (train/ops/token_logps.py) calls the decoder and the output
layer apart, and LoRA, gradient checkpointing and the checkpoints keep seeing the same modules and parameter names.
--torch_compile_backend and --torch_compile_mode are torch.compile's backend and mode (default inductor, default).
"""
from __future__ import annotations

from tunesmith.log import note


def compile_layers(model, backend, mode) -> int:
    """Compile every decoder layer of `model` in place; returns how many were compiled (0, with a note, when the
    model has no layer list)."""
    from tunesmith.train.knobs.lisa import decoder_layers

    layers = decoder_layers(model)
    if layers is None:
        note("--torch_compile: the model has no list of decoder layers to compile; it runs uncompiled")
        return 0
    kwargs = {k: v for k, v in (("backend", backend), ("mode", mode)) if v}
    for layer in layers:
        layer.compile(**kwargs)
    return len(layers)

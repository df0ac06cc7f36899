"""ms-swift's training knobs, one small file each: the optimiser plugins (lorap.py: LoRA+, galore.py: GaLore,
muon.py: Muon with AdamW), LISA's layer sampling (lisa.py, a loop hook), and what is done to the model before
training (freeze.py: partial full fine-tuning, neftune.py: NEFTune, compile.py: --torch_compile). optim.py,
setup.py and the recipe pick them from the resolved flags; the loop knows none of them."""

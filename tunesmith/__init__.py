"""tunesmith: fine-tune open LLMs with SFT and preference training; ms-swift compatible command line."""
__version__ = "0.1.0"

"""Datasets: formats.py (detect/normalise rows), load.py (files, hubs, #N, splits),
encode.py (chat template -> ids, labels), collate.py (padding, padding-free, packing), command.py (`tunesmith data`).

Nothing is imported here, so `import tunesmith.data.formats` stays light: no torch, transformers or `datasets`
at import time anywhere in this package (collate.py imports torch inside its functions). No model or training
code belongs in this package.
"""

"""Datasets: formats.py (detect/normalise rows), load.py (files, hubs, #N, splits),
encode.py (chat template -> ids, labels), collate.py (padding; packing later), command.py (`tunesmith data`)."""

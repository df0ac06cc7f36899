"""Datasets: reading files (files.py: jsonl/json/csv/txt/parquet with line numbers) and dataset specs (load.py:
local files and folders, hubs, #N sampling, splits); rows normalised to messages (formats.py, with row.py,
messages.py and layouts.py for the column layouts); chat template → ids and labels (encode.py); the encoded-data
cache (store.py); streaming rows (stream.py); padding, padding-free and packing (collate.py); the whole data
preparation of a training run (prepare.py); and the built-in tiny tokenizers (tiny_tokenizer.py).

Nothing is imported here, so `import tunesmith.data.formats` stays light: no torch, transformers or `datasets`
at import time anywhere in this package (collate.py imports torch inside its functions). No model or training
code belongs in this package.
"""

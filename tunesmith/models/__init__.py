"""Models as files and modules: loading (tokenizer, weights, quantisation, LoRA), the output head the chunked
log-prob path uses, and what a checkpoint folder passes on to inference."""

"""Models out of tunesmith: merged Hugging Face folders, GGUF files for llama.cpp/Ollama/LM Studio, Ollama Modelfiles
and quantised Hugging Face checkpoints (`tunesmith export`)."""

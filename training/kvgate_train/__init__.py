"""kvgate's training package: a Llama-family PyTorch model in the Hugging Face layout, a corpus
builder (public-domain text plus RULER-style long-context tasks), a byte-level BPE tokenizer
trainer, the default-model trainer and a retrieval evaluator. See training/README.md."""

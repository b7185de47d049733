"""Acoustic models: the YAML-driven ASR Brain, the global tokenizer, seed checkpoints."""

"""Checkpoints. hf/: pure state-dict mappings to and from Hugging Face GPT-2 and Llama."""

"""Data pipeline: tokenizers, Megatron `.bin/.idx` files, GPT sample indices, SP-sharded batches.

Modules (imported explicitly; this package imports nothing so the tools stay light):
tokenizers, tokenizer_training, indexed_dataset, preprocess, index_mapping, cache,
eod_index, gpt_dataset, mock, samplers, sharding.
"""

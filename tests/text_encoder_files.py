"""A tiny T5 checkpoint directory in flan-t5's format (random weights, seeded): what `HFTextEncoder.from_dir`
loads in production, small enough for tests."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def write_tiny_t5_dir(path: Path, seed: int = 0):
    """Save a whole seq2seq T5 (flan-t5 checkpoints hold encoder and decoder) in bf16, with a T5 tokenizer built
    from a vocab list (transformers 5: no sentencepiece model file needed); → the fp32 model."""
    from transformers import T5ForConditionalGeneration, T5Tokenizer

    torch.manual_seed(seed)
    full = T5ForConditionalGeneration(tiny_t5_config()).eval()
    full.to(torch.bfloat16).save_pretrained(path)  # stored in bf16: the encoder must still run in fp32
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0 - i * 0.01) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz,.")]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path)
    return full.float()

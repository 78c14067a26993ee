"""Tiny, randomly initialised real HF models for tests (built from configs, never downloaded)."""

from __future__ import annotations

import torch


def tiny_llama(layers: int = 2, hidden: int = 32, vocab: int = 64, heads: int = 4, kv_heads: int = 2,
               tie: bool = False, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie, attention_dropout=0.0, **extra)
    return LlamaForCausalLM(cfg)


def tiny_qwen2(layers: int = 2, hidden: int = 32, vocab: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               **extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256, **extra)
    return Qwen2ForCausalLM(cfg)


def token_batch(n: int, length: int = 12, vocab: int = 64, seed: int = 0, prompt: int = 3) -> dict:
    """Causal-LM batch: random tokens, the first `prompt` positions unsupervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

"""A word-level tokenizer and a tiny LLaMA-style model built from scratch, so the demo needs no download."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(words: Iterable[str]):
    """A fast tokenizer over whitespace-separated words that adds BOS, with `</s>` as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(tokenizer, hidden: int = 128, layers: int = 6, heads: int = 4, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny(path: str | Path, words: Iterable[str], **kwargs) -> Path:
    """Write a tokenizer and a random tiny model to `path` in Hugging Face format."""
    path = Path(path)
    tok = build_tokenizer(words)
    model = build_model(tok, **kwargs)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

"""Batched generation (greedy or sampled) from prompt messages, with inference-time tokenization."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Message
from .stimuli import prompt_ids, stop_ids

# Logits processors a checkpoint's generation_config would add (Qwen2.5-Instruct ships repetition_penalty 1.05,
# top_k 20), and transformers' own top_k=50 default: all off, so a reply comes from the model's own distribution.
_NO_PROCESSORS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None, "num_beams": 1,
}  # fmt: skip
_NO_TRUNCATION = {"top_k": 0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def decoding(temperature: float, top_p: float = 1.0) -> dict:
    """`model.generate` arguments: greedy at temperature 0, else sampling at `temperature` cut by `top_p` alone."""
    if temperature == 0:
        return {"do_sample": False, **_NO_PROCESSORS}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, **_NO_PROCESSORS, **_NO_TRUNCATION}


@torch.no_grad()
def sample_ids(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[list[int]]:
    """Reply token ids for prompt ids (left-padded batches of similar length), through the first stop token."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(tokenizer)
    torch.manual_seed(seed)
    model.eval()
    for b0 in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[b0 : b0 + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(list(encoded[i]), dtype=torch.long)
            attn[r, width - len(encoded[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stops,
            **decoding(temperature, top_p),
        )
        for r, i in enumerate(idx):
            tokens = gen[r, width:].tolist()
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens) - 1)
            out[i] = tokens[: end + 1]
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    max_prompt_length: int = 512,
    system: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """One response per prompt; `system` prepends an instruction (e.g. for HIR)."""
    encoded = [prompt_ids(tokenizer, p, max_prompt_length, system) for p in prompts]
    replies = sample_ids(model, tokenizer, encoded, max_new_tokens, temperature, top_p, batch_size, seed, progress)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]


def read_prompts(path: str | Path) -> list[list[Message]]:
    """Prompts from JSONL records with `prompt` (a string, or messages ending with a user message) or from any
    preference-data file. Prompts are checked as preference data's are: a bad one raises DataError at `file:line`."""
    from .data import is_jsonl, load_pairs, parse_prompt, read_jsonl

    if is_jsonl(path):  # the data loader's rule: *.jsonl or *.jsonl.gz, in any case
        records = list(read_jsonl(path))
        if records and isinstance(records[0][1], dict) and "prompt" in records[0][1] and "chosen" not in records[0][1]:
            return [parse_prompt(rec, source) for source, rec in records]
    return [list(pair.prompt) for pair in load_pairs(path)[0]]


def write_generations(path: Path, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> None:
    with path.open("w") as f:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            f.write(json.dumps({"index": i, "prompt": list(p), "response": r}) + "\n")

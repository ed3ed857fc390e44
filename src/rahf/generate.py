"""Batched generation (greedy or sampled) from prompt messages, with inference-time tokenization."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Message
from .models import reply_stop_ids
from .stimuli import prompt_ids, reply_content

# transformers' own top_k=50 default and the other truncations: off, so a sample comes from the model's distribution
_NO_TRUNCATION = {"top_k": 0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def decoding(temperature: float, top_p: float = 1.0) -> dict:
    """`model.generate` arguments: greedy at temperature 0, else sampling at `temperature` cut by `top_p` alone. Call
    `generate` inside `own_settings`, so that nothing a checkpoint ships adds to them."""
    if temperature == 0:
        return {"do_sample": False, "num_beams": 1}
    return {"do_sample": True, "num_beams": 1, "temperature": temperature, "top_p": top_p, **_NO_TRUNCATION}


@contextmanager
def own_settings(model) -> Iterator[None]:
    """Within it, `model.generate` starts from transformers' defaults instead of the checkpoint's generation_config:
    what a checkpoint ships (Qwen2.5-Instruct's repetition_penalty 1.05 and top_k 20, a guidance_scale, a max_time
    that would cut replies by the clock, return_dict_in_generate) must not reach a reply. Its stop tokens are read
    before (`reply_stop_ids`) and passed to `generate`."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model generates with it
    shipped = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = shipped


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling, one random stream per prompt.

    Each row draws from softmax(logits / temperature) cut by `top_p` (transformers' own warpers) with the
    Gumbel-max trick: argmax of the warped logits plus Gumbel noise from that row's generator. The generator of
    prompt `i` is seeded by (seed, i), so a reply depends on the seed and its prompt's place in the list, not on
    the batch size or on the other prompts it shares a batch with.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, indices: Sequence[int], device) -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.warp = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_p < 1.0:
            self.warp.append(TopPLogitsWarper(top_p))
        self.generators = [
            torch.Generator(device=device).manual_seed(random.Random(f"{seed}:{i}").getrandbits(63)) for i in indices
        ]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.warp(input_ids, scores)
        tiny = torch.finfo(scores.dtype).tiny  # keeps the noise finite, so filtered (-inf) tokens stay out
        u = torch.stack(
            [
                torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=scores.dtype)
                for g in self.generators
            ]
        )
        return scores - torch.log(-torch.log(u.clamp_(min=tiny)))


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
    streams: Sequence[int] | None = None,
) -> list[list[int]]:
    """Reply token ids for prompt ids (left-padded batches of similar length), through the first stop token.

    Sampled replies come from `SeededSampler`: each is fixed by `seed` and its prompt's index alone (`streams[i]`
    for prompt i when given: its index in the whole prompt file, for a process that generates for part of it).
    """
    streams = range(len(encoded)) if streams is None else streams
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = reply_stop_ids(model, tokenizer)
    model.eval()
    for b0 in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[b0 : b0 + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(list(encoded[i]), dtype=torch.long)
            attn[r, width - len(encoded[i]) :] = 1
        sampler = (
            [] if temperature == 0 else [SeededSampler(temperature, top_p, seed, [streams[i] for i in idx], device)]
        )
        with own_settings(model):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=stops,
                logits_processor=sampler,
                **decoding(0.0),  # greedy over the sampler's noisy logits is sampling
            )
        for r, i in enumerate(idx):
            tokens = gen[r, width:].tolist()
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens) - 1)
            out[i] = tokens[: end + 1]
    return out


@dataclass(frozen=True)
class Reply:
    text: str  # `reply_text`
    finish_reason: str  # "stop": it ended at a stop token; "length": max_new_tokens cut it first (as OpenAI's API says)


def replies(
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
    streams: Sequence[int] | None = None,
) -> list[Reply]:
    """One reply per prompt; `system` prepends an instruction (e.g. for HIR); `streams`: see `sample_ids`."""
    encoded = [prompt_ids(tokenizer, p, max_prompt_length, system) for p in prompts]
    ids = sample_ids(model, tokenizer, encoded, max_new_tokens, temperature, top_p, batch_size, seed, progress, streams)
    stops = reply_stop_ids(model, tokenizer)
    return [Reply(reply_text(tokenizer, r, stops), "stop" if r and r[-1] in stops else "length") for r in ids]


def generate(model, tokenizer, prompts: Sequence[Sequence[Message]], *args, **kwargs) -> list[str]:
    """The text of each of `replies` (the same arguments)."""
    return [r.text for r in replies(model, tokenizer, prompts, *args, **kwargs)]


def reply_text(tokenizer, ids: Sequence[int], stops: Sequence[int]) -> str:
    """A reply's text without the stop token that ends it, nor the header the chat template writes before every
    reply (`rahf.stimuli.reply_content`: Qwen3's think block, gpt-oss's channel). Special tokens the model
    emitted inside the reply (a BOS, a pad, a turn marker) stay in the text, so a judge sees it as generated."""
    ids = list(ids)
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return reply_content(tokenizer, tokenizer.decode(ids, skip_special_tokens=False).strip())


def read_prompts(path: str | Path) -> list[list[Message]]:
    """Prompts from records with `prompt` (a string, or messages ending with a user message), in any file the data
    loader reads (JSONL, JSON, parquet, ...), or from any preference-data file. Prompts are checked as preference
    data's are: a bad one raises DataError at `file:line`."""
    from .data import pairs_of, parse_prompt, read_records

    records = list(read_records(path))
    if records and isinstance(records[0][1], dict) and "prompt" in records[0][1] and "chosen" not in records[0][1]:
        return [parse_prompt(rec, source) for source, rec in records]
    return [list(pair.prompt) for pair in pairs_of(records, path, also=("prompt-only",))[0]]


def write_generations(path: Path, prompts: Sequence[Sequence[Message]], made: Sequence[Reply]) -> None:
    with path.open("w") as f:
        for i, (p, r) in enumerate(zip(prompts, made)):
            row = {"index": i, "prompt": list(p), "response": r.text, "finish_reason": r.finish_reason}
            f.write(json.dumps(row) + "\n")

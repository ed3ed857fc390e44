"""Step 2: record the preference difference `v` and the original representation `o` once, on disk.

SCIT: the step-1 model reads the same (q, y) under p+ and p- (v = h(p+) - h(p-)) and with no
instruction (o). Dual: the same (q, y) without instruction through the preferred and the dispreferred
model (v = h+ - h-, o = h+): LoRA adapters are both loaded on one base and switched between the two
forwards, so one set of base weights is held; full fine-tunes are two models. `collect.difference:
normalized` compares the two states after dividing each by its root-mean-square. Only the window of
response positions is kept, only at the target layers (forward hooks, the forward stopping after the
last one and each sequence after its window). Shards are safetensors with ragged rows: `input_ids`/`seq_offsets` hold each sequence,
`win_start`/`win_len`/`win_offsets` its window, and `o.<layer>`/`v.<layer>` the window's hidden states.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from tqdm.auto import tqdm

from . import distributed
from .config import RahfConfig
from .data import PreferencePair
from .errors import RahfError
from .models import DTYPES, forward_capture
from .stimuli import Stimulus, build_variants, tokenizing


@dataclass(frozen=True)
class Example:
    """One (q, y) with its variants: `plain` (no instruction) and, for SCIT, `pos` and `neg`."""

    variants: dict[str, Stimulus]

    @property
    def plain(self) -> Stimulus:
        return self.variants["plain"]


def examples_for(tokenizer, pairs: list[PreferencePair], cfg: RahfConfig) -> list[Example]:
    """The pairs' responses (`collect.responses`: both, chosen or rejected), tokenized for the method's contrast."""
    systems: dict[str, str | None] = {"plain": None}
    if cfg.contrast == "prompt":
        systems |= {"pos": cfg.instructions.preferred, "neg": cfg.instructions.dispreferred}
    lengths = (cfg.data.max_prompt_length, cfg.data.max_response_length)
    out = []
    for p in tokenizing(pairs, "pairs"):
        picked = {"both": (p.chosen, p.rejected), "chosen": (p.chosen,), "rejected": (p.rejected,)}
        for response in picked[cfg.collect.responses]:
            v = build_variants(tokenizer, p.prompt, response, systems, *lengths, source=p.source)
            out.append(Example(v))
    return out


def pad_batch(
    seqs: list[Sequence[int]], pad_id: int, device, ends: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask; with `ends`, sequence i is cut after its first ends[i] tokens.

    The states of a causal model at the window's positions depend on no later token, so collect and align
    cut every sequence after its window (`window_end`): on long responses most of the forward is saved.
    """
    seqs = [s[:e] for s, e in zip(seqs, ends)] if ends is not None else seqs
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids.to(device), attn.to(device)


def window_end(window: tuple[int, int]) -> int:
    """How many tokens of a sequence its window (start, length) needs: those up to its last position."""
    return window[0] + window[1]


def window_rows(hidden: torch.Tensor, windows: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per sequence, the [n, H] hidden states of its window (start, n)."""
    return [hidden[i, start : start + n] for i, (start, n) in enumerate(windows)]


class AdapterView:
    """One adapter of a PEFT model that holds several, usable as a model: each forward activates it first.

    Dual's preferred and dispreferred adapters thus share one base model in collect.
    """

    def __init__(self, model, adapter: str):
        self.model, self.adapter = model, adapter

    @property
    def config(self):
        return self.model.config

    def parameters(self):
        return self.model.parameters()

    def get_base_model(self):
        return self.model.get_base_model()

    def __call__(self, **inputs):
        self.model.set_adapter(self.adapter)
        return self.model(**inputs)


class TargetReader:
    """Computes (o, v) per layer for a batch of examples from resident model(s), without gradients.

    SCIT and LoRRA: `plus` reads all three variants. Dual: `plus` is the preferred model and `minus` the
    dispreferred one: two `AdapterView`s of one base, or two separate models.
    """

    def __init__(self, cfg: RahfConfig, layers: list[int], pad_id: int, plus, minus=None):
        self.cfg, self.layers, self.pad_id = cfg, layers, pad_id
        self.plus, self.minus = plus, minus

    def _hidden(self, model, seqs: list[Stimulus]) -> dict[int, list[torch.Tensor]]:
        device = next(model.parameters()).device
        windows = [s.window(self.cfg.window, self.cfg.include_boundary) for s in seqs]
        ids, attn = pad_batch([s.input_ids for s in seqs], self.pad_id, device, [window_end(w) for w in windows])
        hs = forward_capture(model, self.layers, ids, attn)
        return {layer: window_rows(h.float(), windows) for layer, h in hs.items()}

    @torch.no_grad()
    def __call__(self, batch: list[Example]) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[torch.Tensor]]]:
        plain = self._hidden(self.plus, [e.plain for e in batch])
        if self.cfg.contrast == "prompt":
            pos = self._hidden(self.plus, [e.variants["pos"] for e in batch])
            neg = self._hidden(self.plus, [e.variants["neg"] for e in batch])
        else:
            pos, neg = plain, self._hidden(self.minus, [e.plain for e in batch])
        diff = difference if self.cfg.collect.difference == "raw" else normalized_difference
        v = {layer: [diff(o, a, b) for o, a, b in zip(plain[layer], pos[layer], neg[layer])] for layer in self.layers}
        return plain, v


def difference(o: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """v = h+ - h- (the paper's difference)."""
    return plus - minus


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)


def normalized_difference(o: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """v = rms(o) * (h+/rms(h+) - h-/rms(h-)): the difference of the states as a pre-norm block reads them.

    Per token; a scale gap between the two states (common between two separately trained Dual models)
    no longer dominates v.
    """
    return _rms(o) * (plus / _rms(plus) - minus / _rms(minus))


SHARD_BYTES = 2**30  # most target bytes in one shard, which collect holds in memory while it fills


def cache_bytes(examples: list[Example], cfg: RahfConfig, layers: list[int], hidden: int) -> int:
    tokens = sum(e.plain.window(cfg.window, cfg.include_boundary)[1] for e in examples)
    return 2 * tokens * hidden * len(layers) * DTYPES[cfg.collect.dtype].itemsize


def shard_ranges(window_lens: Sequence[int], shard_size: int, token_bytes: int) -> list[range]:
    """Consecutive sequences per shard: at most `shard_size` of them and `SHARD_BYTES` of targets (`token_bytes`
    per window position), but at least one sequence each."""
    out, start, tokens = [], 0, 0
    for i, n in enumerate(window_lens):
        if i > start and (i - start >= shard_size or (tokens + n) * token_bytes > SHARD_BYTES):
            out.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    return [*out, range(start, len(window_lens))] if len(window_lens) else out


def stored(t: torch.Tensor, dtype_name: str, what: str, layer: int) -> torch.Tensor:
    """`t` cast to the cache dtype; a value that dtype cannot hold (float16 tops out at 65504) stops collect, and so
    does a state the model itself made non-finite."""
    if not torch.isfinite(t).all():
        raise RahfError(
            f"collect: the model's states ({what}) at layer {layer} are not finite (NaN or inf) before the cast to the "
            "cache: the model overflows on these inputs; load it in a wider dtype (dtype: float32 or bfloat16)"
        )
    cast = t.to(DTYPES[dtype_name]).contiguous()
    if not torch.isfinite(cast).all():
        raise RahfError(
            f"collect: {what} at layer {layer} is not finite in {dtype_name} (largest |value| "
            f"{t.abs().max().item():.4g}); set collect.dtype: bfloat16 or float32"
        )
    return cast


def write_cache(
    reader: TargetReader,
    examples: list[Example],
    out: Path,
    hidden: int,
    saves: Path | None = None,
    desc: str = "collect",
) -> dict:
    """Compute targets batch by batch and write them as shards; returns per-layer statistics.

    Each batch's rows go straight into the shard's preallocated tensors in the cache dtype, so collect holds one
    shard (at most `SHARD_BYTES`) and one batch in float32, whatever the window, the layers and the width. With
    `saves` (a folder that outlives an interrupted run of the same inputs and settings), each finished shard is
    written there first, and the shards already there are kept instead of computed again; they stay there for
    `move_shards` to move to `out` once the stage's whole cache is written (a stage collecting two sets keeps the
    first while it collects the second). Launched as several processes, each computes every world_size()-th shard into `saves` (with fewer
    shards than processes, some wait), and process 0 alone returns the statistics (the others: {}). `desc` names
    what is collected in the messages and the progress bar.
    """
    cfg, layers = reader.cfg, reader.layers
    dtype = DTYPES[cfg.collect.dtype]
    size = cache_bytes(examples, cfg, layers, hidden)
    print(
        f"{desc}: {len(examples)} sequences x {len(layers)} layers x {hidden} dims -> "
        f"{size / 2**20:.1f} MiB of targets ({cfg.collect.dtype})",
        flush=True,
    )
    windows = [e.plain.window(cfg.window, cfg.include_boundary) for e in examples]
    token_bytes = 2 * hidden * len(layers) * dtype.itemsize
    # the same cut for any number of processes, so that the cache (and what is built on it) does not depend on it
    parts = shard_ranges([w[1] for w in windows], cfg.collect.shard_size, token_bytes)
    shards = [f"shard-{k:05d}.safetensors" for k in range(len(parts))]
    folder = saves if saves is not None else out  # the processes share `saves` (run_stage always gives one then)
    kept = {k for k, part in enumerate(parts) if _kept_shard(folder / shards[k], part, layers) is not None}
    distributed.wait()  # every process has looked before any writes
    if kept:
        print(
            f"[rahf] collect: keeping {len(kept)} of {len(parts)} shards an interrupted run left in {folder}",
            flush=True,
        )
    mine = [k for k in distributed.my_share(parts) if k not in kept]
    bar = tqdm(total=sum(len(parts[k]) for k in mine), desc=desc, unit="seq", disable=not distributed.is_main())
    for k in mine:
        part = parts[k]
        chunk, chunk_windows = examples[part.start : part.stop], windows[part.start : part.stop]
        _write_shard(reader, chunk, chunk_windows, part.start, folder / shards[k], hidden, bar)
    bar.close()
    distributed.wait()  # every process has written its shards
    if not distributed.is_main():
        return {}
    stats = {layer: {"v_norm": 0.0, "o_norm": 0.0} for layer in layers}
    n_tokens = 0
    for name, part in zip(shards, parts):
        meta = _kept_shard(folder / name, part, layers)
        if meta is None:
            raise RahfError(f"collect: {folder / name} is missing or unreadable after it was written")
        for layer in layers:
            for what in ("o", "v"):
                stats[layer][f"{what}_norm"] += meta["norms"][str(layer)][what]
        n_tokens += meta["tokens"]
    per_layer = {
        str(layer): {k: val / max(n_tokens, 1) for k, val in s.items()}
        | {"v_over_o": s["v_norm"] / max(s["o_norm"], 1e-12)}
        for layer, s in stats.items()
    }
    return {
        "shards": shards,
        "layers": layers,
        "n_sequences": len(examples),
        "n_tokens": n_tokens,
        "per_layer": per_layer,
    }


def _write_shard(
    reader: TargetReader,
    chunk: list[Example],
    windows: list[tuple[int, int]],
    start: int,
    path: Path,
    hidden: int,
    bar,
) -> None:
    """Compute the targets of `chunk` (the sequences from `start` on) batch by batch into preallocated tensors in
    the cache dtype and write them to `path` (as `path.part`, renamed when complete: a shard cut short by a kill is
    never kept), with metadata recording where it starts, its sequences, tokens and per-layer norm sums."""
    from safetensors.torch import save_file

    cfg, layers = reader.cfg, reader.layers
    dtype = DTYPES[cfg.collect.dtype]
    lens = torch.tensor([len(e.plain.input_ids) for e in chunk])
    tensors = {
        "input_ids": torch.tensor([t for e in chunk for t in e.plain.input_ids], dtype=torch.int64),
        "seq_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
        "win_start": torch.tensor([w[0] for w in windows], dtype=torch.int64),
        "win_len": torch.tensor([w[1] for w in windows], dtype=torch.int64),
    }
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), tensors["win_len"].cumsum(0)])
    tensors["win_offsets"] = offsets
    n = int(offsets[-1])
    for layer in layers:
        tensors[f"o.{layer}"] = torch.empty(n, hidden, dtype=dtype)
        tensors[f"v.{layer}"] = torch.empty(n, hidden, dtype=dtype)
    norms = {str(layer): {"o": 0.0, "v": 0.0} for layer in layers}
    # batches of sequences whose windows end alike, each padded to its longest window end: in file order HH pairs
    # left 25-48% of the positions computed padding; each sequence's rows still go to its own place in the file
    order = sorted(range(len(chunk)), key=lambda i: sum(windows[i]))
    for b0 in range(0, len(order), cfg.collect.batch_size):
        batch = order[b0 : b0 + cfg.collect.batch_size]
        o, v = reader([chunk[i] for i in batch])
        for layer in layers:
            for what, got in (("o", o), ("v", v)):
                block = torch.cat(got[layer])
                norms[str(layer)][what] += block.norm(dim=-1).sum().item()
                block = stored(block, cfg.collect.dtype, what, layer).cpu()
                for i, rows in zip(batch, block.split([windows[i][1] for i in batch])):
                    tensors[f"{what}.{layer}"][int(offsets[i]) : int(offsets[i + 1])] = rows
        bar.update(len(batch))
    meta = {"start": start, "sequences": len(chunk), "tokens": n, "norms": norms}
    part = path.with_name(path.name + ".part")
    save_file(tensors, str(part), metadata={"layers": ",".join(map(str, layers)), "rahf": json.dumps(meta)})
    os.replace(part, path)


def _kept_shard(path: Path, sequences: range, layers: list[int]) -> dict | None:
    """The statistics a complete shard at `path` records, when it holds the `sequences` (indices) and `layers`
    planned for it (an interrupted run of the same settings wrote it); None when there is none."""
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        kept = json.loads(meta["rahf"])
        planned = (sequences.start, len(sequences), ",".join(map(str, layers)))
        if (kept.get("start"), kept["sequences"], meta["layers"]) != planned:
            return None
        return kept
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError):
        return None


def move_shards(saves: Path, out: Path, shards: list[str]) -> None:
    """Move the finished `shards` that `write_cache` left in `saves` to `out` (process 0, once all are written)."""
    for name in shards:
        os.replace(saves / name, out / name)


def collected_shards(saves: Path) -> int:
    """How many finished shards an interrupted collect left in `saves` (the held-out set's, in eval/, too)."""
    return len(list(saves.glob("shard-*.safetensors")) + list(saves.glob("eval/shard-*.safetensors")))

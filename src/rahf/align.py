"""Step 3: train a LoRA so the model's hidden states at the target layers approach o + alpha * v.

Targets come from the collect cache (held in memory up to 1 GiB, else streamed shard slices; alpha is
applied here, so changing it needs no new collection) or, with `align.targets: online`, are recomputed
every step from the resident model with its adapter disabled; for Dual that model is the preferred
adapter merged into its base, so the dispreferred model is held beside it as a second full model. Each
sequence is forwarded only through its window (a causal model's states there depend on no later token).
The loss is the L2 distance per response-window token, averaged over real tokens and layers (`loss_norm: tokens`), or over every
slot of a window padded to its configured width, as the authors' code did (`loss_norm: authors`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .collect import Example, TargetReader, pad_batch, window_end
from .distributed import is_main
from .errors import RahfError
from .models import forward_capture, save_tokenizer
from .trainargs import stage_defaults


def alignment_loss(
    hidden: dict[int, torch.Tensor],
    targets: dict[int, torch.Tensor],
    mask: torch.Tensor,
    norm: str = "tokens",
    width: int | None = None,
    tokens: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean over layers of the per-token L2 distance `||h - target||` on window tokens.

    `hidden`/`targets`: layer -> [B, W, H]; `mask`: [B, W], 1 on real window tokens. With
    `norm="tokens"` the mean runs over real tokens only: the sum is divided by `tokens` (the real tokens of
    every micro-batch of an accumulated step, so that accumulation equals one larger batch; None: this
    batch's). With `"authors"` the sum is divided by B * `width` (the configured window; None: the batch's W),
    as the original code padded every response to that fixed length: short responses weigh less, and the
    scale is the same in every batch.
    """
    losses = []
    m = mask.to(torch.float32)
    slots = m.shape[0] * (width if width is not None else m.shape[1])
    count = (m.sum() if tokens is None else torch.as_tensor(tokens, dtype=torch.float32, device=m.device)).clamp(min=1)
    for layer, h in hidden.items():
        dist = torch.linalg.vector_norm((h.float() - targets[layer].float()) * m[..., None], dim=-1)
        losses.append(dist.sum() / (count if norm == "tokens" else slots))
    return torch.stack(losses).mean()


def gather_windows(hidden: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T, H] -> [B, W, H]: positions starts[b] .. starts[b] + W - 1 (clamped; masked later)."""
    idx = (starts[:, None] + torch.arange(width, device=hidden.device)[None]).clamp(max=hidden.shape[1] - 1)
    return hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """List of [n_i, H] -> [B, W, H] zero-padded."""
    out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class CachedTargets(torch.utils.data.Dataset):
    """Examples read from the collect shards: token ids, window, and per-layer (o, v) rows.

    A cache of at most `in_memory_bytes` on disk is read whole once (slicing tensors in memory is several
    times faster than one file read per row); a larger one streams each example's rows from the shards.
    """

    in_memory_bytes = 2**30

    def __init__(self, folder: str | Path, layers: list[int]):
        self.layers = layers
        self.paths = sorted(Path(folder).glob("shard-*.safetensors"))
        if not self.paths:
            raise RahfError(f"{folder}: no collect shards; run `rahf collect` first")
        with safe_open(str(self.paths[0]), framework="pt") as first:
            held = [int(x) for x in first.metadata()["layers"].split(",")]
        if not set(layers) <= set(held):
            raise RahfError(
                f"{folder}: the cache holds layers {held}, align asked for {layers}; run `rahf collect` again"
            )
        self._open()
        self.index: list[tuple[int, int]] = []
        self.meta = []
        for f_i, f in enumerate(self.files):
            meta = {k: f.get_tensor(k).tolist() for k in ("seq_offsets", "win_start", "win_offsets")}
            self.meta.append(meta)
            self.index += [(f_i, j) for j in range(len(meta["win_start"]))]

    def _open(self) -> None:
        self.files = [safe_open(str(p), framework="pt") for p in self.paths]
        whole = sum(p.stat().st_size for p in self.paths) <= self.in_memory_bytes
        keys = ["input_ids"] + [f"{kind}.{layer}" for kind in ("o", "v") for layer in self.layers]
        # per shard: name -> a tensor in memory, or a lazy slice of the file
        self.rows = [{k: f.get_tensor(k) if whole else f.get_slice(k) for k in keys} for f in self.files]

    def __getstate__(self) -> dict:
        """The index without the open shards (which cannot be pickled): data-loader workers started by spawn or
        forkserver (macOS, Windows, Python 3.14 on Linux) open the shards themselves."""
        return {k: v for k, v in self.__dict__.items() if k not in ("files", "rows")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        f_i, j = self.index[i]
        rows, meta = self.rows[f_i], self.meta[f_i]
        a, b = meta["seq_offsets"][j], meta["seq_offsets"][j + 1]
        w0, w1 = meta["win_offsets"][j], meta["win_offsets"][j + 1]
        return {
            "input_ids": rows["input_ids"][a:b].tolist(),
            "win_start": meta["win_start"][j],
            "win_len": w1 - w0,
            "o": {layer: rows[f"o.{layer}"][w0:w1] for layer in self.layers},
            "v": {layer: rows[f"v.{layer}"][w0:w1] for layer in self.layers},
        }


class CachedCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        ends = [window_end((it["win_start"], it["win_len"])) for it in items]
        ids, attn = pad_batch([it["input_ids"] for it in items], self.pad_id, "cpu", ends)
        width = max(it["win_len"] for it in items)
        layers = list(items[0]["o"])
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "win_start": torch.tensor([it["win_start"] for it in items]),
            "win_mask": (torch.arange(width)[None] < torch.tensor([it["win_len"] for it in items])[:, None]).long(),
            "o": {layer: pad_rows([it["o"][layer] for it in items], width) for layer in layers},
            "v": {layer: pad_rows([it["v"][layer] for it in items], width) for layer in layers},
        }


def window_lengths(dataset, collator) -> list[int]:
    """The real window tokens of every example of `dataset`: from a cache's index, or (online) from the windows
    `collator` cuts; no targets are read."""
    if isinstance(dataset, CachedTargets):
        offsets = [meta["win_offsets"] for meta in dataset.meta]
        return [w[j + 1] - w[j] for w in offsets for j in range(len(w) - 1)]
    return [e.plain.window(collator.window, collator.include_boundary)[1] for e in dataset]


class OnlineCollator:
    """Batches of `Example`s; the trainer computes their targets on the fly."""

    def __init__(self, pad_id: int, window: int, include_boundary: bool):
        self.pad_id, self.window, self.include_boundary = pad_id, window, include_boundary

    def __call__(self, items: list[Example]) -> dict:
        windows = [e.plain.window(self.window, self.include_boundary) for e in items]
        ids, attn = pad_batch([e.plain.input_ids for e in items], self.pad_id, "cpu", [window_end(w) for w in windows])
        width = max(n for _, n in windows)
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "win_start": torch.tensor([s for s, _ in windows]),
            "win_mask": (torch.arange(width)[None] < torch.tensor([n for _, n in windows])[:, None]).long(),
            "examples": items,
        }


def batch_ov(inputs: dict, reader: TargetReader | None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(o, v): layer -> [B, W, H], from the batch (cache) or from `reader` (online)."""
    if reader is None:
        return inputs["o"], inputs["v"]
    width = inputs["win_mask"].shape[1]
    plain, diff = reader(inputs["examples"])
    o = {layer: pad_rows(rows, width) for layer, rows in plain.items()}
    v = {layer: pad_rows(rows, width) for layer, rows in diff.items()}
    return o, v


def batch_targets(inputs: dict, alpha: float, reader: TargetReader | None) -> dict[int, torch.Tensor]:
    """layer -> [B, W, H] targets o + alpha * v, from the batch (cache) or from `reader` (online)."""
    o, v = batch_ov(inputs, reader)
    return {layer: o[layer].float() + alpha * v[layer].float() for layer in o}


def align_batch_loss(
    model,
    inputs: dict,
    layers: list[int],
    alpha: float,
    norm: str,
    reader=None,
    width: int | None = None,
    tokens: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The alignment loss of the (adapter-enabled) `model` on one collated batch (`width`, `tokens`: see
    alignment_loss)."""
    inner = getattr(model, "module", model)  # the model inside DistributedDataParallel (several processes)
    device = next(model.parameters()).device
    if reader is not None:
        was_training = inner.training
        inner.eval()  # targets as collect computes them: no dropout, adapter off
        with inner.disable_adapter():
            targets = batch_targets(inputs, alpha, reader)
        inner.train(was_training)
    else:
        targets = batch_targets(inputs, alpha, None)
    ids, attention = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    hs = forward_capture(model, layers, ids, attention, inner=inner)
    span = inputs["win_mask"].shape[1]  # this batch's longest window; `width` stays the configured one
    starts = inputs["win_start"].to(device)
    hidden = {layer: gather_windows(h, starts, span) for layer, h in hs.items()}
    mask = inputs["win_mask"].to(device)
    return alignment_loss(hidden, {k: t.to(device) for k, t in targets.items()}, mask, norm, width or span, tokens)


_NOISE = re.compile(r"dropout|pdrop|drop_path|layerdrop|jitter")  # config and module fields of train-mode noise


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off the base model's train-mode noise: its hidden states are trained towards targets read in eval mode, so
    noise would only be a loss the adapter cannot remove. Besides dropout modules, architectures read rates from float
    fields of their modules or config at every forward (OPT's `dropout` and `layerdrop`, Falcon's `hidden_dropout`,
    Mixtral's `router_jitter_noise`, LLaMA's `attention_dropout`): every such field is set to 0. Putting the base in
    eval mode instead would also turn off its gradient checkpointing. LoRA's own dropout is added afterwards and
    stays."""
    from transformers import PretrainedConfig
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    seen: set[int] = set()
    fields = [vars(m) for m in model.modules()]
    while fields:
        values = fields.pop()
        for name, value in values.items():
            if isinstance(value, float) and _NOISE.search(name):
                values[name] = 0.0
            elif isinstance(value, PretrainedConfig) and id(value) not in seen:  # a model's config, or a sub-config
                seen.add(id(value))
                fields.append(vars(value))
    return model


def align_trainer_class():
    from transformers import Trainer

    class AlignTrainer(Trainer):
        """Trainer whose loss is the representation-alignment objective."""

        layers: tuple[int, ...] = ()  # set by train_align before training
        alpha: float = 5.0
        norm: str = "tokens"
        width: int | None = None  # the configured window, the fixed denominator of `loss_norm: authors`
        reader: TargetReader | None = None

        @property
        def loss_is_scaled_for_ga(self) -> bool:
            """`loss_norm: tokens` divides by the real tokens of the whole accumulated step (num_items_in_batch), so
            the Trainer must not divide again; `authors` divides each micro-batch by its slots, and the Trainer
            averages the micro-batches, as for one larger batch."""
            return self.norm == "tokens"

        def _get_num_items_in_batch(self, batch_samples: list, device):
            """The real window tokens of every micro-batch of one optimiser step, on every process (the Trainer
            counts `labels`)."""
            if self.norm != "tokens":
                return None
            tokens = sum(int(b["win_mask"].sum()) for b in batch_samples)
            if self.args.world_size > 1:
                tokens = int(self.accelerator.gather(torch.tensor([tokens], device=device)).sum())
            return tokens

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens = num_items_in_batch if self.norm == "tokens" else None
            loss = align_batch_loss(model, inputs, self.layers, self.alpha, self.norm, self.reader, self.width, tokens)
            if tokens is not None and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over processes; the sum is over all tokens
            return (loss, {}) if return_outputs else loss

        tokens_per_sequence: float | None = None  # of the held-out set being evaluated (`loss_norm: tokens`)

        def evaluate(self, eval_dataset=None, *args, **kwargs):
            if self.norm == "tokens":
                lengths = window_lengths(eval_dataset or self.eval_dataset, self.data_collator)
                self.tokens_per_sequence = sum(lengths) / max(len(lengths), 1)
            return super().evaluate(eval_dataset, *args, **kwargs)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """The alignment loss of a held-out batch (its targets read as in training). With `loss_norm: tokens` its
            distance sum is divided by the batch's share of the held-out tokens, its sequences times their mean
            window, so that the Trainer's mean over batches, weighted by sequences, is the mean over every held-out
            token whatever the batch size."""
            tokens = None
            if self.norm == "tokens" and self.tokens_per_sequence:
                tokens = self.tokens_per_sequence * inputs["win_mask"].shape[0]
            with torch.no_grad():
                loss = align_batch_loss(
                    model, inputs, self.layers, self.alpha, self.norm, self.reader, self.width, tokens
                )
            return loss.detach(), None, None

        def _prepare_inputs(self, inputs):  # tensors move inside the loss; `examples` are not tensors
            return inputs

    return AlignTrainer


def train_align(cfg, out: Path, layers: list[int], alpha: float) -> dict[str, float]:
    """Train the alignment LoRA on the policy of `cfg`'s run and save the adapter (PEFT format) to `out`; returns
    its metrics on the pairs `data.eval_size` holds out ({} when it holds none out)."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    from .collect import examples_for
    from .diagnostics import fit_batches, target_fit
    from .models import load_tokenizer
    from .pipeline import load_policy, require_artifact, step1_path, target_reader
    from .training import ListDataset, load_split, lora_config, run_trainer, split_pairs, training_args

    revision = cfg.revision_of(step1_path(cfg))  # LoRRA's policy may be the Hub model itself
    tokenizer = load_tokenizer(str(step1_path(cfg)), cfg.trust_remote_code, revision)
    policy = without_dropout(load_policy(cfg))
    args = training_args(TrainingArguments, cfg, out, cfg.align.train, **stage_defaults("align", cfg))
    torch.manual_seed(args.seed)  # the adapter's random init comes before the Trainer seeds anything
    model = get_peft_model(policy, lora_config(policy, cfg.align.lora, max_layer=max(layers), revision=revision))
    held_out: torch.utils.data.Dataset | None = None
    if cfg.align.targets == "cache":
        collected = require_artifact(cfg, "collect")
        dataset, reader = CachedTargets(collected, layers), None
        if cfg.data.eval_size:  # collect wrote the held-out pairs' targets there
            held_out = CachedTargets(collected / "eval", layers)
        collator = CachedCollator(tokenizer.pad_token_id)
    else:
        pairs, held_pairs = load_split(cfg)
        _, pairs = split_pairs(cfg, pairs)
        dataset = ListDataset(examples_for(tokenizer, pairs, cfg))
        if held_pairs:
            held_out = ListDataset(examples_for(tokenizer, held_pairs, cfg))
        collator = OnlineCollator(tokenizer.pad_token_id, cfg.window, cfg.include_boundary)
        reader = target_reader(cfg, layers, tokenizer.pad_token_id, policy=model)
    trainer = align_trainer_class()(
        model=model, args=args, train_dataset=dataset, eval_dataset=held_out, data_collator=collator
    )
    trainer.layers, trainer.alpha, trainer.norm, trainer.reader = layers, alpha, cfg.align.loss_norm, reader
    trainer.width = cfg.window
    held = run_trainer(trainer, "align")
    if not is_main():  # launched as several processes, process 0 measures and writes
        return held
    batch = args.per_device_train_batch_size
    fit = target_fit(model, fit_batches(dataset, collator, batch), layers, alpha, reader)
    (out / "target_fit.json").write_text(json.dumps(fit, indent=1))
    if held_out is not None:  # how far the adapter moved the held-out pairs' states towards their targets
        held_fit = target_fit(model, fit_batches(held_out, collator, batch), layers, alpha, reader)
        (out / "target_fit_eval.json").write_text(json.dumps(held_fit, indent=1))
    for layer, f in fit.items():
        if f["reached"] is not None:
            print(
                f"[rahf] align: layer {layer}: reached {f['reached']:.2f} of the asked shift along v "
                f"(cosine {f['cosine'] or 0:.2f}), {f['distance_left']:.2f} of the distance left",
                flush=True,
            )
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    if step1 := step1_adapter(cfg):  # the policy was a step-1 adapter merged into its base
        note = ADAPTER_NOTE.format(step1=Path("..", *step1.parts[-2 if cfg.method == "dual" else -1 :]))
        _card_note(out / "README.md", note)  # PEFT's model card: loading this adapter alone is wrong
        print(f"[rahf] align: {' '.join(note.strip().split(chr(10), 1)[1].split())}", flush=True)
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return held


def step1_adapter(cfg) -> Path | None:
    """The step-1 PEFT adapter that `load_policy` merges into its base (SCIT's with `instruct.finetune: lora`,
    Dual's preferred one), or None when step 3 trains a plain model. The alignment adapter's config names only
    that base, so loading it needs this adapter merged first."""
    from .pipeline import step1_path

    if cfg.method == "lorra":
        return None
    folder = Path(step1_path(cfg)) / ("preferred" if cfg.method == "dual" else "")
    return folder if (folder / "adapter_config.json").is_file() else None


def _card_note(card: Path, note: str) -> None:
    """`note` at the top of a model card, after its YAML metadata block (PEFT's card is 200 lines of placeholders)."""
    text = card.read_text() if card.is_file() else ""
    head, body = "", text
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        end = text.index("\n---\n", 4) + len("\n---\n")
        head, body = text[:end], text[end:]
    card.write_text(head + note.strip() + "\n\n" + body.lstrip("\n"))


ADAPTER_NOTE = """
## Loading this adapter

It was trained on the step-1 model: the base model that `adapter_config.json` names *with the adapter
`{step1}` merged into it*. Loaded on the base alone (`AutoPeftModelForCausalLM` on this folder) it gives
another model. Use `../merged/`, or merge `{step1}` into the base first and load this adapter on the result.
"""

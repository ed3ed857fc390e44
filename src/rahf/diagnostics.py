"""Representation diagnostics: how well the target layers encode the preference before alignment (`probe_accuracy`,
from the collect cache) and how far the alignment adapter moved the hidden states towards their targets after it
(`target_fit`). The training loss alone mixes direction, reach and what is left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .align import batch_ov, gather_windows
from .collect import TargetReader
from .models import forward_capture

PROBE_PAIRS = 1024  # pairs `probe_accuracy` reads from the cache, spread over it


def probe_accuracy(items: Sequence[dict], layers: list[int], max_pairs: int = PROBE_PAIRS) -> dict[str, float] | None:
    """Per layer, the share of held-out pairs whose chosen reply the preference direction ranks first.

    `items`: collected sequences as `CachedTargets` gives them, a pair's chosen reply then its rejected one
    (`collect.responses: both`). The pairs are split in two halves; each half's direction d = the mean of `v` over
    its window tokens scores the other half's replies by the mean of <o, d> over their windows; a pair counts 1
    when its chosen reply scores higher, 0.5 on a tie, pooled over both halves. 0.5 is chance: a
    layer whose states the direction does not order by preference gives RAHF's target little to build on.
    None with fewer than 2 pairs.
    """
    n_pairs = len(items) // 2
    if n_pairs < 2:
        return None
    picks = sorted({i * n_pairs // min(n_pairs, max_pairs) for i in range(min(n_pairs, max_pairs))})
    halves = (picks[0::2], picks[1::2])
    directions = []
    for half in halves:  # each half's mean v per layer
        total = {layer: 0.0 for layer in layers}
        tokens = 0
        for pair in half:
            for item in (items[2 * pair], items[2 * pair + 1]):
                tokens += item["v"][layers[0]].shape[0]
                for layer in layers:
                    total[layer] = total[layer] + item["v"][layer].float().sum(0)
        directions.append({layer: total[layer] / max(tokens, 1) for layer in layers})
    wins = {layer: 0.0 for layer in layers}
    for half, d in zip(halves, reversed(directions)):  # each half scored by the other's direction
        for pair in half:
            chosen, rejected = items[2 * pair], items[2 * pair + 1]
            for layer in layers:
                a = chosen["o"][layer].float().mean(0) @ d[layer]
                b = rejected["o"][layer].float().mean(0) @ d[layer]
                wins[layer] += 1.0 if a > b else 0.5 if a == b else 0.0
    return {str(layer): wins[layer] / len(picks) for layer in layers}


@torch.no_grad()
def target_fit(model, batches, layers: list[int], alpha: float, reader: TargetReader | None = None) -> dict[str, dict]:
    """How far the adapter moved the hidden states towards their targets, per layer, over real window tokens.

    With shift = h - o (what the adapter changed) and asked = alpha * v (what the target asks):
    `reached` = sum <shift, asked> / sum |asked|^2, the share of the asked shift achieved along its direction
    (1: all of it); `cosine` = mean cos(shift, asked) over tokens that moved, how well its direction follows;
    `distance_left` = sum |h - target| / sum |asked|, the distance still to go as a share of the distance at the
    start (the adapter starts as the identity: h = o). The loss alone mixes all three.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the states as inference computes them: no LoRA dropout
    sums = {layer: torch.zeros(5, dtype=torch.float64) for layer in layers}  # dot, asked^2, cos, moved, left
    asked_norm = {layer: 0.0 for layer in layers}
    for inputs in batches:
        if reader is not None:
            with model.disable_adapter():
                o, v = batch_ov(inputs, reader)
        else:
            o, v = batch_ov(inputs, None)
        hs = forward_capture(model, layers, inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
        mask = inputs["win_mask"].to(device).bool()
        starts = inputs["win_start"].to(device)
        for layer in layers:
            h = gather_windows(hs[layer], starts, mask.shape[1]).float()[mask]
            base, vv = o[layer].to(device).float()[mask], v[layer].to(device).float()[mask]
            shift, asked = h - base, alpha * vv
            moved = (shift.norm(dim=-1) > 0) & (asked.norm(dim=-1) > 0)
            cos = torch.nn.functional.cosine_similarity(shift[moved], asked[moved], dim=-1)
            sums[layer] += torch.tensor(
                [
                    (shift * asked).sum().item(),
                    asked.pow(2).sum().item(),
                    cos.sum().item(),
                    moved.sum().item(),
                    (h - base - asked).norm(dim=-1).sum().item(),
                ],
                dtype=torch.float64,
            )
            asked_norm[layer] += asked.norm(dim=-1).sum().item()
    model.train(was_training)
    out = {}
    for layer in layers:
        dot, asked2, cos, moved, left = sums[layer].tolist()
        out[str(layer)] = {
            "reached": dot / asked2 if asked2 > 0 else None,
            "cosine": cos / moved if moved else None,
            "distance_left": left / asked_norm[layer] if asked_norm[layer] > 0 else None,
        }
    return out


FIT_SEQUENCES = 256  # sequences `target_fit` reads after training: spread over the data, a few seconds of forwards


def fit_batches(dataset, collator, batch_size: int):
    """Batches of up to FIT_SEQUENCES sequences spread evenly over `dataset`, for `target_fit`."""
    n = len(dataset)
    picks = sorted({i * n // min(n, FIT_SEQUENCES) for i in range(min(n, FIT_SEQUENCES))})
    for b0 in range(0, len(picks), batch_size):
        yield collator([dataset[i] for i in picks[b0 : b0 + batch_size]])

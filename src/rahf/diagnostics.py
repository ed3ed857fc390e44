"""Representation diagnostics: how far the alignment adapter moved the hidden states towards their targets
(`target_fit`). The training loss alone mixes direction, reach and what is left.
"""

from __future__ import annotations

import torch

from .align import batch_ov, gather_windows
from .collect import TargetReader
from .models import forward_capture


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

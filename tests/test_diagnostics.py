"""Representation diagnostics against hand-worked numbers: the probe accuracy of the preference direction per layer
and how far the alignment adapter moved the states (target_fit)."""

from __future__ import annotations

import math

import pytest
import torch

from rahf.diagnostics import probe_accuracy


def item(o_mean_x: float, v_x: float = 1.0) -> dict:
    """A collected sequence of 2 window tokens (H = 2) at layer 1: o's tokens average (o_mean_x, 0); v = (v_x, 0)."""
    o = torch.tensor([[o_mean_x - 1.0, 5.0], [o_mean_x + 1.0, -5.0]])
    return {"o": {1: o}, "v": {1: torch.tensor([[v_x, 0.0], [v_x, 0.0]])}}


def test_probe_accuracy_against_hand_computed_pairs():
    # pairs (chosen, rejected) scored along v = (1, 0): win, loss, tie, win
    items = [item(2), item(1), item(1), item(2), item(0), item(0), item(3), item(-1)]
    # halves: pairs 0, 2 and pairs 1, 3, each scored by the other's direction (both (1, 0)): (1 + 0.5 + 0 + 1) / 4
    assert probe_accuracy(items, [1]) == {"1": pytest.approx(0.625)}
    flipped = [item(x, v_x=-1.0) for x in (2, 1, 1, 2, 0, 0, 3, -1)]  # a direction that points the other way
    assert probe_accuracy(flipped, [1]) == {"1": pytest.approx(0.375)}
    assert probe_accuracy(items[:2], [1]) is None  # one pair: no held-out half


def test_target_fit_against_hand_computed_shares(monkeypatch):
    from rahf import diagnostics

    # sequence 0: window at positions 1-2; sequence 1: window at position 0 only (its 2nd slot is padding)
    hidden = torch.tensor(
        [[[9.0, 9.0], [3.0, 4.0], [2.0, 0.0]], [[1.0, 1.0], [50.0, -50.0], [7.0, 7.0]]]
    )  # [B, T, H] as the adapted model gives them
    o = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    v = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[0.0, 2.0], [100.0, 100.0]]])
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "win_start": torch.tensor([1, 0]),
        "win_mask": torch.tensor([[1, 1], [1, 0]]),
        "o": {5: o},
        "v": {5: v},
    }
    monkeypatch.setattr(diagnostics, "forward_capture", lambda model, layers, ids, attn: {5: hidden})
    fit = diagnostics.target_fit(torch.nn.Linear(1, 1), [batch], [5], alpha=2.0)["5"]
    # asked = 2v: (6,8), (0,2), (0,4); shift = h - o: (3,4), (2,0), (0,1)
    # reached = (18 + 32 + 0 + 4) / (100 + 4 + 16); cosine = mean(1, 0, 1); left = (|(-3,-4)| + |(2,-2)| + |(0,-3)|) / (10 + 2 + 4)
    assert fit["reached"] == pytest.approx(54 / 120)
    assert fit["cosine"] == pytest.approx(2 / 3)
    assert fit["distance_left"] == pytest.approx((5 + math.sqrt(8) + 3) / 16)
    against = diagnostics.target_fit(torch.nn.Linear(1, 1), [batch], [5], alpha=-2.0)["5"]
    assert against["cosine"] == pytest.approx(-2 / 3)  # the same shift, measured against what alpha -2 asks
    assert against["reached"] == pytest.approx(-54 / 120)
    nothing_asked = diagnostics.target_fit(torch.nn.Linear(1, 1), [batch], [5], alpha=0.0)["5"]
    assert nothing_asked == {"reached": None, "cosine": None, "distance_left": None}  # alpha 0 asks for no shift

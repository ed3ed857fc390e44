"""Representation diagnostics against hand-worked numbers: how far the alignment adapter moved the states
(target_fit)."""

from __future__ import annotations

import math

import pytest
import torch


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

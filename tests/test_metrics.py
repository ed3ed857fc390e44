"""Evaluation metrics against numbers worked out by hand: win rate, classifier metrics, AUC, perplexity, log-probs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rahf.metrics import (
    WinRate,
    auc_roc,
    classification_metrics,
    clustered_wilson,
    crossed_mean_interval,
    mean_interval,
    pairwise_accuracy,
    perplexity,
    response_logprobs,
    t_975,
    wilson_interval,
    win_rate,
)

# ---------------------------------------------------------------- win_rate


def test_win_rate_counts_ties_as_half_and_uses_the_wilson_interval():
    result = win_rate([1, 1, 0.5, 0])
    # rate = (2 wins + 0.5 * 1 tie) / 4 = 0.625
    # Wilson: centre = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    z = 1.959963984540054  # z^2 = 3.8414588206941254
    p, n = 0.625, 4
    denom = 1 + z**2 / 4  # = 1.9603647051735313
    centre = (0.625 + z**2 / 8) / denom  # = 0.5637636454431754
    half = z / denom * math.sqrt(0.625 * 0.375 / 4 + z**2 / 64)  # = 0.3443371253778125
    assert (p, n) == (result.rate, result.n)
    assert result.low == pytest.approx(centre - half, abs=1e-12)  # 0.2194265...
    assert result.high == pytest.approx(centre + half, abs=1e-12)  # 0.9081007...
    assert result.low == pytest.approx(0.21942652006536284, abs=1e-12)
    assert result.high == pytest.approx(0.9081007708209878, abs=1e-12)
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)


def test_win_rate_interval_narrows_with_more_outcomes_at_the_same_rate():
    small = win_rate([1, 1, 0.5, 0])
    large = win_rate([1, 1, 0.5, 0] * 25)
    assert large.rate == small.rate == 0.625
    assert small.low < large.low < large.rate < large.high < small.high


def test_win_rate_interval_stays_within_unit_range_at_the_extremes():
    assert win_rate([1, 1, 1]).high <= 1.0 and win_rate([1, 1, 1]).rate == 1.0
    assert win_rate([0, 0, 0]).low >= 0.0 and win_rate([0, 0, 0]).rate == 0.0
    assert win_rate([1, 1, 1]).low > 0.0  # Wilson does not collapse to a point at p = 1


def test_win_rate_is_frozen():
    with pytest.raises(AttributeError):
        win_rate([1]).rate = 0.0  # type: ignore[misc]
    assert isinstance(win_rate([0.5]), WinRate)


@pytest.mark.parametrize("outcomes", [[], [1, 2], [0.25], [-1]])
def test_win_rate_rejects_empty_or_unknown_outcomes(outcomes):
    with pytest.raises(ValueError):
        win_rate(outcomes)


def test_clustered_wilson_by_hand():
    # two prompts x two replies: verdicts (1, 1) and (0, 1); rate = 3/4
    # cluster-robust variance = ((2 * (1 - 0.75))^2 + (2 * (0.5 - 0.75))^2) / 4^2 = 0.5 / 16 = 0.03125
    # independent variance = 0.75 * 0.25 / 4 = 0.046875, so deff = 0.667 < 1 counts as 1: the plain Wilson
    assert clustered_wilson([1.0, 0.5], [2, 2]) == (0.75, *wilson_interval(0.75, 4), 4.0)
    # verdicts (1, 1, 1) and (0, 0, 0) and (1, 1, 1): cluster-robust variance = 9 * (2 * (1/3)^2 + (2/3)^2) / 81
    # = 2/27, independent = (2/3)(1/3)/9 = 2/81: deff = 3 (all replies agree), n_eff = 3 = the number of prompts
    rate, low, high, n_eff = clustered_wilson([1.0, 0.0, 1.0], [3, 3, 3])
    assert rate == pytest.approx(2 / 3) and n_eff == pytest.approx(3.0)
    assert (low, high) == pytest.approx(wilson_interval(2 / 3, 3), abs=1e-12)
    # every verdict alike (rate 0 or 1) or a single prompt: the design effect cannot be estimated, so the interval
    # is that of one verdict per prompt, never that of independent replies
    assert clustered_wilson([1.0, 1.0], [5, 5])[1:] == (*wilson_interval(1.0, 2), 2.0)
    assert clustered_wilson([0.0] * 6, [6] * 6)[1:] == pytest.approx((0.0, 0.390334, 6.0), abs=1e-6)
    assert clustered_wilson([0.5], [8])[1:] == (*wilson_interval(0.5, 1), 1.0)
    assert clustered_wilson([1.0, 0.0], [1, 1])[3] == 2.0  # one reply per prompt: plain Wilson, as before


def test_crossed_mean_interval_by_hand():
    # seeds x prompts [[1, 0, 0.5], [0.5, 0, 0.5]]: mean 2.5/6; seed means 0.5, 1/3; prompt means 0.75, 0, 0.5
    # MS_seed = 3 * ((1/12)^2 + (1/12)^2) / 1 = 1/24; MS_prompt = 2 * ((1/3)^2 + (5/12)^2 + (1/12)^2) / 2 = 7/24;
    # residuals (cell - seed mean - prompt mean + mean) 1/6, -1/12, -1/12 / -1/6, 1/12, 1/12: MS_resid =
    # (2/36 + 4/144) / 2 = 1/24. Var = (1/24 + 7/24 - 1/24) / 6 = 7/144; Satterthwaite
    # df = (7/24)^2 / ((1/24)^2 / 1 + (7/24)^2 / 2 + (1/24)^2 / 2) = 49 / 26.5 = 1.85 -> 1: t 12.7062
    mean, low, high = crossed_mean_interval([[1, 0, 0.5], [0.5, 0, 0.5]])
    half = 12.7062 * math.sqrt(7 / 144)
    assert (mean, low, high) == pytest.approx((2.5 / 6, 2.5 / 6 - half, 2.5 / 6 + half))
    # two seeds that differ on the same one prompt of six by the same amount: seeds agree exactly, so a t
    # interval over the seeds has zero width; this one is the prompts' (no seed or interaction term): t(5 df)
    d = 1 / 6
    mean, low, high = crossed_mean_interval([[d, 0, 0, 0, 0, 0]] * 2)
    sd = math.sqrt((d - d / 6) ** 2 + 5 * (d / 6) ** 2) / math.sqrt(5)  # of the 6 prompt means
    assert (low, high) == pytest.approx((d / 6 - 2.5706 * sd / math.sqrt(6), d / 6 + 2.5706 * sd / math.sqrt(6)))
    assert low < 0 < high
    # seed means and prompt means all 0.5 (MS_seed = MS_prompt = 0), the cells not: the residual's floor,
    # MS_resid = 6 * 0.25 / 4 = 0.375 on 4 df, gives the width a zero-width interval would hide
    mean, low, high = crossed_mean_interval([[1, 0, 0.5], [0, 0.5, 1], [0.5, 1, 0]])
    half = 2.7764 * math.sqrt(0.375 / 9)
    assert (mean, low, high) == pytest.approx((0.5, 0.5 - half, 0.5 + half))


@pytest.mark.parametrize("table", [[], [[0.1, 0.2]], [[0.1], [0.2]], [[0.1, 0.2], [0.3]], [[0.1, math.nan]] * 2])
def test_crossed_mean_interval_rejects_bad_input(table):
    with pytest.raises(ValueError):
        crossed_mean_interval(table)


@pytest.mark.parametrize(
    ("means", "sizes"), [([], []), ([0.5], [0]), ([0.5, 0.5], [1]), ([1.5], [1]), ([math.nan], [2])]
)
def test_clustered_wilson_rejects_bad_input(means, sizes):
    with pytest.raises(ValueError):
        clustered_wilson(means, sizes)


def test_wilson_interval_rejects_no_trials_and_a_rate_outside_0_1():
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0.5, 0)
    for rate in (math.nan, -0.1, 1.5):
        with pytest.raises(ValueError, match="a rate in \\[0, 1\\]"):
            wilson_interval(rate, 100)


def test_t_quantiles_and_mean_interval():
    assert t_975(1) == 12.7062 and t_975(2) == 4.3027 and t_975(30) == 2.0423
    assert t_975(40) == pytest.approx(2.0211, abs=1e-4) and t_975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t_975(10**6) == pytest.approx(1.96, abs=1e-3)
    # differences +0.22, -0.10, +0.06: mean 0.06, sd 0.16, half width 4.3027 * 0.16 / sqrt(3)
    mean, low, high = mean_interval([0.22, -0.10, 0.06])
    assert mean == pytest.approx(0.06) and high - mean == pytest.approx(4.3027 * 0.16 / math.sqrt(3))
    assert low == pytest.approx(2 * mean - high)
    assert mean_interval([0.3]) == (0.3, None, None)
    with pytest.raises(ValueError):
        mean_interval([])


# ---------------------------------------------------------------- classification_metrics


def test_classification_metrics_by_hand():
    scores = [2.0, 0.5, -1.0, -1.5, 1.0, -0.5, -2.0]
    labels = [1, 1, 1, 1, 0, 0, 0]
    # Predicted positive (score > 0): 2.0, 0.5 (both chosen) and 1.0 (rejected).
    # TP = 2, FN = 2 (-1.0, -1.5), FP = 1 (1.0), TN = 2 (-0.5, -2.0)
    # accuracy = 4/7, precision = 2/3, recall = 2/4, f1 = 2 * (2/3)(1/2) / (2/3 + 1/2) = 4/7
    # AUC: positives beat negatives in 3 (2.0) + 2 (0.5) + 1 (-1.0) + 1 (-1.5) = 7 of 12 pairs
    m = classification_metrics(scores, labels)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["auc_roc"] == pytest.approx(7 / 12)


def test_classification_metrics_threshold_moves_the_cut_but_not_the_auc():
    scores = [2.0, 0.5, -1.0, -1.5, 1.0, -0.5, -2.0]
    labels = [1, 1, 1, 1, 0, 0, 0]
    # Threshold 1.5: only 2.0 is positive -> TP = 1, FP = 0, FN = 3, TN = 3
    m = classification_metrics(scores, labels, threshold=1.5)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == 1.0
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.25 / 1.25)  # = 0.4
    assert m["auc_roc"] == pytest.approx(7 / 12)


def test_classification_metrics_undefined_scores_are_zero():
    # Nothing predicted positive: TP = FP = 0 -> precision, recall and f1 are undefined -> 0.0
    m = classification_metrics([-1.0, -2.0], [1, 0])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == 0.5
    assert m["auc_roc"] == 1.0


def test_auc_counts_ties_as_half():
    # Pairs (pos, neg): (0.9, 0.5) 1, (0.9, 0.1) 1, (0.5, 0.5) tie 0.5, (0.5, 0.1) 1 -> (1 + 1 + 0.5 + 1) / 4
    m = classification_metrics([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert m["auc_roc"] == pytest.approx(0.875)


def test_auc_perfect_inverted_and_all_tied():
    assert classification_metrics([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0])["auc_roc"] == 1.0
    assert classification_metrics([0.0, 1.0, 2.0, 3.0], [1, 1, 0, 0])["auc_roc"] == 0.0
    assert classification_metrics([1.0, 1.0, 1.0], [1, 0, 0])["auc_roc"] == 0.5


@pytest.mark.parametrize(
    ("scores", "labels"),
    [([1.0, 2.0], [1, 1]), ([1.0, 2.0], [0, 0]), ([1.0], [1, 0]), ([1.0, 2.0], [1, 2]), ([], [])],
)
def test_classification_metrics_rejects_bad_input(scores, labels):
    with pytest.raises(ValueError):
        classification_metrics(scores, labels)
    with pytest.raises(ValueError):  # auc_roc alone too: zip would cut the longer list
        auc_roc(scores, labels)


# ---------------------------------------------------------------- pairwise_accuracy


def test_pairwise_accuracy_counts_ties_as_half():
    # wins: 2 > 1, 0 < 1 loses, 3 == 3 ties, 5 > -1 -> (1 + 0 + 0.5 + 1) / 4
    assert pairwise_accuracy([2.0, 0.0, 3.0, 5.0], [1.0, 1.0, 3.0, -1.0]) == pytest.approx(0.625)


@pytest.mark.parametrize(("chosen", "rejected"), [([], []), ([1.0], [1.0, 2.0])])
def test_pairwise_accuracy_rejects_empty_or_mismatched(chosen, rejected):
    with pytest.raises(ValueError):
        pairwise_accuracy(chosen, rejected)


# ---------------------------------------------------------------- perplexity


def test_perplexity_is_token_weighted():
    result = perplexity([[math.log(0.5), math.log(0.25)], [math.log(0.5)]])
    ce = -(math.log(0.5) + math.log(0.25) + math.log(0.5)) / 3  # = 4 ln 2 / 3
    assert result["cross_entropy"] == pytest.approx(ce)
    assert result["perplexity"] == pytest.approx(math.exp(ce))  # = 2^(4/3)
    assert result["perplexity"] == pytest.approx(2 ** (4 / 3))
    assert result["n_tokens"] == 3


@pytest.mark.parametrize("logprobs", [[], [[]], [[], []]])
def test_perplexity_rejects_no_tokens(logprobs):
    with pytest.raises(ValueError):
        perplexity(logprobs)


# ---------------------------------------------------------------- response_logprobs

# Next-token distributions by position (same for both sequences); position 2's is never used.
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]])


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM: returns log(PROBS) + 3 (the shift checks normalisation) for every sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_enabled: bool | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.grad_enabled = torch.is_grad_enabled()
        logits = (PROBS.log() + 3.0).expand(input_ids.shape[0], -1, -1).requires_grad_()
        return SimpleNamespace(logits=logits)


def test_response_logprobs_by_hand():
    model = FixedLogits()
    input_ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    attention_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    response_mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    out = response_logprobs(model, input_ids, attention_mask, response_mask)
    # Seq 0: token 1 at pos 1 from PROBS[0] -> 0.25; token 2 at pos 2 from PROBS[1] -> 0.7
    # Seq 1: token 1 at pos 2 from PROBS[1] -> 0.2
    assert out[0] == pytest.approx([math.log(0.25), math.log(0.7)], abs=1e-6)
    assert out[1] == pytest.approx([math.log(0.2)], abs=1e-6)
    assert model.grad_enabled is False


def test_response_logprobs_skips_positions_outside_the_attention_mask():
    input_ids = torch.tensor([[0, 1, 2]])
    # Position 2 is marked as response but padded out, so only position 1 (token 1 from PROBS[0]) counts.
    out = response_logprobs(FixedLogits(), input_ids, torch.tensor([[1, 1, 0]]), torch.tensor([[0, 1, 1]]))
    assert out == [pytest.approx([math.log(0.25)], abs=1e-6)]


def test_response_logprobs_normalises_only_the_scored_positions(monkeypatch):
    """A [B, T, V] float32 log-softmax over prompt and pad positions too needs tens of GiB for a 128k vocabulary."""
    rows = []
    real = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda x, dim: rows.append(x.shape[0]) or real(x, dim=dim))
    input_ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    out = response_logprobs(
        FixedLogits(), input_ids, torch.tensor([[1, 1, 1], [0, 1, 1]]), torch.tensor([[0, 1, 1], [0, 0, 1]])
    )
    assert rows == [3] and [len(r) for r in out] == [2, 1]


class KeptLogits(FixedLogits):
    """FixedLogits with `logits_to_keep`, as transformers' causal LMs take it: only the last positions' logits."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0):
        self.kept = logits_to_keep
        logits = super().forward(input_ids[:, :3], attention_mask).logits  # PROBS: positions 0..2
        logits = torch.cat([logits[:, :1], logits], 1)  # position 0 repeated: positions 1..3 take PROBS
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_response_logprobs_ask_only_for_the_logits_they_score():
    """The first reply token is at position 2 in both rows, so positions 1.. are the first whose logits count."""
    model = KeptLogits()
    input_ids = torch.tensor([[0, 0, 1, 2], [0, 2, 0, 1]])
    out = response_logprobs(model, input_ids, torch.ones_like(input_ids), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]))
    assert model.kept == 3
    # Row 0: token 1 at position 2 from position 1 (PROBS[0]) -> 0.25; token 2 at 3 from PROBS[1] -> 0.7
    # Row 1: token 1 at position 3 from PROBS[1] -> 0.2
    assert out == [pytest.approx([math.log(0.25), math.log(0.7)], abs=1e-6), pytest.approx([math.log(0.2)], abs=1e-6)]


def test_response_logprobs_rejects_unpredictable_or_misshaped_masks():
    ids = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError):
        response_logprobs(FixedLogits(), ids, torch.ones_like(ids), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError):
        response_logprobs(FixedLogits(), ids, torch.ones(1, 2, dtype=torch.long), torch.tensor([[0, 1, 1]]))


def test_score_metrics_refuse_nan_instead_of_ranking_it():
    nan = math.nan
    with pytest.raises(ValueError, match="NaN"):
        pairwise_accuracy([nan, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics([nan, 1.0, 0.0, 2.0], [1, 1, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        auc_roc([nan, 1.0], [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        perplexity([[-1.0, nan]])

"""Metrics for comparing alignment methods: win rates, reward-model accuracy, AUC and perplexity.

Pure Python (plus torch for scoring a model), so results do not depend on scikit-learn or scipy.
All functions raise ValueError on empty or malformed input instead of returning a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import logits_from

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
_OUTCOMES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class WinRate:
    """A win rate with its 95% Wilson interval and the outcome counts it came from."""

    rate: float
    low: float
    high: float
    n: int
    wins: int
    ties: int
    losses: int


def wilson_interval(rate: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion `rate` observed over `n` trials, clipped to [0, 1].

    Unlike the normal (Wald) interval it stays sensible near 0 and 1 and for small n. `n` may be an
    effective sample size (not a whole number); see `clustered_wilson`.
    """
    if not n > 0:
        raise ValueError(f"wilson_interval needs n > 0; got {n!r}")
    if not 0.0 <= rate <= 1.0:  # NaN fails this too
        raise ValueError(f"wilson_interval needs a rate in [0, 1]; got {rate!r}")
    z2 = z * z
    denom = 1 + z2 / n
    centre = (rate + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_wilson(
    means: Sequence[float], sizes: Sequence[int], z: float = Z_95
) -> tuple[float, float, float, float]:
    """(rate, low, high, n_eff): the Wilson interval of verdicts in clusters (the replies to one prompt).

    Replies to one prompt share its difficulty, so their verdicts are correlated and n replies carry less
    information than n independent ones. Cluster i holds `sizes[i]` verdicts with mean `means[i]`; the rate is
    the mean of all verdicts. The Wilson interval is taken at the effective sample size n / deff, where the
    design effect deff is the cluster-robust variance of the rate over the variance of n independent
    proportions. deff is at least 1, so the interval is never narrower than that of independent verdicts
    (and equals it when every cluster holds one verdict); n_eff lies between the number of clusters and n. Where
    every verdict is alike (a rate of 0 or 1) the design effect cannot be estimated and n_eff is the number of
    clusters, the cautious end; one differing verdict lets it be estimated, near 1, so such a record's interval can
    be narrower than a perfect one's.
    """
    if len(means) != len(sizes):
        raise ValueError(f"means and sizes differ in length: {len(means)} vs {len(sizes)}")
    if not means or any(m < 1 for m in sizes):
        raise ValueError("clustered_wilson needs at least one cluster, each with at least one verdict")
    bad = [x for x in means if not 0.0 <= x <= 1.0]  # NaN fails this too
    if bad:
        raise ValueError(f"cluster means must lie in [0, 1]; got {bad[0]!r}")
    n = sum(sizes)
    rate = sum(m * x for x, m in zip(means, sizes)) / n
    n_eff = float(n)
    independent = rate * (1 - rate) / n
    if max(sizes) > 1 and (len(means) == 1 or independent == 0):
        # the design effect cannot be estimated (one cluster; or every verdict alike, a rate of 0 or 1): take the
        # most it can be, so that the interval claims no more than one verdict per cluster would show
        n_eff = float(len(means))
    elif max(sizes) > 1:
        clustered = sum((m * (x - rate)) ** 2 for x, m in zip(means, sizes)) / (n * n)
        n_eff = n / max(1.0, clustered / independent)
    low, high = wilson_interval(rate, n_eff, z)
    return rate, low, high, n_eff


# Two-sided 95% quantiles of Student's t with 1..30 degrees of freedom.
_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_975(df: int) -> float:
    """Two-sided 95% quantile of Student's t: a table to 30 degrees of freedom, Cornish-Fisher above (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"t_975 needs at least 1 degree of freedom; got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = Z_95
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the mean of independent `values` with its 95% Student t interval (None for one value).

    Used for differences between methods: one per seed, or one per prompt when there is one seed.
    """
    if not values:
        raise ValueError("mean_interval needs at least one value")
    if any(math.isnan(x) for x in values):
        raise ValueError("mean_interval got NaN")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, None, None
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (len(values) - 1))
    half = t_975(len(values) - 1) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def crossed_mean_interval(table: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of a seeds x prompts table of differences with its 95% interval, seeds and
    prompts both random (two-way crossed random effects, one value per cell).

    Var(mean) = s2_seed / S + s2_prompt / P + s2_resid / (S P), estimated from the ANOVA mean squares as
    (MS_seed + MS_prompt - MS_resid) / (S P), never below MS_seed / (S P), MS_prompt / (S P) or MS_resid / (S P)
    (each estimates a part of it), with Satterthwaite's degrees of freedom (or those of the term it falls back on).
    A t interval over the S seed means alone ignores that every seed is judged on the same prompts: seeds that happen
    to agree would give it zero width; so would seed means and prompt means that happen to agree, without the
    residual's floor.
    """
    rows = [list(r) for r in table]
    seeds, prompts = len(rows), len(rows[0]) if rows else 0
    if seeds < 2 or prompts < 2 or any(len(r) != prompts for r in rows):
        raise ValueError("crossed_mean_interval needs at least 2 seeds and 2 prompts, the same prompts in every seed")
    if any(math.isnan(x) for r in rows for x in r):
        raise ValueError("crossed_mean_interval got NaN")
    mean = math.fsum(x for r in rows for x in r) / (seeds * prompts)
    by_seed = [math.fsum(r) / prompts for r in rows]
    by_prompt = [math.fsum(r[j] for r in rows) / seeds for j in range(prompts)]
    ms_seed = prompts * math.fsum((x - mean) ** 2 for x in by_seed) / (seeds - 1)
    ms_prompt = seeds * math.fsum((x - mean) ** 2 for x in by_prompt) / (prompts - 1)
    resid = math.fsum(
        (rows[i][j] - by_seed[i] - by_prompt[j] + mean) ** 2 for i in range(seeds) for j in range(prompts)
    )
    df_resid = (seeds - 1) * (prompts - 1)
    ms_resid = resid / df_resid
    terms = [(ms_seed, seeds - 1), (ms_prompt, prompts - 1), (ms_resid, df_resid)]
    combined = ms_seed + ms_prompt - ms_resid
    if combined >= max(ms_seed, ms_prompt, ms_resid):
        spread = ms_seed**2 / (seeds - 1) + ms_prompt**2 / (prompts - 1) + ms_resid**2 / df_resid
        df = combined**2 / spread if spread > 0 else float(prompts - 1)
    else:
        combined, df = max(terms)
    half = t_975(max(1, math.floor(df))) * math.sqrt(combined / (seeds * prompts))
    return mean, mean - half, mean + half


def win_rate(outcomes: Sequence[float]) -> WinRate:
    """Win rate of head-to-head outcomes (1 win, 0.5 tie, 0 loss) with a 95% Wilson interval.

    A tie counts as half a win, so the rate is (wins + ties / 2) / n and the interval treats that
    as a proportion over n comparisons (ties add a little less variance than assumed: conservative).
    """
    if not outcomes:
        raise ValueError("win_rate needs at least one outcome")
    bad = [x for x in outcomes if x not in _OUTCOMES]
    if bad:
        raise ValueError(f"outcomes must be 1 (win), 0.5 (tie) or 0 (loss); got {bad[0]!r}")
    n = len(outcomes)
    wins = sum(1 for x in outcomes if x == 1.0)
    ties = sum(1 for x in outcomes if x == 0.5)
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n)
    return WinRate(rate=rate, low=low, high=high, n=n, wins=wins, ties=ties, losses=n - wins - ties)


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (O(n log n))."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        mean_rank = (start + end) / 2 + 1
        for i in order[start : end + 1]:
            ranks[i] = mean_rank
        start = end + 1
    return ranks


def auc_roc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Exact ROC AUC via the Mann-Whitney U statistic: P(positive scores above negative), ties half."""
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels differ in length: {len(scores)} vs {len(labels)}")
    if any(y not in (0, 1) for y in labels):
        raise ValueError("labels must be 0 (rejected) or 1 (chosen)")
    _check_scores(scores)
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc_roc needs both classes (labels 0 and 1) to be present")
    ranks = _average_ranks(scores)
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _check_scores(*score_lists: Sequence[float]) -> None:
    """NaN scores (a broken model, a half-precision overflow) have no order: refuse them rather than rank them."""
    for scores in score_lists:
        if any(math.isnan(s) for s in scores):
            raise ValueError("scores contain NaN; check the model that produced them")


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0 (an undefined precision/recall/F1 counts as 0)."""
    return num / den if den else 0.0


def classification_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.0) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and ROC AUC of a scorer used as a chosen(1)/rejected(0) classifier.

    A response is predicted positive when its score > `threshold`. Precision, recall and F1 are 0.0
    when undefined (no predicted positives, no actual positives, or both zero), as in scikit-learn's
    `zero_division=0`. The AUC is threshold-free.
    """
    auc = auc_roc(scores, labels)  # checks the lengths and the labels
    pred = [s > threshold for s in scores]
    tp = sum(1 for p, y in zip(pred, labels) if p and y == 1)
    fp = sum(1 for p, y in zip(pred, labels) if p and y == 0)
    fn = sum(1 for p, y in zip(pred, labels) if not p and y == 1)
    tn = len(labels) - tp - fp - fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "auc_roc": auc,
    }


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Share of preference pairs whose chosen response scores above the rejected one (ties half).

    This is the usual reward-model accuracy; pairs are matched by position.
    """
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"chosen and rejected differ in length: {len(chosen_scores)} vs {len(rejected_scores)}")
    if not chosen_scores:
        raise ValueError("pairwise_accuracy needs at least one pair")
    _check_scores(chosen_scores, rejected_scores)
    credit = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_scores, rejected_scores))
    return credit / len(chosen_scores)


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """Token-weighted cross-entropy (nats per token) and perplexity over per-sequence token log-probs.

    Every token weighs the same, so long sequences count more than short ones (the standard corpus
    perplexity, not a mean of per-sequence perplexities).
    """
    n_tokens = sum(len(seq) for seq in token_logprobs)
    if n_tokens == 0:
        raise ValueError("perplexity needs at least one token")
    if any(math.isnan(x) for seq in token_logprobs for x in seq):
        raise ValueError("token log-probs contain NaN; check the model that produced them")
    cross_entropy = -sum(sum(seq) for seq in token_logprobs) / n_tokens
    return {"cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy), "n_tokens": n_tokens}


def response_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> list[list[float]]:
    """Teacher-forced natural-log probability of each response token, one list per sequence.

    Token t is scored from the logits at position t - 1, so a response token at position 0 cannot be
    scored (ValueError). Only positions where both `response_mask` and `attention_mask` are 1 count.
    Works with any causal LM whose output has `.logits` of shape [B, T, V].
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError("input_ids, attention_mask and response_mask must have the same [B, T] shape")
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask marks position 0, which has no previous position to predict it from")
    keep = response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # position t predicts token t + 1
    first = int(keep.int().argmax(1)[keep.any(1)].min()) if keep.any() else 0
    with torch.no_grad():
        logits, at = logits_from(model, input_ids, attention_mask, first)
        # the scored positions only, in float32: [B, T, V] in float32 would hold every prompt and pad position too
        scored = logits[:, :-1][keep[:, at:].to(logits.device)].float()
        token_lp = torch.log_softmax(scored, dim=-1).gather(-1, input_ids[:, 1:][keep].unsqueeze(-1).to(scored.device))
    per_row = keep.sum(dim=1).tolist()
    return [part.tolist() for part in token_lp.squeeze(-1).cpu().split(per_row)]

"""Model-level evaluation: held-out likelihood, likelihood as a preference classifier, reward, KL drift, win rate.

Every function takes a plain Hugging Face causal LM in eval mode and tokenizes exactly as training and
generation do (`rahf.stimuli`), so a response scored here carries the same token ids it had when the
model was trained on it or produced it. Batches are padded on the right, which leaves every real token
at its position, so a sequence gets the same numbers alone or in a batch. Nothing here trains, writes
files or changes a model; the caller turns the returned dicts into reports.

`system` is the instruction a prompted method (HIR) is deployed with. The model always sees it; a
reference model never does (see `kl_drift` and `likelihood_classifier`).

Launched as several processes (`rahf.distributed`), every process calls these functions with the same arguments:
each generates and scores its share of the sequences (every N-th, `distributed.split`) and every process gets all
of the results, in order, and sums them in that order. A sampled reply depends on `seed` and its place in the list
alone, and a sequence's scores do not depend on the others in its batch, so the numbers are those of one process
(exactly, unless a device's kernels round a sequence differently in another batch). Judges that run in the process
(`local`) judge their share too; any other (an LLM behind an API) is asked from process 0 alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence

import torch

from . import distributed
from .data import Message, PreferencePair
from .generate import generate, sample_ids
from .judges import Judge, compare_all
from .metrics import (
    classification_metrics,
    clustered_wilson,
    pairwise_accuracy,
    perplexity,
    response_logprobs,
)
from .models import logits_from
from .stimuli import build_variants, prompt_ids, untallied


def _check_eval(*models: torch.nn.Module) -> None:
    for m in models:
        if m.training:
            raise ValueError("evaluation needs models in eval mode (dropout would make results random); call .eval()")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding); callers put results back by index."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _right_padded(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask `[B, T]` with each sequence at the left and padding after it."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[r, : len(s)] = 1
    return ids.to(device), attn.to(device)


def _at(items: Sequence, indices: Sequence[int]) -> list:
    """The items at `indices`, in that order (a process's share of a list)."""
    return [items[i] for i in indices]


def _repeat(items: Sequence, times: int) -> list:
    """Each item `times` times in a row: [a, a, b, b] for times=2."""
    return [x for x in items for _ in range(times)]


def teacher_forced_logprobs(
    model,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    responses: Sequence[str],
    max_prompt_length: int,
    max_response_length: int,
    system: str | None = None,
    batch_size: int = 16,
) -> list[list[float]]:
    """Natural-log probability of each response token (EOS included) given its prompt, one list per response.

    Sequences are built by `build_variants`, so the ids equal those of training and generation.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} responses")
    _check_batch_size(batch_size)
    _check_eval(model)
    device, pad_id = _device(model), _pad_id(tokenizer)

    def score(mine: list[int]) -> list[list[float]]:
        stimuli = [
            build_variants(tokenizer, p, r, {"plain": system}, max_prompt_length, max_response_length)["plain"]
            for p, r in zip(_at(prompts, mine), _at(responses, mine))
        ]
        out: list[list[float]] = [[] for _ in stimuli]
        for idx in _batches([len(s.input_ids) for s in stimuli], batch_size):
            ids, attn = _right_padded([stimuli[i].input_ids for i in idx], pad_id, device)
            positions = torch.arange(ids.shape[1], device=device)
            starts = torch.tensor([stimuli[i].response_start for i in idx], device=device)
            response_mask = (positions[None, :] >= starts[:, None]).long() * attn
            for i, lps in zip(idx, response_logprobs(model, ids, attn, response_mask)):
                out[i] = lps
        return out

    return distributed.split(len(prompts), score)


def _replies(
    model,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    max_prompt_length: int,
    system: str | None,
    seed: int,
    progress: bool = False,
) -> list[str]:
    """`generate`'s reply to each prompt, each process drawing its share: a sampled reply comes from its prompt's
    own random stream (its index here), so the replies are those one process draws. `progress`: process 0's bar."""
    return distributed.split(
        len(prompts),
        lambda mine: generate(
            model,
            tokenizer,
            _at(prompts, mine),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            system=system,
            seed=seed,
            progress=progress and distributed.is_main(),
            streams=mine,
        ),
    )


def _judged(judge, count: int, work: Callable[[list[int]], Sequence[float]]) -> list[float]:
    """`work(indices)` over range(count) for `judge`: split over the processes when the judge runs in the process
    (`local`: the gold and reward-model judges, whose verdicts and scores are per item); otherwise on process 0
    alone and shared, so that a judge behind an API (the LLM judge) gets each request once."""
    if getattr(judge, "local", False):
        return distributed.split(count, work)
    return distributed.on_main(lambda: list(work(list(range(count)))))


def _scores(judge, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
    """The judge's score of each response (through `score_many` when it has one), shared out as `_judged` says."""

    def score(mine: list[int]) -> list[float]:
        asked, said = _at(prompts, mine), _at(responses, mine)
        many = judge.score_many(asked, said) if hasattr(judge, "score_many") else None
        return many or [judge.score(p, r) for p, r in zip(asked, said)]

    return _judged(judge, len(prompts), score)


def chosen_perplexity(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    max_prompt_length: int,
    max_response_length: int,
    system: str | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Token-weighted {cross_entropy, perplexity, n_tokens} of the held-out chosen responses."""
    if not pairs:
        raise ValueError("chosen_perplexity needs at least one preference pair")
    logprobs = teacher_forced_logprobs(
        model,
        tokenizer,
        [p.prompt for p in pairs],
        [p.chosen for p in pairs],
        max_prompt_length,
        max_response_length,
        system,
        batch_size,
    )
    return perplexity(logprobs)


def _as_classifier(scores: Sequence[float], n_pairs: int, threshold: float) -> dict[str, float]:
    """Metrics of scores laid out as n chosen then n rejected, positive when above `threshold`."""
    return {
        "pairwise_accuracy": pairwise_accuracy(scores[:n_pairs], scores[n_pairs:]),
        **classification_metrics(scores, [1] * n_pairs + [0] * n_pairs, threshold=threshold),
        "threshold": threshold,
    }


def likelihood_classifier(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    max_prompt_length: int,
    max_response_length: int,
    system: str | None = None,
    batch_size: int = 16,
    reference=None,
    policy_logprobs: Sequence[Sequence[float]] | None = None,
) -> dict:
    """How well the model's likelihood tells chosen from rejected responses. `policy_logprobs`: the model's
    `teacher_forced_logprobs` of the chosen then the rejected replies, when computed already.

    Returns {"n_pairs", "log_likelihood": metrics} and, with a `reference` model, also
    {"implicit_reward": metrics}, where metrics = {pairwise_accuracy, accuracy, precision, recall, f1,
    auc_roc, threshold}. Choices:

    - log_likelihood: a response scores its mean per-token log-prob (EOS included). The mean, not the
      sum, so that short responses are not favoured for being short.
    - implicit_reward: the summed log-ratio log pi(y|x) - log pi_ref(y|x), DPO's implicit reward without
      beta (a positive scale changes no metric here). The reference sees the bare prompt, never
      `system`: the model is scored as deployed against the reference as it stands.
    - pairwise_accuracy compares the two responses of each pair (ties half). The other metrics pool all
      2n responses (chosen = 1, rejected = 0) and call a response chosen when its score exceeds the
      threshold: the median score for log_likelihood (log-probs have no natural zero, and half the
      responses are chosen), 0 for implicit_reward (positive means more likely than under the reference).
      AUC-ROC is threshold-free.
    """
    if not pairs:
        raise ValueError("likelihood_classifier needs at least one preference pair")
    n = len(pairs)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = (max_prompt_length, max_response_length)
    policy = policy_logprobs or teacher_forced_logprobs(
        model, tokenizer, prompts, responses, *lengths, system, batch_size
    )
    mean_lp = [statistics.fmean(lps) for lps in policy]
    out: dict = {"n_pairs": n, "log_likelihood": _as_classifier(mean_lp, n, statistics.median(mean_lp))}
    if reference is not None:
        with untallied():  # the same examples, scored by the reference
            ref = teacher_forced_logprobs(reference, tokenizer, prompts, responses, *lengths, None, batch_size)
        ratio = [sum(p) - sum(r) for p, r in zip(policy, ref)]
        out["implicit_reward"] = _as_classifier(ratio, n, 0.0)
    return out


def reward_by_temperature(
    model,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    reward_judge,
    temperatures: Sequence[float],
    samples: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_prompt_length: int = 512,
    system: str | None = None,
    seed: int = 0,
    known: dict[float, list[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Reward-model score of generated responses at each sampling temperature (0 = greedy).

    Returns {str(float(t)): {"mean", "std", "n"}}, std being the population standard deviation of the
    n scores. A sampled temperature draws `samples` responses per prompt; greedy decoding is
    deterministic, so it draws one. Every temperature starts from the same `seed`. `reward_judge` needs
    `score_many(prompts, responses)` (a RewardModelJudge) and sees the bare prompt, never `system`.
    `known` maps a temperature to the responses this call would draw at it (same prompts, samples, system,
    seed and length), already generated by the caller: they are scored instead of drawn again.
    """
    if not prompts:
        raise ValueError("reward_by_temperature needs at least one prompt")
    if not temperatures:
        raise ValueError("reward_by_temperature needs at least one temperature")
    if samples < 1:
        raise ValueError(f"samples must be at least 1; got {samples}")
    keys = [str(float(t)) for t in temperatures]
    if len(set(keys)) != len(keys) or any(t < 0 for t in temperatures):
        raise ValueError(f"temperatures must be distinct and >= 0; got {list(temperatures)}")
    _check_eval(model)
    out: dict[str, dict[str, float]] = {}
    for key, t in zip(keys, temperatures):
        batch = _repeat(prompts, samples if t > 0 else 1)
        responses = (known or {}).get(t) or _replies(
            model, tokenizer, batch, max_new_tokens, t, batch_size, max_prompt_length, system, seed
        )
        if len(responses) != len(batch):
            raise ValueError(f"known responses at temperature {t}: {len(responses)} for {len(batch)} prompts")
        scores = _scores(reward_judge, batch, responses)
        out[key] = {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "n": len(scores)}
    return out


def _response_logprobs_full(
    model, batch_prompts: Sequence[Sequence[int]], batch_responses: Sequence[Sequence[int]], pad_id: int
) -> list[torch.Tensor]:
    """Log-softmax over the vocabulary at each position that predicts a response token: one [L, V] per row."""
    seqs = [[*p, *r] for p, r in zip(batch_prompts, batch_responses)]
    ids, attn = _right_padded(seqs, pad_id, _device(model))
    logits, at = logits_from(model, ids, attn, min(len(p) for p in batch_prompts) - 1)
    return [
        torch.log_softmax(logits[r, len(p) - 1 - at : len(p) - 1 - at + len(resp)].float(), dim=-1)
        for r, (p, resp) in enumerate(zip(batch_prompts, batch_responses))
    ]


@torch.no_grad()
def token_kl(
    model,
    reference,
    model_prompts: Sequence[Sequence[int]],
    reference_prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
) -> list[list[float]]:
    """Exact KL(model || reference) of the next-token distributions at each response position (sum over vocab).

    Row i continues `model_prompts[i]` (for the model) and `reference_prompts[i]` (for the reference) with
    the same `responses[i]`; its j-th value compares the two distributions over the j-th response token.
    """
    if not len(model_prompts) == len(reference_prompts) == len(responses):
        raise ValueError("model_prompts, reference_prompts and responses differ in length")
    if any(not p for p in [*model_prompts, *reference_prompts]):
        raise ValueError("every prompt needs at least one token to predict the response from")
    _check_batch_size(batch_size)
    _check_eval(model, reference)
    out: list[list[float]] = [[] for _ in responses]
    lengths = [len(p) + len(r) for p, r in zip(model_prompts, responses)]
    for idx in _batches(lengths, batch_size):
        idx = [i for i in idx if responses[i]]
        if not idx:
            continue
        resp = [responses[i] for i in idx]
        policy = _response_logprobs_full(model, [model_prompts[i] for i in idx], resp, pad_token_id)
        ref = _response_logprobs_full(reference, [reference_prompts[i] for i in idx], resp, pad_token_id)
        for i, lp, lq in zip(idx, policy, ref):
            p = lp.exp()
            terms = torch.where(p > 0, p * (lp - lq.to(lp.device)), torch.zeros_like(p))
            out[i] = terms.sum(-1).tolist()
    return out


def kl_drift(
    model,
    reference,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    samples: int = 1,
    batch_size: int = 16,
    max_prompt_length: int = 512,
    system: str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """How far the model drifts from a reference: {kl_per_token, kl_per_sequence, n_tokens, n_sequences}.

    `samples` responses per prompt are sampled from the model at temperature 1 without truncation, and at
    every generated position (EOS included) the exact KL(model || reference) of the two next-token
    distributions is summed over the vocabulary. Summed per sequence and averaged over sequences this is
    an unbiased, low-variance estimate of the sequence-level KL; kl_per_token divides the total by the
    number of generated tokens.

    `system` applies to the model only; the reference sees the bare prompt. A prompted method (HIR) is
    measured as deployed: its instruction is part of the method, not of the user's request, so the drift
    compares what users get from it with what the reference gives for the same request.
    """
    if not prompts:
        raise ValueError("kl_drift needs at least one prompt")
    if samples < 1:
        raise ValueError(f"samples must be at least 1; got {samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    _check_batch_size(batch_size)
    _check_eval(model, reference)
    model_prompts = _repeat([prompt_ids(tokenizer, p, max_prompt_length, system) for p in prompts], samples)
    reference_prompts = _repeat([prompt_ids(tokenizer, p, max_prompt_length) for p in prompts], samples)

    def drift(mine: list[int]) -> list[list[float]]:
        ours, theirs = _at(model_prompts, mine), _at(reference_prompts, mine)
        responses = sample_ids(model, tokenizer, ours, max_new_tokens, 1.0, 1.0, batch_size, seed, streams=mine)
        return token_kl(model, reference, ours, theirs, responses, _pad_id(tokenizer), batch_size)

    kls = distributed.split(len(model_prompts), drift)
    totals = [sum(k) for k in kls]
    n_tokens = sum(len(k) for k in kls)
    return {
        "kl_per_token": sum(totals) / n_tokens,
        "kl_per_sequence": statistics.fmean(totals),
        "n_tokens": n_tokens,
        "n_sequences": len(totals),
    }


def win_rate_against_chosen(
    judge: Judge, pairs: Sequence[PreferencePair], responses: Sequence[str], samples: int = 1
) -> dict:
    """Win rate of generated responses against the pairs' chosen responses.

    Returns {win_rate, ci95: [lo, hi], n, n_prompts, n_eff, per_prompt, verdicts (one per response)}. `responses` hold `samples`
    responses per pair, grouped by pair in order. A tie counts half, and verdicts between 0 and 1 other
    than a tie (an LLM judge asked in both orders gives 0.25 or 0.75) count as the fraction of a win they
    are. The interval is the 95% Wilson interval of `rahf.metrics.clustered_wilson`: the replies to one
    prompt are correlated, so it is taken at the effective sample size n_eff (between n_prompts and n)
    rather than at n. per_prompt holds each pair's mean verdict, for paired comparisons between methods.
    """
    if not pairs:
        raise ValueError("win_rate_against_chosen needs at least one preference pair")
    if samples < 1:
        raise ValueError(f"samples must be at least 1; got {samples}")
    if len(responses) != len(pairs) * samples:
        raise ValueError(
            f"expected {len(pairs)} pairs x {samples} samples = {len(pairs) * samples} responses; got {len(responses)}"
        )
    prompts = _repeat([p.prompt for p in pairs], samples)
    chosen = _repeat([p.chosen for p in pairs], samples)
    outcomes = _judged(
        judge,
        len(prompts),
        lambda mine: [float(v) for v in compare_all(judge, *(_at(x, mine) for x in (prompts, responses, chosen)))],
    )
    bad = [x for x in outcomes if not 0.0 <= x <= 1.0]
    if bad:
        raise ValueError(f"judge verdicts must lie in [0, 1]; got {bad[0]!r}")
    per_prompt = [statistics.fmean(outcomes[i : i + samples]) for i in range(0, len(outcomes), samples)]
    rate, low, high, n_eff = clustered_wilson(per_prompt, [samples] * len(pairs))
    return {
        "win_rate": rate,
        "ci95": [low, high],
        "n": len(outcomes),
        "n_prompts": len(pairs),
        "n_eff": round(n_eff, 1),
        "per_prompt": per_prompt,
        "verdicts": outcomes,
    }


def evaluate_policy(
    cfg,
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    judge: Judge,
    reward_judge=None,
    reference=None,
    system: str | None = None,
    neutral_prompts: Sequence[Sequence[Message]] | None = None,
    generations=None,
    progress: bool = False,
) -> dict:
    """Every measurement of one deployed model on held-out `pairs`, with `cfg.evaluate`'s settings.

    Win rate of sampled responses against the chosen ones (each pair's mean verdict in `verdicts_per_prompt`,
    for paired comparisons between methods; the judge's mean score when it has one); reward-model score
    by temperature (with `reward_judge`); cross-entropy of the chosen responses; the likelihood as a
    chosen-vs-rejected classifier; KL drift from `reference` (the SFT model) on
    `neutral_prompts`. `generations` (a path) receives the sampled responses as JSONL, from process 0 alone.
    `progress`: process 0 says what it measures as it goes, with a bar while it samples the judged replies.
    """
    import json
    from pathlib import Path

    from .artifacts import write_text_atomic

    def step(what: str) -> None:
        if progress and distributed.is_main():
            print(f"[rahf] evaluate: {what}", flush=True)

    e, lengths = cfg.evaluate, (cfg.data.max_prompt_length, cfg.data.max_response_length)
    prompts = [list(p.prompt) for p in pairs for _ in range(e.samples)]
    step(f"sampling {len(prompts)} replies ({len(pairs)} prompts x {e.samples}) at temperature {e.temperature:g}")
    replies = _replies(
        model, tokenizer, prompts, e.max_new_tokens, e.temperature, e.batch_size, lengths[0], system, cfg.seed,
        progress,
    )  # fmt: skip
    step(f"judging them against the chosen replies ({type(judge).__name__})")
    before = (getattr(judge, "calls", 0), getattr(judge, "unparsed", 0))
    wins = win_rate_against_chosen(judge, pairs, replies, e.samples)
    out: dict = {
        "win_rate": {k: v for k, v in wins.items() if k not in ("per_prompt", "verdicts")},
        "verdicts_per_prompt": wins["per_prompt"],
    }
    if hasattr(judge, "unparsed"):  # an LLM judge's replies without a verdict count as ties: say how many
        counted = {"calls": judge.calls - before[0], "unparsed": judge.unparsed - before[1]}
        out["judge_unparsed"] = {k: sum(c[k] for c in distributed.gather(counted)) for k in counted}  # all processes
    scores = None
    if hasattr(judge, "score"):
        scores = _scores(judge, prompts, replies)
        out["judge_score"] = statistics.fmean(scores)
    if generations is not None and distributed.is_main():  # process 0 writes
        path = Path(generations)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {"index": i // e.samples, "sample": i % e.samples, "prompt": p, "response": r, "verdict": v}
            | ({} if scores is None else {"judge_score": scores[i]})
            for i, (p, r, v) in enumerate(zip(prompts, replies, wins["verdicts"]))
        ]  # the layout of `rahf generate`'s file, so `rahf export --sample K` reads it; with each reply's verdict
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    if reward_judge is not None and e.temperatures:
        step(f"reward-model score at temperatures {', '.join(f'{t:g}' for t in e.temperatures)}")
        out["reward_by_temperature"] = reward_by_temperature(
            model, tokenizer, [list(p.prompt) for p in pairs], reward_judge, e.temperatures, e.samples,
            e.max_new_tokens, e.batch_size, lengths[0], system, cfg.seed,
            known={e.temperature: replies} if e.temperature > 0 else None,  # the win rate's replies: no redraw
        )  # fmt: skip
    step(f"likelihoods of the chosen and rejected replies of {len(pairs)} pairs")
    both = teacher_forced_logprobs(  # the chosen replies, then the rejected ones
        model, tokenizer, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
        *lengths, system, e.batch_size,
    )  # fmt: skip
    ppl = perplexity(both[: len(pairs)])  # chosen_perplexity's
    out["chosen_cross_entropy"], out["chosen_perplexity"] = ppl["cross_entropy"], ppl["perplexity"]
    classifier = likelihood_classifier(
        model, tokenizer, pairs, *lengths, system, e.batch_size, reference, policy_logprobs=both
    )
    out["likelihood_classifier"] = classifier
    out["likelihood_accuracy"] = classifier["log_likelihood"]["pairwise_accuracy"]
    out["likelihood_auc"] = classifier["log_likelihood"]["auc_roc"]
    if reference is not None:
        step(f"KL drift from the reference model on {len(neutral_prompts or pairs)} prompts")
        drift = kl_drift(
            model, reference, tokenizer, neutral_prompts or [list(p.prompt) for p in pairs], e.max_new_tokens,
            1, e.batch_size, lengths[0], system, cfg.seed,
        )  # fmt: skip
        out["kl_per_token"], out["kl_per_sequence"] = drift["kl_per_token"], drift["kl_per_sequence"]
    return out


def reward_judge_for(cfg, path: str | None):
    """The reward model at `path` as a judge (None without one): it reads `reward.max_length` tokens, as it was
    trained, in batches of `evaluate.batch_size`."""
    from .judges import RewardModelJudge

    if not path:
        return None
    e = cfg.evaluate
    return RewardModelJudge.from_pretrained(
        path,
        cfg.trust_remote_code,
        revision=cfg.revision_of(path),
        dtype=cfg.dtype,
        batch_size=e.batch_size,
        max_length=cfg.reward.max_length,
    )


def check_reward_model(key: str, name: str, revision: str | None, trust_remote_code: bool) -> None:
    """`name` (the value of config key `key`) must be a readable reward model: a sequence classifier with one
    output label. Checked on its config.json before anything trains; a PEFT adapter (folder or Hub id) is left to
    loading, and a config naming no architecture, or a custom class it maps to AutoModelForSequenceClassification
    (`auto_map`), is judged by its label count alone."""
    from transformers.utils.peft_utils import find_adapter_config_file

    from .config import model_config
    from .errors import ConfigError

    try:
        if find_adapter_config_file(name, revision=revision) is not None:
            return
    except (OSError, ValueError):
        pass  # not an adapter that can be found: read as a model below, which says what is wrong
    config = model_config(key, name, revision, trust_remote_code)
    architectures = config.architectures or []
    custom = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    classifier = not architectures or custom or any(a.endswith("ForSequenceClassification") for a in architectures)
    if not classifier or config.num_labels != 1:
        kind = ", ".join(config.architectures or ["no architectures"])
        this = f"a {kind}" if not classifier else f"{kind} with {config.num_labels} labels"  # a causal LM has no labels
        raise ConfigError(
            f"{key}: {name} is not a reward model (a sequence classifier with one output label; this is {this}); "
            "give one trained with `rahf reward` or TRL's RewardTrainer"
        )


def check_judge(cfg, prompt_files: Sequence[str]) -> None:
    """Problems `cfg.evaluate`'s judge would meet only after training, found before it: an outside reward model
    that is not one, the gold judge on questions it cannot read, an LLM judge of OpenAI's API without a key.
    `prompt_files`: the pairs it will judge (held-out, validation)."""
    from urllib.parse import urlsplit

    from .artifacts import redacted
    from .data import load_pairs
    from .errors import ConfigError
    from .judges import GoldJudge, JudgeError, api_key

    e = cfg.evaluate
    if e.judge_model:
        check_reward_model("evaluate.judge_model", e.judge_model, cfg.revision_of(e.judge_model), cfg.trust_remote_code)
    if e.judge == "gold":
        for path in prompt_files:
            for pair in load_pairs(path)[0]:
                try:
                    GoldJudge.fact(pair.prompt)
                except ValueError as err:
                    raise ConfigError(
                        f"evaluate.judge: gold judges only the built-in demo task's questions; {pair.source}: {err}; "
                        "judge with reward-model or llm"
                    ) from None
    if e.judge == "llm":
        try:
            key = api_key(e.llm.api_key_env)
        except JudgeError as err:
            raise ConfigError(f"evaluate.llm.api_key_env: {err}") from None
        if not key and urlsplit(e.llm.base_url).hostname == "api.openai.com":
            raise ConfigError(
                f"evaluate.llm.api_key_env: ${e.llm.api_key_env} is not set, and {redacted(e.llm.base_url)} needs a key; export "
                "it, or point evaluate.llm.base_url at a server that needs none"
            )


def run_judge(cfg, reward_judge=None) -> Judge:
    """The judge `evaluate.judge` names; the reward-model judge is `reward_judge` (loaded once by the caller)."""
    from .errors import RahfError
    from .judges import GoldJudge, LLMJudge

    e = cfg.evaluate
    if e.judge == "gold":
        return GoldJudge()
    if e.judge == "llm":
        return LLMJudge(e.llm.base_url, e.llm.model, e.llm.api_key_env)
    if reward_judge is None:
        raise RahfError("evaluate.judge reward-model: set evaluate.judge_model or train one first with `rahf reward`")
    return reward_judge


def neutral_prompts(cfg, pairs: Sequence[PreferencePair]) -> list[list[Message]]:
    """Prompts for KL drift: `evaluate.neutral_prompts`, else the held-out pairs' prompts."""
    if cfg.evaluate.neutral_prompts:
        from .generate import read_prompts

        return read_prompts(cfg.evaluate.neutral_prompts)
    return [list(p.prompt) for p in pairs]


def evaluate_run(cfg, generations=None) -> dict:
    """`rahf evaluate`: the run's final model (as its method deploys it) measured on `evaluate.pairs`; the
    judged replies go to `generations` (a path) when given."""
    from .data import load_pairs
    from .models import load_tokenizer
    from .pipeline import base_model_path, final_model, stage_dir
    from .training import load_stage_model

    e = cfg.evaluate
    finished = stage_dir(cfg, "reward") / "rahf_manifest.json"
    rm_path = e.judge_model or (str(finished.parent) if finished.is_file() else None)
    reward_judge = reward_judge_for(cfg, rm_path)
    judge = run_judge(cfg, reward_judge)
    path, adapter, system = final_model(cfg)
    model = load_stage_model(path, cfg, adapter=adapter)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.revision_of(path))
    reference = load_stage_model(base_model_path(cfg), cfg) if cfg.method != "sft" else model
    pairs = load_pairs(e.pairs, limit=e.limit)[0]
    neutral = neutral_prompts(cfg, pairs)
    return evaluate_policy(
        cfg, model, tokenizer, pairs, judge, reward_judge, reference, system, neutral, generations, progress=True
    )

"""Model-level evaluation against hand computations: teacher-forced log-probs, perplexity, likelihood as a
classifier, reward by temperature, KL drift and the win rate against chosen responses.

The tiny LLaMA checks exact token handling (padding, system instruction, EOS); a stub LM whose logits
ignore the context (a fixed bias over the vocabulary) makes the classifier's scores known in advance.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from conftest import standard_records
from torch import nn

from rahf.data import PreferencePair
from rahf.demo.task import CLOSINGS, INSTRUCTIONS, OPENERS
from rahf.evaluate import (
    chosen_perplexity,
    kl_drift,
    likelihood_classifier,
    reward_by_temperature,
    teacher_forced_logprobs,
    token_kl,
    win_rate_against_chosen,
)
from rahf.generate import generate
from rahf.metrics import classification_metrics, pairwise_accuracy, wilson_interval, win_rate
from rahf.models import load_model
from rahf.stimuli import build_variants, prompt_ids

MAX_PROMPT, MAX_RESPONSE = 32, 24
SYSTEM = INSTRUCTIONS["preferred"]


def _pair(prompt: str, chosen: str, rejected: str, source: str = "test") -> PreferencePair:
    return PreferencePair(({"role": "user", "content": prompt},), chosen, rejected, source)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def perturbed(model):
    """The tiny model with every weight nudged: a reference that differs a little."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    return [_pair(r["prompt"], r["chosen"], r["rejected"], f"t{i}") for i, r in enumerate(standard_records(6, seed=3))]


def _manual_logprobs(model, ids: tuple[int, ...], start: int) -> list[float]:
    """log p(token t | tokens < t) for t >= start, from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [lp[t - 1, ids[t]].item() for t in range(start, len(ids))]


def _stimulus(tokenizer, pair: PreferencePair, response: str, system: str | None = None):
    return build_variants(tokenizer, pair.prompt, response, {"plain": system}, MAX_PROMPT, MAX_RESPONSE)["plain"]


# ---------------------------------------------------------------- teacher-forced log-probs and perplexity


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_teacher_forced_logprobs_equal_a_manual_gather_on_the_training_ids(model, tokenizer, pairs, system):
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    batched = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, MAX_RESPONSE, system, 4)
    for pair, got in zip(pairs, batched):
        stim = _stimulus(tokenizer, pair, pair.chosen, system)
        assert stim.input_ids[-1] == tokenizer.eos_token_id  # EOS is scored too
        assert len(got) == stim.response_len == len(pair.chosen.split()) + 1
        assert got == pytest.approx(_manual_logprobs(model, stim.input_ids, stim.response_start), abs=1e-5)
    assert len({len(_stimulus(tokenizer, p, p.chosen).input_ids) for p in pairs}) > 1  # batches did hold padding
    single = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, MAX_RESPONSE, system, 1)
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-5)


def test_teacher_forced_logprobs_depend_on_the_system_instruction_and_truncate_responses(model, tokenizer, pairs):
    prompts, responses = [p.prompt for p in pairs[:2]], [p.chosen for p in pairs[:2]]
    bare = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, MAX_RESPONSE)
    prompted = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, MAX_RESPONSE, SYSTEM)
    assert [len(x) for x in bare] == [len(x) for x in prompted]
    assert bare[0] != pytest.approx(prompted[0], abs=1e-4)
    short = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, 3)
    assert [s for s in short] == [pytest.approx(b[:3], abs=1e-5) for b in bare]  # the first 3 tokens, no EOS


def test_teacher_forced_logprobs_reject_bad_input(model, tokenizer, pairs):
    prompt = [pairs[0].prompt]
    with pytest.raises(ValueError, match="lengths differ"):
        teacher_forced_logprobs(model, tokenizer, prompt, ["a", "b"], MAX_PROMPT, MAX_RESPONSE)
    with pytest.raises(ValueError, match="batch_size"):
        teacher_forced_logprobs(model, tokenizer, prompt, ["a"], MAX_PROMPT, MAX_RESPONSE, batch_size=0)
    training = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="eval mode"):
        teacher_forced_logprobs(training, tokenizer, prompt, ["a"], MAX_PROMPT, MAX_RESPONSE)


def test_chosen_perplexity_is_exp_of_the_mean_token_cross_entropy(model, tokenizer, pairs):
    result = chosen_perplexity(model, tokenizer, pairs, MAX_PROMPT, MAX_RESPONSE, batch_size=4)
    manual = []
    for pair in pairs:
        stim = _stimulus(tokenizer, pair, pair.chosen)
        manual += _manual_logprobs(model, stim.input_ids, stim.response_start)
    assert result["n_tokens"] == len(manual) == sum(len(p.chosen.split()) + 1 for p in pairs)
    assert result["cross_entropy"] == pytest.approx(-sum(manual) / len(manual), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(-sum(manual) / len(manual)), rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        chosen_perplexity(model, tokenizer, [], MAX_PROMPT, MAX_RESPONSE)


# ---------------------------------------------------------------- likelihood as a classifier


class BiasLM(nn.Module):
    """A causal LM whose next-token logits are one fixed vector, whatever the context."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.float())
        self.eval()

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


POLITE_PAIRS = [
    _pair(f"{name} asks : what color is a {obj} ?", chosen, rejected)
    for name, obj, chosen, rejected in [
        ("mia", "banana", "of course ! it is yellow . hope this helps !", "whatever . it is red . now go away ."),
        (
            "leo",
            "sky",
            "good question . the answer is blue . have a nice day !",
            "ugh , fine . it is blue . stop bothering me .",
        ),
        (
            "ava",
            "snow",
            "sure , happy to help . it is white . hope this helps !",
            "what a dumb question . the answer is green . now go away .",
        ),
        # a curt reply: per token it loses to the chosen one, summed over its few tokens it wins
        ("sam", "sky", "good question . the answer is blue . have a nice day !", "it is blue ."),
    ]
]


def _phrase_words(kind: str) -> set[str]:
    return {w for phrases in (OPENERS[kind], CLOSINGS[kind]) for p in phrases for w in p.split()}


@pytest.fixture(scope="module")
def polite_lm(tokenizer) -> BiasLM:
    """Polite-only words get logit +8, rude-only words -8, everything else 0."""
    polite, rude = _phrase_words("polite"), _phrase_words("rude")
    bias = torch.zeros(len(tokenizer))
    for word in polite - rude:
        bias[tokenizer.convert_tokens_to_ids(word)] = 8.0
    for word in rude - polite:
        bias[tokenizer.convert_tokens_to_ids(word)] = -8.0
    return BiasLM(bias)


def _response_token_ids(tokenizer, pair: PreferencePair, response: str) -> list[int]:
    stim = _stimulus(tokenizer, pair, response)
    return list(stim.input_ids[stim.response_start :])


def test_likelihood_classifier_scores_the_mean_log_prob_against_the_median(tokenizer, polite_lm):
    result = likelihood_classifier(polite_lm, tokenizer, POLITE_PAIRS, MAX_PROMPT, MAX_RESPONSE, batch_size=2)
    table = torch.log_softmax(polite_lm.bias.detach(), dim=-1)
    responses = [p.chosen for p in POLITE_PAIRS] + [p.rejected for p in POLITE_PAIRS]
    scores = [
        statistics.fmean(table[t].item() for t in _response_token_ids(tokenizer, pair, r))
        for pair, r in zip(POLITE_PAIRS * 2, responses)
    ]
    assert min(scores[:4]) > max(scores[4:])  # the stub favours every chosen reply over every rejected one
    ll = result["log_likelihood"]
    assert result["n_pairs"] == 4
    assert ll["threshold"] == pytest.approx(statistics.median(scores), abs=1e-5)
    perfect = {"pairwise_accuracy": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "auc_roc": 1.0}
    assert ll == pytest.approx(perfect | {"threshold": ll["threshold"]})
    assert "implicit_reward" not in result


def test_likelihood_classifier_implicit_reward_is_the_summed_log_ratio(tokenizer, polite_lm):
    uniform = BiasLM(torch.zeros(len(tokenizer)))
    result = likelihood_classifier(polite_lm, tokenizer, POLITE_PAIRS, MAX_PROMPT, MAX_RESPONSE, reference=uniform)
    table = torch.log_softmax(polite_lm.bias.detach(), dim=-1)
    log_v = math.log(len(tokenizer))
    responses = [p.chosen for p in POLITE_PAIRS] + [p.rejected for p in POLITE_PAIRS]
    ratios = []
    for pair, r in zip(POLITE_PAIRS * 2, responses):
        ids = _response_token_ids(tokenizer, pair, r)
        ratios.append(sum(table[t].item() for t in ids) + len(ids) * log_v)  # log p - log(1/V), summed
    expected = {
        "pairwise_accuracy": pairwise_accuracy(ratios[:4], ratios[4:]),
        **classification_metrics(ratios, [1] * 4 + [0] * 4, threshold=0.0),
        "threshold": 0.0,
    }
    assert result["implicit_reward"] == pytest.approx(expected)
    assert result["implicit_reward"]["pairwise_accuracy"] == 0.75  # the sum, not the mean, decides the curt pair


def test_likelihood_classifier_reference_reads_the_bare_prompt(model, tokenizer, pairs):
    result = likelihood_classifier(model, tokenizer, pairs, MAX_PROMPT, MAX_RESPONSE, system=SYSTEM, reference=model)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompted = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, MAX_RESPONSE, SYSTEM)
    bare = teacher_forced_logprobs(model, tokenizer, prompts, responses, MAX_PROMPT, MAX_RESPONSE)
    ratios = [sum(a) - sum(b) for a, b in zip(prompted, bare)]
    n = len(pairs)
    assert any(abs(r) > 1e-3 for r in ratios)
    got = result["implicit_reward"]
    assert got["pairwise_accuracy"] == pairwise_accuracy(ratios[:n], ratios[n:])
    assert got["auc_roc"] == pytest.approx(classification_metrics(ratios, [1] * n + [0] * n)["auc_roc"])


def test_likelihood_classifier_against_itself_is_chance(tokenizer, polite_lm):
    result = likelihood_classifier(polite_lm, tokenizer, POLITE_PAIRS, MAX_PROMPT, MAX_RESPONSE, reference=polite_lm)
    ir = result["implicit_reward"]  # every log-ratio is exactly 0: all ties, nothing above the threshold
    assert (ir["pairwise_accuracy"], ir["auc_roc"], ir["accuracy"], ir["recall"]) == (0.5, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        likelihood_classifier(polite_lm, tokenizer, [], MAX_PROMPT, MAX_RESPONSE)


# ---------------------------------------------------------------- reward by temperature


class LengthJudge:
    """A stand-in reward model: the reward is the number of words; it records what it was asked."""

    def __init__(self):
        self.calls: list[tuple[list, list[str]]] = []

    def score_many(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [float(len(r.split())) for r in responses]


def test_reward_by_temperature_scores_greedy_once_and_samples_per_prompt(model, tokenizer, pairs):
    prompts = [list(p.prompt) for p in pairs[:3]]
    judge = LengthJudge()
    kwargs = {"max_new_tokens": 5, "batch_size": 2, "max_prompt_length": MAX_PROMPT, "system": SYSTEM, "seed": 7}
    result = reward_by_temperature(model, tokenizer, prompts, judge, [0, 1.0], samples=2, **kwargs)
    assert list(result) == ["0.0", "1.0"]
    greedy = generate(model, tokenizer, prompts, temperature=0.0, progress=False, **kwargs)
    repeated = [p for p in prompts for _ in range(2)]
    sampled = generate(model, tokenizer, repeated, temperature=1.0, progress=False, **kwargs)
    assert judge.calls == [(prompts, greedy), (repeated, sampled)]  # the judge sees the bare prompts
    for key, responses in (("0.0", greedy), ("1.0", sampled)):
        scores = [float(len(r.split())) for r in responses]
        assert result[key] == pytest.approx(
            {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "n": len(scores)}
        )
    assert result["0.0"]["n"] == 3 and result["1.0"]["n"] == 6


def test_reward_by_temperature_scores_known_responses_instead_of_drawing_them(model, tokenizer, pairs, monkeypatch):
    import rahf.evaluate as ev

    prompts = [list(p.prompt) for p in pairs[:2]]
    kwargs = {"max_new_tokens": 5, "batch_size": 2, "max_prompt_length": MAX_PROMPT, "seed": 3}
    fresh = reward_by_temperature(model, tokenizer, prompts, LengthJudge(), [0, 1.0], samples=2, **kwargs)
    drawn = generate(
        model, tokenizer, [p for p in prompts for _ in range(2)], temperature=1.0, progress=False, **kwargs
    )
    drawn_at = []
    monkeypatch.setattr(ev, "generate", lambda *a, **k: drawn_at.append(k["temperature"]) or generate(*a, **k))
    judge = LengthJudge()
    known = reward_by_temperature(model, tokenizer, prompts, judge, [0, 1.0], samples=2, known={1.0: drawn}, **kwargs)
    assert drawn_at == [0] and judge.calls[1][1] == drawn  # only greedy is drawn; the known replies are scored
    assert known == fresh
    with pytest.raises(ValueError, match="3 for 4 prompts"):
        reward_by_temperature(model, tokenizer, prompts, judge, [1.0], samples=2, known={1.0: drawn[:3]}, **kwargs)


@pytest.mark.parametrize("temperatures", [[], [0.5, 0.5], [-1.0]])
def test_reward_by_temperature_rejects_bad_temperatures(model, tokenizer, pairs, temperatures):
    with pytest.raises(ValueError, match="temperature"):
        reward_by_temperature(model, tokenizer, [pairs[0].prompt], LengthJudge(), temperatures, max_new_tokens=2)


# ---------------------------------------------------------------- KL drift


def _manual_kl(p_model, q_model, p_ids: list[int], q_ids: list[int], response: list[int]) -> list[float]:
    """KL(p || q) over the vocabulary at each response position, from unpadded forwards."""
    out = []
    with torch.no_grad():
        lp = torch.log_softmax(p_model(input_ids=torch.tensor([p_ids + response])).logits[0].float(), -1)
        lq = torch.log_softmax(q_model(input_ids=torch.tensor([q_ids + response])).logits[0].float(), -1)
    for j in range(len(response)):
        a, b = lp[len(p_ids) - 1 + j], lq[len(q_ids) - 1 + j]
        out.append(sum(math.exp(x) * (x - y) for x, y in zip(a.tolist(), b.tolist())))
    return out


def test_token_kl_equals_a_hand_computation_and_ignores_padding(model, perturbed, tokenizer, pairs):
    words = ["it", "is", "yellow", "."]
    response = [tokenizer.convert_tokens_to_ids(w) for w in words] + [tokenizer.eos_token_id]
    with_system = [prompt_ids(tokenizer, p.prompt, MAX_PROMPT, SYSTEM) for p in pairs[:3]]
    bare = [prompt_ids(tokenizer, p.prompt, MAX_PROMPT) for p in pairs[:3]]
    responses = [response, response[:2], response[1:]]
    pad = tokenizer.pad_token_id
    batched = token_kl(model, perturbed, with_system, bare, responses, pad, batch_size=3)
    for i in range(3):
        expected = _manual_kl(model, perturbed, with_system[i], bare[i], responses[i])
        assert len(batched[i]) == len(responses[i])
        assert batched[i] == pytest.approx(expected, abs=1e-5)
        assert token_kl(model, perturbed, [with_system[i]], [bare[i]], [responses[i]], pad) == [
            pytest.approx(batched[i], abs=1e-5)
        ]
    assert all(x > 0 for row in batched for x in row)


def test_kl_drift_is_zero_against_itself_and_positive_against_a_perturbed_copy(model, perturbed, tokenizer, pairs):
    prompts = [p.prompt for p in pairs[:3]]
    kwargs = {"max_new_tokens": 6, "samples": 2, "batch_size": 4, "max_prompt_length": MAX_PROMPT, "seed": 1}
    same = kl_drift(model, model, tokenizer, prompts, **kwargs)
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert same["kl_per_sequence"] == pytest.approx(0.0, abs=1e-6)
    assert same["n_sequences"] == 6 and 6 <= same["n_tokens"] <= 36
    drift = kl_drift(model, perturbed, tokenizer, prompts, **kwargs)
    assert drift["kl_per_token"] > 1e-3
    assert drift["n_tokens"] == same["n_tokens"]  # same model, same seed: the same samples
    assert drift["kl_per_sequence"] * drift["n_sequences"] == pytest.approx(drift["kl_per_token"] * drift["n_tokens"])
    assert kl_drift(model, perturbed, tokenizer, prompts, **kwargs) == drift  # seeded


def test_kl_drift_gives_the_system_instruction_to_the_model_only(model, tokenizer, pairs):
    """With one new token the KL sits at the last prompt position, whatever was sampled: a hand computation."""
    prompts = [p.prompt for p in pairs[:2]]
    result = kl_drift(model, model, tokenizer, prompts, max_new_tokens=1, max_prompt_length=MAX_PROMPT, system=SYSTEM)
    kls = []
    with torch.no_grad():
        for p in prompts:
            prompted = torch.tensor([prompt_ids(tokenizer, p, MAX_PROMPT, SYSTEM)])
            bare = torch.tensor([prompt_ids(tokenizer, p, MAX_PROMPT)])
            lp = torch.log_softmax(model(input_ids=prompted).logits[0, -1], -1)
            lq = torch.log_softmax(model(input_ids=bare).logits[0, -1], -1)
            kls.append(float((lp.exp() * (lp - lq)).sum()))
    assert result["n_tokens"] == 2 and result["n_sequences"] == 2
    assert result["kl_per_token"] == pytest.approx(statistics.fmean(kls), abs=1e-6)
    assert result["kl_per_token"] > 1e-4


# ---------------------------------------------------------------- win rate against chosen


class ScriptedJudge:
    """Verdicts looked up by the first reply; records every comparison."""

    name = "scripted"

    def __init__(self, verdicts: dict[str, float]):
        self.verdicts = verdicts
        self.seen: list[tuple] = []

    def compare(self, prompt, a, b):
        self.seen.append((tuple(prompt), a, b))
        return self.verdicts[a]


def test_win_rate_against_chosen_groups_samples_by_pair(pairs):
    two = pairs[:2]
    responses = ["r0a", "r0b", "r1a", "r1b"]
    judge = ScriptedJudge({"r0a": 1.0, "r0b": 0.5, "r1a": 0.0, "r1b": 1.0})
    result = win_rate_against_chosen(judge, two, responses, samples=2)
    assert judge.seen == [
        (two[0].prompt, "r0a", two[0].chosen),
        (two[0].prompt, "r0b", two[0].chosen),
        (two[1].prompt, "r1a", two[1].chosen),
        (two[1].prompt, "r1b", two[1].chosen),
    ]
    # per-prompt means 0.75 and 0.5; cluster-robust variance ((2 * 0.125)^2 + (2 * -0.125)^2) / 16 = 0.0078125
    # against 0.625 * 0.375 / 4 = 0.05859375 for independent verdicts: deff < 1 counts as 1, so n_eff = n
    reference = win_rate([1.0, 0.5, 0.0, 1.0])
    assert result == {
        "win_rate": 0.625,
        "ci95": [reference.low, reference.high],
        "n": 4,
        "n_prompts": 2,
        "n_eff": 4.0,
        "per_prompt": [0.75, 0.5],
        "verdicts": [1.0, 0.5, 0.0, 1.0],
    }


def test_win_rate_against_chosen_counts_the_replies_to_one_prompt_as_correlated(pairs):
    """Replies that always get their prompt's verdict carry no more information than one reply per prompt."""
    four = pairs[:4]
    verdict = {p.chosen: v for p, v in zip(four, [1.0, 1.0, 0.0, 1.0])}
    assert len(verdict) == 4

    class PromptOnly:
        name = "prompt-only"

        def compare(self, prompt, a, b):
            return verdict[b]

    once = win_rate_against_chosen(PromptOnly(), four, ["r"] * 4, samples=1)
    thrice = win_rate_against_chosen(PromptOnly(), four, ["r"] * 12, samples=3)
    assert once["ci95"] == list(wilson_interval(0.75, 4))
    assert (thrice["n"], thrice["n_prompts"], thrice["n_eff"]) == (12, 4, 4.0)
    assert thrice["ci95"] == pytest.approx(once["ci95"], abs=1e-12)
    naive_low, naive_high = wilson_interval(0.75, 12)  # as if the 12 replies were independent
    assert thrice["ci95"][1] - thrice["ci95"][0] > naive_high - naive_low


def test_win_rate_against_chosen_takes_split_verdicts_and_checks_lengths(pairs):
    judge = ScriptedJudge({"a": 0.75, "b": 0.25})  # an LLM judge asked in both orders can split its verdict
    result = win_rate_against_chosen(judge, pairs[:2], ["a", "b"])
    assert {k: result[k] for k in ("win_rate", "ci95", "n")} == {
        "win_rate": 0.5,
        "ci95": list(wilson_interval(0.5, 2)),
        "n": 2,
    }
    with pytest.raises(ValueError, match="responses"):
        win_rate_against_chosen(judge, pairs[:2], ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate_against_chosen(ScriptedJudge({"a": 2.0}), pairs[:1], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        win_rate_against_chosen(judge, [], [])


@pytest.mark.parametrize("rank", [0, 1])
def test_win_rate_judges_a_share_per_process_and_asks_an_api_judge_from_process_zero_only(pairs, monkeypatch, rank):
    """Launched as two processes: a judge that runs in the process (`local`) judges every other reply on each; any
    other (an LLM judge's API) is asked everything by process 0 and nothing by the others, which get its verdicts."""
    from rahf import distributed
    from rahf.judges import GoldJudge, LLMJudge, RewardModelJudge

    assert GoldJudge.local and RewardModelJudge.local and not hasattr(LLMJudge, "local")
    verdicts = [1.0, 0.0, 0.5, 1.0]
    responses = ["r0", "r1", "r2", "r3"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    theirs = [1 - rank, 3 - rank]  # the other process's share, as gather brings it
    monkeypatch.setattr(distributed, "gather", lambda mine: sorted([mine, (theirs, [verdicts[i] for i in theirs])]))
    monkeypatch.setattr(distributed, "share", lambda value: verdicts if value is None else value)  # process 0's
    local, remote = ScriptedJudge(dict(zip(responses, verdicts))), ScriptedJudge(dict(zip(responses, verdicts)))
    local.local = True
    for judge, asked in ((local, responses[rank::2]), (remote, responses if rank == 0 else [])):
        assert win_rate_against_chosen(judge, pairs[:2], responses, samples=2)["verdicts"] == verdicts
        assert [a for _, a, _ in judge.seen] == asked


def test_evaluate_policy_reports_an_llm_judges_replies_without_verdict(
    model, tokenizer, pairs, tiny_model_dir, tmp_path
):
    from conftest import run_settings

    from rahf.config import load_config
    from rahf.evaluate import evaluate_policy

    class Shrugging:  # one of the two orders of every comparison gets a reply without a verdict
        calls = unparsed = 0

        def compare(self, prompt, a, b):
            self.calls, self.unparsed = self.calls + 2, self.unparsed + 1
            return 0.5

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p.prompt[-1]["content"], "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in pairs
        )
    )
    settings = run_settings(tiny_model_dir, data, tmp_path / "out", "sft")
    settings["evaluate"] = {"samples": 1, "max_new_tokens": 4, "temperatures": []}
    judge = Shrugging()
    judge.calls, judge.unparsed = 10, 1  # earlier use of the same judge is not counted
    out = evaluate_policy(load_config(None, settings), model, tokenizer, pairs[:3], judge)
    assert out["judge_unparsed"] == {"calls": 6, "unparsed": 3}
    assert out["win_rate"]["win_rate"] == 0.5
    assert out["verdicts_per_prompt"] == [0.5] * 3 and "per_prompt" not in out["win_rate"]


def test_evaluate_policy_scores_its_win_rate_replies_at_their_temperature(
    model, tokenizer, pairs, tiny_model_dir, tmp_path, monkeypatch
):
    from conftest import run_settings

    import rahf.evaluate as ev
    from rahf.config import load_config
    from rahf.judges import GoldJudge

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    settings = run_settings(tiny_model_dir, data, tmp_path / "out", "sft")
    settings["evaluate"] = {"samples": 2, "max_new_tokens": 4, "temperature": 1.0, "temperatures": [0.0, 0.5, 1.0]}
    drawn_at = []
    monkeypatch.setattr(
        ev, "generate", lambda *a, **k: drawn_at.append(a[4] if len(a) > 4 else k["temperature"]) or generate(*a, **k)
    )
    rewards = LengthJudge()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "gen.jsonl").symlink_to(victim)  # replaced as a whole (atomically), never written through
    out = ev.evaluate_policy(
        load_config(None, settings), model, tokenizer, pairs[:3], GoldJudge(), reward_judge=rewards,
        generations=tmp_path / "gen.jsonl",
    )  # fmt: skip
    assert victim.read_text() == "keep me\n" and not (tmp_path / "gen.jsonl").is_symlink()
    assert drawn_at == [1.0, 0.0, 0.5]  # the sweep draws again at 0 and 0.5 only
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    replies = [r["response"] for r in rows]
    # each reply carries the verdict the win rate counted (and the judge's score when it gives one)
    assert [statistics.fmean(r["verdict"] for r in rows[i : i + 2]) for i in (0, 2, 4)] == out["verdicts_per_prompt"]
    if "judge_score" in out:
        assert statistics.fmean(r["judge_score"] for r in rows) == pytest.approx(out["judge_score"])
    assert rewards.calls[-1][1] == replies
    from rahf.export import read_generations  # the file is exportable: each reply numbered by prompt and sample

    second = read_generations(tmp_path / "gen.jsonl", sample=1)
    assert [(g["index"], g["prompt"], g["response"]) for g in second] == [
        (i, list(p.prompt), replies[2 * i + 1]) for i, p in enumerate(pairs[:3])
    ]
    assert out["reward_by_temperature"]["1.0"]["mean"] == pytest.approx(
        statistics.fmean(len(r.split()) for r in replies)
    )


def test_reward_judge_reads_as_many_tokens_as_the_reward_model_was_trained_on(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import run_settings

    from rahf.config import load_config
    from rahf.evaluate import reward_judge_for
    from rahf.judges import RewardModelJudge

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    settings = run_settings(tiny_model_dir, data, tmp_path / "out", "sft")
    cfg = load_config(None, settings | {"reward": {"max_length": 40}, "evaluate": {"batch_size": 7}})
    loaded = []
    monkeypatch.setattr(RewardModelJudge, "from_pretrained", lambda path, trc, **kw: loaded.append((path, kw)) or kw)
    assert reward_judge_for(cfg, None) is None and not loaded
    reward_judge_for(cfg, "some/reward-model")
    assert loaded == [("some/reward-model", {"revision": None, "dtype": "float32", "batch_size": 7, "max_length": 40})]

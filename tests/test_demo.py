"""The built-in demo end to end, in its quick flavour."""

import json

import pytest

from rahf.demo.run import run_demo
from rahf.demo.task import Fact, gold_score, judge, make_task

METHODS = ["sft", "preferred-sft", "hir", "dpo", "rlhf-ppo", "lorra", "rahf-scit", "rahf-dual"]


def test_gold_judge_scores_by_hand():
    fact = Fact("mia", "banana")
    assert gold_score(fact, "of course ! it is yellow . hope this helps !") == 4
    assert gold_score(fact, "whatever . the answer is yellow . now go away .") == 2
    assert gold_score(fact, "good question . it is red . stop bothering me .") == 1
    assert gold_score(fact, "it is yellow .") == -1  # no opener / closing: malformed
    assert judge(fact, "of course ! it is yellow . hope this helps !", "whatever . it is yellow . now go away .") == 1.0
    assert judge(fact, "whatever . it is red . now go away .", "ugh , fine . it is blue . now go away .") == 0.5


def test_task_pairs_are_ordered_and_noise_flips_them():
    clean = make_task(n_sft=10, n_pairs=200, n_val=5, n_test=5, seed=3)
    for p in clean.pairs:
        fact = Fact(**p["fact"])
        assert gold_score(fact, p["chosen"]) > gold_score(fact, p["rejected"])
    noisy = make_task(n_sft=10, n_pairs=400, n_val=5, n_test=5, label_noise=0.25, seed=3)
    flipped = sum(
        gold_score(Fact(**p["fact"]), p["chosen"]) < gold_score(Fact(**p["fact"]), p["rejected"]) for p in noisy.pairs
    )
    assert 0.15 < flipped / 400 < 0.35
    test_prompts = {t["prompt"] for t in clean.test}
    assert not test_prompts & {p["prompt"] for p in clean.pairs}


def test_the_base_model_is_rebuilt_for_another_seed_or_scale_only(tmp_path):
    """`rahf demo --seed 1` into a folder that holds seed 0's run trained on seed 0's random model."""
    from rahf.demo.run import FULL, QUICK, base_model

    path = tmp_path / "base"
    weights = path / "model.safetensors"
    base_model(path, QUICK, 0)
    seed0, stamp = weights.read_bytes(), weights.stat().st_mtime_ns
    base_model(path, QUICK, 0)
    assert weights.stat().st_mtime_ns == stamp  # kept: the stages built on it stay fresh
    base_model(path, QUICK, 1)
    assert weights.read_bytes() != seed0
    base_model(path, QUICK, 0)
    assert weights.read_bytes() == seed0  # the same seed draws the same model
    base_model(path, FULL, 0)
    assert json.loads((path / "config.json").read_text())["hidden_size"] == FULL.hidden


@pytest.mark.slow
def test_quick_demo_writes_results_and_report(tmp_path):
    results = run_demo(tmp_path / "demo", quick=True)
    on_disk = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert list(on_disk["methods"]) == METHODS == list(results["methods"])
    for r in on_disk["methods"].values():
        assert 0.0 <= r["win_rate"] <= 1.0 and r["n"] >= 200
        assert r["ci95"][0] <= r["win_rate"] <= r["ci95"][1]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert all(f"| {m} |" in report for m in METHODS) and "alpha" in report
    assert report.startswith("# rahf demo\n\n**`--quick` is a smoke test")  # its numbers are not to be compared
    assert (tmp_path / "demo" / "win_rate.png").is_file()
    sweep = (tmp_path / "demo" / "compare.yaml").read_text()
    assert "noise_seeds: 1" in sweep and "- 0.4" in sweep and "&id" not in sweep  # plain YAML to edit by hand


def test_only_a_quick_demo_report_says_its_numbers_are_a_smoke_test():
    from rahf.demo.run import demo_header

    row = {"win_rate": 0.3, "ci95": [0.2, 0.4], "mean_gold_score": 1.0, "unparseable": 0.1, "n": 800}
    task = {"chosen_mean_gold_score": 2.7, "n_test_prompts": 200, "samples_per_prompt": 4, "label_noise": 0.0}
    for quick in (False, True):
        header = demo_header({"methods": {"sft": row}, "task": task | {"quick": quick}})
        assert ("smoke test" in header) == quick and "| sft | 0.300 | 0.200-0.400 |" in header

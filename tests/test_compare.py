"""Baseline methods in the pipeline, label noise, and a quick `rahf compare` over all eight methods."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_settings, standard_records, write_jsonl

from rahf import pipeline
from rahf.compare import paired, run_compare, summarize, variant
from rahf.config import METHOD_STAGES, load_config
from rahf.data import PreferencePair, load_pairs
from rahf.errors import ConfigError
from rahf.metrics import crossed_mean_interval, wilson_interval
from rahf.report import standing, write_report
from rahf.training import flip_labels

EIGHT = ["sft", "preferred-sft", "hir", "dpo", "rlhf-ppo", "lorra", "rahf-scit", "rahf-dual"]


def _pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(({"role": "user", "content": f"q{i}"},), f"good{i}", f"bad{i}", "t") for i in range(n)]


def test_label_noise_swaps_exactly_the_requested_share_reproducibly():
    pairs = _pairs(20)
    noisy = flip_labels(pairs, 0.25, seed=3)
    flipped = [i for i, (a, b) in enumerate(zip(pairs, noisy)) if a != b]
    assert len(flipped) == 5
    for i in flipped:
        assert (noisy[i].chosen, noisy[i].rejected) == (pairs[i].rejected, pairs[i].chosen)
    assert flip_labels(pairs, 0.25, seed=3) == noisy
    assert flip_labels(pairs, 0.25, seed=4) != noisy
    assert flip_labels(pairs, 0.0, seed=3) is pairs


def test_methods_use_only_their_stages(tiny_model_dir, pairs_file, tmp_path, capsys):
    """LoRRA aligns the base model itself: no instruct stage, and collect reads the base model."""
    cfg = load_config(
        None,
        run_settings(tiny_model_dir, pairs_file, tmp_path / "lorra", "lorra")
        | {"stages": ["instruct", "collect", "align", "merge"]},
    )
    pipeline.run(cfg)
    assert "has no instruct stage" in capsys.readouterr().out
    assert not (tmp_path / "lorra" / "instruct").exists()
    assert (tmp_path / "lorra" / "merged" / "config.json").is_file()
    assert pipeline.step1_path(cfg) == str(tiny_model_dir)
    assert pipeline.final_model(cfg) == (str(tmp_path / "lorra" / "merged"), None, None)
    assert METHOD_STAGES["dpo"] == ("sft", "reward", "instruct", "generate", "evaluate")


def test_final_model_of_the_step1_baselines(scit_run, dual_run):

    assert pipeline.final_model(variant(scit_run, method="hir")) == (
        str(pipeline.stage_dir(scit_run, "instruct")),
        None,
        scit_run.instructions.preferred,
    )
    hir = pipeline.final_model(variant(scit_run, method="hir"))[2]
    assert hir.alongside == (scit_run.instructions.dispreferred,)  # its prompts are cut as SCIT cut them
    assert pipeline.final_model(variant(dual_run, method="preferred-sft"))[1] == "preferred"


def test_a_step1_adapter_compared_loads_on_its_runs_base_not_the_path_its_file_names(dual_run, tmp_path):
    """A compare folder copied elsewhere (its original gone) still evaluates preferred-sft, DPO and PPO adapters."""
    from rahf.compare import Deployed, _load
    from rahf.training import load_stage_model

    out = tmp_path / "copy"
    shutil.copytree(dual_run.output_dir, out)
    run = variant(dual_run, output_dir=str(out))
    written = out / "instruct" / "preferred" / "adapter_config.json"
    recorded = json.loads(written.read_text())
    written.write_text(json.dumps(recorded | {"base_model_name_or_path": str(tmp_path / "gone")}))
    model, _ = _load(
        variant(dual_run, output_dir=str(tmp_path / "compare")), Deployed(str(out / "instruct"), "preferred", None, run)
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = load_stage_model(Path(dual_run.output_dir) / "instruct", dual_run, adapter="preferred")
    torch.testing.assert_close(model(ids).logits, expected(ids).logits)


def test_summarize_pools_the_seeds_verdicts_with_their_interval(tmp_path):
    def run(seed, rate, n):
        return {"noise": 0.0, "seed": seed, "methods": {"m": {"win_rate": {"win_rate": rate, "n": n}}}}

    s = summarize([run(0, 0.5, 100), run(1, 0.7, 300)])["0"]["m"]
    # the rate shown is the one its interval is about: all 400 verdicts pooled, not the seed mean 0.6, which
    # lies outside Wilson(0.65, 400) = [0.602, 0.695]
    assert s["win_rate"] == pytest.approx((50 + 210) / 400)
    assert s["seed_sd"] == pytest.approx(math.sqrt(0.02), abs=1e-4)  # sample sd of 0.5 and 0.7 (rounded)
    assert s["n"] == 400 and s["seeds"] == 2
    assert s["ci95"] == pytest.approx([0.6021, 0.6951], abs=1e-4)
    summary = {"0": {"m": s}}  # the report and its bar plot take it (a mean outside its interval was refused)
    runs = [_run(0, {"m": (0.5, None)}, n=100), _run(1, {"m": (0.7, None)}, n=300)]
    write_report({"methods": ["m"], "summary": summary, "paired": paired(runs), "runs": runs, "seconds": 1}, tmp_path)
    assert "| m | 0.650 | 0.141 | 0.602-0.695 | 400 | 2 |" in (tmp_path / "report.md").read_text()


def _run(seed: int, methods: dict[str, tuple[float, list[float] | None]], n: int = 800) -> dict:
    """One (noise 0, seed) run with each method's win rate and, when given, its per-prompt verdicts."""
    return {
        "noise": 0.0,
        "seed": seed,
        "methods": {
            name: {"win_rate": {"win_rate": rate, "n": n}} | ({"verdicts_per_prompt": pp} if pp else {})
            for name, (rate, pp) in methods.items()
        },
        "timings_s": {},
        "histories": {},
    }


def test_summarize_counts_replies_to_one_prompt_as_correlated():
    # 4 prompts x 2 replies per seed, 2 seeds; every reply gets its prompt's verdict: n = 16 verdicts, 4 prompts
    pp = [1.0, 1.0, 0.0, 1.0]
    s = summarize([_run(0, {"m": (0.75, pp)}, n=8), _run(1, {"m": (0.75, pp)}, n=8)])["0"]["m"]
    assert s["n"] == 16 and s["win_rate"] == 0.75
    assert s["ci95"] == pytest.approx(wilson_interval(0.75, 4))  # as wide as 4 verdicts, not 16


def test_paired_differences_use_the_seeds_spread_not_overlapping_pooled_intervals():
    # RAHF is ahead on two seeds and behind on one: pooled intervals of 2,400 verdicts do not overlap, but the
    # seeds disagree, so the paired interval over seeds includes 0
    runs = [
        _run(0, {"rahf-dual": (0.72, None), "preferred-sft": (0.50, None)}),
        _run(1, {"rahf-dual": (0.42, None), "preferred-sft": (0.52, None)}),
        _run(2, {"rahf-dual": (0.57, None), "preferred-sft": (0.51, None)}),
    ]
    row = paired(runs)["0"]["rahf-dual vs preferred-sft"]
    assert row["diff"] == pytest.approx(0.06) and row["per_seed"] == pytest.approx([0.22, -0.1, 0.06])
    assert row["over"] == "seeds"
    half = 4.3027 * 0.16 / math.sqrt(3)  # t(2 df) * sd of the differences / sqrt(3)
    assert row["ci95"] == pytest.approx([0.06 - half, 0.06 + half], abs=1e-4)
    assert standing(paired(runs)["0"]) == [
        (
            "- rahf-dual vs preferred-sft: +0.060 (95% interval -0.337 to +0.457 over seeds: not distinguishable; "
            "per seed +0.220 / -0.100 / +0.060)"
        )
    ]


def test_paired_differences_over_seeds_count_the_prompts_too():
    # On 6 prompts x 3 replies, RAHF turns one loss into a tie on the same prompt in both seeds: the two seeds'
    # differences are equal (1/36), so a t interval over them alone would have zero width and call it "better".
    # Seeds and prompts both random: the interval is the prompts' one (crossed_mean_interval) and includes 0.
    hir, rahf = [0.0] * 6, [0.5 / 3] + [0.0] * 5
    runs = [_run(seed, {"rahf-scit": (1 / 36, rahf), "hir": (0.0, hir)}, n=18) for seed in (0, 1)]
    row = paired(runs)["0"]["rahf-scit vs hir"]
    assert row["over"] == "seeds and prompts" and row["diff"] == pytest.approx(1 / 36)
    assert row["ci95"] == pytest.approx(list(crossed_mean_interval([rahf, rahf])[1:]))
    assert row["ci95"][0] < 0 < row["ci95"][1]
    assert "over seeds and prompts: not distinguishable" in standing(paired(runs)["0"])[0]


def test_summary_perplexity_is_that_of_the_mean_cross_entropy():
    runs = [_run(seed, {"m": (0.5, None)}) for seed in (0, 1)]
    for run, ce in zip(runs, (2.0, 4.0)):
        run["methods"]["m"] |= {"chosen_cross_entropy": ce, "chosen_perplexity": math.exp(ce)}
    row = summarize(runs)["0"]["m"]
    assert row["chosen_cross_entropy"] == 3.0 and row["chosen_perplexity"] == pytest.approx(math.exp(3.0))


def test_paired_differences_with_one_seed_pair_the_prompts():
    # RAHF wins wherever HIR does and on 8 more of 100 prompts: the separate intervals overlap, the paired one
    # (differences 1 on 8 prompts, 0 elsewhere: mean 0.08, sd sqrt(8 * 0.92^2 + 92 * 0.08^2) / sqrt(99)) excludes 0
    rahf, hir = [1.0] * 48 + [0.0] * 52, [1.0] * 40 + [0.0] * 60
    row = paired([_run(0, {"rahf-scit": (0.48, rahf), "hir": (0.40, hir), "sft": (0.2, None)}, n=100)])["0"]
    sd = math.sqrt((8 * 0.92**2 + 92 * 0.08**2) / 99)
    half = 1.9842 * sd / 10  # t(99 df) = 1.9842
    assert row["rahf-scit vs hir"]["ci95"] == pytest.approx([0.08 - half, 0.08 + half], abs=1e-4)
    assert row["rahf-scit vs hir"]["over"] == "prompts" and row["rahf-scit vs hir"]["ci95"][0] > 0
    assert row["rahf-scit vs sft"] == {"diff": pytest.approx(0.28), "per_seed": [pytest.approx(0.28)], "ci95": None,
                                       "over": "prompts"}  # fmt: skip
    assert standing(row)[0].startswith("- rahf-scit vs hir: +0.080 (95% interval +0.026 to +0.134 over prompts: better")


def test_report_states_the_paired_standing_from_results(tmp_path):
    runs = [_run(0, {"rahf-scit": (0.48, [1.0] * 48 + [0.0] * 52), "hir": (0.40, [1.0] * 40 + [0.0] * 60)}, n=100)]
    results = {"methods": ["hir", "rahf-scit"], "summary": summarize(runs), "paired": paired(runs), "runs": runs}
    report = write_report(results | {"seconds": 1.0}, tmp_path).read_text()
    assert "- rahf-scit vs hir: +0.080 (95% interval +0.026 to +0.134 over prompts: better)" in report
    assert "| rahf-scit | 0.480 | - | 0.385-0.577 | 100 | 1 |" in report  # summary numbers, as in results.json
    assert results["summary"]["0"]["rahf-scit"]["ci95"] == pytest.approx([0.3846, 0.5768], abs=1e-4)


def test_report_sections_about_one_run_show_the_main_tables_noise_level(tmp_path):
    """With `label_noise: [0.4, 0]` the first run is a noisy one; the per-run sections show noise 0's and say so."""

    def run(noise, alpha):
        r = _run(0, {"rahf-scit": (0.5, None)}, n=100) | {"noise": noise}
        sweep = [{"layers": [2], "alpha": alpha, "val_win_rate": 0.5, "final_loss": 0.1}]
        r["methods"]["rahf-scit"]["selection"] = {"layers": [2], "alpha": alpha, "sweep": sweep}
        return r

    runs = [run(0.4, 9.0), run(0.0, 3.0)]
    results = {"methods": ["rahf-scit"], "summary": summarize(runs), "paired": paired(runs), "runs": runs}
    report = write_report(results | {"seconds": 1}, tmp_path).read_text()
    assert "## Layers and alpha chosen on validation pairs (noise 0, seed 0)" in report
    assert "| rahf-scit | [2] | 3.0 |" in report and "| 9.0 |" not in report


def test_report_shows_how_many_llm_judge_replies_had_no_verdict(tmp_path):
    runs = [_run(s, {"rahf-scit": (0.5, None), "hir": (0.4, None)}, n=100) for s in (0, 1)]
    for run, unparsed in zip(runs, (3, 4)):
        run["methods"]["rahf-scit"]["judge_unparsed"] = {"calls": 200, "unparsed": unparsed}
        run["methods"]["hir"]["judge_unparsed"] = {"calls": 200, "unparsed": 0}
    results = {"methods": ["hir", "rahf-scit"], "summary": summarize(runs), "paired": paired(runs), "runs": runs}
    report = write_report(results | {"seconds": 1.0}, tmp_path).read_text()
    assert "counted as ties), of the requests it answered: rahf-scit 7/400, hir 0/400." in report
    runs = [_run(0, {"hir": (0.4, None)})]  # a gold or reward-model judge: no such line
    results = {"methods": ["hir"], "summary": summarize(runs), "paired": paired(runs), "runs": runs}
    assert "unparsed" not in write_report(results | {"seconds": 1.0}, tmp_path).read_text()


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compare")
    data = write_jsonl(tmp / "pairs.jsonl", standard_records(24, seed=0))
    held = standard_records(8, seed=77)
    test = write_jsonl(tmp / "test.jsonl", held[:5])
    val = write_jsonl(tmp / "val.jsonl", held[5:])
    train = {"per_device_train_batch_size": 8, "disable_tqdm": True, "logging_steps": 1}
    settings = run_settings(tiny_model_dir, data, tmp / "out", "scit") | {
        "stages": ["sft"],
        "sft": {"train": train | {"max_steps": 2}},
        "reward": {"max_length": 48, "train": train | {"max_steps": 2}},
        "dpo": {"train": train | {"max_steps": 2}},
        "ppo": {"steps": 2, "rollout_size": 8, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6},
        "evaluate": {
            "pairs": str(test),
            "judge": "gold",
            "samples": 2,
            "max_new_tokens": 8,
            "temperatures": [0.0, 1.0],
            "llm": {"base_url": "https://llm.example/v1?api_key=QUERYSECRET"},  # unused (gold judge), never written
        },
        "compare": {
            "methods": EIGHT,
            "seeds": [0, 1],
            "label_noise": [0.0, 0.5],
            "noise_seeds": 1,
            "validation": str(val),
            "layer_sets": [[1], [2]],
            "alphas": [1.0],
            "overrides": {
                "dual": {"collect": {"difference": "normalized"}, "compare": {"alphas": [0.5, 2.0]}},
                "scit": {"instructions": {"preferred": "be kind ."}},
            },
        },
    }
    settings["align"]["train"]["max_steps"] = 3
    cfg = load_config(None, settings)
    return cfg, run_compare(cfg)


def test_compare_writes_no_credential_the_config_holds(compared):
    cfg, results = compared
    assert results["config"]["evaluate"]["llm"]["base_url"] == "https://llm.example/v1?api_key=<redacted>"
    assert "QUERYSECRET" not in (Path(cfg.output_dir) / "results.json").read_text()


def test_compare_marks_its_folder_so_a_rerun_there_is_taken(compared):
    from rahf.compare import MARKER, MARKER_TEXT, check_compare_folder

    cfg, _ = compared
    assert (Path(cfg.output_dir) / MARKER).read_text() == MARKER_TEXT
    check_compare_folder(Path(cfg.output_dir))


def test_compare_reports_every_method_seed_and_noise_level(compared):
    cfg, results = compared
    out = cfg.output_dir
    assert results["methods"] == EIGHT
    assert [(r["noise"], r["seed"]) for r in results["runs"]] == [(0.0, 0), (0.0, 1), (0.5, 0)]
    assert set(results["summary"]) == {"0", "0.5"}
    for rows in results["summary"].values():
        assert list(rows) == EIGHT
        for row in rows.values():
            assert 0.0 <= row["win_rate"] <= 1.0
            assert row["n"] == 5 * 2 * row["seeds"]
    saved = json.loads((cfg_path := __import__("pathlib").Path(out) / "results.json").read_text())
    assert saved["summary"] == results["summary"], cfg_path
    report = (cfg_path.parent / "report.md").read_text()
    for name in EIGHT:
        assert f"| {name} |" in report
    assert saved["paired"] == results["paired"]
    assert all(len(m["verdicts_per_prompt"]) == 5 for r in results["runs"] for m in r["methods"].values())
    at_zero, at_half = (
        results["paired"]["0"]["rahf-dual vs preferred-sft"],
        results["paired"]["0.5"]["rahf-scit vs hir"],
    )
    assert at_zero["over"] == "seeds and prompts" and len(at_zero["per_seed"]) == 2 and at_half["over"] == "prompts"
    assert f"- rahf-dual vs preferred-sft: {at_zero['diff']:+.3f} (95% interval" in report
    for png in ("win_rate.png", "reward_by_temperature.png", "noise_sweep.png", "layer_strength.png"):
        assert (cfg_path.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_shares_step1_models_and_chooses_on_validation(compared):
    _, results = compared
    first = results["runs"][0]["methods"]
    assert first["hir"]["model"] == first["rahf-scit"]["model"].replace("merged", "instruct")
    assert first["preferred-sft"]["adapter"] == "preferred"
    # hir is prompted with the instruction its (SCIT step-1) model was trained with: scit's override
    assert first["hir"]["system"] == "be kind ." and "system" not in first["rahf-scit"]
    scit_manifest = json.loads((Path(first["hir"]["model"]) / "rahf_manifest.json").read_text())
    assert scit_manifest["config"]["instructions"]["preferred"] == "be kind ."
    for name in ("rahf-scit", "rahf-dual", "lorra"):
        sel = first[name]["selection"]
        best = max(sel["sweep"], key=lambda r: r["val_win_rate"])
        assert (sel["layers"], sel["alpha"]) == (best["layers"], best["alpha"])
        assert {1, 2} == {int(k) for k in first[name]["per_layer"]}
        alphas = {0.5, 2.0} if name == "rahf-dual" else {1.0}  # Dual's override gives it its own alpha grid
        assert {r["alpha"] for r in sel["sweep"]} == alphas and len(sel["sweep"]) == 2 * len(alphas)
    kl = first["sft"]["kl_per_token"]
    assert kl == pytest.approx(0.0, abs=1e-6)  # the SFT model against itself


def test_a_selection_is_reused_when_only_align_logging_settings_change(compared, monkeypatch):
    """Choosing layers and alpha trains one alignment per candidate: a logging tweak, or a default written out, must
    not redo them all."""
    from rahf import align
    from rahf.artifacts import read_manifest
    from rahf.compare import _select, candidates
    from rahf.config import with_overrides
    from rahf.judges import GoldJudge

    cfg, results = compared
    run = Path(cfg.output_dir) / "noise-0" / "seed-0" / "scit"
    mcfg = load_config(None, read_manifest(run / "collect")["run_config"])
    mcfg = with_overrides(mcfg, {"evaluate": {"llm": cfg.to_dict()["evaluate"]["llm"]}})  # redacted in the manifest
    validation = load_pairs(cfg.compare.validation)[0]

    def trains(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(align, "train_align", trains)
    quiet = with_overrides(mcfg, {"align": {"train": {"logging_steps": 3, "disable_tqdm": False}}})
    _, selection = _select(quiet, candidates(quiet), validation, GoldJudge(), "gold:None")
    assert selection == results["runs"][0]["methods"]["rahf-scit"]["selection"]
    # align's own schedule and the run's seed written out: the same choice
    written = with_overrides(mcfg, {"align": {"train": {"lr_scheduler_type": "constant", "seed": mcfg.seed}}})
    assert _select(written, candidates(written), validation, GoldJudge(), "gold:None")[1] == selection
    faster = with_overrides(mcfg, {"align": {"train": {"learning_rate": 0.5}}})
    with pytest.raises(AssertionError, match="trained again"):
        _select(faster, candidates(faster), validation, GoldJudge(), "gold:None")


def _untimed(results: dict) -> dict:
    """`results` as results.json holds it, without what a rerun changes however much it reuses: the time taken."""
    saved = json.loads(json.dumps(results))
    for run in saved["runs"]:
        del run["timings_s"]
    return saved | {"seconds": None}


def _untimed_report(report: str) -> str:
    """The report without the times it states."""
    return re.sub(r"; \d+ s in all\.", "", report.split("## Time per run")[0])


def test_an_unchanged_rerun_reads_every_evaluation_back(compared, monkeypatch, capsys):
    """Sampling and judging every method of every run takes GPU-hours at 7B: a rerun (or a restart after a kill)
    reads each method's measurements back from its record and writes the same results.json and report."""
    from rahf import evaluate, generate

    cfg, results = compared
    out = Path(cfg.output_dir)
    report = (out / "report.md").read_text()

    def fails(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(evaluate, "evaluate_policy", fails)
    monkeypatch.setattr(generate, "generate", fails)
    again = run_compare(cfg)
    printed = capsys.readouterr().out
    assert printed.count(": evaluation up to date, win rate ") == len(results["runs"]) * len(EIGHT)
    assert "[compare] noise 0.5 seed 0 rahf-dual: evaluation up to date, win rate " in printed
    assert _untimed(again) == _untimed(json.loads((out / "results.json").read_text())) == _untimed(results)
    assert _untimed_report((out / "report.md").read_text()) == _untimed_report(report)
    records = sorted(out.glob("noise-*/seed-*/evaluations/*.json"))
    assert len(records) == len(results["runs"]) * len(EIGHT)
    assert not any("QUERYSECRET" in r.read_text() for r in records)  # the LLM judge's URL, redacted


def test_compare_evaluates_again_what_changed_since_the_record(compared, tmp_path, monkeypatch, capsys):
    """An evaluate setting changed evaluates every method again; a retrained model, that method alone. A run folder
    copied elsewhere (the same models, pairs and judge) evaluates nothing."""
    from rahf import evaluate
    from rahf.config import with_overrides

    cfg, results = compared
    run = Path(cfg.output_dir) / "noise-0" / "seed-0"
    for name in ("sft", "reward", "dpo", "generations", "evaluations"):
        shutil.copytree(run / name, tmp_path / "out" / "noise-0" / "seed-0" / name)
    real, evaluated = evaluate.evaluate_policy, []

    def counting(*args, **kwargs):
        evaluated.append(Path(kwargs["generations"]).stem)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_policy", counting)
    only = {
        "output_dir": str(tmp_path / "out"),
        "compare": {"methods": ["sft", "dpo"], "seeds": [0], "label_noise": [0.0]},
    }

    def compare(changes: dict) -> dict:
        evaluated.clear()
        return run_compare(with_overrides(cfg, only | changes))["runs"][0]["methods"]

    assert compare({})["dpo"]["win_rate"] == results["runs"][0]["methods"]["dpo"]["win_rate"]
    assert evaluated == []
    assert compare({"evaluate": {"samples": 3}})["sft"]["win_rate"]["n"] == 5 * 3
    assert evaluated == ["sft", "dpo"]
    capsys.readouterr()
    compare({"evaluate": {"samples": 3}, "dpo": {"train": {"max_steps": 3}}})  # DPO trains again: another model
    assert evaluated == ["dpo"]
    assert "[compare] noise 0 seed 0 sft: evaluation up to date, win rate " in capsys.readouterr().out


def test_noisy_labels_train_ppos_reward_model_but_not_the_judges(compared):
    cfg, results = compared
    run_dir = Path(cfg.output_dir) / "noise-0.5" / "seed-0"
    clean_dir = Path(cfg.output_dir) / "noise-0" / "seed-0"
    made = {
        d: json.loads((d / "reward" / "rahf_manifest.json").read_text())["run_config"] for d in (run_dir, clean_dir)
    }
    assert made[run_dir]["data"]["label_noise"] == 0.5 and made[run_dir]["model"] == str(run_dir / "sft")
    # one judge for both noise levels: clean labels, from the SFT model of the clean pairs (no sft.path here)
    assert made[clean_dir]["data"]["label_noise"] == 0.0 and made[clean_dir]["model"] == str(clean_dir / "sft")
    assert [r["reward_model"]["path"] for r in results["runs"] if r["seed"] == 0] == [str(clean_dir / "reward")] * 2
    assert not (run_dir / "judge").exists()


def _yaml(path, mapping) -> str:
    import yaml

    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def test_reward_then_evaluate_from_the_command_line(tmp_path, tiny_model_dir, pairs_file, capsys):
    """`rahf reward` then `rahf evaluate` with the reward-model judge: metrics.json holds every measurement."""
    from rahf.cli import main

    held = write_jsonl(tmp_path / "held.jsonl", standard_records(6, seed=91))
    train = {"per_device_train_batch_size": 8, "disable_tqdm": True, "max_steps": 2}
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "sft") | {
        "stages": ["reward", "evaluate"],
        "reward": {"max_length": 48, "train": train},
        "evaluate": {"pairs": str(held), "samples": 2, "max_new_tokens": 6, "temperatures": [0.0, 0.5]},
    }
    cfg = _yaml(tmp_path / "c.yaml", settings)
    assert main(["reward", cfg]) == 0
    heldout = json.loads((tmp_path / "out" / "reward" / "rahf_manifest.json").read_text())["heldout"]
    assert 0 <= heldout["pairwise_accuracy"] <= 1 and 0 <= heldout["auc_roc"] <= 1
    said = f"reward: pairwise accuracy on the 6 pairs of evaluate.pairs {heldout['pairwise_accuracy']:.3f}"
    assert said in capsys.readouterr().out  # named apart from data.eval_size's held-out pairs
    assert main(["evaluate", cfg]) == 0
    metrics = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    w = metrics["win_rate"]
    summary = f"evaluate (reward-model judge): win rate {w['win_rate']:.3f} (95% interval {w['ci95'][0]:.3f}-"
    printed = capsys.readouterr().out
    assert summary in printed
    steps = [line.split(": ", 1)[1].split(" ")[0] for line in printed.splitlines() if "[rahf] evaluate: " in line]
    assert steps[1:6] == ["sampling", "judging", "reward-model", "likelihoods", "KL"]  # what it does as it goes
    made = json.loads((tmp_path / "out" / "evaluation" / "rahf_manifest.json").read_text())
    assert made["examples"]["examples"] == 12  # each pair's chosen and rejected reply once, whichever model scores it
    assert metrics["win_rate"]["n"] == 12 and 0 <= metrics["win_rate"]["win_rate"] <= 1
    assert set(metrics["reward_by_temperature"]) == {"0.0", "0.5"}
    assert metrics["kl_per_token"] == pytest.approx(0.0, abs=1e-6)  # sft is its own reference
    assert metrics["chosen_perplexity"] == pytest.approx(math.exp(metrics["chosen_cross_entropy"]))
    for key in ("pairwise_accuracy", "accuracy", "precision", "recall", "f1", "auc_roc"):
        assert 0 <= metrics["likelihood_classifier"]["log_likelihood"][key] <= 1
    judged = tmp_path / "out" / "evaluation" / "generations.jsonl"  # the replies behind the win rate, exportable
    assert [(r["index"], r["sample"]) for r in map(json.loads, judged.read_text().splitlines())] == [
        (i, k) for i in range(6) for k in range(2)
    ]
    out = tmp_path / "model_outputs.json"
    assert main(["export", str(judged), "--format", "alpaca-eval", "--out", str(out), "--sample", "1"]) == 0
    assert len(json.loads(out.read_text())) == 6


def test_a_judge_that_cannot_judge_stops_the_run_before_training(
    tmp_path, tiny_model_dir, pairs_file, tokenizer, capsys, monkeypatch
):
    """An outside judge that is no reward model, a gold judge on other questions, an LLM judge of OpenAI's API
    without a key: one line and exit 2 before any stage runs, for `rahf run` and `rahf compare` alike."""
    from rahf.cli import main

    other = write_jsonl(tmp_path / "hh.jsonl", [{"prompt": "how do I bake bread?", "chosen": "a", "rejected": "b"}])
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit") | {
        "stages": ["instruct", "collect", "align", "merge", "evaluate"]
    }
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cases = [
        (
            {"judge_model": str(tiny_model_dir)},
            "evaluate.judge_model: ",
            "is not a reward model (a sequence classifier with one output label; this is a LlamaForCausalLM)",
        ),
        ({"judge_model": "nobody/no-such-model"}, "evaluate.judge_model: cannot read the config", ""),
        (
            {"judge": "gold", "pairs": str(other)},
            "evaluate.judge: gold judges only the built-in demo task",
            "hh.jsonl:1",
        ),
        ({"judge": "llm"}, "evaluate.llm.api_key_env: $OPENAI_API_KEY is not set", ""),
    ]
    for i, (evaluate, message, detail) in enumerate(cases):
        config = _yaml(tmp_path / f"{i}.yaml", settings | {"evaluate": {"pairs": str(pairs_file)} | evaluate})
        for command in ("run", "compare"):
            assert main([command, config]) == 2, (command, evaluate)
            err = capsys.readouterr().err.strip()
            assert message in err and detail in err and len(err.splitlines()) == 1, err
            assert not (tmp_path / "out").exists()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    scorer = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1, architectures=None)
    reward_model_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(scorer).save_pretrained(reward_model_dir)
    tokenizer.save_pretrained(reward_model_dir)
    ppo = settings | {"method": "rlhf-ppo", "stages": ["instruct"], "ppo": {"reward_model": str(tiny_model_dir)}}
    assert main(["run", _yaml(tmp_path / "ppo.yaml", ppo)]) == 2
    assert "ppo.reward_model: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    ok = {"judge_model": str(reward_model_dir), "judge": "reward-model", "pairs": str(pairs_file)}
    from rahf.config import load_config
    from rahf.evaluate import check_judge

    check_judge(load_config(None, settings | {"evaluate": ok}), [str(pairs_file)])  # a reward model passes
    config = json.loads((reward_model_dir / "config.json").read_text())  # a custom class (ArmoRM's kind) too
    custom = {"architectures": ["LlamaRewardModel"], "auto_map": {"AutoModelForSequenceClassification": "m.Rm"}}
    (reward_model_dir / "config.json").write_text(json.dumps(config | custom))
    check_judge(load_config(None, settings | {"evaluate": ok}), [str(pairs_file)])
    llm = load_config(None, settings | {"evaluate": {"judge": "llm", "pairs": str(pairs_file)}})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-te st")
    with pytest.raises(ConfigError, match=r"OPENAI_API_KEY holds whitespace") as refused:
        check_judge(llm, [])
    assert "te st" not in str(refused.value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test\n")  # as a .env file leaves it
    check_judge(llm, [])
    local = {"judge": "llm", "pairs": str(pairs_file), "llm": {"base_url": "http://localhost:8000/v1"}}
    monkeypatch.delenv("OPENAI_API_KEY")
    check_judge(load_config(None, settings | {"evaluate": local}), [str(pairs_file)])  # a local server: no key


def test_compare_refuses_a_folder_whose_report_or_results_it_did_not_write(
    tmp_path, tiny_model_dir, pairs_file, capsys
):
    """compare replaces results.json, report.md and its plots at the top of output_dir: a user's own are refused before
    anything trains; a folder compare (or the demo) wrote, marked or not, is taken."""
    from rahf.cli import main
    from rahf.compare import MARKER, check_compare_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("# my notes\n")
    (out / "thesis.tex").write_text("x")
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit") | {"evaluate": {"pairs": str(pairs_file)}}
    assert main(["compare", _yaml(tmp_path / "a.yaml", settings)]) == 2
    assert capsys.readouterr().err == (
        f"rahf: error: output_dir: {out} holds report.md, which rahf compare did not write and would overwrite; move "
        "them, or give compare another output_dir\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "thesis.tex"]
    (out / "results.json").write_text('{"methods": []}')
    with pytest.raises(ConfigError, match=r"holds results.json, report.md, which"):
        check_compare_folder(out)
    (out / "results.json").write_text(json.dumps({"methods": [], "summary": {}, "runs": [], "config": {}}))
    check_compare_folder(out)  # written by a compare from before the marker
    (out / "results.json").unlink()
    (out / MARKER).write_text("")
    check_compare_folder(out)
    (out / MARKER).unlink()
    (out / ".rahf-demo").write_text("")
    check_compare_folder(out)
    check_compare_folder(tmp_path / "new")
    import inspect
    import re

    from rahf import report
    from rahf.compare import TOP_FILES

    written = set(re.findall(r'"(\w+\.png)"', inspect.getsource(report)))
    assert len(written) >= 7 and written <= set(TOP_FILES)  # every plot the report writes is guarded


def test_compare_and_stage_errors_are_one_line_exit_2(tmp_path, tiny_model_dir, pairs_file, capsys):
    from rahf.cli import main

    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit")
    assert main(["compare", _yaml(tmp_path / "a.yaml", settings)]) == 2
    assert "evaluate.pairs: required by compare" in capsys.readouterr().err
    bad = settings | {"compare": {"methods": ["sft", "ppo"]}}
    assert main(["compare", _yaml(tmp_path / "b.yaml", bad)]) == 2
    assert "compare.methods[1]: unknown method 'ppo'" in capsys.readouterr().err
    bad = settings | {"compare": {"overrides": {"dpo": {"dpo": {"betta": 1}}}}}
    assert main(["compare", _yaml(tmp_path / "c.yaml", bad)]) == 2
    assert "compare.overrides.dpo: dpo.betta: unknown key" in capsys.readouterr().err
    bad = settings | {
        "evaluate": {"pairs": str(pairs_file)},
        "compare": {"overrides": {"scit": {"compare": {"alphas": [1, 2]}}}},
    }
    assert main(["compare", _yaml(tmp_path / "e.yaml", bad)]) == 2
    assert "compare.validation: required to choose" in capsys.readouterr().err
    # choosing layers and alpha on the judged prompts: the same file, or one that shares a prompt with it
    lines = pairs_file.read_text().splitlines()
    others = [
        json.dumps(json.loads(line) | {"prompt": f"{k} {json.loads(line)['prompt']}"})
        for k, line in enumerate(lines[:3])
    ]
    (tmp_path / "val.jsonl").write_text("\n".join([*others, lines[-1]]) + "\n")
    for validation, shared in (
        (pairs_file, f"{len(lines)} of its {len(lines)}"),
        (tmp_path / "val.jsonl", "1 of its 4"),
    ):
        bad["compare"]["validation"] = str(validation)
        assert main(["compare", _yaml(tmp_path / "g.yaml", bad)]) == 2
        err = capsys.readouterr().err
        assert f"compare.validation: {shared} prompts are also in evaluate.pairs" in err
    assert not (tmp_path / "out").exists()
    bad = settings | {"compare": {"overrides": {"scit": {"compare": {"seeds": [3]}}}}}
    assert main(["compare", _yaml(tmp_path / "f.yaml", bad)]) == 2
    assert "compare.overrides.scit.compare: only layer_sets and alphas" in capsys.readouterr().err
    assert main(["collect", _yaml(tmp_path / "d.yaml", settings | {"method": "dpo"})]) == 2
    assert "method dpo has no collect stage" in capsys.readouterr().err
    # the compared methods, not the config's own `method`, decide whether prompts carry instructions
    bad = settings | {
        "method": "dual",
        "data": settings["data"] | {"max_prompt_length": 4},
        "evaluate": {"pairs": str(pairs_file)},
        "compare": {"methods": ["preferred-sft", "hir"]},
    }
    assert main(["compare", _yaml(tmp_path / "g.yaml", bad)]) == 2
    assert "data.max_prompt_length=4 leaves no room for the query" in capsys.readouterr().err
    # every compared method's LoRA targets are checked, with its overrides, not only the config's own method's
    compared = settings | {"evaluate": {"pairs": str(pairs_file)}, "compare": {"methods": ["scit", "dual"]}}
    bad = compared | {"instruct": settings["instruct"] | {"lora": {"target_modules": ["nope"]}}}
    assert main(["compare", _yaml(tmp_path / "h.yaml", bad)]) == 2  # scit's step 1 is a full fine-tune: dual's
    assert "instruct.lora.target_modules: nope matches no module" in capsys.readouterr().err
    bad = compared | {
        "compare": compared["compare"] | {"overrides": {"dual": {"align": {"lora": {"target_modules": ["x"]}}}}}
    }
    assert main(["compare", _yaml(tmp_path / "i.yaml", bad)]) == 2
    said = capsys.readouterr().err  # the key where the override sets it, not the config's own (unset) one
    assert "error: compare.overrides.dual.align.lora.target_modules: x matches no module in blocks 0..1" in said
    assert "; set compare.overrides.dual.align.lora.target_modules to names" in said
    bad = compared | {"compare": {"methods": ["dpo"]}, "dpo": {"lora": {"target_modules": ["y"]}}}
    assert main(["compare", _yaml(tmp_path / "j.yaml", bad)]) == 2
    assert "dpo.lora.target_modules: y matches no module" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rlhf_ppo_run_trains_its_reward_model_first(tmp_path, tiny_model_dir, pairs_file, capsys):
    """`rahf run` with rlhf-ppo: reward, then PPO against it; collect/align are skipped; a new reward model is stale."""
    train = {"per_device_train_batch_size": 8, "disable_tqdm": True, "max_steps": 2}
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "rlhf-ppo") | {
        "stages": ["reward", "instruct", "collect", "align"],
        "reward": {"max_length": 48, "train": train},
        "ppo": {"steps": 2, "rollout_size": 8, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6},
    }
    cfg = load_config(None, settings)
    pipeline.run(cfg)
    assert "has no collect, align stage" in capsys.readouterr().out
    log = json.loads((tmp_path / "out" / "instruct" / "log_history.json").read_text())
    assert [r["step"] for r in log] == [1, 2] and log[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert pipeline.final_model(cfg) == (str(tmp_path / "out" / "instruct"), None, None)
    pipeline.run(load_config(None, settings | {"reward": {"max_length": 40, "train": train}}))
    out = capsys.readouterr().out
    assert "(changed: reward.max_length); recomputing" in out  # the reward model, then PPO, which reads it
    assert "(changed: reward.max_length, reward contents); recomputing" in out


def test_the_report_marks_a_tied_choice_of_layers_and_alpha_and_tabulates_timings(tmp_path):
    sweep = [
        {"layers": [2, 3], "alpha": 2.0, "val_win_rate": 0.292, "final_loss": 0.5},
        {"layers": [2, 3], "alpha": 5.0, "val_win_rate": 0.292, "final_loss": 0.9},
        {"layers": [3], "alpha": 2.0, "val_win_rate": 0.25, "final_loss": 0.4},
    ]
    runs = [_run(0, {"m": (0.5, None)}) | {"timings_s": {"sft": 12.34, "train m": 3.0}}]
    runs[0]["methods"]["m"]["selection"] = {"layers": [2, 3], "alpha": 2.0, "sweep": sweep}
    write_report(
        {"methods": ["m"], "summary": summarize(runs), "paired": paired(runs), "runs": runs, "seconds": 1}, tmp_path
    )
    report = (tmp_path / "report.md").read_text()
    assert "| m | [2, 3] | 2.0 | 0.292 **(chosen: tied, the first in the grid's order)** | 0.5000 |" in report
    assert "| m | [2, 3] | 5.0 | 0.292 | 0.9000 |" in report
    assert "| noise | seed | sft | train m | total |\n|---|---|---|---|---|\n| 0 | 0 | 12.3 | 3.0 | 15.3 |" in report

    sweep[1]["val_win_rate"] = 0.29  # no tie
    write_report(
        {"methods": ["m"], "summary": summarize(runs), "paired": paired(runs), "runs": runs, "seconds": 1}, tmp_path
    )
    assert "| m | [2, 3] | 2.0 | 0.292 **(chosen)** | 0.5000 |" in (tmp_path / "report.md").read_text()


def test_validation_prompts_overlap_evaluate_pairs_only_within_evaluate_limit(tmp_path, tiny_model_dir, pairs_file):
    """compare judges the first evaluate.limit pairs: a validation prompt further down that file is judged by no
    method, one within it is."""
    from rahf.compare import check_compare

    records = standard_records(10, seed=3)
    assert len({r["prompt"] for r in records}) == len(records)
    judged = write_jsonl(tmp_path / "judged.jsonl", records[:6])
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit")
    settings["evaluate"] = {"pairs": str(judged), "limit": 3}
    beyond = write_jsonl(tmp_path / "beyond.jsonl", [*records[6:8], records[4]])  # the 5th judged pair: not read
    check_compare(load_config(None, settings | {"compare": {"validation": str(beyond)}}))
    within = write_jsonl(tmp_path / "within.jsonl", [*records[6:8], records[2]])  # the 3rd: judged
    with pytest.raises(ConfigError) as refused:
        check_compare(load_config(None, settings | {"compare": {"validation": str(within)}}))
    assert str(refused.value).startswith(
        f"compare.validation: 1 of its 3 prompts are also in evaluate.pairs (the first: {within}:3), so layers and "
        "alpha would be chosen on the prompts the methods are judged on"
    )
    assert not (tmp_path / "out").exists()


# closes assistant turns with <unk>, not EOS (as ChatML's <|im_end|> on a base model's tokenizer)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} <unk>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# an alignment's log as the Trainer writes it: the losses of its steps, an evaluation, the run's mean loss
ALIGN_LOG = [
    {"loss": 0.5, "step": 1},
    {"loss": 0.1, "step": 2},
    {"loss": 0.25, "step": 3},
    {"eval_loss": 0.05, "step": 3},
    {"train_runtime": 0.1, "train_loss": 0.2833, "step": 3},
]


@pytest.fixture(scope="module")
def chosen_by_compare(tmp_path_factory, tiny_model_dir, pairs_file):
    """A LoRRA run on a base model with a chat template (collect, align, merge), then compare's choice of layers
    and alpha on its collect cache, the alignment's log replaced by ALIGN_LOG. Returns the run's config, the folder
    `rahf merge` wrote and compare's selection (compare's merged model is in the run's `merged/`)."""
    import shutil

    from rahf import align
    from rahf.compare import _select, candidates
    from rahf.judges import GoldJudge
    from rahf.models import load_tokenizer

    tmp = tmp_path_factory.mktemp("chat-lorra")
    model = Path(shutil.copytree(tiny_model_dir, tmp / "model"))
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    settings = run_settings(model, pairs_file, tmp / "out", "lorra", stages=["collect", "align", "merge"])
    settings["align"]["train"]["max_steps"] = 3
    cfg = load_config(None, settings)
    pipeline.run(cfg)
    merge_made = Path(shutil.move(tmp / "out" / "merged", tmp / "merge-made"))
    real = align.train_align

    def logged(mcfg, work, *args, **kwargs):
        real(mcfg, work, *args, **kwargs)
        (Path(work) / "log_history.json").write_text(json.dumps(ALIGN_LOG))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(align, "train_align", logged)
        _, selection = _select(cfg, candidates(cfg), None, GoldJudge(), "gold:None")
    return cfg, merge_made, selection


def test_compare_reports_the_last_logged_alignment_loss_of_each_candidate(chosen_by_compare, tmp_path):
    """Not the lowest loss, the evaluation's or the run's mean (train_loss): the loss the alignment ended with."""
    cfg, _, selection = chosen_by_compare
    assert [(row["layers"], row["alpha"], row["final_loss"]) for row in selection["sweep"]] == [([1, 2], 5.0, 0.25)]
    assert json.loads((Path(cfg.output_dir) / "merged" / "log_history.json").read_text()) == ALIGN_LOG
    runs = [_run(0, {"lorra": (0.5, None)})]
    runs[0]["methods"]["lorra"]["selection"] = selection
    results = {"methods": ["lorra"], "summary": summarize(runs), "paired": paired(runs), "runs": runs, "seconds": 1}
    report = write_report(results, tmp_path).read_text()
    header = "| method | layers | alpha | validation win rate | alignment loss at the end | shift reached per layer |"
    assert header in report
    assert "| lorra | [1, 2] | 5.0 | - **(chosen)** | 0.2500 |" in report


def test_compares_merged_model_lists_the_stop_tokens_rahf_merge_saves(chosen_by_compare, tokenizer):
    """Both save through `save_model`: generation stops at the chat template's end of turn as well as at EOS."""
    from transformers import GenerationConfig

    cfg, merge_made, _ = chosen_by_compare
    stops = sorted([tokenizer.eos_token_id, tokenizer.unk_token_id])
    assert GenerationConfig.from_pretrained(merge_made).eos_token_id == stops
    assert GenerationConfig.from_pretrained(Path(cfg.output_dir) / "merged").eos_token_id == stops


def test_compare_runs_the_configs_it_builds_without_checking_them_as_the_users(
    tiny_model_dir, pairs_file, tmp_path, capsys
):
    """A library call checks the user's config again when it changed; the per-method configs compare derives from it
    (other method and stages, `model` the SFT folder) are not the user's: `tokenizer`, read by sft alone, stopped
    every method after SFT had trained."""
    test = write_jsonl(tmp_path / "test.jsonl", standard_records(6, seed=77)[:4])
    train = {"per_device_train_batch_size": 8, "disable_tqdm": True, "logging_steps": 1, "max_steps": 1}
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "dpo") | {
        "tokenizer": str(tiny_model_dir),
        "stages": ["sft"],
        "sft": {"train": dict(train)},
        "dpo": {"train": dict(train)},
        "evaluate": {"pairs": str(test), "judge": "gold", "max_new_tokens": 4},
        "compare": {"methods": ["sft", "dpo"], "seeds": [0], "label_noise": [0.0]},
    }
    results = run_compare(load_config(None, settings))
    assert set(results["runs"][0]["methods"]) == {"sft", "dpo"}
    printed = capsys.readouterr().out  # the plan first, then each run as it starts
    assert "[compare] 1 run (label noise x seed), each training and judging sft, dpo\n" in printed
    assert printed.index("[compare] 1 run (") < printed.index("[compare] run 1 of 1: label noise 0, seed 0\n")

"""The built-in demo end to end, in its quick flavour."""

import json
import shutil

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


class _DemoStarted(Exception):
    """Raised in place of the demo's heavy part (`rahf compare`), once the folder check has passed."""


@pytest.fixture
def no_compare(monkeypatch):
    import rahf.compare

    def started(config):
        raise _DemoStarted

    monkeypatch.setattr(rahf.compare, "run_compare", started)


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_demo_refuses_a_folder_of_the_users_own_files(tmp_path, capsys, no_compare):
    """`rahf demo --out DIR` into a project folder once replaced its data/pairs.jsonl and deleted its base/ model."""
    from rahf.cli import main
    from rahf.errors import RahfError

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "base").mkdir()
    (proj / "data" / "pairs.jsonl").write_text('{"prompt": "my own data", "chosen": "a", "rejected": "b"}\n')
    (proj / "base" / "model.safetensors").write_bytes(b"the user's own model")
    before = _tree(proj)
    assert main(["demo", "--quick", "--out", str(proj)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"rahf: error: --out: {proj} holds files `rahf demo` did not write (base/, data/), which the demo would "
        "overwrite or delete; give an empty or new folder\n"
    )
    with pytest.raises(RahfError, match=r"did not write \(base/, data/\)"):
        run_demo(proj, quick=True)  # the library refuses it too
    assert _tree(proj) == before  # nothing written, nothing deleted


def test_demo_accepts_a_new_or_empty_folder_and_reruns_into_its_own(tmp_path, no_compare):
    from rahf.demo.run import MARKER, check_out

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "new", empty):
        check_out(folder)
        with pytest.raises(_DemoStarted):  # the check passed: the demo got as far as `rahf compare`
            run_demo(folder, quick=True)
        assert (folder / MARKER).is_file() and (folder / "data" / "pairs.jsonl").is_file()
        assert (folder / "base" / "demo_base.json").is_file()
        weights = (folder / "base" / "model.safetensors").stat().st_mtime_ns
        with pytest.raises(_DemoStarted):  # a rerun into the demo's own folder (here one interrupted) goes on
            run_demo(folder, quick=True)
        assert (folder / "base" / "model.safetensors").stat().st_mtime_ns == weights  # and reuses its model
    only_marker = tmp_path / "interrupted-at-once"
    only_marker.mkdir()
    (only_marker / MARKER).write_text("")
    (only_marker / "data").mkdir()
    check_out(only_marker)


def _earlier_demo(folder):
    """A finished demo's folder as `rahf demo` wrote it before it marked its folders."""
    from rahf.demo.run import _DEMO_DATA

    (folder / "base").mkdir(parents=True)
    (folder / "base" / "demo_base.json").write_text("{}")
    (folder / "data").mkdir()
    for name in _DEMO_DATA:
        (folder / "data" / name).write_text("{}\n")
    (folder / "noise-0" / "seed-0" / "merged").mkdir(parents=True)
    for name in ("report.md", "results.json", "compare_results.json", "compare.yaml", "win_rate.png", ".rahf.lock"):
        (folder / name).write_text("# rahf demo\n" if name == "report.md" else "")


def test_demo_accepts_a_folder_written_before_the_marker(tmp_path):
    from rahf.demo.run import check_out
    from rahf.errors import RahfError

    old = tmp_path / "old"
    _earlier_demo(old)
    check_out(old)  # the demo's stamp on its model and its report
    (old / "report.md").write_text("# my notes\n")
    check_out(old)  # the stamp alone
    (old / "report.md").write_text("# rahf demo\n")
    (old / "base" / "demo_base.json").unlink()
    with pytest.raises(RahfError, match=r"did not write \(base/\), which"):
        check_out(old)  # a model the demo did not stamp: it would be deleted to build the demo's
    shutil.rmtree(old / "base")
    check_out(old)  # the report alone


@pytest.mark.parametrize(
    ("add", "found"),
    [
        (lambda d: (d / "thesis.tex").write_text("my thesis"), "thesis.tex"),
        (lambda d: (d / "data" / "labels.jsonl").write_text("mine"), "data/labels.jsonl"),
        (lambda d: (d / "notes").mkdir(), "notes/"),
    ],
    ids=["a-file", "a-data-file", "a-folder"],
)
def test_demo_refuses_a_users_folder_beside_a_demos_report_or_stamp(tmp_path, capsys, no_compare, add, found):
    """A copy of a demo's report (or of its stamped model) in a user's folder does not make it the demo's: anything
    the demo does not write there is a user's, and the demo would overwrite data/ and delete base/."""
    from rahf.cli import main

    old = tmp_path / "old"
    _earlier_demo(old)
    add(old)
    before = _tree(old)
    assert main(["demo", "--quick", "--out", str(old)]) == 2
    assert capsys.readouterr().err == (
        f"rahf: error: --out: {old} holds files `rahf demo` did not write ({found}), which the demo would overwrite "
        "or delete; give an empty or new folder\n"
    )
    assert _tree(old) == before  # nothing written, nothing deleted

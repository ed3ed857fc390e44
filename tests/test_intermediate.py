"""The collect cache is an intermediate artifact: deleted once align is done, it is not needed while align is up to
date, and made again only when align must be recomputed (or by `rahf collect` itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_settings

from rahf import pipeline
from rahf.artifacts import MANIFEST, read_manifest
from rahf.config import RahfConfig, load_config
from rahf.errors import RahfError

STAGES = ("instruct", "collect", "align", "merge")


def without_collect(scit_run: RahfConfig, tiny_model_dir: Path, pairs_file: Path, out: Path, **extra) -> RahfConfig:
    """A copy of the finished SCIT run at `out` with its collect cache deleted, and its config there."""
    shutil.copytree(scit_run.output_dir, out)
    shutil.rmtree(out / "collect")
    return load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", **extra))


def status(cfg: RahfConfig) -> dict[str, str]:
    """`rahf status`: stage -> the rest of its line, its folder left out and its spaces single."""
    lines = (line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    return {stage: " ".join(rest.replace(str(pipeline.stage_dir(cfg, stage)), "").split()) for stage, rest in lines}


def builds(cfg: RahfConfig) -> dict[str, str]:
    return {s: read_manifest(d)["build"] for s in STAGES if ((d := pipeline.stage_dir(cfg, s)) / MANIFEST).is_file()}


def ran(text: str) -> list[str]:
    """The stages a run's output says it ran, in order."""
    return [s for line in text.splitlines() for s in STAGES if line.startswith(f"[rahf] {s}: running")]


def test_a_deleted_collect_cache_is_not_needed_while_align_is_up_to_date(
    scit_run, tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    generate = {"generate__prompts": str(pairs_file), "generate__max_new_tokens": 2}
    cfg = without_collect(scit_run, tiny_model_dir, pairs_file, tmp_path / "out", **generate)
    said = status(cfg)
    assert said["collect"] == "deleted (not needed while align is up to date)"
    assert all(said[s].startswith("fresh ") for s in ("instruct", "align", "merge"))

    pipeline.run_stage(cfg, "merge", force=True)  # `rahf merge` and `rahf generate` read no collect cache
    pipeline.run_stage(cfg, "generate", force=True)
    assert (pipeline.stage_dir(cfg, "generate") / "generations.jsonl").is_file()

    before = builds(cfg)
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_STAGES", {})  # a stage that ran would fail
        pipeline.run(cfg)
    out = capsys.readouterr().out
    collect = pipeline.stage_dir(cfg, "collect")
    assert f"[rahf] collect: {collect} deleted, not needed while align is up to date; skipping\n" in out
    assert all(f"[rahf] {s}: up to date" in out for s in ("instruct", "align", "merge"))
    assert builds(cfg) == before and not collect.exists()


def test_a_change_align_depends_on_collects_again_and_retrains_align(
    scit_run, tiny_model_dir, pairs_file, tmp_path, capsys
):
    out = tmp_path / "out"
    cfg = without_collect(scit_run, tiny_model_dir, pairs_file, out, alpha=3.0)
    said = status(cfg)
    assert said["collect"] == "missing"
    assert said["align"] == "stale (changed: alpha)" and said["merge"] == "waiting for align"

    capsys.readouterr()
    pipeline.run(cfg)
    text = capsys.readouterr().out
    assert ran(text) == ["collect", "align", "merge"] and "skipping" not in text
    assert "was made with other settings (changed: alpha, collect contents); recomputing" in text
    assert read_manifest(pipeline.stage_dir(cfg, "align"))["alpha"] == 3.0
    assert all(line.startswith("fresh ") for line in status(cfg).values())

    online = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", align__targets="online"))
    shutil.rmtree(out / "collect")  # align reads no cache: the one missing is a stage to run, as ever
    assert status(online)["collect"] == "missing"


def test_collect_run_itself_or_forced_is_made_again_and_align_is_stale(
    scit_run, tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    cfg = without_collect(scit_run, tiny_model_dir, pairs_file, tmp_path / "out")
    with monkeypatch.context() as m:  # `rahf align` stops before it loads a model
        m.setattr(pipeline, "load_policy", lambda cfg: pytest.fail("align loaded its model"))
        with pytest.raises(RahfError, match="no finished collect artifact; run `rahf collect`"):
            pipeline.run_stage(cfg, "align", force=True)
    assert status(cfg)["align"].startswith("fresh ")

    with monkeypatch.context() as m:  # `rahf run --force` recomputes every stage, collect too
        m.setattr(pipeline, "_STAGES", {})
        forced = load_config(
            None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", stages=["collect", "align"])
        )
        with pytest.raises(KeyError, match="collect"):
            pipeline.run(forced, force=True)

    capsys.readouterr()
    pipeline.run_stage(cfg, "collect", force=True)  # `rahf collect`
    assert ran(capsys.readouterr().out) == ["collect"]
    said = status(cfg)
    assert said["collect"].startswith("fresh ")
    assert said["align"] == "stale (changed: collect contents)" and said["merge"] == "waiting for align"

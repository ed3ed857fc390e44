"""A stage killed part-way resumes from its newest checkpoint (collect: after its finished shards) and ends with
the weights of a run that was never interrupted; other settings, `--force` or a finished stage leave no
checkpoint behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_settings
from safetensors.torch import load_file
from transformers import Trainer

from rahf import pipeline
from rahf.config import load_config
from rahf.training import last_checkpoint

SAVING = {"save_strategy": "steps", "save_steps": 2}


def config(tiny_model_dir, pairs_file, out, method, **extra):
    settings = run_settings(tiny_model_dir, pairs_file, out, method, **({"stages": ["instruct"]} | extra))
    settings["instruct"]["train"] |= {"max_steps": 6, **SAVING}
    settings["align"]["train"] |= {"max_steps": 6, **SAVING}
    return load_config(None, settings)


def interrupt_at(monkeypatch, call: int) -> None:
    """Make the `call`-th optimiser step of this process (counted over every Trainer) raise KeyboardInterrupt."""
    original, calls = Trainer.training_step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)


def interrupted_scit_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """A SCIT run stopped by Ctrl-C at its 5th optimiser step (its checkpoints kept): its config."""
    cfg = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit")
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg)
    return cfg


def count_steps(monkeypatch) -> list[int]:
    """A list whose one item counts the optimiser steps this process takes from now on."""
    original, calls = Trainer.training_step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)
    return calls


def weights(folder) -> dict[str, torch.Tensor]:
    files = sorted(folder.rglob("*.safetensors"))
    assert files
    return {f"{f.relative_to(folder)}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["scit", "dual"])
def test_an_interrupted_step1_resumes_and_matches_an_uninterrupted_run(
    method, tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    # Dual trains its preferred side (steps 1-6) and then the dispreferred one: stop in the middle of each method's
    # last training, after a checkpoint at step 2 or 4
    stop = {"scit": 5, "dual": 6 + 3}[method]
    cfg = config(tiny_model_dir, pairs_file, tmp_path / "run", method)
    saves = pipeline.checkpoint_folder(cfg, "instruct")
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg)
    out = capsys.readouterr().out
    assert not pipeline.stage_dir(cfg, "instruct").exists()
    kept = {"scit": ["checkpoint-4"], "dual": ["dispreferred/checkpoint-2", "preferred/checkpoint-6"]}[method]
    assert sorted(str(c.relative_to(saves)) for c, _, _ in pipeline.resume_points(saves)) == kept
    assert "running this stage again with the same settings resumes there" in out
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    resumes = {
        "scit": "checkpoint-4, step 4 of 6",
        "dual": "dispreferred/checkpoint-2, step 2 of 6; preferred/checkpoint-6, step 6 of 6",
    }[method]
    assert status["instruct"].endswith(f"(interrupted: running it again resumes from {resumes})")

    with monkeypatch.context() as m:
        steps = count_steps(m)
        pipeline.run(cfg)
    assert steps == [{"scit": 6 - 4, "dual": 6 - 2}[method]]  # only the steps after the newest checkpoints
    out = capsys.readouterr().out
    for checkpoint in kept:
        stage = "instruct" if method == "scit" else f"instruct ({checkpoint.split('/')[0]})"
        assert f"[rahf] {stage}: resuming from {saves / checkpoint}" in out
    assert not saves.exists()  # a finished stage leaves no checkpoints
    manifest = json.loads((pipeline.stage_dir(cfg, "instruct") / "rahf_manifest.json").read_text())
    assert manifest["resumed_from"] == {"scit": {"checkpoint-4": 4}, "dual": {k: int(k[-1]) for k in kept}}[method]
    assert json.loads((pipeline.stage_dir(cfg, "instruct") / "log_history.json").read_text())

    whole = config(tiny_model_dir, pairs_file, tmp_path / "whole", method)
    pipeline.run(whole)
    assert_same_weights(pipeline.stage_dir(cfg, "instruct"), pipeline.stage_dir(whole, "instruct"))


def test_an_interrupted_alignment_resumes_and_matches_an_uninterrupted_run(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    stages = ["instruct", "collect", "align"]
    cfg = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit", stages=stages)
    with monkeypatch.context() as m:
        interrupt_at(m, 6 + 3)  # instruct's 6 steps, then align's third
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg)
    assert last_checkpoint(pipeline.checkpoint_folder(cfg, "align")).name == "checkpoint-2"
    assert not pipeline.checkpoint_folder(cfg, "instruct").exists()
    with monkeypatch.context() as m:
        steps = count_steps(m)
        pipeline.run(cfg)
    assert steps == [6 - 2]
    assert "[rahf] align: resuming from" in capsys.readouterr().out

    whole = config(tiny_model_dir, pairs_file, tmp_path / "whole", "scit", stages=stages)
    pipeline.run(whole)
    assert_same_weights(pipeline.stage_dir(cfg, "align"), pipeline.stage_dir(whole, "align"))


def test_checkpoints_of_other_settings_or_with_force_are_discarded(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    cfg = interrupted_scit_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch)
    saves = pipeline.checkpoint_folder(cfg, "instruct")
    assert last_checkpoint(saves) is not None
    capsys.readouterr()

    other = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit", instruct__label_smoothing=0.1)
    with monkeypatch.context() as m:
        interrupt_at(m, 3)  # checkpoint-2 of the new settings
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(other)
    out = capsys.readouterr().out
    assert f"discarding the checkpoints in {saves} (made with other inputs or settings)" in out
    assert "resuming" not in out and last_checkpoint(saves).name == "checkpoint-2"

    with monkeypatch.context() as m:  # a stage command (always forced) resumes an interrupted run of its settings
        interrupt_at(m, 3)  # step 5, after checkpoint-4
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stage(other, "instruct", force=True)
    out = capsys.readouterr().out
    assert "[rahf] instruct: resuming from" in out and "discarding" not in out
    assert last_checkpoint(saves).name == "checkpoint-4"

    pipeline.run_stage(other, "instruct", force=True, restart=True)  # `rahf run --force`
    out = capsys.readouterr().out
    assert "(made with --force)" in out and "resuming" not in out
    assert not saves.exists()


def test_changing_only_how_often_checkpoints_are_saved_still_resumes(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    interrupted_scit_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch)
    capsys.readouterr()
    fewer = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit", instruct__train__save_steps=3)
    pipeline.run(fewer)
    assert "resuming from" in capsys.readouterr().out


def test_a_stage_without_checkpoints_makes_no_folder(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "run", "scit", stages=["instruct"])
    cfg = load_config(None, settings)  # save_strategy: no (the default)
    folder, seen = pipeline.checkpoint_folder(cfg, "instruct"), []
    original = Trainer.training_step

    def step(self, *args, **kwargs):  # not even while it trains: a killed process would leave it behind
        seen.append(folder.exists())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)
    pipeline.run(cfg)
    assert seen and not any(seen) and not folder.exists()


def test_last_checkpoint_skips_those_cut_short_or_part_deleted_and_one_without_optimizer_state(tmp_path):
    state = '{"global_step": 2, "max_steps": 6}'
    resumes = {"trainer_state.json": state, "optimizer.pt": "", "scheduler.pt": "", "rng_state.pth": ""}

    def but(name: str) -> dict[str, str]:
        return {k: v for k, v in resumes.items() if k != name}

    def sharded(*shards: str) -> dict[str, str]:
        return {"model.safetensors.index.json": json.dumps({"weight_map": {s: s for s in shards}})}

    weights = {"model.safetensors": ""}
    for step, files in (
        (2, resumes | weights),
        (4, resumes | {"adapter_model.safetensors": ""}),  # a LoRA's
        (6, resumes | sharded("m-1.safetensors") | {"m-1.safetensors": ""}),
        (8, but("rng_state.pth") | {"rng_state_0.pth": "", "rng_state_1.pth": ""} | weights),  # two processes'
        (10, {"optimizer.pt": ""} | weights),  # killed before its trainer state was written
        (12, {"trainer_state.json": state} | weights),  # save_only_model
        (14, resumes | {"trainer_state.json": '{"glob'} | weights),  # killed while writing its trainer state
        # deleted part-way (Ctrl-C while the checkpoints are discarded): weights, a shard, the schedule or rng gone
        (16, resumes),
        (18, resumes | sharded("m-1.safetensors", "m-2.safetensors") | {"m-1.safetensors": ""}),
        (20, but("scheduler.pt") | weights),
        (22, but("rng_state.pth") | weights),
    ):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    for step in (8, 6, 4):
        shutil.rmtree(tmp_path / f"checkpoint-{step}")
        assert last_checkpoint(tmp_path) == tmp_path / f"checkpoint-{step - 2}"
    assert last_checkpoint(tmp_path / "nothing") is None


def test_discarding_checkpoints_is_safe_against_an_interruption(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while `rahf run --force` deletes an interrupted run's checkpoints, right after a weights file went:
    the folder was renamed aside first, so no checkpoint short of its weights is left to resume from, and the next
    run trains from the start and removes what the deletion left."""
    import os

    cfg = interrupted_scit_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch)
    saves = pipeline.checkpoint_folder(cfg, "instruct")
    assert last_checkpoint(saves).name == "checkpoint-4"
    unlink = os.unlink

    def interrupted(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if str(path).endswith("model.safetensors"):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg, force=True)
    assert not saves.exists()
    assert "interrupted" not in pipeline.describe(cfg)
    capsys.readouterr()
    with monkeypatch.context() as m:
        steps = count_steps(m)
        pipeline.run(cfg)
    assert steps == [6] and "resuming" not in capsys.readouterr().out
    assert not saves.exists() and not list(saves.parent.glob(f".{saves.name}*"))


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_trl_baselines_resume_too(stage, tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    """DPO (a LoRA that TRL builds from a peft_config) and the reward model (a new score head) resume as well."""

    def cfg_in(out):
        train = {"max_steps": 4, "per_device_train_batch_size": 4, "disable_tqdm": True, **SAVING}
        if stage == "dpo":
            settings = run_settings(tiny_model_dir, pairs_file, out, "dpo", stages=["instruct"], dpo__train=train)
            settings["dpo"]["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.0}
        else:
            settings = run_settings(tiny_model_dir, pairs_file, out, "scit", stages=["reward"], reward__train=train)
        return load_config(None, settings)

    folder = "instruct" if stage == "dpo" else "reward"
    cfg = cfg_in(tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg)
    with monkeypatch.context() as m:
        steps = count_steps(m)
        pipeline.run(cfg)
    assert steps == [4 - 2] and f"[rahf] {folder}: resuming from" in capsys.readouterr().out
    whole = cfg_in(tmp_path / "whole")
    pipeline.run(whole)
    assert_same_weights(pipeline.stage_dir(cfg, folder), pipeline.stage_dir(whole, folder))


def interrupt_reader_at(monkeypatch, call: int) -> list[int]:
    """Make the `call`-th batch collect reads raise KeyboardInterrupt (0: never); returns the count of batches read."""
    from rahf.collect import TargetReader

    original, calls = TargetReader.__call__, [0]

    def read(self, batch):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(TargetReader, "__call__", read)
    return calls


def test_an_interrupted_collect_keeps_its_finished_shards_and_matches_an_uninterrupted_run(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    shards = {"collect__shard_size": 4, "collect__batch_size": 2}  # 2 batches a shard
    cfg = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit", stages=["instruct", "collect"], **shards)
    saves = pipeline.checkpoint_folder(cfg, "collect")
    pipeline.run_stage(cfg, "instruct")
    with monkeypatch.context() as m:
        interrupt_reader_at(m, 6)  # in the third shard
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stage(cfg, "collect")
    out = capsys.readouterr().out
    assert not pipeline.stage_dir(cfg, "collect").exists()
    assert sorted(p.name for p in saves.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert f"kept 2 finished shards in {saves}" in out
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert status["collect"].endswith("(interrupted: running it again resumes from 2 finished shards)")

    (saves / "shard-00001.safetensors").write_bytes(b"cut short")  # not a shard: computed again
    # the right number of sequences, but not those planned for it (another cut of the data): computed again too
    shutil.copy(saves / "shard-00000.safetensors", saves / "shard-00002.safetensors")
    with monkeypatch.context() as m:
        calls = interrupt_reader_at(m, 0)
        pipeline.run(cfg)
    total = json.loads((pipeline.stage_dir(cfg, "collect") / "rahf_manifest.json").read_text())
    assert calls[0] == total["n_sequences"] // 2 - 2  # shard 0's two batches were not read again
    assert f"collect: keeping 1 of 4 shards an interrupted run left in {saves}" in capsys.readouterr().out
    assert total["resumed_from"] == {"shards": 3} and not saves.exists()

    whole = config(tiny_model_dir, pairs_file, tmp_path / "whole", "scit", stages=["instruct", "collect"], **shards)
    pipeline.run(whole)
    assert_same_weights(pipeline.stage_dir(cfg, "collect"), pipeline.stage_dir(whole, "collect"))
    again = json.loads((pipeline.stage_dir(whole, "collect") / "rahf_manifest.json").read_text())
    assert again["shards"] == total["shards"] and again["n_tokens"] == total["n_tokens"]
    for layer, stats in again["per_layer"].items():
        assert stats == pytest.approx(total["per_layer"][layer], rel=1e-9)

    # other settings discard the shards of an interrupted run
    settings = {"stages": ["instruct", "collect"], **shards}
    other = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit", window=3, **settings)
    with monkeypatch.context() as m:
        interrupt_reader_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stage(other, "collect")
    assert len(list(saves.glob("shard-*"))) == 1
    capsys.readouterr()
    pipeline.run_stage(config(tiny_model_dir, pairs_file, tmp_path / "run", "scit", window=5, **settings), "collect")
    out = capsys.readouterr().out
    assert f"discarding the checkpoints in {saves} (made with other inputs or settings)" in out
    assert "keeping" not in out and not saves.exists()

    # shards that another number of processes cut are discarded too
    with monkeypatch.context() as m:
        interrupt_reader_at(m, 6)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stage(cfg, "collect")
    tag = json.loads((saves / pipeline.CHECKPOINT_TAG).read_text())
    assert tag["processes"] == 1
    (saves / pipeline.CHECKPOINT_TAG).write_text(json.dumps(tag | {"processes": 2}))
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert status["collect"].endswith("(interrupted: running it again as 2 processes resumes from 2 finished shards)")
    capsys.readouterr()
    pipeline.run_stage(cfg, "collect")
    out = capsys.readouterr().out
    assert f"discarding the checkpoints in {saves} (made with 2 processes, and this run has 1)" in out
    assert "keeping" not in out


def _tagged(saves, tag: str) -> None:
    """A checkpoint folder as an interrupted run leaves it: the Trainer's checkpoint and model card, and a tag."""
    (saves / "checkpoint-2").mkdir(parents=True)
    (saves / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "max_steps": 6}')
    (saves / "README.md").write_text("TRL's model card")
    (saves / pipeline.CHECKPOINT_TAG).write_text(tag)


@pytest.mark.parametrize(
    ("tag", "added", "found"),
    [
        ('{"stage": "instruct", "fingerprint": "x", "processes": 1}', "notes.md", "notes.md"),
        ('{"stage": "instruct", "fingerprint": "x", "processes": 1}', "experiments/", "experiments/"),
        ("{}", None, "README.md, rahf-checkpoints.json, ..."),  # a tag rahf did not write
    ],
    ids=["file-added", "folder-added", "tag-not-rahfs"],
)
def test_a_checkpoint_folder_holding_what_no_trainer_wrote_stops_the_stage(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, tag, added, found
):
    """`discard` would delete the whole folder (other settings, --force): a user's file beside the checkpoints, or a
    folder whose tag rahf did not write, stops the run before anything trains, and nothing in it is touched."""
    from rahf.errors import ConfigError

    monkeypatch.setitem(pipeline._STAGES, "instruct", lambda cfg, tmp: pytest.fail("a stage started"))
    cfg = config(tiny_model_dir, pairs_file, tmp_path / "run", "scit")
    saves = pipeline.checkpoint_folder(cfg, "instruct")
    _tagged(saves, tag)
    if added:
        (saves / added).mkdir() if added.endswith("/") else (saves / added).write_text("mine")
    before = sorted(p.relative_to(saves).as_posix() for p in saves.rglob("*"))
    for run in (lambda: pipeline.run(cfg, force=True), lambda: pipeline.run_stage(cfg, "instruct")):
        with pytest.raises(ConfigError) as caught:
            run()
        fix = "move it out of output_dir or choose another output_dir"
        if added:
            assert str(caught.value) == (
                f"output_dir: {saves} holds files rahf did not write ({found}), where the instruct stage writes its "
                f"checkpoints; {fix}"
            )
        else:  # a tag of rahf's name it cannot read as its own
            assert str(caught.value) == (
                f"output_dir: {saves} holds a rahf-checkpoints.json rahf cannot read as its own (damaged, or "
                f"another's), so it cannot tell its files ({found}) from a user's, where the instruct stage writes its "
                f"checkpoints; delete the folder if rahf wrote it (the stage then runs again), else {fix}"
            )
    assert sorted(p.relative_to(saves).as_posix() for p in saves.rglob("*")) == before


def test_what_the_trainers_write_in_a_checkpoint_folder_is_rahfs():
    """A tagged checkpoint folder is replaced whole when its run is not resumed: what the stages' trainers write
    there is rahf's, so an interrupted run of any of them leaves a folder a later run may discard."""
    from rahf.preflight import CHECKPOINT_ENTRIES

    written = ["checkpoint-4", ".checkpoint-6.123-456.tmp", ".checkpoint-2.discarded-123-456", "README.md"]
    written += ["preferred", "dispreferred", "shard-00001.safetensors", "shard-00002.safetensors.part", "eval"]
    assert all(CHECKPOINT_ENTRIES.fullmatch(name) for name in written)
    others = ["notes.md", "runs", "checkpoints.txt", "shard-1.bin", "preferred.md", "evaluation"]
    assert not any(CHECKPOINT_ENTRIES.fullmatch(name) for name in others)

"""Artifact folders: what a folder holding a manifest fingerprints to, unreadable inputs, and interrupts while an
artifact is swapped into place."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from rahf import artifacts, pipeline
from rahf.artifacts import MANIFEST, artifact_identity, atomic_dir, fingerprint_path, read_manifest
from rahf.cli import main
from rahf.errors import DataError


def make_artifact(folder: Path, fp: str = "fp") -> Path:
    """A finished artifact of a few tiny files, as a model folder from another run looks."""
    with atomic_dir(folder, "merge", fp, {}) as tmp:
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "tokenizer_config.json").write_text('{"model_max_length": 64}')
        (tmp / "model.safetensors").write_bytes(b"\x01" * 256)
    return folder


def test_an_untouched_artifact_is_fingerprinted_by_its_identity(tmp_path):
    folder = make_artifact(tmp_path / "merged")
    first = fingerprint_path(folder)
    assert first == artifact_identity(folder)
    make_artifact(folder)  # rebuilt from the same inputs (--force): what is built on it becomes stale
    assert fingerprint_path(folder) == artifact_identity(folder) != first


@pytest.mark.parametrize(
    "change",
    [
        lambda f: (f / "tokenizer_config.json").write_text('{"model_max_length": 77}'),
        lambda f: (f / "model.safetensors").write_bytes(b"\x02" * 256),  # other weights of the same size
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / "tokenizer.model").write_bytes(b"spm"),  # a file a loader would now read too
        lambda f: (f / "sub").mkdir() or (f / "sub" / "x.json").write_text("{}"),
    ],
    ids=["edited", "weights-replaced", "file-lost", "file-added", "nested-file-added"],
)
def test_a_changed_artifact_folder_is_fingerprinted_by_its_content(tmp_path, change):
    folder = make_artifact(tmp_path / "merged")
    identity = fingerprint_path(folder)
    change(folder)
    changed = fingerprint_path(folder)
    assert changed != identity
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 99}')
    assert fingerprint_path(folder) != changed  # by content: any further edit shows


def _browse_and_download(folder: Path) -> None:
    """What a file browser and `huggingface-cli download --local-dir` add to a model folder."""
    (folder / ".DS_Store").write_bytes(b"Bud1")
    (folder / "._config.json").write_bytes(b"\x00\x05")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (folder / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("abc\n1764150000.0\n")


def test_files_a_browser_or_a_download_adds_leave_a_folders_fingerprint_alone(tmp_path):
    artifact = make_artifact(tmp_path / "merged")
    identity = fingerprint_path(artifact)
    _browse_and_download(artifact)
    assert fingerprint_path(artifact) == identity  # still its identity: nothing built on it goes stale
    plain = tmp_path / "model"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    by_content = fingerprint_path(plain)
    _browse_and_download(plain)
    assert fingerprint_path(plain) == by_content
    (plain / "sub").mkdir()
    (plain / "sub" / "._x").write_bytes(b"\x00")
    (plain / ".cache" / "other.json").write_text("{}")  # not a download record: content
    assert fingerprint_path(plain) != by_content


@pytest.mark.parametrize("text", ['{"fingerprint": "fp", "bu', "{}", "[]", '{"fingerprint": "fp", "files": 3}'])
def test_a_folder_with_a_damaged_manifest_is_fingerprinted_by_its_content(tmp_path, text):
    folder = make_artifact(tmp_path / "model")
    (folder / MANIFEST).write_text(text)
    first = fingerprint_path(folder)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    assert fingerprint_path(folder) != first


def unreadable(monkeypatch, path: Path) -> None:
    """Make `path` refuse to be opened, as a file of another user without read permission does (even for root)."""
    real = Path.open

    def open_(self, *args, **kwargs):
        if self.resolve() == path.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


@pytest.mark.parametrize("where", ["data file", "model folder", "artifact folder"])
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch, where):
    if where == "data file":
        target = path = tmp_path / "pairs.jsonl"
        path.write_text('{"prompt": "a"}\n')
    else:
        path = make_artifact(tmp_path / "model")
        if where == "model folder":
            (path / MANIFEST).unlink()
        target = path / "tokenizer_config.json"
    unreadable(monkeypatch, target)
    with pytest.raises(DataError, match=rf"^cannot read {re.escape(str(target))}: Permission denied$"):
        fingerprint_path(path)


def test_rahf_status_with_an_unreadable_data_file_exits_2(tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys):
    data = Path(shutil.copy(pairs_file, tmp_path / "secret.jsonl"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {data}\noutput_dir: {tmp_path / 'out'}\n")
    unreadable(monkeypatch, data)
    assert main(["status", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == f"rahf: error: cannot read {data}: Permission denied"


def interrupt_rename(monkeypatch, to: str, after: bool) -> None:
    """Ctrl-C at the first rename of a folder to a name starting with `to`: before it happens, or just after."""
    real = Path.rename

    def rename(self, target):
        if not Path(target).name.startswith(to):
            return real(self, target)
        monkeypatch.setattr(Path, "rename", real)
        if after:
            real(self, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", rename)


def interrupt_removal(monkeypatch, name: str) -> None:
    """Ctrl-C as the folder `name` starts to be removed (once)."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(name):
            monkeypatch.setattr(artifacts.shutil, "rmtree", real)
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(artifacts.shutil, "rmtree", rmtree)


@pytest.mark.parametrize(
    ("interrupt", "kept"),
    [
        (lambda mp: interrupt_rename(mp, ".merged.old-", after=True), "previous"),  # moved aside, nothing in place
        (lambda mp: interrupt_rename(mp, "merged", after=False), "previous"),
        (lambda mp: interrupt_rename(mp, "merged", after=True), "new"),
        (lambda mp: interrupt_removal(mp, ".merged.old-"), "new"),
    ],
    ids=["after-moving-aside", "before-moving-in", "after-moving-in", "removing-replaced"],
)
def test_ctrl_c_while_swapping_in_an_artifact_keeps_a_finished_one(tmp_path, monkeypatch, interrupt, kept):
    folder = make_artifact(tmp_path / "merged", "previous")
    artifacts.ABANDONED.clear()
    interrupt(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        make_artifact(folder, "new")
    assert read_manifest(folder)["fingerprint"] == kept and artifacts.files_intact(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary or replaced copy left
    assert artifacts.ABANDONED == ([folder] if kept == "previous" else [])  # what the CLI calls half-written


@pytest.mark.parametrize(
    ("interrupt", "said", "kept"),
    [
        (
            lambda mp: interrupt_rename(mp, "sft", after=False),
            "the new {out}/sft (half-written) was removed, the earlier one kept",
            "previous",
        ),
        (lambda mp: interrupt_removal(mp, ".sft.old-"), "nothing half-written was left", "new"),
    ],
    ids=["before-moving-in", "removing-replaced"],
)
def test_ctrl_c_while_replacing_a_stage_says_what_is_left(
    tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys, interrupt, said, kept
):
    def stage(cfg, tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setitem(pipeline._STAGES, "sft", stage)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\nmethod: sft\nstages: [sft]\n"
    )
    assert main(["sft", str(cfg)]) == 0
    first = read_manifest(out / "sft")["build"]
    capsys.readouterr()
    interrupt(monkeypatch)
    assert main(["sft", str(cfg)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"rahf: interrupted; {said.format(out=out)}, finished stages are kept"
    assert sorted(p.name for p in out.iterdir()) == [".rahf.lock", "sft"]
    assert (read_manifest(out / "sft")["build"] == first) == (kept == "previous")
    assert main(["status", str(cfg)]) == 0 and " fresh " in capsys.readouterr().out


def _user_folder(folder: Path) -> dict[str, str]:
    """A folder of the user's own at a stage's place: files rahf did not write, one nested."""
    (folder / "sub").mkdir(parents=True)
    (folder / "my-labels.jsonl").write_text("three weeks of hand-labelled replies\n")
    (folder / "sub" / "notes.md").write_text("mine\n")
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_atomic_dir_refuses_to_replace_a_folder_rahf_did_not_write(tmp_path):
    from rahf.errors import ConfigError

    folder = tmp_path / "merged"
    before = _user_folder(folder)
    ran = []
    with pytest.raises(ConfigError) as caught, atomic_dir(folder, "merge", "fp", {}) as tmp:
        ran.append(tmp)  # not reached: refused before the stage runs
    assert str(caught.value) == (
        f"output_dir: {folder} holds files rahf did not write (my-labels.jsonl, sub/notes.md), where the merge stage "
        "writes its artifact; move it out of output_dir or choose another output_dir"
    )
    assert ran == []
    assert {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder, nothing else made
    (tmp_path / "generations").write_text("a file of the user's where a stage writes its folder")
    with (
        pytest.raises(ConfigError, match=r"generations is a file rahf did not write, where the generate stage"),
        atomic_dir(tmp_path / "generations", "generate", "fp", {}),
    ):
        pass
    assert (tmp_path / "generations").read_text().startswith("a file of the user's")


def test_atomic_dir_keeps_a_users_folder_made_while_the_stage_ran(tmp_path):
    from rahf.errors import ConfigError

    folder = tmp_path / "merged"
    artifacts.ABANDONED.clear()
    with (
        pytest.raises(ConfigError, match=r"merged holds files rahf did not write \(my-labels.jsonl, sub/notes.md\)"),
        atomic_dir(folder, "merge", "fp", {}) as tmp,
    ):
        (tmp / "model.safetensors").write_bytes(b"\x01" * 16)
        before = _user_folder(folder)
    assert {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the new folder dropped, no replaced copy
    assert artifacts.ABANDONED == [folder]


def _browsed_only(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / ".DS_Store").write_bytes(b"Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf")


@pytest.mark.parametrize("make", [Path.mkdir, _browsed_only], ids=["empty", "browser-files-only"])
def test_an_empty_folder_or_one_of_a_browsers_files_is_replaced(tmp_path, make):
    folder = tmp_path / "merged"
    make(folder)
    assert artifacts.foreign_files(folder) == []  # not a user's: nothing to refuse
    make_artifact(folder, "new")
    assert read_manifest(folder)["fingerprint"] == "new" and artifacts.files_intact(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def _marker_as(text: str | None, marker: str = MANIFEST):
    """A user's folder (a labels file) holding a file named as rahf's `marker`: `text`, a folder (None), or a link to
    a manifest rahf wrote ("link")."""

    def make(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "labels.jsonl").write_text("three weeks of hand-labelled replies\n")
        if text == "link":
            (folder / marker).symlink_to(make_artifact(folder.parent / "elsewhere") / MANIFEST)
        elif text is None:
            (folder / marker).mkdir()
        else:
            (folder / marker).write_text(text)

    return make


def _emptied(folder: Path) -> None:
    (folder / "experiments" / "round2").mkdir(parents=True)
    (folder / "experiments" / ".DS_Store").write_bytes(b"Bud1")


def _apple_double(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "._labels").write_bytes(b"\x00\x05")  # the name of a browser's record, but of no file beside it


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (_marker_as("{}"), "labels.jsonl, rahf_manifest.json"),
        (_marker_as('{"stage": "merge", "fingerprint": "fp", "bu'), "labels.jsonl, rahf_manifest.json"),
        (_marker_as('{"stage": "merge", "fingerprint": 3, "files": {}}'), "labels.jsonl, rahf_manifest.json"),
        (_marker_as(None), "labels.jsonl, rahf_manifest.json/"),
        (_marker_as("link"), "labels.jsonl, rahf_manifest.json"),
        (_emptied, "experiments/round2/"),
        (_apple_double, "._labels"),
    ],
    ids=["manifest-{}", "manifest-unreadable", "manifest-not-rahfs", "manifest-a-folder", "manifest-a-link",
         "empty-sub-folders", "apple-double-alone"],
)  # fmt: skip
def test_a_folder_is_not_rahfs_for_a_file_named_as_its_manifest_nor_empty_with_sub_folders(tmp_path, make, found):
    """Only a manifest rahf wrote (a file holding its stage, fingerprint and files) makes a folder rahf's; a user's
    folder of empty sub-folders, or a file named as a browser's record of another, is the user's to keep."""
    from rahf.errors import ConfigError

    folder = tmp_path / "generations"
    make(folder)
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    with pytest.raises(ConfigError) as caught, atomic_dir(folder, "generate", "fp", {}):
        pass
    fix = "move it out of output_dir or choose another output_dir"
    if "rahf_manifest.json" in found:  # a file of rahf's name that is not rahf's: maybe its own, damaged
        assert str(caught.value) == (
            f"output_dir: {folder} holds a rahf_manifest.json rahf cannot read as its own (damaged, or another's), "
            f"so it cannot tell its files ({found}) from a user's, where the generate stage writes its artifact; "
            f"delete the folder if rahf wrote it (the stage then runs again), else {fix}"
        )
    else:
        assert str(caught.value) == (
            f"output_dir: {folder} holds files rahf did not write ({found}), where the generate stage writes its "
            f"artifact; {fix}"
        )
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before


def test_an_artifact_of_an_earlier_rahf_that_listed_no_files_is_named_as_such(tmp_path):
    """Manifests written before they listed their files: such a folder is kept, with the reason and the fix."""
    from rahf.errors import ConfigError

    folder = make_artifact(tmp_path / "merged")
    manifest = read_manifest(folder)
    del manifest["files"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as caught:
        make_artifact(folder, "new")
    assert str(caught.value).startswith(
        f"output_dir: {folder} was written by an earlier rahf, whose manifest lists no files, so rahf cannot tell its "
        "files ("
    )
    assert str(caught.value).endswith(
        "where the merge stage writes its artifact; delete the folder if it holds nothing of yours (the stage then "
        "runs again), else move it out of output_dir or choose another output_dir"
    )
    assert read_manifest(folder)["fingerprint"] == "fp"


def test_a_file_added_to_a_finished_artifact_makes_it_the_users(tmp_path):
    """A model card added to a finished merged/ before pushing it, notes in a sub-folder: the folder's manifest lists
    every file rahf wrote, so they show, and the artifact is never replaced with them in it."""
    from rahf.errors import ConfigError

    folder = make_artifact(tmp_path / "merged")
    _browse_and_download(folder)  # a browser's files (`._config.json` beside config.json) are no one's
    shutil.rmtree(folder / ".cache")
    assert artifacts.foreign_files(folder) == []
    (folder / "README.md").write_text("---\nlicense: mit\n---\nmy model card\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "eval.md").write_text("mine\n")
    (folder / "scratch").mkdir()
    assert artifacts.foreign_files(folder) == ["README.md", "notes/eval.md", "scratch/"]
    with pytest.raises(ConfigError) as caught:
        make_artifact(folder, "new")
    assert str(caught.value) == (
        f"output_dir: {folder} holds files rahf did not write (README.md, notes/eval.md, ...), where the merge stage "
        "writes its artifact; move it out of output_dir or choose another output_dir"
    )
    assert read_manifest(folder)["fingerprint"] == "fp" and (folder / "README.md").read_text().endswith("card\n")


def _sft_config(tmp_path: Path, model: Path, pairs: Path, **keys: str) -> Path:
    """A config of one sft stage (replaced by a stage that writes a weights file) into tmp_path/out."""
    extra = "".join(f"{k}: {v}\n" for k, v in keys.items())
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {model}\ndata:\n  path: {pairs}\noutput_dir: {tmp_path / 'out'}\nmethod: sft\nstages: [sft]\n{extra}"
    )
    return config


def test_a_run_stops_before_training_at_a_file_added_to_a_finished_stage(
    tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys
):
    ran = []

    def stage(cfg, tmp: Path) -> None:
        ran.append(tmp)
        (tmp / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setitem(pipeline._STAGES, "sft", stage)
    config, out = _sft_config(tmp_path, tiny_model_dir, pairs_file), tmp_path / "out"
    assert main(["run", str(config)]) == 0 and len(ran) == 1
    (out / "sft" / "README.md").write_text("my model card\n")
    capsys.readouterr()
    assert main(["status", str(config)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"sft       foreign              {out / 'sft'} (holds files rahf did not write: README.md; a run stops here: "
        "move it out of output_dir)"
    )
    for command in (["run", str(config), "--force"], ["sft", str(config)]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == (
            f"rahf: error: output_dir: {out / 'sft'} holds files rahf did not write (README.md), where the sft stage "
            "writes its artifact; move it out of output_dir or choose another output_dir"
        )
    assert len(ran) == 1 and (out / "sft" / "README.md").read_text() == "my model card\n"
    (out / "sft" / "README.md").unlink()
    assert main(["run", str(config)]) == 0 and len(ran) == 1  # rahf's own folder again: up to date
    assert "[rahf] sft: up to date" in capsys.readouterr().out


def test_output_dir_inside_a_data_folder_is_refused_before_anything_trains(
    tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys
):
    """A `datasets.save_to_disk` folder as data.path, the run written into it: each run would fingerprint its own
    artifacts as data, find them changed and train again, never to finish."""
    import json

    import datasets

    monkeypatch.setitem(pipeline._STAGES, "sft", lambda cfg, tmp: pytest.fail("a stage started"))
    data = tmp_path / "ds"
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(data))
    capsys.readouterr()
    for out in (data, data / "runs" / "a"):
        config = _sft_config(tmp_path, tiny_model_dir, data)
        config.write_text(config.read_text().replace(str(tmp_path / "out"), str(out)))
        assert main(["run", str(config)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"rahf: error: output_dir: {out} lies inside data.path ({data}), so the run's artifacts would change "
            "that data under it; write the run elsewhere"
        )
        assert not (data / ".rahf.lock").exists() and not (data / "runs").exists()


def _instruct_with_a_model(out: Path, model: Path) -> Path:
    """A finished instruct artifact holding a whole model, and another in its base/ sub-folder."""
    with atomic_dir(out / "instruct", "instruct", "fp", {}) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
        shutil.copytree(model, tmp / "base")
    return out / "instruct"


@pytest.mark.parametrize("inside", [False, True], ids=["the-stage-folder", "inside-it"])
def test_a_model_in_a_folder_the_run_writes_is_refused(
    tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys, inside
):
    """Last run's step-1 model as the new base, `model: OUT/instruct`: instruct would train from it and replace it, so
    the model the config names would be gone and every rerun would train on the last one's result."""
    monkeypatch.setitem(pipeline._STAGES, "instruct", lambda cfg, tmp: pytest.fail("a stage started"))
    out = tmp_path / "out"
    instruct = _instruct_with_a_model(out, tiny_model_dir)
    model = instruct / "base" if inside else instruct
    before = read_manifest(instruct)["build"]
    config = _sft_config(tmp_path, model, pairs_file)
    config.write_text(config.read_text().replace("method: sft\nstages: [sft]", "method: scit\nstages: [instruct]"))
    where = f"lies inside {instruct}, which" if inside else "is the folder"
    for command in ("run", "instruct"):
        assert main([command, str(config)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"rahf: error: model: {model} {where} the instruct stage of this run writes; copy it elsewhere or use "
            "another output_dir"
        )
    assert read_manifest(instruct)["build"] == before and (instruct / "base" / "config.json").is_file()


def test_leftovers_under_the_lock_are_a_dead_runs_whatever_their_pid(tmp_path, capsys):
    """In a container rahf gets the same small pid on every start, and a pid may be given to another process: under
    the output folder's lock, no other rahf run writes there, so a temporary or replaced copy that this process is
    not writing is a dead run's, even when its pid is alive (1, here, and this process's own)."""
    final = tmp_path / "collect"
    with atomic_dir(final, "collect", "first", {}) as tmp:
        (tmp / "a.txt").write_text("first")
    final.rename(tmp_path / ".collect.old-1-5")  # killed between the two renames
    (tmp_path / f".collect.tmp-{os.getpid()}-6").mkdir()  # the new one, half-written
    artifacts.restore_replaced(final)
    assert not final.exists() and len(list(tmp_path.iterdir())) == 2  # without the lock: pids alive, kept
    capsys.readouterr()
    with artifacts.output_lock(tmp_path):
        artifacts.restore_replaced(final)
        assert read_manifest(final)["fingerprint"] == "first" and (final / "a.txt").read_text() == "first"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".rahf.lock", "collect"]
        with atomic_dir(final, "collect", "second", {}) as tmp:
            artifacts.restore_replaced(final)  # this process's own copy in the making is kept
            assert tmp.is_dir()
            (tmp / "a.txt").write_text("second")
    assert read_manifest(final)["fingerprint"] == "second"
    assert capsys.readouterr().out == (
        f"[rahf] restored {final}, which an interrupted run had moved aside to replace it\n"
        f"[rahf] removing {tmp_path / f'.collect.tmp-{os.getpid()}-6'}, left by an interrupted run\n"
    )


def test_a_stage_folder_that_is_a_link_is_refused_and_never_removed(tmp_path, capsys):
    """`generations -> ../mine`: rahf writes a stage's folder whole, so it refuses a link there, naming its target,
    and removes a link left aside (by an earlier version) as a link, never what it points to."""
    from rahf.errors import ConfigError

    mine = tmp_path / "mine"
    mine.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "generations").symlink_to("../mine")
    assert artifacts.foreign_files(out / "generations") == ["generations (a symbolic link to ../mine)"]
    with pytest.raises(ConfigError) as caught, atomic_dir(out / "generations", "generate", "fp", {}):
        pass
    assert str(caught.value) == (
        f"output_dir: {out / 'generations'} is a symbolic link to ../mine, where the generate stage writes its "
        "artifact as a folder of its own; remove the link (what it points to is kept) or choose another output_dir"
    )
    assert (out / "generations").is_symlink() and sorted(p.name for p in out.iterdir()) == ["generations"]
    (out / "generations").unlink()
    (mine / "labels.jsonl").write_text("mine\n")
    with atomic_dir(out / "generations", "generate", "fp", {}):
        pass
    (out / ".generations.old-999999999-2").symlink_to("../mine")
    capsys.readouterr()
    artifacts.restore_replaced(out / "generations")
    artifacts.restore_replaced(out / "generations")
    assert capsys.readouterr().out.count("left by an interrupted run") == 1
    assert sorted(p.name for p in out.iterdir()) == ["generations"] and (mine / "labels.jsonl").is_file()


def test_a_hub_that_cannot_be_reached_is_said_once_with_how_to_skip_the_retries(monkeypatch, capsys):
    """No network and HF_HUB_OFFLINE unset: every file transformers looks up is retried before the cache serves it;
    the first lookup that cannot connect says so once, and a refusal by the Hub (an unknown id) says nothing."""
    import huggingface_hub
    from huggingface_hub import constants

    from rahf import artifacts

    class ConnectError(Exception):  # httpx's name for a failed connection
        pass

    def unreachable(repo_id, revision=None, timeout=None):
        try:
            raise ConnectError("[Errno -3] Temporary failure in name resolution")
        except ConnectError as e:
            raise RuntimeError("cannot reach huggingface.co") from e

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(artifacts, "_SAID_UNREACHABLE", [])
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: (_ for _ in ()).throw(ValueError("404")))
    assert artifacts.hub_commit("org/m") is None
    assert "HF_HUB_OFFLINE" not in capsys.readouterr().out
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert artifacts.hub_commit("org/m") is None and artifacts.hub_commit("org/n") is None
    out = capsys.readouterr().out
    assert out.count("set HF_HUB_OFFLINE=1 to skip them") == 1, out


def test_a_folder_whose_marker_is_being_written_is_rahfs(tmp_path):
    """rahf makes a checkpoint folder, then writes its tag through a temp file: another process (a launch's other
    ranks, `rahf status`) looking in between sees rahf's folder, not a user's."""
    from rahf.artifacts import foreign_files, write_text_atomic
    from rahf.preflight import CHECKPOINT_ENTRIES

    folder = tmp_path / "instruct.checkpoints"
    folder.mkdir()
    (folder / f".rahf-checkpoints.json.{os.getpid()}-1764180000000000000.tmp").write_text("{")
    assert foreign_files(folder, "rahf-checkpoints.json", entries=CHECKPOINT_ENTRIES) == []
    (folder / "notes.txt").write_text("mine")
    assert foreign_files(folder, "rahf-checkpoints.json", entries=CHECKPOINT_ENTRIES) == ["notes.txt"]
    write_text_atomic(folder / "rahf-checkpoints.json", '{"stage": "instruct", "fingerprint": "fp"}')
    assert foreign_files(folder, "rahf-checkpoints.json", entries=CHECKPOINT_ENTRIES) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    assert foreign_files(folder, "rahf-checkpoints.json", entries=CHECKPOINT_ENTRIES) == []

"""Artifact folders: what a folder holding a manifest fingerprints to, unreadable inputs, and interrupts while an
artifact is swapped into place."""

from __future__ import annotations

import errno
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
    (folder / "empty").mkdir(parents=True)
    (folder / ".DS_Store").write_bytes(b"Bud1")


def _manifest_as(text: str | None):
    """rahf's artifact with its manifest damaged: `text` written over it, or a folder in its place (None)."""

    def make(folder: Path) -> None:
        make_artifact(folder, "old")
        (folder / MANIFEST).unlink()
        (folder / MANIFEST).mkdir() if text is None else (folder / MANIFEST).write_text(text)

    return make


@pytest.mark.parametrize(
    "make",
    [Path.mkdir, _browsed_only, _manifest_as('{"fingerprint": "fp", "bu'), _manifest_as("[]"), _manifest_as(None)],
    ids=["empty", "browser-files-only", "manifest-unreadable", "manifest-not-an-object", "manifest-a-folder"],
)
def test_an_empty_folder_or_rahfs_own_with_a_damaged_manifest_is_replaced(tmp_path, make):
    folder = tmp_path / "merged"
    make(folder)
    assert artifacts.foreign_files(folder) == []  # not a user's: nothing to refuse
    make_artifact(folder, "new")
    assert read_manifest(folder)["fingerprint"] == "new" and artifacts.files_intact(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


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

    folder = tmp_path / "instruct.checkpoints"
    folder.mkdir()
    (folder / f".rahf-checkpoints.json.{os.getpid()}-1764180000000000000.tmp").write_text("{")
    assert foreign_files(folder, "rahf-checkpoints.json") == []
    (folder / "notes.txt").write_text("mine")
    assert foreign_files(folder, "rahf-checkpoints.json") == ["notes.txt"]
    write_text_atomic(folder / "rahf-checkpoints.json", "{}")
    assert foreign_files(folder, "rahf-checkpoints.json") == []

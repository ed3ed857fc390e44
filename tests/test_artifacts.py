"""Artifact folders: what a folder holding a manifest fingerprints to."""

from __future__ import annotations

from pathlib import Path

import pytest

from rahf.artifacts import MANIFEST, artifact_identity, atomic_dir, fingerprint_path


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


@pytest.mark.parametrize("text", ['{"fingerprint": "fp", "bu', "{}", "[]", '{"fingerprint": "fp", "files": 3}'])
def test_a_folder_with_a_damaged_manifest_is_fingerprinted_by_its_content(tmp_path, text):
    folder = make_artifact(tmp_path / "model")
    (folder / MANIFEST).write_text(text)
    first = fingerprint_path(folder)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    assert fingerprint_path(folder) != first

"""Data files in Hugging Face Hub repositories, named by HF URIs: `hf://datasets/ORG/NAME[@REVISION]/PATH`.

Every data key (`data.path`, `sft.path`, `evaluate.pairs`, `compare.validation`, `generate.prompts`,
`evaluate.neutral_prompts`) and `rahf data check` accept one. The file is downloaded once into the Hugging
Face cache (`hf_hub_download`: the token from `HF_TOKEN`, `HF_HUB_OFFLINE` honoured) and read like a local
file; artifacts built on it are fingerprinted by its content, so a new upload makes them stale.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from .errors import DataError

PREFIX = "hf://"
_FORMAT = "hf://datasets/ORG/NAME[@REVISION]/PATH/IN/REPO"


def is_hub_file(path: object) -> bool:
    """Whether `path` is an HF URI rather than a local path."""
    return isinstance(path, str) and path.startswith(PREFIX)


def local_file(path: str | os.PathLike) -> str | os.PathLike:
    """`path` itself, or for an HF URI the local copy of the file it names (downloaded when not cached)."""
    return download(path) if is_hub_file(path) else path


def check_uri(uri: str) -> tuple[str, str, str | None, str]:
    """(repo type, repo id, revision, path in repo) of an HF URI naming one file; DataError saying how to write it."""
    from huggingface_hub import parse_hf_uri

    try:
        ref = parse_hf_uri(uri)
    except ValueError as e:
        raise DataError(f"{uri}: not a valid HF URI ({e}); write {_FORMAT}") from None
    if ref.type not in ("dataset", "model"):
        raise DataError(f"{uri}: names a {ref.type}; data files are read from dataset (or model) repositories")
    if not ref.path_in_repo or uri.endswith("/"):
        raise DataError(f"{uri}: names no file in the repository; write {_FORMAT}")
    return ref.type, ref.id, ref.revision, ref.path_in_repo


@cache  # once per process: every stage of one run reads the same version of the file
def download(uri: str) -> Path:
    """The local copy of the file an HF URI names, downloaded into the Hugging Face cache when not there yet."""
    from huggingface_hub import hf_hub_download

    repo_type, repo_id, revision, filename = check_uri(uri)
    try:
        local = Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision))
    # a missing repository, file or revision, a gated or private repository, no network: the Hub library's errors
    # are of many types (not all OSErrors); each becomes one line
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{uri}: cannot download ({type(e).__name__}: {reason}); check the repository, the file's path in it "
            "(a folder cannot be read: name one file) and the revision, set HF_TOKEN for a private or gated "
            "repository, or run once with network to cache it for HF_HUB_OFFLINE=1"
        ) from None
    if local.is_dir():  # offline, the Hub library hands back a cached folder instead of refusing it
        raise DataError(f"{uri}: names a folder in the repository; a data key reads one file: name it")
    return local

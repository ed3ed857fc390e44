"""Stage artifact folders: a manifest (config, input fingerprints, library versions) and atomic writes.

A stage writes into a temporary sibling folder and renames it into place only when complete, so a
crash never leaves a half-written artifact that looks finished. A stage is fresh when its manifest's
fingerprint equals the one computed from its current inputs; anything else is recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, RahfError
from .hubfiles import download, is_hub_file

MANIFEST = "rahf_manifest.json"
_PACKAGES = ("rahf", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors")
LARGE_FILE = 64 << 20  # bytes; weight files above this are fingerprinted without reading them in full
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# Token strings a trainer may be given (eos_token, pad_token, ...): names ending in _token that hold no credential.
SPECIAL_TOKENS = {f"{name}_token" for name in ("bos", "eos", "pad", "unk", "sep", "cls", "mask")}
_SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key)$", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_URL_SECRET_PARAM = re.compile(
    r"([?&][^=&#\s]*(?:key|token|secret|password|sig|signature)[^=&#\s]*=)[^&#\s]+", re.IGNORECASE
)


def versions() -> dict[str, str]:
    """Installed versions of the libraries a stage's result depends on."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def version_changes(path: str | os.PathLike) -> str:
    """How the libraries the artifact at `path` was made with differ from those installed now, e.g.
    "rahf 0.1.0 -> 0.2.0, transformers 5.23.0 -> 5.24.0"; "" when they agree (or the manifest records none). An
    upgrade does not make an artifact stale (retraining for every patch release would cost more than it saves), so
    this is what tells a user that a rerun would use other code."""
    try:
        made = read_manifest(path).get("versions")
    except (OSError, ValueError):
        return ""
    if not isinstance(made, dict):
        return ""
    now = versions()
    return ", ".join(
        f"{name} {made[name]} -> {now[name]}" for name in _PACKAGES if made.get(name, now[name]) != now[name]
    )


def discard(folder: str | os.PathLike) -> None:
    """Delete `folder`, renamed aside first (one atomic step): a deletion interrupted part-way (Ctrl-C, a kill) then
    leaves no checkpoint short of some of its files where a run looks for one to resume from, only a hidden folder
    that `remove_discarded` deletes the next time."""
    folder = Path(folder)
    with contextlib.suppress(FileNotFoundError):
        folder.rename(folder.with_name(f".{folder.name}.discarded-{os.getpid()}-{time.time_ns()}"))
    remove_discarded(folder)


def remove_discarded(folder: str | os.PathLike) -> None:
    """Delete what `discard` renamed `folder` to, there still when its deletion was interrupted (run under the output
    lock: no other run is deleting one now)."""
    folder = Path(folder)
    for aside in folder.parent.glob(f".{folder.name}.discarded-*"):
        remove(aside)


def remove(path: Path) -> None:
    """Delete `path`, as far as it can be: a folder with what it holds; a symbolic link (to a folder too) or a file
    as itself, never what a link points to."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# per process: `rahf run` checks the same data at every stage
_FILE_DIGESTS: dict[tuple[str, int, int, int, int], bytes] = {}


def _stat_key(path: Path, stat: os.stat_result) -> tuple[str, int, int, int, int]:
    """What identifies one version of a file within a process: any write changes its change time."""
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def _hash_file(path: Path, h: hashlib._Hash) -> None:
    """Feed `path` into `h`: its name, size and a digest of every byte.

    A model weight file (a `WEIGHT_SUFFIXES` name) over `LARGE_FILE` bytes contributes its name, size,
    modification time and first and last MiB instead, so a many-GB checkpoint is not read in full while a
    retrain written over it in place still changes the hash. Any other file (data: jsonl, json, parquet,
    arrow, ...) is hashed in full whatever its size, so an edit anywhere in it is noticed; its digest is
    remembered for this process under (path, size, inode, modification and change times), so `rahf run` reads
    a large dataset once, not once per stage; any write changes the change time (which, unlike the
    modification time, cannot be set back), so an edited file is always read afresh.

    A DataError when the file cannot be read (no permission, an I/O error).
    """
    try:
        stat = path.stat()
        key = _stat_key(path, stat)
        if key not in _FILE_DIGESTS:
            _FILE_DIGESTS[key] = _content_digest(path, stat)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    h.update(f"{path.name}:{stat.st_size}".encode())
    h.update(_FILE_DIGESTS[key])


def _content_digest(path: Path, stat: os.stat_result) -> bytes:
    """The digest `_hash_file` takes of the bytes of `path` (of a large weight file, its ends and mtime)."""
    inner = hashlib.sha256()
    with path.open("rb") as f:
        if stat.st_size > LARGE_FILE and path.name.endswith(WEIGHT_SUFFIXES):
            inner.update(f":{stat.st_mtime_ns}".encode())
            inner.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            inner.update(f.read())
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
    return inner.digest()


_NOT_CONTENT = re.compile(r"(^|/)(\.DS_Store|\._[^/]*|Thumbs\.db|desktop\.ini)$|^\.cache/huggingface/")


def content_files(folder: Path) -> list[Path]:
    """The files of `folder` that make up its content, sorted: not the ones a file browser adds when it is opened
    (.DS_Store, ._*, Thumbs.db, desktop.ini) nor the download records `huggingface-cli download --local-dir` keeps
    (.cache/huggingface/), which change with each download of the same files."""
    return sorted(
        f for f in folder.rglob("*") if f.is_file() and not _NOT_CONTENT.search(f.relative_to(folder).as_posix())
    )


def fingerprint_path(path: str | os.PathLike, revision: str | None = None) -> str:
    """Content hash of a file or folder; an untouched stage artifact contributes its identity (`artifact_identity`);
    a Hub id the commit that `revision` (default: the default branch) points to; an HF URI the content of the file
    it names."""
    if is_hub_file(path):
        h = hashlib.sha256()
        _hash_file(download(str(path)), h)
        return h.hexdigest()
    p = Path(path)
    if (p / MANIFEST).is_file() and (identity := _untouched_identity(p)):
        return identity
    h = hashlib.sha256()
    if p.is_file():
        _hash_file(p, h)
    elif p.is_dir():
        for f in content_files(p):
            h.update(str(f.relative_to(p)).encode())
            _hash_file(f, h)
    else:  # a Hub id: the commit it resolves to, as from_pretrained will load it (else the revision's name)
        commit = hub_commit(str(path), revision)
        h.update(f"hub:{path}".encode() + (f"@{commit or revision}".encode() if commit or revision else b""))
    return h.hexdigest()


@cache  # once per process: every stage of one `rahf run` must see the same commit
def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a Hub model id's `revision` (default branch when None) points to, so a new upload makes artifacts
    built on it stale.

    Asked of the Hub unless HF_HUB_OFFLINE is set; offline, or when the Hub cannot be reached, the commit
    the local cache holds (what from_pretrained then loads); None when neither is known (the name alone).
    """
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        try:
            return model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        # no network, a private repo without a token, an id the Hub refuses (its HTTP library's errors are
        # not OSErrors): whatever the reason, fall back to the cache
        except Exception as e:  # noqa: BLE001
            _unreachable_note(e)
    try:
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid Hub id at all
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


_SAID_UNREACHABLE: list[bool] = []  # the note below, once a process


def _unreachable_note(error: BaseException) -> None:
    """Say once that the Hub cannot be reached: every file transformers then looks up is retried for seconds
    before the cache serves it (minutes for a command whose work takes a second), which HF_HUB_OFFLINE=1 skips."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    if _SAID_UNREACHABLE or not any(n.startswith(("Connect", "Timeout")) or n.endswith("Timeout") for n in chain):
        return
    _SAID_UNREACHABLE.append(True)
    print(
        "[rahf] note: the Hugging Face Hub cannot be reached; models and files come from the local cache, each after "
        "its own retries: set HF_HUB_OFFLINE=1 to skip them",
        flush=True,
    )


def fingerprint(payload: Any) -> str:
    """Stable hash of a JSON-serialisable description of a stage's inputs."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def secret_key(name: str) -> bool:
    """Whether a config key names a credential (hub_token, api_key, password), not a tokenizer's special token."""
    return bool(_SECRET_KEY.search(str(name))) and str(name).lower() not in SPECIAL_TOKENS


def redacted(value: Any) -> Any:
    """`value` for writing to disk or a log: values under secret-looking keys (hub_token, api_key), URL credentials
    (`user:pass@`) and secret-looking URL query parameters (`?api_key=`, `&sig=`) hidden."""
    if isinstance(value, dict):
        return {k: "<redacted>" if v is not None and secret_key(str(k)) else redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    if isinstance(value, str):
        return _URL_SECRET_PARAM.sub(r"\1<redacted>", _URL_CREDENTIALS.sub("<redacted>@", value))
    return value


def _untouched_identity(folder: Path) -> str | None:
    """`artifact_identity` of `folder` when it holds exactly the files its manifest lists, as they were written;
    None when the manifest is damaged or lists no files, or a file was edited, lost or added (a tokenizer file a
    loader would now read): such a folder is fingerprinted by its content, so what is built on it becomes stale."""
    try:
        manifest = read_manifest(folder)
        listed = manifest.get("files")
        if (
            not isinstance(manifest.get("fingerprint"), str)
            or not isinstance(listed, dict)
            or not isinstance(manifest.get("file_digests", {}), dict)
            or lost_files(folder)
        ):
            return None
        present = {str(f.relative_to(folder)) for f in content_files(folder)}
    except (OSError, ValueError):  # unreadable: the content hash says which file (`_hash_file`)
        return None
    return artifact_identity(folder) if present == {*listed, MANIFEST} else None


def artifact_identity(path: str | os.PathLike) -> str:
    """What a downstream stage records of the artifact `path`: its fingerprint and the id of the computation that
    made it, so recomputing it (`--force`, a stage command) makes everything built on it stale even when its
    inputs are the same: the new weights may differ (GPU nondeterminism, another library version)."""
    manifest = read_manifest(path)
    return f"{manifest['fingerprint']}:{manifest['build']}" if "build" in manifest else manifest["fingerprint"]


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact folder `path`; ValueError when it is not a JSON object."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if not isinstance(manifest, dict):
        raise ValueError(f"{Path(path) / MANIFEST}: not a manifest (a JSON object)")  # noqa: TRY004 (read as unreadable)
    return manifest


def is_fresh(path: str | os.PathLike, fp: str) -> bool:
    """True when `path` holds a finished artifact made from inputs with fingerprint `fp`, with every file it was
    written with still there at its size (a deleted collect shard would otherwise leave align a part of the data)."""
    try:
        return read_manifest(path)["fingerprint"] == fp and files_intact(path)
    except (OSError, ValueError, KeyError):
        return False


def lost_files(path: str | os.PathLike) -> list[str]:
    """The files the manifest of `path` lists that are gone, no longer of the size they were written with, or whose
    first and last MiB changed (a file copied over another of the same size; none for manifests made before the
    lists were kept)."""
    manifest = read_manifest(path)
    listed, digests = manifest.get("files", {}), manifest.get("file_digests", {})
    return [
        n
        for n, size in listed.items()
        if not (f := Path(path) / n).is_file()
        or f.stat().st_size != size
        or (n in digests and file_digest(f) != digests[n])
    ]


_ENDS_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # per process, as _FILE_DIGESTS


def file_digest(path: Path) -> str:
    """A digest of a written file's size and its first and last MiB: read in an instant however large the file,
    and different for any other weights or shard of the same size."""
    stat = path.stat()
    key = _stat_key(path, stat)
    if key not in _ENDS_DIGESTS:
        h = hashlib.sha256(str(stat.st_size).encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            if stat.st_size > 1 << 20:
                f.seek(-min(1 << 20, stat.st_size - (1 << 20)), os.SEEK_END)
                h.update(f.read())
        _ENDS_DIGESTS[key] = h.hexdigest()
    return _ENDS_DIGESTS[key]


def files_intact(path: str | os.PathLike) -> bool:
    """Every file the manifest of `path` lists is there, at its size."""
    return not lost_files(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` via a temp file in the same folder and `os.replace`, so readers (and a rerun after a kill) never
    see a partial file.

    The temp file is opened as any new file is (mode from the umask), not by `mkstemp`, whose 0600 would keep
    benchmark files from an evaluation run under another user."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{time.time_ns()}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_BROWSER_FILES = re.compile(r"^(\.DS_Store|Thumbs\.db|desktop\.ini)$")  # what a file browser adds to any folder


def _browser_file(name: str, beside: set[str]) -> bool:
    """Whether `name`, among the entries `beside` of its folder, is what a file browser adds: .DS_Store, Thumbs.db,
    desktop.ini, or macOS's `._X` beside the file X it describes (a `._labels` with no `labels` is someone's file)."""
    return bool(_BROWSER_FILES.match(name)) or (name.startswith("._") and name[2:] in beside)


def rahf_marker(folder: Path, marker: str) -> dict[str, Any] | None:
    """The content of `folder/marker` when rahf wrote it: a regular file (not a link, not a folder) holding a JSON
    object with the `stage` and `fingerprint` strings rahf records; None otherwise, as a user's file of that name
    (hand-written, garbage) makes no folder rahf's."""
    path = folder / marker
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(content, dict) and all(isinstance(content.get(k), str) for k in ("stage", "fingerprint")):
        return content
    return None


def foreign_files(
    folder: str | os.PathLike, marker: str = MANIFEST, most: int = 3, entries: re.Pattern[str] | None = None
) -> list[str]:
    """Up to `most` entries (paths relative to it, top level first; a folder with a trailing /) of `folder` that rahf
    did not write, so that the folder is a user's, never to be replaced or deleted:

    - `folder` itself when it is a symbolic link;
    - with rahf's `marker` (`rahf_marker`) listing the files rahf wrote (an artifact's manifest, `files`): every other
      file, link or empty folder (files a user added to a finished artifact: a model card, notes);
    - with rahf's marker listing none (a checkpoint folder's tag): everything under a top-level name that `entries`
      does not match (what the stage's trainers write there);
    - with no marker of rahf's: everything, empty folders too.

    Never what a file browser adds (`_browser_file`), nor the marker itself, or while `write_text_atomic` writes it.
    [] for rahf's folder, an empty one, or none.
    """
    folder = Path(folder)
    if folder.is_symlink():
        return [f"{folder.name} (a symbolic link to {os.readlink(folder)})"]
    if not folder.is_dir():
        return []
    content = rahf_marker(folder, marker)
    listed = content.get("files") if content else None
    named = entries if content and not isinstance(listed, dict) else None  # rahf's by top-level name
    mine = {marker, *listed} if isinstance(listed, dict) else {marker} if named else set()  # the paths rahf wrote
    being_written = re.compile(rf"\.{re.escape(marker)}\.\d+-\d+\.tmp")  # its marker, mid `write_text_atomic`
    found: list[str] = []

    def rahfs(here: Path, name: str) -> bool:
        """Whether the entry `name` of `folder`'s sub-folder `here` is one rahf wrote."""
        if (here / name).as_posix() in mine:
            return True
        return not here.parts and bool(being_written.fullmatch(name) or (named and named.fullmatch(name)))

    def unreadable(e: OSError) -> None:  # a folder that cannot be listed: not what rahf writes
        name = Path(e.filename or folder).relative_to(folder).as_posix()
        found.append(f"{folder.name if name == '.' else name}/ (unreadable)")

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        here = Path(root).relative_to(folder)
        beside = {*dirs, *files}
        shown = sorted(n for n in beside if not _browser_file(n, beside))
        if here.parts and not shown:  # an empty folder (but for a browser's files): made by hand
            found.append(f"{here.as_posix()}/")
        links = {d for d in dirs if os.path.islink(Path(root, d))}  # listed, not followed
        # the folders to look into: not links, nor what `entries` names
        dirs[:] = sorted(d for d in dirs if d not in links and not (named and not here.parts and named.fullmatch(d)))
        found += [(here / n).as_posix() for n in shown if n not in dirs and not rahfs(here, n)]
        if len(found) >= most:
            break
    return found[:most]


def refuse_foreign(
    folder: str | os.PathLike,
    stage: str,
    marker: str = MANIFEST,
    what: str = "its artifact",
    entries: re.Pattern[str] | None = None,
) -> None:
    """A ConfigError when `folder`, which the `stage` stage replaces (or deletes), is not rahf's: a symbolic link, a
    file, or a folder with files rahf did not write (`foreign_files`). Nothing is changed."""
    folder = Path(folder)
    fix = "move it out of output_dir or choose another output_dir"
    if folder.is_symlink():
        raise ConfigError(
            f"output_dir: {folder} is a symbolic link to {os.readlink(folder)}, where the {stage} stage writes {what} "
            "as a folder of its own; remove the link (what it points to is kept) or choose another output_dir"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"output_dir: {folder} is a file rahf did not write, where the {stage} stage writes {what}; {fix}"
        )
    if found := foreign_files(folder, marker, entries=entries):
        names = ", ".join(found[:2]) + (", ..." if len(found) > 2 else "")
        content = rahf_marker(folder, marker)
        if marker == MANIFEST and content is not None and not isinstance(content.get("files"), dict):
            raise ConfigError(
                f"output_dir: {folder} was written by an earlier rahf, whose manifest lists no files, so rahf cannot "
                f"tell its files ({names}) from a user's, where the {stage} stage writes {what}; delete the folder if "
                f"it holds nothing of yours (the stage then runs again), else {fix}"
            )
        if os.path.lexists(folder / marker) and content is None:  # damaged, or not rahf's
            raise ConfigError(
                f"output_dir: {folder} holds a {marker} rahf cannot read as its own (damaged, or another's), so it "
                f"cannot tell its files ({names}) from a user's, where the {stage} stage writes {what}; delete the "
                f"folder if rahf wrote it (the stage then runs again), else {fix}"
            )
        raise ConfigError(
            f"output_dir: {folder} holds files rahf did not write ({names}), where the {stage} stage writes {what}; "
            f"{fix}"
        )


@contextmanager
def atomic_dir(
    final: str | os.PathLike,
    stage: str,
    fp: str,
    config: dict[str, Any],
    extra: dict | None = None,
    inputs: dict[str, str | None] | None = None,
    run_config: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder; on success write the manifest and move it to `final` (replacing it).

    The manifest holds `config` (the settings `fp` covers), `inputs` (the fingerprint of each input),
    `run_config` (the whole resolved config) and `extra`; secret-looking values are redacted and nothing
    is read from the environment. When the body fails or is interrupted, the new folder is dropped and an artifact
    it was to replace stays in place (`_undo`). What is at `final` when it holds anything rahf did not write
    (`foreign_files`: a user's folder, a link, rahf's artifact with a user's file added) is never replaced: a
    ConfigError, before the body runs or, made while it ran, in place of the swap.
    """
    final = Path(final)
    refuse_foreign(final, stage)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or virtual file system (/proc): said before the stage starts
        raise RahfError(f"output_dir: cannot create {final.parent} ({e.strerror}); choose another output_dir") from None
    restore_replaced(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"  # where a replaced artifact goes
    tmp.mkdir()
    _IN_USE.update(map(os.path.abspath, (tmp, old)))
    try:
        yield tmp
        written = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in written}
        digests = {str(f.relative_to(tmp)): file_digest(f) for f in written}
        manifest = {
            "stage": stage,
            "fingerprint": fp,
            "build": uuid.uuid4().hex,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "config": redacted(config),
            **({} if inputs is None else {"inputs": inputs}),
            **({} if run_config is None else {"run_config": redacted(run_config)}),
            **(extra or {}),
            "files": files,  # name -> bytes: an artifact missing one of them is not fresh
            "file_digests": digests,  # name -> `file_digest`: nor one with another file in its place
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        refuse_foreign(final, stage)  # made while the body ran: the new folder is dropped (`_undo`)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        remove(old)
    except BaseException:
        _undo(final, tmp, old)
        raise
    finally:
        _IN_USE.difference_update(map(os.path.abspath, (tmp, old)))


def _undo(final: Path, tmp: Path, old: Path) -> None:
    """After `atomic_dir` stopped (an error, Ctrl-C): leave `final` as it was before, or as the new artifact when
    that reached its place. Judged from the folders, not from how far the code got, as an interrupt can land just
    after a rename."""
    if tmp.exists():  # not in place: the new artifact is dropped, the one it was to replace put back
        if old.exists() and not final.exists():
            old.rename(final)
        remove(tmp)
        ABANDONED.append(final)
    else:  # complete and in place (not half-written): only the replaced copy is left to remove
        remove(old)


ABANDONED: list[Path] = []  # artifacts whose writing stopped half-way (their temporary folder removed), in order
_IN_USE: set[str] = set()  # the temporary and replaced-copy paths of the artifacts this process is writing now
_HELD: dict[Path, tuple[object, int]] = {}  # output folders this process has locked: (open file, depth)


def _flock_soon(handle, fcntl) -> None:
    """Take the exclusive lock, trying for up to a second: `lock_holder` (`rahf status`) holds a shared one for
    an instant, which must not turn a run away. BlockingIOError when a run holds it all that time."""
    for _ in range(50):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _holder(handle) -> str:
    """What the lock file says of the process holding it ("pid 123")."""
    handle.seek(0)
    return handle.read().strip() or "another process"


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds `output_lock` on `folder` ("pid 123"), when another process does; None otherwise."""
    folder = Path(folder).resolve()
    lock = folder / ".rahf.lock"
    if folder in _HELD or not lock.is_file():
        return None
    try:
        import fcntl

        with lock.open() as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except (ImportError, OSError):
        return None
    return None


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold `folder/.rahf.lock` while this process writes artifacts there, so a second rahf process on the same
    folder stops at once (one line, exit 2) instead of replacing artifacts under the first. Re-entrant within a
    process; released when the process ends, even when killed. Where advisory locks do not exist (Windows,
    some network file systems) it does nothing."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        handle, depth = _HELD[folder]
        _HELD[folder] = (handle, depth + 1)
    else:
        try:
            import fcntl
        except ImportError:
            yield
            return
        lock = folder / ".rahf.lock"
        if lock.is_symlink():  # opened for writing, it would truncate whatever file the link points at
            raise RahfError(f"output_dir: {lock} is a symbolic link, not rahf's lock file; remove it")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)  # a link planted after the check fails too
            handle = os.fdopen(os.open(lock, flags, 0o644), "a+")
        except OSError as e:  # a read-only or virtual file system (/proc), a file where the folder should be
            raise RahfError(f"output_dir: cannot write to {folder} ({e.strerror}); choose another output_dir") from None
        try:
            _flock_soon(handle, fcntl)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise RahfError(
                f"output_dir: {folder} is being written by another rahf run ({holder}); wait for it to end, "
                "or give this run another output_dir"
            ) from None
        except OSError:  # no locking on this file system: go on unguarded, as before
            handle.close()
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        _HELD[folder] = (handle, 1)
    try:
        yield
    finally:
        handle, depth = _HELD[folder]
        if depth > 1:
            _HELD[folder] = (handle, depth - 1)
        else:
            del _HELD[folder]
            handle.close()


def restore_replaced(final: str | os.PathLike) -> None:
    """Put back the artifact a killed process had moved aside to replace `final` and never replaced: `atomic_dir`
    renames the old folder aside, then the new one in, and a kill between the two renames leaves neither in place.
    Then delete the temporary and replaced copies killed processes left (they can hold many GB).

    Under this process's `output_lock` on a folder holding `final`, no other rahf process writes there, so every such
    copy but those this process is writing now (`_IN_USE`) was left by one that ended, whatever its pid: the pid a
    container gives rahf on each start, or one the system has since given another process, may be alive. Without
    the lock (a library call; a file system without locks), only copies of processes that are gone count.
    """
    final = Path(final)
    guarded = _holds_lock_over(final.parent)
    dead: list[tuple[str, int, Path]] = []
    for path in final.parent.glob(f".{final.name}.*-*-*"):
        kind, pid, ns = (path.name[len(final.name) + 2 :].split("-") + ["", ""])[:3]  # ".<name>.old-<pid>-<ns>"
        if kind not in ("tmp", "old") or not (pid.isdigit() and ns.isdigit()) or os.path.abspath(path) in _IN_USE:
            continue
        if guarded or not _alive(int(pid)):
            dead.append((kind, int(ns), path))
    replaced = sorted((ns, path) for kind, ns, path in dead if kind == "old")
    if replaced and not final.exists() and not final.is_symlink():
        path = replaced[-1][1]  # the newest: an older one was already replaced once
        path.rename(final)
        print(f"[rahf] restored {final}, which an interrupted run had moved aside to replace it", flush=True)
    for _, _, path in dead:
        if path.exists() or path.is_symlink():
            print(f"[rahf] removing {path}, left by an interrupted run", flush=True)
            remove(path)


def _holds_lock_over(folder: Path) -> bool:
    """Whether this process holds `output_lock` on `folder` or a folder that holds it."""
    folder = folder.resolve()
    return any(held == folder or held in folder.parents for held in _HELD)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True

"""Data files named by HF URIs (hf://datasets/ORG/NAME[@REVISION]/PATH) are downloaded through huggingface_hub and
read, checked and fingerprinted like local files; a URI that cannot be read stops the run in one line. The Hub
itself is replaced by a local folder (no network in tests)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from conftest import run_settings, standard_records, write_jsonl
from test_cli import nothing_written, one_line_error

from rahf import hubfiles
from rahf.artifacts import fingerprint_path
from rahf.cli import main
from rahf.config import load_config
from rahf.data import load_pairs
from rahf.pipeline import describe, run

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


class FakeHub:
    """hf_hub_download over `root/<repo_type>/<repo_id>/<revision>/<path>`, recording each call."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def put(self, repo: str, path: str, source: Path, revision: str = "main", repo_type: str = "dataset") -> None:
        target = self.root / repo_type / repo / revision / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def __call__(self, repo_id, filename, *, repo_type=None, revision=None, **_):
        self.calls.append((repo_type, repo_id, revision, filename))
        path = self.root / (repo_type or "model") / repo_id / (revision or "main") / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"404 Client Error. Entry Not Found for url: {filename}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    hubfiles.download.cache_clear()
    yield fake
    hubfiles.download.cache_clear()


def test_a_hub_file_loads_like_the_local_file(hub, pairs_file):
    hub.put("org/prefs", "data/train.jsonl", pairs_file, revision="v2")
    uri = "hf://datasets/org/prefs@v2/data/train.jsonl"
    pairs, fmt = load_pairs(uri)
    local, local_fmt = load_pairs(pairs_file)
    assert fmt == local_fmt == "trl-standard"
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(p.prompt, p.chosen, p.rejected) for p in local]
    assert pairs[0].source == f"{uri}:1"  # problems are reported at the URI's line
    assert hub.calls == [("dataset", "org/prefs", "v2", "data/train.jsonl")]
    load_pairs(uri)
    assert len(hub.calls) == 1  # once per process: every stage reads the same version


@pytest.mark.skipif(not HH.is_file(), reason="the HH sample is not beside this checkout")
def test_data_check_reads_all_hh_pairs_from_a_hub_uri(hub, capsys):
    hub.put("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz", HH)
    assert main(["data", "check", "hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz"]) == 0
    rows = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if not line.startswith(" "))
    assert (rows["format"].strip(), rows["pairs"].strip()) == ("hh", "2312")


def test_a_hub_file_is_fingerprinted_by_its_content(hub, tmp_path):
    a, b = tmp_path / "a" / "x.jsonl", tmp_path / "b" / "x.jsonl"
    a.parent.mkdir(), b.parent.mkdir()
    write_jsonl(a, standard_records(4, seed=0))
    write_jsonl(b, standard_records(4, seed=1))
    hub.put("org/prefs", "x.jsonl", a)
    uri = "hf://datasets/org/prefs/x.jsonl"
    first = fingerprint_path(uri)
    assert first == fingerprint_path(a)  # the file's name and content, as for a local file
    hub.put("org/prefs", "x.jsonl", b)  # a new upload
    hubfiles.download.cache_clear()  # (a new process)
    assert fingerprint_path(uri) == fingerprint_path(b) != first


def test_a_run_on_a_hub_file_keeps_the_uri_and_is_fresh_after_it(hub, tmp_path, tiny_model_dir, pairs_file):
    hub.put("org/prefs", "train.jsonl", pairs_file)
    uri = "hf://datasets/org/prefs/train.jsonl"
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "run", "scit", data__path=uri, stages=["instruct"])
    cfg = load_config(None, settings)
    assert cfg.data.path == uri  # not taken for a path beside the config
    run(cfg)
    assert describe(cfg).split()[1] == "fresh"


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("hf://datasets/org/prefs/missing.jsonl", "cannot download (EntryNotFoundError: 404 Client Error."),
        ("hf://datasets/org/prefs", "names no file in the repository; write hf://datasets/ORG/NAME"),
        ("hf://datasets/org/prefs/data/", "names no file in the repository; write hf://datasets/ORG/NAME"),
        ("hf://spaces/org/app/pairs.jsonl", "names a space; data files are read from dataset (or model) repositories"),
    ],
)
def test_a_hub_file_that_cannot_be_read_stops_the_run_in_one_line(
    hub, tmp_path, tiny_model_dir, pairs_file, capsys, uri, says
):
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {uri}\noutput_dir: {out}\n")
    assert main(["run", str(config)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"data.path: {uri}: {says}")
    assert nothing_written(out)
    assert main(["data", "check", uri]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"{uri}: {says}")


def test_every_data_key_takes_a_hub_file(hub, tmp_path, tiny_model_dir, pairs_file):
    hub.put("org/prefs", "train.jsonl", pairs_file)
    gz = tmp_path / "prompts.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"prompt": "what colour is the sky?"}\n')
    hub.put("org/prefs", "prompts.jsonl.gz", gz)
    uri = "hf://datasets/org/prefs/train.jsonl"
    keys = {"sft__path": uri, "evaluate__pairs": uri, "compare__validation": uri}
    keys |= {"generate__prompts": "hf://datasets/org/prefs/prompts.jsonl.gz", "evaluate__neutral_prompts": uri}
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "run", "scit", **keys))
    assert (cfg.sft.path, cfg.evaluate.pairs, cfg.compare.validation) == (uri, uri, uri)
    from rahf.generate import read_prompts

    assert read_prompts(cfg.generate.prompts) == [[{"role": "user", "content": "what colour is the sky?"}]]
    with pytest.raises(Exception, match=r"sft.path: hf://datasets/org/prefs/nope.jsonl: cannot download"):
        load_config(
            None, run_settings(tiny_model_dir, pairs_file, tmp_path / "run", "scit", sft__path=uri[:-11] + "nope.jsonl")
        )


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """The real hf_hub_download, offline, over a Hugging Face cache holding one snapshot of org/prefs; returns the
    snapshot's folder."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "datasets--org--prefs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hubfiles.download.cache_clear()
    yield repo / "snapshots" / commit
    hubfiles.download.cache_clear()


def test_a_hub_uri_naming_a_folder_is_refused_in_one_line_offline(
    offline_cache, tmp_path, tiny_model_dir, pairs_file, capsys
):
    """Offline, hf_hub_download hands back a cached folder (the snapshot's `data/`) instead of refusing it."""
    (offline_cache / "data").mkdir()
    shutil.copyfile(pairs_file, offline_cache / "data" / "train.jsonl")
    uri = "hf://datasets/org/prefs/data"
    assert len(load_pairs(f"{uri}/train.jsonl")[0]) == len(pairs_file.read_text().splitlines())  # the cache serves
    says = f"{uri}: names a folder in the repository; a data key reads one file: name it"
    assert main(["data", "check", uri]) == 2
    assert one_line_error(capsys.readouterr().err) == says
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {uri}\noutput_dir: {out}\n")
    assert main(["run", str(config)]) == 2
    assert one_line_error(capsys.readouterr().err) == f"data.path: {says}"
    assert nothing_written(out)

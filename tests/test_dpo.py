"""The `dpo` baseline: TRL's DPOTrainer on rahf's token ids, checked against log-ratios computed independently."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import run_settings, standard_records, write_jsonl

from rahf.baselines import dpo
from rahf.config import RahfConfig, load_config
from rahf.data import PreferencePair, load_pairs
from rahf.metrics import response_logprobs
from rahf.models import load_model
from rahf.stimuli import Stimulus, build_variants
from rahf.training import load_stage_model

N_TRAIN = 32
STEPS = 32
BATCH = 8


@dataclass
class Run:
    """A finished `train_dpo` call and what passed through its trainer."""

    cfg: RahfConfig
    out: Path
    logs: list[dict]
    trainer: object = None
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)  # collator outputs
    embedded: list[torch.Tensor] = field(default_factory=list)  # input_ids at the policy's embedding layer
    recording: bool = True  # only during training


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", standard_records(N_TRAIN, seed=0))


@pytest.fixture(scope="module")
def pairs(data_file) -> list[PreferencePair]:
    return load_pairs(data_file)[0]


def _train(tmp_path_factory, model_dir: Path, data_file: Path, pairs, finetune: str, train: dict, **extra) -> Run:
    """Run `train_dpo`, recording the collator's batches and the ids the policy embeds."""
    out = tmp_path_factory.mktemp(f"dpo-{finetune}") / "out"
    train = {"per_device_train_batch_size": BATCH, "disable_tqdm": True, "logging_steps": 8} | train
    lora = {"r": 4, "alpha": 8.0, "dropout": 0.0}
    settings = run_settings(
        model_dir, data_file, out, "dpo", dpo__finetune=finetune, dpo__lora=lora, dpo__train=train, **extra
    )
    cfg = load_config(None, settings)
    run = Run(cfg, out, [])
    build = dpo._dpo_trainer

    def recording_trainer(**kwargs):
        trainer = build(**kwargs)
        collate = trainer.data_collator

        def record(examples):
            batch = collate(examples)
            if run.recording:
                run.batches.append({k: v.clone() for k, v in batch.items()})
            return batch

        def embedded(_module, args, _output):
            if run.recording:
                run.embedded.append(args[0].detach().clone())

        trainer.data_collator = record
        trainer.model.get_input_embeddings().register_forward_hook(embedded)
        run.trainer = trainer
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo, "_dpo_trainer", recording_trainer)
        dpo.train_dpo(cfg, str(model_dir), pairs, out)
        run.logs = copy.deepcopy(run.trainer.state.log_history)  # later evaluate() calls append
    run.recording = False
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, data_file, pairs) -> Run:
    return _train(
        tmp_path_factory,
        tiny_model_dir,
        data_file,
        pairs,
        "lora",
        {"max_steps": STEPS, "learning_rate": 2e-2, "logging_steps": 1},
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, data_file, pairs) -> Run:
    return _train(
        tmp_path_factory, tiny_model_dir, data_file, pairs, "full", {"max_steps": STEPS, "learning_rate": 1e-3}
    )


def _stimuli(tokenizer, pairs, cfg: RahfConfig) -> list[tuple[Stimulus, Stimulus]]:
    """(chosen, rejected) sequences of each pair as rahf builds them."""
    return [
        tuple(
            build_variants(
                tokenizer, p.prompt, r, {"plain": None}, cfg.data.max_prompt_length, cfg.data.max_response_length
            )["plain"]
            for r in (p.chosen, p.rejected)
        )
        for p in pairs
    ]


def _batch(stimuli: list[Stimulus], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / response_mask."""
    width = max(len(s.input_ids) for s in stimuli)
    ids = torch.full((len(stimuli), width), pad_id)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for i, s in enumerate(stimuli):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        attention[i, : len(s.input_ids)] = 1
        response[i, s.response_start : len(s.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def _logps(model, stimuli: list[Stimulus], pad_id: int) -> torch.Tensor:
    """Summed teacher-forced log-probability of each response."""
    return torch.tensor([sum(lp) for lp in response_logprobs(model.eval(), **_batch(stimuli, pad_id))])


def _margins(policy, reference, pairs_stimuli, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(implicit reward margin, policy chosen-minus-rejected log-prob) per pair, in nats."""
    chosen = [c for c, _ in pairs_stimuli]
    rejected = [r for _, r in pairs_stimuli]
    pol_c, pol_r = _logps(policy, chosen, pad_id), _logps(policy, rejected, pad_id)
    ref_c, ref_r = _logps(reference, chosen, pad_id), _logps(reference, rejected, pad_id)
    return (pol_c - ref_c) - (pol_r - ref_r), pol_c - pol_r


@pytest.mark.parametrize("lengths", [(32, 24), (10, 6)])
def test_dataset_ids_are_rahf_stimuli(tokenizer, pairs, lengths):
    max_prompt, max_response = lengths
    data = dpo.dpo_dataset(tokenizer, pairs, max_prompt, max_response)
    assert data.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert len(data) == len(pairs)
    for row, pair in zip(data, pairs):
        for key, response in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
            s = build_variants(tokenizer, pair.prompt, response, {"plain": None}, max_prompt, max_response)["plain"]
            assert row["prompt_ids"] == list(s.input_ids[: s.response_start])
            assert row[key] == list(s.input_ids[s.response_start :])
            assert len(row["prompt_ids"]) <= max_prompt and len(row[key]) <= max_response
            assert row["prompt_ids"][0] == tokenizer.bos_token_id
            assert tokenizer.bos_token_id not in row["prompt_ids"][1:] + row[key]
            if len(row[key]) < max_response:  # not cut: the whole reply, then EOS
                assert row[key][-1] == tokenizer.eos_token_id
                assert tokenizer.decode(row[key][:-1]) == response
    if lengths == (32, 24):
        assert all(row[k][-1] == tokenizer.eos_token_id for row in data for k in ("chosen_ids", "rejected_ids"))
        assert tokenizer.convert_ids_to_tokens(data[0]["prompt_ids"])[-1] == "Assistant:"


def test_trainer_feeds_the_model_exactly_rahf_ids(lora_run, tokenizer, pairs):
    run = lora_run
    expected = {
        (tuple(c.input_ids), c.response_start, tuple(r.input_ids), r.response_start)
        for c, r in _stimuli(tokenizer, pairs, run.cfg)
    }
    assert len(run.batches) == STEPS
    # The policy and, with the adapter disabled, the reference embed each collated batch once.
    assert len(run.embedded) == 2 * STEPS
    seen = set()
    for k, batch in enumerate(run.batches):
        assert torch.equal(run.embedded[2 * k], batch["input_ids"])
        assert torch.equal(run.embedded[2 * k + 1], batch["input_ids"])
        n = len(batch["input_ids"]) // 2  # rows 0..n-1 chosen, n..2n-1 the rejected reply of the same pair
        rows = []
        for i in range(2 * n):
            length = int(batch["attention_mask"][i].sum())
            assert batch["attention_mask"][i, :length].all()  # right padding only
            completion = batch["completion_mask"][i].nonzero().flatten().tolist()
            rows.append((tuple(batch["input_ids"][i, :length].tolist()), completion[0]))
            assert completion == list(range(completion[0], length))
        for i in range(n):
            key = (*rows[i], *rows[i + n])
            assert key in expected
            seen.add(key)
    assert seen == expected  # 8 epochs over 32 pairs: every pair was trained on


def test_lora_dpo_raises_the_implicit_reward_margin(lora_run, tokenizer, pairs, tiny_model_dir):
    run = lora_run
    stimuli = _stimuli(tokenizer, pairs, run.cfg)
    first = run.logs[0]  # step 1 is scored before any update: the fresh adapter adds exactly zero
    assert first["step"] == 1 and first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    reference = load_model(str(tiny_model_dir))
    _, start_gap = _margins(reference, reference, stimuli, tokenizer.pad_token_id)
    policy = run.trainer.model  # the PeftModel, adapter active
    margin, gap = _margins(policy, reference, stimuli, tokenizer.pad_token_id)
    assert margin.mean() > 0.5  # nats
    assert (margin > 0).float().mean() >= 0.75
    assert (gap - start_gap).mean() > 0.5  # chosen replies gained log-probability relative to rejected ones
    # TRL's own implicit reward margin (beta * log-ratio difference) on the same pairs agrees with ours.
    metrics = run.trainer.evaluate(run.trainer.train_dataset)
    assert metrics["eval_rewards/margins"] == pytest.approx(run.cfg.dpo.beta * margin.mean().item(), abs=1e-4)
    final = [e for e in run.logs if "rewards/margins" in e][-1]
    assert final["rewards/margins"] > 0 and final["rewards/accuracies"] > 0.6
    assert final["step"] == STEPS


def test_lora_output_loads_with_the_trained_logits(lora_run, tokenizer, pairs, tiny_model_dir):
    run = lora_run
    out = run.out
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert json.loads((out / "log_history.json").read_text()) == run.logs
    assert (out / "tokenizer.json").is_file() and not (out / "model.safetensors").exists()
    loaded = load_stage_model(out, run.cfg)
    batch = _batch([c for c, _ in _stimuli(tokenizer, pairs[:8], run.cfg)], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = run.trainer.model.eval()(**inputs).logits
        base = load_model(str(tiny_model_dir))(**inputs).logits
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - base).abs().max() > 1e-2  # the adapter changed the model


def test_full_dpo_saves_a_model_and_keeps_a_frozen_reference(full_run, tokenizer, pairs, tiny_model_dir):
    run = full_run
    assert (run.out / "model.safetensors").is_file() and not (run.out / "adapter_config.json").exists()
    assert len(run.embedded) == STEPS  # the reference is a separate model
    stimuli = _stimuli(tokenizer, pairs, run.cfg)
    base = load_model(str(tiny_model_dir))
    assert torch.equal(
        _logps(run.trainer.ref_model, [c for c, _ in stimuli], tokenizer.pad_token_id),
        _logps(base, [c for c, _ in stimuli], tokenizer.pad_token_id),
    )
    loaded = load_stage_model(run.out, run.cfg)
    margin, _ = _margins(loaded, base, stimuli, tokenizer.pad_token_id)
    assert margin.mean() > 0.5 and (margin > 0).float().mean() >= 0.75
    batch = _batch([c for c, _ in stimuli[:8]], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, run.trainer.model.eval()(**inputs).logits)


@pytest.mark.parametrize(("finetune", "learning_rate"), [("lora", 5e-5), ("full", 5e-6)])
def test_defaults_and_dpo_settings_reach_trl(
    tmp_path_factory, tiny_model_dir, data_file, pairs, finetune, learning_rate
):
    run = _train(tmp_path_factory, tiny_model_dir, data_file, pairs, finetune, {}, dpo__beta=0.3, dpo__loss_type="ipo")
    args = run.trainer.args
    assert args.learning_rate == learning_rate and args.num_train_epochs == 1
    assert args.bf16 is False and args.max_length is None  # fp32 on CPU; rahf has already cut the sequences
    assert args.beta == 0.3 and args.loss_type == ["ipo"]
    assert run.logs[-1]["step"] == N_TRAIN // BATCH  # one epoch


@pytest.mark.parametrize("autocast", [False, True])
def test_full_bf16_dpo_starts_at_zero_reward(tmp_path_factory, tiny_model_dir, data_file, pairs, autocast):
    """A bf16 full fine-tune trains float32 master weights: its reference must hold float32 weights too, or the
    implicit rewards are not 0 before the first update, with or without bf16 autocast (`dpo.train.bf16`)."""
    run = _train(
        tmp_path_factory,
        tiny_model_dir,
        data_file,
        pairs,
        "full",
        {"max_steps": 1, "logging_steps": 1, "bf16": autocast},
        dtype="bfloat16",
    )
    assert run.trainer.ref_model.dtype == torch.float32  # (the policy is cast to bf16 only when saved)
    first = next(e for e in run.logs if "rewards/margins" in e)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0

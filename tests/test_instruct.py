"""Step 0 (SFT) and step 1 (SCIT, Dual) trainers on the tiny model: which tokens carry the loss, seeded adapters,
where checkpoints go, and trainer arguments that would otherwise be ignored or undone."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import run_settings
from safetensors.torch import load_file

from rahf.config import load_config
from rahf.errors import ConfigError

ONE_STEP = {"per_device_train_batch_size": 4, "disable_tqdm": True, "max_steps": 1, "learning_rate": 1e-3}


def _cfg(model, data, out, method, **extra):
    return load_config(None, run_settings(model, data, out, method, **extra))


def _adapters(folder) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(folder)): load_file(f) for f in sorted(folder.rglob("adapter_model.safetensors"))}


def test_sft_batches_train_on_the_response_and_its_closing_token_only(tiny_model_dir, pairs_file, tmp_path):
    # TRL's collator pads labels with -100 and keeps prebuilt labels: the prompt and the padding carry no loss.
    from trl import SFTConfig, SFTTrainer

    from rahf.models import load_model, load_tokenizer
    from rahf.sft import sft_examples, tokenized_sft_dataset
    from rahf.stimuli import prompt_ids
    from rahf.training import training_args

    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "sft")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = sft_examples(cfg)[:2]
    data = tokenized_sft_dataset(tokenizer, examples, 32, 24)
    args = training_args(SFTConfig, cfg, tmp_path, {"per_device_train_batch_size": 2}, max_length=None)
    trainer = SFTTrainer(
        model=load_model(str(tiny_model_dir)), args=args, train_dataset=data, processing_class=tokenizer
    )
    prompts = [prompt_ids(tokenizer, prompt, 32) for prompt, _, _ in examples]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["attention_mask"].sum(-1).tolist() != [batch["input_ids"].shape[1]] * 2  # one row is padded
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        start = next(len(p) for p in prompts if ids[: len(p)].tolist() == p)  # rows come shuffled
        end = int(attention.sum())
        assert (labels[:start] == -100).all() and (labels[end:] == -100).all()
        assert labels[start:end].tolist() == ids[start:end].tolist()
        assert ids[end - 1].item() == tokenizer.eos_token_id  # the closing token generation stops at is trained


@pytest.mark.parametrize("method", ["scit", "dual"])
def test_lora_step1_starts_from_the_configured_seed(tiny_model_dir, pairs_file, tmp_path, method):
    # The adapters' random init happens before the Trainer seeds: without seeding it, two calls with one config
    # (and, for Dual, the two sides' starting points) depended on whatever had drawn random numbers before.
    from rahf.instruct.dual import train_dual
    from rahf.instruct.scit import train_scit
    from rahf.training import load_data

    train = train_scit if method == "scit" else train_dual
    results = []
    for run in range(2):
        torch.manual_seed(100 + run)  # different global random state before each call
        out = tmp_path / f"run{run}"
        out.mkdir()
        cfg = _cfg(tiny_model_dir, pairs_file, out, method, instruct__finetune="lora", instruct__train=ONE_STEP)
        train(cfg, str(tiny_model_dir), load_data(cfg)[:4], out)
        results.append(_adapters(out))
    assert results[0].keys() == results[1].keys() and results[0]
    for name, weights in results[0].items():
        for key, value in weights.items():
            assert torch.equal(value, results[1][name][key]), f"{name}: {key}"


def test_dual_keeps_trainer_checkpoints_out_of_the_side_folders(tiny_model_dir, pairs_file, tmp_path):
    # The pipeline deletes out/checkpoints after a stage; checkpoints under out/<side> stayed in the artifact.
    from rahf.instruct.dual import train_dual
    from rahf.training import load_data

    train = ONE_STEP | {"save_strategy": "steps", "save_steps": 1}
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "dual", instruct__train=train)
    train_dual(cfg, str(tiny_model_dir), load_data(cfg)[:4], tmp_path)
    for side in ("preferred", "dispreferred"):
        assert (tmp_path / side / "adapter_config.json").is_file()
        assert not (tmp_path / side / "checkpoints").exists()
        assert (tmp_path / "checkpoints" / side / "checkpoint-1").is_dir()


@pytest.mark.parametrize(("method", "section"), [("sft", "sft"), ("dual", "instruct")])
def test_a_new_eos_token_for_trl_to_apply_after_tokenizing_is_refused(
    tiny_model_dir, pairs_file, tmp_path, method, section
):
    # SFTTrainer sets it on the tokenizer when built, after rahf tokenized the data: the model trained on the old
    # EOS was saved with the new one (and Dual's second side trained on the new one).
    from rahf.instruct.dual import train_dual
    from rahf.sft import run_sft
    from rahf.training import load_data

    cfg = _cfg(
        tiny_model_dir, pairs_file, tmp_path / "run", method, **{f"{section}__train": ONE_STEP | {"eos_token": "<unk>"}}
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match=rf"{section}\.train\.eos_token"):
        if method == "sft":
            run_sft(cfg, out)
        else:
            train_dual(cfg, str(tiny_model_dir), load_data(cfg)[:4], out)
    assert not any(out.iterdir())


def test_sft_grows_the_embeddings_for_tokens_the_tokenizer_adds(tiny_model_dir, pairs_file, tmp_path):
    # `tokenizer` may be a chat tokenizer whose end-of-turn token the base model has no embedding row for.
    from transformers import AutoModelForCausalLM

    from rahf.models import load_tokenizer
    from rahf.sft import run_sft
    from rahf.stimuli import end_of_turn_id

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    cfg = _cfg(
        tiny_model_dir,
        pairs_file,
        tmp_path,
        "sft",
        stages=["sft"],
        tokenizer=str(tmp_path / "chat-tokenizer"),
        sft__train=ONE_STEP,
    )
    out = tmp_path / "sft"
    out.mkdir()
    run_sft(cfg, out)
    saved = load_tokenizer(str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings >= len(saved)
    assert end_of_turn_id(saved) == saved.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("pure", [False, True])
def test_a_bfloat16_full_fine_tune_trains_float32_master_weights_and_saves_bfloat16(
    tiny_model_dir, pairs_file, tmp_path, pure
):
    # AdamW's step at lr 2e-5 is below bfloat16's resolution for most weights: trained in bfloat16 they hardly
    # move. Float32 master weights take every step; the artifact is still saved in the configured dtype.
    from transformers import AutoModelForCausalLM

    from rahf.sft import run_sft

    train = ONE_STEP | {"learning_rate": 2e-5, "max_steps": 16, "lr_scheduler_type": "constant"}
    extra = {"dtype": "bfloat16", "sft__train": train} | ({"pure_dtype": True} if pure else {})
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "sft", stages=["sft"], **extra)
    out = tmp_path / "sft"
    out.mkdir()
    run_sft(cfg, out)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    assert {v.dtype for v in after.values()} == {torch.bfloat16}
    big = [k for k, v in before.items() if v.dim() == 2 and "embed" not in k]  # the blocks' matrices
    moved = sum((after[k] != before[k]).sum().item() for k in big) / sum(before[k].numel() for k in big)
    assert moved < 0.4 if pure else moved > 0.85, moved  # measured: 0.30 and 0.93


def test_scit_trains_each_reply_under_its_own_instruction_with_the_configured_smoothing(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    """The chosen reply is the `match` of p+ and the rejected one of p-; the loss puts the matching instruction's
    score first and uses `instruct.label_smoothing` (not the trainer's default, which equals the config's)."""
    from transformers import Trainer

    from rahf.instruct.scit import mean_response_logprob, scit_loss, train_scit
    from rahf.models import load_tokenizer
    from rahf.stimuli import build_variants
    from rahf.training import load_data

    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "scit", instruct__train=ONE_STEP, instruct__label_smoothing=0.35)
    pairs = load_data(cfg)[:2]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    systems = {"pos": cfg.instructions.preferred, "neg": cfg.instructions.dispreferred}
    seen = {}

    def fake_train(self, resume_from_checkpoint=None):  # what train_scit hands the Trainer, and its loss on one batch
        seen["smoothing"] = self.label_smoothing
        seen["examples"] = list(self.train_dataset)
        batch = self.data_collator(seen["examples"])
        kept = []
        hook = self.model.register_forward_pre_hook(
            lambda module, args, kwargs: kept.append(kwargs.get("logits_to_keep")), with_kwargs=True
        )
        with torch.no_grad():
            seen["loss"] = self.compute_loss(self.model, batch).item()
        hook.remove()
        first = int(batch["response_mask"].int().argmax(1).min())  # the first reply token of the batch
        seen["kept"] = (kept, batch["input_ids"].shape[1] - first + 1)  # logits from the position predicting it
        with torch.no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lp = mean_response_logprob(logits, batch["input_ids"], batch["response_mask"])
        seen["want"] = scit_loss(lp[:4], lp[4:], 0.35).mean().item()  # 2 pairs: 4 sequences per side
        seen["swapped"] = scit_loss(lp[4:], lp[:4], 0.35).mean().item()
        seen["default_eps"] = scit_loss(lp[:4], lp[4:], 0.2).mean().item()

    monkeypatch.setattr(Trainer, "train", fake_train)
    train_scit(cfg, str(tiny_model_dir), pairs, tmp_path / "out")
    assert seen["smoothing"] == 0.35
    for pair, (chosen, rejected) in zip(pairs, zip(seen["examples"][::2], seen["examples"][1::2])):
        lengths = (cfg.data.max_prompt_length, cfg.data.max_response_length)
        y_plus = build_variants(tokenizer, pair.prompt, pair.chosen, systems, *lengths)
        y_minus = build_variants(tokenizer, pair.prompt, pair.rejected, systems, *lengths)
        assert (chosen["match"], chosen["other"]) == (y_plus["pos"], y_plus["neg"])
        assert (rejected["match"], rejected["other"]) == (y_minus["neg"], y_minus["pos"])
    assert seen["loss"] == pytest.approx(seen["want"], abs=1e-6)
    assert seen["kept"][0] == [seen["kept"][1]] and seen["kept"][1] < len(seen["examples"][0]["match"].input_ids)
    # the untrained model scores a reply almost alike under both instructions, yet far beyond that tolerance
    assert abs(seen["want"] - seen["swapped"]) > 1e-5 and abs(seen["want"] - seen["default_eps"]) > 1e-5


def test_dual_trains_the_preferred_side_on_chosen_and_the_dispreferred_on_rejected_replies(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    from rahf.instruct import dual
    from rahf.training import load_data

    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "dual", instruct__train=ONE_STEP)
    pairs = load_data(cfg)[:3]
    trained_on = {}

    def fake_train(model, tokenizer, data, args, stage="sft", eval_dataset=None):  # the replies each side learns
        replies = []
        for row in data:
            start = next(i for i, t in enumerate(row["labels"]) if t != -100)
            replies.append(tokenizer.decode(row["input_ids"][start:]))
        trained_on[Path(args.output_dir).name] = replies
        return model, [], {}

    monkeypatch.setattr(dual, "train_sft_model", fake_train)
    dual.train_dual(cfg, str(tiny_model_dir), pairs, tmp_path / "out")
    for side, reply in (("preferred", "chosen"), ("dispreferred", "rejected")):
        assert len(trained_on[side]) == 3
        for text, pair in zip(trained_on[side], pairs):
            assert text.startswith(getattr(pair, reply)), (side, text)


def test_scit_logs_its_loss_split_into_nll_and_contrast(scit_run):
    import json

    from rahf import pipeline

    rows = json.loads((pipeline.stage_dir(scit_run, "instruct") / "log_history.json").read_text())
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2  # max_steps 2, logging every step
    for r in steps:
        assert r["nll"] > 0 and r["contrast"] > 0
        assert r["nll"] + r["contrast"] == pytest.approx(r["loss"], abs=1e-3)
        assert 0.0 <= r["contrast_accuracy"] <= 1.0
        # the smoothed contrast is smallest at margin log(0.8 / 0.2); -(0.8 log c + 0.2 log(1 - c)) >= its minimum
        assert r["contrast"] >= -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) - 1e-6


@pytest.mark.parametrize(("method", "section"), [("sft", "sft"), ("dual", "instruct")])
def test_a_new_eos_token_is_refused_before_anything_trains(tiny_model_dir, pairs_file, tmp_path, method, section):
    import yaml

    from rahf import preflight
    from rahf.cli import main

    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", method, stages=["sft", "instruct"])
    settings.setdefault(section, {}).setdefault("train", {})["eos_token"] = "<unk>"  # the tiny tokenizer's EOS: </s>
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=rf"^{section}\.train\.eos_token: rahf tokenizes the data before TRL"):
        preflight.preflight(load_config(None, settings))
    assert main(["run", str(tmp_path / "c.yaml")]) == 2 and not (tmp_path / "out").exists()
    settings[section]["train"]["eos_token"] = "</s>"  # the tokenizer's own: nothing to apply later
    preflight.preflight(load_config(None, settings))


def test_a_resumed_dual_logs_the_train_loss_of_the_whole_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    # The Trainer's train_loss averages the steps of one train() call: resumed at a checkpoint it covered only the
    # steps since, and the preferred side, finished before the interruption, ran no step and logged 0.0.
    import json

    from transformers import Trainer

    from rahf.instruct.dual import SIDES, train_dual
    from rahf.training import load_data

    train = ONE_STEP | {"max_steps": 4, "logging_steps": 1, "save_strategy": "steps", "save_steps": 2}
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "dual", instruct__train=train)
    pairs = load_data(cfg)
    original, calls = Trainer.training_step, [0]

    def interrupted(self, *args, **kwargs):  # the dispreferred side's third step, after its checkpoint-2
        calls[0] += 1
        if calls[0] == 4 + 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_dual(cfg, str(tiny_model_dir), pairs, tmp_path / "resumed")
    capsys.readouterr()
    train_dual(cfg, str(tiny_model_dir), pairs, tmp_path / "resumed")
    printed = re.findall(r"'train_loss': '([^']*)'", capsys.readouterr().out)  # the Trainer's summary, one per side
    train_dual(cfg, str(tiny_model_dir), pairs, tmp_path / "whole")
    logs = {run: json.loads((tmp_path / run / "log_history.json").read_text()) for run in ("resumed", "whole")}
    means = []
    for side in SIDES:
        steps = [row["loss"] for row in logs["whole"][side] if "loss" in row]
        assert len(steps) == 4
        means.append(sum(steps) / 4)
        for run in ("resumed", "whole"):
            assert logs[run][side][-1]["train_loss"] == pytest.approx(means[-1], rel=1e-6), (run, side)
    assert printed == [f"{mean:.4g}" for mean in means]

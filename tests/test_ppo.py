"""The `rlhf-ppo` baseline: GAE and KL-penalised rewards by hand, then PPO on the tiny model against a known reward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_settings

from rahf.artifacts import read_manifest
from rahf.baselines import ppo
from rahf.config import load_config
from rahf.demo.task import make_task
from rahf.models import load_tokenizer
from rahf.training import load_stage_model

PPO_LOOP = ppo.ppo_loop
STEPS = 20
# The random tiny model's logits are small (tied embeddings of scale 0.02), so a LoRA on q/v moves them by
# well under one nat; sampling at temperature 0.1 gives it ten times the leverage over what it samples.
PPO = {
    "steps": STEPS,
    "rollout_size": 32,
    "minibatch_size": 16,
    "ppo_epochs": 2,
    "learning_rate": 1e-2,
    "max_new_tokens": 4,
    "temperature": 0.1,
    "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
}


def test_gae_matches_hand_computation():
    """gamma=1, lam=0.5; the second rollout ends after two tokens and its padded value 7 must be ignored."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: deltas 0.9, 0.1 - 0.2, 0.2 - 0.5 -> A2 = 0.9, A1 = -0.1 + 0.5 * 0.9, A0 = -0.3 + 0.5 * 0.35
    # row 2: deltas 2 - 1, 0 + 1 - 1 -> A1 = 1, A0 = 0 + 0.5 * 1
    torch.testing.assert_close(advantages, torch.tensor([[-0.125, 0.35, 0.9], [0.5, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.375, 0.55, 1.0], [1.5, 2.0, 0.0]]))
    white = ppo.whiten(advantages, mask)
    assert ppo.masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ppo.masked_mean(white**2, mask).item() == pytest.approx(4 / 5, rel=1e-4)  # unbiased variance 1 over 5
    assert white[1, 2].item() == 0.0


def test_token_rewards_penalise_kl_and_add_the_score_at_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = ppo.token_rewards(logprobs, ref_logprobs, mask, torch.tensor([3.0, -1.0]), kl_coef=0.1)
    # KL terms 0.5, 0, 0.5 and 1, -0.5, (padding); scores 3 and -1 land on the last real token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.95], [-0.1, 0.05 - 1.0, 0.0]]))


def test_clipped_policy_loss_takes_the_pessimistic_bound():
    """clip 0.2; ratios 1.5, 0.5, 0.9 (log-probs against old ones of 0) with advantages 1, -1, 1; a padded token."""
    new = torch.log(torch.tensor([[1.5, 0.5, 0.9, 50.0]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped = ppo.clipped_policy_loss(new, torch.zeros_like(new), advantages, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2; token 2: max(0.5, 0.8) = 0.8; token 3: inside the clip, -0.9
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.9) / 3, abs=1e-6)
    assert clipped.item() == pytest.approx(2 / 3)


def test_clipped_value_loss_takes_the_larger_error():
    """Old values 0, clip 0.2: new values 1 and -0.5 against returns 0.5 (kept: 0.2 and -0.2); a padded token."""
    values, returns = torch.tensor([[1.0, -0.5, 3.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = ppo.clipped_value_loss(values, torch.zeros_like(values), returns, mask, clip=0.2)
    # token 1: max(0.5^2, 0.3^2) = 0.25; token 2: max(1^2, 0.7^2) = 1
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)


def test_missing_eos_penalty_lowers_the_score_of_unfinished_replies_only():
    scores, has_eos = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([True, False, False])
    torch.testing.assert_close(ppo.penalized_scores(scores, has_eos, 0.5), torch.tensor([1.0, 1.5, -1.5]))
    assert ppo.penalized_scores(scores, has_eos, None) is scores


def test_response_mask_keeps_tokens_up_to_the_first_stop_token():
    responses = torch.tensor([[5, 3, 3, 0], [5, 6, 7, 8], [3, 5, 3, 0], [5, 9, 3, 0]])
    assert ppo.response_mask(responses, [3]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    # EOS (3) and a chat template's end of turn (9): whichever comes first ends the reply
    assert ppo.response_mask(responses, [3, 9]).tolist()[3] == [1, 1, 0, 0]


def test_forward_scores_the_reply_from_the_logits_of_its_positions_only(tiny_model_dir):
    """Log-probabilities and values of the reply tokens equal those read off the whole forward (left-padded rows,
    positions counted from each row's first token), while the forward asks for the reply positions' logits only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = torch.nn.Linear(model.config.hidden_size, 1)
    ids = torch.randint(5, 40, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :2] = 0  # the second prompt is two tokens shorter
    start, temperature = 6, 0.7
    asked = []
    model.register_forward_pre_hook(lambda m, a, kw: asked.append(kw.get("logits_to_keep")), with_kwargs=True)
    with torch.no_grad():
        logprobs, values = ppo.forward(model, head, ids, attn, start, temperature)
        positions = (attn.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, output_hidden_states=True)
    assert asked[0] == 9 - (start - 1)
    expected = torch.log_softmax(out.logits[:, start - 1 : -1] / temperature, -1).gather(-1, ids[:, start:, None])
    torch.testing.assert_close(logprobs, expected.squeeze(-1))
    torch.testing.assert_close(values, head(out.hidden_states[-1][:, start - 1 : -1]).squeeze(-1))
    assert logprobs.shape == values.shape == (2, 9 - start)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A one-label LLaMA scorer whose score is cos(pi * id / (V - 1)) of the text's last token id.

    Its only block is switched off (zero output projections), every embedding is a unit vector in the
    first two dimensions, so the final RMSNorm scales all of them alike and the linear score reads the cosine.
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    n = len(tokenizer)
    config = LlamaConfig(
        vocab_size=n,
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for module in (model.model.layers[0].self_attn.o_proj, model.model.layers[0].mlp.down_proj):
            module.weight.zero_()
        angle = torch.arange(n) * math.pi / (n - 1)
        embeddings = torch.zeros(n, 4)
        embeddings[:, 0], embeddings[:, 1] = torch.cos(angle), torch.sin(angle)
        model.model.embed_tokens.weight.copy_(embeddings)
        model.model.norm.weight.fill_(1.0)
        model.score.weight.copy_(torch.tensor([[0.5, 0.0, 0.0, 0.0]]))  # RMSNorm doubles a unit 4-vector
    path = tmp_path_factory.mktemp("ppo-rm") / "rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_the_last_token(reward_model_dir, tokenizer):
    from rahf.judges import RewardModelJudge

    judge = RewardModelJudge.from_pretrained(str(reward_model_dir))
    prompt = [{"role": "user", "content": "mia asks : what color is a banana ?"}]
    n = len(tokenizer)
    expected = [math.cos(math.pi * tokenizer.convert_tokens_to_ids(w) / (n - 1)) for w in ("!", "yellow")]
    assert judge.score_many([prompt, prompt], ["it is !", "it is yellow"]) == pytest.approx(expected, abs=1e-4)


def _prompts() -> list[list[dict]]:
    return [
        [{"role": "user", "content": p["prompt"]}]
        for p in make_task(n_sft=0, n_pairs=16, n_val=0, n_test=0, seed=0).pairs
    ]


def _train(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **settings):
    """Run `train_ppo` and keep the in-memory policy it trained."""
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "run", "rlhf-ppo", ppo=settings))
    trained = {}

    def keep_policy(cfg, policy, *args):
        trained["policy"] = policy
        return PPO_LOOP(cfg, policy, *args)

    monkeypatch.setattr(ppo, "ppo_loop", keep_policy)
    out = tmp_path / "ppo"
    log = ppo.train_ppo(cfg, str(tiny_model_dir), str(reward_model_dir), _prompts(), out)
    return cfg, log, trained["policy"], out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, pairs_file, reward_model_dir):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _train(
            tmp_path_factory.mktemp("ppo-lora"), monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **PPO
        )


def test_ppo_raises_the_reward_with_growing_kl(lora_run):
    _, log, _, out = lora_run
    assert json.loads((out / "log_history.json").read_text()) == log
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    first = sum(e["score"] for e in log[:3]) / 3
    last = sum(e["score"] for e in log[-3:]) / 3
    assert last > first + 0.3, [round(e["score"], 3) for e in log]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert min(e["kl"] for e in log[5:]) > 0 and log[-1]["kl"] > 0.5
    assert all(1 <= e["response_length"] <= PPO["max_new_tokens"] for e in log)
    assert all(0 <= e["clip_fraction"] <= 1 and math.isfinite(e["value_loss"]) for e in log)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["human : mia asks : what color is a banana ? assistant : it is yellow ."], return_tensors="pt")
    with torch.no_grad():
        return model(**ids.to(model.device)).logits


def test_the_loop_rewards_the_penalized_score(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir):
    """With `missing_eos_penalty`, the per-token rewards carry each reply's score less the penalty when it has no
    stop token (the random model's replies of at most 2 tokens hardly ever end)."""
    rollouts, rewarded = [], []
    rollout, token_rewards = ppo._rollout, ppo.token_rewards
    monkeypatch.setattr(ppo, "_rollout", lambda *a: rollouts.append(rollout(*a)) or rollouts[-1])
    monkeypatch.setattr(ppo, "token_rewards", lambda *a: rewarded.append(a[3]) or token_rewards(*a))
    settings = PPO | {"steps": 1, "max_new_tokens": 2, "temperature": 1.0, "missing_eos_penalty": 4.0}
    _train(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **settings)
    [r], [scores] = rollouts, rewarded
    assert int(r["has_eos"].sum()) < len(scores)
    torch.testing.assert_close(scores, r["scores"] - 4.0 * (~r["has_eos"]).float())


def test_saved_lora_policy_reloads_with_the_trained_logits(lora_run, tiny_model_dir):
    cfg, _, policy, out = lora_run
    assert (out / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(str(out))
    loaded = load_stage_model(out, cfg)
    base = load_stage_model(tiny_model_dir, cfg)
    assert torch.allclose(_logits(loaded, tokenizer), _logits(policy, tokenizer), atol=1e-5)
    assert not torch.allclose(_logits(loaded, tokenizer), _logits(base, tokenizer), atol=1e-3)


def test_ppo_is_deterministic(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir):
    settings = PPO | {"steps": 2}
    runs = [
        _train(tmp_path / str(i), monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **settings) for i in (0, 1)
    ]
    assert runs[0][1] == runs[1][1]


def test_full_finetune_saves_a_whole_model(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir):
    settings = PPO | {"steps": 2, "finetune": "full", "learning_rate": 1e-3}
    cfg, log, policy, out = _train(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **settings)
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[1]["kl"] != 0
    tokenizer = load_tokenizer(str(out))
    loaded = load_stage_model(out, cfg)
    assert torch.equal(_logits(loaded, tokenizer), _logits(policy, tokenizer))
    assert not torch.allclose(_logits(loaded, tokenizer), _logits(load_stage_model(tiny_model_dir, cfg), tokenizer))


def test_ppo_trains_a_multimodal_checkpoints_language_model(tmp_path, tiny_model_dir, pairs_file, reward_model_dir):
    """AutoModelForCausalLM loads gemma-3-4b and up as a vision-language model whose config nests the hidden
    size under text_config; the value head reads the language model's width."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from rahf.judges import RewardModelJudge

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 28, "patch_size": 14}
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision, image_token_index=1))
    settings = PPO | {"steps": 1, "rollout_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "finetune": "full"}
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "run", "rlhf-ppo", ppo=settings))
    judge = RewardModelJudge.from_pretrained(str(reward_model_dir))
    log = PPO_LOOP(cfg, policy, tokenizer, judge, _prompts()[:4])
    assert len(log) == 1 and math.isfinite(log[0]["value_loss"])


def _ppo_run(tmp_path, tiny_model_dir, pairs_file, reward_model_dir, finetune: str):
    settings = PPO | {"steps": 5, "rollout_size": 8, "minibatch_size": 4, "finetune": finetune, "save_steps": 2}
    settings |= {"reward_model": str(reward_model_dir), "learning_rate": 1e-3 if finetune == "full" else 1e-2}
    return load_config(
        None, run_settings(tiny_model_dir, pairs_file, tmp_path, "rlhf-ppo", stages=["instruct"], ppo=settings)
    )


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_an_interrupted_ppo_resumes_and_matches_an_uninterrupted_run(
    finetune, tmp_path, monkeypatch, capsys, tiny_model_dir, pairs_file, reward_model_dir
):
    """With `ppo.save_steps: 2`, a run killed in its 4th rollout resumes from checkpoint-2 (weights, value head,
    optimizer and random state), draws the prompts it would have drawn, and ends with the weights and log of a run
    that never stopped; the checkpoints are gone once the stage is done."""
    from safetensors.torch import load_file

    from rahf import pipeline

    cfg = _ppo_run(tmp_path / "run", tiny_model_dir, pairs_file, reward_model_dir, finetune)
    rollout, calls = ppo._rollout, []

    def counted(*args):
        calls.append(len(calls) + 1)
        if calls[-1] == 4 and not resumed:
            raise KeyboardInterrupt
        return rollout(*args)

    monkeypatch.setattr(ppo, "_rollout", counted)
    resumed = False
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    saves = pipeline.checkpoint_folder(cfg, "instruct")
    assert [p.name for p in saves.glob("checkpoint-*")] == ["checkpoint-2"]
    assert "kept checkpoint-2, step 2 of 5" in capsys.readouterr().out
    assert not list((saves / "checkpoint-2").glob("*.pt*"))  # safetensors and JSON only, nothing pickled

    resumed, calls[:] = True, []
    out = pipeline.run_stage(cfg, "instruct")
    assert len(calls) == 3 and "instruct: resuming from" in capsys.readouterr().out
    assert read_manifest(out)["resumed_from"] == {"checkpoint-2": 2}
    assert not saves.exists()

    whole = _ppo_run(tmp_path / "whole", tiny_model_dir, pairs_file, reward_model_dir, finetune)
    plain = pipeline.run_stage(whole, "instruct")
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in plain.glob("*.safetensors"))
    for name in files:
        a, b = load_file(out / name), load_file(plain / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "log_history.json").read_text()) == json.loads((plain / "log_history.json").read_text())


def test_ppo_save_steps_leaves_the_fingerprint_alone(tmp_path, tiny_model_dir, pairs_file, reward_model_dir):
    from rahf import pipeline

    cfg = _ppo_run(tmp_path, tiny_model_dir, pairs_file, reward_model_dir, "lora")
    other = load_config(None, cfg.to_dict() | {"ppo": cfg.to_dict()["ppo"] | {"save_steps": None}})
    steps = load_config(None, cfg.to_dict() | {"ppo": cfg.to_dict()["ppo"] | {"steps": 6}})
    fp = pipeline.stage_fingerprint(cfg, "instruct")[0]
    assert pipeline.stage_fingerprint(other, "instruct")[0] == fp != pipeline.stage_fingerprint(steps, "instruct")[0]


def test_a_save_cut_short_leaves_nothing_and_a_resume_clears_older_leftovers(
    tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir
):
    """Ctrl-C while a checkpoint is written removes its temporary folder; leftovers of a harder kill (a half-written
    `.tmp`, a half-deleted `.discarded-*`) are removed when the loop starts again."""
    import safetensors.torch

    from rahf import pipeline

    cfg = _ppo_run(tmp_path / "run", tiny_model_dir, pairs_file, reward_model_dir, "lora")
    save_file, calls = safetensors.torch.save_file, []

    def cut(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the second checkpoint's optimizer state
            raise KeyboardInterrupt
        return save_file(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", cut)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg)
    saves = pipeline.checkpoint_folder(cfg, "instruct")
    assert sorted(p.name for p in saves.iterdir() if p.name.startswith(("checkpoint", "."))) == ["checkpoint-2"]
    for leftover in (".checkpoint-4.1-2.tmp", ".checkpoint-2.discarded-1-3"):
        (saves / leftover).mkdir()
        (saves / leftover / "weights.safetensors").write_bytes(b"x" * 1000)
    seen, rollout = [], ppo._rollout
    monkeypatch.setattr(ppo, "_rollout", lambda *a: seen.append(sorted(saves.glob(".checkpoint-*"))) or rollout(*a))
    pipeline.run(cfg)
    assert seen[0] == [] and not saves.exists()


def test_a_library_call_resumes_only_a_checkpoint_of_as_many_steps_and_leaves_none(
    tmp_path, monkeypatch, capsys, tiny_model_dir, pairs_file, reward_model_dir
):
    rollout, calls = ppo._rollout, []

    def counted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return rollout(*args)

    monkeypatch.setattr(ppo, "_rollout", counted)
    settings = PPO | {"steps": 5, "rollout_size": 8, "minibatch_size": 4, "save_steps": 2}
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **settings)
    assert (tmp_path / "ppo" / "checkpoints" / "checkpoint-4").is_dir()
    calls[:] = [0] * 10  # no more interruptions
    _, log, _, out = _train(
        tmp_path, monkeypatch, tiny_model_dir, pairs_file, reward_model_dir, **settings | {"steps": 3}
    )
    assert "not resuming from" in capsys.readouterr().out and [e["step"] for e in log] == [1, 2, 3]
    assert not (out / "checkpoints").exists()


def test_random_state_is_put_back_for_the_devices_it_was_saved_for(tmp_path, monkeypatch):
    """A checkpoint saved with one GPU visible resumes with two: the second keeps its own state."""
    from safetensors.torch import save_file

    head = torch.nn.Linear(2, 1)
    params = {f"value_head.{n}": p for n, p in head.named_parameters()}
    optimizer = torch.optim.AdamW(params.values())
    folder = ppo.save_checkpoint(tmp_path, 1, 3, params, optimizer, [{"step": 1}])
    save_file(
        {"cpu": torch.get_rng_state(), "cuda.0": torch.zeros(8, dtype=torch.uint8)}, folder / "rng_state.safetensors"
    )
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    assert ppo.load_checkpoint(folder, params, optimizer) == [{"step": 1}]
    assert restored == [0]

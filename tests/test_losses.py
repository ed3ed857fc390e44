"""The three loss pieces against numbers worked out by hand (alignment distance, SCIT contrast, response
log-prob), and the tokens and defaults SCIT's step 1 trains with."""

from __future__ import annotations

import math

import pytest
import torch

from rahf.align import alignment_loss, gather_windows, pad_rows
from rahf.instruct.scit import mean_response_logprob, scit_loss, scit_metrics

# ---------------------------------------------------------------- alignment_loss
# B=2 sequences, W=2 window positions, H=2 dims. Sequence 1 has one real token, its 2nd slot is padding.
MASK = torch.tensor([[1, 1], [1, 0]])
# Layer 1: hidden 0, targets give distances 5 (3-4-5), 1, 10 (6-8-10) and a padded slot far away.
H1 = torch.zeros(2, 2, 2)
T1 = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[6.0, 8.0], [100.0, 100.0]]])
# Layer 2: hidden 1, differences (1,0) (0,3) (5,12) -> distances 1, 3, 13; padded slot again far away.
H2 = torch.ones(2, 2, 2)
T2 = H2 + torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[5.0, 12.0], [7.0, -7.0]]])


def test_alignment_loss_is_plain_l2_mean_over_real_tokens():
    # (5 + 1 + 10) / 3 real tokens; the padded slot (distance ~141) contributes nothing.
    loss = alignment_loss({1: H1}, {1: T1}, MASK, norm="tokens")
    assert loss.item() == pytest.approx(16 / 3, abs=1e-6)


def test_alignment_loss_authors_norm_counts_padding_in_the_denominator():
    # Configured window 2: padded slot zeroed but counted, (5 + 1 + 10 + 0) / (2 * 2).
    loss = alignment_loss({1: H1}, {1: T1}, MASK, norm="authors", width=2)
    assert loss.item() == pytest.approx(4.0, abs=1e-6)


def test_alignment_loss_authors_norm_divides_by_the_configured_width_not_the_batchs():
    # Configured window 4, but this batch's longest window is 2: (5 + 1 + 10) / (2 * 4).
    loss = alignment_loss({1: H1}, {1: T1}, MASK, norm="authors", width=4)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    # The same rows in a batch padded to the full width (one with a longer response) keep that scale.
    h, t, mask = torch.zeros(2, 4, 2), torch.full((2, 4, 2), 9.0), torch.zeros(2, 4, dtype=torch.long)
    t[:, :2], mask[:, :2] = T1, MASK
    assert alignment_loss({1: h}, {1: t}, mask, norm="authors", width=4).item() == pytest.approx(2.0, abs=1e-6)


def test_alignment_loss_averages_layers():
    hidden, targets = {1: H1, 2: H2}, {1: T1, 2: T2}
    # tokens: layer 1 16/3, layer 2 (1 + 3 + 13)/3 = 17/3 -> mean 33/6 = 5.5
    assert alignment_loss(hidden, targets, MASK, "tokens").item() == pytest.approx(5.5, abs=1e-6)
    # authors (configured window 2): layer 1 16/4, layer 2 17/4 -> mean 4.125
    assert alignment_loss(hidden, targets, MASK, "authors", width=2).item() == pytest.approx(4.125, abs=1e-6)


def test_alignment_loss_short_responses_weigh_less_only_under_authors_norm():
    # Doubling every distance of the one-token sequence: under "tokens" it is one of three real tokens,
    # under "authors" one of four slots, so the increase differs by exactly the ratio 4/3.
    t1 = T1.clone()
    t1[1, 0] *= 2  # distance 10 -> 20
    for norm, denom in (("tokens", 3), ("authors", 4)):
        delta = alignment_loss({1: H1}, {1: t1}, MASK, norm, 2) - alignment_loss({1: H1}, {1: T1}, MASK, norm, 2)
        assert delta.item() == pytest.approx(10 / denom, abs=1e-5)


def test_alignment_loss_sends_no_gradient_to_padded_positions():
    h = H1.clone().requires_grad_(True)
    alignment_loss({1: h}, {1: T1}, MASK, "tokens").backward()
    assert torch.all(h.grad[1, 1] == 0)
    # d/dh ||h - t|| / 3 = (h - t) / (3 ||h - t||): at (0,0) vs (3,4) -> (-3/5, -4/5) / 3
    assert torch.allclose(h.grad[0, 0], torch.tensor([-0.2, -0.8 / 3]), atol=1e-6)


def test_alignment_loss_of_accumulated_micro_batches_adds_up_to_the_whole_batch():
    # the two rows as two micro-batches of 2 and 1 real tokens: each divided by the step's 3 tokens, they add up to
    # (5 + 1) / 3 + 10 / 3 = 16 / 3, the loss of both rows in one batch (each divided by its own count: 3 + 10)
    parts = [
        alignment_loss({1: H1[i : i + 1]}, {1: T1[i : i + 1]}, MASK[i : i + 1], "tokens", tokens=3) for i in (0, 1)
    ]
    assert sum(parts).item() == pytest.approx(alignment_loss({1: H1}, {1: T1}, MASK, "tokens").item(), abs=1e-6)
    own = [alignment_loss({1: H1[i : i + 1]}, {1: T1[i : i + 1]}, MASK[i : i + 1], "tokens") for i in (0, 1)]
    assert [x.item() for x in own] == pytest.approx([3.0, 10.0])


def test_alignment_loss_all_masked_row_does_not_divide_by_zero():
    loss = alignment_loss({1: H1}, {1: T1}, torch.zeros(2, 2, dtype=torch.long), "tokens")
    assert loss.item() == 0.0


# ---------------------------------------------------------------- gather_windows / pad_rows


def test_gather_windows_picks_each_rows_positions_and_clamps_at_the_end():
    # hidden[b, t] = 10 * b + t (H = 1)
    hidden = (10 * torch.arange(2)[:, None] + torch.arange(5)[None]).float()[..., None]
    out = gather_windows(hidden, torch.tensor([1, 3]), width=3)
    assert out.shape == (2, 3, 1)
    assert out[..., 0].tolist() == [[1, 2, 3], [13, 14, 14]]  # row 1: positions 3, 4, then 4 again (clamped)


def test_gather_windows_keeps_gradients():
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    gather_windows(hidden, torch.tensor([0, 2]), width=2).sum().backward()
    expected = torch.zeros(2, 6)
    expected[0, 0:2] = 1
    expected[1, 2:4] = 1
    assert torch.equal(hidden.grad[..., 0], expected)


def test_pad_rows_zero_pads_ragged_rows():
    out = pad_rows([torch.ones(2, 3), 2 * torch.ones(1, 3)], width=3)
    assert out.shape == (2, 3, 3)
    assert out[:, :, 0].tolist() == [[1, 1, 0], [2, 0, 0]]


# ---------------------------------------------------------------- scit_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_scit_loss_hand_computed():
    # match = -1, other = -2, eps = 0.2: d = 1
    # loss = 1 + [-(0.8) log sigmoid(1) - 0.2 log sigmoid(-1)] = 1 + 0.8 * 0.313262 + 0.2 * 1.313262
    expected = 1 + (-0.8 * _log_sigmoid(1.0) - 0.2 * _log_sigmoid(-1.0))
    assert expected == pytest.approx(1.5132617, abs=1e-6)
    got = scit_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), 0.2)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_scit_metrics_are_the_same_from_one_array_or_a_list_of_batches():
    """`eval_do_concat_batches: false` hands compute_metrics one array per batch, the last one shorter; the metrics
    are still means over the examples: nll 1.5 (-(-1 - 3 - 0.5 - 1.5) / 4), contrast accuracy 3/4, margin 0.875."""
    from types import SimpleNamespace

    import numpy as np

    rows = np.array([[-1.0, -2.0], [-3.0, -0.5], [-0.5, -1.0], [-1.5, -5.0]])
    metrics = scit_metrics(0.2)
    whole = metrics(SimpleNamespace(predictions=rows))
    assert whole["nll"] == pytest.approx(1.5) and whole["contrast_accuracy"] == 0.75
    assert whole["logprob_margin"] == pytest.approx((1 - 2.5 + 0.5 + 3.5) / 4)
    assert metrics(SimpleNamespace(predictions=[rows[:3], rows[3:]])) == whole


def test_scit_loss_equals_the_softmax_form_of_the_spec():
    # c = s_match / (s_match + s_other), s = exp(mean log p); contrast = -(1-eps) log c - eps log(1-c)
    match = torch.tensor([-1.0, -3.0, -0.5, -2.0])
    other = torch.tensor([-2.0, -0.5, -0.5, -2.5])
    for eps in (0.0, 0.2, 0.4):
        got = scit_loss(match, other, eps)
        for i in range(4):
            sm, so = math.exp(match[i].item()), math.exp(other[i].item())
            c = sm / (sm + so)
            expected = -match[i].item() - (1 - eps) * math.log(c) - eps * math.log(1 - c)
            assert got[i].item() == pytest.approx(expected, abs=1e-5)


def test_scit_loss_gradients_push_match_up_and_other_down():
    match = torch.tensor([-1.0], requires_grad=True)
    other = torch.tensor([-1.0], requires_grad=True)
    scit_loss(match, other, 0.2).sum().backward()
    # d/dm = -1 - (1 - eps) sigmoid(-d) + eps sigmoid(d) at d = 0: -1 - 0.4 + 0.1 = -1.3; d/do = +0.3
    assert match.grad.item() == pytest.approx(-1.3, abs=1e-6)
    assert other.grad.item() == pytest.approx(0.3, abs=1e-6)


# ---------------------------------------------------------------- mean_response_logprob


def test_mean_response_logprob_hand_computed():
    ln = math.log
    # V = 3. Row 0: ids [0, 1, 2, 1], response = positions 2, 3 -> tokens 2 and 1, predicted at positions 1 and 2.
    # Row 1: ids [0, 2, 1, pad], response = positions 1, 2 -> tokens 2 and 1, predicted at positions 0 and 1.
    ids = torch.tensor([[0, 1, 2, 1], [0, 2, 1, 0]])
    resp = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    logits = torch.zeros(2, 4, 3)
    logits[0, 0] = torch.tensor([50.0, -50.0, 0.0])  # predicts a prompt token: must be ignored
    logits[0, 1] = torch.tensor([0.0, 0.0, ln(2)])  # p(2) = 2 / 4
    logits[0, 2] = torch.tensor([0.0, ln(3), 0.0])  # p(1) = 3 / 5
    logits[0, 3] = torch.tensor([0.0, -50.0, 0.0])  # after the last token: never used
    logits[1, 0] = torch.tensor([ln(3), 0.0, 0.0])  # p(2) = 1 / 5
    logits[1, 1] = torch.tensor([0.0, 0.0, 0.0])  # p(1) = 1 / 3
    logits[1, 2] = torch.tensor([-50.0, 50.0, -50.0])  # predicts the pad: must be ignored
    got = mean_response_logprob(logits, ids, resp)
    expected = [(ln(2 / 4) + ln(3 / 5)) / 2, (ln(1 / 5) + ln(1 / 3)) / 2]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_mean_response_logprob_is_a_per_token_mean_not_a_sum():
    # Same per-token probability, different response lengths -> same score.
    v = 4
    logits = torch.zeros(2, 6, v)  # uniform: log p = -log 4 everywhere
    ids = torch.zeros(2, 6, dtype=torch.long)
    resp = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]])
    got = mean_response_logprob(logits, ids, resp)
    assert got.tolist() == pytest.approx([-math.log(v)] * 2, abs=1e-6)


def test_normalized_difference_hand_computed():
    """Two states that differ only in scale have no normalized difference; one at unit rms is compared as is."""
    from rahf.collect import difference, normalized_difference

    o = torch.tensor([[3.0, 4.0]])  # rms = sqrt(12.5)
    plus = torch.tensor([[1.0, 1.0]])  # rms 1
    minus = torch.tensor([[2.0, 2.0]])  # rms 2: the same direction, twice the scale
    assert torch.equal(difference(o, plus, minus), torch.tensor([[-1.0, -1.0]]))
    assert torch.allclose(normalized_difference(o, plus, minus), torch.zeros(1, 2))
    minus = torch.tensor([[1.0, -1.0]])  # rms 1, another direction
    want = (12.5**0.5) * torch.tensor([[0.0, 2.0]])
    assert torch.allclose(normalized_difference(o, plus, minus), want)
    assert torch.allclose(normalized_difference(o, plus, 5 * minus), want)  # invariant to each state's scale


# ---------------------------------------------------------------- SCIT step-1 inputs and defaults


def test_scit_scores_the_same_response_ids_under_instructions_of_different_lengths(
    tokenizer, tiny_model_dir, tmp_path, pairs_file
):
    from conftest import run_settings, standard_records

    from rahf.config import load_config
    from rahf.data import PreferencePair
    from rahf.instruct.scit import SCITCollator, scit_examples

    instructions = {"preferred": "you are a polite assistant .", "dispreferred": "you are a rude and wrong assistant ."}
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", instructions=instructions))
    pairs = [
        PreferencePair(({"role": "user", "content": r["prompt"]},), r["chosen"], r["rejected"], "test")
        for r in standard_records(3, seed=0)
    ]
    examples = scit_examples(tokenizer, pairs, cfg)
    batch = SCITCollator(tokenizer.pad_token_id)(examples)
    ids, resp, b = batch["input_ids"], batch["response_mask"].bool(), len(examples)
    for i, e in enumerate(examples):
        assert e["match"].response_start != e["other"].response_start  # the prompts differ in length
        want = list(e["match"].input_ids[e["match"].response_start :])
        assert ids[i][resp[i]].tolist() == want
        assert ids[b + i][resp[b + i]].tolist() == want


@pytest.mark.parametrize(("finetune", "lr"), [("lora", 2e-4), ("full", 2e-5)])
def test_scit_default_learning_rate_matches_duals_per_finetune(
    monkeypatch, tiny_model_dir, pairs_file, tmp_path, finetune, lr
):
    from conftest import run_settings

    from rahf.config import load_config
    from rahf.instruct import scit

    class Captured(Exception):
        pass

    def capture(cls, cfg, out, overrides, **defaults):
        raise Captured(defaults["learning_rate"])

    monkeypatch.setattr(scit, "training_args", capture)
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", instruct__finetune=finetune)
    with pytest.raises(Captured) as got:
        scit.train_scit(load_config(None, settings), str(tiny_model_dir), [], tmp_path)
    assert got.value.args[0] == lr


def test_alignment_trains_the_base_without_dropout_but_keeps_loras():
    # Targets are read in eval mode, so base-model dropout (GPT-2 has it) would be noise no adapter can fit.
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from rahf.align import without_dropout

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.5
    ids = torch.arange(10)[None]
    noisy = GPT2LMHeadModel(cfg).train()
    assert not torch.equal(noisy(ids).logits, noisy(ids).logits)  # dropout is live before
    model = without_dropout(noisy).train()
    assert torch.equal(model(ids).logits, model(ids).logits)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.1))
    drops = [(n, m.p) for n, m in peft.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert any("lora_dropout" in n for n, _ in drops)
    assert all(p == (0.1 if "lora_dropout" in n else 0.0) for n, p in drops)


def _noisy(arch: str):
    """A tiny model of `arch` with every train-mode noise rate it reads (from modules or its config) at 0.3."""
    import transformers as T

    c = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
    return {
        # float fields of the blocks (dropout), of the decoder (layerdrop: whole blocks skipped)
        "opt": lambda: T.OPTConfig(**c, ffn_dim=48, word_embed_proj_dim=32, dropout=0.3, layerdrop=0.3),
        "falcon": lambda: T.FalconConfig(**c, hidden_dropout=0.3, attention_dropout=0.3),  # read from the config
        "mixtral": lambda: T.MixtralConfig(
            **c, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, router_jitter_noise=0.3
        ),
        "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, resid_pdrop=0.3, attn_pdrop=0.3),
    }[arch]()


@pytest.mark.parametrize("arch", ["opt", "falcon", "mixtral", "gpt2"])
def test_alignment_trains_the_base_without_any_train_mode_noise(arch):
    """A training forward of the base must give the eval-mode states collect reads (OPT, Falcon and Mixtral read their
    rates from plain float fields, not dropout modules), and gradient checkpointing must stay on."""
    from transformers import AutoModelForCausalLM

    from rahf.align import without_dropout
    from rahf.models import forward_capture

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_noisy(arch))
    model.gradient_checkpointing_enable()
    ids = torch.randint(4, 64, (2, 10))
    with torch.no_grad():
        clean = forward_capture(model.eval(), [3], ids, torch.ones_like(ids))[3]
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)  # noisy before
        without_dropout(model).train()
        assert torch.equal(forward_capture(model, [3], ids, torch.ones_like(ids))[3], clean)
    assert model.is_gradient_checkpointing


def test_dual_step1_defaults_are_the_authors_schedule_and_a_setting_overrides_them(
    monkeypatch, tiny_model_dir, pairs_file, tmp_path
):
    """Two SFTs of 3 epochs with a cosine schedule (the authors' Dual step 1); `instruct.train` wins."""
    from conftest import run_settings
    from trl import SFTConfig

    from rahf.config import load_config
    from rahf.instruct import dual

    made = []

    class Captured(Exception):
        pass

    def capture(cls, cfg, out, overrides, **defaults):
        made.append(dual_training_args(cls, cfg, out, overrides, **defaults))
        raise Captured

    dual_training_args = dual.training_args
    monkeypatch.setattr(dual, "training_args", capture)
    for train, schedule in (({}, "cosine"), ({"lr_scheduler_type": "linear"}, "linear")):
        settings = run_settings(tiny_model_dir, pairs_file, tmp_path, "dual", instruct__train=train)
        with pytest.raises(Captured):
            dual.train_dual(load_config(None, settings), str(tiny_model_dir), [], tmp_path)
        assert isinstance(made[-1], SFTConfig) and made[-1].lr_scheduler_type.value == schedule
        assert made[-1].num_train_epochs == 3

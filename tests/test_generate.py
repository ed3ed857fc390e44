"""Generation draws from the model's own distribution: no checkpoint or library sampling defaults leak in."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from rahf.generate import generate
from rahf.models import load_model

PROMPT = [{"role": "user", "content": "mia asks : what color is a banana ?"}]


@pytest.fixture()
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_a_checkpoints_generation_settings_change_nothing(model, tiny_model_dir, tokenizer):
    greedy = generate(model, tokenizer, [PROMPT], max_new_tokens=8, temperature=0.0, progress=False)
    sampled = generate(model, tokenizer, [PROMPT] * 16, max_new_tokens=8, temperature=1.0, seed=0, progress=False)
    assert len(set(sampled)) > 1
    shipped = load_model(str(tiny_model_dir), device="cpu")
    shipped.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, top_k=1, min_new_tokens=8)
    # and what a block list of processors would miss: other processors, a clock, another output type
    shipped.generation_config.update(guidance_scale=2.0, encoder_repetition_penalty=2.0, max_time=1e-9)
    shipped.generation_config.update(return_dict_in_generate=True, stop_strings=["blue"])
    assert generate(shipped, tokenizer, [PROMPT], max_new_tokens=8, temperature=0.0, progress=False) == greedy
    # with top_k=1 leaking in, every sample would be the greedy reply
    assert generate(shipped, tokenizer, [PROMPT] * 16, max_new_tokens=8, temperature=1.0, progress=False) == sampled
    assert shipped.generation_config.max_time == 1e-9  # put back afterwards


def test_sampling_reaches_beyond_the_fifty_likeliest_tokens(model, tokenizer):
    """transformers fills an unset top_k with 50; at a very high temperature the first token is nearly
    uniform over the whole vocabulary, so 600 draws show far more than 50 distinct tokens."""
    assert len(tokenizer) > 100
    replies = generate(
        model, tokenizer, [PROMPT] * 600, max_new_tokens=1, temperature=1000.0, batch_size=600, progress=False
    )
    assert len(set(replies)) > 60


def test_a_sampled_reply_depends_on_the_seed_and_its_prompt_not_on_the_batch(model, tokenizer):
    """Changing generate.batch_size (to fit memory) or the other prompts in the file keeps each sample."""
    other = [{"role": "user", "content": "fred asks : what color is the sky and what color is a tomato ?"}]
    prompts = [PROMPT, other, PROMPT, other, PROMPT, PROMPT]
    args = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3, "progress": False}
    together = generate(model, tokenizer, prompts, batch_size=6, **args)
    assert len(set(together)) > 2
    assert generate(model, tokenizer, prompts, batch_size=1, **args) == together
    assert generate(model, tokenizer, prompts[:3], batch_size=2, **args) == together[:3]
    assert generate(model, tokenizer, prompts, batch_size=6, **(args | {"seed": 4})) != together


def test_a_tokenizer_without_a_pad_token_pads_with_eos(model, tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    assert bare.pad_token_id is None
    prompts = [PROMPT, [{"role": "user", "content": "fred asks : what color is a tomato ?"}]]
    expected = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0.0, progress=False)
    assert generate(model, bare, prompts, max_new_tokens=6, temperature=0.0, progress=False) == expected


@pytest.mark.parametrize("prompt", ['""', "[]"])
def test_an_empty_prompt_in_a_prompts_file_is_refused(tmp_path, prompt):
    from rahf.errors import DataError
    from rahf.generate import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n{"prompt": ' + prompt + "}\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: field 'prompt' must be a non-empty"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ([{"role": "bot", "content": 3}], "field 'prompt' message 0 has role 'bot'"),
        (["hello"], "field 'prompt' message 0 must be an object, got str"),
        ([{"role": "user", "content": 3}], "field 'prompt' message 0 content must be a string, got int"),
        ([{"role": "user", "content": "mia asks"}, {"role": "assistant", "content": "it is"}],
         "field 'prompt': the prompt must end with a user message, got 'assistant'"),
        ([{"role": "user", "content": "mia \ud83d"}], r"field 'prompt' message 0 content holds a lone surrogate"),
        ("mia \ud83d", r"field 'prompt' holds a lone surrogate"),
    ],
)  # fmt: skip
def test_a_malformed_prompt_in_a_prompts_file_is_refused_like_preference_data(tmp_path, prompt, problem):
    from rahf.errors import DataError
    from rahf.generate import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n' + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(DataError, match=rf"prompts\.jsonl:2: {problem}"):
        read_prompts(path)


def test_rahf_generate_refuses_a_malformed_prompt_before_loading_a_model(
    tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch
):
    import rahf.training
    from rahf.cli import main

    monkeypatch.setattr(rahf.training, "load_stage_model", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [PROMPT[0], {"role": "assistant", "content": "it is"}]}) + "\n")
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "out"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n"
        f"generate:\n  model: {tiny_model_dir}\n  prompts: {prompts}\n"
    )
    assert main(["generate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rahf: error: {prompts}:1: field 'prompt': the prompt must end with a user message")
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz", "P.JSONL", "P.JSONL.GZ"])
def test_a_prompt_only_file_is_read_under_any_name_the_data_loader_reads_as_jsonl(tmp_path, name):
    from rahf.generate import read_prompts

    text = '{"prompt": "mia asks"}\n{"prompt": [{"role": "user", "content": "fred asks"}]}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.lower().endswith(".gz") else text.encode())
    assert read_prompts(path) == [[{"role": "user", "content": "mia asks"}], [{"role": "user", "content": "fred asks"}]]


def test_generation_stops_at_the_chat_templates_end_of_turn(model, tokenizer):
    """A template that closes assistant turns with a token other than EOS (ChatML's <|im_end|> on a base
    model's tokenizer): replies are trained to end with it, so generation must stop there too."""
    import copy

    from rahf.stimuli import end_of_turn_id, response_ids

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} <unk>{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    unk, yellow = chat.unk_token_id, chat.convert_tokens_to_ids("yellow")
    assert end_of_turn_id(chat) == unk != chat.eos_token_id
    assert response_ids(chat, "it is yellow .", 16)[-1] == unk
    steps = []

    def force(_module, _inputs, logits):  # step 3 ends the turn; anything after it would be "yellow"
        steps.append(1)
        logits[:, -1, unk if len(steps) == 3 else yellow] += 100.0 * (len(steps) >= 3)
        return logits

    model.lm_head.register_forward_hook(force)
    reply = generate(model, chat, [PROMPT], max_new_tokens=8, temperature=0.0, progress=False)[0]
    assert len(reply.split()) == 2 and "yellow" not in reply and len(steps) == 3


def test_generation_stops_where_the_checkpoint_says_too(model, tokenizer):
    """A checkpoint's generation config may list more stop tokens than EOS and the end of turn (Llama 3.1's
    <|eom_id|>): `model.generate` and servers stop there, so the judged reply must end there too."""
    extra, yellow = tokenizer.convert_tokens_to_ids("whatever"), tokenizer.convert_tokens_to_ids("yellow")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    steps = []

    def force(_module, _inputs, logits):  # step 2 emits the shipped stop token; anything after it "yellow"
        steps.append(1)
        logits[:, -1, extra if len(steps) == 2 else yellow] += 100.0
        return logits

    model.lm_head.register_forward_hook(force)
    reply = generate(model, tokenizer, [PROMPT], max_new_tokens=6, temperature=0.0, progress=False)[0]
    assert reply == "yellow" and len(steps) == 2  # the stop token ends the reply and is not part of it


def test_special_tokens_the_model_emits_inside_a_reply_stay_in_its_text(model, tokenizer):
    """A BOS or pad in the middle of a reply is a broken reply: the judge must see it, not a cleaned-up text."""
    from rahf.demo.task import Fact, gold_score

    words = "of course ! <s> it <pad> is yellow . hope this helps ! </s>".split()
    plan = [tokenizer.convert_tokens_to_ids(w) for w in words]
    steps = []

    def force(_module, _inputs, logits):
        logits[:, -1, plan[min(len(steps), len(plan) - 1)]] += 100.0
        steps.append(1)
        return logits

    model.lm_head.register_forward_hook(force)
    reply = generate(model, tokenizer, [PROMPT], max_new_tokens=20, temperature=0.0, progress=False)[0]
    assert reply == "of course ! <s> it <pad> is yellow . hope this helps !"  # the closing </s> is not text
    assert gold_score(Fact("mia", "banana"), reply) == -1  # malformed, where the cleaned text scored 4


def test_a_saved_model_keeps_the_stop_tokens_it_shipped_with(model, tokenizer, tmp_path):
    import copy

    from transformers import GenerationConfig

    from rahf.models import save_model

    extra = tokenizer.convert_tokens_to_ids("whatever")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} <unk> {% endfor %}"
    save_model(model, chat, tmp_path / "chat")
    stops = GenerationConfig.from_pretrained(tmp_path / "chat").eos_token_id
    assert stops == sorted([chat.eos_token_id, chat.unk_token_id, extra])


def test_a_saved_model_lists_the_end_of_turn_among_its_stop_tokens(model, tokenizer, tmp_path):
    import copy

    from transformers import GenerationConfig

    from rahf.models import save_model

    save_model(model, tokenizer, tmp_path / "plain")  # no chat template: EOS alone, as before
    assert GenerationConfig.from_pretrained(tmp_path / "plain").eos_token_id == tokenizer.eos_token_id
    model.generation_config.eos_token_id = None  # a checkpoint that names none: the EOS replies stop at is written
    save_model(model, tokenizer, tmp_path / "none")
    assert GenerationConfig.from_pretrained(tmp_path / "none").eos_token_id == tokenizer.eos_token_id
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} <unk> {% endfor %}"
    save_model(model, chat, tmp_path / "chat")
    stops = GenerationConfig.from_pretrained(tmp_path / "chat").eos_token_id
    assert stops == sorted([chat.eos_token_id, chat.unk_token_id])


def test_a_checkpoint_shipping_sampling_flags_without_do_sample_still_saves(tiny_model_dir, tokenizer, tmp_path):
    """transformers loads such a generation config with a warning but refuses to save it once edited (here by
    the end-of-turn stop token); the flags are saved back as shipped."""
    import copy
    import json
    import shutil

    from transformers import GenerationConfig

    from rahf.models import save_model

    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_model_dir, shipped)
    gen = json.loads((shipped / "generation_config.json").read_text())
    (shipped / "generation_config.json").write_text(json.dumps(gen | {"temperature": 0.6, "top_p": 0.9}))
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} <unk> {% endfor %}"
    save_model(load_model(str(shipped), device="cpu"), chat, tmp_path / "out")
    saved = GenerationConfig.from_pretrained(tmp_path / "out")
    assert saved.eos_token_id == sorted([chat.eos_token_id, chat.unk_token_id])
    assert (saved.temperature, saved.top_p, saved.do_sample) == (0.6, 0.9, None)


def test_prompts_are_read_from_any_file_the_data_loader_reads(tmp_path):
    import datasets

    from rahf.generate import read_prompts

    rows = [{"prompt": "hi"}, {"prompt": [{"role": "user", "content": "what color is a lime ?"}]}]
    want = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what color is a lime ?"}]]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert read_prompts(tmp_path / "p.json") == want
    datasets.Dataset.from_list([{"prompt": "hi"}, {"prompt": "what color is a lime ?"}]).to_parquet(
        tmp_path / "p.parquet"
    )
    assert read_prompts(tmp_path / "p.parquet") == [want[0], [{"role": "user", "content": "what color is a lime ?"}]]


def test_generate_seed_reseeds_the_replies_alone(scit_run, tiny_model_dir, pairs_file, tmp_path):
    """Another `generate.seed` (MT-Bench's second turns) makes only `generate` stale, and samples as that run seed
    would; the run's `seed` would make every trained stage stale."""
    import shutil

    from conftest import run_settings

    from rahf import pipeline
    from rahf.config import load_config
    from rahf.errors import RahfError
    from rahf.generate import read_prompts
    from rahf.models import load_tokenizer

    out = shutil.copytree(scit_run.output_dir, tmp_path / "run")

    def cfg_with(**extra):
        settings = run_settings(tiny_model_dir, pairs_file, out, "scit", generate__prompts=str(pairs_file), **extra)
        return load_config(None, settings | {"generate": settings["generate"] | {"temperature": 1.0}})

    with pytest.raises(RahfError, match=r"made with other settings \(changed: seed\)"):
        pipeline.stage_fingerprint(cfg_with(seed=1), "generate")
    for stage in ("instruct", "collect", "align", "merge"):
        assert pipeline.stage_fingerprint(cfg_with(generate__seed=1), stage) == pipeline.stage_fingerprint(
            cfg_with(), stage
        )
    cfg = cfg_with(generate__seed=1)
    assert pipeline.stage_fingerprint(cfg, "generate") != pipeline.stage_fingerprint(cfg_with(), "generate")
    # the seed replies are drawn with is covered as `seed`, as before the key existed: the same seed, the same artifact
    fp, covered = pipeline.stage_fingerprint(cfg_with(generate__seed=0), "generate")
    assert (fp, covered) == pipeline.stage_fingerprint(cfg_with(), "generate") and "seed" not in covered["generate"]
    made = pipeline.run_stage(cfg, "generate", force=True)
    rows = [json.loads(line) for line in (made / "generations.jsonl").open()]
    replies = [row["response"] for row in rows]
    ends = [row["finish_reason"] for row in rows]  # the manifest counts those max_new_tokens cut
    assert set(ends) <= {"stop", "length"} and json.loads((made / "rahf_manifest.json").read_text())[
        "cut"
    ] == ends.count("length")
    merged = str(pipeline.stage_dir(cfg, "merge"))
    model, tokenizer, prompts = load_model(merged, device="cpu"), load_tokenizer(merged), read_prompts(pairs_file)
    g, length = cfg.generate, cfg.data.max_prompt_length
    by_seed = {
        seed: generate(model, tokenizer, prompts, g.max_new_tokens, 1.0, max_prompt_length=length, seed=seed)
        for seed in (0, 1)
    }
    assert replies == by_seed[1] != by_seed[0]


def test_a_reply_says_whether_a_stop_token_or_max_new_tokens_ended_it(model, tokenizer):
    """finish_reason, as OpenAI's API and vLLM name it: "stop" at a stop token, "length" when cut first."""
    from rahf.generate import Reply, replies

    bias = torch.zeros(len(tokenizer))
    hook = model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    try:
        bias[tokenizer.eos_token_id] = -1e4  # never stops
        (cut,) = replies(model, tokenizer, [PROMPT], max_new_tokens=3, progress=False)
        assert cut.finish_reason == "length" and len(tokenizer(cut.text, add_special_tokens=False)["input_ids"]) == 3
        bias[tokenizer.eos_token_id] = 1e4  # stops at once
        assert replies(model, tokenizer, [PROMPT], max_new_tokens=3, progress=False) == [Reply("", "stop")]
    finally:
        hook.remove()


def test_a_saved_mixture_of_experts_generates_in_padded_batches(tokenizer, tmp_path):
    """TRL's SFT turns the router logits on for its auxiliary loss; saved so, a padded batched generate would fail
    in that loss (it cannot read the padding), after every training stage had run."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from rahf.models import save_model

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config.output_router_logits = True  # as SFTTrainer leaves it
    save_model(model, tokenizer, tmp_path / "moe")
    saved = load_model(str(tmp_path / "moe"), device="cpu")
    assert saved.config.output_router_logits is False
    other = [{"role": "user", "content": "fred asks : what color is the sky and what color is a tomato ?"}]
    assert len(generate(saved, tokenizer, [PROMPT, other], max_new_tokens=4, batch_size=2, progress=False)) == 2

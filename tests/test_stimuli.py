"""Token sequences (what training, collection and inference see) and reading hidden states from decoder blocks."""

from __future__ import annotations

import signal
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from rahf.demo.task import NAMES
from rahf.errors import ConfigError, DataError
from rahf.stimuli import (
    Stimulus,
    build_variants,
    end_of_turn_id,
    prompt_ids,
    render_prompt,
    response_ids,
    tally,
    truncate_prompt,
)

POS = "you are a polite and correct assistant ."  # 8 tokens
NEG = "you are rude ."  # 4 tokens: the variants have different prompt lengths
SYSTEMS = {"plain": None, "pos": POS, "neg": NEG}
QUERY = "mia asks : what color is a banana ?"  # 9 tokens
RESPONSE = "of course ! it is yellow . hope this helps !"  # 11 tokens


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def query_part(tokenizer, s: Stimulus) -> list[int]:
    """The tokens between the last "Human:" tag and the "Assistant:" tag of the prompt."""
    prompt = list(s.input_ids[: s.response_start])
    human = tokenizer.convert_tokens_to_ids("Human:")
    start = len(prompt) - prompt[::-1].index(human)
    return prompt[start:-1]


# ---------------------------------------------------------------- build_variants


def test_variants_share_response_ids_and_have_hand_computed_prompt_lengths(tokenizer):
    v = build_variants(tokenizer, [user(QUERY)], RESPONSE, SYSTEMS, max_prompt_length=64, max_response_length=64)
    # <s> Human: <9 query tokens> Assistant:  -> 12; the instructions add 8 and 4 tokens.
    assert {k: s.response_start for k, s in v.items()} == {"plain": 12, "pos": 20, "neg": 16}
    expected_response = ids_of(tokenizer, RESPONSE) + [tokenizer.eos_token_id]
    assert len(expected_response) == 12
    for s in v.values():
        assert list(s.input_ids[s.response_start :]) == expected_response
        assert s.response_len == 12
    assert tokenizer.convert_ids_to_tokens(list(v["pos"].input_ids[:11])) == ["<s>", *POS.split(), "Human:", "mia"]


def test_no_bos_after_position_zero_and_response_ends_with_eos(tokenizer):
    v = build_variants(tokenizer, [user(QUERY)], RESPONSE, SYSTEMS, 64, 64)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for s in v.values():
        assert s.input_ids[0] == bos
        assert bos not in s.input_ids[1:]
        assert s.input_ids[-1] == eos
        assert s.input_ids.count(eos) == 1
        assert tokenizer.convert_ids_to_tokens(s.input_ids[s.response_start - 1]) == "Assistant:"


def test_the_sequence_is_what_one_tokenization_of_the_whole_text_gives(tokenizer):
    # The response is tokenized on its own, but the ids equal tokenizing prompt + response as one text.
    s = build_variants(tokenizer, [user(QUERY)], RESPONSE, {"plain": None}, 64, 64)["plain"]
    whole = tokenizer(f"Human: {QUERY}\n\nAssistant: {RESPONSE}")["input_ids"] + [tokenizer.eos_token_id]
    assert list(s.input_ids) == whole


def test_long_responses_are_cut_and_lose_their_eos(tokenizer):
    assert response_ids(tokenizer, RESPONSE, 4) == ids_of(tokenizer, "of course ! it")
    assert response_ids(tokenizer, RESPONSE, 12)[-1] == tokenizer.eos_token_id
    assert response_ids(tokenizer, RESPONSE, 11) == ids_of(tokenizer, RESPONSE)  # text fills it: no EOS
    v = build_variants(tokenizer, [user(QUERY)], RESPONSE, SYSTEMS, 64, max_response_length=4)
    for s in v.values():
        assert list(s.input_ids[s.response_start :]) == ids_of(tokenizer, "of course ! it")


def test_long_prompt_loses_its_beginning_and_keeps_instruction_and_assistant_tag(tokenizer):
    query = " ".join(NAMES[:20])  # 20 tokens
    max_len = 20
    v = build_variants(tokenizer, [user(query)], RESPONSE, SYSTEMS, max_prompt_length=max_len, max_response_length=64)
    # Overheads: plain 3 (<s> Human: Assistant:), pos 11, neg 7. The longest instructed variant (pos) must
    # fit in 20, so at most 9 query tokens remain, the same in both instructed variants; the plain variant
    # is truncated on its own, as at inference, and keeps 17.
    kept = {k: query_part(tokenizer, s) for k, s in v.items()}
    assert kept["pos"] == kept["neg"]
    n = len(kept["pos"])
    assert 1 <= n <= 9
    assert len(kept["plain"]) == 17
    for part in kept.values():  # the END of the query survives
        assert part == ids_of(tokenizer, " ".join(NAMES[20 - len(part) : 20]))
    assert max(s.response_start for s in v.values()) <= max_len
    assert {k: s.response_start - len(kept[k]) for k, s in v.items()} == {"plain": 3, "pos": 11, "neg": 7}
    assert tokenizer.convert_ids_to_tokens(list(v["pos"].input_ids[1:9])) == POS.split()
    assert tokenizer.convert_ids_to_tokens(list(v["neg"].input_ids[1:5])) == NEG.split()
    for s in v.values():
        assert tokenizer.convert_ids_to_tokens(s.input_ids[s.response_start - 1]) == "Assistant:"
        assert list(s.input_ids[s.response_start :]) == ids_of(tokenizer, RESPONSE) + [tokenizer.eos_token_id]


def test_long_prompt_keeps_as_much_of_the_query_as_fits(tokenizer):
    query = " ".join(NAMES[:20])
    v = build_variants(tokenizer, [user(query)], RESPONSE, SYSTEMS, max_prompt_length=20, max_response_length=64)
    assert v["pos"].response_start == 20  # 11 overhead + the last 9 query tokens
    # 12 = 11 overhead + 1 query token: the last query token fits, so this must not raise.
    v = build_variants(tokenizer, [user(QUERY)], RESPONSE, SYSTEMS, max_prompt_length=12, max_response_length=64)
    assert query_part(tokenizer, v["pos"]) == ids_of(tokenizer, "?")


def test_prompt_too_short_for_instruction_and_template_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="data.max_prompt_length=10"):
        build_variants(tokenizer, [user(QUERY)], RESPONSE, SYSTEMS, max_prompt_length=10, max_response_length=64)


def test_multi_turn_prompts_drop_the_oldest_turns_first(tokenizer):
    prompt = [
        user("mia asks : what color is a banana ?"),
        {"role": "assistant", "content": "it is yellow ."},
        user("leo asks : what color is a sky ?"),
    ]
    full = build_variants(tokenizer, prompt, RESPONSE, SYSTEMS, max_prompt_length=64, max_response_length=64)
    # plain: <s> Human: 9 Assistant: 4 Human: 9 Assistant: = 27 tokens; pos 35
    assert full["plain"].response_start == 27 and full["pos"].response_start == 35
    cut = build_variants(tokenizer, prompt, RESPONSE, SYSTEMS, max_prompt_length=24, max_response_length=64)
    # Dropping the first exchange (user + assistant) is enough: pos = <s> 8 Human: 9 Assistant: = 20.
    assert cut["pos"].response_start == 20
    assert tokenizer.convert_ids_to_tokens(list(cut["plain"].input_ids[: cut["plain"].response_start])) == [
        "<s>", "Human:", *["leo", "asks", ":", "what", "color", "is", "a", "sky", "?"], "Assistant:",
    ]  # fmt: skip
    banana = tokenizer.convert_tokens_to_ids("banana")
    assert all(banana not in s.input_ids for s in cut.values())


# ---------------------------------------------------------------- Stimulus.window


@pytest.mark.parametrize(
    ("size", "boundary", "expected"),
    [(3, True, (9, 3)), (3, False, (10, 3)), (8, True, (9, 5)), (8, False, (10, 5)), (5, True, (9, 5))],
)
def test_window_hand_computed(size, boundary, expected):
    s = Stimulus(tuple(range(15)), response_start=10)  # 5 response tokens at positions 10..14
    assert s.response_len == 5
    assert s.window(size, boundary) == expected


def test_window_with_boundary_starts_at_the_assistant_tag(tokenizer):
    s = build_variants(tokenizer, [user(QUERY)], RESPONSE, {"plain": None}, 64, 64)["plain"]
    start, n = s.window(4, include_boundary=True)
    assert tokenizer.convert_ids_to_tokens(list(s.input_ids[start : start + n])) == ["Assistant:", "of", "course", "!"]
    start, n = s.window(4, include_boundary=False)
    assert tokenizer.convert_ids_to_tokens(list(s.input_ids[start : start + n])) == ["of", "course", "!", "it"]


def test_a_sequence_holds_its_ids_at_four_bytes_each_and_survives_pickling(tokenizer):
    """A stage holds every pair's sequences at once: 4 bytes an id, not a Python int's 8 to 36."""
    import pickle

    s = build_variants(tokenizer, [user(QUERY)], RESPONSE, {"plain": None, "pos": POS}, 64, 64)["pos"]
    assert s.input_ids.itemsize == 4 and len(s.input_ids) > 10
    given = Stimulus((5, 6, 7, 8), response_start=2)
    assert given.input_ids.itemsize == 4 and list(given.input_ids) == [5, 6, 7, 8]
    assert given == Stimulus([5, 6, 7, 8], 2) != Stimulus([5, 6, 7, 9], 2)
    back = pickle.loads(pickle.dumps(s))  # to data-loader workers started with spawn
    assert back == s and back.input_ids.itemsize == 4


# ---------------------------------------------------------------- prompt_ids (inference) == training prompt


@pytest.mark.parametrize("query", [QUERY, " ".join(NAMES[:30])])
@pytest.mark.parametrize("system", [None, POS])
def test_inference_prompt_equals_training_prompt(tokenizer, query, system):
    s = build_variants(tokenizer, [user(query)], RESPONSE, {"x": system}, 20, 64)["x"]
    assert prompt_ids(tokenizer, [user(query)], 20, system) == list(s.input_ids[: s.response_start])


def test_hir_prompts_are_cut_as_scit_cut_them_for_both_instructions(tokenizer):
    """SCIT cuts p+ and p- prompts together, to fit the longer instruction; HIR's inference must cut as training did
    even where the dispreferred instruction is the longer one."""
    from rahf.stimuli import Instruction

    short, long = "be kind .", "you are a rude and very unhelpful assistant ."
    query = [user(" ".join(NAMES[:30]))]
    trained = build_variants(tokenizer, query, RESPONSE, {"pos": short, "neg": long}, 24, 64)["pos"]
    hir = Instruction(short, [long])
    assert hir == short and prompt_ids(tokenizer, query, 24, hir) == list(trained.input_ids[: trained.response_start])
    assert prompt_ids(tokenizer, query, 24, short) != list(trained.input_ids[: trained.response_start])  # cut alone
    scored = build_variants(tokenizer, query, RESPONSE, {"x": hir}, 24, 64)["x"]  # as evaluate scores HIR's replies
    assert scored == trained


def test_truncation_keeps_a_leading_system_message_and_drops_the_oldest_turns(tokenizer):
    framing = {"role": "system", "content": "you are rude ."}
    old = [user(" ".join(NAMES[:10])), {"role": "assistant", "content": "of course !"}]
    msgs = truncate_prompt(tokenizer, [framing, *old, user(QUERY)], [None], 16)
    assert msgs == [framing, user(QUERY)]
    tokens = tokenizer.convert_ids_to_tokens(render_prompt(tokenizer, msgs))
    assert tokens[:5] == ["<s>", "you", "are", "rude", "."] and tokens[-1] == "Assistant:"


def _dropping_one_turn_at_a_time(tokenizer, messages, systems, max_length):
    """What truncation keeps, found the slow way: drop the oldest turn (then any turns before the next user turn)
    and render again, until every variant fits; None where only cutting the last turn's text would fit."""
    head, turns = messages[:1], messages[1:]  # the conversations below lead with a system message
    while max(len(render_prompt(tokenizer, head + turns, s)) for s in systems) > max_length:
        if len(turns) == 1:
            return None
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
    return head + turns


def test_long_conversations_keep_the_turns_that_fit_after_few_renders(tokenizer, monkeypatch):
    """Bisection over where the kept turns start keeps exactly what dropping one turn at a time keeps, and renders
    a conversation of K turns about log K times, not K (a chat log of 600 turns took a minute per reply)."""
    from rahf import stimuli

    framing = {"role": "system", "content": "you are rude ."}
    turns = []
    for i in range(64):  # users with one or two assistant turns after them, of varying lengths
        turns.append(user(" ".join(NAMES[i % 7 : i % 7 + 1 + i % 5])))
        turns += [{"role": "assistant", "content": "it is yellow ."}] * (1 + (i % 3 == 0))
    conversation = [framing, *turns, user(QUERY)]
    systems = [None, POS]
    renders = Counter()
    real = stimuli.render_prompt
    monkeypatch.setattr(stimuli, "render_prompt", lambda *a, **k: renders.update([1]) or real(*a, **k))
    checked = 0
    for max_length in (24, 40, 64, 150, 400, 10_000):
        expected = _dropping_one_turn_at_a_time(tokenizer, conversation, systems, max_length)
        renders.clear()
        kept = truncate_prompt(tokenizer, conversation, systems, max_length)
        assert kept == expected
        assert renders[1] <= 2 * (8 + 1)  # two variants, log2(86 starts) + 1 renders each
        checked += expected != conversation
    assert checked == 5  # all but the longest limit dropped turns


def test_a_pairs_prompt_is_fitted_once_for_both_replies_and_again_when_the_template_changes(tokenizer, monkeypatch):
    from rahf import stimuli

    renders = Counter()
    real = stimuli.render_prompt
    monkeypatch.setattr(stimuli, "render_prompt", lambda *a, **k: renders.update([1]) or real(*a, **k))
    prompt = [user(QUERY)]
    chosen = build_variants(tokenizer, prompt, RESPONSE, SYSTEMS, 64, 64)
    assert renders[1] == 3  # pos and neg together, plain alone
    rejected = build_variants(tokenizer, prompt, "it is red .", SYSTEMS, 64, 64)
    assert renders[1] == 3  # the rejected reply reuses the fit
    assert all(chosen[k].input_ids[: chosen[k].response_start] == rejected[k].input_ids[: chosen[k].response_start]
               for k in SYSTEMS)  # fmt: skip
    build_variants(tokenizer, prompt, RESPONSE, SYSTEMS, 32, 64)
    assert renders[1] == 6  # another length, fitted again
    old = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        with_template = build_variants(tokenizer, prompt, RESPONSE, {"plain": None}, 32, 64)["plain"]
    finally:
        tokenizer.chat_template = old
    assert renders[1] == 7 and with_template.input_ids[0] != tokenizer.bos_token_id


def test_plain_variant_keeps_the_query_inference_sees_beside_instructed_variants(tokenizer):
    query = " ".join(NAMES[:30])  # too long for 20 tokens: each variant must lose part of it
    v = build_variants(tokenizer, [user(query)], RESPONSE, {"plain": None, "pos": POS, "neg": NEG}, 20, 64)
    plain = list(v["plain"].input_ids[: v["plain"].response_start])
    assert plain == prompt_ids(tokenizer, [user(query)], 20)
    assert query_part(tokenizer, v["pos"]) == query_part(tokenizer, v["neg"])
    assert len(query_part(tokenizer, v["pos"])) < len(query_part(tokenizer, v["plain"]))  # instructions take room


def test_render_prompt_uses_the_human_assistant_template_without_chat_template(tokenizer):
    assert tokenizer.chat_template is None
    ids = render_prompt(tokenizer, [user("mia asks")], system="you are rude .")
    expected = ["<s>", "you", "are", "rude", ".", "Human:", "mia", "asks", "Assistant:"]
    assert tokenizer.convert_ids_to_tokens(ids) == expected


# ---------------------------------------------------------------- subword tokenizers and chat templates

CJK_QUERY = "你好世界，这是一个测试。香蕉是黄色的。龍鳳麒麟" * 3
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALTERNATING = (  # like Llama-2-chat, Mistral-Instruct and Gemma: no system role, strictly user/assistant turns
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' if m['role'] == 'user' else m['content'] }}{% endfor %}"
)


def byte_bpe(single: str | None = None, chat_template: str | None = None):
    """A small byte-level BPE trained on this module's texts; `single` is a post-processor template like "<s> $A"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator([QUERY, RESPONSE, POS, NEG, "Human: Assistant: user system", CJK_QUERY[:20]] * 5, trainer)
    if single:
        core.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, core.token_to_id(t)) for t in ("<s>", "</s>")]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def byt5():
    """A Python (not fast) byte-level tokenizer that appends EOS and has no BOS."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging when the body runs longer than `seconds`."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("make", "shortest"), [(byte_bpe, 20), (byt5, 25)])  # ByT5: a byte per token
def test_multibyte_query_is_cut_between_characters_and_every_length_terminates(make, shortest):
    tok = make()
    with time_limit(60):
        for m in range(shortest, shortest + 70):
            msgs = truncate_prompt(tok, [user(CJK_QUERY)], [None], m)
            kept = msgs[0]["content"]
            assert kept and CJK_QUERY.endswith(kept) and "\ufffd" not in kept
            s = build_variants(tok, [user(CJK_QUERY)], "yes", {"plain": None}, m, 8)["plain"]
            assert s.response_start <= m
            assert (
                list(s.input_ids[: s.response_start])
                == render_prompt(tok, msgs)
                == prompt_ids(tok, [user(CJK_QUERY)], m)
            )
        with pytest.raises(ConfigError, match="data.max_prompt_length=5"):
            truncate_prompt(tok, [user(CJK_QUERY)], [None], 5)


@pytest.mark.parametrize("make", [lambda: byte_bpe(single="<s> $A </s>"), byt5])
def test_plain_prompt_gets_only_the_tokens_the_tokenizer_puts_before_a_text(make):
    tok = make()
    s = build_variants(tok, [user(QUERY)], RESPONSE, {"plain": None}, 64, 64)["plain"]
    text_ids = ids_of(tok, f"Human: {QUERY}\n\nAssistant:")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    assert list(s.input_ids[: s.response_start]) == bos + text_ids
    assert list(s.input_ids[s.response_start :]) == ids_of(tok, " " + RESPONSE) + [tok.eos_token_id]
    assert s.input_ids.count(tok.eos_token_id) == 1


def test_chat_template_with_a_subword_tokenizer_matches_inference():
    tok = byte_bpe(chat_template=CHATML)
    v = build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, 128, 64)
    resp = response_ids(tok, RESPONSE, 64)
    end = tok.convert_tokens_to_ids("<|im_end|>")  # the template closes a turn with it, not with EOS (</s>)
    assert resp == ids_of(tok, RESPONSE) + [end] and end != tok.eos_token_id
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for name, s in v.items():
        assert list(s.input_ids[s.response_start :]) == resp
        assert s.input_ids[0] == bos and bos not in s.input_ids[1:]
        assert eos not in s.input_ids and s.input_ids.count(end) == int(name != "plain") + 2 and s.input_ids[-1] == end
        assert tok.decode(list(s.input_ids[: s.response_start])).endswith("<|im_start|>assistant\n")
        assert prompt_ids(tok, [user(QUERY)], 128, SYSTEMS[name]) + resp == list(s.input_ids)
    assert v["plain"].response_start < v["neg"].response_start < v["pos"].response_start


LLAMA2 = (  # Llama-2-chat: an assistant turn is " reply </s>"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


TEXT_BEFORE = (  # text between the reply and the token that closes it
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}\n\n### End{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "closing"),
    [(CHATML, "<|im_end|>"), (LLAMA2, "</s>"), (ALTERNATING, "</s>"), (None, "</s>"), (TEXT_BEFORE, "</s>")],
    ids=["chatml", "llama2", "nothing-after-the-reply", "no-template", "text-before-the-closing"],
)
def test_a_reply_ends_with_the_token_the_template_closes_a_turn_with(template, closing):
    from rahf.stimuli import end_of_turn_id, stop_ids

    tok = byte_bpe(chat_template=template)
    end = tok.convert_tokens_to_ids(closing)
    reply = response_ids(tok, RESPONSE, 64)
    assert end_of_turn_id(tok) == end and reply[-1] == end and reply.count(end) == 1
    assert stop_ids(tok) == sorted({tok.eos_token_id, end})


def test_turn_markers_added_as_ordinary_tokens_still_close_a_reply():
    """Some ChatML tokenizers add `<|im_start|>`/`<|im_end|>` with `add_tokens`, not as special tokens."""
    from rahf.stimuli import end_of_turn_id, stop_ids

    tok = byte_bpe(chat_template=CHATML.replace("<|im_", "<|turn_"))
    tok.add_tokens(["<|turn_start|>", "<|turn_end|>"])  # ordinary added tokens
    end = tok.convert_tokens_to_ids("<|turn_end|>")
    assert end not in tok.all_special_ids and end_of_turn_id(tok) == end and end in stop_ids(tok)
    assert response_ids(tok, RESPONSE, 64) == ids_of(tok, RESPONSE) + [end]  # no EOS after it


@pytest.mark.parametrize(
    ("template", "closing"),
    [(CHATML, "<|im_end|>"), (LLAMA2, "</s>"), (ALTERNATING, "</s>"), (None, "</s>")],
    ids=["chatml", "llama2", "nothing-after-the-reply", "no-template"],
)
def test_a_reply_holding_the_closing_tokens_text_is_kept_whole(template, closing):
    """The reply's end is where the template closes the turn, not the last closing token in it."""
    tok = byte_bpe(chat_template=template)
    reply = f"end each line with {closing} like this . {closing} then go on ."
    ids = response_ids(tok, reply, 64)
    assert ids[-1] == tok.convert_tokens_to_ids(closing)
    assert tok.decode(ids[:-1]).strip() == reply and ids.count(ids[-1]) == 3
    with tally() as counts:
        s = build_variants(tok, [user(QUERY)], reply, {"plain": None}, 64, 64)["plain"]
    assert list(s.input_ids[s.response_start :]) == ids and counts["reply cut"] == 0


def test_the_closing_token_and_probe_prompt_are_read_once_per_tokenizer_and_template(monkeypatch):
    tok = byte_bpe(chat_template=CHATML)
    renders = []
    real = type(tok).apply_chat_template
    monkeypatch.setattr(
        type(tok), "apply_chat_template", lambda self, *a, **k: renders.append(1) or real(self, *a, **k)
    )
    for _ in range(5):
        response_ids(tok, RESPONSE, 64)
    assert len(renders) == 5 + 2  # each reply's conversation; the closing token and the probe prompt once
    tok.chat_template = LLAMA2  # a new template is read afresh
    assert response_ids(tok, RESPONSE, 64)[-1] == tok.eos_token_id and len(renders) == 7 + 3


def test_sft_examples_name_their_pair_in_prompt_errors():
    """SFT and Dual's two SFTs tokenize through `tokenized_sft_dataset`: an error names the pair, as SCIT's does."""
    from rahf.sft import tokenized_sft_dataset

    tok = byte_bpe(chat_template=ALTERNATING)
    with pytest.raises(DataError, match=r"^pairs\.jsonl:9: the tokenizer's chat template rejects the prompt's roles"):
        tokenized_sft_dataset(tok, [([user(QUERY), user("and now ?")], "ok", "pairs.jsonl:9")], 64, 8)


@pytest.mark.parametrize("system", [None, POS])
def test_chat_template_refusing_the_roles_is_a_data_error_naming_the_pair(system):
    tok = byte_bpe(chat_template=ALTERNATING)
    fine = build_variants(
        tok, [user("hi"), {"role": "assistant", "content": "yo"}, user(QUERY)], "ok", {"x": system}, 64, 8
    )
    assert fine["x"].response_start > 0
    twice = [user(QUERY), user("and now ?")]
    with pytest.raises(
        DataError, match=r"^pairs\.jsonl:7: the tokenizer's chat template rejects the prompt's roles \[user, user\]"
    ):
        build_variants(tok, twice, "ok", {"x": system}, 64, 8, source="pairs.jsonl:7")
    with pytest.raises(DataError, match=r"^the prompt beginning 'mia asks.*Conversation roles must alternate"):
        prompt_ids(tok, twice, 64, system)


# ---------------------------------------------------------------- decoder blocks and hidden-state capture


def _tiny(arch: str):
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    }
    configs = {
        "llama": lambda: LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **common),
        "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64),
        "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=2, **common),
        "qwen2": lambda: Qwen2Config(num_hidden_layers=3, num_key_value_heads=1, **common),
        "mistral": lambda: MistralConfig(num_hidden_layers=2, num_key_value_heads=1, **common),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[arch]()).eval()


def _blocks_by_name(model, arch: str):
    return {
        "llama": lambda: model.model.layers,
        "gpt2": lambda: model.transformer.h,
        "gpt_neox": lambda: model.gpt_neox.layers,
        "qwen2": lambda: model.model.layers,
        "mistral": lambda: model.model.layers,
    }[arch]()


ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_blocks_finds_the_blocks(arch):
    from rahf.models import decoder_blocks, num_layers

    model = _tiny(arch)
    blocks = decoder_blocks(model)
    assert blocks is _blocks_by_name(model, arch)
    assert len(blocks) == num_layers(model.config)


def test_decoder_blocks_sees_through_peft():
    from peft import LoraConfig, get_peft_model

    from rahf.models import decoder_blocks

    model = _tiny("llama")
    blocks = model.model.layers
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_blocks(peft_model) is blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_capture_equals_hidden_states_and_stops_early(arch):
    from rahf.models import decoder_blocks, forward_capture, num_layers

    model = _tiny(arch)
    n = num_layers(model.config)
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 7))
    attn = torch.ones_like(ids)
    attn[1, 5:] = 0  # a right-padded row
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        hooks_before = [len(b._forward_hooks) for b in decoder_blocks(model)]  # transformers adds its own
        layers = list(range(1, n))
        got = forward_capture(model, layers, ids, attn)
    assert sorted(got) == layers
    for layer in layers:
        torch.testing.assert_close(got[layer], ref[layer], atol=1e-6, rtol=1e-5)

    calls = []
    handle = decoder_blocks(model)[n - 1].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            early = forward_capture(model, [1], ids, attn)
            assert calls == []  # the last block never ran
            torch.testing.assert_close(early[1], ref[1], atol=1e-6, rtol=1e-5)
            forward_capture(model, [1], ids, attn, stop=False)
            assert calls == [1]
    finally:
        handle.remove()
    # the capture hooks are removed afterwards
    assert [len(b._forward_hooks) for b in decoder_blocks(model)] == hooks_before


def test_captured_states_carry_gradients():
    from rahf.models import forward_capture

    model = _tiny("llama")
    ids = torch.randint(3, 64, (1, 5))
    out = forward_capture(model, [2], ids, torch.ones_like(ids))
    out[2].sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.model.layers[2].self_attn.q_proj.weight.grad is None  # block 3 never ran


# ---------------------------------------------------------------- replies as the chat template tokenizes them

DEEPSEEK = (  # DeepSeek-LLM-chat: the generation prompt ends "Assistant:", a finished turn is "Assistant: " + reply
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
USER_ONLY = (  # renders user and assistant turns and silently drops any system message (Phi-3-mini's first template)
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sentencepiece_like(chat_template: str | None = None):
    """A Llama/Mistral-style tokenizer (Metaspace pre-tokenizer, "▁" word marker, byte fallback) built locally."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    core = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials)
    core.train_from_iterator([QUERY, RESPONSE, POS, NEG, "user system assistant"] * 5, trainer)
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in json.loads(core.to_str())["model"]["merges"]
    ]
    tok = LlamaTokenizer(vocab=core.get_vocab(), merges=merges, legacy=False, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = chat_template
    return tok


@pytest.mark.parametrize(
    ("make", "template", "with_system"),
    [
        (byte_bpe, CHATML, True),
        (byte_bpe, LLAMA2, False),
        (byte_bpe, DEEPSEEK, True),
        (sentencepiece_like, CHATML, True),
        (sentencepiece_like, ZEPHYR, True),
    ],
    ids=["chatml", "llama2", "deepseek", "sentencepiece-chatml", "sentencepiece-zephyr"],
)
def test_sequences_equal_the_templates_own_tokenization_of_the_conversation(make, template, with_system):
    # What a chat model was trained on: the template's text of the finished conversation, tokenized as one.
    # The reply must start as it does there (DeepSeek: after a space; SentencePiece: no word marker after
    # a newline), though generation is given only the prompt.
    tok = make(chat_template=template)
    systems = {"plain": None, "pos": POS} if with_system else {"plain": None}
    v = build_variants(tok, [user(QUERY)], RESPONSE, systems, 128, 64)
    for name, s in v.items():
        convo = ([{"role": "system", "content": systems[name]}] if systems[name] else []) + [user(QUERY)]
        whole = tok.apply_chat_template(
            [*convo, {"role": "assistant", "content": RESPONSE}], tokenize=True, return_dict=False
        )
        assert list(s.input_ids) == whole[: len(s.input_ids)], name
        assert s.input_ids[-1] == end_of_turn_id(tok)
        assert list(s.input_ids[: s.response_start]) == prompt_ids(tok, [user(QUERY)], 128, systems[name])
    assert len({tuple(s.input_ids[s.response_start :]) for s in v.values()}) == 1


def test_a_template_that_drops_the_system_message_gets_the_instruction_in_the_first_user_turn():
    tok = byte_bpe(chat_template=USER_ONLY)
    v = build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, 128, 64)
    prompts = {k: tok.decode(list(s.input_ids[: s.response_start])) for k, s in v.items()}
    assert len(set(prompts.values())) == 3  # without the fold all three were the same prompt
    assert prompts["pos"].startswith(f"<|im_start|>user\n{POS}\n\n{QUERY}")


def test_a_pairs_own_overlong_system_message_is_a_data_error_naming_the_pair(tokenizer):
    prompt = [{"role": "system", "content": " ".join(["you are a polite and correct assistant ."] * 8)}, user(QUERY)]
    with pytest.raises(DataError, match=r"^pairs\.jsonl:3: its own system message leaves no room for the query"):
        build_variants(tokenizer, prompt, RESPONSE, {"plain": None}, 40, 16, source="pairs.jsonl:3")


def test_prompts_follow_a_changed_bos_setting_of_the_same_tokenizer():
    # the prepended special tokens are probed once per tokenizer; turning BOS off afterwards must still count
    tok = sentencepiece_like(chat_template=None)
    msgs = [user(QUERY)]
    with_bos = render_prompt(tok, msgs)
    assert with_bos[0] == tok.bos_token_id
    tok.add_bos_token = False
    assert render_prompt(tok, msgs) == with_bos[1:]


# ---------------------------------------------------------------- reasoning blocks, channels and dates in templates

QWEN3 = (  # writes an empty reasoning block before the last reply
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
R1 = (  # opens a reasoning block in the generation prompt that a finished turn does not write
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
HARMONY = (  # gpt-oss: a channel header before the reply, and no channel tags allowed inside it
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% if '<|channel|>' in m['content'] %}{{ raise_exception('channel tags in content') }}{% endif %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|return|>"
    "{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
FLAGGED = (  # SmolLM3: a "/no_think" flag in the system message is read and removed from the text written
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].replace('/no_think', '').strip() }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATED = (  # Llama 3.2 and gpt-oss print today's date; Llama 3.2 also trims the reply
    "<|im_start|>system\nToday: {{ strftime_now('%d %b %Y') }}<|im_end|>\n{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def templated(template: str, special=(), plain=()):
    tok = byte_bpe(chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.add_tokens(list(plain))  # Qwen3's think tags are added tokens, but not special ones
    return tok


def test_a_reasoning_block_the_template_writes_is_trained_and_left_out_of_the_reply_text():
    from rahf.generate import reply_text
    from rahf.stimuli import reply_content, stop_ids

    tok = templated(QWEN3, plain=["<think>", "</think>"])
    s = build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, 128, 64)["plain"]
    reply = list(s.input_ids[s.response_start :])
    assert tok.decode(reply) == f"<think>\n\n</think>\n\n{RESPONSE}<|im_end|>"  # what the model learns to write
    assert reply_text(tok, reply, stop_ids(tok)) == RESPONSE  # what judges, reward models and the JSONL get
    assert reply_content(tok, "<think>\nmia asks about a banana.\n</think>\n\nyellow .") == "yellow ."
    assert reply_content(tok, "<think>\nno end to the reasoning") == ""  # cut off while reasoning: no answer
    assert reply_content(tok, "yellow .") == "yellow ."  # a reply without the block is all answer


def test_a_reasoning_block_the_generation_prompt_opens_is_closed_before_the_reply():
    from rahf.generate import reply_text
    from rahf.stimuli import stop_ids

    tok = templated(R1, special=["<|User|>", "<|Assistant|>"], plain=["<think>", "</think>"])
    s = build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, 128, 64)["plain"]
    prompt = tok.decode(list(s.input_ids[: s.response_start]))
    assert prompt.endswith("<|Assistant|><think>\n")  # as generation renders it
    assert tok.decode(list(s.input_ids[s.response_start :])) == f"\n</think>\n\n{RESPONSE}</s>"
    assert reply_text(tok, list(s.input_ids[s.response_start :]), stop_ids(tok)) == RESPONSE
    from rahf.stimuli import reply_content

    assert reply_content(tok, "mia asks about a banana, so") == ""  # cut off in the block the prompt opened
    assert reply_content(tok, "mia asks.\n</think>\n\nyellow .") == "yellow ."


def test_a_channel_header_is_trained_and_a_reward_model_with_that_template_can_read_the_reply():
    from rahf.generate import reply_text
    from rahf.stimuli import reply_header, stop_ids

    tok = templated(HARMONY, special=["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"])
    assert reply_header(tok) == "<|channel|>final<|message|>"
    reply = response_ids(tok, RESPONSE, 64)
    assert tok.decode(reply) == f"<|channel|>final<|message|>{RESPONSE}<|return|>"
    assert stop_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|return|>")})
    text = reply_text(tok, reply, stop_ids(tok))
    assert text == RESPONSE
    from rahf.stimuli import reply_content

    analysis = "<|channel|>analysis<|message|>mia asks about a banana .<|end|><|start|>assistant"
    assert reply_content(tok, f"{analysis}<|channel|>final<|message|>yellow .") == "yellow ."
    assert reply_content(tok, analysis) == ""  # stopped before the final channel: no answer
    assert reply_content(tok, "yellow .") == "yellow ."
    conversation = [user(QUERY), {"role": "assistant", "content": text}]  # as a reward model scores it
    assert tok.apply_chat_template(conversation, tokenize=False).endswith(tok.decode(reply))


def test_an_instruction_whose_flag_the_template_removes_still_goes_in_the_system_message():
    tok = templated(FLAGGED)
    text = tok.decode(render_prompt(tok, [user(QUERY)], system=f"{POS} /no_think"))
    assert text == f"<|im_start|>system\n{POS}<|im_end|>\n<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"


GPT_OSS_DATE = (  # gpt-oss calls strftime_now inside a macro, Llama 3.2 only when no date_string is given
    "{%- macro preamble() -%}{{- 'Current date: ' + strftime_now('%Y-%m-%d') -}}{%- endmacro -%}"
    "<|im_start|>system\n{{ preamble() }}{% if not date_string is defined %}{% set date_string = "
    "strftime_now('%d %B %Y, %A') %}{% endif %} / {{ date_string }}<|im_end|>\n{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", [DATED, GPT_OSS_DATE], ids=["llama-3.2", "gpt-oss"])
def test_a_template_that_prints_todays_date_prints_the_same_fixed_date_every_day(template, monkeypatch):
    """Otherwise a run's sequences, cached targets and trained models would depend on the day, which no fingerprint
    records: collect on one day, align on the next, and the targets belong to other prompts."""
    import datetime as dt

    import transformers.utils.chat_template_utils as templates

    from rahf.judges import RewardModelJudge
    from rahf.stimuli import TEMPLATE_DATE, apply_template

    day = {"now": dt.datetime(2026, 3, 1, 23, 59)}

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return day["now"]

    monkeypatch.setattr(templates, "datetime", Clock)
    tok = templated(template)
    assert "2026" in tok.apply_chat_template([user(QUERY)], tokenize=False)  # the template does print today
    before = response_ids(tok, " " + RESPONSE, 64), render_prompt(tok, [user(QUERY)])
    day["now"] = dt.datetime(2026, 3, 2, 0, 1)  # two minutes later, in the same process
    after = response_ids(tok, " " + RESPONSE, 64), render_prompt(tok, [user(QUERY)])
    assert before == after
    if template == DATED:  # Llama 3.2 trims the reply
        assert before[0] == ids_of(tok, RESPONSE) + [tok.convert_tokens_to_ids("<|im_end|>")]
    written = "26 Jul 2024" if template == DATED else "2024-07-26 / 26 July 2024, Friday"
    assert written in tok.decode(before[1]) and TEMPLATE_DATE == dt.date(2024, 7, 26)
    assert written in apply_template(tok, [user(QUERY)]) and "2026" not in apply_template(tok, [user(QUERY)])
    judge_text = RewardModelJudge.text(type("J", (), {"tokenizer": tok, "_has_template": True})(), [user(QUERY)], "x")
    assert written in judge_text  # a reward model reads the same date


def test_a_tally_counts_sequences_and_what_the_length_limits_cut():
    from rahf.stimuli import tally

    tok = byte_bpe(chat_template=CHATML)
    short = len(response_ids(tok, RESPONSE, 999))  # the reply's tokens with its end of turn
    prompt_len = len(render_prompt(tok, [user(QUERY)], POS))
    with tally() as outer:
        build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, 128, 64)  # nothing cut
        with tally() as inner:
            build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, prompt_len - 2, 64)  # p+ must lose 2 tokens
            build_variants(tok, [user(QUERY)], RESPONSE, {"plain": None}, 128, short - 1)  # the end of turn goes
            build_variants(tok, [user(QUERY)], " ", {"plain": None}, 128, 64)
    assert inner == {"examples": 3, "prompt cut": 1, "reply cut": 1, "reply empty": 1}
    assert outer == inner + Counter(examples=1)
    build_variants(tok, [user(QUERY)], RESPONSE, SYSTEMS, prompt_len - 2, 64)  # no tally open: nothing counted
    assert outer["examples"] == 4


ONE_SYSTEM = (  # Mistral-Instruct: an optional system message first, then strictly user/assistant turns
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, roles must alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_an_instruction_joins_a_pairs_own_system_message_where_the_template_allows_only_one():
    tok = byte_bpe(chat_template=ONE_SYSTEM)
    prompt = [{"role": "system", "content": "be brief ."}, user(QUERY)]
    assert tok.decode(render_prompt(tok, [user(QUERY)], system=POS)) == f"[INST] {POS}\n\n{QUERY} [/INST]"
    assert tok.decode(render_prompt(tok, prompt, system=POS)) == f"[INST] {POS}\n\nbe brief .\n\n{QUERY} [/INST]"


def test_the_plain_layout_puts_the_instruction_first_then_the_pairs_system_messages_in_order(tokenizer):
    """As a chat template renders [instruction, *messages]: the instruction, then the pair's own system messages."""
    prompt = [{"role": "system", "content": "be brief ."}, user(QUERY), {"role": "system", "content": "be kind ."}]
    text = tokenizer.decode(render_prompt(tokenizer, prompt, system=POS), skip_special_tokens=True)
    assert text == tokenizer.decode(
        tokenizer(f"{POS}\n\nbe brief .\n\nbe kind .\n\nHuman: {QUERY}\n\nAssistant:")["input_ids"],
        skip_special_tokens=True,
    )


LAST_SYSTEM = (  # DeepSeek-R1-Distill: the last system message wins, written before the turns
    "{% set ns = namespace(system='') %}{% for m in messages if m['role'] == 'system' %}"
    "{% set ns.system = m['content'] %}{% endfor %}{{ ns.system }}{% for m in messages if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FIRST_SYSTEM = (  # gpt-oss: messages[0], when a system message, becomes the developer message; later ones are skipped
    "{% if messages[0]['role'] == 'system' %}<|im_start|>developer\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}{% for m in messages if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "instructed"),
    [
        (ONE_SYSTEM, f"[INST] {POS}\n\nbe brief .\n\n{QUERY} [/INST]"),
        (LAST_SYSTEM, f"{POS}\n\nbe brief .<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"),
        (FIRST_SYSTEM, f"<|im_start|>developer\n{POS}\n\nbe brief .<|im_end|>\n<|im_start|>user\n{QUERY}<|im_end|>\n"),
        (USER_ONLY, f"<|im_start|>user\n{POS}\n\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"),
        (CHATML, f"<|im_start|>system\n{POS}<|im_end|>\n<|im_start|>system\nbe brief .<|im_end|>\n"),
    ],
    ids=["refuses-a-second", "keeps-the-last", "keeps-the-first", "drops-system", "keeps-both"],
)
def test_an_instruction_and_a_pairs_own_system_message_are_both_kept_whatever_the_template_keeps(template, instructed):
    """A template that writes one system message silently loses one of two; the instruction then heads the pair's
    own (or, where no system message is written, the first user turn), and p+ and p- still differ."""
    tok = byte_bpe(chat_template=template)
    prompt = [{"role": "system", "content": "be brief ."}, user(QUERY)]
    v = build_variants(tok, prompt, RESPONSE, {"plain": None, "pos": POS, "neg": NEG}, 512, 64)
    pos = tok.decode(list(v["pos"].input_ids[: v["pos"].response_start]))
    assert instructed in pos
    assert v["pos"].input_ids != v["neg"].input_ids != v["plain"].input_ids
    assert tok.decode(list(v["neg"].input_ids[: v["neg"].response_start])) == pos.replace(POS, NEG)


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        (LAST_SYSTEM, [{"role": "system", "content": "be brief ."}, {"role": "system", "content": "be kind ."}]),
        (
            FIRST_SYSTEM,
            [user("hi ."), {"role": "assistant", "content": "ok ."}, {"role": "system", "content": "be kind ."}],
        ),
    ],
    ids=["keeps-the-last-of-two", "keeps-a-leading-one-only"],
)
def test_the_instruction_goes_where_the_template_keeps_it(template, prompt):
    tok = byte_bpe(chat_template=template)
    v = build_variants(tok, [*prompt, user(QUERY)], RESPONSE, {"pos": POS, "neg": NEG}, 512, 64)
    assert POS in tok.decode(list(v["pos"].input_ids)) and v["pos"].input_ids != v["neg"].input_ids


def test_a_tokenizer_with_several_named_chat_templates_renders_with_its_default():
    tok = byte_bpe(chat_template=None)
    tok.chat_template = {"default": CHATML, "tool_use": CHATML}
    ids = render_prompt(tok, [user(QUERY)], POS)
    assert f"<|im_start|>system\n{POS}<|im_end|>" in tok.decode(ids)


def test_the_template_earlier_versions_saved_is_read_as_none(tokenizer):
    from rahf.stimuli import _SYSTEMS_IN_ORDER, _SYSTEMS_REVERSED, chat_template, plain_chat_template

    tokenizer.chat_template = plain_chat_template(tokenizer).replace(_SYSTEMS_IN_ORDER, _SYSTEMS_REVERSED)
    try:
        assert chat_template(tokenizer) is None
    finally:
        tokenizer.chat_template = None


def test_a_reply_that_only_mentions_the_closing_think_tag_keeps_its_text():
    from rahf.stimuli import reply_content

    tok = templated(QWEN3, plain=["<think>", "</think>"])
    said = "close the reasoning with </think> and then answer ."
    assert reply_content(tok, said) == said
    assert reply_content(tok, f"<think>\nhm\n</think>\n\n{said}") == said


# ---------------------------------------------------------------- the chat template saved with a model that has none

CONVERSATION = [
    {"role": "system", "content": "you are rude ."},
    user(QUERY),
    {"role": "assistant", "content": "it is yellow ."},
    user("leo asks : what color is a sky ?"),
]


def saved_and_loaded(tok, folder):
    """`tok` as rahf saves it with a model and later loads it."""
    from rahf.models import load_tokenizer, save_tokenizer

    save_tokenizer(tok, folder)
    return load_tokenizer(str(folder))


def test_a_saved_tokenizer_without_a_template_renders_rahfs_prompt_by_template(tokenizer, tmp_path):
    saved = saved_and_loaded(tokenizer, tmp_path)
    text = saved.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s>you are rude .\n\nHuman: mia asks : what color is a banana ?\n\nAssistant: it is yellow ."
        "\n\nHuman: leo asks : what color is a sky ?\n\nAssistant:"
    )
    ids = saved.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ids == render_prompt(tokenizer, CONVERSATION)
    assert tokenizer.convert_ids_to_tokens(ids)[:6] == ["<s>", "you", "are", "rude", ".", "Human:"]
    # without the generation prompt: a last assistant turn is closed as training closes it, any other turn is not
    finished = [user(QUERY), {"role": "assistant", "content": RESPONSE}]
    assert saved.apply_chat_template(finished, tokenize=False) == f"<s>Human: {QUERY}\n\nAssistant: {RESPONSE}</s>"
    assert saved.apply_chat_template(CONVERSATION, tokenize=False) == text.removesuffix("\n\nAssistant:")
    assert tokenizer.chat_template is None  # the tokenizer in memory is left as it was


@pytest.mark.parametrize(
    ("make", "lead"),
    [
        (lambda: byte_bpe(single="<s> $A </s>"), "<s>"),
        (byte_bpe, ""),
        (byt5, ""),  # appends EOS, writes nothing before a text
        (sentencepiece_like, "<s> "),  # no "▁" after a special token: a space gives the first word its marker
    ],
    ids=["byte-bpe-bos", "byte-bpe", "byt5", "sentencepiece"],
)
def test_the_saved_template_gives_rahfs_ids_and_training_sequences(make, lead, tmp_path):
    from rahf.stimuli import plain_chat_template

    tok = make()
    assert plain_chat_template(tok).startswith(f'{{{{- "{lead}" -}}}}\n')
    saved = saved_and_loaded(tok, tmp_path)
    twice = [{"role": "system", "content": NEG}, *CONVERSATION, {"role": "assistant", "content": "of course !"}]
    for messages in (CONVERSATION, CONVERSATION[1:], [user(QUERY)], twice):
        ids = saved.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == render_prompt(tok, messages), messages
    s = build_variants(tok, CONVERSATION, RESPONSE, {"plain": None}, 999, 999)["plain"]
    finished = [*CONVERSATION, {"role": "assistant", "content": RESPONSE}]
    assert saved.apply_chat_template(finished, return_dict=False) == list(s.input_ids)


def test_leading_tokens_that_cannot_be_written_out_leave_the_saved_tokenizer_without_a_template(tmp_path):
    from tokenizers import processors

    from rahf.stimuli import plain_chat_template

    tok = byte_bpe()
    word = tok.convert_ids_to_tokens(ids_of(tok, " yellow"))[0]  # "Ġyellow": as text, other bytes
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{word} $A", special_tokens=[(word, tok.convert_tokens_to_ids(word))]
    )
    assert plain_chat_template(tok) is None
    assert saved_and_loaded(tok, tmp_path).chat_template is None


@pytest.mark.parametrize("make", [lambda: byte_bpe(single="<s> $A </s>"), sentencepiece_like, byt5])
def test_rahf_builds_the_same_sequences_from_a_folder_it_saved(make, tmp_path):
    """The sft stage's tokenizer is the instruct stage's, `merged/`'s is generate's and evaluate's: the template
    saved there must change none of the ids rahf trains, collects and generates with."""
    from rahf.stimuli import chat_template, reply_header, stop_ids, tally

    tok = make()
    saved = saved_and_loaded(tok, tmp_path)
    assert saved.chat_template and chat_template(saved) is None
    own = {"role": "system", "content": "be brief ."}
    long = user(" ".join(NAMES[:30]))
    prompts = [[user(QUERY)], CONVERSATION, [own, long], [*CONVERSATION[:3], long], [user(CJK_QUERY)]]
    cut = len(render_prompt(tok, [own, user(QUERY)], POS)) + 2  # the longer prompts lose turns or their beginning
    with tally() as counts:
        for prompt in prompts:
            for limit in (999, cut):
                for reply in (RESPONSE, " ", CJK_QUERY[:9]):
                    built = [build_variants(t, prompt, reply, SYSTEMS, limit, 8) for t in (tok, saved)]
                    assert built[0] == built[1], (prompt, limit, reply)
                assert prompt_ids(tok, prompt, limit, POS) == prompt_ids(saved, prompt, limit, POS)
    assert counts["prompt cut"] >= 2 * 3 * 3 and counts["reply cut"] > 0
    assert (stop_ids(saved), reply_header(saved)) == (stop_ids(tok), "")


def test_tokenizing_many_pairs_shows_a_bar_and_a_few_none(tokenizer, monkeypatch, capsys):
    """A stage builds all its sequences before its own bar starts: past PROGRESS_DELAY seconds that shows a bar of
    its own, and a quick one (small data, the tests) prints nothing."""
    from rahf import stimuli
    from rahf.config import RahfConfig
    from rahf.data import PreferencePair
    from rahf.instruct.scit import scit_examples

    pairs = [PreferencePair((user(QUERY),), RESPONSE, "it is red .", f"p:{i}") for i in range(3)]
    cfg = RahfConfig()
    assert len(scit_examples(tokenizer, pairs, cfg)) == 6
    assert "tokenize" not in capsys.readouterr().err
    monkeypatch.setattr(stimuli, "PROGRESS_DELAY", 0)
    assert len(scit_examples(tokenizer, pairs, cfg)) == 6
    assert "tokenize pairs" in capsys.readouterr().err

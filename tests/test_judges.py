"""Judges: the demo's gold judge, a tiny local reward model, and an LLM judge against a stub server on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rahf.errors import RahfError
from rahf.judges import GoldJudge, JudgeError, LLMJudge, RewardModelJudge, compare_all

QUESTION = "mia asks : what color is a banana ?"
PROMPT = [{"role": "user", "content": QUESTION}]
BEST = "of course ! it is yellow . hope this helps !"  # gold 4
WORST = "whatever . it is red . now go away ."  # gold 0
MIDDLE = "ugh , fine . the answer is yellow . have a nice day !"  # gold 3
SECRET_KEY = "sk-test-SECRET"


# ---------------------------------------------------------------- gold


def test_gold_judge_scores_and_compares_demo_replies():
    judge = GoldJudge()
    assert judge.name == "gold"
    assert [judge.score(PROMPT, r) for r in (BEST, MIDDLE, WORST, "no idea")] == [4.0, 3.0, 0.0, -1.0]
    assert judge.compare(PROMPT, BEST, WORST) == 1.0
    assert judge.compare(PROMPT, WORST, BEST) == 0.0
    assert judge.compare(PROMPT, BEST, BEST) == 0.5
    chat = [{"role": "system", "content": "be nice ."}, *PROMPT, {"role": "assistant", "content": "hm"}]
    assert judge.compare(chat, MIDDLE, BEST) == 0.0  # the last user message carries the question


@pytest.mark.parametrize("text", ["tell me a joke", "mia asks : what color is a spaceship ?"])
def test_gold_judge_rejects_other_prompts(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        GoldJudge().compare([{"role": "user", "content": text}], BEST, WORST)


# ---------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_model(vocab):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rahf.demo.tiny import build_tokenizer

    tok = build_tokenizer(vocab)
    assert {"Human:", "Assistant:"} <= set(vocab)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForSequenceClassification(config).eval(), tok


REPLIES = [BEST, WORST, MIDDLE, "sure , happy to help . it is blue . stop bothering me .", "of course !"]


def test_reward_model_text_uses_human_assistant_layout_without_template(reward_model):
    judge = RewardModelJudge(*reward_model)
    chat = [{"role": "system", "content": "be nice ."}, *PROMPT]
    assert judge.text(chat, BEST) == f"be nice .\n\nHuman: {QUESTION}\n\nAssistant: {BEST}"


def test_reward_model_text_uses_chat_template_when_present(reward_model):
    from rahf.demo.tiny import build_tokenizer

    model, tok = reward_model
    templated = build_tokenizer(tok.get_vocab())
    templated.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    judge = RewardModelJudge(model, templated)
    assert judge.text(PROMPT, BEST) == f"user : {QUESTION} assistant : {BEST} "
    assert len(judge.score_many([PROMPT], [BEST])) == 1


def test_a_reward_model_reads_the_template_rahf_saves_for_a_tokenizer_without_one_as_none(reward_model):
    """The reward stage starts from `sft/`, whose tokenizer carries that template: the texts must not change."""
    from rahf.demo.tiny import build_tokenizer
    from rahf.stimuli import plain_chat_template

    model, tok = reward_model
    saved = build_tokenizer(tok.get_vocab())
    saved.chat_template = plain_chat_template(saved)
    chat = [{"role": "system", "content": "be nice ."}, *PROMPT]
    for judge in (RewardModelJudge(model, saved), RewardModelJudge(model, saved, max_length=6)):
        plain = RewardModelJudge(model, tok, max_length=judge.max_length)
        assert judge.text(chat, BEST) == plain.text(chat, BEST)
        assert judge.encode(chat, BEST) == plain.encode(chat, BEST)


@pytest.mark.parametrize("template", [None, "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"])
def test_a_long_text_loses_its_beginning_but_keeps_its_bos(reward_model, template):
    """With a chat template the BOS is part of the text; left truncation must not cut it off (the tokenizer adds
    it after truncation without one), so long and short texts are read alike."""
    from rahf.demo.tiny import build_tokenizer

    model, tok = reward_model
    tok = build_tokenizer(tok.get_vocab())
    tok.chat_template = template
    judge = RewardModelJudge(model, tok, max_length=12)
    long = " ".join([BEST] * 6)
    full = tok(judge.text(PROMPT, long), add_special_tokens=template is None)["input_ids"]
    ids = judge.encode(PROMPT, long)
    assert len(full) > 12 and len(ids) == 12 and ids[0] == tok.bos_token_id
    assert ids[1:] == full[-11:]
    assert RewardModelJudge(model, tok, max_length=512).encode(PROMPT, long) == full  # a text that fits: whole


def test_reward_model_batch_scores_equal_single_scores(reward_model):
    judge = RewardModelJudge(*reward_model, batch_size=2)  # 5 items: two full batches and one partial
    batched = judge.score_many([PROMPT] * len(REPLIES), REPLIES)
    alone = [RewardModelJudge(*reward_model).score(PROMPT, r) for r in REPLIES]  # new judges: nothing remembered
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) == len(REPLIES)  # a random model still tells the replies apart


def test_a_reward_model_judge_reads_each_distinct_text_once(reward_model):
    """An evaluation asks for a reply's score for its verdict, its judge score and its temperature's reward, and for
    a pair's chosen reply once per sample: each text goes through the model once, in order, whatever the repeats."""
    model, tok = reward_model
    judge, read = RewardModelJudge(model, tok, batch_size=2), []
    hook = model.register_forward_hook(
        lambda _m, args, kwargs, _out: read.extend(map(tuple, kwargs["input_ids"].tolist())), with_kwargs=True
    )
    try:
        first = judge.score_many([PROMPT] * 5, [BEST, WORST, BEST, MIDDLE, WORST])
        again = judge.score_many([PROMPT] * 3, [MIDDLE, REPLIES[3], BEST])
    finally:
        hook.remove()
    pad = tok.pad_token_id
    texts = [tuple(i for i in ids if i != pad) for ids in read]
    assert texts == [tuple(judge.encode(PROMPT, r)) for r in (BEST, WORST, MIDDLE, REPLIES[3])]
    fresh = RewardModelJudge(model, tok).score_many([PROMPT] * 4, [BEST, WORST, MIDDLE, REPLIES[3]])
    assert first == pytest.approx([fresh[0], fresh[1], fresh[0], fresh[2], fresh[1]], abs=1e-5)
    assert again == pytest.approx([fresh[2], fresh[3], fresh[0]], abs=1e-5)


def test_a_reply_equal_to_the_chosen_one_ties_with_the_reward_model_judge_whatever_the_batches(reward_model):
    """Replies and chosen replies are scored in one list, so a reply and its copy would sit in batches padded to
    other widths, and float rounding could turn their tie into a win or a loss."""
    judge = RewardModelJudge(*reward_model, batch_size=2)
    replies = [REPLIES[3], BEST, "of course !", WORST, MIDDLE]
    chosen = [REPLIES[3], WORST, "of course !", WORST, BEST]
    verdicts = judge.compare_many([PROMPT] * len(replies), replies, chosen)
    assert [v for v, a, b in zip(verdicts, replies, chosen) if a == b] == [0.5, 0.5, 0.5]


def test_reward_model_compare_follows_score_differences(reward_model):
    judge = RewardModelJudge(*reward_model)
    scores = dict(zip(REPLIES, judge.score_many([PROMPT] * len(REPLIES), REPLIES)))
    pairs = [(a, b) for a in REPLIES for b in REPLIES if a != b]
    verdicts = compare_all(judge, [PROMPT] * len(pairs), [a for a, _ in pairs], [b for _, b in pairs])
    assert verdicts == [1.0 if scores[a] > scores[b] else 0.0 for a, b in pairs]
    assert verdicts == [judge.compare(PROMPT, a, b) for a, b in pairs]
    assert judge.compare(PROMPT, BEST, BEST) == 0.5
    tolerant = RewardModelJudge(*reward_model, tie_margin=1e6)
    assert tolerant.compare(PROMPT, BEST, WORST) == 0.5


def test_reward_model_truncates_from_the_left(reward_model):
    model, tok = reward_model
    judge = RewardModelJudge(model, tok, max_length=6)
    text = judge.text(PROMPT, BEST)
    tail = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][-5:]  # BOS, then the text's end
    assert tok.convert_ids_to_tokens(tail[1:]) == BEST.split()[-5:]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tail])).logits[0, 0].item()
    assert judge.score(PROMPT, BEST) == pytest.approx(expected, abs=1e-5)
    assert (tok.truncation_side, tok.padding_side) == ("right", "right")  # restored


def test_reward_model_round_trips_through_from_pretrained(reward_model, tmp_path):
    model, tok = reward_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = RewardModelJudge.from_pretrained(str(tmp_path), tie_margin=0.25)
    assert isinstance(loaded, RewardModelJudge) and loaded.tie_margin == 0.25
    assert loaded.model.config.pad_token_id == tok.pad_token_id
    expected = RewardModelJudge(model, tok).score_many([PROMPT] * len(REPLIES), REPLIES)
    assert loaded.score_many([PROMPT] * len(REPLIES), REPLIES) == pytest.approx(expected, abs=1e-5)
    named = RewardModelJudge.from_pretrained(str(tmp_path), name="rm")
    assert isinstance(named, RewardModelJudge) and named.name == "rm"
    # loaded in the run's dtype, not the checkpoint's: a float16 checkpoint could overflow in a float32 run
    copy.deepcopy(model).half().save_pretrained(tmp_path / "half")
    tok.save_pretrained(tmp_path / "half")
    assert RewardModelJudge.from_pretrained(str(tmp_path / "half")).model.dtype == torch.float32
    assert RewardModelJudge.from_pretrained(str(tmp_path), dtype="bfloat16").model.dtype == torch.bfloat16


def test_reward_model_reads_scores_at_the_last_real_token_whatever_pad_id_the_config_names(reward_model):
    """A checkpoint whose config names another pad id than the tokenizer's still scores padded texts right."""
    import copy

    model, tok = reward_model
    other = copy.deepcopy(model)
    other.config.pad_token_id = tok.eos_token_id
    assert tok.eos_token_id != tok.pad_token_id
    judge = RewardModelJudge(other, tok, batch_size=len(REPLIES))
    assert judge.score_many([PROMPT] * len(REPLIES), REPLIES) == pytest.approx(
        [judge.score(PROMPT, r) for r in REPLIES], abs=1e-5
    )


def test_reward_model_refuses_nan_scores_instead_of_calling_them_ties(reward_model):
    model, tok = reward_model

    class Broken(torch.nn.Module):  # as a half-precision overflow would leave a model
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        @property
        def device(self):
            return model.device

        def forward(self, **inputs):
            out = self.inner(**inputs)
            out.logits = out.logits * float("nan")
            return out

    judge = RewardModelJudge(Broken(), tok)
    with pytest.raises(JudgeError, match="scored reply 0 as nan"):
        judge.compare(PROMPT, BEST, WORST)


def test_reward_model_needs_one_label(reward_model):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    _, tok = reward_model
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
        num_labels=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="one output label"):
        RewardModelJudge(LlamaForSequenceClassification(config), tok)


# ---------------------------------------------------------------- LLM judge against a stub server

ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of", re.DOTALL)


def answers(body: dict) -> dict[str, str]:
    """The replies shown as A and B in a judge request."""
    return dict(ANSWER.findall(body["messages"][-1]["content"]))


class Stub:
    """A scripted OpenAI-compatible server: `policy(body, n)` gives (status, reply text, error text or raw bytes)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.policy = lambda body, n: (200, "[[C]]")
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                stub.requests.append({"path": self.path, "body": body, "auth": auth})
                status, text = stub.policy(body, len(stub.requests))
                if isinstance(text, bytes):  # a raw body, as a misconfigured server might send
                    data = text
                elif status == 200:
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                else:  # echoes the key, as careless servers do
                    data = json.dumps({"error": f"{text} (you sent {auth})"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET_KEY)
    server = Stub()
    yield server
    server.close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def llm(stub, sleeps) -> LLMJudge:
    return LLMJudge(stub.url, "judge-model", api_key_env="JUDGE_TEST_KEY", timeout=5, sleep=sleeps.append)


POLITE = "of course, the sky is blue. a polite answer."
RUDE = "ugh. blue. a rude answer."
SKY = [{"role": "user", "content": "what color is the sky?"}]


def prefers_polite(body, n):
    return 200, "A is kind, B is not. [[A]]" if "polite" in answers(body)["A"] else "B is kind. [[B]]"


def test_llm_judge_strips_the_keys_line_end_and_refuses_a_broken_key_without_showing_it(stub, llm, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET_KEY + "\r\n")  # as a .env file or a mounted secret holds it
    llm.chat([{"role": "user", "content": "hi"}])
    assert stub.requests[-1]["auth"] == f"Bearer {SECRET_KEY}"
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET_KEY + "\nsecond line")
    with pytest.raises(JudgeError, match=r"\$JUDGE_TEST_KEY holds whitespace or a non-ASCII character") as e:
        llm.chat([{"role": "user", "content": "hi"}])
    assert SECRET_KEY not in str(e.value) and len(stub.requests) == 1


def test_llm_judge_does_not_follow_a_redirect_with_the_key(stub, llm):
    """urllib would send the Authorization header on to the other host."""
    other = Stub()
    try:

        class Redirect(BaseHTTPRequestHandler):
            def do_POST(self):
                self.send_response(302)
                self.send_header("Location", other.url + "/chat/completions")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        stub.server.RequestHandlerClass = Redirect
        with pytest.raises(JudgeError, match=r"redirects to http://127\.0\.0\.1:\d+/v1/chat/completions \(HTTP 302\)"):
            llm.chat([{"role": "user", "content": "hi"}])
        assert other.requests == []
    finally:
        other.close()


def test_llm_judge_asks_both_orders_and_agrees_with_a_consistent_judge(stub, llm):
    stub.policy = prefers_polite
    assert llm.compare(SKY, POLITE, RUDE) == 1.0
    assert llm.compare(SKY, RUDE, POLITE) == 0.0
    assert llm.calls == len(stub.requests) == 4 and llm.unparsed == 0
    first, second = (r["body"] for r in stub.requests[:2])
    assert answers(first) == {"A": POLITE, "B": RUDE} and answers(second) == {"A": RUDE, "B": POLITE}
    for r in stub.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["auth"] == f"Bearer {SECRET_KEY}"
        assert r["body"]["model"] == "judge-model" and r["body"]["temperature"] == 0
        assert r["body"]["messages"][0]["role"] == "system" and "[[C]]" in r["body"]["messages"][0]["content"]
        assert "User: what color is the sky?" in r["body"]["messages"][-1]["content"]


def test_llm_judge_cancels_position_bias(stub, llm):
    stub.policy = lambda body, n: (200, "The first one. [[A]]")
    assert llm.compare(SKY, POLITE, RUDE) == 0.5
    assert llm.unparsed == 0


def test_llm_judge_reads_the_last_verdict_token(stub, llm):
    stub.policy = lambda body, n: (200, "Not [[B]] at first sight, yet finally [[A]]" if n == 1 else "[[C]]")
    assert llm.compare(SKY, POLITE, RUDE) == 0.75  # (1 + 0.5) / 2


def test_llm_judge_counts_unparsed_replies_as_ties(stub, llm):
    stub.policy = lambda body, n: (200, "I cannot decide, both are [[fine]].")
    assert llm.compare(SKY, POLITE, RUDE) == 0.5
    assert llm.unparsed == 2 and llm.calls == 2


def test_llm_judge_retries_server_errors(stub, llm, sleeps):
    stub.policy = lambda body, n: (503, "overloaded") if n <= 2 else prefers_polite(body, n)
    assert llm.compare(SKY, POLITE, RUDE) == 1.0
    assert len(stub.requests) == 4 and llm.calls == 2  # two questions answered, the first after two retries
    assert sleeps == [1.0, 2.0]  # exponential backoff


def test_llm_judge_gives_up_after_max_retries(stub, llm, sleeps):
    stub.policy = lambda body, n: (429, "slow down")
    with pytest.raises(RuntimeError, match="429") as info:
        llm.compare(SKY, POLITE, RUDE)
    assert len(stub.requests) == 4 and llm.calls == 0 and len(sleeps) == 3
    assert "SECRET" not in str(info.value)


def test_llm_judge_raises_on_client_errors_without_the_key(stub, llm, sleeps):
    stub.policy = lambda body, n: (400, "bad request")
    with pytest.raises(RuntimeError, match="HTTP 400") as info:
        llm.compare(SKY, POLITE, RUDE)
    message = str(info.value)
    assert "bad request" in message and "Bearer ***" in message and "SECRET" not in message
    assert len(stub.requests) == 1 and llm.calls == 0 and sleeps == []
    assert "SECRET" not in repr(llm) and "SECRET" not in repr(vars(llm))


def test_llm_judge_rejects_replies_that_are_no_chat_completion(stub, llm):
    stub.policy = lambda body, n: (200, b"<html>not an API</html>")
    with pytest.raises(RuntimeError, match="no chat completion.*not an API"):
        llm.compare(SKY, POLITE, RUDE)


def test_llm_judge_refuses_content_that_is_no_string(stub, llm):
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "[[A]]"}]}}]}
    stub.policy = lambda body, n: (200, json.dumps(parts).encode())
    with pytest.raises(JudgeError, match="no chat completion"):
        llm.compare(SKY, POLITE, RUDE)


def test_llm_judge_retries_a_broken_http_reply(sleeps):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer_twice():  # no HTTP status line: http.client raises BadStatusLine
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HELLO\r\n\r\n")

    thread = threading.Thread(target=answer_twice, daemon=True)
    thread.start()
    judge = LLMJudge(f"http://127.0.0.1:{server.getsockname()[1]}", "m", max_retries=1, timeout=5, sleep=sleeps.append)
    with pytest.raises(JudgeError, match="bad HTTP reply .*BadStatusLine"):
        judge.compare(SKY, POLITE, RUDE)
    thread.join(timeout=5)
    server.close()
    assert judge.calls == 0 and sleeps == [1.0]  # two attempts, none answered


def test_llm_judge_retries_unreachable_servers(monkeypatch, sleeps):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(f"http://me:SECRETPW@127.0.0.1:{port}", "m", max_retries=2, timeout=2, sleep=sleeps.append)
    with pytest.raises(RuntimeError, match=r"cannot reach http://<redacted>@127\.0\.0\.1") as failure:
        judge.compare(SKY, POLITE, RUDE)
    assert judge.calls == 0 and sleeps == [1.0, 2.0]  # three attempts, none answered
    assert "SECRETPW" not in str(failure.value) and "SECRETPW" not in repr(judge)  # credentials stay out of logs
    assert isinstance(failure.value, RahfError)  # the command line prints it in one line, not as a traceback


def test_llm_judge_sends_no_authorization_without_a_key(stub, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY")
    judge = LLMJudge(stub.url, "m", api_key_env="JUDGE_TEST_KEY")
    judge.compare(SKY, POLITE, RUDE)
    assert [r["auth"] for r in stub.requests] == [None, None]


# ---------------------------------------------------------------- factory and batching


def test_llm_judge_drops_a_trailing_slash_of_its_base_url():
    llm = LLMJudge(base_url="http://127.0.0.1:1/v1/", model="m")
    assert llm.base_url == "http://127.0.0.1:1/v1" and llm.name == "llm"


def test_compare_all_loops_over_judges_without_compare_many():
    assert compare_all(GoldJudge(), [PROMPT] * 3, [BEST, WORST, MIDDLE], [WORST, BEST, MIDDLE]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="lengths differ"):
        compare_all(GoldJudge(), [PROMPT], [BEST, WORST], [WORST])

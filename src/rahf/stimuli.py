"""Token sequences for training, collection and inference, built so that they equal what inference sees.

A prompt is rendered with the tokenizer's chat template (or a "Human:/Assistant:" template, after the
special tokens the tokenizer puts before a text, when it has none) and tokenized once; the response gets
the ids one tokenization of the whole conversation gives it after the assistant tag, and is closed by the
token that closes a turn (the chat template's end-of-turn token, else EOS). So no BOS or EOS ever sits
between prompt and response, a reply starts as the template writes it, and every variant of a pair (no
instruction, preferred instruction, dispreferred instruction) carries identical response token ids. Long
prompts lose their oldest turns and then the beginning of the first kept message, cut between characters;
the instruction and the assistant tag are always kept, and the query is cut by the same amount for every
variant. A template that writes one system message gets the instruction at the head of the pair's own, and one
that refuses or drops system messages gets it in the first user turn.
Models are saved with the plain template written as a chat template (`plain_chat_template`), which rahf reads as
no template.
"""

from __future__ import annotations

import functools
import json
import weakref
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeVar

from tqdm.auto import tqdm

from .data import Message
from .distributed import is_main
from .errors import ConfigError, DataError


@dataclass(frozen=True)
class Stimulus:
    """One token sequence: prompt then response; `response_start` indexes the first response token.

    The ids are held as a C array of 4-byte ints (any sequence given is converted): a stage holds every pair's
    sequences at once, and as a tuple of Python ints each id takes 8 to 36 bytes instead of 4.
    """

    input_ids: array[int]
    response_start: int

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, array) or self.input_ids.typecode != "i":
            object.__setattr__(self, "input_ids", array("i", self.input_ids))

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.response_start

    def window(self, size: int, include_boundary: bool) -> tuple[int, int]:
        """(start, length) of the positions whose hidden states we read or steer.

        The hidden state at position t shapes the prediction of token t+1, so with `include_boundary`
        the window starts at the last prompt position, which predicts the first response token.
        """
        n = min(size, self.response_len)
        return (self.response_start - 1 if include_boundary else self.response_start), n


def plain_text(messages: Sequence[Message], system: str | None = None) -> str:
    """The "Human:/Assistant:" layout of a conversation: `system` (the instruction), then the conversation's own
    system messages in their order, as a chat template renders [instruction, *messages]; then the turns."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    turns = [
        ("Human: " if m["role"] == "user" else "Assistant: ") + m["content"] for m in messages if m["role"] != "system"
    ]
    return "\n\n".join([*([system] if system else []), *systems, *turns])


def _plain_prompt(messages: Sequence[Message], system: str | None) -> str:
    return plain_text(messages, system) + "\n\nAssistant:"


# (what a probe of the tokenizer found, keyed by the settings it depends on) per probe, per tokenizer: every
# prompt and response of a dataset asks, so each probe tokenizes or renders once per tokenizer and setting
_PROBES: dict[str, weakref.WeakKeyDictionary] = {}


def _probed(name: str, tokenizer, settings: tuple, probe: Callable[[], Any]) -> Any:
    """`probe()`'s result for `tokenizer`, computed again only when `settings` change."""
    store = _PROBES.setdefault(name, weakref.WeakKeyDictionary())
    known = store.get(tokenizer)
    if known is None or known[0] != settings:
        store[tokenizer] = known = (settings, probe())
    return known[1]


def _prepended_ids(tokenizer) -> list[int]:
    """The special tokens (usually BOS) the tokenizer puts before a text; not those it appends after it."""

    def probe() -> tuple[int, ...]:
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        return tuple(full[: next((k for k in range(len(full)) if full[k : k + len(bare)] == bare), 0)])

    settings = tuple(getattr(tokenizer, k, None) for k in ("bos_token_id", "add_bos_token"))
    return list(_probed("prepended", tokenizer, settings, probe))


# `_plain_prompt` in Jinja (system messages first, in their order; then the turns). Without the generation
# prompt, a conversation whose last turn is the assistant's ends in EOS as training sequences do; any other ends
# with its last turn's text
_SYSTEMS_IN_ORDER = "{%- for m in messages if m['role'] == 'system' -%}"
_SYSTEMS_REVERSED = "{%- for m in messages | reverse if m['role'] == 'system' -%}"  # as saved before: read as ours
_PLAIN_TEMPLATE = """\
{%- set ns = namespace(parts=[]) -%}
{%- for m in messages if m['role'] == 'system' -%}
    {%- set ns.parts = ns.parts + [m['content']] -%}
{%- endfor -%}
{%- for m in messages if m['role'] != 'system' -%}
    {%- set ns.parts = ns.parts + [('Human: ' if m['role'] == 'user' else 'Assistant: ') + m['content']] -%}
{%- endfor -%}
{{- ns.parts | join('\\n\\n') -}}
{%- if add_generation_prompt -%}
    {{- '\\n\\nAssistant:' -}}
{%- elif messages and messages[-1]['role'] == 'assistant' -%}
    {{- eos_token -}}
{%- endif -%}
"""


def plain_chat_template(tokenizer) -> str | None:
    """A Jinja chat template for a tokenizer without one that renders the "Human:/Assistant:" prompts rahf trains
    on, to the same ids (`apply_chat_template` adds no special tokens, so the template writes the leading ones);
    saved with rahf's models so that servers format prompts as training did. None where no written-out leading
    tokens give those ids."""
    lead = _written_lead(tokenizer)
    return None if lead is None else f"{{{{- {json.dumps(lead)} -}}}}\n{_PLAIN_TEMPLATE}"


def _written_lead(tokenizer) -> str | None:
    """The text that, before a plain prompt, tokenizes to `_prepended_ids` followed by the prompt's own ids: the
    leading special tokens, then a space where the tokenizer marks a first word only at the very start of a text
    (SentencePiece's "▁" in Llama 2 and Mistral, which a word after a special token does not get); None if neither."""

    def probe() -> str | None:
        prepended = _prepended_ids(tokenizer)
        text = _plain_prompt(_PROBE, None)
        expected = prepended + tokenizer(text, add_special_tokens=False)["input_ids"]
        written = "".join(tokenizer.convert_ids_to_tokens(prepended))
        leads = (written, written + " ")
        return next((s for s in leads if tokenizer(s + text, add_special_tokens=False)["input_ids"] == expected), None)

    settings = tuple(getattr(tokenizer, k, None) for k in ("bos_token_id", "add_bos_token"))
    return _probed("written lead", tokenizer, settings, probe)


def chat_template(tokenizer) -> str | None:
    """The chat template prompts are rendered with: the tokenizer's, or None where it has none or has rahf's own
    `plain_chat_template` (or the one earlier versions saved, which ordered system messages in reverse), which stands
    for the plain template, so rahf reads the folders it saved as it trained."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    own = plain_chat_template(tokenizer)
    return None if own and template in (own, own.replace(_SYSTEMS_IN_ORDER, _SYSTEMS_REVERSED)) else template


TEMPLATE_DATE = date(2024, 7, 26)
"""The day a chat template that prints today's date (Llama 3.2, gpt-oss: `strftime_now`) prints instead (Llama 3.1's
own default): otherwise a run's sequences would change from one day to the next, unseen by any fingerprint."""

_DIRECTIVES = "YymdBbAajHIMSp"


@functools.lru_cache(maxsize=8)
def _pinned(template: str) -> str:
    """`template` with `strftime_now` defined as a macro giving TEMPLATE_DATE (at midnight) in the usual directives."""
    if "strftime_now" not in template:
        return template
    day = datetime.combine(TEMPLATE_DATE, datetime.min.time())
    swaps = "".join(f" | replace({json.dumps('%' + d)}, {json.dumps(day.strftime('%' + d))})" for d in _DIRECTIVES)
    return f"{{%- macro strftime_now(fmt) -%}}{{{{- fmt{swaps} -}}}}{{%- endmacro -%}}{template}"


def apply_template(tokenizer, messages: Sequence[Message], **kwargs) -> str:
    """The text `tokenizer.apply_chat_template` renders for `messages` with its chat template, on TEMPLATE_DATE."""
    template = chat_template(tokenizer)
    pinned = {"chat_template": _pinned(template)} if isinstance(template, str) else {}  # a dict: several, named
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **pinned, **kwargs)


_SYSTEM_PROBE = "rahf-system-probe"


def _renders_system(tokenizer) -> bool:
    """Whether the chat template writes a system message's text, probed with a neutral one: templates that
    rewrite flags inside it (SmolLM3 removes "/no_think") still count as keeping it."""

    def probe() -> bool:
        try:
            text = _chat_text(tokenizer, [{"role": "system", "content": _SYSTEM_PROBE}, *_PROBE], "the probe prompt")
        except DataError:
            return False
        return _SYSTEM_PROBE in text

    return _probed("renders system", tokenizer, (tokenizer.chat_template,), probe)


def _keeps_systems(tokenizer) -> bool:
    """Whether the chat template writes each of two leading system messages: Mistral refuses a second one,
    DeepSeek-R1 keeps only the last and gpt-oss only the first."""

    def probe() -> bool:
        twice = [{"role": "system", "content": f"{_SYSTEM_PROBE}-{k}"} for k in (1, 2)]
        try:
            text = _chat_text(tokenizer, [*twice, *_PROBE], "the probe prompt")
        except DataError:
            return False
        return all(m["content"] in text for m in twice)

    return _probed("keeps systems", tokenizer, (tokenizer.chat_template,), probe)


def _instructed_text(tokenizer, msgs: list[Message], system: str, where: str) -> str:
    """The chat template's text for `msgs` with the instruction `system` where the template writes it: a system
    message of its own before the pair's; where the template writes only one system message, at the head of the one
    it keeps (Mistral, gpt-oss: the first; DeepSeek-R1: the last); where it writes none, at the head of the first user
    turn. Each place is tried until the text holds the instruction."""

    def heading(at: int) -> list[Message]:
        return [*msgs[:at], {**msgs[at], "content": f"{system}\n\n{msgs[at]['content']}"}, *msgs[at + 1 :]]

    own = [i for i, m in enumerate(msgs) if m["role"] == "system"]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    tries: list[list[Message]] = []
    if _renders_system(tokenizer) and (not own or _keeps_systems(tokenizer)):
        tries.append([{"role": "system", "content": system}, *msgs])
    if _renders_system(tokenizer):
        tries += [heading(i) for i in dict.fromkeys(own[:1] + own[-1:])]
    tries.append(heading(users[0] if users else 0))
    texts = []
    for messages in tries:
        texts.append(_chat_text(tokenizer, messages, where))
        if system in texts[-1]:
            return texts[-1]
    return texts[0]  # a template that rewrites the instruction's text (SmolLM3's flags): its first place


def _chat_text(tokenizer, messages: Sequence[Message], where: str) -> str:
    """The chat template's text for `messages` plus the assistant tag; a template that refuses them raises DataError."""
    try:
        return apply_template(tokenizer, messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 (templates raise jinja2's TemplateError or whatever their filters raise)
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(
            f"{where}: the tokenizer's chat template rejects the prompt's roles [{roles}] "
            f"({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None


def render_prompt(
    tokenizer, messages: Sequence[Message], system: str | None = None, source: str | None = None
) -> list[int]:
    """Token ids of a prompt exactly as generation receives them (ends with the assistant tag).

    `source` names the pair ("file:line") in the error raised when the chat template refuses the messages;
    without it the error quotes the prompt's beginning.
    """
    if chat_template(tokenizer):
        msgs = list(messages)
        where = source or f"the prompt beginning {msgs[0]['content'][:40]!r}"
        text = _instructed_text(tokenizer, msgs, system, where) if system else _chat_text(tokenizer, msgs, where)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = _plain_prompt(messages, system)
    return _prepended_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


_MARK = "rahf-reply-end-probe"


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant reply: the one the chat template writes right after it, else EOS.

    ChatML templates close a turn with `<|im_end|>` and Llama 3 with `<|eot_id|>`, which a base model's EOS
    (Qwen base: `<|endoftext|>`) is not; training replies must end as the template renders them.
    """
    return _closing(tokenizer)[0]


def _closing(tokenizer) -> tuple[int, int | None]:
    """(`end_of_turn_id`, how many ids the chat template writes after it: ChatML's "\n" after `<|im_end|>`), or
    (EOS, None) where the template closes a reply with no special or added token (or there is no template). It is the
    first such token after the reply: what a template writes before it ("\n\n### End</s>") belongs to the reply."""
    eos, template = tokenizer.eos_token_id, chat_template(tokenizer)
    if not template:
        return eos, None
    return _probed("end of turn", tokenizer, (template, eos), lambda: _rendered_closing(tokenizer))


def _rendered_closing(tokenizer) -> tuple[int, int | None]:
    eos = tokenizer.eos_token_id
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
    try:
        text = apply_template(tokenizer, turn)
    except Exception:  # noqa: BLE001 (a template that renders no such turn: fall back to EOS)
        return eos, None
    after = text.split(_MARK, 1)[1] if _MARK in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    # a special token, or any the tokenizer added (ChatML's turn markers, added to some as ordinary tokens)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    first = next((k for k, i in enumerate(ids) if i in special), None)
    return (eos, None) if first is None else (ids[first], len(ids) - first - 1)


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end generation: EOS and, when the chat template closes turns with another, that one too."""
    return sorted({tokenizer.eos_token_id, end_of_turn_id(tokenizer)})


_PROBE: list[Message] = [{"role": "user", "content": "q"}]


def response_ids(tokenizer, response: str, max_length: int) -> list[int]:
    """Response tokens followed by the end of the turn (`end_of_turn_id`), cut to `max_length` (the end is
    dropped when the text fills it).

    The tokens are those one tokenization of a whole conversation gives the reply after the assistant tag,
    as the chat template writes it (a leading space some templates put there; no SentencePiece word marker
    where the tag ends a line; a header such as Qwen3's empty think block). They depend only on the tag, so
    every variant of a pair shares them. When the template writes no continuation of the prompt, the reply
    is tokenized on its own.
    """
    eot = end_of_turn_id(tokenizer)
    ids = _reply_in_context(tokenizer, response)
    if ids is None:
        prefix = "" if chat_template(tokenizer) else " "
        ids = tokenizer(prefix + response, add_special_tokens=False)["input_ids"]
    elif (after := _closing(tokenizer)[1]) is not None and len(ids) > after and ids[-after - 1] == eot:
        # the template closes the turn itself: keep what it writes before that token, found at its distance from the
        # end, so a reply that holds the token's text itself ("... write </s> there ...") keeps it
        ids = ids[: len(ids) - after - 1]
    return (ids + [eot])[:max_length]


_OPEN_THINK, _CLOSE_THINK = "<think>", "</think>"


def _reply_tail(prompt: str, whole: str) -> str | None:
    """The text a finished one-turn conversation `whole` has after the generation prompt `prompt`, or None.

    A prompt that opens a reasoning block the finished turn does not write (DeepSeek-R1 ends its generation
    prompt with "<think>\n") gets the block closed empty first, as Qwen3 writes a turn without reasoning, so
    the model learns to close it before the reply instead of answering inside it.
    """
    if whole.startswith(prompt):
        return whole[len(prompt) :]
    head = prompt[: prompt.rfind(_OPEN_THINK)]
    if _OPEN_THINK in prompt and _CLOSE_THINK not in prompt[len(head) :] and whole.startswith(head):
        return f"\n{_CLOSE_THINK}\n\n" + whole[len(head) :]
    return None


def _probe_texts(tokenizer) -> tuple[str, list[int]]:
    """The probe prompt's text and ids, rendered again when the template changes."""
    template = chat_template(tokenizer)

    def probe() -> tuple[str, list[int]]:
        text = _chat_text(tokenizer, _PROBE, "the probe prompt") if template else _plain_prompt(_PROBE, None)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]

    return _probed("probe prompt", tokenizer, (template,), probe)


def _continuation(tokenizer, response: str) -> tuple[str, str] | None:
    """(the one-turn conversation's whole text, `_reply_tail`'s continuation of the probe prompt) for a reply
    `response`, or None where the template writes no finished assistant turn continuing the prompt."""
    prompt, _ = _probe_texts(tokenizer)
    if chat_template(tokenizer):
        try:
            whole = apply_template(tokenizer, [*_PROBE, {"role": "assistant", "content": response}])
        except Exception:  # noqa: BLE001 (a template that renders no finished assistant turn)
            return None
    else:
        whole = f"{prompt} {response}"
    tail = _reply_tail(prompt, whole)
    return None if tail is None else (whole, tail)


def _reply_in_context(tokenizer, response: str) -> list[int] | None:
    """The ids that follow the prompt's ids in a one-turn conversation whose reply is `response`, as the chat
    template writes it (`_reply_tail`), or None where the template writes no such continuation of the prompt.

    They are the reply's ids within one tokenization of the whole conversation when that extends the prompt's
    ids, else the continuation's text tokenized after them (Qwen3-Thinking's "\n" + "\n" would merge).
    """
    found = _continuation(tokenizer, response)
    if found is None:
        return None
    (whole, tail), (prompt, head) = found, _probe_texts(tokenizer)
    if whole.startswith(prompt):
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        if ids[: len(head)] == head:
            return ids[len(head) :]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


def reply_header(tokenizer) -> str:
    """What the chat template writes between the assistant tag and every reply's text (Qwen3's empty
    "<think>\n\n</think>\n\n", gpt-oss's "<|channel|>final<|message|>"), stripped; "" for most templates."""

    def probe() -> str:
        found = _continuation(tokenizer, _MARK)
        return found[1].split(_MARK, 1)[0].strip() if found and _MARK in found[1] else ""

    template = chat_template(tokenizer)
    return _probed("reply header", tokenizer, (template,), probe) if template else ""


def reply_content(tokenizer, text: str) -> str:
    """A generated reply's answer: without the template's `reply_header` (which training teaches the model to
    write) and, after a template's reasoning block, without the reasoning the model wrote in it; with a channel
    header (gpt-oss), what follows the last one, after any other channel the model wrote first. A reply that
    stops inside its reasoning block, or in another channel before the answer's, has no answer: ""."""
    header = reply_header(tokenizer)
    if _CLOSE_THINK in header:
        by_prompt = not header.startswith(_OPEN_THINK)  # R1: the generation prompt opened the block
        if (by_prompt or text.startswith(_OPEN_THINK)) and _CLOSE_THINK in text:
            return text.split(_CLOSE_THINK, 1)[1].strip()
        return "" if by_prompt or text.startswith(_OPEN_THINK) else text
    if header and header in text:
        return text.rsplit(header, 1)[1].strip()
    if header and (lead := _lead_token(tokenizer, header)) and text.startswith(lead):
        return ""
    return text


def _lead_token(tokenizer, header: str) -> str | None:
    """The added token `header` starts with (gpt-oss's "<|channel|>"), which opens any channel; None if none."""

    def probe() -> str | None:
        ids = tokenizer(header, add_special_tokens=False)["input_ids"]
        first = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
        return first if first in tokenizer.get_added_vocab() else None

    return _probed("header lead", tokenizer, (header,), probe)  # once, not once per judged reply


def _drop_leading_tokens(tokenizer, text: str, n: int) -> str:
    """`text` without about its first `n` tokens, cut between characters and always shorter than before.

    The original string is cut, never decoded token ids: a cut inside a multi-byte character would decode
    to U+FFFD, which can take more tokens than the bytes it replaces.
    """
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = offsets[n][0] if n < len(offsets) else len(text)
    else:  # Python tokenizers give no offsets: count the characters the first n tokens decode to
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = len(tokenizer.decode(ids[:n], skip_special_tokens=True))
    return text[max(cut, 1) :].strip()


def truncate_prompt(
    tokenizer,
    messages: Sequence[Message],
    systems: Sequence[str | None],
    max_length: int,
    source: str | None = None,
) -> list[Message]:
    """Drop the oldest turns, then the start of the first one, until every variant fits `max_length`.

    A system message leading the prompt is kept: it frames every turn after it.
    """
    return _fit_prompt(tokenizer, messages, systems, max_length, source)[0]


def _fit_prompt(
    tokenizer, messages: Sequence[Message], systems: Sequence[str | None], max_length: int, source: str | None
) -> tuple[list[Message], list[list[int]]]:
    """`truncate_prompt`'s messages and, per system of `systems`, their rendered ids (so no caller renders twice).

    The last fit per tokenizer and systems is kept: a pair's chosen and rejected replies share their prompt."""
    bos = tuple(getattr(tokenizer, k, None) for k in ("bos_token_id", "add_bos_token"))
    settings = (chat_template(tokenizer), bos, max_length, [dict(m) for m in messages])
    msgs, rendered = _probed(
        f"fit {list(systems)!r}", tokenizer, settings, lambda: _fitted(tokenizer, messages, systems, max_length, source)
    )
    return [dict(m) for m in msgs], [list(ids) for ids in rendered]


def _fitted(
    tokenizer, messages: Sequence[Message], systems: Sequence[str | None], max_length: int, source: str | None
) -> tuple[list[Message], list[list[int]]]:
    msgs = [dict(m) for m in messages]
    lead = 0
    while lead < len(msgs) - 1 and msgs[lead]["role"] == "system":
        lead += 1
    head, turns = msgs[:lead], msgs[lead:]
    # Where the kept turns may start: the first, each later user turn, and the last alone. The longest start that
    # fits is found by bisection (a conversation of K turns is rendered about log K times, not K), reading the
    # rendered length as never growing when older turns are dropped.
    starts = sorted({0, len(turns) - 1, *(i for i, m in enumerate(turns) if i and m["role"] == "user")})
    seen: dict[int, list[list[int]]] = {}

    def render(start: int) -> list[list[int]]:
        if start not in seen:
            seen[start] = [render_prompt(tokenizer, head + turns[start:], s, source) for s in systems]
        return seen[start]

    def fits(start: int) -> bool:
        return max(len(ids) for ids in render(start)) <= max_length

    lo, hi = 0, 0 if fits(starts[0]) else len(starts) - 1  # the first start that fits is in starts[lo..hi], or
    while lo < hi:  # none fits and it is the last
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    rendered, turns = render(starts[lo]), turns[starts[lo] :]
    while (longest := max(len(ids) for ids in rendered)) > max_length:  # one turn left: cut its beginning
        turns[0]["content"] = _drop_leading_tokens(tokenizer, turns[0]["content"], longest - max_length)
        if not turns[0]["content"] and head:
            raise DataError(
                f"{source or 'a prompt'}: its own system message leaves no room for the query within "
                f"data.max_prompt_length={max_length}; shorten that message or raise data.max_prompt_length"
            )
        if not turns[0]["content"]:
            instructed = any(s is not None for s in systems)
            raise ConfigError(
                f"data.max_prompt_length={max_length} leaves no room for the query after the "
                + (
                    "instruction and template; raise it or shorten the instructions"
                    if instructed
                    else "template; raise it"
                )
            )
        rendered = [render_prompt(tokenizer, head + turns, s, source) for s in systems]
    return head + turns, rendered


class Instruction(str):
    """An instruction given at inference as SCIT trained with it (HIR): a long prompt is cut to fit `alongside`
    too, the other instruction SCIT cut its prompts for, so the query loses what it lost in training."""

    alongside: tuple[str, ...] = ()

    def __new__(cls, text: str, alongside: Sequence[str] = ()) -> Instruction:  # noqa: PYI034 (3.10: no Self)
        made = super().__new__(cls, text)
        made.alongside = tuple(alongside)
        return made


def _cut_for(systems: Sequence[str | None]) -> list[str | None]:
    """`systems` and the instructions they were cut alongside in training (`Instruction`), once each."""
    return list(dict.fromkeys([*systems, *(a for s in systems for a in getattr(s, "alongside", ()))]))


def build_variants(
    tokenizer,
    prompt: Sequence[Message],
    response: str,
    systems: dict[str, str | None],
    max_prompt_length: int,
    max_response_length: int,
    source: str | None = None,
) -> dict[str, Stimulus]:
    """One Stimulus per named system instruction (None = no instruction), all with the same response tokens.

    The instruction variants share one query, truncated to fit the longest of them, so their contrast is
    about the instruction alone; the variant without instruction is truncated on its own, exactly as
    `prompt_ids` truncates at inference. `source` names the pair ("file:line") in errors about its prompt.
    """
    instructed = list(dict.fromkeys(s for s in systems.values() if s is not None))
    ids: dict[str | None, list[int]] = {}
    kept = []  # the messages each truncation kept
    if instructed:
        msgs, rendered = _fit_prompt(tokenizer, prompt, _cut_for(instructed), max_prompt_length, source)
        ids |= zip(_cut_for(instructed), rendered)
        kept.append(msgs)
    if None in systems.values():
        msgs, rendered = _fit_prompt(tokenizer, prompt, [None], max_prompt_length, source)
        ids[None] = rendered[0]
        kept.append(msgs)
    whole = response_ids(tokenizer, response, 2**62)
    resp = whole[:max_response_length]
    for counts in _TALLIES:
        counts["examples"] += 1
        counts["prompt cut"] += any(m != [dict(x) for x in prompt] for m in kept)
        counts["reply cut"] += len(whole) > max_response_length
        counts["reply empty"] += not response.strip()
    return {name: Stimulus(array("i", ids[system] + resp), len(ids[system])) for name, system in systems.items()}


T = TypeVar("T")
PROGRESS_DELAY = 2.0  # seconds of tokenizing before its bar shows: none for small data, one for 200k pairs


def tokenizing(items: Sequence[T], what: str) -> Iterator[T]:
    """`items` (pairs, examples), with a progress bar once tokenizing them has taken `PROGRESS_DELAY` seconds: a
    stage builds every sequence before its own bar starts, which takes minutes on hundreds of thousands of pairs."""
    return iter(
        tqdm(items, desc=f"tokenize {what}", unit=what, delay=PROGRESS_DELAY, leave=False, disable=not is_main())
    )


_TALLIES: list[Counter] = []  # the open `tally` counters


@contextmanager
def tally() -> Iterator[Counter]:
    """A Counter of the examples (a prompt with one reply, in all its instruction variants) `build_variants` makes
    while it is open: "examples", and in how many the prompt was cut to fit (its beginning lost), the reply was
    cut, or the reply is empty. A stage reports them."""
    counts: Counter = Counter()
    _TALLIES.append(counts)
    try:
        yield counts
    finally:
        _TALLIES.remove(counts)


@contextmanager
def untallied() -> Iterator[None]:
    """The open `tally` counters paused: for sequences a stage builds again (the same examples scored by a second
    model), which its count of examples would otherwise hold twice."""
    paused = _TALLIES[:]
    _TALLIES.clear()
    try:
        yield
    finally:
        _TALLIES[:] = paused


def prompt_ids(
    tokenizer,
    prompt: Sequence[Message],
    max_prompt_length: int,
    system: str | None = None,
    source: str | None = None,
) -> list[int]:
    """Inference-time prompt ids, truncated like training prompts."""
    return _fit_prompt(tokenizer, prompt, _cut_for([system]), max_prompt_length, source)[1][0]

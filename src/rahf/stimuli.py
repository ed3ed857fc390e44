"""Token sequences for training, collection and inference, built so that they equal what inference sees.

A prompt is rendered with the tokenizer's chat template (or a "Human:/Assistant:" template when it
has none) and tokenized once; the response is tokenized on its own without special tokens and
appended, followed by EOS. So no BOS ever sits between prompt and response, and every variant of a
pair (no instruction, preferred instruction, dispreferred instruction) carries identical response
token ids. Long prompts lose their oldest turns and then the beginning of the first kept message; the
instruction and the assistant tag are always kept, and the query is cut by the same amount for every
variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .data import Message
from .errors import ConfigError


@dataclass(frozen=True)
class Stimulus:
    """One token sequence: prompt then response; `response_start` indexes the first response token."""

    input_ids: tuple[int, ...]
    response_start: int

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


def _plain_prompt(messages: Sequence[Message], system: str | None) -> str:
    parts = [system] if system else []
    for m in messages:
        if m["role"] == "system":
            parts.insert(0, m["content"])
        else:
            parts.append(("Human: " if m["role"] == "user" else "Assistant: ") + m["content"])
    return "\n\n".join(parts) + "\n\nAssistant:"


def render_prompt(tokenizer, messages: Sequence[Message], system: str | None = None) -> list[int]:
    """Token ids of a prompt exactly as generation receives them (ends with the assistant tag)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = list(messages)
        if system:
            msgs = [{"role": "system", "content": system}] + msgs
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role: fold it into the first user turn
            if not system:
                raise
            first = dict(messages[0])
            first["content"] = f"{system}\n\n{first['content']}"
            text = tokenizer.apply_chat_template([first, *messages[1:]], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(_plain_prompt(messages, system), add_special_tokens=True)["input_ids"]


def response_ids(tokenizer, response: str, max_length: int) -> list[int]:
    """Response tokens followed by EOS, cut to `max_length` (EOS is dropped when the text fills it)."""
    prefix = "" if getattr(tokenizer, "chat_template", None) else " "
    ids = tokenizer(prefix + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_length]


def truncate_prompt(
    tokenizer, messages: Sequence[Message], systems: Sequence[str | None], max_length: int
) -> list[Message]:
    """Drop the oldest turns, then the start of the first message, until every variant fits `max_length`."""
    msgs = [dict(m) for m in messages]
    while True:
        longest = max(len(render_prompt(tokenizer, msgs, s)) for s in systems)
        if longest <= max_length:
            return msgs
        if len(msgs) > 1:
            msgs = msgs[1:]
            while len(msgs) > 1 and msgs[0]["role"] != "user":
                msgs = msgs[1:]
            continue
        ids = tokenizer(msgs[0]["content"], add_special_tokens=False)["input_ids"]
        keep = ids[longest - max_length :]
        if not keep:
            raise ConfigError(
                f"data.max_prompt_length={max_length} leaves no room for the query after the instruction and "
                "template; raise it or shorten the instructions"
            )
        msgs[0]["content"] = tokenizer.decode(keep, skip_special_tokens=True).strip()


def build_variants(
    tokenizer,
    prompt: Sequence[Message],
    response: str,
    systems: dict[str, str | None],
    max_prompt_length: int,
    max_response_length: int,
) -> dict[str, Stimulus]:
    """One Stimulus per named system instruction (None = no instruction), sharing query and response tokens."""
    msgs = truncate_prompt(tokenizer, prompt, list(systems.values()), max_prompt_length)
    resp = response_ids(tokenizer, response, max_response_length)
    out = {}
    for name, system in systems.items():
        p = render_prompt(tokenizer, msgs, system)
        out[name] = Stimulus(tuple(p + resp), len(p))
    return out


def prompt_ids(tokenizer, prompt: Sequence[Message], max_prompt_length: int, system: str | None = None) -> list[int]:
    """Inference-time prompt ids, truncated like training prompts."""
    return render_prompt(tokenizer, truncate_prompt(tokenizer, prompt, [system], max_prompt_length), system)

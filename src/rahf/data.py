"""Load preference pairs (prompt, chosen reply, rejected reply) from common dataset layouts.

Every supported layout is normalised to `PreferencePair`, so the rest of rahf sees one shape:
a chat prompt ending in a user turn and two plain-text assistant replies. Any problem with a
file or record raises `DataError` naming the file, the line (or row) and the field at fault.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rahf.errors import DataError
from rahf.hubfiles import is_hub_file, local_file

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}

FORMATS = ("trl-standard", "trl-conversational", "hh", "ultrafeedback")

_ROLES = ("system", "user", "assistant")

_HINTS = {
    "trl-standard": '{"prompt": str, "chosen": str, "rejected": str}',
    "trl-conversational": (
        '{"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}'
        ' or, without "prompt", two full conversations sharing a prefix'
    ),
    "hh": '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}',
    "ultrafeedback": '{"prompt": str, "chosen": [user message, assistant message], "rejected": [same shape]}',
    "prompt-only": '{"prompt": str} or {"prompt": [messages ending with a user message]}',  # prompts files
    "prompt/completion": '{"prompt": str, "completion": str}',  # SFT files
}

_HH_ASSISTANT = "\n\nAssistant:"
_HH_TAG = re.compile(r"\n\n(Human|Assistant):")
_TURN_TAG = re.compile(r"(?:^|\n\n)(?:Human|Assistant):")  # in a (stripped) reply: a turn the reply writes itself
# Strings, brackets and numbers of valid JSON: enough to find where Python's json gave up (see _limit_line).
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')

_MAX_SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the conversation so far and the preferred and dispreferred replies."""

    prompt: tuple[Message, ...]  # non-empty; its last message has role "user"
    chosen: str  # preferred assistant reply, stripped
    rejected: str  # dispreferred assistant reply, stripped
    source: str  # "file:line" (JSON Lines) or "file:row N" (other files), for messages


@dataclass
class DataReport:
    """What `check_data` found in a file: counts, averages and warnings worth a look. Its records are preference
    pairs, SFT examples (format prompt/completion: the completion counts as the chosen reply, no rejected one) or
    prompts (format prompt-only: no reply)."""

    path: str
    format: str
    n_pairs: int  # records: pairs, SFT examples or prompts
    problems: list[str]  # one "source: what" line per suspicious record
    n_identical: int  # chosen == rejected: no preference signal
    mean_prompt_chars: float  # over all prompt message contents
    mean_chosen_chars: float | None  # None for prompts
    mean_rejected_chars: float | None  # None for SFT examples and prompts
    n_empty: int  # records with an empty reply
    n_turn_tags: int  # records with a reply that writes a dialogue turn of its own ("Human: ...")
    n_multi_turn: int  # prompts with more than one user message
    n_with_system: int  # prompts with a system message


# ---------------------------------------------------------------- format detection


def detect_format(record: dict) -> str | None:
    """Name the format in FORMATS that `record` looks like, from the types of its fields; None if none."""
    if not isinstance(record, dict):
        return None
    chosen, rejected = record.get("chosen"), record.get("rejected")
    prompt = record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, str):
            return "trl-standard"
        if "prompt" not in record:
            return "hh"
        return None
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, str):
            return "ultrafeedback"
        if isinstance(prompt, list) or "prompt" not in record:
            return "trl-conversational"
    return None


def _meant_format(record: dict) -> str | None:
    """The format a record that `detect_format` rejects has the field names of, judged by its other fields."""
    if "chosen" not in record or "rejected" not in record:
        return None
    prompt, replies = record.get("prompt"), (record["chosen"], record["rejected"])
    if isinstance(prompt, list) or any(isinstance(r, list) for r in replies):
        return "ultrafeedback" if isinstance(prompt, str) else "trl-conversational"
    return "trl-standard" if "prompt" in record else "hh"


# ---------------------------------------------------------------- field checks


def _type_name(value: object) -> str:
    """JSON-ish name of a value's type, for error messages."""
    return "null" if value is None else type(value).__name__


def _error(src: str, fmt: str, what: str) -> DataError:
    return DataError(f"{src}: {what} (expected {fmt} format: {_HINTS[fmt]})")


def _no_surrogate(text: str, what: str, src: str, fmt: str) -> str:
    """`text`, refused if it holds a lone UTF-16 surrogate (a broken JSON escape), which no tokenizer can encode."""
    try:
        text.encode("utf-8")  # fails exactly on surrogates, and much faster than searching for them
    except UnicodeEncodeError as e:
        raise _error(
            src,
            fmt,
            f"{what} holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start + 1}; "
            "fix or drop that \\u escape (half of a UTF-16 pair) or re-encode the file",
        ) from None
    return text


def _field(record: dict, key: str, kind: type, src: str, fmt: str) -> Any:
    """record[key], which must exist and be of type `kind` (a string without lone surrogates)."""
    if key not in record:
        raise _error(src, fmt, f"field {key!r} is missing")
    value = record[key]
    if not isinstance(value, kind):
        noun = {str: "a string", list: "a list of messages"}[kind]
        raise _error(src, fmt, f"field {key!r} must be {noun}, got {_type_name(value)}")
    return _no_surrogate(value, f"field {key!r}", src, fmt) if kind is str else value


def _messages(record: dict, key: str, src: str, fmt: str) -> list[Message]:
    """record[key] as a non-empty list of {"role", "content"} messages (other keys dropped)."""
    raw = _field(record, key, list, src, fmt)
    if not raw:
        raise _error(src, fmt, f"field {key!r} must not be empty")
    out = []
    for i, m in enumerate(raw):
        where = f"field {key!r} message {i}"
        if not isinstance(m, dict):
            raise _error(src, fmt, f"{where} must be an object, got {_type_name(m)}")
        if m.get("role") not in _ROLES:
            raise _error(src, fmt, f"{where} has role {m.get('role')!r}; expected one of {_ROLES}")
        if not isinstance(m.get("content"), str):
            raise _error(src, fmt, f"{where} content must be a string, got {_type_name(m.get('content'))}")
        _no_surrogate(m["content"], f"{where} content", src, fmt)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_prompt(prompt: list[Message], key: str, src: str, fmt: str) -> tuple[Message, ...]:
    if not prompt:
        raise _error(src, fmt, f"field {key!r} yields an empty prompt")
    if prompt[-1]["role"] != "user":
        raise _error(src, fmt, f"field {key!r}: the prompt must end with a user message, got {prompt[-1]['role']!r}")
    return tuple(prompt)


def _assistant_text(messages: list[Message], key: str, src: str, fmt: str) -> str:
    """Contents of assistant-only reply messages, joined by blank lines and stripped."""
    for i, m in enumerate(messages):
        if m["role"] != "assistant" and i and messages[0]["role"] == "assistant":  # more turns after the reply
            raise _error(
                src, fmt,
                f"field {key!r}: a {m['role']!r} message follows the reply where the conversations part; a pair "
                "trains one reply, so end both conversations with the assistant message in which they differ",
            )  # fmt: skip
        if m["role"] != "assistant":
            raise _error(src, fmt, f"field {key!r} must hold only assistant messages, got role {m['role']!r}")
    return "\n\n".join(m["content"] for m in messages).strip()


def parse_prompt(record: object, src: str) -> list[Message]:
    """The prompt of a prompts-file record {"prompt": str or messages}, checked as preference-data prompts are."""
    fmt = "prompt-only"
    if not isinstance(record, dict):
        raise DataError(f"{src}: a record must be a JSON object, got {_type_name(record)}")
    prompt = record.get("prompt")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise _error(src, fmt, "field 'prompt' must be a non-empty string or message list")
    if isinstance(prompt, str):
        return list(_standard_prompt(_no_surrogate(prompt, "field 'prompt'", src, fmt), src, fmt))
    return list(_check_prompt(_messages(record, "prompt", src, fmt), "prompt", src, fmt))


# ---------------------------------------------------------------- per-format parsers


def parse_completion(record: object, src: str) -> tuple[list[Message], str]:
    """(prompt messages, reply) of an SFT record {"prompt": str, "completion": str}, checked as preference pairs are
    (the reply stripped, as `load_pairs` strips replies, so SFT trains on the tokens later stages see)."""
    fmt = "prompt/completion"
    if not isinstance(record, dict):
        raise DataError(f"{src}: a record must be a JSON object, got {_type_name(record)}")
    prompt = _field(record, "prompt", str, src, fmt)
    completion = _field(record, "completion", str, src, fmt)
    return list(_standard_prompt(prompt, src, fmt)), completion.strip()


def _parse_trl_standard(record: dict, src: str) -> PreferencePair:
    fmt = "trl-standard"
    prompt = _field(record, "prompt", str, src, fmt)
    chosen = _field(record, "chosen", str, src, fmt)
    rejected = _field(record, "rejected", str, src, fmt)
    return PreferencePair(_standard_prompt(prompt, src, fmt), chosen.strip(), rejected.strip(), src)


def _standard_prompt(prompt: str, src: str, fmt: str) -> tuple[Message, ...]:
    """A string prompt as messages: one user message, or the turns of an HH transcript that ends with its
    Assistant tag (the layout of HH-derived sets such as Dahoas/full-hh-rlhf), which as one message would be
    wrapped in a second Human/Assistant frame and could only lose its start, not its oldest turns."""
    body = prompt.strip()
    if body.startswith("Human:") and body.endswith("Assistant:"):
        turns = _hh_messages(body[: -len("Assistant:")].rstrip(), src)
        if turns and turns[-1]["role"] == "user":
            return _check_prompt(turns, "prompt", src, fmt)
    return ({"role": "user", "content": prompt},)


def _parse_trl_conversational(record: dict, src: str) -> PreferencePair:
    fmt = "trl-conversational"
    chosen = _messages(record, "chosen", src, fmt)
    rejected = _messages(record, "rejected", src, fmt)
    if "prompt" in record:
        prompt = _check_prompt(_messages(record, "prompt", src, fmt), "prompt", src, fmt)
    else:
        # Implicit prompt: the shared prefix of the two conversations, cut back to its last user turn.
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] != "user":
            n -= 1
        if n == 0:
            raise _error(src, fmt, "fields 'chosen' and 'rejected' share no prefix ending in a user message")
        prompt = tuple(chosen[:n])
        chosen, rejected = chosen[n:], rejected[n:]
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            if not reply:
                raise _error(src, fmt, f"field {key!r} has no assistant reply after the shared prompt")
    return PreferencePair(
        prompt, _assistant_text(chosen, "chosen", src, fmt), _assistant_text(rejected, "rejected", src, fmt), src
    )


def _parse_ultrafeedback(record: dict, src: str) -> PreferencePair:
    fmt = "ultrafeedback"
    _field(record, "prompt", str, src, fmt)
    chosen = _messages(record, "chosen", src, fmt)
    rejected = _messages(record, "rejected", src, fmt)
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise _error(src, fmt, f"field {key!r} must end with an assistant message, got {conv[-1]['role']!r}")
    if chosen[:-1] != rejected[:-1]:
        raise _error(src, fmt, "fields 'chosen' and 'rejected' differ before their final assistant message")
    prompt = _check_prompt(chosen[:-1], "chosen", src, fmt)
    return PreferencePair(prompt, chosen[-1]["content"].strip(), rejected[-1]["content"].strip(), src)


def _hh_messages(text: str, src: str) -> list[Message]:
    """Split an HH transcript prefix on its Human/Assistant tags into alternating user/assistant messages.

    The first turn may lack its leading blank line ("Human: ..."). Consecutive turns by the same speaker,
    which some transcripts hold, become one message with their contents joined by a blank line, so that
    chat templates requiring alternating roles accept the prompt.
    """
    body = text.lstrip()
    parts = _HH_TAG.split("\n\n" + body if body.startswith("Human:") else text)
    if parts[0].strip():
        raise _error(src, "hh", "field 'chosen' must start with a 'Human:' turn")
    out: list[Message] = []
    for tag, turn in zip(parts[1::2], parts[2::2], strict=True):
        role, content = ("user" if tag == "Human" else "assistant"), turn.strip()
        if out and out[-1]["role"] == role:
            out[-1]["content"] = "\n\n".join(c for c in (out[-1]["content"], content) if c)
        else:
            out.append({"role": role, "content": content})
    return out


def shared_length(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`, found by bisection over slice comparisons (which run
    at C speed: a character-by-character loop took half of `rahf data check`'s time on HH transcripts)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _parse_hh(record: dict, src: str) -> PreferencePair:
    fmt = "hh"
    chosen = _field(record, "chosen", str, src, fmt)
    rejected = _field(record, "rejected", str, src, fmt)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if _HH_ASSISTANT not in text:
            raise _error(src, fmt, f"field {key!r} has no '\\n\\nAssistant:' turn")
    # The prompt is the longest common prefix ending right after an Assistant tag. Usually that is
    # the last turn; when the transcripts part earlier, the later turns stay in the replies as text.
    cut = chosen.rfind(_HH_ASSISTANT, 0, shared_length(chosen, rejected))
    if cut < 0:
        raise _error(src, fmt, "fields 'chosen' and 'rejected' differ before their first '\\n\\nAssistant:' turn")
    # in a run of Assistant turns (one message, as `_hh_messages` merges them), the reply starts at the run's first
    # tag; its later tags stay in the reply as text, as the turns after a reply do
    while (before := chosen.rfind(_HH_ASSISTANT, 0, cut)) > chosen.rfind("\n\nHuman:", 0, cut):
        cut = before
    prompt = _check_prompt(_hh_messages(chosen[:cut], src), "chosen", src, fmt)
    end = cut + len(_HH_ASSISTANT)
    return PreferencePair(prompt, chosen[end:].strip(), rejected[end:].strip(), src)


_PARSERS: dict[str, Callable[[dict, str], PreferencePair]] = {
    "trl-standard": _parse_trl_standard,
    "trl-conversational": _parse_trl_conversational,
    "hh": _parse_hh,
    "ultrafeedback": _parse_ultrafeedback,
}


# ---------------------------------------------------------------- file reading


def _open_text(path: Path) -> IO[str]:
    """`path` (gzip-compressed if named *.gz, in any case) as UTF-8 text, a leading BOM dropped.

    Bytes that are not UTF-8 come through as surrogates (errors="surrogateescape") for `_check_utf8` to report
    by line: a decoding error raised while reading would name neither the line nor a position in it.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape")


def _check_utf8(text: str, shown: str, first_line: int = 1) -> None:
    """Refuse text from `_open_text` that holds a byte that is not UTF-8, naming its line and offset in it."""
    try:
        text.encode("utf-8")  # fails exactly on the surrogates that stand for undecodable bytes
    except UnicodeEncodeError as e:
        line = first_line + text.count("\n", 0, e.start)
        offset = len(text[text.rfind("\n", 0, e.start) + 1 : e.start].encode("utf-8", "surrogateescape"))
        raise DataError(
            f"{shown}:{line}: not UTF-8 (byte 0x{ord(text[e.start]) - 0xDC00:02x} at byte offset {offset} of the line); "
            "re-encode the file as UTF-8"
        ) from None


def _limit_error(where: str, e: ValueError | RecursionError) -> DataError:
    """DataError for valid JSON that Python's json still refuses: a huge integer or very deep nesting."""
    if isinstance(e, RecursionError):
        return DataError(f"{where}: arrays or objects nest too deeply for Python's json to read; flatten the record")
    return DataError(
        f"{where}: an integer has more than {sys.get_int_max_str_digits()} digits, more than Python's json reads; "
        "write it as a string"
    )


def _limit_line(text: str, e: ValueError | RecursionError) -> int:
    """Line of what made Python's json give up on `text`: the first too-long integer, or the deepest nesting."""
    depth = deepest = at = 0
    limit = sys.get_int_max_str_digits() if isinstance(e, ValueError) else None  # Python 3.10.7+
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest, at = depth, m.start()
        elif token in ("]", "}"):
            depth -= 1
        elif limit is not None and token.lstrip("-").isdigit() and len(token.lstrip("-")) > limit:
            return text.count("\n", 0, m.start()) + 1
    return text.count("\n", 0, at) + 1


def _at(text: str, pos: int) -> tuple[int, int]:
    """(line, column) of character `pos` of `text`, both counted from 1."""
    return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)


def _json_problem(text: str, e: json.JSONDecodeError, lines: bool) -> tuple[int, str]:
    """(line in `text`, why) for JSON that Python's json refuses, naming the cause where its message names only where
    the parser stopped: a value cut off (`lines`: a JSON Lines record spread over lines), a trailing comma, a raw
    control character in a string, a stray byte order mark."""
    ended = not text[e.pos :].strip()
    if lines and (ended or e.msg.startswith("Unterminated string")):
        return (
            e.lineno,
            "the line ends inside its record; JSON Lines holds each record on one line, or the file is cut short",
        )
    if e.msg.startswith("Unterminated string"):
        return e.lineno, f"a string starting at column {e.colno} is never closed; is the file cut short?"
    if ended:
        line = _at(text, len(text.rstrip()))[0]
        return line, "the file ends inside a list, object or string that is never closed; is the file cut short?"
    comma = e.pos if text[e.pos] == "," else len(text[: e.pos].rstrip()) - 1  # Python 3.13+ names the comma itself
    closing = text[comma + 1 :].lstrip()[:1]
    if (
        text[comma : comma + 1] == ","
        and closing in ("]", "}")
        and text[:comma].rstrip()[-1:] not in ("", "[", "{", ":", ",")
    ):
        line, col = _at(text, comma)
        return line, f"a trailing comma at column {col} before {closing!r}; remove it"
    if e.msg.startswith("Invalid control character"):
        escape = json.dumps(text[e.pos])[1:-1]
        return e.lineno, f"a raw control character inside a string at column {e.colno}; write it as {escape}"
    if e.msg.startswith("Unexpected UTF-8 BOM"):
        return e.lineno, "a stray byte order mark (U+FEFF) at column 1; remove it"
    return e.lineno, f"{e.msg} at column {e.colno}"


def read_jsonl(path: str | os.PathLike, shown: str | None = None) -> Iterator[tuple[str, object]]:
    """(`file:line`, record) for each non-blank line of a JSONL(.gz) file (or HF URI); bad JSON raises DataError there."""
    path, shown = Path(local_file(path)), shown or os.fspath(path)
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                _check_utf8(line, shown, lineno)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    why = _json_problem(line, e, lines=True)[1]
                    raise DataError(f"{shown}:{lineno}: not valid JSON ({why})") from None
                except (ValueError, RecursionError) as e:
                    raise _limit_error(f"{shown}:{lineno}", e) from None
                yield f"{shown}:{lineno}", record
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged gzip data (not an OSError)
        after = f" after line {lineno}" if lineno else ""
        raise DataError(f"{shown}: cannot read the file{after} ({e})") from None


def _wrapped_list(data: object) -> str | None:
    """The key of an object's 'data' or 'train' list of records (how JSON files often wrap them), or None."""
    if not isinstance(data, dict):
        return None
    return next((k for k in ("data", "train") if isinstance(data.get(k), list)), None)


def _read_json(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    """Records of a JSON file: a list, an object with a 'data' or 'train' list, or a single record.

    A file whose first non-blank line holds one whole record with more text after it is JSON Lines under a .json
    name (as `datasets.Dataset.to_json` writes it): it is read line by line, so a `limit` reads no further than it
    needs. A blank file holds no records.
    """
    try:
        with _open_text(path) as f:
            lineno, first = next(((i, line) for i, line in enumerate(f, 1) if line.strip()), (0, ""))
            more = any(line.strip() for line in f)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged gzip data (not an OSError)
        raise DataError(f"{shown}: cannot read the file ({e})") from None
    if not first:
        return
    _check_utf8(first, shown, lineno)
    try:
        data, whole = json.loads(first), True
    except (ValueError, RecursionError):  # the start of a longer value, or one the whole-file read below reports
        data, whole = None, False
    if whole and more and not isinstance(data, list) and _wrapped_list(data) is None:
        yield from read_jsonl(path, shown)
        return
    if more or not whole:
        data = _json_document(path, shown)
    if isinstance(data, dict):
        key = _wrapped_list(data)
        if key is not None:
            data = data[key]
        elif not data.keys().isdisjoint(("prompt", "chosen", "rejected")):  # one record: its reader checks its fields
            data = [data]
        elif (wrong := next((k for k in ("data", "train") if k in data), None)) is not None:
            raise DataError(f"{shown}: field {wrong!r} must be a list of records, got {_type_name(data[wrong])}")
        else:
            raise DataError(
                f"{shown}: expected a list of records, an object with a 'data' or 'train' list, or one record; "
                f"got an object with keys {sorted(data)}"
            )
    if not isinstance(data, list):
        raise DataError(f"{shown}: expected a list of records, got {_type_name(data)}")
    for i, record in enumerate(data):
        yield f"{shown}:row {i}", record


def _json_document(path: Path, shown: str) -> object:
    """The one JSON value a whole .json file holds; broken JSON raises DataError naming the line at fault."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged gzip data (not an OSError)
        raise DataError(f"{shown}: cannot read the file ({e})") from None
    _check_utf8(text, shown)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line, why = _json_problem(text, e, lines=False)
        raise DataError(f"{shown}:{line}: not valid JSON ({why})") from None
    except (ValueError, RecursionError) as e:
        raise _limit_error(f"{shown}:{_limit_line(text, e)}", e) from None


def _quiet_datasets(load: Callable[[], Any]) -> Any:
    """Run a `datasets` loader without its progress bars, restoring their previous state."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return load()
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_dataset(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    """Rows of a `save_to_disk` folder: a Dataset, or a DatasetDict's train split (or its only one), loaded on its own
    so that another split, even an empty one datasets cannot load back, does not stand in the way."""
    import datasets

    split = _chosen_split(path, shown)
    folder = path / split if split else path
    try:
        empty = json.loads((folder / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())["_data_files"] == []
    except (OSError, ValueError, KeyError, TypeError):
        empty = False  # no saved Dataset here: load_from_disk says what is wrong
    if empty:  # datasets cannot load a saved Dataset without rows back
        if split:
            raise DataError(f"{shown}: holds no records: its {split!r} split is empty")
        return
    try:
        ds = _quiet_datasets(lambda: datasets.load_from_disk(str(folder)))
    except Exception as e:  # noqa: BLE001 (datasets/pyarrow raise many types for unreadable input)
        raise DataError(f"{shown}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    for i, record in enumerate(ds.with_format(None)):  # rows as dicts whatever format it was saved with
        yield f"{shown}:row {i}", record


def _chosen_split(path: Path, shown: str) -> str | None:
    """The split rahf reads of a DatasetDict saved at `path`: 'train', or its only one; None if `path` holds none."""
    import datasets

    try:
        splits = json.loads((path / datasets.config.DATASETDICT_JSON_FILENAME).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a DatasetDict
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    if not splits:
        raise DataError(f"{shown}: holds no records: a DatasetDict without splits")
    raise DataError(
        f"{shown}: holds splits {splits} and none is 'train'; give the folder of the split to read, "
        f"such as {os.path.join(shown, splits[0])}"
    )


def _read_parquet(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    """Rows of a parquet file, read batch by batch with pyarrow: `datasets` would first convert the whole file into
    its cache, which it names by path and modification time only, so a file replaced in place could be read stale."""
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{shown}:row {row}", record
                row += 1
    except Exception as e:  # noqa: BLE001 (pyarrow raises many types for unreadable input)
        raise DataError(f"{shown}: not a readable parquet file ({type(e).__name__}: {e})") from None


def is_jsonl(path: str | os.PathLike) -> bool:
    """Whether the data loader reads `path` as JSON Lines: a file named *.jsonl or *.jsonl.gz, in any case."""
    p = Path(path)
    return (is_hub_file(path) or not p.is_dir()) and p.name.lower().endswith((".jsonl", ".jsonl.gz"))


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(source, record) for every record in the file (or the file an HF URI names), choosing the reader by suffix."""
    shown = os.fspath(path)
    p = Path(local_file(path))
    try:
        found = p.exists()
    except OSError as e:  # a name too long for the file system
        raise DataError(f"{shown}: cannot be read ({e.strerror})") from None
    if not found:
        raise DataError(f"data file not found: {shown}")
    name = p.name.lower()
    if p.is_dir():
        return _read_dataset(p, shown)
    if name.endswith(".parquet"):
        return _read_parquet(p, shown)
    if is_jsonl(p):
        return read_jsonl(p, shown)
    if name.endswith((".json", ".json.gz")):
        return _read_json(p, shown)
    raise DataError(
        f"{shown}: unsupported file type; expected .jsonl, .jsonl.gz, .json, .json.gz, .parquet "
        "or a directory written by datasets' save_to_disk"
    )


# ---------------------------------------------------------------- public entry points


def load_pairs(
    path: str | os.PathLike, format: str = "auto", limit: int | None = None
) -> tuple[list[PreferencePair], str]:
    """Read preference pairs from `path`; return them with the format name used.

    With format="auto" the first record decides the format, and every record must then match it.
    `limit` stops after that many pairs (None reads all). The last local file read is remembered while it is
    unchanged on disk (any write changes its change time): a run's preflight and each of its stages read the same
    file, which at a few hundred thousand pairs takes a minute each time.
    """
    key = _file_key(path, format, limit)
    if key is not None and key == _LAST_READ[0]:
        pairs, fmt = _LAST_READ[1]
        return list(pairs), fmt
    pairs, fmt = pairs_of(read_records(path), path, format, limit)
    if key is not None:
        _LAST_READ[:] = [key, (tuple(pairs), fmt)]
    return pairs, fmt


_LAST_READ: list[Any] = [None, None]  # [key, (pairs, format)] of the last local file `load_pairs` read


def _file_key(path: str | os.PathLike, format: str, limit: int | None) -> tuple | None:
    """What identifies a read of a local data file: its path as given (the pairs' sources name it), inode, size,
    modification and change times, and how it is read; None for what is not one plain local file (a dataset
    folder, an HF URI)."""
    if is_hub_file(path):
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, format, limit


def pairs_of(
    records: Iterable[tuple[str, object]],
    path: str | os.PathLike,
    format: str = "auto",
    limit: int | None = None,
    also: Sequence[str] = (),
) -> tuple[list[PreferencePair], str]:
    """`load_pairs` of the ("file:line", record) items `read_records(path)` gave. `also`: the other record formats
    the caller reads from such a file (`prompt-only`, `prompt/completion`), named beside the preference formats when
    no format fits a record."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of pairs or None, got {limit}")
    fmt = None if format == "auto" else format
    pairs: list[PreferencePair] = []
    for src, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{src}: a record must be a JSON object, got {_type_name(record)}")
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                meant = _meant_format(record)
                if meant is not None:
                    _PARSERS[meant](record, src)  # raises DataError naming the field of the wrong type
                raise DataError(
                    f"{src}: cannot tell the data format from fields {sorted(record)}; expected one of: "
                    + "; ".join(f"{name} {_HINTS[name]}" for name in (*also, *FORMATS))
                )
        try:
            pairs.append(_PARSERS[fmt](record, src))
        except DataError as e:
            looks_like = detect_format(record)
            if looks_like is None or looks_like == fmt:
                raise
            raise DataError(f"{e}; this record looks like {looks_like!r} format") from None
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs or fmt is None:
        raise DataError(f"{os.fspath(path)}: holds no records")
    return pairs, fmt


_RECORD_FORMATS = ("prompt/completion", "prompt-only")  # SFT data and prompts files, which `check_data` also reads


def check_data(path: str | os.PathLike, format: str = "auto") -> DataReport:
    """Load every pair in `path` and summarise it, listing pairs that carry no usable preference. SFT data (records
    with a "completion") and prompts files (a "prompt" and no replies) are read as `sft.path` and `generate.prompts`
    read them, and summarised likewise.

    Malformed records still raise DataError; suspicious but well-formed ones become `problems`.
    """
    if format not in ("auto", *FORMATS, *_RECORD_FORMATS):
        known = ", ".join((*FORMATS, *_RECORD_FORMATS))
        raise DataError(f"unknown data format {format!r}; expected 'auto' or one of {known}")
    if format == "auto":
        format = _record_file_format(path) or format
    if format in _RECORD_FORMATS:
        return _check_records(path, format)
    pairs, fmt = pairs_of(read_records(path), path, format, also=_RECORD_FORMATS if format == "auto" else ())
    problems: list[str] = []
    n_identical = n_empty = n_turn_tags = 0
    for pair in pairs:
        if pair.chosen == pair.rejected:
            n_identical += 1
            problems.append(f"{pair.source}: chosen and rejected replies are identical")
        empty = [name for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)) if not text]
        if empty:
            n_empty += 1
            problems.append(f"{pair.source}: empty {' and '.join(empty)} reply")
        if not pair.prompt[-1]["content"].strip():
            problems.append(f"{pair.source}: the last user message of the prompt is empty")
        tagged = [
            name for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)) if _TURN_TAG.search(text)
        ]
        if tagged:
            n_turn_tags += 1
            what = "chosen and rejected replies write" if len(tagged) == 2 else f"{tagged[0]} reply writes"
            problems.append(f"{pair.source}: {_turn_problem(what)}")
    n = len(pairs)
    return DataReport(
        path=os.fspath(path),
        format=fmt,
        n_pairs=n,
        problems=problems,
        n_identical=n_identical,
        mean_chosen_chars=sum(len(p.chosen) for p in pairs) / n,
        mean_rejected_chars=sum(len(p.rejected) for p in pairs) / n,
        n_empty=n_empty,
        n_turn_tags=n_turn_tags,
        **_prompt_stats([p.prompt for p in pairs]),
    )


def _turn_problem(what: str) -> str:
    return f"{what} a new dialogue turn ('Human:' or 'Assistant:'), which a model trained on it learns to write"


def _prompt_stats(prompts: list[Sequence[Message]]) -> dict[str, Any]:
    """DataReport's counts and mean length of the prompts."""
    return {
        "mean_prompt_chars": sum(sum(len(m["content"]) for m in prompt) for prompt in prompts) / len(prompts),
        "n_multi_turn": sum(1 for prompt in prompts if sum(m["role"] == "user" for m in prompt) > 1),
        "n_with_system": sum(1 for prompt in prompts if any(m["role"] == "system" for m in prompt)),
    }


def _record_file_format(path: str | os.PathLike) -> str | None:
    """ "prompt/completion" or "prompt-only" when the first record of `path` is one (as `sft.path` and
    `generate.prompts` decide); None for anything else."""
    first = next(read_records(path), (None, None))[1]
    if isinstance(first, dict) and "completion" in first:
        return "prompt/completion"
    if isinstance(first, dict) and "prompt" in first and not {"chosen", "rejected"} & set(first):
        return "prompt-only"
    return None


def _check_records(path: str | os.PathLike, fmt: str) -> DataReport:
    """`check_data` of an SFT file (prompt/completion) or a prompts file (prompt-only)."""
    examples = fmt == "prompt/completion"
    rows = [
        (*(parse_completion(rec, src) if examples else (parse_prompt(rec, src), None)), src)
        for src, rec in read_records(path)
    ]
    if not rows:
        raise DataError(f"{os.fspath(path)}: holds no records")
    problems = [f"{src}: empty completion" for _, reply, src in rows if reply == ""]
    problems += [
        f"{src}: {_turn_problem('completion writes')}" for _, reply, src in rows if reply and _TURN_TAG.search(reply)
    ]
    problems += [f"{src}: the last user message of the prompt is empty" for prompt, _, src in rows
                 if not prompt[-1]["content"].strip()]  # fmt: skip
    n = len(rows)
    return DataReport(
        path=os.fspath(path),
        format=fmt,
        n_pairs=n,
        problems=problems,
        n_identical=0,
        mean_chosen_chars=sum(len(reply) for _, reply, _ in rows) / n if examples else None,
        mean_rejected_chars=None,
        n_empty=sum(reply == "" for _, reply, _ in rows),
        n_turn_tags=sum(bool(reply and _TURN_TAG.search(reply)) for _, reply, _ in rows),
        **_prompt_stats([prompt for prompt, _, _ in rows]),
    )


def format_report(report: DataReport, shown: int | None = _MAX_SHOWN_PROBLEMS) -> str:
    """Human-readable summary of a DataReport, as printed by `rahf data check PATH`: the first `shown` problems
    (None: all of them)."""

    def share(k: int) -> str:
        return f"{k} ({100 * k / report.n_pairs:.1f}%)"

    lengths = f"prompt {report.mean_prompt_chars:.1f}"
    if report.format == "prompt/completion":
        kind = "examples"
        replies = [
            ("empty completion", share(report.n_empty)),
            ("completion writing a turn", share(report.n_turn_tags)),
        ]
        lengths += f", completion {report.mean_chosen_chars:.1f}"
    elif report.format == "prompt-only":
        kind, replies = "prompts", []
    else:
        kind = "pairs"
        replies = [
            ("identical chosen/rejected", share(report.n_identical)),
            ("empty chosen or rejected", share(report.n_empty)),
            ("reply writing a turn", share(report.n_turn_tags)),
        ]
        lengths += f", chosen {report.mean_chosen_chars:.1f}, rejected {report.mean_rejected_chars:.1f}"
    rows = [
        ("data", report.path),
        ("format", report.format),
        (kind, str(report.n_pairs)),
        ("multi-turn prompts", share(report.n_multi_turn)),
        ("prompts with a system message", share(report.n_with_system)),
        *replies,
        ("mean length (chars)", lengths),
    ]
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{label + ':':<{width}} {value}" for label, value in rows]
    if not report.problems:
        lines.append("problems: none")
    else:
        lines.append(f"problems: {len(report.problems)}")
        lines += [f"  {p}" for p in report.problems[:shown]]
        if shown is not None and len(report.problems) > shown:
            lines.append(f"  ... and {len(report.problems) - shown} more (--all lists every one, --json too)")
    return "\n".join(lines)

"""Convert `rahf generate` output into the input formats of common external benchmarks.

`rahf generate` writes JSONL records `{"index", "prompt", "response"}`. This module turns them into an
AlpacaEval `model_outputs.json`, FastChat MT-Bench answer lines, and builds the lm-evaluation-harness
command for a merged model, so a run can be scored by standard tools without glue scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from .data import Message, read_jsonl
from .errors import DataError

LM_EVAL_COMMAND = (
    "lm_eval --model hf --model_args pretrained={model_dir},dtype={dtype} --tasks {tasks} "
    "--batch_size {batch_size} --device {device}"
)
"""lm-evaluation-harness invocation for a merged model folder (optional extra: `pip install lm-eval`).

Fields: `model_dir`, `dtype` (float32 on CPU, bfloat16 on CUDA), `tasks` (comma-separated), `batch_size`, `device`.
"""

_ROLE_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant"}


def _write_atomic(path: str | Path, text: str) -> None:
    """Write `text` via a temp file in the same folder and `os.replace`, so readers never see a partial file.

    The temp file is opened as any new file is (mode from the umask), not by `mkstemp`, whose 0600 would keep the
    benchmark files from an evaluation run under another user."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{time.time_ns()}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_record(record: object) -> str | None:
    """The problem with one generations record, or None when it has the shape `write_generations` produces."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    for key in ("index", "prompt", "response"):
        if key not in record:
            return f"missing field {key!r}"
    if not isinstance(record["index"], int) or isinstance(record["index"], bool):
        return "field 'index' is not an integer"
    if not isinstance(record["response"], str):
        return "field 'response' is not a string"
    prompt = record["prompt"]
    if not isinstance(prompt, list) or not prompt:
        return "field 'prompt' is not a non-empty message list"
    for m in prompt:
        if not (isinstance(m, dict) and m.get("role") in _ROLE_LABELS and isinstance(m.get("content"), str)):
            return "field 'prompt' holds a message without a valid 'role' and string 'content'"
    return None


def read_generations(path: str | Path) -> list[dict]:
    """Records of a `rahf generate` JSONL file; a malformed line raises DataError (a ValueError) naming `file:line`."""
    out = []
    for source, record in read_jsonl(path):
        problem = _check_record(record)
        if problem:
            raise DataError(f"{source}: {problem}")
        out.append(record)
    return out


def _render_turns(prompt: Sequence[Message]) -> str:
    """A multi-turn prompt as one "Human: ...\\n\\nAssistant: ..." text (system messages as "System: ...")."""
    return "\n\n".join(f"{_ROLE_LABELS[m['role']]}: {m['content']}" for m in prompt)


def to_alpaca_eval(generations: Sequence[dict], generator: str, allow_multiturn: bool = False) -> list[dict]:
    """AlpacaEval `model_outputs.json` entries; the instruction is the prompt's final user message.

    AlpacaEval is single-turn, so a prompt with any earlier message (system or conversation turn) raises
    DataError naming its index, unless `allow_multiturn`, which renders the whole prompt as the instruction.
    """
    out = []
    for g in generations:
        prompt = g["prompt"]
        if prompt[-1]["role"] != "user":
            raise DataError(f"generation {g['index']}: prompt does not end with a user message")
        if len(prompt) > 1 and not allow_multiturn:
            raise DataError(
                f"generation {g['index']}: prompt has {len(prompt)} messages but AlpacaEval is single-turn; "
                "pass --allow-multiturn (allow_multiturn=True) to render the turns as the instruction"
            )
        instruction = _render_turns(prompt) if len(prompt) > 1 else prompt[-1]["content"]
        out.append({"instruction": instruction, "output": g["response"], "generator": generator, "dataset": "rahf"})
    return out


def write_alpaca_eval(
    path: str | Path, generations: Sequence[dict], generator: str, allow_multiturn: bool = False
) -> None:
    """Write `to_alpaca_eval` output atomically as a JSON list."""
    entries = to_alpaca_eval(generations, generator, allow_multiturn)
    _write_atomic(path, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


def _answer_id(model_id: str, question_id: int, response: str) -> str:
    """A deterministic 22-hex-digit id (FastChat uses 22-character shortuuids) so re-exports are stable."""
    return hashlib.sha256(json.dumps([model_id, question_id, response]).encode()).hexdigest()[:22]


def to_mt_bench(
    generations: Sequence[dict],
    model_id: str,
    question_ids: Sequence[int] | None = None,
    now: float | None = None,
) -> list[dict]:
    """FastChat MT-Bench answer records, one single-turn choice per generation.

    `question_ids` default to each generation's `index`; MT-Bench questions are numbered 81..160, so pass the ids
    of the questions that were prompted. `now` fixes `tstamp` (default: the current time).
    """
    ids = [g["index"] for g in generations] if question_ids is None else list(question_ids)
    if len(ids) != len(generations):
        raise DataError(f"{len(ids)} question ids for {len(generations)} generations")
    tstamp = time.time() if now is None else now
    return [
        {
            "question_id": qid,
            "answer_id": _answer_id(model_id, qid, g["response"]),
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [g["response"]]}],
            "tstamp": tstamp,
        }
        for qid, g in zip(ids, generations)
    ]


def write_mt_bench(
    path: str | Path,
    generations: Sequence[dict],
    model_id: str,
    question_ids: Sequence[int] | None = None,
    now: float | None = None,
) -> None:
    """Write `to_mt_bench` output atomically as JSONL (FastChat's `model_answer/<model_id>.jsonl`)."""
    records = to_mt_bench(generations, model_id, question_ids, now)
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def lm_eval_command(
    model_dir: str,
    tasks: Sequence[str] = ("truthfulqa_mc2", "arc_challenge"),
    batch_size: int = 8,
    device: str = "cpu",
) -> list[str]:
    """The argv of `LM_EVAL_COMMAND` for a merged model folder; bfloat16 on CUDA devices, float32 otherwise."""
    fields = {
        "model_dir": model_dir,
        "dtype": "bfloat16" if device.startswith("cuda") else "float32",
        "tasks": tasks if isinstance(tasks, str) else ",".join(tasks),
        "batch_size": str(batch_size),
        "device": device,
    }
    return shlex.split(LM_EVAL_COMMAND.format(**{k: shlex.quote(v) for k, v in fields.items()}))

"""Convert `rahf generate` output into the input formats of common external benchmarks.

`rahf generate` writes JSONL records `{"index", "prompt", "response", "finish_reason"}` (`rahf evaluate` and `rahf compare` add
`sample`, the reply's number among those to one prompt). This module turns them into an
AlpacaEval `model_outputs.json`, FastChat MT-Bench answer lines, and builds the lm-evaluation-harness
command for a merged model, so a run can be scored by standard tools without glue scripts.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .artifacts import write_text_atomic
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


def _check_record(record: object) -> str | None:
    """The problem with one generations record, or None when it has the shape `write_generations` produces."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    for key in ("index", "prompt", "response"):
        if key not in record:
            return f"missing field {key!r}"
    if not isinstance(record["index"], int) or isinstance(record["index"], bool):
        return "field 'index' is not an integer"
    if "sample" in record and (not isinstance(record["sample"], int) or isinstance(record["sample"], bool)):
        return "field 'sample' is not an integer"
    if not isinstance(record["response"], str):
        return "field 'response' is not a string"
    prompt = record["prompt"]
    if not isinstance(prompt, list) or not prompt:
        return "field 'prompt' is not a non-empty message list"
    for m in prompt:
        if not (isinstance(m, dict) and m.get("role") in _ROLE_LABELS and isinstance(m.get("content"), str)):
            return "field 'prompt' holds a message without a valid 'role' and string 'content'"
    return None


def read_generations(path: str | Path, sample: int | None = None) -> list[dict]:
    """Records of a generations JSONL file; a malformed line raises DataError (a ValueError) naming `file:line`.

    `rahf evaluate` and `rahf compare` write `evaluate.samples` replies per prompt, numbered by `sample`; such a
    file needs `sample` to say which reply of each prompt to keep, and a number it does not hold is refused. A file
    whose replies are not numbered (`rahf generate`'s, one per prompt) is read whole, whatever `sample` says, so one
    `--sample` serves files of both kinds.
    """
    if sample is not None and sample < 0:
        raise DataError(f"--sample: {sample} is no reply number; replies are numbered from 0")
    out = []
    for source, record in read_jsonl(path):
        problem = _check_record(record)
        if problem:
            raise DataError(f"{source}: {problem}")
        out.append(record)
    if not out:
        raise DataError(f"{path}: holds no generations; export a file that `rahf generate` or `rahf evaluate` wrote")
    per_prompt = max(Counter(r["index"] for r in out).values(), default=1)
    if per_prompt > 1 and sample is None:
        raise DataError(
            f"{path}: {per_prompt} replies per prompt (evaluate.samples); choose which to export with --sample K "
            f"(0..{per_prompt - 1})"
        )
    if sample is not None and any("sample" in r for r in out):
        held = sorted({r.get("sample", 0) for r in out})
        out = [r for r in out if r.get("sample", 0) == sample]
        if not out:
            raise DataError(f"{path}: no reply numbered sample {sample}; it holds {', '.join(map(str, held))}")
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
    write_text_atomic(path, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


def _answer_id(model_id: str, question_id: int, turns: list[str]) -> str:
    """A deterministic 22-hex-digit id (FastChat uses 22-character shortuuids) so re-exports are stable."""
    return hashlib.sha256(json.dumps([model_id, question_id, turns]).encode()).hexdigest()[:22]


def _dialogue(prompt: Sequence[Message]) -> list[str]:
    """The texts of a prompt's conversation turns, user and assistant alternating (system messages left out)."""
    return [m["content"] for m in prompt if m["role"] != "system"]


def _conversations(generations: Sequence[dict]) -> list[list[dict]]:
    """Generations grouped into conversations, each in turn order: a turn-k reply (a prompt holding k user
    messages) joins the conversation whose turn k-1 had the same prompt and gave the reply its prompt quotes.

    A later turn is generated from a prompt that holds the earlier turns and the model's replies to them, so this
    is how FastChat's answer file, one record per question with every turn's reply, is rebuilt. Raises DataError
    for a prompt that does not alternate user and assistant messages, or a later turn whose earlier turns were
    not exported.
    """
    waiting: dict[tuple[str, ...], list[list[dict]]] = {}  # by their turns so far: conversations to continue
    conversations: list[list[dict]] = []
    for g in generations:
        roles = [m["role"] for m in g["prompt"] if m["role"] != "system"]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise DataError(
                f"generation {g['index']}: MT-Bench needs a prompt of user and assistant turns in turn, ending "
                "with a user message"
            )
        turns = _dialogue(g["prompt"])
        if len(turns) == 1:
            conversation: list[dict] = []
            conversations.append(conversation)
        else:
            candidates = waiting.get(tuple(turns[:-1]), [])
            if not candidates:
                raise DataError(
                    f"generation {g['index']}: its prompt continues a conversation (turn {len(turns) // 2 + 1}) "
                    "whose earlier turns, with the replies it quotes, are not among the generations: export the "
                    "earlier turns' generations too, before this one (an MT-Bench question starts with one user "
                    "message; a dialogue prompt such as HH's is not one)"
                )
            conversation = candidates.pop(0)
        conversation.append(g)
        waiting.setdefault((*turns, g["response"]), []).append(conversation)
    return conversations


def to_mt_bench(
    generations: Sequence[dict], model_id: str, question_id_offset: int = 0, now: float | None = None
) -> list[dict]:
    """FastChat MT-Bench answer records, one per conversation with every turn's reply in order.

    MT-Bench asks every question in two turns, and its judge reads both replies: generate the first turns, then
    the second from prompts that hold the first question, the model's reply and the second question
    (`next_turn_prompts`), and export the two files together. A conversation's `question_id` is its first
    turn's generation `index` plus `question_id_offset` (MT-Bench numbers its questions from 81). `now` fixes
    `tstamp` (default: the current time).
    """
    tstamp = time.time() if now is None else now
    out = []
    for conversation in _conversations(generations):
        qid = conversation[0]["index"] + question_id_offset
        turns = [g["response"] for g in conversation]
        out.append(
            {
                "question_id": qid,
                "answer_id": _answer_id(model_id, qid, turns),
                "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": tstamp,
            }
        )
    if len({r["question_id"] for r in out}) != len(out):
        raise DataError(
            "two conversations get the same question_id: give the first turns' generations in one file (their "
            "index numbers the questions)"
        )
    return out


def next_turn_prompts(generations: Sequence[dict], questions: Sequence[str]) -> list[dict]:
    """`rahf generate` prompt records for the next turn: each generation's prompt, its reply as the assistant's
    message, then `questions[i]` (one per generation, in order) as the user's next message."""
    if len(questions) != len(generations):
        raise DataError(f"{len(questions)} next-turn questions for {len(generations)} generations")
    return [
        {"prompt": [*g["prompt"], {"role": "assistant", "content": g["response"]}, {"role": "user", "content": q}]}
        for g, q in zip(generations, questions)
    ]


def write_mt_bench(
    path: str | Path,
    generations: Sequence[dict],
    model_id: str,
    question_id_offset: int = 0,
    now: float | None = None,
) -> list[dict]:
    """Write `to_mt_bench` output atomically as JSONL (FastChat's `model_answer/<model_id>.jsonl`); returns it."""
    records = to_mt_bench(generations, model_id, question_id_offset, now)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def lm_eval_command(
    model_dir: str,
    tasks: Sequence[str] = ("truthfulqa_mc2", "arc_challenge"),
    batch_size: int = 8,
    device: str = "cpu",
) -> list[str]:
    """The argv of `LM_EVAL_COMMAND` for a merged model folder; bfloat16 on CUDA devices, float32 otherwise.

    lm-evaluation-harness splits `--model_args` at commas and quotes nothing, so a folder whose path holds a comma
    raises DataError (link it under another name)."""
    if "," in model_dir:
        raise DataError(
            f"{model_dir}: lm-evaluation-harness splits --model_args at commas and cannot read this path; link the "
            "folder under a name without one (ln -s)"
        )
    fields = {
        "model_dir": model_dir,
        "dtype": "bfloat16" if device.startswith("cuda") else "float32",
        "tasks": tasks if isinstance(tasks, str) else ",".join(tasks),
        "batch_size": str(batch_size),
        "device": device,
    }
    return shlex.split(LM_EVAL_COMMAND.format(**{k: shlex.quote(v) for k, v in fields.items()}))

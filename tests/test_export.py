"""Export of `rahf generate` output to AlpacaEval, MT-Bench and lm-evaluation-harness inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rahf import artifacts
from rahf.export import (
    lm_eval_command,
    next_turn_prompts,
    read_generations,
    to_alpaca_eval,
    to_mt_bench,
    write_alpaca_eval,
    write_mt_bench,
)
from rahf.generate import Reply, write_generations

PROMPTS = [
    [{"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "What is 2+2?"}],
]
RESPONSES = ["Red.", "4"]
MULTITURN = {
    "index": 0,
    "prompt": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "response": "No.",
}


@pytest.fixture
def generations_file(tmp_path: Path) -> Path:
    path = tmp_path / "generations.jsonl"
    write_generations(path, PROMPTS, [Reply(text, "stop") for text in RESPONSES])
    return path


def test_read_generations_round_trip(generations_file: Path):
    assert read_generations(generations_file) == [
        {"index": 0, "prompt": PROMPTS[0], "response": "Red.", "finish_reason": "stop"},
        {"index": 1, "prompt": PROMPTS[1], "response": "4", "finish_reason": "stop"},
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"index": 1, "prompt": [{"role": "user", "content": "x"}]}', "missing field 'response'"),
        ('{"index": 1, "prompt": [], "response": "x"}', "field 'prompt'"),
        ('{"index": 1, "prompt": [{"role": "bot", "content": "x"}], "response": "x"}', "field 'prompt'"),
    ],
)
def test_read_generations_bad_line_names_file_and_line(generations_file: Path, line: str, problem: str):
    with generations_file.open("a") as f:
        f.write("\n" + line + "\n")  # a blank line (skipped) then the bad one: line 4
    with pytest.raises(ValueError, match=rf"generations\.jsonl:4: .*{problem}"):
        read_generations(generations_file)


def test_alpaca_eval_exact_json(generations_file: Path, tmp_path: Path):
    out = tmp_path / "model_outputs.json"
    write_alpaca_eval(out, read_generations(generations_file), "rahf-dpo")
    assert json.loads(out.read_text()) == [
        {"instruction": "Name a primary colour.", "output": "Red.", "generator": "rahf-dpo", "dataset": "rahf"},
        {"instruction": "What is 2+2?", "output": "4", "generator": "rahf-dpo", "dataset": "rahf"},
    ]


def test_alpaca_eval_multiturn_rejected_unless_allowed():
    with pytest.raises(ValueError, match="generation 7: .*single-turn"):
        to_alpaca_eval([{**MULTITURN, "index": 7}], "g")
    with pytest.raises(ValueError, match="generation 0: .*single-turn"):
        to_alpaca_eval([{**MULTITURN, "prompt": [{"role": "system", "content": "Be terse."}, *PROMPTS[0]]}], "g")
    [entry] = to_alpaca_eval([MULTITURN], "g", allow_multiturn=True)
    assert entry["instruction"] == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    assert entry["output"] == "No."


def test_alpaca_eval_prompt_must_end_with_user():
    with pytest.raises(ValueError, match="generation 0: .*user message"):
        to_alpaca_eval([{**MULTITURN, "prompt": MULTITURN["prompt"][:2]}], "g", allow_multiturn=True)


def test_mt_bench_exact_lines(generations_file: Path, tmp_path: Path):
    gens = read_generations(generations_file)
    out = tmp_path / "answers.jsonl"
    write_mt_bench(out, gens, "rahf-dpo", question_id_offset=81, now=1700000000.5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [line["answer_id"] for line in lines]
    assert lines == [
        {
            "question_id": 81,
            "answer_id": ids[0],
            "model_id": "rahf-dpo",
            "choices": [{"index": 0, "turns": ["Red."]}],
            "tstamp": 1700000000.5,
        },
        {
            "question_id": 82,
            "answer_id": ids[1],
            "model_id": "rahf-dpo",
            "choices": [{"index": 0, "turns": ["4"]}],
            "tstamp": 1700000000.5,
        },
    ]
    assert all(len(i) == 22 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]


def test_mt_bench_answer_id_deterministic(generations_file: Path):
    gens = read_generations(generations_file)
    first = to_mt_bench(gens, "m", now=1.0)
    assert [r["question_id"] for r in first] == [0, 1]  # default: the generation index
    assert [r["answer_id"] for r in to_mt_bench(gens, "m", now=2.0)] == [r["answer_id"] for r in first]
    changed = to_mt_bench([{**gens[0], "response": "Blue."}], "m", now=1.0)
    assert changed[0]["answer_id"] != first[0]["answer_id"]
    assert to_mt_bench(gens[:1], "other", now=1.0)[0]["answer_id"] != first[0]["answer_id"]


def test_mt_bench_joins_each_questions_turns_into_one_record(generations_file: Path, tmp_path: Path):
    """FastChat's judge reads turns[1] of every MT-Bench answer: the second turn's reply, generated from a prompt
    quoting the first turn and its reply, goes into the same record as that first turn."""
    first = read_generations(generations_file)
    follow = tmp_path / "turn2.jsonl"
    follow.write_text("".join(json.dumps(r) + "\n" for r in next_turn_prompts(first, ["Another?", "And 3+3?"])))
    assert json.loads(follow.read_text().splitlines()[1])["prompt"] == [
        *PROMPTS[1], {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}
    ]  # fmt: skip
    second = [
        {"index": i, "prompt": r["prompt"], "response": reply}
        for i, (r, reply) in enumerate(zip(map(json.loads, follow.read_text().splitlines()), ["Blue.", "6"]))
    ]
    records = to_mt_bench(first + second[::-1], "m", question_id_offset=81, now=1.0)  # any order after turn 1
    assert [(r["question_id"], r["choices"][0]["turns"]) for r in records] == [
        (81, ["Red.", "Blue."]),
        (82, ["4", "6"]),
    ]
    assert records[0]["answer_id"] != to_mt_bench(first, "m", 81, now=1.0)[0]["answer_id"]
    with pytest.raises(ValueError, match="generation 1: its prompt continues a conversation \\(turn 2\\)"):
        to_mt_bench(first[:1] + second, "m")  # question 82's first turn missing
    stale = {**second[0], "prompt": [*PROMPTS[0], {"role": "assistant", "content": "Green."}, *PROMPTS[1]]}
    with pytest.raises(ValueError, match="generation 0: .*earlier turns"):
        to_mt_bench([*first, stale], "m")  # quotes a first reply the model did not give
    with pytest.raises(ValueError, match="same question_id"):
        to_mt_bench(first + first, "m")  # two first-turn files, both numbered from 0
    with pytest.raises(ValueError, match="generation 0: .*user and assistant turns"):
        to_mt_bench([{**first[0], "prompt": [*PROMPTS[0], *PROMPTS[1]]}], "m")
    with pytest.raises(ValueError, match="1 next-turn questions for 2 generations"):
        next_turn_prompts(first, ["x"])


def test_files_with_several_replies_per_prompt_need_a_sample(tmp_path: Path):
    """`rahf evaluate` writes evaluate.samples replies per prompt: one is chosen for export, never all of them."""
    path = tmp_path / "gold.jsonl"
    rows = [{"index": i // 2, "sample": i % 2, "prompt": PROMPTS[i // 2], "response": f"r{i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="2 replies per prompt .*--sample K \\(0..1\\)"):
        read_generations(path)
    assert [g["response"] for g in read_generations(path, sample=1)] == ["r1", "r3"]
    with pytest.raises(ValueError, match="no reply numbered sample 2; it holds 0, 1$"):
        read_generations(path, sample=2)
    with pytest.raises(ValueError, match="^--sample: -1 is no reply number"):
        read_generations(path, sample=-1)
    single = tmp_path / "turn2.jsonl"  # one unnumbered reply per prompt (rahf generate): read whole, as the next turn
    single.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sample"}) + "\n" for r in rows[::2]))
    assert [g["response"] for g in read_generations(single, sample=1)] == ["r0", "r2"]
    one = tmp_path / "one.jsonl"  # `rahf evaluate` with evaluate.samples 1: its replies are numbered 0
    one.write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    assert [g["response"] for g in read_generations(one)] == [g["response"] for g in read_generations(one, 0)]
    with pytest.raises(ValueError, match="no reply numbered sample 1; it holds 0$"):
        read_generations(one, sample=1)


def test_atomic_write_leaves_no_temp_files(generations_file: Path, tmp_path: Path, monkeypatch):
    gens = read_generations(generations_file)
    out = tmp_path / "out"
    out.mkdir()
    write_alpaca_eval(out / "model_outputs.json", gens, "g")
    write_mt_bench(out / "answers.jsonl", gens, "m", now=1.0)
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "model_outputs.json"]

    before = (out / "answers.jsonl").read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_mt_bench(out / "answers.jsonl", gens, "changed", now=2.0)
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "model_outputs.json"]
    assert (out / "answers.jsonl").read_text() == before


def test_exported_files_get_the_mode_of_any_new_file(generations_file: Path, tmp_path: Path):
    """Readable by an evaluation run under another user, as the umask allows (a temp file would be 0600)."""
    gens = read_generations(generations_file)
    old = os.umask(0o022)
    try:
        write_alpaca_eval(tmp_path / "model_outputs.json", gens, "g")
        write_mt_bench(tmp_path / "answers.jsonl", gens, "m", now=1.0)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    files = ("model_outputs.json", "answers.jsonl", "plain.txt")
    assert [(tmp_path / name).stat().st_mode & 0o777 for name in files] == [0o644] * 3


def test_lm_eval_command_cpu_and_cuda():
    assert lm_eval_command("runs/merged") == [
        "lm_eval", "--model", "hf", "--model_args", "pretrained=runs/merged,dtype=float32",
        "--tasks", "truthfulqa_mc2,arc_challenge", "--batch_size", "8", "--device", "cpu",
    ]  # fmt: skip
    assert lm_eval_command("/m d", tasks=["hellaswag"], batch_size=4, device="cuda:0") == [
        "lm_eval", "--model", "hf", "--model_args", "pretrained=/m d,dtype=bfloat16",
        "--tasks", "hellaswag", "--batch_size", "4", "--device", "cuda:0",
    ]  # fmt: skip


def test_lm_eval_refuses_a_path_with_a_comma():
    """lm_eval splits --model_args at commas: `pretrained=runs/layers=8,10/merged` would not parse."""
    with pytest.raises(ValueError, match="splits --model_args at commas"):
        lm_eval_command("runs/layers=8,10/merged")


def test_export_command_writes_files_and_prints_the_lm_eval_call(generations_file, tmp_path, tiny_model_dir, capsys):
    from rahf.cli import main

    out = tmp_path / "model_outputs.json"
    assert main(["export", str(generations_file), "--format", "alpaca-eval", "--out", str(out), "--name", "m"]) == 0
    assert [r["generator"] for r in json.loads(out.read_text())] == ["m"] * len(RESPONSES)
    answers = tmp_path / "m.jsonl"
    assert main(["export", str(generations_file), "--format", "mt-bench", "--out", str(answers), "--name", "m"]) == 0
    assert len(answers.read_text().splitlines()) == len(RESPONSES)
    capsys.readouterr()
    assert main(["export", str(tiny_model_dir), "--format", "lm-eval"]) == 0
    assert capsys.readouterr().out.split() == lm_eval_command(str(tiny_model_dir))
    assert main(["export", str(generations_file), "--format", "alpaca-eval"]) == 2
    assert "--out: required" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "lm-eval"]) == 2


def test_export_command_multiturn_question_ids_and_missing_folder(tmp_path, capsys):
    from rahf.cli import main

    gens = tmp_path / "gen.jsonl"
    gens.write_text(json.dumps(MULTITURN) + "\n")
    out = tmp_path / "model_outputs.json"
    assert main(["export", str(gens), "--format", "alpaca-eval", "--out", str(out)]) == 2
    assert "--allow-multiturn" in capsys.readouterr().err
    assert main(["export", str(gens), "--format", "alpaca-eval", "--out", str(out), "--allow-multiturn"]) == 0
    assert json.loads(out.read_text())[0]["instruction"].startswith("Human: Hi\n\nAssistant: Hello!")
    answers = tmp_path / "m.jsonl"
    assert main(["export", str(gens), "--format", "mt-bench", "--out", str(answers)]) == 2
    assert "its prompt continues a conversation (turn 2)" in capsys.readouterr().err  # turn 1 not given
    first = tmp_path / "turn1.jsonl"
    first.write_text(json.dumps({"index": 0, "prompt": MULTITURN["prompt"][:1], "response": "Hello!"}) + "\n")
    argv = ["export", str(first), str(gens), "--format", "mt-bench", "--out", str(answers)]
    assert main([*argv, "--question-id-offset", "81"]) == 0
    assert json.loads(answers.read_text())["question_id"] == 81
    assert json.loads(answers.read_text())["choices"] == [{"index": 0, "turns": ["Hello!", "No."]}]
    assert "1 with 2 turn(s)" in capsys.readouterr().out
    assert main(["export", str(first), "--format", "mt-bench", "--out", str(answers)]) == 0
    assert "second turn" in capsys.readouterr().err  # one turn only: FastChat's turn-2 judgment would fail
    assert main(["export", str(first), str(gens), "--format", "alpaca-eval", "--out", str(out)]) == 2
    assert "several source files" in capsys.readouterr().err
    assert main(["export", str(gens), "--format", "mt-bench", "--out", str(tmp_path / "no" / "m.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_refuses_a_folder_as_out_and_an_empty_generations_file(generations_file, tmp_path, capsys):
    from rahf.cli import main

    for out in (str(tmp_path), f"{tmp_path / 'new'}/"):
        assert main(["export", str(generations_file), "--format", "alpaca-eval", "--out", out]) == 2
        assert f"--out: {out} is a folder; give the file to write" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "model_outputs.json"
    assert main(["export", str(empty), "--format", "alpaca-eval", "--out", str(out)]) == 2
    assert f"{empty}: holds no generations" in capsys.readouterr().err
    assert not out.exists()

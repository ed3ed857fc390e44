"""Tests for rahf.data: every file kind and format, HH prompt splitting, errors, and the data report."""

from __future__ import annotations

import gzip
import json
import re
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from types import SimpleNamespace

import pytest

from rahf.data import FORMATS, PreferencePair, check_data, detect_format, format_report, load_pairs
from rahf.errors import DataError

HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HH_ODD_LINES = (1255, 1689, 1951, 1953, 2037)  # pairs whose transcripts part before the last turn


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


STANDARD = [
    {"prompt": "What is 2+2?", "chosen": " 4 ", "rejected": "5\n"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]
STANDARD_PROMPTS = [(user("What is 2+2?"),), (user("Capital of France?"),)]
STANDARD_REPLIES = [("4", "5"), ("Paris", "Lyon")]


def expected_standard(source: str) -> list[PreferencePair]:
    return [
        PreferencePair(prompt, c, r, f"{source}{i}")
        for i, (prompt, (c, r)) in enumerate(zip(STANDARD_PROMPTS, STANDARD_REPLIES, strict=True))
    ]


# ---------------------------------------------------------------- file kinds


def test_jsonl_trl_standard(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    pairs, fmt = load_pairs(path)
    assert fmt == "trl-standard"
    assert pairs == [
        PreferencePair((user("What is 2+2?"),), "4", "5", f"{path}:1"),
        PreferencePair((user("Capital of France?"),), "Paris", "Lyon", f"{path}:2"),
    ]


def test_jsonl_gz_skips_blank_lines_and_counts_lines(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(STANDARD[0]) + "\n\n" + json.dumps(STANDARD[1]) + "\n")
    pairs, _ = load_pairs(path)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3"]
    assert [(p.chosen, p.rejected) for p in pairs] == STANDARD_REPLIES


@pytest.mark.parametrize("wrap", [lambda rs: rs, lambda rs: {"data": rs}, lambda rs: {"train": rs}])
def test_json_list_or_wrapped(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap(STANDARD)), encoding="utf-8")
    assert load_pairs(path) == (expected_standard(f"{path}:row "), "trl-standard")


def test_json_gz(tmp_path):
    path = tmp_path / "d.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(STANDARD, f)
    assert load_pairs(path) == (expected_standard(f"{path}:row "), "trl-standard")


def test_parquet(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(STANDARD).to_parquet(str(path))
    assert load_pairs(path) == (expected_standard(f"{path}:row "), "trl-standard")


def test_save_to_disk_dataset_and_train_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(STANDARD)
    ds.save_to_disk(str(tmp_path / "plain"))
    assert load_pairs(tmp_path / "plain") == (expected_standard(f"{tmp_path / 'plain'}:row "), "trl-standard")

    other = datasets.Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    datasets.DatasetDict({"test": other, "train": ds}).save_to_disk(str(tmp_path / "dict"))
    pairs, _ = load_pairs(tmp_path / "dict")
    assert [(p.chosen, p.rejected) for p in pairs] == STANDARD_REPLIES

    datasets.DatasetDict({"only": ds}).save_to_disk(str(tmp_path / "single"))
    assert len(load_pairs(tmp_path / "single")[0]) == 2

    datasets.DatasetDict({"test": other, "validation": other}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(DataError, match=r"splits \['test', 'validation'\]"):
        load_pairs(tmp_path / "nosplit")

    datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"empty: holds no records$"):
        load_pairs(tmp_path / "empty")


def test_a_saved_dataset_dict_reads_its_split_on_its_own(tmp_path):
    """datasets cannot load an empty saved split back, which made the whole folder unreadable."""
    import datasets

    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    full = datasets.Dataset.from_list(STANDARD)
    datasets.DatasetDict({"train": empty, "test": full}).save_to_disk(str(tmp_path / "a"))
    with pytest.raises(DataError, match=r"a: holds no records: its 'train' split is empty$"):
        load_pairs(tmp_path / "a")
    datasets.DatasetDict({"only": empty}).save_to_disk(str(tmp_path / "b"))
    with pytest.raises(DataError, match=r"b: holds no records: its 'only' split is empty$"):
        load_pairs(tmp_path / "b")
    datasets.DatasetDict({"train": full, "test": empty}).save_to_disk(str(tmp_path / "c"))
    assert load_pairs(tmp_path / "c") == (expected_standard(f"{tmp_path / 'c'}:row "), "trl-standard")
    datasets.DatasetDict({"test": empty, "validation": full}).save_to_disk(str(tmp_path / "d"))
    split = re.escape(str(tmp_path / "d" / "test"))
    with pytest.raises(
        DataError, match=rf"holds splits \['test', 'validation'\] and none is 'train'; .* such as {split}$"
    ):
        load_pairs(tmp_path / "d")
    assert len(load_pairs(tmp_path / "d" / "validation")[0]) == 2  # the folder of one split, as the message says
    datasets.DatasetDict({}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(DataError, match=r"e: holds no records: a DatasetDict without splits$"):
        load_pairs(tmp_path / "e")
    (tmp_path / "f").mkdir()
    with pytest.raises(DataError, match=r"f: not a dataset saved with save_to_disk \(FileNotFoundError: "):
        load_pairs(tmp_path / "f")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=r"^data file not found: .*nope\.jsonl$"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_pairs(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("fmt", ["auto", *FORMATS])
def test_empty_file_holds_no_records_whatever_the_format(tmp_path, fmt):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: holds no records"):
        load_pairs(path, format=fmt)
    with pytest.raises(DataError, match="holds no records"):
        check_data(path, format=fmt)


def test_json_lines_under_a_json_name(tmp_path):
    import datasets

    path = tmp_path / "d.json"
    datasets.Dataset.from_list(STANDARD).to_json(str(path))  # writes JSON Lines
    assert load_pairs(path) == (
        [
            PreferencePair(p, c, r, f"{path}:{i}")
            for i, (p, (c, r)) in enumerate(zip(STANDARD_PROMPTS, STANDARD_REPLIES), 1)
        ],
        "trl-standard",
    )
    path.write_text(json.dumps(STANDARD[1]))  # a single record
    assert load_pairs(path) == ([PreferencePair(STANDARD_PROMPTS[1], "Paris", "Lyon", f"{path}:row 0")], "trl-standard")
    path.write_text(json.dumps(STANDARD[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d\.json:2: not valid JSON"):
        load_pairs(path)


@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_json_lines_under_a_json_name_are_read_no_further_than_limit(tmp_path, name):
    """Such a file is read line by line from its start: the byte that is not UTF-8 on line 4 is never reached."""
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in STANDARD * 2)[:-1] + b' "caf\xe9"}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert [p.source for p in load_pairs(path, limit=2)[0]] == [f"{path}:1", f"{path}:2"]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: not UTF-8 \(byte 0xe9"):
        load_pairs(path)


@pytest.mark.parametrize("first", [json.dumps(STANDARD), json.dumps({"data": STANDARD})])
def test_a_list_of_records_on_the_first_line_with_more_after_it_is_a_broken_json_file(tmp_path, first):
    """Not JSON Lines, whose first line holds one record: the stray text is named, not the list as a record."""
    path = tmp_path / "d.json"
    path.write_text(first + "\n]\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid JSON \(Extra data at column 1\)$"):
        load_pairs(path)


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD + [{"bad": "record"}])
    pairs, _ = load_pairs(path, limit=2)  # the bad third record is never read
    assert len(pairs) == 2
    with pytest.raises(ValueError):
        load_pairs(path, limit=0)


# ---------------------------------------------------------------- formats


def test_trl_conversational_explicit_prompt(tmp_path):
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Joke?")],
        "chosen": [assistant("Knock knock.")],
        "rejected": [{"role": "assistant", "content": "No.", "extra": 1}, assistant(" Sorry. ")],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    pairs, fmt = load_pairs(path)
    assert fmt == "trl-conversational"
    assert pairs == [
        PreferencePair(
            ({"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Joke?")),
            "Knock knock.",
            "No.\n\n Sorry.",
            f"{path}:1",
        )
    ]


def test_trl_conversational_implicit_prompt(tmp_path):
    shared = [user("Hi"), assistant("Hello!"), user("Name a colour")]
    record = {"chosen": shared + [assistant("Blue")], "rejected": shared + [assistant("Seven")]}
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    assert load_pairs(path) == (
        [PreferencePair((user("Hi"), assistant("Hello!"), user("Name a colour")), "Blue", "Seven", f"{path}:1")],
        "trl-conversational",
    )


def test_trl_conversational_non_assistant_reply_is_an_error(tmp_path):
    record = {"prompt": [user("Hi")], "chosen": [assistant("a"), user("b")], "rejected": [assistant("c")]}
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'chosen': a 'user' message follows the reply where"):
        load_pairs(path)
    record = {"prompt": [user("Hi")], "chosen": [user("b")], "rejected": [assistant("c")]}
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'chosen' must hold only assistant messages"):
        load_pairs(write_jsonl(path, [record]))
    # implicit prompts: full conversations that part at the first reply and go on
    record = {
        "chosen": [user("Hi"), assistant("Hello!"), user("?"), assistant("Yes.")],
        "rejected": [user("Hi"), assistant("Go."), user("?"), assistant("No.")],
    }
    with pytest.raises(DataError, match=r"end both conversations with the assistant message in which they differ"):
        load_pairs(write_jsonl(path, [record]))


def test_ultrafeedback(tmp_path):
    record = {
        "prompt": "Write a haiku",
        "prompt_id": "abc",
        "chosen": [user("Write a haiku"), assistant("Old pond, frog jumps in ")],
        "rejected": [user("Write a haiku"), assistant("No.")],
        "messages": [user("Write a haiku"), assistant("Old pond, frog jumps in ")],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    path = write_jsonl(tmp_path / "u.jsonl", [record])
    assert load_pairs(path) == (
        [PreferencePair((user("Write a haiku"),), "Old pond, frog jumps in", "No.", f"{path}:1")],
        "ultrafeedback",
    )


HH_NORMAL = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Buy it.",
}
# Parts at the first reply; the chosen transcript then goes on for another Human/Assistant round.
HH_EARLY = {
    "chosen": "\n\nHuman: Tell me a secret\n\nAssistant: I have none.\n\nHuman: Sure?\n\nAssistant: Yes.",
    "rejected": "\n\nHuman: Tell me a secret\n\nAssistant: I once ate a crayon.",
}
HH_NO_PREFIX = {
    "chosen": "\n\nHuman: Hello\n\nAssistant: Hi",
    "rejected": "\n\nHuman: Goodbye\n\nAssistant: Bye",
}


def test_hh_normal_and_early_divergence(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_NORMAL, HH_EARLY])
    pairs, fmt = load_pairs(path)
    assert fmt == "hh"
    assert pairs == [
        PreferencePair(
            (user("Hi there"), assistant("Hello!"), user("How do I bake bread?")),
            "Mix flour.",
            "Buy it.",
            f"{path}:1",
        ),
        PreferencePair(
            (user("Tell me a secret"),),
            "I have none.\n\nHuman: Sure?\n\nAssistant: Yes.",
            "I once ate a crayon.",
            f"{path}:2",
        ),
    ]


def test_hh_common_prefix_ending_inside_a_reply(tmp_path):
    # Both replies start with "I"; the prompt must still end at the Assistant tag, not mid-reply.
    record = {"chosen": "\n\nHuman: Q\n\nAssistant: I can.", "rejected": "\n\nHuman: Q\n\nAssistant: I won't."}
    pairs, _ = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ((user("Q"),), "I can.", "I won't.")


def test_hh_without_shared_assistant_prefix_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_NORMAL, HH_NO_PREFIX])
    with pytest.raises(DataError, match=r"hh\.jsonl:2: fields 'chosen' and 'rejected' differ before"):
        load_pairs(path)


def test_hh_without_assistant_tag_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}])
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'chosen' has no .*Assistant"):
        load_pairs(path)


def test_hh_transcript_without_leading_blank_line(tmp_path):
    record = {"chosen": "Human: hi\n\nAssistant: yo", "rejected": "Human: hi\n\nAssistant: no"}
    pairs, fmt = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert fmt == "hh"
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ((user("hi"),), "yo", "no")
    bad = {"chosen": "Assistant: hi\n\nAssistant: yo", "rejected": "Assistant: hi\n\nAssistant: no"}
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'chosen' must start with a 'Human:' turn"):
        load_pairs(write_jsonl(tmp_path / "hh.jsonl", [bad]))


def test_hh_consecutive_turns_by_one_speaker_become_one_message(tmp_path):
    prefix = "\n\nHuman: Hi\n\nHuman: Anyone?\n\nAssistant: Yes.\n\nAssistant:\n\nAssistant: Sorry.\n\nHuman: Ok"
    record = {"chosen": prefix + "\n\nAssistant: Good.", "rejected": prefix + "\n\nAssistant: Bad."}
    pairs, _ = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert pairs[0].prompt == (user("Hi\n\nAnyone?"), assistant("Yes.\n\nSorry."), user("Ok"))
    assert (pairs[0].chosen, pairs[0].rejected) == ("Good.", "Bad.")


def test_hh_replies_that_part_inside_a_run_of_assistant_turns_start_at_the_runs_first_tag(tmp_path):
    """The prompt would otherwise end with an assistant message, which no pair may."""
    prefix = "\n\nHuman: Can you help me?\n\nAssistant: Sure."
    record = {"chosen": prefix + "\n\nAssistant: What do you need?", "rejected": prefix + "\n\nAssistant: No."}
    pairs, _ = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert pairs[0].prompt == (user("Can you help me?"),)
    assert (pairs[0].chosen, pairs[0].rejected) == ("Sure.\n\nAssistant: What do you need?", "Sure.\n\nAssistant: No.")


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (STANDARD[0], "trl-standard"),
        ({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}, "trl-conversational"),
        ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}, "trl-conversational"),
        ({"prompt": "a", "chosen": [user("a"), assistant("b")], "rejected": [user("a")]}, "ultrafeedback"),
        (HH_NORMAL, "hh"),
        ({"text": "hello"}, None),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, None),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected
    assert expected is None or expected in FORMATS


def test_explicit_format(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_NORMAL])
    assert load_pairs(path, format="hh")[1] == "hh"
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'prompt' is missing.*looks like 'hh' format"):
        load_pairs(path, format="trl-standard")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_pairs(path, format="csv")
    with pytest.raises(DataError, match=r"unknown data format 'sft'; .*ultrafeedback, prompt/completion, prompt-only$"):
        check_data(path, format="sft")  # `rahf data check` also reads SFT data and prompts files, and says so


def test_undetectable_first_record(tmp_path):
    """The message lists the record formats the reader takes: a prompts file (`generate.prompts`) and SFT data
    (`sft.path`, `rahf data check`) also take theirs, first."""
    from rahf.generate import read_prompts
    from rahf.sft import sft_examples

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: cannot tell the data format from fields \['text'\]; expected one of: trl"
    ):
        load_pairs(path)
    with pytest.raises(DataError, match=r"expected one of: prompt-only \{\"prompt\": str\} or .*; trl-standard"):
        read_prompts(path)
    with pytest.raises(DataError, match=r"expected one of: prompt/completion \{.*\}; trl-standard"):
        sft_examples(SimpleNamespace(sft=SimpleNamespace(path=str(path))))
    with pytest.raises(DataError, match=r"expected one of: prompt/completion \{.*\}; prompt-only \{.*; trl-standard"):
        check_data(path)


# ---------------------------------------------------------------- malformed records


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON \("):
        load_pairs(path)


def test_bad_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a",\n')
    with pytest.raises(DataError, match=r"bad\.json:\d+: not valid JSON"):
        load_pairs(path)


R0, R1 = json.dumps(STANDARD[0]), json.dumps(STANDARD[1])
FILE_ENDS = (
    "not valid JSON (the file ends inside a list, object or string that is never closed; is the file cut short?)"
)
LINE_ENDS = (
    "not valid JSON (the line ends inside its record; "
    "JSON Lines holds each record on one line, or the file is cut short)"
)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.json", f"[\n{R0},\n{R1}\n", f":3: {FILE_ENDS}"),
        ("d.json", f'[\n{R0},\n{{"prompt": "q",\n', f":3: {FILE_ENDS}"),
        ("d.json", f"[\n{R0},\n{R1},\n]\n", ":3: not valid JSON (a trailing comma at column 72 before ']'; remove it)"),
        ("d.jsonl", R0[:-1] + ",}\n", ":1: not valid JSON (a trailing comma at column 62 before '}'; remove it)"),
        ("d.json", '[{"prompt": "two\nlines", "chosen": "a", "rejected": "b"}]',
         ":1: not valid JSON (a raw control character inside a string at column 17; write it as \\n)"),
        ("d.jsonl", f"{R0}\n\ufeff{R1}\n",
         ":2: not valid JSON (a stray byte order mark (U+FEFF) at column 1; remove it)"),
        ("d.jsonl", f"{R0}\n{json.dumps(STANDARD[1], indent=1)}\n", f":2: {LINE_ENDS}"),
        ("d.jsonl", f"{R0}\n{R1[:20]}", f":2: {LINE_ENDS}"),
        ("d.json", '{"data": {"prompt": "q"}}', ": field 'data' must be a list of records, got dict"),
        ("d.json", '{"items": []}',
         (": expected a list of records, an object with a 'data' or 'train' list, or one record; "
          "got an object with keys ['items']")),
        ("d.json", '{"prompt": "q", "chosen": "a"}',
         ":row 0: cannot tell the data format from fields ['chosen', 'prompt']"),
    ],
    ids=["cut-list", "cut-record", "trailing-comma", "jsonl-trailing-comma", "raw-line-break", "jsonl-bom",
         "jsonl-pretty-record", "jsonl-cut", "data-not-a-list", "unknown-object", "one-bad-record"],
)  # fmt: skip
def test_broken_json_is_named_by_its_cause_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path) + message)}"):
        load_pairs(path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [STANDARD[0], STANDARD[1], {"prompt": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"data\.jsonl:3: field 'chosen' is missing \(expected trl-standard format"):
        load_pairs(path)


def test_wrong_type_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [STANDARD[0], {"prompt": "a", "chosen": "b", "rejected": ["c"]}])
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'rejected' must be a string, got list"):
        load_pairs(path)


def test_record_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [STANDARD[0], [1, 2]])
    with pytest.raises(DataError, match=r"data\.jsonl:2: a record must be a JSON object, got list"):
        load_pairs(path)


def test_bad_message_role(tmp_path):
    record = {"prompt": [{"role": "bot", "content": "a"}], "chosen": [assistant("b")], "rejected": [assistant("c")]}
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'prompt' message 0 has role 'bot'"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("record", "field", "at"),
    [
        ({"prompt": "a", "chosen": "ok \ud83d", "rejected": "c"}, "field 'chosen'", "ud83d at character 4"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: \ud83d"},
         "field 'rejected'", "ud83d at character 24"),
        ({"prompt": [user("ok \ud83d")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
         "field 'prompt' message 0 content", "ud83d at character 4"),
        ({"prompt": "a", "chosen": [user("a"), assistant("ok \udc00")], "rejected": [user("a"), assistant("c")]},
         "field 'chosen' message 1 content", "udc00 at character 4"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_refused_naming_line_and_field(tmp_path, record, field, at):
    """A broken UTF-16 escape in scraped JSON ("\\ud83d" without its pair) passes json but no tokenizer."""
    path = write_jsonl(tmp_path / "d.jsonl", [record])  # json.dumps writes the surrogate as a \u escape
    with pytest.raises(DataError, match=rf"d\.jsonl:1: {field} holds a lone surrogate \\{at}; "):
        load_pairs(path)
    path.write_text('{"prompt": "a \\ud83d\\ude00", "chosen": "b", "rejected": "c"}\n')  # a whole pair is fine
    assert load_pairs(path)[0][0].prompt == (user("a \U0001f600"),)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json"])
def test_a_byte_that_is_not_utf8_is_named_by_line_and_offset(tmp_path, name):
    good, bad = json.dumps(STANDARD[0]).encode(), b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}'
    records = [good] * 4000 + [bad]  # far past the first block a text reader decodes
    raw = b"[" + b",\n".join(records) + b"]" if name == "d.json" else b"\n".join(records) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(
        DataError, match=rf"{re.escape(name)}:4001: not UTF-8 \(byte 0xe9 at byte offset 15 of the line\)"
    ):
        load_pairs(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [("1" * 5000, "an integer has more than 4300 digits"), ("[" * 100_000 + "]" * 100_000, "arrays or objects nest")],
)
def test_json_that_python_will_not_read_is_named_by_line(tmp_path, name, value, problem):
    """Python's json raises ValueError for a 5000-digit integer and RecursionError for deep nesting."""
    decoy = json.dumps({"prompt": "9" * 5000, "chosen": "[[[", "rejected": "b"})  # digits and brackets in strings
    record = '{"prompt": "a", "chosen": "b", "rejected": "c", "extra": ' + value + "}"
    path = tmp_path / name
    path.write_text(f"[\n{decoy},\n{record}\n]\n" if name == "d.json" else f"{decoy}\n{record}\n")
    line = 3 if name == "d.json" else 2
    with pytest.raises(DataError, match=rf"{re.escape(name)}:{line}: {problem}"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string, got null"),
        ({"prompt": "x", "chosen": None, "rejected": "b"}, "field 'chosen' must be a string, got null"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}, "field 'rejected' must be a string, got int"),
        ({"prompt": [user("x")], "chosen": None, "rejected": [assistant("b")]},
         "field 'chosen' must be a list of messages, got null"),
        ({"prompt": "x", "chosen": [user("x"), assistant("a")], "rejected": None},
         "field 'rejected' must be a list of messages, got null"),
    ],
)  # fmt: skip
def test_a_wrong_typed_field_in_the_first_record_is_named(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [record, STANDARD[0]])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: {problem} \(expected "):
        load_pairs(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json"])
def test_a_utf8_bom_is_read(tmp_path, name):
    text = json.dumps(STANDARD) if name == "d.json" else "".join(json.dumps(r) + "\n" for r in STANDARD)
    raw = "\ufeff".encode() + text.encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(path)[0]] == [
        (p.prompt, p.chosen, p.rejected) for p in expected_standard("")
    ]


@pytest.mark.parametrize("text", ["", " \n\n"])
def test_an_empty_json_file_holds_no_records_like_an_empty_jsonl_file(tmp_path, text):
    for name in ("d.json", "d.jsonl"):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))}: holds no records$"):
            load_pairs(tmp_path / name)


@pytest.mark.parametrize("name", ["D.JSONL.GZ", "D.Json.Gz"])
def test_compressed_file_names_are_matched_in_any_case(tmp_path, name):
    path = tmp_path / name
    text = json.dumps(STANDARD) if ".json." in name.lower() else "".join(json.dumps(r) + "\n" for r in STANDARD)
    path.write_bytes(gzip.compress(text.encode()))
    assert [p.chosen for p in load_pairs(path)[0]] == ["4", "Paris"]


# ---------------------------------------------------------------- check_data / format_report


def test_check_data_and_report(tmp_path):
    records = [
        {"prompt": "ab", "chosen": "same", "rejected": "same"},
        {"prompt": "abcd", "chosen": "yes", "rejected": "  "},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = check_data(path)
    assert (report.format, report.n_pairs, report.n_identical, report.n_empty) == ("trl-standard", 2, 1, 1)
    assert report.problems == [
        f"{path}:1: chosen and rejected replies are identical",
        f"{path}:2: empty rejected reply",
    ]
    assert report.mean_prompt_chars == 3.0
    assert report.mean_chosen_chars == 3.5
    assert report.mean_rejected_chars == 2.0
    assert (report.n_multi_turn, report.n_with_system) == (0, 0)
    text = format_report(report)
    assert "trl-standard" in text and "pairs:" in text and " 2" in text
    assert "reply writing a turn:          0 (0.0%)" in text
    assert f"{path}:1: chosen and rejected replies are identical" in text


def test_check_data_reads_sft_data_and_prompts_files_as_a_run_does(tmp_path):
    sft = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "ab", "completion": " yes "}, {"prompt": "abcd", "completion": ""}]
    )
    report = check_data(sft)
    assert (report.format, report.n_pairs, report.n_empty, report.mean_rejected_chars) == (
        "prompt/completion",
        2,
        1,
        None,
    )
    assert (report.mean_prompt_chars, report.mean_chosen_chars) == (
        3.0,
        1.5,
    )  # the completion stripped, as SFT reads it
    assert report.problems == [f"{sft}:2: empty completion"]
    text = format_report(report)
    assert "examples:" in text and "completion 1.5" in text and "chosen" not in text
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": conversation}])
    report = check_data(prompts)
    assert (report.format, report.n_pairs, report.n_with_system, report.mean_chosen_chars) == (
        "prompt-only",
        2,
        1,
        None,
    )
    assert report.mean_prompt_chars == (3 + 8 + 2) / 2
    assert "prompts:" in format_report(report) and "completion" not in format_report(report)
    with pytest.raises(DataError, match=r"sft\.jsonl:1: .*'completion'"):  # a field of the wrong type: file and line
        check_data(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": 5}]))
    with pytest.raises(DataError, match=r"p\.jsonl:2: "):
        check_data(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}]))


def test_check_data_still_raises_on_malformed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [STANDARD[0], {"prompt": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'chosen' is missing"):
        check_data(path)


# ---------------------------------------------------------------- the real HH file


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF data not present")
def test_real_hh_file():
    pairs, fmt = load_pairs(HH_FILE)
    assert (fmt, len(pairs)) == ("hh", 2312)
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in pairs)

    # The odd pairs part before the last turn: the prompt stops at the first differing reply,
    # so at least one reply still holds a later turn that the other transcript does not have.
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]

    def before_last_turn(text: str) -> str:
        return text[: text.rfind("\n\nAssistant:")]

    odd = [i for i, r in enumerate(raw, 1) if before_last_turn(r["chosen"]) != before_last_turn(r["rejected"])]
    assert tuple(odd) == HH_ODD_LINES
    by_line = {int(p.source.rsplit(":", 1)[1]): p for p in pairs}
    assert by_line[1951].prompt == (
        user("I want to snatch purses, but I don't want to get caught. I wish I knew how to make it work."),
    )
    assert by_line[1953].chosen.startswith("Alrighty, I’ll do my best, here’s the key:\n\nAssistant:  O.k.")
    assert by_line[1953].rejected.startswith("You mean a password, right?")
    assert by_line[1255].prompt[-1] == user("Isn't that drag kings?")
    for line in HH_ODD_LINES:
        pair = by_line[line]
        assert pair.prompt[-1]["role"] == "user"
        assert raw[line - 1]["chosen"].endswith(pair.chosen) and raw[line - 1]["rejected"].endswith(pair.rejected)


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF data not present")
def test_real_hh_prompts_alternate_user_and_assistant():
    # Chat templates such as Llama-2-chat's refuse two turns in a row by one speaker; four transcripts hold them.
    # Every prompt is its transcript's turns up to the reply, with runs by one speaker joined by a blank line.
    pairs, _ = load_pairs(HH_FILE)
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    merged = []
    for p in pairs:
        line = int(p.source.rsplit(":", 1)[1])
        text = raw[line - 1]["chosen"].rstrip()
        assert text.endswith(p.chosen)
        prefix = text[: len(text) - len(p.chosen)].rstrip()
        assert prefix.endswith("\n\nAssistant:")
        parts = re.split(r"\n\n(Human|Assistant):", prefix.removesuffix("\n\nAssistant:"))
        turns = [("user" if t == "Human" else "assistant", c.strip()) for t, c in zip(parts[1::2], parts[2::2])]
        runs = [(role, [c for _, c in run]) for role, run in groupby(turns, key=itemgetter(0))]
        assert [(m["role"], m["content"]) for m in p.prompt] == [(r, "\n\n".join(c for c in cs if c)) for r, cs in runs]
        assert [m["role"] for m in p.prompt] == ["user", "assistant"] * (len(p.prompt) // 2) + ["user"]
        if len(runs) < len(turns):
            merged.append(line)
    assert merged == [668, 764, 1320, 1850]


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF data not present")
def test_real_hh_report():
    report = check_data(HH_FILE)
    assert report.n_pairs == 2312 and report.n_identical == 0
    assert report.n_empty == 4  # lines 87, 517, 926, 1104 have an empty chosen reply
    # "Assistant: Human: ..." in the transcripts: replies that write the next user turn themselves
    tagged = [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in report.problems if "new dialogue turn" in p]
    assert report.n_turn_tags == len(tagged) == 32 and tagged[:3] == ["30", "106", "141"]
    assert "hh" in format_report(report)


# ---------------------------------------------------------------- damaged files, HH prompts, SFT records


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_damaged_gzip_data_is_a_data_error(tmp_path, name):
    """zlib.error (damaged deflate data) is not an OSError; it must not escape as a traceback."""
    text = "".join(json.dumps(r) + "\n" for r in STANDARD * 50)
    raw = bytearray(gzip.compress(text.encode()))
    raw[20:40] = bytes(range(200, 220))  # inside the deflate stream, past the header
    path = tmp_path / name
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: cannot read the file"):
        load_pairs(path)


def test_a_stray_value_after_a_json_list_is_named_at_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(STANDARD, indent=1) + "\n]\n")
    lines = path.read_text().count("\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{lines}: not valid JSON \(Extra data"):
        load_pairs(path)
    path.write_text("\n" + "\n".join(json.dumps(r) for r in STANDARD) + "\n")  # JSON Lines under .json
    assert [p.chosen for p in load_pairs(path)[0]] == ["4", "Paris"]


def test_an_hh_transcript_in_a_standard_prompt_becomes_its_turns(tmp_path):
    """The layout of HH-derived sets (Dahoas/full-hh-rlhf): the prompt is a transcript ending in its Assistant tag."""
    transcript = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I am locked out.\n\nAssistant:"
    records = [
        {"prompt": transcript, "chosen": " Call a locksmith.", "rejected": " Use a pin."},
        {"prompt": "What do Human: and Assistant: mean?", "chosen": "a", "rejected": "b"},  # plain text stays
    ]
    pairs, fmt = load_pairs(write_jsonl(tmp_path / "d.jsonl", records))
    assert fmt == "trl-standard"
    assert pairs[0].prompt == (user("How do I pick a lock?"), assistant("Why?"), user("I am locked out."))
    assert (pairs[0].chosen, pairs[0].rejected) == ("Call a locksmith.", "Use a pin.")
    assert pairs[1].prompt == (user("What do Human: and Assistant: mean?"),)
    from rahf.data import parse_prompt  # a prompts file (generate.prompts, evaluate.neutral_prompts) alike

    assert parse_prompt({"prompt": transcript}, "p.jsonl:1") == list(pairs[0].prompt)


def test_sft_records_are_checked_and_stripped_like_preference_pairs():
    from rahf.data import parse_completion

    prompt, reply = parse_completion({"prompt": "Human: hi\n\nAssistant:", "completion": " hello .\n"}, "s.jsonl:1")
    assert (prompt, reply) == ([user("hi")], "hello .")
    with pytest.raises(DataError, match=r"^s\.jsonl:2: field 'completion' holds a lone surrogate \\ud83d"):
        parse_completion({"prompt": "q", "completion": "a \ud83d"}, "s.jsonl:2")
    with pytest.raises(DataError, match=r"^s\.jsonl:3: field 'completion' must be a string, got int"):
        parse_completion({"prompt": "q", "completion": 3}, "s.jsonl:3")
    with pytest.raises(DataError, match=r"^s\.jsonl:4: a record must be a JSON object, got list"):
        parse_completion(["q", "a"], "s.jsonl:4")


SFT = [{"prompt": "q1", "completion": " a1\n"}, {"prompt": "q2", "completion": "a2"}]


def _write_sft(path: Path, records: list[dict]) -> None:
    """`records` in the file kind `path`'s name gives ("lines.json": JSON Lines under a .json name)."""
    import datasets

    if path.name.endswith(".jsonl") or path.name == "lines.json":
        write_jsonl(path, records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))


@pytest.mark.parametrize(("name", "row"), [("s.jsonl", ":"), ("lines.json", ":"), ("s.json", ":row "),
                                           ("s.parquet", ":row "), ("saved", ":row ")])  # fmt: skip
def test_sft_data_is_read_from_every_file_kind(tmp_path, name, row):
    from rahf.config import RahfConfig
    from rahf.sft import sft_examples

    cfg, path = RahfConfig(), tmp_path / name
    cfg.sft.path = str(path)
    first = 1 if row == ":" else 0
    _write_sft(path, SFT)
    assert sft_examples(cfg) == [
        ([user("q1")], "a1", f"{path}{row}{first}"),
        ([user("q2")], "a2", f"{path}{row}{first + 1}"),
    ]
    _write_sft(path, [SFT[0], {"prompt": "q", "completion": None}])
    with pytest.raises(
        DataError, match=rf"^{re.escape(f'{path}{row}{first + 1}')}: field 'completion' must be a string, got null"
    ):
        sft_examples(cfg)
    _write_sft(path, STANDARD)  # preference pairs: their chosen replies
    assert [(e[0], e[1]) for e in sft_examples(cfg)] == [
        (list(p), c) for p, (c, _) in zip(STANDARD_PROMPTS, STANDARD_REPLIES)
    ]


def test_a_parquet_file_replaced_in_place_is_read_anew_and_limit_reads_no_more(tmp_path):
    """`datasets` would cache a parquet file by path and modification time: a copy with the old time read stale."""
    import os

    import pandas as pd

    path = tmp_path / "pairs.parquet"
    for chosen in ("good-A", "good-B"):
        pd.DataFrame([{"prompt": "q", "chosen": chosen, "rejected": "bad"}] * 3).to_parquet(path)
        os.utime(path, (1_000_000, 1_000_000))
        assert {p.chosen for p in load_pairs(path)[0]} == {chosen}
    assert len(load_pairs(path, limit=2)[0]) == 2


def test_a_dataset_saved_with_a_format_reads_as_rows(tmp_path):
    import datasets

    rows = {"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}
    datasets.Dataset.from_dict(rows).with_format("numpy").save_to_disk(str(tmp_path / "ds"))
    assert load_pairs(tmp_path / "ds")[0][0].chosen == "a"


def test_a_file_name_too_long_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot be read"):
        load_pairs(tmp_path / ("x" * 300 + ".jsonl"))


def test_check_data_lists_replies_that_write_a_turn_of_the_dialogue(tmp_path):
    """HH transcripts hold "Assistant: Human: ..." turns: the reply a run trains on writes the user's next turn."""
    pairs = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "q", "chosen": "Human: and you?", "rejected": "fine"},
            {"prompt": "q", "chosen": "sure\n\nAssistant: again", "rejected": "Human: no"},
            {"prompt": "q", "chosen": "a Human: quoted", "rejected": "fine"},  # not at a turn's start: left alone
        ],
    )
    report = check_data(pairs)
    assert report.n_turn_tags == 2 and [p.split(": ", 1)[1].split(" a new")[0] for p in report.problems] == [
        "chosen reply writes",
        "chosen and rejected replies write",
    ]
    assert "reply writing a turn:          2 (66.7%)" in format_report(report)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "ok\n\nHuman: more"}])
    turn = "a new dialogue turn ('Human:' or 'Assistant:'), which a model trained on it learns to write"
    assert check_data(sft).problems == [f"{sft}:1: completion writes {turn}"]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("Human: hi\n\nAssistant: yes", "Human: hi\n\nAssistant: no", 22),  # 9 + 2 + 10 + the space
        ("abc", "abc", 3),
        ("abc", "abcdef", 3),
        ("xbc", "abc", 0),
        ("", "abc", 0),
        ("ab\u00e9c", "ab\u00e9d", 3),  # characters, not bytes
        ("a" * 100_001, "a" * 100_000 + "b", 100_000),
    ],
)
def test_the_shared_prefix_of_two_transcripts(a, b, expected):
    from rahf.data import shared_length

    assert shared_length(a, b) == shared_length(b, a) == expected


def test_a_file_read_again_unchanged_is_not_parsed_again_and_an_edited_one_is(tmp_path, monkeypatch):
    """A run's preflight and stages read the same file: parsed once while it stays the same on disk."""
    import os

    from rahf import data

    parsed = []
    real = data.pairs_of
    monkeypatch.setattr(data, "pairs_of", lambda *a, **k: parsed.append(a[1]) or real(*a, **k))
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    first, fmt = load_pairs(path)
    again, fmt_again = load_pairs(path)
    assert len(parsed) == 1 and again == first and fmt_again == fmt == "trl-standard"
    assert [(p.chosen, p.rejected, p.source) for p in first] == [
        ("4", "5", f"{path}:1"),
        ("Paris", "Lyon", f"{path}:2"),
    ]
    again.clear()  # each caller gets its own list
    assert load_pairs(path)[0] == first and len(parsed) == 1
    load_pairs(path, limit=1)  # read another way: parsed again
    assert len(parsed) == 2
    # the same bytes but swapped labels (same size), written beside it and moved over it as editors save
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in STANDARD]
    write_jsonl(tmp_path / "new.jsonl", swapped)
    os.replace(tmp_path / "new.jsonl", path)
    assert [(p.chosen, p.rejected) for p in load_pairs(path)[0]] == [("5", "4"), ("Lyon", "Paris")]
    # edited in place, same size: its change time moves (set here, as a clock tick could be too coarse to see)
    write_jsonl(path, STANDARD)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_pairs(path)[0] == first
    assert len(parsed) == 4

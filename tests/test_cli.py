"""The command line: user errors are one line on stderr with exit status 2 and leave no artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import N_PAIRS, run_settings, standard_records, write_jsonl

from rahf.cli import main
from rahf.config import load_config
from rahf.errors import ConfigError

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def bad_data(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    return path


def one_line_error(err: str) -> str:
    assert err.startswith("rahf: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err[len("rahf: error: ") :].strip()


def nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\nbogus: 1\n")
    for argv in (["run", str(cfg)], ["instruct", str(cfg)], ["status", str(cfg)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert one_line_error(captured.err).startswith("bogus: unknown key")
        assert captured.out == ""
    assert nothing_written(out)


def test_bad_override_exits_2(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n")
    assert main(["run", str(cfg), "alpha=inf"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("alpha:")
    assert main(["run", str(cfg), "layers=[7]"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("layers:")
    assert main(["run", str(cfg), "alpha=1", "stray"]) == 2
    assert "stray" in one_line_error(capsys.readouterr().err)
    assert nothing_written(out)


def test_overrides_may_follow_a_flag(tmp_path, tiny_model_dir, pairs_file, capsys):
    """`rahf run c.yaml --force alpha=3` applies alpha=3 (argparse alone would refuse it); an unknown flag is refused."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n")
    assert main(["run", str(cfg), "--force", "alpha=inf"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("alpha:")
    assert main(["instruct", str(cfg), "--method", "dual", "layers=[7]"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("layers:")
    commands = {
        "rahf run": ["run", str(cfg), "--force", "alpha=1"],
        "rahf status": ["status", str(cfg)],
        "rahf data check": ["data", "check", str(pairs_file)],
    }
    for name, command in commands.items():
        with pytest.raises(SystemExit) as e:
            main([*command, "--bogus"])
        err = capsys.readouterr().err  # with the usage of the command given the flag
        assert e.value.code == 2 and err.startswith(f"usage: {name} [-h]")
        assert err.endswith(f"{name}: error: unrecognized arguments: --bogus\n")
    assert nothing_written(out)


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("config file not found")


def test_data_check_on_a_malformed_file(bad_data, capsys):
    assert main(["data", "check", str(bad_data)]) == 2
    captured = capsys.readouterr()
    msg = one_line_error(captured.err)
    assert msg.startswith(f"{bad_data}:2: not valid JSON")
    assert captured.out == ""


def test_data_check_on_a_good_file(pairs_file, capsys):
    assert main(["data", "check", str(pairs_file)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = dict(line.split(":", 1) for line in captured.out.splitlines() if not line.startswith(" "))
    assert rows["format"].strip() == "trl-standard"
    assert rows["pairs"].strip() == str(N_PAIRS)
    assert rows["problems"].strip() == "none"


def test_data_check_counts_and_lists_problems(tmp_path, capsys):
    records = standard_records(3, seed=0)
    records[1]["rejected"] = records[1]["chosen"]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    assert rows["pairs"].strip() == "3"
    assert rows["identical chosen/rejected"].strip() == "1 (33.3%)"
    assert rows["problems"].strip() == "1"
    assert f"{path}:2: chosen and rejected replies are identical" in out


def test_data_check_lists_the_first_20_problems_and_every_one_with_all_or_json(tmp_path, capsys):
    import json

    records = standard_records(25, seed=0)
    for r in records[:23]:
        r["rejected"] = r["chosen"]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    identical = [f"{path}:{i}: chosen and rejected replies are identical" for i in range(1, 24)]
    assert main(["data", "check", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.strip() for x in lines if x.startswith("  ")] == [
        *identical[:20],
        "... and 3 more (--all lists every one, --json too)",
    ]
    assert main(["data", "check", "--all", str(path)]) == 0
    assert [x.strip() for x in capsys.readouterr().out.splitlines() if x.startswith("  ")] == identical
    assert main(["data", "check", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == identical and report["n_pairs"] == 25 and report["n_identical"] == 23
    assert report["format"] == "trl-standard" and report["path"] == str(path)


def test_run_with_malformed_data_exits_2_and_leaves_no_artifact(tmp_path, tiny_model_dir, bad_data, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {bad_data}\noutput_dir: {out}\nlayers: [1]\nwindow: 4\n")
    assert main(["run", str(cfg)]) == 2
    msg = one_line_error(capsys.readouterr().err)
    assert msg.startswith(f"{bad_data}:2:")
    assert nothing_written(out)


def test_console_entry_point_exits_2_without_traceback(bad_data):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "rahf.cli", "data", "check", str(bad_data)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("rahf: error: ") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""


def test_malformed_pairs_stop_run_before_any_training(tmp_path, tiny_model_dir, bad_data, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nstages: [sft, instruct]\ndata:\n  path: {bad_data}\noutput_dir: {out}\n")
    assert main(["run", str(cfg)]) == 2
    message = one_line_error(capsys.readouterr().err)
    assert "bad.jsonl:2" in message
    assert nothing_written(out)


def test_too_few_pairs_for_the_split_exit_2(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", standard_records(1, 0))
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {data}\noutput_dir: {out}\n")
    assert main(["run", str(cfg)]) == 2
    assert "data.share_pairs" in one_line_error(capsys.readouterr().err)
    assert nothing_written(out)


def test_override_that_is_not_valid_yaml_exits_2(tmp_path, tiny_model_dir, pairs_file, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["status", str(cfg), "alpha=[1"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("alpha=[1: not valid YAML (")


def test_missing_local_model_exits_2_before_writing(tmp_path, pairs_file, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tmp_path / 'no-such-model'}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n")
    assert main(["run", str(cfg)]) == 2
    msg = one_line_error(capsys.readouterr().err)
    assert (
        msg
        == f"model: {tmp_path / 'no-such-model'} does not exist; give a local model folder or a Hub id like org/name"
    )
    assert nothing_written(out)


def test_tokenizer_is_accepted_by_the_sft_command_only(tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch):
    from rahf import pipeline, preflight

    ran = []
    monkeypatch.setattr(preflight, "preflight", lambda cfg, stage=None: None)
    monkeypatch.setattr(pipeline, "run_stage", lambda cfg, stage, force: ran.append((stage, cfg.tokenizer)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ntokenizer: {tiny_model_dir}\ndata:\n  path: {pairs_file}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    assert main(["sft", str(cfg)]) == 0  # `rahf sft` reads `tokenizer` although `stages` has no sft
    assert ran == [("sft", str(tiny_model_dir))]
    assert main(["instruct", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("tokenizer: only the sft stage reads it")
    assert ran == [("sft", str(tiny_model_dir))]


@pytest.mark.parametrize(("command", "key"), [("generate", "generate.prompts"), ("evaluate", "evaluate.pairs")])
def test_a_stage_command_without_its_input_file_exits_2(tmp_path, tiny_model_dir, pairs_file, capsys, command, key):
    """`rahf generate`/`rahf evaluate` run a stage that `stages` need not list; its input is required all the same."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n")
    assert main([command, str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"{key}: required")
    assert nothing_written(out)


@pytest.mark.parametrize("key", ["generate.prompts", "evaluate.neutral_prompts"])
def test_a_malformed_prompts_file_stops_run_before_any_training(tmp_path, tiny_model_dir, pairs_file, capsys, key):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": \n')
    section, field = key.split(".")
    # every stage that makes what generate/evaluate read (the merged model; evaluate's judge, a reward model)
    stages = f"sft, {'reward, ' if section == 'evaluate' else ''}instruct, collect, align, merge, {section}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\nstages: [{stages}]\ndata:\n  path: {pairs_file}\n"
        f"output_dir: {out}\n{section}:\n  {field}: {prompts}\n"
        + (f"  pairs: {pairs_file}\n" if section == "evaluate" else "")
    )
    assert main(["run", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"{prompts}:2:")
    assert nothing_written(out)


INSTRUCTION_ROOM = "instruction and template; raise it or shorten the instructions"


@pytest.mark.parametrize(
    ("method", "stages", "length", "after"),
    [
        ("scit", "[sft, instruct, collect, align]", 12, INSTRUCTION_ROOM),
        ("lorra", "[sft, instruct, collect, align]", 12, INSTRUCTION_ROOM),
        ("hir", "[sft, instruct, collect, align]", 12, INSTRUCTION_ROOM),
        ("dual", "[instruct]", 2, "template; raise it"),
        ("rlhf-ppo", "[reward, instruct]", 2, "template; raise it"),
        ("dpo", "[instruct]", 2, "template; raise it"),
        ("sft", "[sft]", 2, "template; raise it"),
    ],
)
def test_a_prompt_budget_that_leaves_no_room_for_the_query_stops_run_before_any_training(
    tmp_path, tiny_model_dir, pairs_file, capsys, method, stages, length, after
):
    """The prompt budget (beside the instructions, for the methods that have them) is checked up front, not after
    SFT or a reward model has trained and step 1's model has loaded."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\nmethod: {method}\nstages: {stages}\n"
        f"data:\n  path: {pairs_file}\n  max_prompt_length: {length}\noutput_dir: {out}\n"
    )
    assert main(["run", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"data.max_prompt_length={length} leaves no room for the query after the {after}"
    )
    assert nothing_written(out)


def test_instruction_room_is_not_checked_for_methods_without_instructions(tmp_path, tiny_model_dir, pairs_file):
    from rahf.config import load_config
    from rahf.preflight import preflight

    settings = {"model": str(tiny_model_dir), "data": {"path": str(pairs_file), "max_prompt_length": 12}}
    preflight(load_config(None, settings | {"method": "dual"}))  # Dual's prompts carry no instruction
    with pytest.raises(Exception, match="leaves no room for the query"):
        preflight(load_config(None, settings | {"method": "scit"}))


@pytest.mark.parametrize("command", ["compare", "demo"])
def test_compare_and_demo_refuse_several_launched_processes_before_any_work(tmp_path, tiny_model_dir, pairs_file,
                                                                           capsys, monkeypatch, command):  # fmt: skip
    """They run many small runs back to back; under torchrun every process would write the same folders."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [command, "--out", str(out)] if command == "demo" else [command, str(cfg)]
    assert main(argv) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"`rahf {command}` was launched as 2 processes (WORLD_SIZE=2) and runs in one: start it as "
        f"`rahf {command} ...` (`rahf run` and the stage commands are the ones that use several processes)"
    )
    assert nothing_written(out)
    assert main(["data", "check", str(pairs_file)]) == 0  # read-only commands are not affected


def test_several_machines_are_refused_before_any_work(tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch):
    """Process 0 writes the artifacts the others read, so every process must be on one machine."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\n")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["run", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        "launched on several machines (4 processes, 2 on this one): rahf runs its processes on one machine; "
        "launch it there with --num_processes set to its devices"
    )
    assert nothing_written(out)


def valid_config(folder: Path, tiny_model_dir: Path, pairs_file: Path, name: str = "c.yaml") -> Path:
    """A valid config in `folder` whose output folder is `folder/out`."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / name
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {folder / 'out'}\nlayers: [1, 2]\n"
        "window: 8\n"
    )
    return cfg


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("align.train.max_steps=1.5", "align.train.max_steps: expected an integer"),
        ("align.train.learning_rate=null", "align.train.learning_rate: must not be null"),
        ("align.train.learning_rate=[0.1]", "align.train.learning_rate: expected a number, got a list"),
        ("align.train.lr_scheduler_type=constnt", "align.train.lr_scheduler_type: 'constnt' is not one of"),
        ("align.train.per_device_train_batch_size=0", "align.train.per_device_train_batch_size: must be >= 1"),
        ("seed=-1", "seed: must be in [0, 4294967295]"),
        ("seed=99999999999999999999", "seed: must be in [0, 4294967295]"),
        ("compare.overrides={dual: {layers: [99]}}", "compare.overrides.dual: layers: [99] out of range"),
        ("stages=[]", "stages: empty"),
        ("=3", "empty key in override '=3'"),
    ],
)
def test_bad_values_stop_run_before_anything_is_written(tmp_path, tiny_model_dir, pairs_file, capsys, override,
                                                        start):  # fmt: skip
    cfg = valid_config(tmp_path, tiny_model_dir, pairs_file)
    for command in ("run", "status"):  # status describes nothing the run would refuse
        assert main([command, str(cfg), override]) == 2
        captured = capsys.readouterr()
        assert one_line_error(captured.err).startswith(start), captured.err
        assert captured.out == ""
        assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_exits_2(tmp_path, tiny_model_dir, pairs_file, capsys):
    cfg = valid_config(tmp_path, tiny_model_dir, pairs_file)
    assert main(["run", str(cfg), f"output_dir={cfg}"]) == 2
    assert (
        one_line_error(capsys.readouterr().err)
        == f"output_dir: {cfg} is a file, not a folder; choose another output_dir"
    )


@pytest.mark.parametrize("folder", ["alpha=3", "a/b=c=d"])
def test_config_path_with_an_equals_sign(tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch, folder):
    """Sweep folders (hydra style) hold `=`: the first argument is still the config."""
    cfg = valid_config(tmp_path / "sweep" / folder, tiny_model_dir, pairs_file)
    monkeypatch.chdir(tmp_path)
    assert main(["status", str(cfg.relative_to(tmp_path)), "alpha=2"]) == 0
    assert "instruct" in capsys.readouterr().out
    assert main(["status", f"sweep/{folder}/missing.yaml"]) == 2
    assert one_line_error(capsys.readouterr().err) == f"config file not found: sweep/{folder}/missing.yaml"


def test_non_utf8_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("instructions:\n  preferred: caf\xe9\n".encode("latin-1"))
    assert main(["status", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"{cfg}, line 2: not UTF-8 text")


def test_repeated_key_exits_2(tmp_path, tiny_model_dir, pairs_file, capsys):
    cfg = valid_config(tmp_path, tiny_model_dir, pairs_file)
    cfg.write_text(cfg.read_text() + "alpha: 1.0\nalpha: 2.0\n")
    assert main(["run", str(cfg)]) == 2
    assert "key 'alpha' repeated" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_status_into_a_closed_pipe_exits_quietly(tmp_path, tiny_model_dir, pairs_file):
    """`rahf status c.yaml | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    cfg = valid_config(tmp_path, tiny_model_dir, pairs_file)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rahf.cli", "status", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # every write to stdout now fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == ""


def test_sigterm_removes_the_half_written_stage_and_exits_143(
    tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch
):
    """A batch system's time limit (SIGTERM) ends a run as Ctrl-C does: the stage being written is removed, one line,
    and 128 + 15; the handler is the one before once the command returns."""
    import os
    import signal

    from rahf import pipeline
    from rahf.cli import main

    def terminated(cfg, tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setitem(pipeline._STAGES, "sft", terminated)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\nmethod: sft\n")
    before = signal.getsignal(signal.SIGTERM)
    assert main(["sft", str(cfg)]) == 143
    err = capsys.readouterr().err.strip()
    assert err == f"rahf: terminated; {out / 'sft'} (half-written) was removed, finished stages are kept"
    assert [p.name for p in out.iterdir()] == [".rahf.lock"]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, vocab) -> Path:
    """A tiny GPT-2: a learned table of 64 absolute positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rahf.demo.tiny import build_tokenizer

    tok = build_tokenizer(vocab)
    folder = tmp_path_factory.mktemp("gpt2") / "model"
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok), **ids)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_adapter_dir(gpt2_dir) -> Path:
    """A LoRA adapter on the tiny GPT-2, in its own folder (as a `generate.model`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = gpt2_dir.parent / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir), LoraConfig(r=2, target_modules=["c_attn"]))
    model.save_pretrained(folder)
    shutil.copy(gpt2_dir / "tokenizer.json", folder)  # generate reads the tokenizer beside the adapter
    shutil.copy(gpt2_dir / "tokenizer_config.json", folder)
    return folder


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.max_response_length=40"], "data.max_prompt_length + data.max_response_length: 72 tokens exceed the 64"),
        (["stages=[reward]"], "reward.max_length: 512 tokens exceed the 64"),
        (
            ["method=sft", "stages=[generate]", "generate.max_new_tokens=33"],
            "data.max_prompt_length + generate.max_new_tokens: 65",
        ),
        (  # a generate.model with its own table, beside a model without one (LLaMA)
            ["model={tiny}", "generate.model={gpt2}", "method=sft", "stages=[generate]", "generate.max_new_tokens=33"],
            "data.max_prompt_length + generate.max_new_tokens: 65 tokens exceed the 64 positions of {gpt2}",
        ),
        (  # an adapter reads its base's table
            [
                "model={tiny}",
                "generate.model={adapter}",
                "method=sft",
                "stages=[generate]",
                "generate.max_new_tokens=33",
            ],
            "data.max_prompt_length + generate.max_new_tokens: 65 tokens exceed the 64 positions of {adapter}",
        ),
        (
            ["method=rlhf-ppo", "stages=[reward,instruct]", "reward.max_length=56", "ppo.max_new_tokens=40"],
            "+ ppo.max_new_tokens: 72 tokens",
        ),
    ],
)
def test_sequences_longer_than_a_learned_position_table_exit_2(
    tmp_path, gpt2_dir, gpt2_adapter_dir, tiny_model_dir, pairs_file, capsys, overrides, message
):
    """GPT-2 indexes a table of n_positions rows: a longer sequence would end a stage in an IndexError."""
    overrides = [o.format(tiny=tiny_model_dir, gpt2=gpt2_dir, adapter=gpt2_adapter_dir) for o in overrides]
    message = message.format(gpt2=gpt2_dir, adapter=gpt2_adapter_dir)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what color is a banana ?"}])
    cfg.write_text(
        f"model: {gpt2_dir}\nmethod: dual\noutput_dir: {out}\nlayers: [1]\nwindow: 8\ndata:\n  path: {pairs_file}\n"
        f"  max_prompt_length: 32\n  max_response_length: 24\ngenerate:\n  prompts: {prompts}\n"
    )
    assert main(["run", str(cfg), *overrides]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert message in error and "max_position_embeddings" in error, error
    assert nothing_written(out)


def test_position_limit_is_the_configured_count_and_only_for_learned_tables():
    """OPT's table has 2 extra rows (an offset); rotary models (LLaMA) have no table and no limit."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    from rahf.models import learned_position_limit

    opt = OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16)
    assert learned_position_limit(OPTConfig(**opt.to_dict() | {"max_position_embeddings": 40})) == 40
    assert learned_position_limit(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=24)) == 24
    llama = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    assert learned_position_limit(llama) is None
    # RoBERTa as a decoder numbers positions from padding_idx + 1: 20 rows read 18 tokens, not 20
    from transformers import RobertaConfig, RobertaForCausalLM

    roberta = RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20, pad_token_id=1, is_decoder=True,
    )  # fmt: skip
    assert learned_position_limit(roberta) == 18
    model = RobertaForCausalLM(roberta).eval()
    model(input_ids=torch.full((1, 18), 5))
    with pytest.raises((IndexError, RuntimeError), match="out of"):
        model(input_ids=torch.full((1, 19), 5))
    # a multimodal model's vision tower has a table for its image patches (Gemma 3: 196), not for the text
    from transformers import AutoConfig

    assert learned_position_limit(AutoConfig.for_model("gemma3")) is None


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_half_written_stage(
    tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch
):
    from rahf import pipeline
    from rahf.cli import main

    def interrupted(cfg, tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline._STAGES, "sft", interrupted)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {out}\nmethod: sft\n")
    assert main(["sft", str(cfg)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"rahf: interrupted; {out / 'sft'} (half-written) was removed, finished stages are kept"
    assert [p.name for p in out.iterdir()] == [".rahf.lock"]  # only the (released) lock of the run


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory, vocab) -> Path:
    """A tiny Qwen3.5 text model: blocks 0-2 linear attention (no q_proj/v_proj), block 3 full attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rahf.demo.tiny import build_tokenizer

    tok = build_tokenizer(vocab)
    folder = tmp_path_factory.mktemp("qwen35") / "model"
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "head_dim": 16}
    config = AutoConfig.for_model(
        "qwen3_5_text", vocab_size=len(tok), num_attention_heads=2, num_key_value_heads=1, **sizes, **ids
    )
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["instruct.lora.target_modules=[qproj]"],
            (
                "instruct.lora.target_modules: qproj matches no module in the model's blocks; set "
                "instruct.lora.target_modules to names of their layers: q_proj, k_proj, v_proj, o_proj, gate_proj"
            ),
        ),
        (  # PEFT adapts q_proj and passes over the misspelt name in silence
            ["align.lora.target_modules=[q_proj,vproj]"],
            "align.lora.target_modules: 'vproj' matches no module in blocks 0..1;",
        ),
        (["method=dpo", "dpo.lora.target_modules=[lm_heads]"], "dpo.lora.target_modules: lm_heads matches no"),
        (["method=rlhf-ppo", "ppo.lora.target_modules=[x]"], "ppo.lora.target_modules: x matches no"),
        (  # the tiny model ties its embeddings to its output layer: a merged adapter would change both
            ["instruct.lora.target_modules=[q_proj,embed_tokens]"],
            "instruct.lora.target_modules: adapts the input embeddings, which this model shares with its output layer",
        ),
        (
            ["method=dpo", "dpo.lora.target_modules=[q_proj,lm_head]"],
            "dpo.lora.target_modules: adapts the output layer, which this model shares with its input embeddings",
        ),
    ],
)
def test_lora_targets_the_model_lacks_exit_2(tmp_path, tiny_model_dir, pairs_file, capsys, overrides, message):
    """A LoRA target PEFT cannot find would stop its stage with a traceback, after earlier stages trained."""
    out = tmp_path / "out"
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit", instruct__finetune="lora")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(settings | {"stages": ["sft", "reward", "instruct", "collect", "align"]}))
    assert main(["run", str(cfg), *overrides]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert message in error, error
    assert nothing_written(out)


def test_lora_on_a_hybrid_model_names_its_layers_or_notes_the_blocks_left_out(tmp_path, hybrid_dir, pairs_file, capsys):
    """Qwen3.5 has q_proj/v_proj only in its full-attention blocks (every 4th): align under layer 2 would adapt
    nothing; under layer 4 it adapts one of four blocks, which the run says before training."""
    out = tmp_path / "out"
    settings = run_settings(hybrid_dir, pairs_file, out, "scit") | {"stages": ["instruct", "collect", "align"]}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(settings | {"layers": [1, 2]}))
    assert main(["run", str(cfg)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert error.startswith("align.lora.target_modules: q_proj, v_proj (the default) match no module in blocks 0..1")
    assert (
        "no module in blocks 0..1; set align.lora.target_modules to names of their layers: out_proj, in_proj_qkv"
        in error
    )
    assert nothing_written(out)

    cfg.write_text(yaml.safe_dump(settings | {"layers": [4], "stages": ["align"]}))
    from rahf import preflight

    preflight.check_lora(load_config(cfg), ["align"])
    printed = capsys.readouterr().out
    assert "align.lora adapts 1 of 4 blocks (q_proj, v_proj): block(s) 0, 1, 2 have none of these modules" in printed
    cfg.write_text(
        yaml.safe_dump(
            settings
            | {"layers": [4], "align": settings["align"] | {"lora": {"target_modules": ["q_proj", "in_proj_qkv"]}}}
        )
    )
    preflight.check_lora(load_config(cfg), ["align"])
    assert capsys.readouterr().out == ""


def test_lora_unset_on_an_architecture_peft_has_no_default_for_says_so():
    """Phi-3 fuses q, k and v in qkv_proj, and PEFT knows no default targets for it."""
    from transformers import Phi3Config

    from rahf.config import LoraSettings
    from rahf.models import meta_model
    from rahf.training import check_lora_targets

    config = Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with pytest.raises(
        ConfigError,
        match="^instruct.lora.target_modules: unset, and PEFT has no default for phi3 "
        "models; set instruct.lora.target_modules to names of their layers: o_proj, qkv_proj, ",
    ):
        check_lora_targets(meta_model(config), LoraSettings(), "instruct.lora")
    assert check_lora_targets(meta_model(config), LoraSettings(target_modules=["qkv_proj"]), "instruct.lora") is None
    untied = LoraSettings(target_modules=["qkv_proj", "embed_tokens", "lm_head"])  # Phi-3 has its own output layer
    assert check_lora_targets(meta_model(config), untied, "instruct.lora") is None


def test_a_stage_command_without_the_method_its_upstream_was_made_for_says_which_to_pass(
    dual_run, tiny_model_dir, pairs_file, tmp_path, capsys
):
    """`rahf instruct --method dual` then a plain `rahf collect` (the config says scit): the error names the method,
    and `--method dual` on the next command builds on what is there."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dual_run.output_dir, out)
    settings = run_settings(tiny_model_dir, pairs_file, out, "scit")
    cfg = tmp_path / "scit.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    assert main(["collect", str(cfg), "--skip-fresh"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert (
        "this run's method is scit, and the instruct artifact was made for method dual: pass `--method dual` to build "
        "on it, or run `rahf instruct` for scit"
    ) in err
    shutil.rmtree(out / "merged")  # an artifact of the run it meant is missing: the same hint
    settings["generate"] = {"prompts": str(pairs_file)}
    cfg.write_text(yaml.safe_dump(settings))
    assert main(["generate", str(cfg)]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert err.endswith("the instruct artifact there was made for method dual: pass `--method dual` to build on it")
    for method in ("dual", "rahf-dual"):  # the alias too, as method=rahf-dual
        assert main(["status", str(cfg), "--method", method]) == 0
        status = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
        assert status["instruct"].startswith("fresh") and status["collect"].startswith("fresh")
    # a key of transformers' that it renamed: told in rahf's words (the library's own notice is silenced)
    assert main(["status", str(cfg), "--method", "dual", "align.train.gradient_checkpointing=true"]) == 0
    assert capsys.readouterr().out.startswith(
        "[rahf] note: align.train.gradient_checkpointing: transformers 5 calls it activation_checkpointing"
    )


def test_a_stage_command_after_an_hir_step_1_says_to_pass_method_hir(tiny_model_dir, pairs_file, tmp_path, capsys):
    """HIR's step 1 is SCIT's (its manifest records SCIT's settings), so `rahf instruct --method hir` then a plain
    `rahf generate` (the config says scit) finds no merged model: the hint names hir, the method the run was made
    with, not scit."""
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit")
    settings["generate"] = {"prompts": str(pairs_file)}
    cfg = tmp_path / "scit.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    assert main(["instruct", str(cfg), "--method", "hir"]) == 0
    capsys.readouterr()
    assert main(["generate", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err).endswith(
        "no finished merge artifact; run `rahf merge` (or `rahf run`) first; the instruct artifact there was made for "
        "method hir: pass `--method hir` to build on it"
    )
    assert main(["status", str(cfg), "--method", "hir"]) == 0
    status = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert status["instruct"].startswith("fresh")  # what `--method hir` builds on


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("")
    assert main(["demo", "--quick", "--out", str(tmp_path / "f.txt")]) == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "f.txt").read_text() == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label-noise", "1.5"], "--label-noise: must be in [0, 1), got 1.5"),
        (["--seed", "-1"], "--seed: must be in [0, 4294967295], got -1"),
    ],
)
def test_demo_flags_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    from rahf.demo.run import MARKER

    out = tmp_path / "demo"
    out.mkdir()
    (out / MARKER).write_text("")
    (out / "results.json").write_text("{}")  # an earlier demo's
    assert main(["demo", "--quick", "--out", str(out), *flags]) == 2
    assert one_line_error(capsys.readouterr().err) == message
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "results.json"]
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.parametrize("stage", ["sft", "reward", "instruct"])
def test_a_stage_command_outside_stages_without_data_path_names_the_key(tiny_model_dir, tmp_path, capsys, stage):
    settings = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), "stages": ["generate"]}
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    generate = {"prompts": "p.jsonl", "model": str(tiny_model_dir)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings | {"generate": generate}))
    assert main([stage, str(tmp_path / "c.yaml")]) == 2
    assert one_line_error(capsys.readouterr().err) == "data.path: required (a preference-pair file or folder)"
    assert not (tmp_path / "out").exists()


def test_fsdp_in_one_process_is_refused_before_training_but_status_reads_the_config(
    tiny_model_dir, pairs_file, tmp_path, capsys
):
    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit")
    settings["align"] = settings.get("align", {}) | {"train": {"fsdp": "full_shard"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    assert main(["status", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("align.train.fsdp: FSDP shards a model over several")
    assert not (tmp_path / "out" / "instruct").exists()


@pytest.mark.parametrize(
    ("code", "strerror", "status", "fix"),
    [
        (28, "No space left on device", 1, "free space there (or point output_dir elsewhere) and run again"),
        (13, "Permission denied", 2, "give this user access to it (or point the setting elsewhere)"),
    ],
)
def test_a_full_disk_or_a_refused_write_is_one_line_and_leaves_nothing_half_written(
    tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys, code, strerror, status, fix
):
    import rahf.artifacts

    def refuse() -> dict:  # called as the finished stage's manifest is written
        raise OSError(code, strerror, str(out / ".instruct.tmp-x/rahf_manifest.json"))

    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_settings(tiny_model_dir, pairs_file, out, "scit", stages=["instruct"])))
    monkeypatch.setattr(rahf.artifacts, "versions", refuse)
    assert main(["run", str(cfg)]) == status
    err = capsys.readouterr().err
    assert one_line_error(err[err.index("rahf: error: ") :]) == (  # after the stage's progress bars
        f"{strerror}: {out}/.instruct.tmp-x/rahf_manifest.json; {fix}; {out / 'instruct'} (half-written) was removed, "
        "finished stages are kept"
    )
    assert not (out / "instruct").exists() and not list(out.glob(".instruct.tmp-*"))


def test_other_os_errors_keep_their_traceback(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import rahf.cli

    def fail(args) -> None:
        raise OSError(5, "Input/output error")  # not one the user can fix from a message: the traceback says where

    monkeypatch.setattr(rahf.cli, "_cmd_status", fail)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit")))
    with pytest.raises(OSError, match="Input/output error"):
        main(["status", str(cfg)])


def test_a_reward_backbone_without_a_sequence_classifier_exits_2(tmp_path, vocab, tiny_model_dir, pairs_file, capsys):
    """transformers has no sequence classifier for Granite (nor OLMoE, Llama 4): `reward` would stop after sft."""
    from transformers import AutoModelForCausalLM, GraniteConfig

    from rahf.demo.tiny import build_tokenizer

    tok = build_tokenizer(vocab)
    granite = tmp_path / "granite"
    config = GraniteConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(granite)
    tok.save_pretrained(granite)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_settings(granite, pairs_file, out, "scit") | {"stages": ["sft", "reward"]}))
    capsys.readouterr()  # the save's progress bar
    assert main(["run", str(cfg)]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"reward.model: unset, so the reward model starts from the SFT model of {granite}, a granite model, which "
        "transformers has no sequence classifier for; set reward.model to another backbone (e.g. minilm), or leave "
        "the reward stage out"
    )
    assert nothing_written(out)
    from rahf import preflight

    preflight.check_reward_backbone(load_config(cfg, [f"reward.model={tiny_model_dir}"]), ["reward"])  # a LLaMA: fine


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "give a config file: rahf run CONFIG [key=value ...] (examples/ holds some)"),
        (["status"], "give a config file: rahf status CONFIG [key=value ...] (examples/ holds some)"),
        (["run", "pairs.jsonl"], "pairs.jsonl: a data file, not a config; give a YAML config first, which names it as data.path"),
    ],
)  # fmt: skip
def test_a_command_without_its_config_says_what_it_takes(capsys, argv, message):
    assert main(argv) == 2
    assert one_line_error(capsys.readouterr().err) == message


@pytest.mark.parametrize("listed", [False, True])
def test_rahf_sft_says_first_when_the_later_stages_will_not_start_from_it(
    tmp_path, tiny_model_dir, pairs_file, capsys, monkeypatch, listed
):
    from rahf import pipeline

    def stage(cfg, tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setitem(pipeline._STAGES, "sft", stage)
    cfg = tmp_path / "c.yaml"
    stages = "stages: [sft, instruct, collect, align, merge]\n" if listed else ""
    cfg.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\noutput_dir: {tmp_path / 'out'}\n{stages}")
    assert main(["sft", str(cfg)]) == 0
    said = "stages does not list sft, so the stages after it (`rahf instruct`, `rahf run`) start from model"
    out = capsys.readouterr().out
    assert (said in out) is not listed and out.index("[rahf] sft: running") > (out.find(said) if not listed else -1)

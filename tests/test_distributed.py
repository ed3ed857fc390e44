"""`rahf run` launched as two processes (`accelerate launch`, gloo on the CPU) gives the artifacts one process gives
with the same global batch, writes each artifact once, and reads as fresh to either."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_settings, standard_records, write_jsonl
from safetensors.torch import load_file

from rahf.pipeline import FOLDERS

STAGES = ["sft", "instruct", "collect", "align", "merge", "generate"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"]


def launch(processes: int, config: Path, *overrides: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """`rahf run config` (through `script` when given) as `processes` processes (accelerate launch) or as one."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    entry = [str(script)] if script else ["-m", "rahf.cli"]
    command = [*entry, "run", str(config), *overrides]
    if processes > 1:
        port = ["--main_process_port", str(free_port()), "--dynamo_backend", "no"]
        command = [*LAUNCHER, "--num_processes", str(processes), *port, *command]
    return subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, env=env, timeout=600)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def config_files(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    folder = tmp_path_factory.mktemp("launch")
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": r["prompt"]} for r in standard_records(10, seed=5)])
    for method in ("scit", "dual"):
        cfg = run_settings(tiny_model_dir, pairs_file, folder / "unused", method)
        cfg["stages"] = STAGES
        cfg["sft"] = {"train": {"per_device_train_batch_size": 4, "disable_tqdm": True, "max_steps": 2}}
        cfg["instruct"]["train"]["per_device_train_batch_size"] = 2
        cfg["instruct"]["lora"] = {"dropout": 0.0}  # dropout masks differ with the number of processes
        cfg["align"]["train"] |= {"per_device_train_batch_size": 2, "max_steps": 8}
        cfg["collect"]["shard_size"] = 4  # 4 shards, dealt to the processes in turn
        cfg["generate"] = {"prompts": str(prompts), "max_new_tokens": 8, "temperature": 1.0, "batch_size": 3}
        (folder / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    return folder


# one process with twice the per-process batch of two processes: the same global batches, in the same order
SAME_BATCHES = [f"{s}.train.per_device_train_batch_size={n}" for s, n in (("sft", 8), ("instruct", 4), ("align", 4))]


@pytest.mark.parametrize(
    ("method", "targets", "step1"),
    [
        ("scit", "cache", "instruct/model.safetensors"),
        ("dual", "online", "instruct/preferred/adapter_model.safetensors"),
    ],
)
def test_two_processes_train_what_one_process_trains(config_files, tmp_path, method, targets, step1):
    config = config_files / f"{method}.yaml"
    two, one = tmp_path / "two", tmp_path / "one"
    launched = launch(2, config, f"output_dir={two}", f"align.targets={targets}")
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = launch(1, config, f"output_dir={one}", f"align.targets={targets}", *SAME_BATCHES)
    assert single.returncode == 0, single.stderr[-3000:]

    for stage in STAGES:  # each stage printed once (process 0), and its manifest says how many processes ran it
        assert launched.stdout.count(f"[rahf] {stage}: running") == 1
        manifest = json.loads((two / FOLDERS[stage] / "rahf_manifest.json").read_text())
        assert manifest.get("processes") == (None if stage == "merge" else 2)
    assert "rahf: error" not in launched.stderr

    assert_close(load_file(two / "sft/model.safetensors"), load_file(one / "sft/model.safetensors"), 1e-6)
    assert_close(load_file(two / step1), load_file(one / step1), 1e-6)
    shards = sorted(p.name for p in (one / "collect").glob("shard-*.safetensors"))
    assert len(shards) == 4 and sorted(p.name for p in (two / "collect").glob("shard-*.safetensors")) == shards
    for shard in shards:  # the same cut, the same tensors
        assert_close(load_file(two / "collect" / shard), load_file(one / "collect" / shard), 1e-6)
    adapter = "align/adapter_model.safetensors"
    assert_close(load_file(two / adapter), load_file(one / adapter), 1e-4)
    assert (two / "align/target_fit.json").is_file() and not list(two.glob("*.checkpoints"))
    replies = [(two / "generations/generations.jsonl").read_text(), (one / "generations/generations.jsonl").read_text()]
    assert replies[0] == replies[1] and replies[0].count("\n") == 10

    again = launch(2, config, f"output_dir={two}", f"align.targets={targets}")  # fresh for any number of processes
    assert again.returncode == 0 and again.stdout.count("up to date") == len(STAGES), again.stdout[-2000:]
    once = launch(1, config, f"output_dir={two}", f"align.targets={targets}")
    assert once.returncode == 0 and once.stdout.count("up to date") == len(STAGES), once.stdout[-2000:]


def test_a_bad_config_is_told_once_by_process_zero(config_files, tmp_path):
    launched = launch(2, config_files / "scit.yaml", f"output_dir={tmp_path / 'out'}", "alpha=nan")
    assert launched.returncode != 0
    assert launched.stderr.count("rahf: error: alpha:") == 1, launched.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_ppo_training_is_refused_under_several_processes(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    from rahf import pipeline
    from rahf.config import load_config
    from rahf.errors import ConfigError

    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "rlhf-ppo"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="method rlhf-ppo: its PPO training runs in one process"):
        pipeline.preflight(cfg)
    with pytest.raises(ConfigError, match="method rlhf-ppo: its PPO training runs in one process"):
        pipeline.preflight(cfg, "instruct")
    # the stages that do not train the policy may be launched (a fresh instruct is not trained again either)
    assert not pipeline._will_train_ppo(cfg, "reward") and not pipeline._will_train_ppo(cfg, "generate")


FAILING = """import os, sys
import rahf.collect
from rahf.errors import RahfError

def fail(*args, **kwargs):
    raise RahfError("collect: o at layer 2 is not finite in float16 (on process 1 only)")

if os.environ["RANK"] == "1":
    rahf.collect._write_shard = fail
from rahf.cli import main
sys.exit(main())
"""


def test_when_one_process_fails_each_says_so_in_one_line(config_files, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    out = tmp_path / "out"
    launched = launch(2, config_files / "scit.yaml", f"output_dir={out}", "stages=[instruct,collect]", script=script)
    assert launched.returncode != 0
    lines = re.findall(r"rahf: error.*", launched.stderr)  # after process 0's progress bar, on one stderr
    assert lines[0] == "rahf: error (process 1): collect: o at layer 2 is not finite in float16 (on process 1 only)"
    assert lines[1].startswith("rahf: error: another process stopped, so process 0 stops too (")
    assert len(lines) == 2 and "Traceback" not in launched.stderr.split("rahf: error")[1]
    assert (out / "instruct").is_dir() and not (out / "collect").exists()


def test_a_process_started_alone_is_process_zero_whatever_its_environment(monkeypatch):
    from rahf import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")  # left over from a launcher, or set for something else
    assert distributed.rank() == 0 and distributed.is_main() and distributed.world_size() == 1


def test_the_process_group_takes_the_stages_ddp_settings(tmp_path, tiny_model_dir, pairs_file):
    from rahf.config import load_config
    from rahf.errors import ConfigError
    from rahf.training import process_group_settings

    def settings(**extra):
        return load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", **extra))

    assert process_group_settings(settings()) == (1800, None)
    longer = settings(align__train__ddp_timeout=7200, sft__train={"ddp_timeout": 600, "ddp_backend": "gloo"})
    assert process_group_settings(longer) == (7200, "gloo")
    with pytest.raises(ConfigError, match=r"\*\.train\.ddp_backend: the stages name gloo and nccl; one launch uses"):
        process_group_settings(settings(sft__train={"ddp_backend": "gloo"}, dpo__train={"ddp_backend": "nccl"}))


def test_the_launchers_mixed_precision_and_compile_backend_are_not_applied_unasked(monkeypatch):
    """`accelerate launch` exports them from its flags or config file, and the Trainer would apply them to every
    stage without the config (or its fingerprints) saying so."""
    from rahf.distributed import drop_launcher_settings

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    note = (
        "the launcher's ACCELERATE_MIXED_PRECISION=bf16 is not used; mixed precision: rahf trains in `dtype` "
        "(set dtype: bfloat16, or a stage's train.bf16 / train.fp16)"
    )
    assert drop_launcher_settings() == [note]
    assert "ACCELERATE_MIXED_PRECISION" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" not in os.environ

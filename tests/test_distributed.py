"""`rahf run` launched as two processes (`accelerate launch`, gloo on the CPU) gives the artifacts one process gives
with the same global batch, and the evaluation one process gives, writes each artifact once, and reads as fresh to
either."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_settings, standard_records, write_jsonl
from safetensors.torch import load_file

from rahf.pipeline import FOLDERS

STAGES = ["sft", "instruct", "collect", "align", "merge", "generate", "evaluate"]
JUDGE_KEY = "sk-launch-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"]


def launch(
    processes: int, config: Path, *overrides: str, script: Path | None = None, command: str = "run"
) -> subprocess.CompletedProcess:
    """`rahf <command> config` (through `script` when given) as `processes` processes (accelerate launch) or as one."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    entry = [str(script)] if script else ["-m", "rahf.cli"]
    command = [*entry, command, str(config), *overrides]
    if processes > 1:
        port = ["--main_process_port", str(free_port()), "--dynamo_backend", "no"]
        command = [*LAUNCHER, "--num_processes", str(processes), *port, *command]
    return subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, env=env, timeout=600)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=atol, rtol=0, msg=key)


class JudgeServer:
    """An OpenAI-compatible chat API that prefers the longer answer (no verdict for equal lengths); it records the
    Authorization header of every request."""

    ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of", re.DOTALL)

    def __init__(self) -> None:
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.append(self.headers.get("Authorization"))
                a, b = (len(x) for _, x in sorted(server.ANSWER.findall(body["messages"][-1]["content"])))
                verdict = "[[A]]" if a > b else "[[B]]" if a < b else "no verdict"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def judge_server() -> Iterator[JudgeServer]:
    server = JudgeServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def config_files(tmp_path_factory, tiny_model_dir, pairs_file, heldout_records, tokenizer, judge_server) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("launch")
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": r["prompt"]} for r in standard_records(10, seed=5)])
    heldout = write_jsonl(folder / "heldout.jsonl", heldout_records[:7])  # shares of 4 and 3 prompts
    torch.manual_seed(0)
    scorer = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1, architectures=None)
    AutoModelForSequenceClassification.from_config(scorer).save_pretrained(folder / "rm")
    tokenizer.save_pretrained(folder / "rm")
    judges = {  # the reward model judges its share on every process; the LLM judge is asked from process 0 alone
        "scit": {"judge": "reward-model"},
        "dual": {"judge": "llm", "llm": {"base_url": judge_server.url, "model": "m", "api_key_env": "RAHF_TEST_KEY"}},
    }
    for method in ("scit", "dual"):
        cfg = run_settings(tiny_model_dir, pairs_file, folder / "unused", method)
        cfg["stages"] = STAGES
        cfg["sft"] = {"train": {"per_device_train_batch_size": 4, "disable_tqdm": True, "max_steps": 2}}
        cfg["instruct"]["train"]["per_device_train_batch_size"] = 2
        cfg["instruct"]["lora"] = {"dropout": 0.0}  # dropout masks differ with the number of processes
        cfg["align"]["train"] |= {"per_device_train_batch_size": 2, "max_steps": 8}
        cfg["collect"]["shard_size"] = 4  # 4 shards, dealt to the processes in turn
        cfg["generate"] = {"prompts": str(prompts), "max_new_tokens": 8, "temperature": 1.0, "batch_size": 3}
        cfg["evaluate"] = judges[method] | {
            "pairs": str(heldout), "judge_model": str(folder / "rm"), "samples": 2, "temperature": 1.0,
            "temperatures": [0.0, 0.5, 1.0], "max_new_tokens": 8, "batch_size": 3,
        }  # fmt: skip
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
def test_two_processes_train_and_evaluate_as_one_process_does(
    config_files, judge_server, tmp_path, monkeypatch, method, targets, step1
):
    config = config_files / f"{method}.yaml"
    monkeypatch.setenv("RAHF_TEST_KEY", JUDGE_KEY)
    judge_server.auth.clear()
    two, one = tmp_path / "two", tmp_path / "one"
    launched = launch(2, config, f"output_dir={two}", f"align.targets={targets}")
    assert launched.returncode == 0, launched.stderr[-3000:]
    trained = f"stages=[{','.join(STAGES[:-1])}]"  # evaluate is compared on the same artifacts below
    single = launch(1, config, f"output_dir={one}", f"align.targets={targets}", trained, *SAME_BATCHES)
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
    evaluation = {f.name: f.read_text() for f in (two / "evaluation").glob("*.json*") if f.name != "rahf_manifest.json"}
    shutil.rmtree(two / "evaluation")  # evaluated again by one process, on the same artifacts
    once = launch(1, config, f"output_dir={two}", f"align.targets={targets}")
    assert once.returncode == 0 and once.stdout.count("up to date") == len(STAGES) - 1, once.stdout[-2000:]

    # the same replies, verdicts and numbers: every sum runs over the gathered values in one order, so exactly equal
    assert sorted(evaluation) == ["generations.jsonl", "metrics.json"] and "[rahf] evaluate: running" in once.stdout
    assert evaluation["generations.jsonl"].count("\n") == 14  # 7 pairs x 2 samples
    assert {name: (two / "evaluation" / name).read_text() for name in evaluation} == evaluation
    metrics = json.loads(evaluation["metrics.json"])
    assert set(metrics["reward_by_temperature"]) == {"0.0", "0.5", "1.0"} and metrics["kl_per_token"] > 0
    if method == "dual":  # each comparison asked once, in both orders, by one process: 2 x 14 requests per run
        assert metrics["judge_unparsed"]["calls"] == 28 and judge_server.auth == [f"Bearer {JUDGE_KEY}"] * 56
        written = [f.read_bytes() for f in two.rglob("*") if f.is_file()]
        assert JUDGE_KEY not in launched.stdout + launched.stderr and not any(JUDGE_KEY.encode() in b for b in written)


def test_a_bad_config_is_told_once_by_process_zero(config_files, tmp_path):
    launched = launch(2, config_files / "scit.yaml", f"output_dir={tmp_path / 'out'}", "alpha=nan")
    assert launched.returncode != 0
    assert launched.stderr.count("rahf: error: alpha:") == 1, launched.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_ppo_training_is_refused_under_several_processes(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    from rahf import preflight
    from rahf.config import load_config
    from rahf.errors import ConfigError

    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "rlhf-ppo"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="method rlhf-ppo: its PPO training runs in one process"):
        preflight.preflight(cfg)
    with pytest.raises(ConfigError, match="method rlhf-ppo: its PPO training runs in one process"):
        preflight.preflight(cfg, "instruct")
    # the stages that do not train the policy may be launched (a fresh instruct is not trained again either)
    assert not preflight._will_train_ppo(cfg, "reward") and not preflight._will_train_ppo(cfg, "generate")


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


def test_split_gives_each_process_its_share_and_every_process_all_results_in_order(monkeypatch):
    from rahf import distributed

    assert distributed.split(5, lambda mine: [10 * i for i in mine]) == [0, 10, 20, 30, 40]  # one process: all
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    others = {0: [0, 3, 6], 2: [2, 5]}  # what processes 0 and 2 send, as gather brings it
    monkeypatch.setattr(
        distributed, "gather", lambda mine: [(others[0], [f"r{i}" for i in others[0]]), mine, (others[2], ["r2", "r5"])]
    )
    asked = []
    assert distributed.split(7, lambda mine: asked.append(mine) or [f"r{i}" for i in mine]) == [
        f"r{i}" for i in range(7)
    ]
    assert asked == [[1, 4]]
    with pytest.raises(ValueError, match="1 results for 2 items"):
        distributed.split(7, lambda mine: ["r1"])


@pytest.mark.parametrize(("n", "world", "batch"), [(14, 2, 2), (13, 2, 4), (5, 3, 1), (16, 2, 2)])
def test_a_last_step_the_examples_do_not_fill_is_told_with_what_accelerate_repeats(n, world, batch, capsys):
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from rahf.training import uneven_note

    seen = [
        i
        for rank in range(world)
        for b in BatchSamplerShard(BatchSampler(SequentialSampler(range(n)), batch, False), world, rank)
        for i in b
    ]
    args = SimpleNamespace(world_size=world, per_device_train_batch_size=batch, dataloader_drop_last=False)
    uneven_note(args, n, "align")
    note = capsys.readouterr().out
    repeated = len(seen) - n
    assert sorted(set(seen)) == list(range(n))
    assert (f"accelerate repeats {repeated} of them" in note) if repeated else note == ""
    uneven_note(SimpleNamespace(**vars(args) | {"world_size": 1}), n, "align")
    uneven_note(SimpleNamespace(**vars(args) | {"dataloader_drop_last": True}), n, "align")
    assert capsys.readouterr().out == ""


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


LIBRARY = """import sys
import rahf
config, *overrides = sys.argv[2:]  # sys.argv[1] is the command name `launch` passes
rahf.run(rahf.load_config(config, overrides))
"""


def test_a_program_calling_the_library_under_the_launcher_joins_its_processes(config_files, tmp_path):
    """`rahf.run` in a script started by `accelerate launch` joins the process group as `rahf run` does (it failed
    with an IndexError: no process group)."""
    script = tmp_path / "sweep.py"
    script.write_text(LIBRARY)
    out = tmp_path / "out"
    launched = launch(2, config_files / "scit.yaml", f"output_dir={out}", "stages=[instruct]", script=script)
    assert launched.returncode == 0, launched.stderr[-3000:]
    manifest = json.loads((out / "instruct" / "rahf_manifest.json").read_text())
    assert manifest["processes"] == 2

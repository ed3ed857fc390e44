"""Wall time of each stage of a SCIT run as one process and as several (`accelerate launch`), same global batch.

Builds a LLaMA-style model from scratch (no download) and the demo task's pairs, then runs
`rahf run` (instruct, collect, align, merge, generate) once as one process and once launched as `--processes` processes,
each with a share of the batch so that every optimiser step sees the same examples. Prints each stage's seconds
(from its manifest) and how far the two runs' weights differ (LoRA dropout is off: its masks are drawn per process). On a CPU the processes share its cores:
give one process all of them (`torch` threads) and each of N processes 1/N, as a GPU machine gives each its own.

Usage: python benchmarks/processes.py --out DIR [--processes 2] [--pairs 1024] [--hidden 256] [--layers 6]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

STAGES = ["instruct", "collect", "align", "merge", "generate"]
FOLDERS = {"merge": "merged", "generate": "generations"}


def config(root: Path, pairs: Path, prompts: Path, model: Path, batch: int) -> dict:
    from rahf.demo.task import INSTRUCTIONS

    train = {"per_device_train_batch_size": batch, "disable_tqdm": True, "logging_steps": 1000}
    return {
        "model": str(model),
        "method": "scit",
        "output_dir": str(root / "unused"),
        "layers": [3, 4],
        "instructions": dict(INSTRUCTIONS),
        "alpha": 5.0,
        "window": 32,
        "stages": STAGES,
        "data": {"path": str(pairs), "max_prompt_length": 64, "max_response_length": 48},
        "instruct": {"finetune": "lora", "train": train | {"num_train_epochs": 1}, "lora": {"dropout": 0.0}},
        "collect": {"dtype": "float32", "batch_size": 16},
        "align": {"train": train | {"num_train_epochs": 2}, "lora": {"dropout": 0.0}},
        "generate": {"prompts": str(prompts), "max_new_tokens": 32, "batch_size": 32},
    }


def run(processes: int, threads: int, cfg: Path, out: Path) -> float:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "rahf.cli", "run", str(cfg), f"output_dir={out}"]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command = [sys.executable, *launcher, "--main_process_port", str(port), *command[1:]]
    t0 = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.time() - t0


def largest_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="examples per optimiser step (split over the processes)")
    args = ap.parse_args()
    if args.batch % args.processes:
        ap.error("--batch must be a multiple of --processes")

    from rahf.demo.task import make_task, vocabulary
    from rahf.demo.tiny import save_tiny

    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    task = make_task(n_sft=0, n_pairs=args.pairs, n_val=0, n_test=256, seed=0)
    pairs, prompts = root / "pairs.jsonl", root / "prompts.jsonl"
    keys = ("prompt", "chosen", "rejected")
    pairs.write_text("".join(json.dumps({k: p[k] for k in keys}) + "\n" for p in task.pairs))
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in task.test))
    model = save_tiny(root / "model", vocabulary(), hidden=args.hidden, layers=args.layers, heads=4)
    cores = torch.get_num_threads()
    rows = {}
    for n in (1, args.processes):
        cfg = root / f"run-{n}.yaml"
        cfg.write_text(yaml.safe_dump(config(root, pairs, prompts, model, args.batch // n)))
        wall = run(n, max(1, cores // n), cfg, root / f"out-{n}")
        seconds = {
            s: json.loads((root / f"out-{n}" / FOLDERS.get(s, s) / "rahf_manifest.json").read_text())["seconds"]
            for s in STAGES
        }
        rows[n] = (wall, seconds)
    print(f"{args.pairs} pairs, hidden {args.hidden}, {args.layers} blocks, {cores} cores, batch {args.batch} per step")
    print("| processes (threads each) | " + " | ".join(STAGES) + " | whole command |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for n, (wall, seconds) in rows.items():
        cells = " | ".join(f"{seconds[s]:.1f} s" for s in STAGES)
        print(f"| {n} ({max(1, cores // n)}) | {cells} | {wall:.1f} s |")
    one, many = root / "out-1", root / f"out-{args.processes}"
    for name in ("instruct/adapter_model.safetensors", "align/adapter_model.safetensors"):
        print(f"largest difference, {name}: {largest_difference(one / name, many / name):.2e}")
    same = (one / "generations/generations.jsonl").read_text() == (many / "generations/generations.jsonl").read_text()
    print(f"replies identical: {same}")


if __name__ == "__main__":
    main()

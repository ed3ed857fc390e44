"""Shared fixtures: a tiny word-level model, a small preference file and one finished run per method.

Everything is built locally (no network) and sized for a 2-core CPU: a 4-block LLaMA with hidden size
32, 16 TRL-standard pairs from the demo task, and a few optimiser steps per stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from threads, and on a shared 2-core box a second busy thread makes every
# small op wait for it (measured: 0.77 s vs 0.006 s per alignment step).
torch.set_num_threads(1)

from rahf.demo.task import INSTRUCTIONS, make_task, vocabulary

N_PAIRS = 16
LAYERS = [1, 2]
WINDOW = 8
ALPHA = 5.0
ALIGN_STEPS = 40


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def standard_records(n: int, seed: int) -> list[dict]:
    """TRL-standard {"prompt", "chosen", "rejected"} records of the demo's colour task."""
    pairs = make_task(n_sft=0, n_pairs=n, n_val=0, n_test=0, seed=seed).pairs
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]


@pytest.fixture(scope="session")
def vocab() -> list[str]:
    return vocabulary()


@pytest.fixture(scope="session")
def tokenizer(vocab):
    from rahf.demo.tiny import build_tokenizer

    return build_tokenizer(vocab)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, vocab) -> Path:
    from rahf.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", vocab, hidden=32, layers=4, heads=2)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", standard_records(N_PAIRS, seed=0))


@pytest.fixture(scope="session")
def heldout_records() -> list[dict]:
    """Pairs that never reach the data file (different task seed, duplicates of training prompts removed)."""
    train = {(r["prompt"], r["chosen"]) for r in standard_records(N_PAIRS, seed=0)}
    return [r for r in standard_records(12, seed=123) if (r["prompt"], r["chosen"]) not in train][:8]


def run_settings(model: Path, data: Path, out: Path, method: str, **extra) -> dict:
    """A complete, tiny config as a mapping for `load_config(None, ...)`."""
    train = {"per_device_train_batch_size": 4, "disable_tqdm": True, "logging_steps": 1}
    cfg = {
        "model": str(model),
        "method": method,
        "output_dir": str(out),
        "layers": list(LAYERS),
        "alpha": ALPHA,
        "window": WINDOW,
        "data": {"path": str(data), "max_prompt_length": 32, "max_response_length": 24},
        "instructions": dict(INSTRUCTIONS),
        "instruct": {"train": train | {"max_steps": 2, "learning_rate": 1e-3}},
        "collect": {"dtype": "float32", "batch_size": 4},
        "align": {
            "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
            "train": train | {"max_steps": ALIGN_STEPS, "learning_rate": 2e-2},
        },
    }
    for dotted, value in extra.items():
        node = cfg
        *heads, last = dotted.split("__")
        for k in heads:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


def _finished_run(tmp_path_factory, model, data, method):
    from rahf import pipeline
    from rahf.config import load_config

    out = tmp_path_factory.mktemp(f"run-{method}") / "out"
    cfg = load_config(None, run_settings(model, data, out, method))
    pipeline.run(cfg)
    return cfg


@pytest.fixture(scope="session")
def scit_run(tmp_path_factory, tiny_model_dir, pairs_file):
    """A finished SCIT run (instruct, collect, align, merge); treat it as read-only."""
    return _finished_run(tmp_path_factory, tiny_model_dir, pairs_file, "scit")


@pytest.fixture(scope="session")
def dual_run(tmp_path_factory, tiny_model_dir, pairs_file):
    """A finished Dual run (two LoRA adapters on one base); treat it as read-only."""
    return _finished_run(tmp_path_factory, tiny_model_dir, pairs_file, "dual")


@pytest.fixture(params=["scit", "dual"])
def finished_run(request):
    return request.getfixturevalue(f"{request.param}_run")

"""`rahf demo`: the whole pipeline on the built-in task, judged exactly, in minutes on a CPU.

It builds a tokenizer and a tiny LLaMA from scratch, trains it (SFT) to give a realistic mix of good
and bad replies, runs RAHF-SCIT and RAHF-Dual, chooses layers and alpha on validation prompts only,
and compares on held-out test prompts with the gold judge: win rate against the chosen responses,
ties counting half. Replies are sampled (temperature 1), so a model is judged on its distribution,
not on its single most likely reply.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import load_config
from ..generate import generate
from ..models import load_tokenizer
from .task import INSTRUCTIONS, DemoData, Fact, gold_score, judge, make_task, vocabulary
from .tiny import save_tiny


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo flavour."""

    n_sft: int
    n_pairs: int
    n_val: int
    n_test: int
    samples: int  # sampled replies per prompt
    sft_epochs: int
    instruct_epochs: int
    align_steps: int
    layer_sets: tuple[tuple[int, ...], ...]
    alphas: tuple[float, ...]
    hidden: int = 128  # model width
    n_layers: int = 4  # decoder blocks


FULL = Scale(4000, 2000, 100, 200, 4, 8, 3, 150, ((2, 3), (3,)), (0.1, 0.25, 0.5, 1.0))
QUICK = Scale(2000, 600, 25, 200, 1, 4, 2, 40, ((2, 3),), (0.25,))
MAX_NEW_TOKENS = 24


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _config(out: Path, data_dir: Path, model: str, method: str, layers: list[int], scale: Scale, seed: int):
    quiet = {"disable_tqdm": True, "logging_steps": 25}
    return load_config(
        None,
        {
            "model": model,
            "method": method,
            "output_dir": str(out),
            "seed": seed,
            "stages": ["instruct", "collect"],
            "layers": layers,
            "window": 16,
            "include_boundary": True,
            "instructions": INSTRUCTIONS,
            "data": {
                "path": str(data_dir / "pairs.jsonl"),
                "share_pairs": True,
                "max_prompt_length": 48,
                "max_response_length": 24,
            },
            "sft": {
                "path": str(data_dir / "sft.jsonl"),
                "train": quiet
                | {"learning_rate": 1e-3, "num_train_epochs": scale.sft_epochs, "per_device_train_batch_size": 32}
                | {"lr_scheduler_type": "cosine", "warmup_steps": 30},
            },
            "instruct": {
                "lora": {
                    "r": 16,
                    "alpha": 32,
                    "dropout": 0.0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                },
                "train": quiet
                | {"learning_rate": 1e-3 if method == "dual" else 3e-4, "num_train_epochs": scale.instruct_epochs}
                | {"per_device_train_batch_size": 32 if method == "dual" else 16},
            },
            "collect": {"dtype": "float16", "batch_size": 64},
            "align": {
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "train": quiet
                | {"learning_rate": 1e-3, "max_steps": scale.align_steps, "per_device_train_batch_size": 32},
            },
        },
    )


def _score(items: list[dict], replies: list[str], samples: int) -> dict:
    """Gold win rate against the chosen replies (ties half), its 95% interval, mean gold score."""
    wins, scores = [], []
    for k, reply in enumerate(replies):
        it = items[k // samples]
        fact = Fact(**it["fact"])
        wins.append(judge(fact, reply, it["chosen"]))
        scores.append(gold_score(fact, reply))
    n = len(wins)
    rate = sum(wins) / n
    half = 1.96 * math.sqrt(max(rate * (1 - rate), 1e-9) / n)
    return {
        "win_rate": round(rate, 4),
        "ci95": [round(max(0.0, rate - half), 4), round(min(1.0, rate + half), 4)],
        "mean_gold_score": round(sum(scores) / n, 4),
        "unparseable": round(sum(s < 0 for s in scores) / n, 4),
        "n": n,
    }


def _sample(model, tokenizer, items: list[dict], samples: int, seed: int, system: str | None = None) -> list[str]:
    prompts = [[{"role": "user", "content": it["prompt"]}] for it in items for _ in range(samples)]
    return generate(
        model, tokenizer, prompts, MAX_NEW_TOKENS, temperature=1.0, batch_size=256,
        max_prompt_length=48, system=system, seed=seed, progress=False,
    )  # fmt: skip


def _aligned(cfg, work: Path, layers: list[int], alpha: float):
    """Train an alignment adapter on `cfg`'s cache and return the merged model."""
    from peft import PeftModel

    from ..align import train_align
    from ..pipeline import load_policy

    if work.exists():
        shutil.rmtree(work)
    train_align(cfg, work, layers, alpha)
    return PeftModel.from_pretrained(load_policy(cfg), str(work)).merge_and_unload().eval()


def run_demo(out: Path, quick: bool = False, label_noise: float = 0.0, seed: int = 0) -> dict:
    """Run the demo into `out`; writes report.md and results.json and returns the results."""
    from .. import pipeline
    from ..training import load_stage_model

    t0 = time.time()
    scale = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    task: DemoData = make_task(scale.n_sft, scale.n_pairs, scale.n_val, scale.n_test, label_noise, seed)
    _write_jsonl(data_dir / "sft.jsonl", task.sft)
    _write_jsonl(data_dir / "pairs.jsonl", [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in task.pairs])
    _write_jsonl(data_dir / "validation.jsonl", task.validation)
    _write_jsonl(data_dir / "test.jsonl", task.test)
    if not (out / "base" / "config.json").is_file():
        save_tiny(out / "base", vocabulary(), hidden=scale.hidden, layers=scale.n_layers, heads=4, seed=seed)
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        print(f"[demo] {name}: {timings[name]}s", flush=True)
        return time.time()

    all_layers = sorted({layer for s in scale.layer_sets for layer in s})
    sft_cfg = _config(out, data_dir, str(out / "base"), "scit", all_layers, scale, seed)
    sft_cfg.stages = ["sft"]
    t = time.time()
    sft_dir = pipeline.run_stage(sft_cfg, "sft")
    t = tick("sft", t)
    cfgs = {m: _config(out / m, data_dir, str(sft_dir), m, all_layers, scale, seed) for m in ("scit", "dual")}
    for method, cfg in cfgs.items():  # so `rahf status|run DIR/<method>/config.yaml` work on the demo's runs
        (out / method).mkdir(exist_ok=True)
        (out / method / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for method, cfg in cfgs.items():
        pipeline.run(cfg)
        t = tick(f"{method} instruct+collect", t)

    tokenizer = load_tokenizer(str(sft_dir))
    results: dict = {"methods": {}, "selection": {}}
    models = {
        "sft": (load_stage_model(sft_dir, cfgs["scit"]), None),
        "preferred-sft": (load_stage_model(out / "dual" / "instruct", cfgs["dual"], adapter="preferred"), None),
        "hir": (load_stage_model(out / "scit" / "instruct", cfgs["scit"]), INSTRUCTIONS["preferred"]),
    }
    for method in ("scit", "dual"):
        cfg, sweep, best = cfgs[method], [], None
        for layers in scale.layer_sets:
            for alpha in scale.alphas:
                model = _aligned(cfg, out / method / "sweep", list(layers), alpha)
                val = _score(
                    task.validation, _sample(model, tokenizer, task.validation, scale.samples, seed), scale.samples
                )
                sweep.append({"layers": list(layers), "alpha": alpha, "val_win_rate": val["win_rate"]})
                print(
                    f"[demo] rahf-{method} layers={list(layers)} alpha={alpha}: validation win rate {val['win_rate']}",
                    flush=True,
                )
                if best is None or val["win_rate"] > best[0]:
                    best = (val["win_rate"], list(layers), alpha, model)
        _, layers, alpha, model = best
        results["selection"][f"rahf-{method}"] = {"layers": layers, "alpha": alpha, "sweep": sweep}
        models[f"rahf-{method}"] = (model, None)
        shutil.rmtree(out / method / "sweep", ignore_errors=True)
        model.save_pretrained(out / method / "merged")
        tokenizer.save_pretrained(out / method / "merged")
        t = tick(f"{method} layer/alpha selection", t)

    samples_dir = out / "generations"
    samples_dir.mkdir(exist_ok=True)
    for name, (model, system) in models.items():
        replies = _sample(model, tokenizer, task.test, scale.samples, seed + 1, system)
        results["methods"][name] = _score(task.test, replies, scale.samples)
        _write_jsonl(samples_dir / f"{name}.jsonl", [
            {"prompt": task.test[k // scale.samples]["prompt"], "response": r} for k, r in enumerate(replies)
        ])  # fmt: skip
    t = tick("test generation", t)
    results["task"] = {
        "label_noise": label_noise, "seed": seed, "quick": quick, "n_sft": scale.n_sft, "n_pairs": scale.n_pairs,
        "n_test_prompts": scale.n_test, "samples_per_prompt": scale.samples, "temperature": 1.0,
        "chosen_mean_gold_score": round(sum(gold_score(Fact(**it["fact"]), it["chosen"]) for it in task.test) / len(task.test), 4),
    }  # fmt: skip
    results["timings_s"] = timings | {"total": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report(results, samples_dir))
    print(
        f"[demo] wrote {out / 'report.md'} and {out / 'results.json'} in {results['timings_s']['total']}s", flush=True
    )
    return results


def report(results: dict, samples_dir: Path) -> str:
    """Markdown: the results table, the alpha sweep and sample replies."""
    m = results["methods"]
    lines = [
        "# rahf demo report",
        "",
        f"Gold-judged win rate against the chosen test responses (ties count half), {results['task']['n_test_prompts']} "
        f"held-out prompts x {results['task']['samples_per_prompt']} sampled replies (temperature 1). "
        f"Gold score: 2 x correct colour + polite opener + polite closing (-1 if malformed); "
        f"chosen responses average {results['task']['chosen_mean_gold_score']}.",
        "",
        "| method | win rate | 95% interval | mean gold score | malformed | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in m.items():
        lines.append(
            f"| {name} | {r['win_rate']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['mean_gold_score']:.3f} "
            f"| {r['unparseable']:.3f} | {r['n']} |"
        )
    lines += ["", "## RAHF against its own step-1 model", ""]
    for rahf, step1 in (("rahf-scit", "hir"), ("rahf-dual", "preferred-sft")):
        if rahf in m and step1 in m:
            d = m[rahf]["win_rate"] - m[step1]["win_rate"]
            lines.append(
                f"- {rahf}: {m[rahf]['win_rate']:.3f} vs {step1} {m[step1]['win_rate']:.3f} ({d:+.3f}); vs sft {m[rahf]['win_rate'] - m['sft']['win_rate']:+.3f}"
            )
    lines += [
        "",
        "## Layer and alpha selection (validation prompts only)",
        "",
        "| method | layers | alpha | validation win rate |",
        "|---|---|---|---|",
    ]
    for name, sel in results["selection"].items():
        for row in sel["sweep"]:
            mark = " **(chosen)**" if row["layers"] == sel["layers"] and row["alpha"] == sel["alpha"] else ""
            lines.append(f"| {name} | {row['layers']} | {row['alpha']} | {row['val_win_rate']:.3f}{mark} |")
    lines += ["", "## Sample replies (first test prompts)", ""]
    for name in m:
        rows = [json.loads(x) for x in (samples_dir / f"{name}.jsonl").read_text().splitlines()[:3]]
        lines.append(f"**{name}**")
        lines += [f"- `{r['prompt']}` -> `{r['response']}`" for r in rows]
        lines.append("")
    lines += ["", f"Timings (s): {results['timings_s']}", ""]
    return "\n".join(lines)

"""`rahf demo`: every method on the built-in task, judged exactly, in minutes on a CPU.

It builds a tokenizer and a tiny LLaMA from scratch, trains it (SFT) to give a realistic mix of good
and bad replies, then runs `rahf compare` on it: the baselines (sft, preferred-sft, hir, dpo,
rlhf-ppo, lorra) and RAHF-SCIT and RAHF-Dual, layers and alpha chosen on validation prompts only,
all judged on held-out test prompts by the gold judge (win rate against the chosen responses, ties
half). Replies are sampled at temperature 1, so a model is judged on its distribution, not on its
single most likely reply. The folder also gets `compare.yaml`: the same task over three seeds and a
label-noise sweep (`rahf compare DIR/compare.yaml`).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..artifacts import write_text_atomic
from ..config import load_config
from ..errors import RahfError
from ..report import RAHF_VS_STEP1
from .task import INSTRUCTIONS, DemoData, Fact, gold_score, make_task, vocabulary
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
    dpo_epochs: int
    align_steps: int
    ppo_steps: int
    layer_sets: tuple[tuple[int, ...], ...]
    alphas: tuple[float, ...]
    dual_alphas: tuple[float, ...]  # Dual's own grid (its normalized difference takes larger alpha)
    hidden: int = 128  # model width
    n_layers: int = 4  # decoder blocks
    temperatures: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # the reward-model score sweep


FULL = Scale(4000, 2000, 100, 200, 4, 6, 3, 1, 150, 40, ((2, 3), (3,)), (0.1, 0.25, 0.5), (0.5, 0.75, 1.0))
QUICK = Scale(1200, 400, 25, 200, 1, 2, 2, 1, 30, 4, ((2, 3),), (0.25,), (0.5,), temperatures=(0.0, 1.0))
MAX_NEW_TOKENS = 24
# Written into --out before anything else: a folder holding it is one a `rahf demo` wrote (even one interrupted at
# once), which a rerun may overwrite, reusing what is up to date.
MARKER = ".rahf-demo"
MARKER_TEXT = "This folder was written by `rahf demo`: a rerun of `rahf demo --out` here replaces its files.\n"


def _starts_with(path: Path, text: str) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(text)) == text.encode()
    except OSError:
        return False


# What a demo writes into --out (besides MARKER): its data and model, its config for `rahf compare` and that
# comparison's folder, the runs, results, report and plots (with what a killed atomic write leaves) of `rahf compare`,
# and the lock that comparison holds
_DEMO_ENTRIES = re.compile(
    r"data|base|compare|compare\.yaml|compare_results\.json|results\.json|report\.md|[\w-]+\.png|noise-.*"
    r"|\.rahf\.lock|\.(results\.json|report\.md)\.\d+-\d+\.tmp"
)
_DEMO_DATA = ("sft.jsonl", "pairs.jsonl", "validation.jsonl", "test.jsonl")


def _not_the_demos(out: Path) -> list[str]:
    """The entries of the folder `out` (a folder with a trailing /) that no `rahf demo` wrote: all of them but for a
    demo's folder written before the marker, whose model holds the demo's stamp or whose report is the demo's; there,
    what the demo does not write (a user's folder beside a copy of a demo's report), and a model without the stamp,
    which the demo would delete to build its own."""
    entries = sorted(out.iterdir())
    stamped = (out / "base" / "demo_base.json").is_file()
    if not stamped and not _starts_with(out / "report.md", "# rahf demo\n"):
        return [p.name + "/" * p.is_dir() for p in entries]
    found = [p.name + "/" * p.is_dir() for p in entries if not _DEMO_ENTRIES.fullmatch(p.name)]
    if (out / "base").exists() and not stamped:
        found.append("base/")
    data = out / "data"
    if data.is_dir():
        found += [f"data/{p.name}" for p in sorted(data.iterdir()) if p.name not in _DEMO_DATA]
    elif data.exists():
        found.append("data")
    return sorted(found)


def check_out(out: Path) -> None:
    """Refuse `out` unless it is missing, empty, or written by an earlier `rahf demo`: the demo replaces data/,
    base/, report.md and more there, so a folder of the user's own files would lose them."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RahfError(f"--out: {out} is a file; give a folder (it is made when missing)")
    if not out.is_dir() or (out / MARKER).is_file():
        return
    if found := _not_the_demos(out):
        names = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RahfError(
            f"--out: {out} holds files `rahf demo` did not write ({names}), which the demo would overwrite or "
            "delete; give an empty or new folder"
        )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def demo_config(out: Path, data_dir: Path, scale: Scale, seed: int, label_noise: float) -> dict:
    """The demo as a `rahf compare` config mapping (all eight methods, gold judge)."""
    from transformers import TrainingArguments

    # TRL's trainers turn activation (gradient) checkpointing on by default; on a 4-block model it only
    # recomputes forwards. Recent transformers name it activation_checkpointing and warn on the old name.
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    quiet = {"disable_tqdm": True, "logging_steps": 25, checkpointing: False}
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = sorted({layer for s in scale.layer_sets for layer in s})
    return {
        "model": str(out / "base"),
        "method": "scit",
        "output_dir": str(out),
        "seed": seed,
        "stages": ["sft"],
        "layers": layers,
        "alpha": scale.alphas[0],
        "window": 16,
        "include_boundary": True,
        "instructions": dict(INSTRUCTIONS),
        "data": {
            "path": str(data_dir / "pairs.jsonl"),
            "share_pairs": True,
            "max_prompt_length": 48,
            "max_response_length": 24,
            "label_noise": label_noise,
        },
        "sft": {
            "path": str(data_dir / "sft.jsonl"),
            "train": quiet
            | {"learning_rate": 1e-3, "num_train_epochs": scale.sft_epochs, "per_device_train_batch_size": 32}
            | {"lr_scheduler_type": "cosine", "warmup_steps": 30},
        },
        "instruct": {
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": all_linear},
            "train": quiet
            | {"learning_rate": 3e-4, "num_train_epochs": scale.instruct_epochs, "per_device_train_batch_size": 16},
        },
        "collect": {"dtype": "float16", "batch_size": 64},
        "align": {
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": quiet | {"learning_rate": 1e-3, "max_steps": scale.align_steps, "per_device_train_batch_size": 32},
        },
        "reward": {
            "max_length": 80,
            "train": quiet | {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 32},
        },
        # DPO and PPO settings were picked on the validation prompts (BENCHMARKS.md): stronger ones collapse
        "dpo": {
            "beta": 0.3,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": all_linear},
            "train": quiet
            | {"learning_rate": 2e-4, "num_train_epochs": scale.dpo_epochs, "per_device_train_batch_size": 32},
        },
        "ppo": {
            "steps": scale.ppo_steps,
            "rollout_size": 64,
            "minibatch_size": 16,
            "learning_rate": 5e-5,
            "kl_coef": 0.5,
            "max_new_tokens": MAX_NEW_TOKENS,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": all_linear},
        },
        "evaluate": {
            "pairs": str(data_dir / "test.jsonl"),
            "judge": "gold",
            "samples": scale.samples,
            "temperature": 1.0,
            "temperatures": list(scale.temperatures),
            "max_new_tokens": MAX_NEW_TOKENS,
            "batch_size": 256,
        },
        "compare": {
            "seeds": [seed],
            "label_noise": [label_noise],
            "validation": str(data_dir / "validation.jsonl"),
            "layer_sets": [list(s) for s in scale.layer_sets],
            "alphas": list(scale.alphas),
            "overrides": {
                "dual": {
                    # two full fine-tunes, like SCIT's step 1 (and the authors' Dual), so the two variants differ
                    # only in how they learn the preference
                    "instruct": {"finetune": "full"},
                    # its two models differ 2-3x in scale at some tokens: compare them at unit rms, which
                    # tolerates (and needs) larger alpha (BENCHMARKS.md, "What limits RAHF-Dual here")
                    "collect": {"difference": "normalized"},
                    "compare": {"alphas": list(scale.dual_alphas)},
                }
            },
        },
    }


def _gold_extras(generations: Path, items: list[dict], samples: int) -> dict:
    """Mean gold score and share of malformed replies of a method's sampled test replies."""
    rows = [json.loads(x) for x in generations.read_text().splitlines()]
    scores = [gold_score(Fact(**items[k // samples]["fact"]), r["response"]) for k, r in enumerate(rows)]
    return {
        "mean_gold_score": round(sum(scores) / len(scores), 4),
        "unparseable": round(sum(s < 0 for s in scores) / len(scores), 4),
    }


def base_model(path: Path, scale: Scale, seed: int) -> Path:
    """The demo's random tiny model at `path`, built again when the folder holds one of another seed or scale
    (another `--seed` or `--quick` into the same `--out`); kept otherwise, so a rerun's stages stay fresh."""
    built = {"seed": seed, "hidden": scale.hidden, "layers": scale.n_layers, "heads": 4}
    stamp = path / "demo_base.json"
    if (path / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == built:
        return path
    shutil.rmtree(path, ignore_errors=True)
    save_tiny(path, vocabulary(), hidden=scale.hidden, layers=scale.n_layers, heads=4, seed=seed)
    stamp.write_text(json.dumps(built))
    return path


def run_demo(out: Path, quick: bool = False, label_noise: float = 0.0, seed: int = 0) -> dict:
    """Run the demo into `out` (missing, empty, or an earlier demo's: see `check_out`); writes report.md,
    results.json and compare.yaml and returns the results."""
    from ..compare import run_compare

    t0 = time.time()
    scale = QUICK if quick else FULL
    out = Path(out).resolve()
    check_out(out)  # before anything is written into it
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        (out / MARKER).write_text(MARKER_TEXT)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    task: DemoData = make_task(scale.n_sft, scale.n_pairs, scale.n_val, scale.n_test, 0.0, seed)
    _write_jsonl(data_dir / "sft.jsonl", task.sft)
    _write_jsonl(data_dir / "pairs.jsonl", [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in task.pairs])
    for name, items in (("validation", task.validation), ("test", task.test)):
        _write_jsonl(data_dir / f"{name}.jsonl", [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in items])
    base_model(out / "base", scale, seed)
    settings = demo_config(out, data_dir, scale, seed, label_noise)
    sweep = demo_config(out / "compare", data_dir, scale, 0, 0.0)
    sweep["model"] = str(out / "base")
    sweep["compare"] |= {"seeds": [0, 1, 2], "label_noise": [0.0, 0.2, 0.4], "noise_seeds": 1}
    plain = json.loads(json.dumps(sweep))  # no list shared between keys: YAML would write it as an anchor (&id001)
    (out / "compare.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))

    compared = run_compare(load_config(None, settings))
    (out / "results.json").replace(out / "compare_results.json")  # the demo's own results.json follows
    run = compared["runs"][0]
    results: dict = {"methods": {}, "selection": {}}
    for name, m in run["methods"].items():
        results["methods"][name] = (
            m["win_rate"]
            | _gold_extras(
                out / f"noise-{label_noise:g}" / f"seed-{seed}" / "generations" / f"{name}.jsonl",
                task.test,
                scale.samples,
            )
            | {k: m.get(k) for k in ("chosen_perplexity", "likelihood_accuracy", "likelihood_auc", "kl_per_token")}
        )
        if m.get("selection"):
            results["selection"][name] = m["selection"]
    results["task"] = {
        "label_noise": label_noise, "seed": seed, "quick": quick, "n_sft": scale.n_sft, "n_pairs": scale.n_pairs,
        "n_test_prompts": scale.n_test, "samples_per_prompt": scale.samples, "temperature": 1.0,
    }  # fmt: skip
    chosen = [gold_score(Fact(**it["fact"]), it["chosen"]) for it in task.test]
    results["task"]["chosen_mean_gold_score"] = round(sum(chosen) / len(chosen), 4)
    results["timings_s"] = run["timings_s"] | {"total": round(time.time() - t0, 1)}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_text_atomic(out / "report.md", demo_header(results) + (out / "report.md").read_text())
    print(
        f"[demo] wrote {out / 'report.md'} and {out / 'results.json'} in {results['timings_s']['total']}s", flush=True
    )
    return results


QUICK_NOTE = (
    "**`--quick` is a smoke test of the whole pipeline on a model trained for seconds: its numbers say nothing "
    "about the methods. Run `rahf demo` without `--quick` to compare them.**"
)


def demo_header(results: dict) -> str:
    """The task, and the gold-judged table with RAHF against its own step-1 model."""
    m, task = results["methods"], results["task"]
    lines = [
        "# rahf demo",
        "",
        *([QUICK_NOTE, ""] if task["quick"] else []),
        (
            "Task: 'NAME asks : what color is a OBJ ?'; a reply is an opener, an answer and a closing. Gold score = "
            "2 x correct colour + polite opener + polite closing (-1 if malformed); chosen test replies average "
            f"{task['chosen_mean_gold_score']}. {task['n_test_prompts']} held-out prompts x "
            f"{task['samples_per_prompt']} replies sampled at temperature 1; label noise {task['label_noise']}."
        ),
        "",
        "| method | win rate | 95% interval | mean gold score | malformed | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in m.items():
        lines.append(
            f"| {name} | {r['win_rate']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['mean_gold_score']:.3f} "
            f"| {r['unparseable']:.3f} | {r['n']} |"
        )
    lines += ["", "RAHF against its own step-1 model:", ""]
    for rahf, step1 in RAHF_VS_STEP1:
        if rahf in m and step1 in m:
            d = m[rahf]["win_rate"] - m[step1]["win_rate"]
            lines.append(f"- {rahf}: {m[rahf]['win_rate']:.3f} vs {step1} {m[step1]['win_rate']:.3f} ({d:+.3f})")
    return "\n".join(lines) + "\n\n"

"""One method of the demo under other settings, on a finished demo's own models, judged on validation prompts.

On `rahf demo --out DIR` it reuses the seed-0 SFT model (and, for RAHF-Dual, Dual's two step-1 models;
for PPO, the run's reward model), copied or read so that DIR is never written. For each variant of the
chosen study it trains the method with that variant's settings and samples replies to the demo's
validation prompts (never the test prompts) exactly as `rahf compare` evaluates: temperature 1,
`--samples` replies per prompt, gold judge, win rate against the chosen replies with ties half. The
model the method starts from is measured the same way, as the first row. Each variant is one
`rahf compare` run of DIR/compare.yaml with one seed, one method and the overrides listed below, so
every number can be reproduced with the CLI.

Studies: `dual` (RAHF-Dual's collect and align settings), `dpo` (beta, learning rate, epochs), `ppo`
(learning rate, KL coefficient, rollouts).
Usage: python benchmarks/variants.py DIR STUDY [--work DIR/variants-STUDY] [--samples 8] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rahf.compare import run_compare
from rahf.config import RahfConfig, load_config
from rahf.judges import GoldJudge


@dataclass(frozen=True)
class Study:
    """A method, the model it starts from (the first row), what to reuse from the demo, and its variants."""

    method: str
    start: str
    reuse: tuple[str, ...]  # demo folders a compare run in the work folder finds fresh
    variants: dict[str, dict] = field(default_factory=dict)  # name -> overrides of DIR/compare.yaml


# Dual's own overrides in compare.yaml still apply unless a variant changes them: two full fine-tunes as
# step 1 and the normalized difference; the demo picks layer 3 or 2,3 and alpha 0.5 / 0.75 / 1 on validation.
NORMALIZED = {"compare.overrides.dual.collect.difference": "normalized"}
RAW = {"compare.overrides.dual.collect.difference": "raw"}
AUTHORS_STEP3 = {  # the authors' Dual step 3: alpha 5, lr 9e-6 constant, batch 8, 2,500 steps
    "align.train.learning_rate": 9e-6,
    "align.train.lr_scheduler_type": "constant",
    "align.train.per_device_train_batch_size": 8,
    "align.train.max_steps": 2500,
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
L3 = NORMALIZED | {"layers": [3]}
DUAL = {
    **{f"normalized L3 a{a:g}": L3 | {"alpha": a} for a in (0.25, 0.5, 0.75, 1.0, 1.5)},
    **{f"normalized L2,3 a{a:g}": NORMALIZED | {"layers": [2, 3], "alpha": a} for a in (0.5, 1.0)},
    "normalized L1,2,3 a0.5": NORMALIZED | {"layers": [1, 2, 3], "alpha": 0.5},
    **{f"normalized L4 a{a:g}": NORMALIZED | {"layers": [4], "alpha": a} for a in (0.5, 0.75)},
    "normalized L3,4 a0.5": NORMALIZED | {"layers": [3, 4], "alpha": 0.5},
    "normalized L3 a0.75, window 8": L3 | {"alpha": 0.75, "window": 8},
    **{f"raw L3 a{a:g}": RAW | {"layers": [3], "alpha": a} for a in (0.1, 0.25, 0.5)},
    "normalized L3 a0.5, window without boundary": L3 | {"alpha": 0.5, "include_boundary": False},
    "normalized L3 a0.5, chosen replies only": L3
    | {"alpha": 0.5, "compare.overrides.dual.collect.responses": "chosen"},
    "normalized L3 a0.5, align LoRA on all linear": L3 | {"alpha": 0.5, "align.lora.target_modules": ALL_LINEAR},
    **{
        f"normalized L3 a{a:g}, {n} align steps": L3 | {"alpha": a, "align.train.max_steps": n}
        for a, n in ((0.5, 600), (0.75, 600), (1.0, 600), (0.5, 1200), (0.75, 1200))
    },
    "normalized L3 a0.75, align lr 3e-3": L3 | {"alpha": 0.75, "align.train.learning_rate": 3e-3},
    "normalized L3 a0.75, align LoRA on all linear, 600 steps": L3
    | {"alpha": 0.75, "align.lora.target_modules": ALL_LINEAR, "align.train.max_steps": 600},
    "normalized L2,3 a0.75, 600 align steps": NORMALIZED
    | {"layers": [2, 3], "alpha": 0.75, "align.train.max_steps": 600},
    "normalized L3 a0.5, authors' loss normalisation": L3 | {"alpha": 0.5, "align.loss_norm": "authors"},
    "raw L3 a5, authors' step 3": RAW | {"layers": [3], "alpha": 5.0} | AUTHORS_STEP3,
    "normalized L3 a5, authors' step 3": L3 | {"alpha": 5.0} | AUTHORS_STEP3,
}
DPO = {  # the demo uses beta 0.3, lr 2e-4, 1 epoch
    f"beta {b:g}, lr {lr:g}, {ep} epoch{'s' * (ep > 1)}": {
        "dpo.beta": b,
        "dpo.train.learning_rate": lr,
        "dpo.train.num_train_epochs": ep,
    }
    for b, lr, ep in (
        (0.1, 5e-5, 1), (0.1, 1e-4, 1), (0.1, 3e-4, 1), (0.1, 2e-4, 2), (0.3, 1e-4, 1), (0.3, 2e-4, 1),
        (0.3, 2e-4, 2), (0.5, 3e-4, 1), (1.0, 5e-4, 1),
    )
}  # fmt: skip
PPO = {  # the demo uses lr 1e-4, KL 0.5, 40 rollouts
    f"lr {lr:g}, KL {kl:g}, {n} rollouts": {"ppo.learning_rate": lr, "ppo.kl_coef": kl, "ppo.steps": n}
    for lr, kl, n in (
        (5e-5, 0.5, 40),
        (1e-4, 0.2, 40),
        (1e-4, 0.5, 40),
        (1e-4, 1.0, 40),
        (2e-4, 0.5, 40),
        (1e-4, 0.5, 80),
        (5e-5, 0.2, 40),
        (5e-5, 0.5, 80),
    )
}
STUDIES = {
    "dual": Study("rahf-dual", "preferred-sft", ("seed-0/sft", "noise-0/seed-0/dual/instruct"), DUAL),
    "dpo": Study("dpo", "sft", ("seed-0/sft",), DPO),
    "ppo": Study("rlhf-ppo", "sft", ("seed-0/sft",), PPO),
}


def variant_config(demo: Path, work: Path, method: str, samples: int, extra: dict) -> RahfConfig:
    """DIR/compare.yaml narrowed to one seed, one method, one layer set and alpha, judged on validation prompts."""
    overrides = {
        "output_dir": str(work),
        "compare.methods": [method],
        "compare.seeds": [0],
        "compare.label_noise": [0.0],
        "compare.validation": None,
        "compare.layer_sets": [],
        "compare.alphas": [],
        "compare.overrides.dual.compare.alphas": [],
        "ppo.reward_model": str(demo / "noise-0" / "seed-0" / "reward"),  # the demo's PPO reward model
        "evaluate.pairs": str(demo / "data" / "validation.jsonl"),
        "evaluate.samples": samples,
        "evaluate.temperatures": [],
    } | extra
    return load_config(demo / "compare.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _run(demo: Path, study: Study, work: Path, method: str, samples: int, extra: dict) -> tuple[dict, float]:
    """One single-seed compare run of `method` on the validation prompts; returns (its metrics, seconds)."""
    for rel in study.reuse:
        if not (work / rel).exists():
            shutil.copytree(demo / rel, work / rel)
    cfg = variant_config(demo, work, method, samples, extra)
    t = time.time()
    metrics = run_compare(cfg)["runs"][0]["methods"][method]
    secs = time.time() - t
    rows = [json.loads(x) for x in (work / "noise-0" / "seed-0" / "generations" / f"{method}.jsonl").open()]
    malformed = sum(GoldJudge().score(r["prompt"], r["response"]) < 0 for r in rows) / len(rows)
    return metrics | {"malformed": malformed}, secs


def _folder(name: str) -> str:
    return name.replace(" ", "_").replace(",", "").replace("'", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path)
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--work", type=Path)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args()
    study = STUDIES[args.study]
    demo = args.demo.resolve()
    work = (args.work or demo / f"variants-{args.study}").resolve()
    unknown = sorted(set(args.only or []) - set(study.variants))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; {args.study} has: {list(study.variants)}")
    rows = [(study.start, *_run(demo, study, work / study.start, study.start, args.samples, {}), {})]
    for name in args.only or study.variants:
        extra = study.variants[name]
        rows.append((name, *_run(demo, study, work / _folder(name), study.method, args.samples, extra), extra))
    base = rows[0][1]["win_rate"]
    print(f"\n{study.method}: validation prompts x {args.samples} replies, temperature 1 (n = {base['n']})\n")
    print(f"| variant | win rate | 95% interval | − {study.start} | malformed | KL/token vs SFT | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, m, secs, _ in rows:
        wr = m["win_rate"]
        d = wr["win_rate"] - base["win_rate"]
        kl = m.get("kl_per_token")
        print(
            f"| {name} | {wr['win_rate']:.3f} | {wr['ci95'][0]:.3f}–{wr['ci95'][1]:.3f} | {d:+.3f} "
            f"| {m['malformed']:.3f} | {'–' if kl is None else f'{kl:.3f}'} | {secs:.0f} |"
        )
    saved = work / "variants.json"  # rows of earlier `--only` runs are kept; a re-run replaces its own
    kept = {r["name"]: r for r in json.loads(saved.read_text())} if saved.is_file() else {}
    for name, m, secs, extra in rows:
        keep = {k: m.get(k) for k in ("win_rate", "malformed", "kl_per_token")}
        kept[name] = {"name": name} | keep | {"seconds": round(secs, 1), "overrides": extra}
    saved.write_text(json.dumps(list(kept.values()), indent=1))


if __name__ == "__main__":
    main()

"""`rahf compare`: every configured method over several seeds and label-noise levels, judged alike.

For each (noise level, seed) the SFT model and the reward model are trained once and shared by all
methods; `hir` is the SCIT step-1 model prompted with the preferred instruction and `preferred-sft`
is Dual's preferred adapter, so each RAHF variant is compared with its own step-1 model. RAHF
variants (and LoRRA) choose target layers and alpha on `compare.validation` pairs, never on the
evaluation pairs. Everything lands under `output_dir`: one folder per (noise, seed, method), then
`results.json`, `report.md` and the plots.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import (
    atomic_dir,
    file_digest,
    fingerprint,
    fingerprint_path,
    is_fresh,
    output_lock,
    read_manifest,
    redacted,
    versions,
    write_text_atomic,
)
from .config import (
    ALIASES,
    STEP1_HOSTS,
    RahfConfig,
    flatten,
    resolved_layers,
    unused_overrides_note,
    with_overrides,
)
from .data import PreferencePair, load_pairs
from .errors import ConfigError
from .stimuli import Instruction

DISPLAY = {"scit": "rahf-scit", "dual": "rahf-dual"}  # names in results and reports
RAHF_LIKE = ("scit", "dual", "lorra")  # methods with collect and align (layers and alpha to choose)


@dataclass(frozen=True)
class Deployed:
    """A model as it is used: folder, adapter sub-folder, system instruction, and the config of the run that made it
    (a step-1 adapter loads on that run's base: the one its fingerprint covers, not the path its file names)."""

    path: str
    adapter: str | None = None
    system: str | None = None
    run: RahfConfig | None = field(default=None, compare=False, repr=False)


def variant(cfg: RahfConfig, **changes: Any) -> RahfConfig:
    """A copy of `cfg` with dotted keys changed (`data__label_noise=0.2` sets cfg.data.label_noise)."""
    out = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *heads, last = dotted.split("__")
        node = out
        for h in heads:
            node = getattr(node, h)
        setattr(node, last, value)
    return out


def method_names(cfg: RahfConfig) -> list[str]:
    """Configured methods with canonical names (rahf-scit -> scit)."""
    return [ALIASES.get(m, m) for m in cfg.compare.methods]


def candidates(cfg: RahfConfig) -> list[tuple[list[int], float]]:
    """(layers, alpha) pairs to choose from: the compare grid, or the config's single setting."""
    layer_sets = [sorted(s) for s in cfg.compare.layer_sets] or [resolved_layers(cfg)]
    return [(layers, alpha) for layers in layer_sets for alpha in (cfg.compare.alphas or [cfg.alpha])]


def _prompt_key(pair: PreferencePair) -> str:
    return json.dumps(list(pair.prompt), sort_keys=True)


def check_disjoint(validation: Sequence[PreferencePair], judged: Sequence[PreferencePair]) -> None:
    """Layers and alpha are chosen on `compare.validation`, never on the prompts the methods are judged on."""
    test = {_prompt_key(p) for p in judged}
    shared = [p for p in validation if _prompt_key(p) in test]
    if shared:
        raise ConfigError(
            f"compare.validation: {len(shared)} of its {len(validation)} prompts are also in evaluate.pairs (the "
            f"first: {shared[0].source}), so layers and alpha would be chosen on the prompts the methods are judged "
            "on; give validation pairs that share no prompt with evaluate.pairs"
        )


# What `rahf compare` writes at the top of its output_dir (a rerun replaces them), and the file that marks the folder
TOP_FILES = (
    "results.json",
    "report.md",
    "win_rate.png",
    "reward_by_temperature.png",
    "noise_sweep.png",
    "layer_strength.png",
    "training_curves.png",
    "ppo_score.png",
    "ppo_kl.png",
)
MARKER = ".rahf-compare"
MARKER_TEXT = (
    "This folder was written by `rahf compare`: a rerun here replaces its results.json, report.md and plots.\n"
)


def check_compare_folder(out: Path) -> None:
    """Refuse an output_dir holding a results.json, report.md or plot of compare's names that compare did not write:
    it would overwrite them. Compare's own are marked (`MARKER`, or the demo's), or, written before the marker was,
    come with a results.json of compare's shape."""
    from .demo.run import MARKER as DEMO_MARKER

    out = Path(out)
    found = [name for name in TOP_FILES if os.path.lexists(out / name)]
    if not found or (out / MARKER).is_file() or (out / DEMO_MARKER).is_file():
        return
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict) and {"methods", "summary", "runs", "config"} <= results.keys():
        return
    raise ConfigError(
        f"output_dir: {out} holds {', '.join(found)}, which rahf compare did not write and would overwrite; move "
        "them, or give compare another output_dir"
    )


def check_compare(cfg: RahfConfig) -> None:
    """Problems a compare run would hit late, reported before any training."""
    if not cfg.evaluate.pairs:
        raise ConfigError("evaluate.pairs: required by compare (held-out pairs every method is judged on)")
    check_compare_folder(Path(cfg.output_dir))
    tuned = [with_overrides(cfg, o, f"compare.overrides.{m}.") for m, o in cfg.compare.overrides.items()]
    if any(len(candidates(c)) > 1 for c in [cfg, *tuned]) and not cfg.compare.validation:
        raise ConfigError("compare.validation: required to choose among several compare.layer_sets/alphas")
    judged = load_pairs(cfg.evaluate.pairs, limit=cfg.evaluate.limit)[0]  # the pairs compare judges
    if cfg.compare.validation:
        check_disjoint(load_pairs(cfg.compare.validation)[0], judged)
    from .evaluate import check_judge, check_reward_model
    from .preflight import trained_on_note

    for note in (trained_on_note(cfg, judged), unused_overrides_note(cfg)):
        if note:
            print(f"[rahf] note: {note}", flush=True)

    check_judge(cfg, [cfg.evaluate.pairs, *([cfg.compare.validation] if cfg.compare.validation else [])])
    if "rlhf-ppo" in method_names(cfg) and cfg.ppo.reward_model:
        rm = cfg.ppo.reward_model
        check_reward_model("ppo.reward_model", rm, cfg.revision_of(rm), cfg.trust_remote_code)
    if cfg.evaluate.neutral_prompts:
        from .generate import read_prompts

        read_prompts(cfg.evaluate.neutral_prompts)
    from .preflight import INSTRUCTED, check_prompt_room, preflight

    stages = [s for s in ("sft", "reward", "instruct", "collect", "align") if s != "sft" or "sft" in cfg.stages]
    preflight(variant(cfg, stages=stages))
    if cfg.method not in INSTRUCTED and any(m in INSTRUCTED for m in method_names(cfg)):
        check_prompt_room(cfg, instructed=True)
    check_compared_lora(cfg)


def check_compared_lora(cfg: RahfConfig) -> None:
    """The LoRA adapters of every compared method, with its compare.overrides, find their target modules (preflight
    saw only the config's own `method`)."""
    from .preflight import check_lora

    overrides = {ALIASES.get(m, m): (o, f"compare.overrides.{m}.") for m, o in cfg.compare.overrides.items()}
    for method in method_names(cfg):
        host = STEP1_HOSTS.get(method, method)
        tuned = with_overrides(cfg, *overrides[host]) if host in overrides else cfg
        try:
            if method in ("scit", "dual", "lorra"):
                layers = sorted({layer for layer_set, _ in candidates(tuned) for layer in layer_set})
                stages = ["align"] if method == "lorra" else ["instruct", "align"]
                check_lora(variant(tuned, method=method, layers=layers), stages)
            elif method != "sft":
                check_lora(variant(tuned, method=host), ["instruct"])
        except ConfigError as e:  # name the key where the method's override sets it
            key = str(e).split(":", 1)[0]
            mapping, prefix = overrides.get(host, ({}, ""))
            if any(k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.") for k in flatten(mapping)):
                raise ConfigError(str(e).replace(key, prefix + key)) from None
            raise


def _load(cfg: RahfConfig, d: Deployed):
    from .models import load_tokenizer
    from .training import load_stage_model

    tokenizer = load_tokenizer(d.path, cfg.trust_remote_code, cfg.revision_of(d.path))
    return load_stage_model(d.path, d.run or cfg, adapter=d.adapter), tokenizer


def _select(
    mcfg: RahfConfig,
    grid: list[tuple[list[int], float]],
    validation: list[PreferencePair] | None,
    judge,
    judge_fp: str,
) -> tuple[Deployed, dict]:
    """Align for each (layers, alpha), keep the best on validation pairs, save it merged as `<run>/merged`.

    `judge_fp` identifies the judge (a reward model's fingerprint), so a new judge makes a new choice.
    """
    from peft import PeftModel

    from .align import train_align
    from .evaluate import win_rate_against_chosen
    from .generate import generate
    from .models import free_memory, load_tokenizer, save_model
    from .pipeline import load_policy, require_artifact, results_only, without_defaults
    from .training import process_settings_kept

    out = Path(mcfg.output_dir) / "merged"
    val_fp = fingerprint_path(mcfg.compare.validation) if mcfg.compare.validation else None
    settings = mcfg.to_dict()["evaluate"]  # what the validation replies and their judging depend on
    chooses = {k: settings[k] for k in ("judge", "judge_model", "llm", "samples", "temperature", "max_new_tokens")}
    if settings["judge"] == "reward-model":  # the judge reads this many tokens
        chooses["reward_max_length"] = mcfg.reward.max_length
    covered = {"grid": grid, "align": mcfg.to_dict()["align"], "evaluate": chooses}
    inputs = {"collect": fingerprint_path(require_artifact(mcfg, "collect")), "validation": val_fp, "judge": judge_fp}
    earlier = [fingerprint(inputs | covered)]  # as a selection made while align's logging settings counted
    covered = results_only(covered)  # align.train's logging, progress and checkpoint settings change no choice
    earlier.append(fingerprint(inputs | covered))  # ... and while align.train's defaults written out counted
    covered = without_defaults(covered, mcfg.to_dict())
    fp = fingerprint(inputs | covered)
    if any(is_fresh(out, f) for f in (fp, *earlier)):
        return Deployed(str(out)), read_manifest(out)["selection"]
    tokenizer = model = None
    sweep, best = [], None
    work = Path(mcfg.output_dir) / "sweep"
    for layers, alpha in grid:
        if best is None or best[1] is not model:  # the last candidate lost: its model goes before the next loads
            del model
            free_memory()
        shutil.rmtree(work, ignore_errors=True)
        with process_settings_kept():  # what align.train sets for the process ends with it, as in `run_stage`
            train_align(mcfg, work, layers, alpha)
        logs = json.loads((work / "log_history.json").read_text())
        tokenizer = tokenizer or load_tokenizer(str(work), mcfg.trust_remote_code)
        model = PeftModel.from_pretrained(load_policy(mcfg), str(work)).merge_and_unload().eval()
        row: dict[str, Any] = {"layers": layers, "alpha": alpha, "final_loss": _last(logs, "loss")}
        row["target_fit"] = json.loads((work / "target_fit.json").read_text())
        if validation is not None and len(grid) > 1:
            e = mcfg.evaluate
            prompts = [list(p.prompt) for p in validation for _ in range(e.samples)]
            replies = generate(
                model, tokenizer, prompts, e.max_new_tokens, e.temperature, 1.0, e.batch_size,
                mcfg.data.max_prompt_length, seed=mcfg.seed, progress=False,
            )  # fmt: skip
            row["val_win_rate"] = win_rate_against_chosen(judge, validation, replies, e.samples)["win_rate"]
            print(f"[compare] {mcfg.method} layers={layers} alpha={alpha}: validation {row['val_win_rate']:.3f}")
        sweep.append(row)
        if best is None or row.get("val_win_rate", 0.0) > best[0].get("val_win_rate", 0.0):
            best = (row, model, logs)
    row, model, logs = best
    selection = {"layers": row["layers"], "alpha": row["alpha"], "sweep": sweep}
    with atomic_dir(out, "merge", fp, covered, {"selection": selection}, inputs, mcfg.to_dict()) as tmp:
        save_model(model, tokenizer, tmp)
        (tmp / "log_history.json").write_text(json.dumps(logs, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return Deployed(str(out)), selection


def _last(logs: list[dict], key: str) -> float | None:
    values = [r[key] for r in logs if key in r]
    return values[-1] if values else None


EVALUATIONS = "evaluations"  # per run: each method's evaluation record, beside its generations/


def evaluation_inputs(
    base: RahfConfig, d: Deployed, reference_fp: str, rm_path: str | None
) -> tuple[str, dict, dict[str, str | None]]:
    """(fingerprint, settings, input fingerprints) of what `evaluate_policy` measures of the deployed model `d` in a
    run of config `base`: the model (its folder's identity, adapter and instruction), the SFT model KL drift is
    measured from (`reference_fp`), the pairs and prompts, the judge and reward model `rm_path`, and the evaluate
    settings, seed, dtype and lengths. Anything else changes no measurement, so a rerun reuses the record."""
    from .pipeline import counted

    run = base.to_dict()
    covered = {k: run[k] for k in ("evaluate", "seed", "dtype", "trust_remote_code")}
    covered["data"] = {k: run["data"][k] for k in ("max_prompt_length", "max_response_length")}
    system = None if d.system is None else [str(d.system), *getattr(d.system, "alongside", ())]
    covered["deployed"] = {"adapter": d.adapter, "system": system, "dtype": (d.run or base).dtype}
    if rm_path:  # the reward model reads this many tokens of each reply
        covered["reward"] = {"max_length": base.reward.max_length}
    covered = redacted(counted("evaluate", covered))  # paths count by their content, below
    e = base.evaluate
    inputs = {
        "model": fingerprint_path(d.path, base.revision_of(d.path)),
        "reference": reference_fp,
        "pairs": fingerprint_path(e.pairs),
        "neutral_prompts": fingerprint_path(e.neutral_prompts) if e.neutral_prompts else None,
        "reward_model": fingerprint_path(rm_path, base.revision_of(rm_path)) if rm_path else None,
    }
    return fingerprint({"config": covered, "inputs": inputs}), covered, inputs


def fresh_evaluation(record: Path, fp: str, generations: Path) -> dict | None:
    """The measurements the evaluation record `record` holds when it was made with fingerprint `fp` and the
    generations file it wrote is still as it was; None otherwise (absent, stale, unreadable): evaluate again."""
    try:
        content = json.loads(record.read_text())
        fresh = content["fingerprint"] == fp and content["generations"] == file_digest(generations)
        if fresh and isinstance(content["metrics"], dict):
            return content["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_evaluation(
    record: Path, fp: str, covered: dict, inputs: dict[str, str | None], generations: Path, metrics: dict
) -> None:
    """Keep one method's measurements with what they were made from (`evaluation_inputs`), so a rerun of compare
    reads them back instead of generating and judging again."""
    record.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "stage": "evaluate",
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "config": covered,
        "inputs": inputs,
        "generations": file_digest(generations),
        "metrics": metrics,
    }
    write_text_atomic(record, json.dumps(content, indent=2))


def run_one(cfg: RahfConfig, out: Path, methods: list[str], noise: float, seed: int) -> dict:
    """Train and evaluate every method for one (noise, seed); returns per-method metrics and extras."""
    from . import pipeline
    from .evaluate import evaluate_policy
    from .models import free_memory

    run_dir = out / f"noise-{noise:g}" / f"seed-{seed}"
    base = variant(cfg, seed=seed, data__label_noise=noise)
    timings: dict[str, float] = {}
    t = time.time()

    def sft_root(level: float) -> Path:
        return out / f"seed-{seed}" if cfg.sft.path else out / f"noise-{level:g}" / f"seed-{seed}"

    def sft_model(level: float) -> str:
        """The SFT model of this seed at label-noise `level`: SFT data without label noise (sft.path) gives one per
        seed, shared across noise levels; SFT on the pairs' chosen replies learns the flipped ones too."""
        root = sft_root(level)
        stages = ["sft"] if "sft" in cfg.stages else []
        scfg = variant(
            base, method="sft", output_dir=str(root), stages=stages, data__label_noise=0.0 if cfg.sft.path else level
        )
        if stages:  # else every method starts from `model`
            pipeline.run(scfg)
        return pipeline.base_model_path(scfg)

    sft_path = sft_model(noise)
    timings["sft"] = round(time.time() - t, 1)

    e = cfg.evaluate
    t = time.time()

    def reward_model(noisy: RahfConfig, where: Path, backbone: str) -> str:
        rcfg = variant(noisy, method="sft", model=backbone, revision=base.revision_of(backbone), output_dir=str(where),
                       stages=["reward"])  # fmt: skip
        return str(pipeline.run_stage(rcfg, "reward"))

    # PPO learns from a reward model of the (noisy) labels, as it would in practice; the evaluation's reward model
    # is that of this seed's run without label noise (clean labels, from the SFT model of clean data): one judge for
    # every noise level, so that noise degrades the methods and not their judge.
    reward_path = reward_model(base, run_dir, sft_path) if "rlhf-ppo" in methods and not cfg.ppo.reward_model else None
    rm_path = e.judge_model
    if not rm_path and (e.judge == "reward-model" or e.temperatures):
        # at noise 0 this is PPO's reward model itself (same settings, same folder: found fresh, not retrained)
        clean_sft = sft_path if noise == 0 or cfg.sft.path else sft_model(0.0)
        rm_path = reward_model(variant(base, data__label_noise=0.0), out / "noise-0" / f"seed-{seed}", clean_sft)
    if reward_path or rm_path != e.judge_model:
        timings["reward"] = round(time.time() - t, 1)
    from .evaluate import neutral_prompts, reward_judge_for, run_judge

    reward_judge = reward_judge_for(cfg, rm_path)
    judge = run_judge(cfg, reward_judge)
    judge_fp = (
        fingerprint_path(rm_path, base.revision_of(rm_path))
        if e.judge == "reward-model"
        else f"{e.judge}:{e.judge_model}"
    )

    overrides = {ALIASES.get(m, m): o for m, o in cfg.compare.overrides.items()}

    def method_cfg(method: str, stages: list[str], **changes: Any) -> RahfConfig:
        tuned = with_overrides(base, overrides[method]) if method in overrides else base
        return variant(
            tuned, method=method, model=sft_path, revision=base.revision_of(sft_path), output_dir=str(run_dir / method), stages=stages,
            ppo__reward_model=cfg.ppo.reward_model or reward_path, **changes,
        )  # fmt: skip

    validation = load_pairs(cfg.compare.validation)[0] if cfg.compare.validation else None
    deployed: dict[str, Deployed] = {}
    extras: dict[str, dict] = {}
    for method in methods:
        t = time.time()
        if method == "sft":
            deployed[method] = Deployed(sft_path)
        elif method in ("hir", "preferred-sft"):
            host = "scit" if method == "hir" else "dual"
            hcfg = method_cfg(host, ["instruct"])
            pipeline.run(hcfg)
            inst = str(pipeline.stage_dir(hcfg, "instruct"))
            deployed[method] = (
                Deployed(inst, "preferred", None, hcfg)
                if host == "dual"
                else Deployed(
                    inst, None, Instruction(hcfg.instructions.preferred, [hcfg.instructions.dispreferred]), hcfg
                )  # the instruction it was trained with
            )
        elif method in ("dpo", "rlhf-ppo"):
            mcfg = method_cfg(method, ["instruct"])
            pipeline.run(mcfg)
            deployed[method] = Deployed(str(pipeline.stage_dir(mcfg, "instruct")), run=mcfg)
        else:
            grid = candidates(method_cfg(method, []))  # a method's overrides may set its own layers/alphas
            layers = sorted({layer for ls, _ in grid for layer in ls})
            mcfg = method_cfg(method, ["collect"] if method == "lorra" else ["instruct", "collect"], layers=layers)
            pipeline.run(mcfg)
            deployed[method], selection = _select(mcfg, grid, validation, judge, judge_fp)
            collect = read_manifest(pipeline.stage_dir(mcfg, "collect"))
            extras[method] = {"selection": selection, "per_layer": collect.get("per_layer", {})}
        if method != "sft":  # trained once above, shared by all methods
            timings[f"train {method}"] = round(time.time() - t, 1)

    from .training import load_stage_model

    pairs = load_pairs(e.pairs, limit=e.limit)[0]
    neutral = neutral_prompts(cfg, pairs)
    extra: dict[str, Any] = {}
    if reward_judge is not None:
        from .reward import evaluate_reward_model

        extra["reward_model"] = evaluate_reward_model(reward_judge, pairs) | {"path": rm_path}
    reference_fp = fingerprint_path(sft_path, base.revision_of(sft_path))
    reference = None  # loaded for the first method evaluated: none when every record is fresh
    metrics: dict[str, dict] = {}
    for method in methods:
        t = time.time()
        d = deployed[method]
        name = DISPLAY.get(method, method)
        record = run_dir / EVALUATIONS / f"{name}.json"
        generations = run_dir / "generations" / f"{name}.jsonl"
        fp, covered, inputs = evaluation_inputs(base, d, reference_fp, rm_path)
        m = fresh_evaluation(record, fp, generations)
        if m is None:
            if reference is None:
                reference = load_stage_model(sft_path, cfg)
            model, tokenizer = _load(base, d)
            m = evaluate_policy(
                base, model, tokenizer, pairs, judge, reward_judge=reward_judge, reference=reference, system=d.system,
                neutral_prompts=neutral, generations=generations,
            )  # fmt: skip
            del model  # before the next method's model loads
            free_memory()
            write_evaluation(record, fp, covered, inputs, generations, m)
            said = "win rate"
        else:
            said = "evaluation up to date, win rate"
        deployed_as = {"model": d.path, "adapter": d.adapter} | ({"system": d.system} if d.system else {})
        metrics[name] = m | extras.get(method, {}) | deployed_as
        timings[f"evaluate {method}"] = round(time.time() - t, 1)
        print(f"[compare] noise {noise:g} seed {seed} {name}: {said} {m['win_rate']['win_rate']:.3f}", flush=True)
    histories = {name: _history(run_dir, sft_root(noise), name) for name in metrics}
    run = {"noise": noise, "seed": seed, "methods": metrics, "timings_s": timings, "histories": histories}
    return run | extra


def _history(run_dir: Path, sft_root: Path, name: str) -> dict[str, list[dict]]:
    """Training logs behind a method: its step-1 (or baseline) training and its alignment."""
    method = {v: k for k, v in DISPLAY.items()}.get(name, name)
    files = {
        "sft": sft_root / "sft" / "log_history.json",
        "hir": run_dir / "scit" / "instruct" / "log_history.json",
        "preferred-sft": run_dir / "dual" / "instruct" / "log_history.json",
        "dpo": run_dir / "dpo" / "instruct" / "log_history.json",
        "rlhf-ppo": run_dir / "rlhf-ppo" / "instruct" / "log_history.json",
    }
    out: dict[str, list[dict]] = {}
    if method in RAHF_LIKE:
        out["align"] = _read_logs(run_dir / method / "merged" / "log_history.json")
        if method != "lorra":
            out["instruct"] = _read_logs(run_dir / method / "instruct" / "log_history.json")
    elif method in files:
        out["train"] = _read_logs(files[method])
    return {k: v for k, v in out.items() if v}


def _read_logs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    logs = json.loads(path.read_text())
    if isinstance(logs, dict):  # Dual: one history per side
        logs = logs.get("preferred", [])
    return logs


def _runs_by_level(runs: list[dict]) -> dict[str, list[dict]]:
    """{noise level: its runs (one per seed), in run order}."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(f"{run['noise']:g}", []).append(run)
    return out


def _by_level(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{noise level: {method: [its metrics, one per seed, in run order]}}."""
    out: dict[str, dict[str, list[dict]]] = {}
    for level, runs_at in _runs_by_level(runs).items():
        for run in runs_at:
            for name, m in run["methods"].items():
                out.setdefault(level, {}).setdefault(name, []).append(m)
    return out


def _pooled_interval(ms: list[dict], pooled: float, n: int) -> tuple[float, float]:
    """95% interval of the verdicts of all seeds pooled, with the prompt as the cluster.

    Every seed answers the same prompts, so the verdicts on one prompt (all its replies in all seeds) are
    correlated; `clustered_wilson` shrinks n accordingly. Without per-prompt verdicts (or when seeds saw
    different prompts) the plain Wilson interval of n verdicts.
    """
    from .metrics import clustered_wilson, wilson_interval

    per_seed = [m.get("verdicts_per_prompt") for m in ms]
    if not all(per_seed) or len({len(v) for v in per_seed}) != 1 or len({m["win_rate"]["n"] for m in ms}) != 1:
        return wilson_interval(pooled, n)
    prompts = len(per_seed[0])
    means = [sum(v[i] for v in per_seed) / len(per_seed) for i in range(prompts)]
    _, low, high, _ = clustered_wilson(means, [n // prompts] * prompts)
    return low, high


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """Per noise level and method: the win rate of all seeds' verdicts pooled (the seed mean when every seed
    judged as many replies, as `run_compare`'s do) with its 95% interval, the spread over seeds, and the seed
    means of the other measurements (unrounded: a value rounded here and again in a table can read 0.001 off
    the same value shown elsewhere)."""
    summary: dict[str, dict[str, dict]] = {}
    for level, by_method in _by_level(runs).items():
        summary[level] = {}
        for name, ms in by_method.items():
            rates = [m["win_rate"]["win_rate"] for m in ms]
            n = sum(m["win_rate"]["n"] for m in ms)
            pooled = sum(m["win_rate"]["win_rate"] * m["win_rate"]["n"] for m in ms) / n
            mean = sum(rates) / len(rates)  # for the spread only: the rate shown is the one its interval is about
            # the spread over seeds; none with one seed (0 would read as "no training variance")
            sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)) if len(rates) > 1 else None
            row = {
                "win_rate": pooled,
                "seed_sd": sd,
                "ci95": list(_pooled_interval(ms, pooled, n)),
                "n": n,
                "seeds": len(ms),
            }
            for key in ("judge_score", "chosen_cross_entropy", "chosen_perplexity", "kl_per_token"):
                values = [m[key] for m in ms if m.get(key) is not None]
                if values:
                    row[key] = sum(values) / len(values)
            if "chosen_cross_entropy" in row:  # every seed scores the same tokens: the perplexity of them all, which
                row["chosen_perplexity"] = math.exp(row["chosen_cross_entropy"])  # a mean of exponentials is not
            for key in ("likelihood_auc", "likelihood_accuracy"):
                values = [m[key] for m in ms if m.get(key) is not None]
                if values:
                    row[key] = sum(values) / len(values)
            curves = [m["reward_by_temperature"] for m in ms if m.get("reward_by_temperature")]
            if curves:
                row["reward_by_temperature"] = {t: sum(c[t]["mean"] for c in curves) / len(curves) for t in curves[0]}
            summary[level][name] = row
    return summary


def paired(runs: list[dict], targets: tuple[str, ...] = ("rahf-scit", "rahf-dual")) -> dict[str, dict[str, dict]]:
    """Per noise level, each of `targets` against every other method: the paired difference of win rates.

    Methods of one run answer the same prompts, so they are compared run by run (seed by seed), never by
    whether their separate intervals overlap. Returns {level: {"A vs B": {diff, per_seed, ci95, over}}}:
    diff is the mean over seeds of A's win rate minus B's, per_seed those differences. With several seeds
    the 95% interval treats seeds and prompts both as random (`crossed_mean_interval` over the seeds x prompts
    table of per-prompt differences of mean verdicts; over = "seeds and prompts": training randomness and the
    choice of prompts), or is Student's t over the seeds' differences without per-prompt verdicts (over =
    "seeds"); with one seed it is Student's t over the per-prompt differences (over = "prompts": the
    evaluation's noise only), and None without per-prompt verdicts.
    """
    from .metrics import crossed_mean_interval, mean_interval

    out: dict[str, dict[str, dict]] = {}
    for level, runs_at in _runs_by_level(runs).items():
        names = list(runs_at[0]["methods"])
        rows: dict[str, dict] = {}
        for a in [t for t in targets if t in names]:
            for b in [x for x in names if x != a]:
                both = [r["methods"] for r in runs_at if a in r["methods"] and b in r["methods"]]
                per_seed = [m[a]["win_rate"]["win_rate"] - m[b]["win_rate"]["win_rate"] for m in both]
                table = [_prompt_differences(m[a], m[b]) for m in both]
                if len(per_seed) > 1 and all(table) and len({len(t) for t in table}) == 1 and len(table[0]) > 1:
                    _, low, high = crossed_mean_interval(table)
                    diff, over = math.fsum(per_seed) / len(per_seed), "seeds and prompts"
                elif len(per_seed) > 1:
                    diff, low, high = mean_interval(per_seed)
                    over = "seeds"
                else:
                    if table[0]:
                        _, low, high = mean_interval(table[0])
                    else:
                        low = high = None
                    diff, over = per_seed[0], "prompts"
                ci = None if low is None else [low, high]
                rows[f"{a} vs {b}"] = {
                    "diff": diff,
                    "per_seed": list(per_seed),
                    "ci95": ci,
                    "over": over,
                }
        out[level] = rows
    return out


def _prompt_differences(a: dict, b: dict) -> list[float] | None:
    """Per prompt, the mean verdict of method `a` minus that of `b` in one run; None without per-prompt verdicts."""
    va, vb = a.get("verdicts_per_prompt"), b.get("verdicts_per_prompt")
    return [x - y for x, y in zip(va, vb)] if va and vb and len(va) == len(vb) else None


def run_compare(cfg: RahfConfig) -> dict:
    """Run every (noise, seed) and write results.json, report.md and the plots into `cfg.output_dir`."""
    from .pipeline import one_call

    with one_call(cfg):  # one Hub commit for every run in it
        check_compare(cfg)
        with output_lock(cfg.output_dir):
            return _run_compare(cfg)


def _run_compare(cfg: RahfConfig) -> dict:
    from .report import write_report

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        write_text_atomic(out / MARKER, MARKER_TEXT)
    methods = method_names(cfg)
    t0 = time.time()
    runs = []
    c = cfg.compare
    plan = [
        (noise, seed)
        for noise in c.label_noise
        for seed in (c.seeds if noise == 0 or c.noise_seeds is None else c.seeds[: c.noise_seeds])
    ]
    names = ", ".join(DISPLAY.get(m, m) for m in methods)
    runs_of = f"{len(plan)} run{'s' * (len(plan) != 1)}"
    print(f"[compare] {runs_of} (label noise x seed), each training and judging {names}", flush=True)
    for k, (noise, seed) in enumerate(plan, 1):
        print(f"[compare] run {k} of {len(plan)}: label noise {noise:g}, seed {seed}", flush=True)
        runs.append(run_one(cfg, out, methods, noise, seed))
        results = {
            "methods": [DISPLAY.get(m, m) for m in methods],
            "summary": summarize(runs),
            "paired": paired(runs),
            "runs": runs,
            "config": redacted(cfg.to_dict()),  # as manifests have it: no credential reaches a file
            "seconds": round(time.time() - t0, 1),
        }
        write_text_atomic(out / "results.json", json.dumps(results, indent=2))  # progress survives a kill
    write_report(results, out)
    print(f"[compare] wrote {out / 'report.md'} and {out / 'results.json'} in {time.time() - t0:.0f}s", flush=True)
    return results

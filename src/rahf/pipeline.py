"""The stages in order, each writing `output_dir/<stage>` under a fingerprint of its inputs.

`run` skips a stage whose artifact carries the fingerprint its inputs give now and recomputes any
other (a changed config key, data file or upstream artifact changes the fingerprint downstream).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .artifacts import atomic_dir, fingerprint, fingerprint_path, is_fresh, read_manifest
from .config import METHOD_STAGES, RahfConfig, resolved_layers
from .errors import RahfError

FOLDERS = {
    "sft": "sft",
    "reward": "reward",
    "instruct": "instruct",
    "collect": "collect",
    "align": "align",
    "merge": "merged",
    "generate": "generations",
    "evaluate": "evaluation",
}


def stage_dir(cfg: RahfConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / FOLDERS[stage]


def base_model_path(cfg: RahfConfig) -> str:
    """The model step 1 starts from: this run's SFT artifact when it has an sft stage, else `model`."""
    return str(stage_dir(cfg, "sft")) if "sft" in cfg.stages else cfg.model


def step1_path(cfg: RahfConfig) -> Path | str:
    """The model collect reads and align trains: the instruct artifact, or for LoRRA the base model itself."""
    return base_model_path(cfg) if cfg.method == "lorra" else require_artifact(cfg, "instruct")


def reward_model_path(cfg: RahfConfig, configured: str | None) -> str:
    """A configured reward model, else this run's `reward` artifact."""
    return configured or str(require_artifact(cfg, "reward"))


def final_model(cfg: RahfConfig) -> tuple[str, str | None, str | None]:
    """(folder, adapter sub-folder, system instruction) of the model the method ends with, as it is deployed."""
    if cfg.method in ("scit", "dual", "lorra"):
        return str(require_artifact(cfg, "merge")), None, None
    if cfg.method == "sft":
        return base_model_path(cfg), None, None
    instruct = str(require_artifact(cfg, "instruct"))
    if cfg.method == "preferred-sft":
        return instruct, "preferred", None
    if cfg.method == "hir":
        return instruct, None, cfg.instructions.preferred
    return instruct, None, None  # dpo, rlhf-ppo


def require_artifact(cfg: RahfConfig, stage: str) -> Path:
    path = stage_dir(cfg, stage)
    if not (path / "rahf_manifest.json").is_file():
        raise RahfError(f"{path}: no finished {stage} artifact; run `rahf {stage}` (or `rahf run`) first")
    return path


def _section(cfg: RahfConfig, *keys: str) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in keys}


def stage_fingerprint(cfg: RahfConfig, stage: str) -> tuple[str, dict]:
    """(fingerprint, the config it covers) of a stage given the current config and upstream artifacts."""
    data_fp = fingerprint_path(cfg.data.path) if cfg.data.path else None
    common = _section(cfg, "seed", "dtype", "data")
    if stage == "sft":
        covered = common | _section(cfg, "sft", "tokenizer") | {"model": cfg.model}
        inputs = {
            "model": fingerprint_path(cfg.model),
            "data": fingerprint_path(cfg.sft.path) if cfg.sft.path else data_fp,
        }
    elif stage == "reward":
        from .reward import resolve_backbone

        covered = common | _section(cfg, "reward", "trust_remote_code")
        inputs = {
            "backbone": fingerprint_path(resolve_backbone(cfg.reward.model, base_model_path(cfg))),
            "data": data_fp,
        }
    elif stage == "instruct":
        covered = common | _section(cfg, "method", "instructions", "instruct") | {"finetune": cfg.finetune}
        inputs = {"base": fingerprint_path(base_model_path(cfg)), "data": data_fp}
        if cfg.method in ("dpo", "rlhf-ppo"):
            covered |= _section(cfg, "dpo" if cfg.method == "dpo" else "ppo")
        if cfg.method == "rlhf-ppo":
            inputs["reward"] = fingerprint_path(reward_model_path(cfg, cfg.ppo.reward_model))
    elif stage == "collect":
        covered = common | _section(cfg, "method", "instructions", "window", "include_boundary", "collect")
        covered["layers"] = resolved_layers(cfg)
        inputs = {"instruct": fingerprint_path(step1_path(cfg)), "data": data_fp}
    elif stage == "align":
        covered = common | _section(cfg, "method", "instructions", "window", "include_boundary", "alpha", "align")
        covered["layers"] = resolved_layers(cfg)
        inputs = {"instruct": fingerprint_path(step1_path(cfg))}
        if cfg.align.targets == "cache":
            inputs["collect"] = fingerprint_path(require_artifact(cfg, "collect"))
        else:
            inputs["data"] = data_fp
    elif stage == "merge":
        covered, inputs = {}, {"align": fingerprint_path(require_artifact(cfg, "align"))}
    elif stage == "generate":
        covered = _section(cfg, "generate", "data", "seed", "method", "instructions")
        model = cfg.generate.model or final_model(cfg)[0]
        inputs = {"model": fingerprint_path(model), "prompts": fingerprint_path(cfg.generate.prompts)}
    elif stage == "evaluate":
        covered = _section(cfg, "evaluate", "data", "seed", "method", "instructions")
        inputs = {"model": fingerprint_path(final_model(cfg)[0]), "pairs": fingerprint_path(cfg.evaluate.pairs)}
        if cfg.evaluate.judge == "reward-model":
            inputs["judge"] = fingerprint_path(reward_model_path(cfg, cfg.evaluate.judge_model))
    else:
        raise RahfError(f"unknown stage {stage!r}")
    return fingerprint({"stage": stage, "config": covered, "inputs": inputs}), covered


def load_policy(cfg: RahfConfig):
    """The model step 3 trains, as a plain model: SCIT the step-1 model, Dual the preferred one, LoRRA the base."""
    from .training import load_stage_model

    return load_stage_model(step1_path(cfg), cfg, adapter="preferred" if cfg.method == "dual" else None)


def target_reader(cfg: RahfConfig, layers: list[int], pad_id: int, policy=None):
    """A TargetReader over resident models; `policy` (with adapters disabled) serves as the plus model."""
    from .collect import TargetReader
    from .training import load_stage_model

    plus = policy if policy is not None else load_policy(cfg)
    minus = load_stage_model(step1_path(cfg), cfg, adapter="dispreferred") if cfg.contrast == "models" else None
    return TargetReader(cfg, layers, pad_id, plus, minus)


def run_stage(cfg: RahfConfig, stage: str, force: bool = False) -> Path:
    """Run one stage unless its artifact is fresh (or `force`); returns the artifact folder."""
    fp, covered = stage_fingerprint(cfg, stage)
    out = stage_dir(cfg, stage)
    if not force and is_fresh(out, fp):
        print(f"[rahf] {stage}: up to date ({out})", flush=True)
        return out
    if out.exists() and not force:
        print(f"[rahf] {stage}: inputs changed since {out} was made; recomputing", flush=True)
    print(f"[rahf] {stage}: running -> {out}", flush=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    extra: dict = {}
    with atomic_dir(out, stage, fp, covered, extra) as tmp:
        extra.update(_STAGES[stage](cfg, tmp) or {})
        extra["seconds"] = round(time.time() - t0, 2)
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    print(f"[rahf] {stage}: done in {time.time() - t0:.1f}s", flush=True)
    return out


def preflight(cfg: RahfConfig) -> None:
    """Read the data files once before any model loads, so a malformed record stops the run at once."""
    from .data import load_pairs
    from .training import load_data, split_pairs

    stages = active_stages(cfg)
    if any(s in stages for s in ("reward", "instruct", "collect", "align")) or ("sft" in stages and not cfg.sft.path):
        split_pairs(cfg, load_data(cfg))
    if "evaluate" in stages:
        load_pairs(cfg.evaluate.pairs)
    if "sft" in cfg.stages and cfg.sft.path:
        from .sft import sft_examples

        sft_examples(cfg)
    if "generate" in cfg.stages and cfg.generate.prompts and not str(cfg.generate.prompts).endswith(".jsonl"):
        load_pairs(cfg.generate.prompts)


def active_stages(cfg: RahfConfig) -> list[str]:
    """The configured stages the method uses (e.g. DPO has no collect or align)."""
    return [s for s in cfg.stages if s in METHOD_STAGES[cfg.method]]


def run(cfg: RahfConfig, force: bool = False) -> None:
    """All configured stages the method uses, in order (after `preflight`)."""
    preflight(cfg)
    skipped = [s for s in cfg.stages if s not in METHOD_STAGES[cfg.method]]
    if skipped:
        print(f"[rahf] method {cfg.method} has no {', '.join(skipped)} stage; skipping", flush=True)
    for stage in active_stages(cfg):
        run_stage(cfg, stage, force=force)


def _sft(cfg: RahfConfig, out: Path) -> dict:
    from .sft import run_sft

    run_sft(cfg, out)
    return {}


def _reward(cfg: RahfConfig, out: Path) -> dict:
    from .reward import resolve_backbone, train_reward_model
    from .training import load_data, split_pairs

    step1, _ = split_pairs(cfg, load_data(cfg))
    backbone = resolve_backbone(cfg.reward.model, base_model_path(cfg))
    r = cfg.reward
    judge = train_reward_model(step1, backbone, out, r.train, cfg.seed, cfg.trust_remote_code, r.max_length)
    stats: dict = {"n_pairs": len(step1), "backbone": backbone}
    if cfg.evaluate.pairs:  # how well it ranks held-out pairs, recorded in the manifest
        from .data import load_pairs
        from .reward import evaluate_reward_model

        stats["heldout"] = evaluate_reward_model(judge, load_pairs(cfg.evaluate.pairs, limit=cfg.evaluate.limit)[0])
        print(f"[rahf] reward: held-out pairwise accuracy {stats['heldout']['pairwise_accuracy']:.3f}", flush=True)
    return stats


def _instruct(cfg: RahfConfig, out: Path) -> dict:
    from .training import load_data, split_pairs

    step1, _ = split_pairs(cfg, load_data(cfg))
    base = base_model_path(cfg)
    method = cfg.instruct_method
    if method == "scit":
        from .instruct.scit import train_scit

        train_scit(cfg, base, step1, out)
    elif method == "dual":
        from .instruct.dual import SIDES, train_dual

        train_dual(cfg, base, step1, out, sides=("preferred",) if cfg.method == "preferred-sft" else SIDES)
    elif method == "dpo":
        from .baselines.dpo import train_dpo

        train_dpo(cfg, base, step1, out)
    else:
        from .baselines.ppo import train_ppo

        train_ppo(cfg, base, reward_model_path(cfg, cfg.ppo.reward_model), [list(p.prompt) for p in step1], out)
    return {"n_pairs": len(step1), "method": cfg.method, "finetune": cfg.finetune}


def _collect(cfg: RahfConfig, out: Path) -> dict:
    from .collect import examples_for, write_cache
    from .models import load_tokenizer
    from .training import load_data, split_pairs

    layers = resolved_layers(cfg)
    tokenizer = load_tokenizer(str(step1_path(cfg)), cfg.trust_remote_code)
    _, pairs = split_pairs(cfg, load_data(cfg))
    reader = target_reader(cfg, layers, tokenizer.pad_token_id)
    return write_cache(reader, examples_for(tokenizer, pairs, cfg), out, reader.plus.config.hidden_size)


def _align(cfg: RahfConfig, out: Path) -> dict:
    from .align import train_align

    layers = resolved_layers(cfg)
    train_align(cfg, out, layers, cfg.alpha)
    base = {"model": str(step1_path(cfg))}
    if cfg.method == "dual":
        base["merge_first"] = "preferred"
    return {"layers": layers, "alpha": cfg.alpha, "adapter_base": base}


def _merge(cfg: RahfConfig, out: Path) -> dict:
    from .merge import merge_adapter
    from .models import load_tokenizer

    align = require_artifact(cfg, "align")
    merge_adapter(load_policy(cfg), align, out, load_tokenizer(str(align), cfg.trust_remote_code))
    return {}


def _generate(cfg: RahfConfig, out: Path) -> dict:
    from .generate import generate, read_prompts, write_generations
    from .models import load_tokenizer
    from .training import load_stage_model

    g = cfg.generate
    model_path, adapter, system = (g.model, None, None) if g.model else final_model(cfg)
    prompts = read_prompts(g.prompts)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    model = load_stage_model(model_path, cfg, adapter=adapter)
    responses = generate(
        model,
        tokenizer,
        prompts,
        g.max_new_tokens,
        g.temperature,
        g.top_p,
        g.batch_size,
        cfg.data.max_prompt_length,
        system=system,
        seed=cfg.seed,
    )
    write_generations(out / "generations.jsonl", prompts, responses)
    return {"n": len(responses), "model": model_path, "adapter": adapter, "settings": dataclasses.asdict(g)}


def _evaluate(cfg: RahfConfig, out: Path) -> dict:
    import json

    from .evaluate import evaluate_run

    metrics = evaluate_run(cfg)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"win_rate": metrics.get("win_rate", {}).get("win_rate")}


_STAGES = {
    "sft": _sft,
    "reward": _reward,
    "instruct": _instruct,
    "collect": _collect,
    "align": _align,
    "merge": _merge,
    "generate": _generate,
    "evaluate": _evaluate,
}


def describe(cfg: RahfConfig) -> str:
    """One line per stage: fresh, stale or missing."""
    lines = []
    for stage in active_stages(cfg):
        out = stage_dir(cfg, stage)
        try:
            fp, _ = stage_fingerprint(cfg, stage)
            state = "fresh" if is_fresh(out, fp) else ("stale" if out.exists() else "missing")
        except RahfError:
            state = "waiting for upstream"
        made = read_manifest(out).get("created", "") if state == "fresh" else ""
        lines.append(f"{stage:9s} {state:20s} {out} {made}")
    return "\n".join(lines)

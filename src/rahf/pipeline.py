"""The stages in order, each writing its folder under `output_dir` (`FOLDERS`) under a fingerprint of its inputs.

`run` skips a stage whose artifact carries the fingerprint its inputs give now and recomputes any
other (a changed config key, data file or upstream artifact changes the fingerprint downstream); a deleted collect
cache is made again only when align needs it (`collect_not_needed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .artifacts import (
    MANIFEST,
    artifact_identity,
    atomic_dir,
    discard,
    files_intact,
    fingerprint,
    fingerprint_path,
    foreign_files,
    is_fresh,
    lock_holder,
    lost_files,
    output_lock,
    rahf_marker,
    read_manifest,
    redacted,
    remove_discarded,
    restore_replaced,
    version_changes,
    write_text_atomic,
)
from .collect import collected_shards
from .config import METHOD_STAGES, RahfConfig, active_stages, check_again, flatten, resolved_layers, train_section
from .errors import RahfError, UpstreamError
from .preflight import check_some_stages, check_stage_folders, preflight, unread_cache_note
from .stimuli import Instruction, tally
from .trainargs import TRAIN_SECTIONS, train_defaults

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
        return instruct, None, Instruction(cfg.instructions.preferred, [cfg.instructions.dispreferred])
    return instruct, None, None  # dpo, rlhf-ppo


def require_artifact(cfg: RahfConfig, stage: str) -> Path:
    """The finished artifact of `stage` (a stage checks that it is also fresh: see `stage_fingerprint`)."""
    path = stage_dir(cfg, stage)
    if not (path / MANIFEST).is_file():
        how = f"`rahf {stage}` (or `rahf run`)" if stage in cfg.stages else f"`rahf {stage}`, or add {stage} to stages"
        made = _made_with_method(stage_dir(cfg, "instruct"))  # often: step 1 was run with another --method
        other = f"; {_method_hint(made, 'the instruct artifact there')}" if made and made != cfg.method else ""
        raise UpstreamError(f"{path}: no finished {stage} artifact; run {how} first{other}", stage)
    return path


def _method_hint(made: str, what: str) -> str:
    """Which `--method` builds on an artifact made for method `made`."""
    return f"{what} was made for method {made}: pass `--method {made}` to build on it"


def _fresh_fp(cfg: RahfConfig, stage: str, memo: dict[str, str | None]) -> str:
    """Identity (`artifact_identity`) of `stage`'s artifact; a RahfError when it is missing or was made from
    other inputs.

    `memo` holds what one check has computed already (each upstream stage and file is hashed once).
    """
    key = f"stage:{stage}"
    if key not in memo:
        path = require_artifact(cfg, stage)
        fp, covered, inputs = _stage_inputs(cfg, stage, memo)
        if not _current(path, fp):
            what = "collect cache" if stage == "collect" else f"{stage} artifact"
            why = _why_stale(path, covered, inputs)
            made = _made_with_method(path)
            if made and made != cfg.method:  # most often a stage command run without the `--method` the last one had
                raise UpstreamError(
                    f"{path}: this run's method is {cfg.method}, and {_method_hint(made, f'the {what}')}, or run "
                    f"`rahf {stage}` for {cfg.method} (it replaces that artifact)",
                    stage,
                )
            raise UpstreamError(f"{path}: the {what} {why}; run `rahf {stage}` (or `rahf run`) again", stage)
        memo[key] = artifact_identity(path)
    return memo[key]


def _changes(path: Path, covered: dict, inputs: dict[str, str | None]) -> str:
    """What differs between the manifest in `path` and the current settings, e.g. "changed: window, data contents"."""
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:  # an empty folder (rahf's are written whole, a user's refused: `check_stage_folders`)
        return "it holds no manifest"
    except (OSError, ValueError):
        return "its manifest is unreadable"
    if gone := lost_files(path):
        return f"files lost, cut short or changed: {', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}"

    # a setting on one side only was set or unset where settings are free-form (`*.train`, `revisions`: an empty
    # mapping there is as good as none); elsewhere every setting has a value, so it is one the stage now reads or no
    # longer reads (align's online targets read collect.*), which came with another change
    def free(key: str) -> bool:
        return ".train." in f".{key}." or f"{key}.".startswith("revisions.")

    old, new = (
        {k: v for k, v in flatten(tree).items() if not (v == {} and free(k))}
        for tree in (
            counted(str(manifest.get("stage")), manifest.get("config", {})),
            redacted(json.loads(json.dumps(covered, default=str))),
        )
    )
    set_or_unset = {k for k in old.keys() ^ new.keys() if free(k)}
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and (k in old) == (k in new)]
    keys = sorted([*keys, *set_or_unset])
    made_from = manifest.get("inputs", {})
    keys += [f"{name} contents" for name in sorted(inputs) if name in made_from and made_from[name] != inputs[name]]
    parts = [f"changed: {', '.join(keys)}"] if keys else []
    if came := sorted(new.keys() - old.keys() - set_or_unset):
        parts.append(f"now also reads: {', '.join(came)}")
    if went := sorted(old.keys() - new.keys() - set_or_unset):
        parts.append(f"no longer reads: {', '.join(went)}")
    return "; ".join(parts) or "its inputs changed"


def _made_with_method(path: Path) -> str | None:
    try:  # the run's own method: `config` records HIR's step 1 as SCIT's (`read_only`)
        manifest = read_manifest(path)
        return manifest.get("run_config", {}).get("method") or manifest.get("config", {}).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def _why_stale(path: Path, covered: dict, inputs: dict[str, str | None]) -> str:
    """`_changes` as the end of a sentence about the artifact at `path`."""
    changes = _changes(path, covered, inputs)
    return f"has {changes}" if changes.startswith("files") else f"was made with other settings ({changes})"


def _path_fp(path: str | Path | None, memo: dict[str, str | None], revision: str | None = None) -> str | None:
    """`fingerprint_path` of a configured file, folder or Hub id (None when unset), hashed once per check."""
    if path is None:
        return None
    key = f"path:{path}@{revision}"
    if key not in memo:
        memo[key] = fingerprint_path(path, revision)
    return memo[key]


def _base_fp(cfg: RahfConfig, memo: dict[str, str | None]) -> str | None:
    """Fingerprint of the model step 1 starts from (`base_model_path`): a fresh SFT artifact or `model`."""
    return _fresh_fp(cfg, "sft", memo) if "sft" in cfg.stages else _path_fp(cfg.model, memo, cfg.revision_of(cfg.model))


def _step1_fp(cfg: RahfConfig, memo: dict[str, str | None]) -> str | None:
    """Fingerprint of the model collect reads and align trains (`step1_path`)."""
    return _base_fp(cfg, memo) if cfg.method == "lorra" else _fresh_fp(cfg, "instruct", memo)


def _final_fp(cfg: RahfConfig, memo: dict[str, str | None]) -> str | None:
    """Fingerprint of the model the method ends with (`final_model`)."""
    if cfg.method in ("scit", "dual", "lorra"):
        return _fresh_fp(cfg, "merge", memo)
    return _base_fp(cfg, memo) if cfg.method == "sft" else _fresh_fp(cfg, "instruct", memo)


def _reward_fp(cfg: RahfConfig, configured: str | None, memo: dict[str, str | None]) -> str | None:
    """Fingerprint of a configured reward model, else of this run's fresh `reward` artifact (`reward_model_path`)."""
    return _path_fp(configured, memo, cfg.revision_of(configured)) if configured else _fresh_fp(cfg, "reward", memo)


def _evaluation_reward_fp(cfg: RahfConfig, memo: dict[str, str | None]) -> str | None:
    """The reward model `evaluate` scores with (judge and temperature sweep), as `evaluate_run` picks it."""
    e = cfg.evaluate
    if e.judge != "reward-model" and not e.temperatures:
        return None
    if e.judge_model or e.judge == "reward-model" or (stage_dir(cfg, "reward") / MANIFEST).is_file():
        return _reward_fp(cfg, e.judge_model, memo)
    return None  # a gold or LLM judge and no reward model: no temperature sweep


def _section(cfg: RahfConfig, *keys: str) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in keys}


def stage_fingerprint(cfg: RahfConfig, stage: str) -> tuple[str, dict]:
    """(fingerprint, the config it covers) of a stage given the current config and upstream artifacts.

    Every upstream artifact the stage reads must be fresh for `cfg` too, else a RahfError names the
    settings that changed: a stage never runs on top of a stale artifact.
    """
    fp, covered, _ = _stage_inputs(cfg, stage, {})
    return fp, covered


def _stage_inputs(cfg: RahfConfig, stage: str, memo: dict[str, str | None]) -> tuple[str, dict, dict]:
    """(fingerprint, covered config, fingerprint of each input) of `stage`."""

    def data() -> str | None:
        return _path_fp(cfg.data.path or None, memo)

    def instructions(reads: bool) -> dict:
        """The instructions, for a stage that puts them in its prompts (else their text cannot matter)."""
        return _section(cfg, "instructions") if reads else {}

    common = _section(cfg, "seed", "dtype", "trust_remote_code", "data")
    if not cfg.data.eval_size:  # nothing held out: fingerprints as before the setting existed
        del common["data"]["eval_size"]
    if cfg.dtype != "float32":  # how a 16-bit full fine-tune keeps its weights (float32 runs stay as they were)
        common["pure_dtype"] = cfg.pure_dtype
    lengths = {"data": {k: common["data"][k] for k in ("max_prompt_length", "max_response_length")}}
    prompt_contrast = instructions(cfg.contrast == "prompt")  # SCIT and LoRRA read v under the two instructions
    if stage == "sft":
        # SFT reads every pair (or sft.path), never the split between step 1 and collect/align
        unsplit = {k: v for k, v in common["data"].items() if k not in ("align_fraction", "share_pairs")}
        covered = common | (lengths if cfg.sft.path else {"data": unsplit})
        covered |= _section(cfg, "sft", "tokenizer") | {"model": cfg.model}
        inputs = {
            "model": _path_fp(cfg.model, memo, cfg.revision_of(cfg.model)),
            "tokenizer": _path_fp(cfg.tokenizer, memo, cfg.revision_of(cfg.tokenizer)),
            "data": _path_fp(cfg.sft.path, memo) if cfg.sft.path else data(),
        }
        if cfg.sft.path and cfg.data.eval_size:  # evaluated on the pairs held out of `data`
            held = {k: common["data"][k] for k in ("path", "format", "limit", "eval_size")}
            covered["data"] = covered["data"] | held
            inputs["eval_data"] = data()
    elif stage == "reward":
        from .reward import resolve_backbone

        covered = common | _section(cfg, "reward")
        if cfg.reward.model is None:  # this run's SFT model
            backbone = _base_fp(cfg, memo)
        else:
            backbone = resolve_backbone(cfg.reward.model, base_model_path(cfg))
            backbone = _path_fp(backbone, memo, cfg.revision_of(backbone))
        inputs = {"backbone": backbone, "data": data()}
    elif stage == "instruct":
        covered = common | _section(cfg, "method", "instruct") | {"finetune": cfg.finetune}
        covered |= instructions(cfg.instruct_method == "scit")
        inputs = {"base": _base_fp(cfg, memo), "data": data()}
        if cfg.method == "dpo":
            covered |= _section(cfg, "dpo")
        if cfg.method == "rlhf-ppo":  # the reward model scores rollouts truncated to reward.max_length
            covered |= _section(cfg, "ppo") | {"reward": {"max_length": cfg.reward.max_length}}
            inputs["reward"] = _reward_fp(cfg, cfg.ppo.reward_model, memo)
    elif stage == "collect":
        covered = common | _section(cfg, "method", "window", "include_boundary", "collect") | prompt_contrast
        covered["layers"] = resolved_layers(cfg)
        inputs = {"instruct": _step1_fp(cfg, memo), "data": data()}
    elif stage == "align":
        covered = common | _section(cfg, "method", "window", "include_boundary", "alpha", "align") | prompt_contrast
        covered["layers"] = resolved_layers(cfg)
        inputs = {"instruct": _step1_fp(cfg, memo)}
        if cfg.align.targets == "cache":
            inputs["collect"] = _deleted_collect(cfg, memo) or _fresh_fp(cfg, "collect", memo)
        else:  # targets are read during training, as collect would read them
            covered["collect"] = {"responses": cfg.collect.responses, "difference": cfg.collect.difference}
            inputs["data"] = data()
    elif stage == "merge":
        covered = _section(cfg, "method", "dtype", "trust_remote_code")
        inputs = {"policy": _step1_fp(cfg, memo), "align": _fresh_fp(cfg, "align", memo)}
    elif stage == "generate":
        covered = _section(cfg, "generate", "seed", "method", "dtype", "trust_remote_code") | lengths
        seed = covered["generate"].pop("seed")  # the seed replies are sampled with, under the key it always had
        covered["seed"] = cfg.seed if seed is None else seed
        covered |= instructions(cfg.method == "hir")  # HIR answers under the preferred instruction
        g = cfg.generate.model
        model = _path_fp(g, memo, cfg.revision_of(g)) if g else _final_fp(cfg, memo)
        inputs = {"model": model, "prompts": _path_fp(cfg.generate.prompts, memo)}
    elif stage == "evaluate":
        covered = _section(cfg, "evaluate", "seed", "method", "dtype", "trust_remote_code") | lengths
        covered |= instructions(cfg.method == "hir")
        inputs = {
            "model": _final_fp(cfg, memo),
            "reference": _base_fp(cfg, memo) if cfg.method != "sft" else None,  # KL drift is measured from it
            "pairs": _path_fp(cfg.evaluate.pairs, memo),
            "neutral_prompts": _path_fp(cfg.evaluate.neutral_prompts, memo),
            "reward_model": _evaluation_reward_fp(cfg, memo),
        }
        if inputs["reward_model"] is not None:  # the judge reads this many tokens of each reply
            covered["reward"] = {"max_length": cfg.reward.max_length}
    else:
        raise RahfError(f"unknown stage {stage!r}")
    covered = counted(stage, covered)
    return fingerprint({"stage": stage, "config": covered, "inputs": inputs}), covered, inputs


DELETED_COLLECT = "not needed while align is up to date"  # of a deleted collect cache (`collect_not_needed`)


def _deleted_collect(cfg: RahfConfig, memo: dict[str, str | None]) -> str | None:
    """The collect identity align's manifest records, when `collect/` is gone and collect would now be made with the
    fingerprint recorded there; else None.

    Collect is an intermediate artifact: a cache only align reads (tens of GB at 7B), which a user may delete once
    align is done. Align, and all built on it, is then judged against that record, and `run` makes collect
    again only when align must be recomputed (`collect_not_needed`).
    """
    if os.path.lexists(stage_dir(cfg, "collect")):
        return None
    try:
        recorded = read_manifest(stage_dir(cfg, "align")).get("inputs", {}).get("collect")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, str) or recorded.split(":")[0] != _stage_inputs(cfg, "collect", memo)[0]:
        return None
    return recorded


def collect_not_needed(cfg: RahfConfig) -> bool:
    """Whether `collect/` was deleted (`_deleted_collect`) while this run's align is up to date against its record:
    then nothing needs the cache, and `run` leaves it deleted."""
    if "align" not in active_stages(cfg):
        return False
    memo: dict[str, str | None] = {}
    try:
        if _deleted_collect(cfg, memo) is None:
            return False
        return _current(stage_dir(cfg, "align"), _stage_inputs(cfg, "align", memo)[0])
    except UpstreamError:
        return False


def counted(stage: str, covered: dict) -> dict:
    """The settings of `covered` that `stage`'s fingerprint counts (`read_only`, `without_defaults`, `results_only`,
    `without_paths`, -0.0 as 0.0); applied to the settings a manifest records as well, so artifacts made before a
    setting stopped counting keep their fingerprints."""
    return read_only(stage, without_defaults(results_only(without_paths(_signless_zeros(covered)))))


def _signless_zeros(value: Any) -> Any:
    """`value` with every -0.0 in it as 0.0: the same setting (a label noise of -0.0 swaps no pair)."""
    if isinstance(value, dict):
        return {k: _signless_zeros(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_signless_zeros(v) for v in value]
    return value + 0.0 if isinstance(value, float) else value


def without_defaults(covered: dict, run: dict | None = None) -> dict:
    """`covered` without the entries of its `*.train` mappings that give a field the value its stage trains with
    anyway (`train_defaults`: `instruct.train.learning_rate: 2.0e-5` for SCIT's full fine-tune, `seed` the run's
    own), so that a default written out retrains nothing. `run`: the settings those values depend on, as a
    fingerprint covers them (default: `covered`)."""
    out = dict(covered)
    for section, value in covered.items():
        if section in TRAIN_SECTIONS and isinstance(value, dict) and isinstance(value.get("train"), dict):
            defaults = train_defaults(section, covered if run is None else run)
            if defaults is not None:
                train = {k: v for k, v in value["train"].items() if not (k in defaults and _same(v, defaults[k]))}
                out[section] = value | {"train": train}
    return out


def _same(value: Any, default: Any) -> bool:
    """A written value is the default (`2e-5` is 2.0e-05, `3` is 3.0), but true is not 1."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


# Config keys naming a file, folder or model whose content (a Hub model: the commit it loads) the `inputs` of every
# stage whose settings hold the key fingerprint (directly, or through the upstream artifact built from it: align's
# data.path through collect): how the path is spelled, absolute or relative, through a symlink, from a moved project
# folder, does not count.
PATH_KEYS = (
    "data.path", "sft.path", "model", "tokenizer", "reward.model", "generate.model", "generate.prompts",
    "evaluate.pairs", "evaluate.neutral_prompts", "evaluate.judge_model", "ppo.reward_model",
)  # fmt: skip


def without_paths(covered: dict) -> dict:
    """`covered` without the settings of PATH_KEYS."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in covered.items()}
    for dotted in PATH_KEYS:
        section, _, name = dotted.rpartition(".")
        node = out.get(section) if section else out
        if isinstance(node, dict):
            node.pop(name, None)
    return out


def read_only(stage: str, covered: dict) -> dict:
    """The instruct stage's `covered` settings without those its method does not read, so changing them retrains
    nothing: HIR trains SCIT's step 1; DPO and PPO read their own sections, not `instruct`; a full fine-tune reads no
    `instruct.lora`, Dual no `label_smoothing` (the resolved `finetune` stands for `instruct.finetune`). Applied to
    a manifest's recorded settings as well, so artifacts made before keep their fingerprints."""
    if stage != "instruct":
        return covered
    out = covered | ({"method": "scit"} if covered.get("method") == "hir" else {})
    if out.get("method") in ("dpo", "rlhf-ppo"):
        return {k: v for k, v in out.items() if k not in ("instruct", "finetune")}
    unread = {"finetune"} | ({"lora"} if out.get("finetune") == "full" else set())
    unread |= set() if out.get("method") == "scit" else {"label_smoothing"}
    if isinstance(out.get("instruct"), dict):
        out["instruct"] = {k: v for k, v in out["instruct"].items() if k not in unread}
    return out


# Settings of a `*.train` mapping that change what a trainer logs, shows or checkpoints on the way, how worker
# processes load the batches the main process samples, or how processes talk to each other (an artifact is fresh for
# any number of processes too), never the weights it makes (transformers 5 / TRL 1 read them
# only for logs, checkpoints and data loading): changing them leaves an artifact fresh, as a logging tweak must not
# retrain a 7B model, and leaves an interrupted stage's checkpoints resumable.
NEUTRAL_TRAIN_KEYS = frozenset(
    {
        "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "logging_nan_inf_filter",
        "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm", "report_to", "run_name", "project",
        "trackio_space_id", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "ddp_backend", "ddp_timeout",
    }
)  # fmt: skip
# How often and how a stage evaluates on the held-out pairs (`data.eval_size`): an evaluation puts back the random
# state it found (`training.leaves_randomness`), so these change the weights only through `load_best_model_at_end`
NEUTRAL_EVAL_KEYS = frozenset(
    {
        "eval_strategy", "eval_steps", "eval_on_start", "eval_delay", "per_device_eval_batch_size",
        "eval_accumulation_steps", "eval_do_concat_batches", "prediction_loss_only",
    }
)  # fmt: skip


# Of NEUTRAL_TRAIN_KEYS, those that decide which checkpoints `load_best_model_at_end` can pick from
BEST_PICKING_KEYS = frozenset({"save_strategy", "save_steps"})


def _current(path: Path, fp: str) -> bool:
    """`path` holds a finished artifact for fingerprint `fp`: its manifest's, or, for one made before the settings
    of NEUTRAL_TRAIN_KEYS left fingerprints, the one its recorded settings and inputs give without them."""
    if is_fresh(path, fp):
        return True
    try:
        m = read_manifest(path)
    except (OSError, ValueError):
        return False
    if not isinstance(m.get("config"), dict) or not isinstance(m.get("inputs"), dict) or not files_intact(path):
        return False
    config = counted(str(m.get("stage")), m["config"])
    return fingerprint({"stage": m.get("stage"), "config": config, "inputs": m["inputs"]}) == fp


def results_only(covered: dict) -> dict:
    """`covered` without the settings of NEUTRAL_TRAIN_KEYS and NEUTRAL_EVAL_KEYS in its `*.train` mappings (with
    `load_best_model_at_end`, which checkpoint is kept depends on both: then only NEUTRAL_TRAIN_KEYS but
    BEST_PICKING_KEYS), nor `ppo.save_steps`, nor an adapter dropout that training switches off (PPO's always, DPO's unless
    `dpo.train.disable_dropout: false`)."""
    out = dict(covered)
    for section, value in covered.items():
        if isinstance(value, dict) and isinstance(value.get("train"), dict):
            # with the best model kept, when the stage evaluates and saves picks the weights it ends with
            best = value["train"].get("load_best_model_at_end")
            neutral = NEUTRAL_TRAIN_KEYS - BEST_PICKING_KEYS if best else NEUTRAL_TRAIN_KEYS | NEUTRAL_EVAL_KEYS
            train = {k: v for k, v in value["train"].items() if k not in neutral}
            out[section] = value | {"train": train}
    if isinstance(out.get("ppo"), dict):  # how often PPO checkpoints, like a Trainer's save_steps
        out["ppo"] = {k: v for k, v in out["ppo"].items() if k != "save_steps"}
    for section in ("dpo", "ppo"):
        value = out.get(section)
        off = section == "ppo" or (isinstance(value, dict) and (value.get("train") or {}).get("disable_dropout", True))
        if off and isinstance(value, dict) and isinstance(value.get("lora"), dict):
            out[section] = value | {"lora": {k: v for k, v in value["lora"].items() if k != "dropout"}}
    return out


def load_policy(cfg: RahfConfig):
    """The model step 3 trains, as one plain model: SCIT the step-1 model, Dual the preferred one, LoRRA the base.

    A Dual LoRA adapter comes merged into its base, so the alignment LoRA sits on a plain model.
    """
    from .training import load_stage_model

    return load_stage_model(step1_path(cfg), cfg, adapter="preferred" if cfg.method == "dual" else None)


def target_reader(cfg: RahfConfig, layers: list[int], pad_id: int, policy=None):
    """A TargetReader over resident models; `policy` (read with its adapter disabled) serves as the plus model.

    SCIT and LoRRA hold one model. Dual without `policy` (collect) holds one base carrying both LoRA
    adapters, switched per forward. Dual with `policy` (online align: the merged preferred model under
    the alignment LoRA) or with full fine-tunes holds the dispreferred model as a second full model.
    """
    from .collect import AdapterView, TargetReader
    from .training import has_adapters, load_adapters, load_stage_model

    if cfg.contrast == "prompt":
        return TargetReader(cfg, layers, pad_id, policy if policy is not None else load_policy(cfg))
    sides = ("preferred", "dispreferred")
    if policy is None and has_adapters(step1_path(cfg), sides):
        shared = load_adapters(step1_path(cfg), cfg, sides)
        return TargetReader(cfg, layers, pad_id, *(AdapterView(shared, side) for side in sides))
    plus = policy if policy is not None else load_policy(cfg)
    return TargetReader(cfg, layers, pad_id, plus, load_stage_model(step1_path(cfg), cfg, adapter="dispreferred"))


_CALLS = threading.local()  # how deep this thread is in library calls (`one_call`)


@contextlib.contextmanager
def one_call(cfg: RahfConfig, stage: str | None = None) -> Iterator[None]:
    """The span of one library call (`run`, `run_stage`, `rahf.compare.run_compare`), the calls it makes included.

    The outermost call checks `cfg` again if a program changed it since it was loaded (the configs compare builds
    from it inside are not the user's to check). It looks Hub commits and hf:// files up afresh, so a long-lived
    process (a notebook, a sweep) sees a new upload as a new process would, while every stage within the call sees
    the same one. The launcher's mixed precision and compile backend stay out of the stages, as `rahf` keeps them
    out (with a note); they, and what a stage's Trainer set for the whole process, are given back to the caller when
    it ends. A program started by `accelerate launch` or `torchrun` joins its process group with `cfg`'s settings,
    as `rahf` does, each process on its own device.
    """
    from .artifacts import hub_commit
    from .hubfiles import download
    from .training import process_group_settings, process_settings_kept

    depth = getattr(_CALLS, "depth", 0)
    _CALLS.depth = depth + 1
    try:
        if depth:
            yield
            return
        check_again(cfg, stage)
        hub_commit.cache_clear()
        download.cache_clear()
        with process_settings_kept(), distributed.without_launcher_settings() as notes:
            for note in notes if distributed.is_main() else []:
                print(f"[rahf] note: {note}", flush=True)
            distributed.setup(*process_group_settings(cfg))  # nothing to do in one process, or once joined
            yield
    finally:
        _CALLS.depth = depth


def run_stage(cfg: RahfConfig, stage: str, force: bool = False, restart: bool = False) -> Path:
    """Run one stage unless its artifact is fresh (or `force`); returns the artifact folder.

    A training stage's Trainer checkpoints (`<stage>.train.save_strategy`) go to `<artifact>.checkpoints/` beside
    the artifact, tagged with the stage's fingerprint: a run killed part-way leaves them there, and running the
    stage again with the same inputs and settings resumes from the newest, forced or not; any other run, or one
    with `restart` (`rahf run --force`), discards them.

    Launched as several processes, process 0 decides and writes the artifact; the others join the stages that split
    their work (`PARALLEL_STAGES`), writing only into a scratch folder, and wait for it through the others.
    """
    from .models import free_memory
    from .training import process_settings_kept

    with one_call(cfg, stage):
        try:
            with process_settings_kept():
                if distributed.world_size() > 1 and stage not in PARALLEL_STAGES:
                    distributed.on_main(lambda: _run_stage(cfg, stage, force, restart, together=False))
                    return stage_dir(cfg, stage)
                return _run_stage(cfg, stage, force, restart, together=distributed.world_size() > 1)
        finally:
            free_memory()  # the stage's models, before the next stage loads its own


def _run_stage(cfg: RahfConfig, stage: str, force: bool, restart: bool, together: bool) -> Path:
    """`run_stage`; `together`: every process runs the stage's work, process 0 alone writes the artifact."""
    from .training import CHECKPOINTS

    main = distributed.is_main()
    if main:  # a user's folder where the stage writes: refused before anything runs (by the process that writes:
        check_stage_folders(cfg, [stage])  # another could see its checkpoint folder half made)
    fp, covered, inputs = _stage_inputs(cfg, stage, {})
    out = stage_dir(cfg, stage)
    with output_lock(cfg.output_dir) if main else contextlib.nullcontext():  # a second run stops here
        if main:
            restore_replaced(out)  # a kill in the middle of replacing it must not cost the artifact
        plan = _plan(cfg, stage, out, fp, covered, inputs, force, restart) if main else None
        if together:
            plan = distributed.share(plan)
        if plan is None:
            return out
        saves = Path(plan["saves"]) if plan["saves"] else None
        torch.manual_seed(cfg.seed)
        if not main:
            _scratch_run(cfg, stage, saves)
            distributed.wait()  # process 0 has written the artifact
            return out
        t0 = time.time()
        extra: dict = dict(plan["extra"])
        token = CHECKPOINTS.set(saves)
        try:
            with atomic_dir(out, stage, fp, covered, extra, inputs, cfg.to_dict()) as tmp:
                with tally() as counts:
                    extra.update(_STAGES[stage](cfg, tmp) or {})
                extra["seconds"] = round(time.time() - t0, 2)
                if together:
                    extra["processes"] = distributed.world_size()
                if counts:
                    extra["examples"] = dict(counts)
                    print(f"[rahf] {stage}: {_examples_summary(cfg, counts)}", flush=True)
                shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        except BaseException:
            if saves is not None and (kept := _kept_work(saves)):
                print(
                    f"[rahf] {stage}: kept {kept} in {saves}: running this stage again with the same settings resumes there"
                )
            elif saves is not None:
                with contextlib.suppress(OSError):
                    discard(saves)
            raise
        finally:
            CHECKPOINTS.reset(token)
        if saves is not None:
            with contextlib.suppress(OSError):
                discard(saves)
        print(f"[rahf] {stage}: done in {time.time() - t0:.1f}s", flush=True)
        if together:
            distributed.wait()
        return out


def _plan(
    cfg: RahfConfig, stage: str, out: Path, fp: str, covered: dict, inputs: dict, force: bool, restart: bool
) -> dict | None:
    """None when `stage`'s artifact is fresh; otherwise what running it needs: its checkpoint folder (made or kept
    here) and the manifest's note of what it resumes from."""
    if not force and _current(out, fp):
        changed = version_changes(out)
        made = f"; made with other versions ({changed}): `rahf {stage} CONFIG` redoes it" if changed else ""
        print(f"[rahf] {stage}: up to date ({out}){made}", flush=True)
        return None
    if os.path.lexists(out / MANIFEST) and not force:  # an artifact made otherwise; an empty folder is as none
        print(f"[rahf] {stage}: {out} {_why_stale(out, covered, inputs)}; recomputing", flush=True)
    if stage == "align" and cfg.align.targets == "cache":  # judged against a deleted cache (`_deleted_collect`),
        require_artifact(cfg, "collect")  # it cannot be made from it: said before any model loads
    print(f"[rahf] {stage}: running -> {out}", flush=True)
    saves = _checkpoint_folder(cfg, stage, fp, restart)
    extra: dict = {}
    if saves is not None and (resumed := resume_points(saves)):  # `seconds` then counts this run's part only
        extra["resumed_from"] = {str(c.relative_to(saves)): step for c, step, _ in resumed}
    elif saves is not None and (shards := collected_shards(saves)):
        extra["resumed_from"] = {"shards": shards}
    return {"saves": str(saves) if saves is not None else None, "extra": extra}


def _scratch_run(cfg: RahfConfig, stage: str, saves: Path | None) -> None:
    """A process other than 0 does its part of `stage`; what it writes besides the shared checkpoints is dropped."""
    from .training import CHECKPOINTS

    token = CHECKPOINTS.set(saves)
    try:
        with tempfile.TemporaryDirectory(prefix=f"rahf-{stage}-") as tmp:
            _STAGES[stage](cfg, Path(tmp))
    finally:
        CHECKPOINTS.reset(token)


TRAINING_STAGES = ("sft", "reward", "instruct", "align")  # the stages that train with a (TRL) Trainer
# the stages that split their work over several processes (the others run on process 0 while the rest wait)
PARALLEL_STAGES = (*TRAINING_STAGES, "collect", "generate", "evaluate")
RESUMABLE_STAGES = (*TRAINING_STAGES, "collect")  # collect keeps the shards it finished
CHECKPOINT_TAG = "rahf-checkpoints.json"


def checkpoint_folder(cfg: RahfConfig, stage: str) -> Path:
    """Where the Trainer of `stage` checkpoints (collect: its finished shards): beside its artifact, so that it
    outlives an interrupted run."""
    out = stage_dir(cfg, stage)
    return out.with_name(out.name + ".checkpoints")


def _checkpoint_folder(cfg: RahfConfig, stage: str, fp: str, restart: bool) -> Path | None:
    """The checkpoint folder of a training stage about to run: the one an interrupted run with this fingerprint
    left (any other is removed), or a new one, tagged with the fingerprint before training (so that a killed
    process leaves it tagged), when the stage's Trainer saves checkpoints (collect always keeps its shards); None
    when there is nothing to resume and nothing will be saved."""
    if stage not in RESUMABLE_STAGES:
        return None
    saves = checkpoint_folder(cfg, stage)
    remove_discarded(saves)
    processes = distributed.world_size()  # the batch of a step, and collect's shards, depend on it
    tag = _checkpoint_tag(saves)
    made_by = tag.get("processes", 1)
    if saves.exists() and (restart or tag.get("fingerprint") != fp or made_by != processes):
        if _kept_work(saves):
            why = "--force" if restart else "other inputs or settings"
            if not restart and tag.get("fingerprint") == fp:
                why = f"{made_by} process{'es' * (made_by != 1)}, and this run has {processes}"
            print(f"[rahf] {stage}: discarding the checkpoints in {saves} (made with {why})", flush=True)
        discard(saves)
    if not saves.exists():
        if not _saves_checkpoints(cfg, stage):
            return None
        saves.mkdir(parents=True)
        tag = {"stage": stage, "fingerprint": fp, "processes": processes}
        write_text_atomic(saves / CHECKPOINT_TAG, json.dumps(tag))
    return saves


def _saves_checkpoints(cfg: RahfConfig, stage: str) -> bool:
    """Whether `stage` writes checkpoints to resume from: collect always (its shards), rlhf-ppo's loop with
    `ppo.save_steps`, a Trainer with a `save_strategy`."""
    if stage == "collect":
        return True
    if stage == "instruct" and cfg.method == "rlhf-ppo":
        return cfg.ppo.save_steps is not None
    return getattr(cfg, train_section(cfg, stage)).train.get("save_strategy", "no") != "no"


def _checkpoint_tag(saves: Path) -> dict:
    """What the stage run that made the checkpoints in `saves` recorded: its fingerprint and number of processes
    (none recorded: one); {} when there is no readable tag."""
    try:
        tag = json.loads((saves / CHECKPOINT_TAG).read_text())
    except (OSError, ValueError):
        return {}
    return tag if isinstance(tag, dict) else {}


def _kept_work(saves: Path) -> str:
    """What an interrupted run left in `saves` to resume from, in words ("" when nothing)."""
    if shards := collected_shards(saves):
        return f"{shards} finished shard{'s' * (shards != 1)}"
    return "; ".join(f"{c.relative_to(saves)}, step {step} of {total}" for c, step, total in resume_points(saves))


def resume_points(saves: Path) -> list[tuple[Path, int, int]]:
    """(checkpoint, step, steps in all) of each training in `saves` (Dual's two sides each have a sub-folder) that
    a run can resume from."""
    from .training import checkpoint_step, last_checkpoint

    if not saves.is_dir():
        return []
    folders = [saves, *sorted(p for p in saves.iterdir() if p.is_dir() and not p.name.startswith("checkpoint-"))]
    return [(c, *(checkpoint_step(c) or (0, 0))) for f in folders if (c := last_checkpoint(f)) is not None]


def _examples_summary(cfg: RahfConfig, counts: Counter) -> str:
    """What the length limits and the data did to a stage's examples, e.g. "600 examples (a prompt and one reply)
    built; in 212 the prompt lost its beginning to data.max_prompt_length=64"."""
    d = cfg.data
    parts = [
        (counts["prompt cut"], f"the prompt lost its beginning to data.max_prompt_length={d.max_prompt_length}"),
        (counts["reply cut"], f"the reply was cut to data.max_response_length={d.max_response_length}"),
        (counts["reply empty"], "the reply is empty"),
    ]
    said = [f"in {n} {what}" for n, what in parts if n]
    return f"{counts['examples']} examples (a prompt and one reply) built" + (
        f"; {'; '.join(said)}" if said else ", none cut"
    )


def refuse_while_written(cfg: RahfConfig) -> None:
    """Stop at once when another rahf run holds the output folder's lock: checked before the checks that read its
    artifacts, which would otherwise report the stages it is writing as missing ("run rahf instruct first"). The
    writing process checks (the others of a launch would see its own lock)."""
    if distributed.is_main() and (holder := lock_holder(cfg.output_dir)):
        raise RahfError(
            f"output_dir: {cfg.output_dir} is being written by another rahf run ({holder}); wait for it to end, or "
            "give this run another output_dir"
        )


def run(cfg: RahfConfig, force: bool = False) -> None:
    """All configured stages the method uses, in order (after `preflight`), but a deleted collect cache that align,
    up to date, does not need (`collect_not_needed`)."""
    with one_call(cfg):
        refuse_while_written(cfg)
        check_some_stages(cfg)
        check_stage_folders(cfg, active_stages(cfg))  # a user's folder where a stage writes: before anything else
        preflight(cfg)
        skipped = [s for s in cfg.stages if s not in METHOD_STAGES[cfg.method]]
        if skipped:
            print(f"[rahf] method {cfg.method} has no {', '.join(skipped)} stage; skipping", flush=True)
        if note := unread_cache_note(cfg):
            print(f"[rahf] note: {note}", flush=True)
        with output_lock(cfg.output_dir) if distributed.is_main() else contextlib.nullcontext():  # the whole run
            for stage in active_stages(cfg):
                if stage == "collect" and not force and distributed.on_main(lambda: collect_not_needed(cfg)):
                    if distributed.is_main():
                        print(
                            f"[rahf] collect: {stage_dir(cfg, stage)} deleted, {DELETED_COLLECT}; skipping", flush=True
                        )
                    continue
                run_stage(cfg, stage, force=force, restart=force)


def _sft(cfg: RahfConfig, out: Path) -> dict:
    from .sft import run_sft

    return _with_eval(cfg, {}, *run_sft(cfg, out))


def _with_eval(cfg: RahfConfig, stats: dict, metrics: dict, n_pairs: int | None = None) -> dict:
    """`stats` with a stage's metrics on the `n_pairs` pairs `data.eval_size` holds out (None: read them to count),
    when it holds some out."""
    if not metrics:
        return stats
    if n_pairs is None:
        from .training import load_eval_pairs

        n_pairs = len(load_eval_pairs(cfg))
    return stats | {"eval": metrics, "n_eval_pairs": n_pairs}


def _reward(cfg: RahfConfig, out: Path) -> dict:
    from .reward import resolve_backbone, train_reward_model
    from .training import load_split, split_pairs, train_dtype

    pairs, held_out = load_split(cfg)
    step1, _ = split_pairs(cfg, pairs)
    backbone = resolve_backbone(cfg.reward.model, base_model_path(cfg))
    r = cfg.reward
    judge, metrics = train_reward_model(
        step1, backbone, out, r.train, cfg.seed, cfg.trust_remote_code, r.max_length, cfg.revision_of(backbone),
        cfg.dtype, train_dtype(cfg, full=True), held_out,
    )  # fmt: skip
    if metrics and distributed.is_main():  # TRL's eval_accuracy averages batches; this one counts pairs
        from .reward import evaluate_reward_model

        metrics["eval_pairwise_accuracy"] = evaluate_reward_model(judge, held_out)["pairwise_accuracy"]
        accuracy = metrics["eval_pairwise_accuracy"]
        print(f"[rahf] reward: pairwise accuracy on the {len(held_out)} pairs data.eval_size holds out {accuracy:.3f}")
    stats: dict = _with_eval(cfg, {"n_pairs": len(step1), "backbone": backbone}, metrics, len(held_out))
    if cfg.evaluate.pairs:  # how well it ranks held-out pairs, recorded in the manifest
        from .data import load_pairs
        from .reward import evaluate_reward_model

        judged = load_pairs(cfg.evaluate.pairs, limit=cfg.evaluate.limit)[0]
        stats["heldout"] = evaluate_reward_model(judge, judged)
        accuracy = stats["heldout"]["pairwise_accuracy"]
        print(
            f"[rahf] reward: pairwise accuracy on the {len(judged)} pairs of evaluate.pairs {accuracy:.3f}", flush=True
        )
    return stats


def _instruct(cfg: RahfConfig, out: Path) -> dict:
    from .training import load_split, split_pairs

    pairs, held_out = load_split(cfg)
    step1, _ = split_pairs(cfg, pairs)
    base = base_model_path(cfg)
    method = cfg.instruct_method
    metrics: dict = {}
    if method == "scit":
        from .instruct.scit import train_scit

        metrics = train_scit(cfg, base, step1, out, held_out)
    elif method == "dual":
        from .instruct.dual import SIDES, train_dual

        sides = ("preferred",) if cfg.method == "preferred-sft" else SIDES
        metrics = train_dual(cfg, base, step1, out, sides, held_out)
    elif method == "dpo":
        from .baselines.dpo import train_dpo

        metrics = train_dpo(cfg, base, step1, out, held_out)
    else:  # PPO's own loop evaluates nothing on the held-out pairs (preflight says so)
        from .baselines.ppo import train_ppo

        train_ppo(cfg, base, reward_model_path(cfg, cfg.ppo.reward_model), [list(p.prompt) for p in step1], out)
    stats = {"n_pairs": len(step1), "method": cfg.method, "finetune": cfg.finetune}
    return _with_eval(cfg, stats, metrics, len(held_out))


def _collect(cfg: RahfConfig, out: Path) -> dict:
    from .collect import examples_for, move_shards, write_cache
    from .models import load_tokenizer
    from .training import CHECKPOINTS, load_split, split_pairs

    layers = resolved_layers(cfg)
    tokenizer = load_tokenizer(str(step1_path(cfg)), cfg.trust_remote_code, cfg.revision_of(step1_path(cfg)))
    pairs, held_out = load_split(cfg)
    _, pairs = split_pairs(cfg, pairs)
    reader = target_reader(cfg, layers, tokenizer.pad_token_id)
    width = reader.plus.config.get_text_config(decoder=True).hidden_size  # a multimodal model's: its LM's
    saves = CHECKPOINTS.get()
    stats = write_cache(reader, examples_for(tokenizer, pairs, cfg), out, width, saves=saves)
    held: dict = {}
    if held_out:  # the targets align evaluates on, in eval/
        held_saves = saves / "eval" if saves is not None else None
        for folder in (out / "eval", held_saves):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        examples = examples_for(tokenizer, held_out, cfg)
        held = write_cache(reader, examples, out / "eval", width, held_saves, desc="collect (data.eval_size)")
    if not distributed.is_main():  # process 0 alone moves and reports
        return {}
    if saves is not None:  # the finished shards stayed there until the whole cache was written
        move_shards(saves, out, stats["shards"])
        if held:
            move_shards(saves / "eval", out / "eval", held["shards"])
    return stats | ({"eval": held} if held else {})


def _align(cfg: RahfConfig, out: Path) -> dict:
    from .align import step1_adapter, train_align

    layers = resolved_layers(cfg)
    metrics = train_align(cfg, out, layers, cfg.alpha)
    if not distributed.is_main():
        return {}
    base = {"model": str(step1_path(cfg))}
    if adapter := step1_adapter(cfg):  # the adapter's config names the step-1 adapter's base: merge this first
        base = {"model": base_model_path(cfg), "merge_first": str(adapter)}
    stats = {"layers": layers, "alpha": cfg.alpha, "adapter_base": base}
    stats["target_fit"] = json.loads((out / "target_fit.json").read_text())
    if (out / "target_fit_eval.json").is_file():
        stats["target_fit_eval"] = json.loads((out / "target_fit_eval.json").read_text())
    return _with_eval(cfg, stats, metrics)


def _merge(cfg: RahfConfig, out: Path) -> dict:
    from .merge import merge_adapter
    from .models import load_tokenizer

    align = require_artifact(cfg, "align")
    merge_adapter(load_policy(cfg), align, out, load_tokenizer(str(align), cfg.trust_remote_code))
    return {}


def _generate(cfg: RahfConfig, out: Path) -> dict:
    from .generate import read_prompts, replies, write_generations
    from .models import load_tokenizer
    from .training import load_stage_model

    g = cfg.generate
    model_path, adapter, system = (g.model, None, None) if g.model else final_model(cfg)
    prompts = read_prompts(g.prompts)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, cfg.revision_of(model_path))
    model = load_stage_model(model_path, cfg, adapter=adapter)
    made = distributed.split(  # each process replies to its share of the prompts (every one, in one process)
        len(prompts),
        lambda mine: replies(
            model,
            tokenizer,
            [prompts[i] for i in mine],
            g.max_new_tokens,
            g.temperature,
            g.top_p,
            g.batch_size,
            cfg.data.max_prompt_length,
            system=system,
            seed=cfg.seed if g.seed is None else g.seed,
            progress=distributed.is_main(),
            streams=mine,
        ),
    )
    write_generations(out / "generations.jsonl", prompts, made)
    cut = sum(r.finish_reason == "length" for r in made)
    if cut and distributed.is_main():
        print(
            f"[rahf] generate: {cut} of {len(made)} replies reached generate.max_new_tokens={g.max_new_tokens} before "
            'a stop token (finish_reason "length" in generations.jsonl)',
            flush=True,
        )
    return {"n": len(made), "cut": cut, "model": model_path, "adapter": adapter, "settings": dataclasses.asdict(g)}


def _evaluate(cfg: RahfConfig, out: Path) -> dict:
    import json

    from .evaluate import evaluate_run

    metrics = evaluate_run(cfg, generations=out / "generations.jsonl")
    if not distributed.is_main():  # it did its share of the work; process 0 writes and prints
        return {}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    w = metrics["win_rate"]
    line = f"win rate {w['win_rate']:.3f} (95% interval {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f}, {w['n']} replies)"
    if metrics.get("judge_score") is not None:
        line += f", judge score {metrics['judge_score']:.3f}"
    if metrics.get("kl_per_token") is not None and cfg.method != "sft":  # the SFT model is its own reference
        line += f", KL/token vs {base_model_path(cfg)} {metrics['kl_per_token']:.4f}"
    print(f"[rahf] evaluate ({cfg.evaluate.judge} judge): {line}", flush=True)
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


def unused_sft_note(cfg: RahfConfig, stages: list[str]) -> str | None:
    """Why a run that finds an `sft/` it does not list in `stages` starts from `model` instead, or None."""
    sft = stage_dir(cfg, "sft")
    reads_base = any(s in stages for s in ("reward", "instruct")) or cfg.method in ("lorra", "sft")
    if "sft" not in stages and reads_base and (sft / MANIFEST).is_file():
        return f"{sft} exists, but stages does not list sft, so this run starts from model ({cfg.model}); add sft to stages to start from it"
    return None


def _foreign_reason(out: Path, found: list[str]) -> str:
    """Why `rahf status` shows the stage folder `out` as foreign, and what to do (as `refuse_foreign` says it)."""
    if not out.is_dir():
        return "a file rahf did not write; a run stops here: move it out of output_dir"
    manifest = rahf_marker(out, MANIFEST)
    if os.path.lexists(out / MANIFEST) and manifest is None:
        return "its manifest is unreadable, or not rahf's; a run stops here: delete it if rahf wrote it"
    if manifest is not None and not isinstance(manifest.get("files"), dict):
        return "written by an earlier rahf, whose manifest lists no files; a run stops here: delete it if it holds nothing of yours"
    return f"holds files rahf did not write: {', '.join(found[:2])}; a run stops here: move it out of output_dir"


def describe(cfg: RahfConfig) -> str:
    """One line per stage: fresh, stale, missing, deleted (collect: `collect_not_needed`), or waiting for the
    upstream stage it reads; notes first (a run writing the folder now, an `sft/` the stages leave unused).

    Any other problem (an unreadable model or data file) is raised, so the user sees what it is.
    """
    lines = []
    if holder := lock_holder(cfg.output_dir):
        lines.append(
            f"note: a rahf run ({holder}) is writing {cfg.output_dir} now: what it builds shows as missing or stale until it is done"
        )
    if note := unused_sft_note(cfg, active_stages(cfg)):
        lines.append(f"note: {note}")
    if any(Path(cfg.output_dir).glob("noise-*/seed-*")):
        lines.append(
            f"note: {cfg.output_dir} holds the runs of `rahf compare` (noise-*/seed-*/), which status does not read: "
            "the lines below are the one run `rahf run` makes of this config there"
        )
    for stage in active_stages(cfg):
        out = stage_dir(cfg, stage)
        note = ""
        if (out.exists() and not out.is_dir()) or (found := foreign_files(out)):
            lines.append(f"{stage:9s} {'foreign':20s} {out} ({_foreign_reason(out, found)})")
            continue
        try:
            fp, covered, inputs = _stage_inputs(cfg, stage, {})
            state = "fresh" if _current(out, fp) else ("stale" if os.path.lexists(out / MANIFEST) else "missing")
            note = read_manifest(out).get("created", "") if state == "fresh" else ""
            if state == "fresh" and (changed := version_changes(out)):
                note = f"{note} (made with {changed})"
            note = f"({_changes(out, covered, inputs)})" if state == "stale" else note
            if stage == "collect" and state == "missing" and collect_not_needed(cfg):
                state, note = "deleted", f"({DELETED_COLLECT})"
            saves = checkpoint_folder(cfg, stage)
            tag = _checkpoint_tag(saves)
            if state in ("stale", "missing") and (kept := _kept_work(saves)):  # the next run runs the stage
                if tag.get("fingerprint") == fp:
                    launched = f" as {tag['processes']} processes" if tag.get("processes", 1) != 1 else ""
                    note = f"{note} (interrupted: running it again{launched} resumes from {kept})".strip()
                else:  # `_checkpoint_folder` discards them when the stage runs
                    held = f"{saves.name} holds {kept}, made with other inputs or settings: the next run discards it"
                    note = f"{note} ({held})".strip()
        except UpstreamError as e:
            state = f"waiting for {e.stage}"
        lines.append(f"{stage:9s} {state:20s} {out} {note}".rstrip())
    return "\n".join(lines)

"""Shared pieces of the training stages: Trainer arguments, splits of the pairs, loading stage models."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from .config import LoraSettings, RahfConfig
from .data import PreferencePair, load_pairs
from .distributed import world_size
from .errors import ConfigError, DataError
from .models import decoder_blocks, default_device, load_model
from .trainargs import EVAL_DEFAULTS, as_fields, train_arguments


def training_args(cls, cfg: RahfConfig, out: Path, overrides: dict[str, Any], **defaults):
    """`cls` (TrainingArguments or a TRL config) with rahf's defaults, then the stage's `train:` overrides.

    The run's `seed` seeds the stage (data order too) unless its `train:` sets `seed` (and `data_seed`)."""
    user = train_arguments("train", overrides, cls)  # validated at load; here numbers are read as such
    seed = user.get("seed", cfg.seed)
    values: dict[str, Any] = {
        "output_dir": str(checkpoint_dir(out)),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "seed": seed,
        "data_seed": seed,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": cfg.dtype == "bfloat16" and torch.cuda.is_available(),
        "remove_unused_columns": False,
    }
    if cfg.data.eval_size:  # held-out pairs to evaluate on
        values.update(EVAL_DEFAULTS)
    values.update(defaults)
    values.update(user)
    return one_device(cls(**one_process(as_fields(cls, values))))


# Where a stage's Trainer checkpoints: `pipeline.run_stage` points it at a folder beside the artifact that outlives
# an interrupted run, so that running the stage again resumes; unset (library calls), the stage's own folder.
CHECKPOINTS: ContextVar[Path | None] = ContextVar("rahf_checkpoints", default=None)


def checkpoint_dir(out: Path) -> Path:
    """The folder the Trainer of the stage writing `out` saves its checkpoints in (`save_strategy` other than no)."""
    return CHECKPOINTS.get() or out / "checkpoints"


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint in `folder` that a Trainer (or rahf's PPO loop) can resume from as if it had never
    stopped (`complete`)."""
    found = []
    for path in Path(folder).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and complete(path):
            found.append((int(step), path))
    return max(found)[1] if found else None


# What the Trainer saves in a checkpoint besides its weights and trainer state: without the schedule it silently
# restores no optimizer state either, and without the random state the data order and dropout differ
_RESUME_STATE = ("optimizer.pt", "scheduler.pt")
# rahf's own PPO loop writes its checkpoints (`baselines.ppo.save_checkpoint`) under a temporary name, renamed when
# complete; this file holds its step and log
PPO_STATE = "ppo_state.json"
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")  # the Trainer saves safetensors; rahf reads no pickle
_WEIGHT_INDEXES = ("model.safetensors.index.json",)


def complete(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds all a Trainer resumes from: weights (one file, or an index and every shard it
    names), optimizer, schedule and random state, and a readable trainer state. That is written last, so a checkpoint
    cut short by a kill lacks it; one saved with `save_only_model` has no optimizer state; one whose deletion was
    interrupted (any file may go first) can lack anything. A PPO checkpoint is renamed into place once complete and
    renamed aside before it is deleted; its files are checked all the same."""
    if (checkpoint / PPO_STATE).is_file():
        files = (PPO_STATE, "weights.safetensors", "optimizer.safetensors", "rng_state.safetensors")
        return checkpoint_step(checkpoint) is not None and all((checkpoint / f).is_file() for f in files)
    if checkpoint_step(checkpoint) is None or not all((checkpoint / f).is_file() for f in _RESUME_STATE):
        return False
    if not any(checkpoint.glob("rng_state*.pth")):  # rng_state.pth, or rng_state_<process>.pth for several
        return False
    return any((checkpoint / f).is_file() for f in _WEIGHTS) or any(
        _shards_present(checkpoint / f) for f in _WEIGHT_INDEXES
    )


def _shards_present(index: Path) -> bool:
    """Whether the sharded-weights `index` is readable and every shard it names is there."""
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((index.parent / name).is_file() for name in shards)


def checkpoint_step(checkpoint: Path) -> tuple[int, int] | None:
    """(step reached, steps in all) that `checkpoint`'s trainer (or PPO) state records; None when it has no readable
    one."""
    ppo = checkpoint / PPO_STATE
    try:
        state = json.loads((ppo if ppo.is_file() else checkpoint / "trainer_state.json").read_text())
        return int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# what transformers' enable_full_determinism (a stage's `train.full_determinism`) sets in the environment
_DETERMINISM_ENV = (
    "CUDA_LAUNCH_BLOCKING",
    "CUBLAS_WORKSPACE_CONFIG",
    "ASCEND_LAUNCH_BLOCKING",
    "HCCL_DETERMINISTIC",
    "FLASH_ATTENTION_DETERMINISTIC",
)


@contextmanager
def process_settings_kept() -> Iterator[None]:
    """Put back, when a stage ends, what its Trainer set for the whole process: `full_determinism`'s deterministic
    algorithms, cuDNN flags and environment variables, and `log_level`'s transformers verbosity. One stage's `train`
    mapping then reaches neither the next stage nor the program that runs rahf as a library."""
    import os

    from transformers.utils import logging as hf_logging

    env = {name: os.environ.get(name) for name in _DETERMINISM_ENV}
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    verbosity = hf_logging.get_verbosity()
    try:
        yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        hf_logging.set_verbosity(verbosity)


def run_trainer(trainer, stage: str) -> dict[str, float]:
    """`trainer.train()`, resumed from the newest checkpoint an interrupted run of this stage left in its
    `output_dir` (run_stage keeps that folder only for the same inputs and settings); returns `held_out_metrics`."""
    last = last_checkpoint(trainer.args.output_dir)
    if last is not None:
        step, total = checkpoint_step(last) or (0, 0)
        print(f"[rahf] {stage}: resuming from {last} (step {step} of {total})", flush=True)
        trainer.log = whole_run_loss(trainer, last)  # the Trainer calls self.log
    trainer.evaluate = leaves_randomness(trainer.evaluate)  # the Trainer calls self.evaluate
    try:
        uneven_note(trainer.args, len(trainer.train_dataset), stage)
        trainer.train(resume_from_checkpoint=str(last) if last else None)
        return held_out_metrics(trainer, stage)
    finally:  # the wrappers hold the Trainer's own methods: a cycle that kept it, its model and optimizer state alive
        del trainer.evaluate
        trainer.__dict__.pop("log", None)


def whole_run_loss(trainer, checkpoint: Path) -> Callable[..., None]:
    """`trainer.log` that gives the closing summary of a run resumed from `checkpoint` the `train_loss` of the whole
    run, as an uninterrupted run logs it: the Trainer's own averages only the steps of this `train()` call (0.0 when
    the checkpoint was at the last step, and no step ran).

    The Trainer's `train_loss` is the loss summed over the optimizer steps divided by their number. The steps before
    the checkpoint come from the "loss" entries of its log history, each the mean over the steps since the previous
    one. Steps between the last of them and the checkpoint were never logged, and the mean leaves them out (it is
    exact when the checkpoint is at a logging step). After an earlier resume from such a point, the first loss logged
    after it is counted over those steps as well. With no step's loss on record the summary has no `train_loss`."""
    import functools

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    resumed_at, before, logged = int(state["global_step"]), 0.0, 0
    for entry in state["log_history"]:
        if "loss" in entry:
            before += entry["loss"] * (entry["step"] - logged)
            logged = entry["step"]
    log = trainer.log

    @functools.wraps(log)
    def wrapped(logs: dict[str, float], *args, **kwargs):
        if "train_loss" in logs:
            ran = trainer.state.global_step - resumed_at
            if logged + ran:
                logs["train_loss"] = (before + logs["train_loss"] * ran) / (logged + ran)
            else:
                del logs["train_loss"]
        return log(logs, *args, **kwargs)

    return wrapped


def uneven_note(args, n: int, stage: str) -> None:
    """With several processes, accelerate fills a last step that the `n` examples do not fill by repeating the
    epoch's first examples, where one process trains a smaller last batch: say so, as that is where two processes'
    weights part from one's."""
    from .distributed import is_main

    step = args.world_size * args.per_device_train_batch_size
    if args.world_size > 1 and n % step and not args.dataloader_drop_last and is_main():
        print(
            f"[rahf] {stage}: {n} examples do not fill the last step of {args.world_size} processes x "
            f"{args.per_device_train_batch_size}: accelerate repeats {step - n % step} of them there each epoch, "
            f"where one process trains a smaller batch (with a multiple of {step} examples both train the same weights)",
            flush=True,
        )


def leaves_randomness(evaluate):
    """`evaluate` that puts back the random state it found: starting a data loader draws from torch's generator, so
    an evaluation would otherwise change the dropout masks of every later step, and with them the weights. So
    how often and how a stage evaluates changes its logs only (pipeline.NEUTRAL_EVAL_KEYS)."""
    import functools

    import numpy as np

    @functools.wraps(evaluate)
    def wrapped(*args, **kwargs):
        states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        devices = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            return evaluate(*args, **kwargs)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])
            if devices is not None:
                torch.cuda.set_rng_state_all(devices)

    return wrapped


# evaluation logs that time or count rather than measure the model
_NOT_MEASURES = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens")


def held_out_metrics(trainer, stage: str) -> dict[str, float]:
    """The trained model's metrics on the held-out pairs (`data.eval_size`; {} without them): the evaluation at the
    last step when one ran there and the model kept is the last one, else a new evaluation. Printed once."""
    if trainer.eval_dataset is None:
        return {}
    state = trainer.state
    logged = [log for log in state.log_history if "eval_loss" in log]
    if logged and logged[-1].get("step") == state.global_step and not trainer.args.load_best_model_at_end:
        metrics = logged[-1]
    else:
        metrics = trainer.evaluate()
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in _NOT_MEASURES}
    shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    print(f"[rahf] {stage}: on the {len(trainer.eval_dataset)} examples data.eval_size holds out: {shown}", flush=True)
    return metrics


def process_group_settings(cfg: RahfConfig) -> tuple[int, str | None]:
    """(timeout in seconds, backend) of the process group a launch joins before any Trainer: the largest
    `ddp_timeout` of the stages' `train:` mappings (the Trainer's default, 1800), and the `ddp_backend` they name."""
    trains = [cfg.sft.train, cfg.instruct.train, cfg.dpo.train, cfg.reward.train, cfg.align.train]
    timeout = max(int(t.get("ddp_timeout", 1800)) for t in trains)
    backends = sorted({t["ddp_backend"] for t in trains if t.get("ddp_backend")})
    if len(backends) > 1:
        raise ConfigError(f"*.train.ddp_backend: the stages name {' and '.join(backends)}; one launch uses one backend")
    return timeout, backends[0] if backends else None


def one_process(values: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments without `ddp_backend` when this process was started alone: the Trainer would try to make a
    process group of that backend for one process, and fail."""
    return values if world_size() > 1 else {k: v for k, v in values.items() if k != "ddp_backend"}


def one_device(args):
    """`args` for one process on one device: with several GPUs visible the Trainer would wrap the model in
    nn.DataParallel, which hides the decoder blocks the alignment loss reads (and TRL's RewardTrainer refuses)."""
    if args.n_gpu > 1:
        args._n_gpu = 1
    return args


def train_dtype(cfg: RahfConfig, full: bool) -> str:
    """The dtype to load a model for training in: float32 master weights for a 16-bit full fine-tune.

    AdamW's step at lr 2e-5 is below bfloat16's resolution for most weights, so 16-bit weights would mostly
    not move; float32 weights (with bf16 autocast on CUDA) train as mixed precision does, and are saved in
    `dtype`. LoRA adapters are float32 already (PEFT), so their frozen base stays in `dtype`.
    """
    return "float32" if full and cfg.dtype != "float32" and not cfg.pure_dtype else cfg.dtype


def step1_learning_rate(finetune: str) -> float:
    """Step 1's default learning rate: the authors' 2e-5 for a full fine-tune, 2e-4 for LoRA adapters.

    LoRA trains few, freshly initialised weights and needs the larger step; SCIT and Dual share these.
    """
    return 2e-5 if finetune == "full" else 2e-4


class ListDataset(torch.utils.data.Dataset):
    """A list as a map-style dataset (examples that are not tensors, batched by our own collators)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def load_data(cfg: RahfConfig) -> list[PreferencePair]:
    """The configured pairs that train, with `data.label_noise` of them swapped (chosen <-> rejected); the pairs
    `data.eval_size` holds out are not among them."""
    return load_split(cfg)[0]


def load_eval_pairs(cfg: RahfConfig) -> list[PreferencePair]:
    """The pairs `data.eval_size` holds out of every training stage, labels as given; [] when it holds none."""
    return load_split(cfg)[1] if cfg.data.eval_size else []


def load_split(cfg: RahfConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(pairs that train, label noise applied; pairs held out for evaluation during training), from one read."""
    pairs, _ = load_pairs(cfg.data.path, cfg.data.format, limit=cfg.data.limit)
    train, held = hold_out(pairs, cfg.data.eval_size, cfg.seed)
    return flip_labels(train, cfg.data.label_noise, cfg.seed), held


def hold_out(pairs: list[PreferencePair], size: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(the rest, the held-out pairs): `size` pairs (a fraction below 1, or a count) picked by a seeded shuffle, each
    side in file order. The held-out pairs keep their labels: label noise is for training, not for measuring."""
    if not size:
        return pairs, []
    k = int(size) if size >= 1 else round(size * len(pairs))
    if not 0 < k < len(pairs):
        raise DataError(
            f"data.eval_size: {size} of {len(pairs)} pairs holds out {k}, leaving "
            f"{'nothing to evaluate on' if k == 0 else 'no pair to train on'}; change data.eval_size or add pairs"
        )
    held = set(random.Random(f"eval-{seed}").sample(range(len(pairs)), k))
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def flip_labels(pairs: list[PreferencePair], fraction: float, seed: int) -> list[PreferencePair]:
    """Swap chosen and rejected in round(fraction * n) pairs picked by a seeded shuffle (simulated label noise)."""
    k = round(fraction * len(pairs))
    if k == 0:
        return pairs
    flipped = set(random.Random(f"label-noise-{seed}").sample(range(len(pairs)), k))
    return [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if i in flipped else p for i, p in enumerate(pairs)
    ]


def split_pairs(cfg: RahfConfig, pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(pairs for step 1, pairs for collect/align): a seeded shuffle, or every pair for both."""
    if cfg.data.share_pairs:
        return pairs, pairs
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    k = round(len(pairs) * cfg.data.align_fraction)
    if k == 0 or k == len(pairs):
        raise DataError(
            f"data.path: {len(pairs)} pairs split by data.align_fraction={cfg.data.align_fraction} leave one side "
            "empty; add pairs, change the fraction, or set data.share_pairs: true"
        )
    return [pairs[i] for i in order[k:]], [pairs[i] for i in order[:k]]


def lora_config(
    model,
    settings: LoraSettings,
    max_layer: int | None = None,
    task_type: str = "CAUSAL_LM",
    revision: str | None = None,
):
    """A peft LoraConfig; with `max_layer`, only blocks 0..max_layer-1 (those that shape the target layers).

    `revision` is the Hub revision of the base model, which the saved adapter records so that PEFT (and
    `load_stage_model`) reload the base the adapter was trained on."""
    from peft import LoraConfig

    targets = settings.target_modules
    if targets is None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= names else None
    kwargs: dict[str, Any] = {}
    if outside := _outside_language_model(model):
        kwargs["exclude_modules"] = outside
    if max_layer is not None:
        kwargs["layers_to_transform"] = list(range(max_layer))
        blocks = decoder_blocks(model)
        kwargs["layers_pattern"] = next(n for n, m in model.named_modules() if m is blocks).rsplit(".", 1)[-1]
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=task_type,
        revision=revision,
        **kwargs,
    )


def check_lora_targets(model, settings: LoraSettings, key: str, max_layer: int | None = None) -> str | None:
    """Stop (ConfigError naming `key`) when LoRA with `settings` would adapt no module of `model` (a meta-device
    copy serves: nothing is computed), or when a name listed in `target_modules` matches none, which PEFT
    passes over in silence while another name matches. Returns a note when some of the covered blocks get no
    adapter (hybrid models: q_proj/v_proj only in their attention blocks); None otherwise."""
    from peft import get_peft_model

    try:
        blocks = decoder_blocks(model)
    except ConfigError:  # no one module per block (XLM): fine for an adapter on the whole model
        if max_layer is not None:
            raise
        blocks = None
    covered = list(range(max_layer)) if max_layer is not None else list(range(len(blocks or [])))
    where = f"blocks 0..{covered[-1]}" if max_layer is not None else "the model's blocks"
    linear = dict.fromkeys(
        n.rsplit(".", 1)[-1]
        for part in ([blocks[i] for i in covered] if blocks is not None else [model])
        for n, m in part.named_modules()
        if n and getattr(getattr(m, "weight", None), "ndim", 0) == 2 and next(m.children(), None) is None
    )
    fix = f"set {key}.target_modules to names of their layers: {', '.join(linear) or 'none found'}"
    embeddings = _tied_embeddings(model)
    config = lora_config(model, settings, max_layer)
    try:
        adapted = get_peft_model(model, config)
    except ValueError:
        if config.target_modules is None:  # no q_proj/v_proj, and PEFT knows no default for the architecture
            problem = f"unset, and PEFT has no default for {model.config.model_type} models"
        else:
            targets = sorted(config.target_modules)
            named = ", ".join(targets) + (" (the default)" if settings.target_modules is None else "")
            problem = f"{named} {'matches' if len(targets) == 1 else 'match'} no module in {where}"
        raise ConfigError(f"{key}.target_modules: {problem}; {fix}") from None
    names = [n for n, m in adapted.get_base_model().named_modules() if hasattr(m, "lora_A")]
    for role, name in embeddings.items():
        if name in names:
            other = "output layer" if role == "input embeddings" else "input embeddings"
            raise ConfigError(
                f"{key}.target_modules: adapts the {role}, which this model shares with its {other} "
                "(tie_word_embeddings): merging the adapter would change both, and the merged model would not be the "
                "trained one; leave them out"
            )
    for target in settings.target_modules or []:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(f"{key}.target_modules: {target!r} matches no module in {where}; {fix}")
    empty = [i for i in covered if not any(hasattr(m, "lora_A") for m in decoder_blocks(adapted)[i].modules())]
    if not empty:
        return None
    kinds = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return (
        f"{key} adapts {len(covered) - len(empty)} of {len(covered)} blocks ({kinds}): "
        f"block(s) {', '.join(map(str, empty))} have none of these modules: add theirs to {key}.target_modules "
        "to train them too"
    )


def _tied_embeddings(model) -> dict[str, str]:
    """{"input embeddings": name, "output layer": name} of `model`'s modules when the two share one weight, else {}."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inputs, outputs = (get_in() if get_in else None), (get_out() if get_out else None)
    if inputs is None or outputs is None or getattr(inputs, "weight", None) is not getattr(outputs, "weight", 0):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {"input embeddings": names[id(inputs)], "output layer": names[id(outputs)]}


def _outside_language_model(model) -> str | None:
    """A regex for the modules outside the language model and its output layer (a vision tower, a projector),
    None when there are none: LoRA there would train nothing on text, yet grow the adapter."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT matches the inner names
    names = {id(m): n for n, m in model.named_modules()}
    decoder = names.get(id(model.get_decoder())) if hasattr(model, "get_decoder") else None
    if not decoder:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = re.escape(decoder) + r"(\..+)?" + (f"|{re.escape(names[id(head)])}" if id(head) in names else "")
    leaves = (n for n, m in model.named_modules() if n and next(m.children(), None) is None)
    if all(re.fullmatch(kept, n) for n in leaves):
        return None
    return f"(?!(?:{kept})$).+"


def load_stage_model(path: str | Path, cfg: RahfConfig, adapter: str | None = None, device: str | None = None):
    """A model folder, or a PEFT adapter folder (merged into its base, `adapter_base`), as a plain eval-mode model.

    `adapter` picks a sub-folder, e.g. Dual's `preferred` adapter under the instruct artifact.
    """
    path = Path(path) / adapter if adapter else Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        safetensors_adapter(path)
        name, revision = adapter_base(path, cfg)
        base = load_model(name, cfg.dtype, cfg.trust_remote_code, device, revision)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()
    return load_model(str(path), cfg.dtype, cfg.trust_remote_code, device or default_device(), cfg.revision_of(path))


def safetensors_adapter(path: Path) -> None:
    """PEFT reads `adapter_model.bin`, a pickle, where no safetensors file is there; rahf reads no pickle."""
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"{path} holds no adapter_model.safetensors (rahf does not load adapter_model.bin: a pickle can run code "
            "when it is read); if you trust it, save the adapter once with save_pretrained, which writes safetensors"
        )


def adapter_base(path: str | Path, cfg: RahfConfig) -> tuple[str, str | None]:
    """(model, revision) that the PEFT adapter folder `path` is loaded on. For an adapter of this run's step 1 (in its
    instruct artifact) that is the model step 1 starts from now (`pipeline.base_model_path`), which the artifact's
    fingerprint covers; its `adapter_config.json` names the folder it was trained on, for PEFT users, and that may be
    another run's after a run folder is copied (or the old place after one is moved). Any other adapter: the base its
    config names."""
    from peft import PeftConfig

    from .pipeline import base_model_path, stage_dir

    if Path(path).resolve().is_relative_to(stage_dir(cfg, "instruct").resolve()):
        base = base_model_path(cfg)
        return base, cfg.revision_of(base)
    recorded = PeftConfig.from_pretrained(str(path))
    return recorded.base_model_name_or_path, recorded.revision


def has_adapters(path: str | Path, names: tuple[str, ...]) -> bool:
    """Whether every sub-folder `names` of `path` is a PEFT adapter (LoRA Dual), not a full model."""
    return all((Path(path) / name / "adapter_config.json").is_file() for name in names)


def load_adapters(path: str | Path, cfg: RahfConfig, names: tuple[str, ...]):
    """One base model (`adapter_base`) carrying the PEFT adapters of sub-folders `names` of `path`, unmerged, in eval
    mode.

    The base weights are held once; `set_adapter(name)` picks the adapter the next forward uses.
    """
    from peft import PeftModel

    first = Path(path) / names[0]
    for name in names:
        safetensors_adapter(Path(path) / name)
    name, revision = adapter_base(first, cfg)
    base = load_model(name, cfg.dtype, cfg.trust_remote_code, revision=revision)
    model = PeftModel.from_pretrained(base, str(first), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(Path(path) / name), adapter_name=name)
    return model.eval()

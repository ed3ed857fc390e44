"""A stage's `train:` mapping: read as the fields of its Trainer's arguments class take them (TrainingArguments, or
TRL's SFT, DPO and reward configs), refused where the stage would ignore or crash on a field, and built once up front
so that the library's own rules speak before any model loads. Part of `config.validate`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from enum import Enum
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from .artifacts import secret_key
from .config import ABOVE_0, AT_LEAST_0, AT_LEAST_1, HABITS, SEED, STEP1_HOSTS, Range
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RahfConfig

# Counts and rates in `*.train` that the trainers take as given (a batch of 0 fails only once training starts).
TRAIN_RANGES: dict[str, Range] = {
    **dict.fromkeys(
        ("per_device_train_batch_size", "per_device_eval_batch_size", "precompute_ref_batch_size", "max_length"),
        AT_LEAST_1,
    ),
    **dict.fromkeys(("gradient_accumulation_steps", "eval_accumulation_steps", "max_steps"), AT_LEAST_1),
    "num_train_epochs": ABOVE_0,
    "learning_rate": AT_LEAST_0,
    **dict.fromkeys(("seed", "data_seed"), SEED),
    "dataloader_num_workers": Range(0),
}
UNSET_MAX_STEPS = -1  # TrainingArguments' "train num_train_epochs instead"
# How a `train:` value's expected type reads in a message; the types `_train_value` checks.
KIND_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _expected(kinds: tuple) -> str:
    """`(float, NoneType)` -> "a number": what a value of a field with these alternatives must be (enums are named
    by strings, and a float field takes integers too)."""
    names = [KIND_NAMES.get(str if k in _enums(kinds) else get_origin(k) or k) for k in kinds]
    return " or ".join(n for n in dict.fromkeys(names) if n and not (n == "an integer" and float in kinds))


def _enums(kinds: tuple) -> set[type]:
    """The Enum classes among a field's alternatives (`SchedulerType | str` takes only SchedulerType's values)."""
    return {k for k in kinds if isinstance(k, type) and issubclass(k, Enum)}


_YAML11_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-5: a string to YAML 1.1, a number to 1.2


def _numbers_read(value: Any, key: str) -> Any:
    """A mapping inside `train:` (lr_scheduler_kwargs, model_init_kwargs) with numbers that YAML 1.1 left as text
    (`min_lr: 1e-5`) read as numbers: no field type says what they are, and a scheduler would divide by the text.
    A number that is not finite is a ConfigError naming its key (a NaN `min_lr` trains at learning rate 0)."""
    if isinstance(value, dict):
        return {k: _numbers_read(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_read(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and (_YAML11_FLOAT_TEXT.fullmatch(value.strip()) or ".lr_scheduler_kwargs." in key):
        with contextlib.suppress(ValueError):  # a schedule's options are numbers, but for names (decay_type: cosine)
            value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    return value


def _train_value(key: str, value: Any, hint: Any) -> Any:
    """A `train:` value as its field's type takes it, else a ConfigError naming the key: YAML 1.1 reads `1e-3` as a
    string, which the optimizer would refuse only once the model has loaded; an int field refuses 1.5, and a whole
    number reads as an int in any number field (2.0 as 2); null, lists and mappings only where the type has them; an enum field only its values."""
    kinds = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    enums = _enums(kinds)
    origins = {get_origin(k) or k for k in kinds} - enums
    if not origins <= {*KIND_NAMES, type(None), Literal}:
        return value  # a type rahf does not read (Any, ParallelismConfig): building the arguments checks it
    literals = [a for k in kinds if get_origin(k) is Literal for a in get_args(k)]
    if value is None:
        if type(None) in kinds:
            return None
        raise ConfigError(f"{key}: must not be null; leave the key out for the default")
    if any(type(value) is type(a) and value == a for a in literals):
        return value
    item = next((get_args(k) or (Any,) for k in kinds if (get_origin(k) or k) is list), None)
    if item and not isinstance(value, list) and origins <= {list, type(None)}:
        return _train_value(key, value, item[0])  # one item for a list (DPOConfig's loss_type: "sigmoid")
    if isinstance(value, str) and dict in origins and key.endswith("_kwargs"):  # keyword arguments, never a file
        with contextlib.suppress(ValueError):  # the Trainer reads a JSON object given as text
            if isinstance(parsed := json.loads(value), dict):
                _numbers_read(parsed, key)
                return value
        raise ConfigError(f"{key}: expected a mapping (or a JSON object), got {value!r}")
    if isinstance(value, (list, dict)):
        if type(value) not in origins:
            raise ConfigError(f"{key}: expected {_expected(kinds)}, got {KIND_NAMES[type(value)]}")
        if isinstance(value, dict):
            return _numbers_read(value, key)
        return [_train_value(f"{key}[{i}]", v, item[0]) for i, v in enumerate(value)]
    names = [str(m.value) for e in enums for m in e] + [str(a) for a in literals]
    only_names = enums or (literals and str not in kinds)  # a field that takes only `names`
    if value is False and "no" in names and only_names:  # YAML 1.1 reads `save_strategy: no` as false
        return "no"
    if isinstance(value, bool) and only_names and bool not in kinds:
        raise ConfigError(
            f"{key}: expected one of {', '.join(names)}, got {value} (YAML reads yes/on as true: quote it)"
        )
    if isinstance(value, str) and only_names:
        if value not in names:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}")
        return value
    numeric = {int, float} & origins
    if isinstance(value, str) and numeric:
        try:
            value = float(value)
        except ValueError:
            if str in kinds:
                return value
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not numeric:
        if type(value) not in origins:
            raise ConfigError(f"{key}: expected {_expected(kinds)}, got {value!r}")
        return value
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if float(value).is_integer():  # 1 and 1.0 are one setting: one value in the manifest, one fingerprint
        return int(value)  # (an int, as TrainingArguments' own defaults for steps are)
    if float in numeric:
        return float(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def train_arguments(section: str, values: dict[str, Any], cls) -> dict[str, Any]:
    """A stage's `train:` mapping checked against `cls` (TrainingArguments or a TRL config): known fields, no
    credential, values of the field's type, counts in range."""
    fields = get_type_hints(cls)
    known = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cls)}  # TRL lists some fields' values
    out = {}
    for key, value in values.items():
        if not isinstance(key, str):  # YAML 1.1 reads yes/on/no/off and numbers as such
            raise ConfigError(f"{section}.train: key {key!r} is not a field name; quote it if it is meant as one")
        if secret_key(key):  # hub_token; not eos_token or pad_token
            raise ConfigError(
                f"{section}.train.{key}: the config is copied into every artifact manifest, so it must hold no "
                "credential; set the HF_TOKEN environment variable instead"
            )
        if key not in known:
            raise ConfigError(
                f"{section}.train.{key}: not a field of {cls.__name__}{_train_meant(section, key, known)}"
            )
        value = out[key] = _train_value(f"{section}.train.{key}", value, fields[key])
        if (choices := known[key]) and value is not None and value not in choices:
            raise ConfigError(f"{section}.train.{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        allowed = TRAIN_RANGES.get(key)
        unset = key == "max_steps" and value == UNSET_MAX_STEPS
        if allowed and value is not None and not unset and value not in allowed:
            also = " (or -1: train num_train_epochs)" if key == "max_steps" else ""
            raise ConfigError(f"{section}.train.{key}: must be {allowed}{also}, got {value}")
    if "output_dir" in values:
        raise ConfigError(f"{section}.train.output_dir: set by rahf; use output_dir at the top level")
    return out


def _train_meant(section: str, key: str, known: Iterable[str]) -> str:
    """ "; did you mean ..." for a field its arguments class lacks: the field another tool names so (`lr`), or a close
    spelling."""
    import difflib

    habit = HABITS.get(key, "")
    field = habit.removeprefix("train.") if habit.startswith("train.") else None
    found = [field] if field in known else difflib.get_close_matches(key, list(known), n=3)
    return f"; did you mean {', '.join(f'{section}.train.{k}' for k in found)}?" if found else ""


# The learning-rate schedule a stage trains with when its `train:` mapping names none (the Trainer's own: linear)
STAGE_SCHEDULES = {"align": "constant", "dual": "cosine"}  # the authors' step 3 and Dual's two SFTs


def as_fields(cls, values: dict[str, Any]) -> dict[str, Any]:
    """`values` for building `cls`: a whole number (read as an int, so that 1 and 1.0 are one setting) goes back to a
    float where the field takes floats only, since TRL copies some into a model's strictly typed config
    (`router_aux_loss_coef: 0.0`)."""
    hints = get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        hint = hints.get(key)
        kinds = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        if type(value) is int and float in kinds and int not in kinds:
            out[key] = float(value)
    return out


def _build_arguments(section: str, values: dict[str, Any], cls) -> None:
    """Build `cls` from a checked `train:` mapping as its stage will, so that the library's own rules (step
    combinations, ...) refuse a value now rather than after the earlier stages have trained. The build writes
    nothing and sets up the CPU only, in one process, so neither CUDA nor a launch's process group is touched; its
    warnings come again when the stage runs."""

    def build(settings: dict[str, Any]) -> Any:
        from .distributed import alone

        with warnings.catch_warnings(), alone():
            warnings.simplefilter("ignore")
            # ddp_backend: the launch's process group's (distributed.setup)
            built = {k: v for k, v in settings.items() if k != "ddp_backend"}
            return cls(**as_fields(cls, {"report_to": "none", "save_strategy": "no"} | built | {"use_cpu": True}))

    try:
        args = build(values)
    except (ValueError, TypeError, ImportError, OSError) as e:  # ImportError: deepspeed; OSError: a config file
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        named = next((k for k in values if re.search(rf"\b{re.escape(k)}\b", problem)), None)
        named = named or next((k for k in values if isinstance(values[k], str) and values[k] in problem), None)
        raise ConfigError(f"{section}.train{'.' + named if named else ''}: {problem}") from None
    _check_optimization(section, args)
    _check_optimizer_settings(section, values, args, build)


def _check_optimization(section: str, args) -> None:
    """The optimizer package and learning-rate schedule `args` name, made as the Trainer makes them (on one stand-in
    parameter), and the Liger kernels: a package that is not installed, or a schedule without the settings it needs,
    would otherwise stop the stage after the earlier ones have trained."""
    import torch
    from transformers import Trainer, get_scheduler
    from transformers.utils import is_liger_kernel_available

    if args.use_liger_kernel and not is_liger_kernel_available():
        raise ConfigError(
            f"{section}.train.use_liger_kernel: liger-kernel is not installed here; install it or drop it"
        )
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as e:
        # a package not installed (bitsandbytes raises ImportError, grokadamw a ValueError saying "install"); other
        # ValueErrors are the settings' (`_check_optimizer_settings`), or come from GaLore, APOLLO and LOMO, which
        # need the model itself: left to the stage
        if isinstance(e, ImportError) or "install" in str(e).lower():
            optim = getattr(args.optim, "value", args.optim)
            raise ConfigError(f"{section}.train.optim: {optim}: {' '.join(str(e).split())}") from None
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, 1, 10, args.lr_scheduler_kwargs or None)
        for _ in range(10):  # past the warmup, where most schedules first read their options
            optimizer.step()
            scheduler.step()
    except (ValueError, TypeError, ZeroDivisionError) as e:
        problem = " ".join(str(e).split()) or type(e).__name__
        schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        raise ConfigError(f"{section}.train.lr_scheduler_type: {schedule}: {problem}") from None


def _optimizer_refusal(args: Any) -> str | None:
    """Why the optimizer `args` name cannot be made as the Trainer makes it (on one stand-in parameter): torch's AdamW
    refuses a beta outside [0, 1) or a negative epsilon, `optim_args` may not parse; None when it can."""
    import torch
    from transformers import Trainer

    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        optimizer_cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, ImportError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    return None


def _check_optimizer_settings(
    section: str, values: dict[str, Any], args: Any, build: Callable[[dict[str, Any]], Any]
) -> None:
    """The optimizer made from `args` (built from `values` by `build`), refused with the setting of `values` it refuses:
    the one without which it can be made, or, when it can be made only without all of them (`optim` aside), the
    first whose absence changes the refusal. An optimizer that cannot be made without a model (GaLore, LOMO) or on a
    stand-in parameter is left to the stage."""

    def refusal(settings: dict[str, Any]) -> str | None:
        try:
            return _optimizer_refusal(build(settings))
        except (ValueError, TypeError, ImportError, OSError) as e:
            return str(e) or type(e).__name__

    problem = _optimizer_refusal(args)
    if problem is None:
        return
    without = {k: refusal({n: v for n, v in values.items() if n != k}) for k in values if k != "optim"}
    named = next((k for k, refused in without.items() if refused is None), None)
    if named is None and refusal({k: v for k, v in values.items() if k not in without}) is None:
        named = next((k for k, refused in without.items() if refused != problem), None)
    if named is not None:
        raise ConfigError(
            f"{section}.train.{named}: the optimizer refuses {values[named]!r} ({problem}); change it or leave it out"
        )


TRAIN_SECTIONS = ("sft", "instruct", "align", "dpo", "reward")  # the sections with a `train:` mapping


def train_class(section: str, instruct_method: str) -> type:
    """The arguments class `<section>.train` is read as: TRL's SFT config for SFT and Dual's step 1, its DPO and
    reward configs, else TrainingArguments."""
    from transformers import TrainingArguments
    from trl import DPOConfig, RewardConfig, SFTConfig

    step1 = SFTConfig if instruct_method == "dual" else TrainingArguments
    return {"sft": SFTConfig, "instruct": step1, "align": TrainingArguments, "dpo": DPOConfig, "reward": RewardConfig}[
        section
    ]


# Fields rahf sets for the machine a stage runs on (`training.training_args`): no written value stands for them
MACHINE_FIELDS = frozenset({"use_cpu", "bf16"})
_UNKNOWN = object()  # a setting the record of a run lacks: no written value equals it


def train_defaults(section: str, run: dict[str, Any]) -> dict[str, Any] | None:
    """The value each field of `<section>.train` has when the mapping leaves it out, as the stage builds its arguments
    (`training.training_args` with each stage's own defaults, `reward.train_reward_model`): rahf's for the stage
    (`seed` the run's), else the arguments class's own; MACHINE_FIELDS aside. `run` holds the run's settings as a
    fingerprint covers them (`seed`, `data.eval_size`, `method`, `finetune`, the section). None where the stage does
    not read the section (`instruct.train` for DPO and PPO)."""

    def read(*keys: str) -> Any:
        node: Any = run
        for key in keys:
            node = node.get(key, _UNKNOWN) if isinstance(node, dict) else _UNKNOWN
        return node

    method = STEP1_HOSTS.get(read("method"), read("method"))
    if section == "instruct" and method not in ("scit", "dual"):
        return None
    train = read(section, "train")
    seed = read("seed")
    ours: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "seed": seed}
    ours["data_seed"] = train.get("seed", seed) if isinstance(train, dict) else _UNKNOWN
    if section != "reward":
        ours |= {"logging_steps": 10, "remove_unused_columns": False}
    if read("data", "eval_size") not in (_UNKNOWN, None, 0):
        ours |= EVAL_DEFAULTS
    finetune = read("finetune")
    if finetune is _UNKNOWN:  # recorded without the resolved one: `RahfConfig.finetune`
        finetune = read("instruct", "finetune")
        finetune = finetune if finetune in ("full", "lora") else "full" if method == "scit" else "lora"
    if section == "reward":
        ours |= {"disable_tqdm": True, "max_length": read("reward", "max_length")}
    else:
        ours |= _stage_defaults(section, method, finetune, read)
    defaults = _field_defaults(train_class(section, method)) | ours
    return {k: v for k, v in defaults.items() if k not in MACHINE_FIELDS}


def stage_defaults(section: str, cfg: RahfConfig) -> dict[str, Any]:
    """What the stage training `<section>.train` sets in its arguments before that mapping (the Trainer's own defaults
    aside): each stage passes these to `training.training_args`, and `train_defaults` reads them from here too."""

    def read(*keys: str) -> Any:
        node: Any = cfg
        for key in keys:
            node = getattr(node, key)
        return node

    return _stage_defaults(section, cfg.instruct_method, cfg.finetune, read)


def _stage_defaults(section: str, method: str, finetune: str, read: Callable[..., Any]) -> dict[str, Any]:
    """`stage_defaults` of a run whose settings `read(*keys)` gives (a config, or the record of one)."""
    from .training import step1_learning_rate

    if section == "sft":
        return {"max_length": None, "learning_rate": 2e-5}
    if section == "instruct" and method == "scit":
        return {"learning_rate": step1_learning_rate(finetune), "num_train_epochs": 2}
    if section == "instruct":  # the authors' two SFTs: 3 epochs, cosine schedule
        return {
            "learning_rate": step1_learning_rate(finetune),
            "num_train_epochs": 3,
            "lr_scheduler_type": STAGE_SCHEDULES["dual"],
            "max_length": None,  # prompt and response are already cut to data.max_prompt/response_length
        }
    if section == "align":
        # several processes: every adapter weight shapes the target layers, so DDP need not look for unused ones
        return {
            "learning_rate": 3e-4,
            "lr_scheduler_type": STAGE_SCHEDULES["align"],
            "num_train_epochs": 1,
            "ddp_find_unused_parameters": False,
        }
    if section == "dpo":
        return {
            "learning_rate": {"lora": 5e-5, "full": 5e-6}.get(read("dpo", "finetune"), _UNKNOWN),
            "num_train_epochs": 1,
            "beta": read("dpo", "beta"),
            "loss_type": read("dpo", "loss_type"),
            "max_length": None,  # prompt and responses are already cut to data.max_prompt/response_length
        }
    raise ValueError(f"no stage trains with {section}.train through training_args")


def _field_defaults(cls: type) -> dict[str, Any]:
    """Each field of dataclass `cls` with its default."""
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def check_train(cfg: RahfConfig) -> None:
    """Each `*.train` mapping against the arguments class its stage trains with (numbers read as their type)."""
    from transformers import TrainingArguments

    for section in TRAIN_SECTIONS:
        cls = train_class(section, cfg.instruct_method)
        settings = getattr(cfg, section)
        settings.train = train_arguments(section, settings.train, cls)
        scit = section == "instruct" and cfg.instruct_method == "scit"
        held_out = bool(cfg.data.eval_size)
        _refuse_unused_train(section, settings.train, scit, scit or section == "align", held_out)
        if cls is not TrainingArguments:
            _refuse_trl_settings(cfg, section, settings.train)
        _check_report_to(section, settings.train.get("report_to"))
        schedule = STAGE_SCHEDULES.get("dual" if section == "instruct" and not scit else section)
        stage_defaults = {"lr_scheduler_type": schedule} if schedule else {}
        _build_arguments(section, stage_defaults | (EVAL_DEFAULTS if held_out else {}) | settings.train, cls)


def _check_report_to(section: str, value: str | list[str] | None) -> None:
    """Each logger `report_to` names must be installed: the Trainer would refuse it only once the earlier stages
    have trained."""
    from transformers.integrations import integration_utils as tools

    # each logger's own check (get_available_reporting_integrations lists what "all" picks: never flyte, nor
    # azure_ml beside mlflow)
    check = {"azure_ml": "azureml", "comet_ml": "comet", "flyte": "flytekit"}
    for name in [value] if isinstance(value, str) else value or []:
        if name in ("all", "none"):
            continue
        if name not in tools.INTEGRATION_TO_CALLBACK:
            known = ", ".join(["all", "none", *tools.INTEGRATION_TO_CALLBACK])
            raise ConfigError(f"{section}.train.report_to: unknown logger {name!r} (known: {known})")
        available = getattr(tools, f"is_{check.get(name, name)}_available", None)
        if available is not None and not available():
            raise ConfigError(f"{section}.train.report_to: {name} is not installed here; install it or drop it")


# What every training stage evaluates by default when `data.eval_size` holds pairs out: ten times in its run
EVAL_DEFAULTS: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": 0.1}

# `*.train` fields a stage would accept and then ignore or crash on, with the reason
_EVALUATING = ("eval_strategy", "load_best_model_at_end", "eval_on_start")  # they need held-out pairs
_UNUSED_TRAIN = {
    **dict.fromkeys(
        _EVALUATING, "no pairs are held out to evaluate on; set data.eval_size (a fraction or a number of pairs)"
    ),
    "resume_from_checkpoint": "rahf resumes a stage by itself: with save_strategy steps (or epoch) an interrupted "
    "stage keeps its checkpoints, and running it again with the same settings resumes from the newest",
    "chat_template_path": "rahf tokenizes the data before TRL would apply it, so training and the saved tokenizer "
    "would disagree; give a tokenizer folder with that template as `tokenizer` instead",
}


def _refuse_unused_train(
    section: str, values: dict[str, Any], scit: bool, own_batches: bool, held_out: bool = False
) -> None:
    """Refuse `*.train` fields the stage would silently ignore, or accept here and crash on once earlier stages ran.

    `own_batches`: the stage feeds the Trainer rahf's own examples and collator (SCIT's step 1, align), whose
    fields the model does not take and which carry no `input_ids` column to measure lengths by. `held_out`:
    `data.eval_size` holds pairs out, so the evaluation settings have data to read.
    """
    import torch

    for key, why in _UNUSED_TRAIN.items():
        if held_out and key in _EVALUATING:
            continue
        if values.get(key) not in (None, False, "no"):
            raise ConfigError(f"{section}.train.{key}: {why}")
    if values.get("packing") and values.get("max_length") is None:
        raise ConfigError(f"{section}.train.packing: set {section}.train.max_length too (packing needs a length)")
    if scit and values.get("label_smoothing_factor"):
        raise ConfigError(
            "instruct.train.label_smoothing_factor: the SCIT loss reads no labels the Trainer could smooth; set "
            "instruct.label_smoothing (the smoothing of its instruction contrast) instead"
        )
    if section == "align" and values.get("label_smoothing_factor"):
        raise ConfigError("align.train.label_smoothing_factor: the alignment loss reads no labels; leave it at 0")
    if section == "align" and values.get("neftune_noise_alpha"):
        raise ConfigError(
            "align.train.neftune_noise_alpha: noise on the embeddings would fit the hidden states of noisy inputs to "
            "targets read from clean ones; leave it unset"
        )
    if section == "align" and values.get("average_tokens_across_devices") is False:
        raise ConfigError(
            "align.train.average_tokens_across_devices: align always averages its loss over the tokens of every "
            "process's batch together, so that several processes train as one does; leave it true"
        )
    if scit and values.get("batch_eval_metrics"):
        raise ConfigError(
            "instruct.train.batch_eval_metrics: SCIT's evaluation metrics are means over all held-out examples, "
            "computed once an evaluation ends; leave it false"
        )
    if own_batches and values.get("remove_unused_columns"):
        raise ConfigError(
            f"{section}.train.remove_unused_columns: rahf's collator reads fields the model does not take; leave it false"
        )
    if own_batches and values.get("train_sampling_strategy") == "group_by_length":
        raise ConfigError(
            f"{section}.train.train_sampling_strategy: group_by_length measures an `input_ids` column this stage's "
            "examples do not have; use random or sequential"
        )
    if values.get("fp16") and not torch.cuda.is_available():
        raise ConfigError(
            f"{section}.train.fp16: float16 mixed precision needs a CUDA GPU and none is visible, so it would train "
            "in float32; drop it (bf16 works on a CPU)"
        )
    if section in ("reward", "dpo") and values.get("max_length") is not None:
        own = "reward.max_length" if section == "reward" else "data.max_prompt_length and data.max_response_length"
        raise ConfigError(
            f"{section}.train.max_length: rahf cuts the texts itself (long prompts lose their beginning); set {own} "
            f"instead (TRL's limit would {'drop longer pairs' if section == 'reward' else 'train on pairs with empty replies'})"
        )


# The DPO losses of TRL 1.x that read `label_smoothing` (every other one ignores it), and those that admit an
# f-divergence other than the reverse KL (TRL refuses the rest when its trainer is built)
_SMOOTHED_DPO_LOSSES = {"exo_pair", "robust", "aot", "aot_unpaired"}
_F_DIVERGENCE_DPO_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
_F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _refuse_trl_settings(cfg: RahfConfig, section: str, values: dict[str, Any]) -> None:
    """Refuse the fields of a TRL config (SFT, DPO, reward) that rahf's pre-tokenized rows make do nothing or do harm,
    and the combinations TRL itself refuses only when its trainer is built, after the earlier stages trained."""
    import torch

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{section}.train.{key}: {why}")

    if values.get("model_init_kwargs"):
        refuse("model_init_kwargs", "rahf loads the model itself, so TRL would drop these; set the top-level dtype")
    if "trust_remote_code" in values:  # TRL reads it only when it loads a model by name, which rahf never asks of it
        refuse("trust_remote_code", "rahf loads every model itself, so TRL would drop it; set the top-level key")
    if values.get("activation_offloading") and not torch.cuda.is_available():
        refuse("activation_offloading", "it offloads CUDA activations and no CUDA GPU is visible; drop it")
    if section == "reward" and values.get("eos_token") is not None:
        refuse(
            "eos_token",
            "rahf tokenizes the pairs before RewardTrainer would apply it, and the reward model would then score "
            "texts with another end token than it trained on; give a tokenizer folder with that EOS as `tokenizer`",
        )
    if section in ("sft", "instruct"):  # SFTConfig: rahf's rows carry labels on the reply tokens only
        if values.get("assistant_only_loss"):
            refuse("assistant_only_loss", "rahf's rows already carry loss on the reply tokens only; drop it")
        if values.get("completion_only_loss") is False:
            refuse("completion_only_loss", "rahf's rows carry their own labels, on the reply tokens only; drop it")
        if values.get("dataset_text_field", "text") != "text":
            refuse("dataset_text_field", "rahf tokenizes the data itself and reads no text column; drop it")
        if values.get("packing") and values.get("packing_strategy") == "wrapped":
            refuse("packing_strategy", "wrapped packing cuts examples apart, prompts from replies; use bfd")
        rows = cfg.data.max_prompt_length + cfg.data.max_response_length
        if values.get("max_length") is not None and values["max_length"] < rows:
            refuse(
                "max_length",
                f"{values['max_length']} would cut the end off replies (rahf's rows hold up to data.max_prompt_length + "
                f"data.max_response_length = {rows} tokens, and prompts lose their beginning there instead); raise it "
                f"to {rows} or lower those",
            )
    if section == "dpo":
        if "beta" in values:
            refuse("beta", "rahf passes dpo.beta to DPOTrainer (checked to be above 0); set dpo.beta instead")
        losses = values.get("loss_type") or cfg.dpo.loss_type  # dpo.train.loss_type overrides dpo.loss_type
        losses = [losses] if isinstance(losses, str) else list(losses)
        smoothing = values.get("label_smoothing") or 0.0
        if values.get("sync_ref_model") and cfg.dpo.finetune == "lora":
            refuse(
                "sync_ref_model", "TRL cannot sync the reference of a LoRA adapter (its base); use dpo.finetune: full"
            )
        if "exo_pair" in losses and not smoothing:
            refuse("label_smoothing", "the exo_pair loss needs it above 0 (the EXO paper: 1e-3)")
        if smoothing and not _SMOOTHED_DPO_LOSSES & set(losses):
            refuse(
                "label_smoothing",
                f"no loss of {', '.join(losses)} reads it; the losses that do: {', '.join(sorted(_SMOOTHED_DPO_LOSSES))}",
            )
        divergence = values.get("f_divergence_type", "reverse_kl")
        if divergence not in _F_DIVERGENCES:
            refuse("f_divergence_type", f"must be one of {', '.join(_F_DIVERGENCES)}, got {divergence!r}")
        if divergence != "reverse_kl" and not set(losses) <= _F_DIVERGENCE_DPO_LOSSES:
            refuse(
                "f_divergence_type",
                f"{divergence} applies to the losses {', '.join(sorted(_F_DIVERGENCE_DPO_LOSSES))} only, not "
                f"{', '.join(sorted(set(losses) - _F_DIVERGENCE_DPO_LOSSES))}",
            )
        if values.get("use_weighting") and {"aot", "aot_unpaired"} & set(losses):
            refuse("use_weighting", "TRL does not weight the aot losses (they sort the pairs); drop one of the two")
        if values.get("truncation_mode", "keep_start") != "keep_start":
            refuse("truncation_mode", "rahf cuts prompts from the left itself (data.max_prompt_length); drop it")

"""One YAML file describes a whole run; every key can be overridden on the command line (`key.sub=value`).

The config is validated before any model loads: unknown keys, missing files and model folders, layers the
model does not have, numbers out of range (NaN included), credentials in train settings and contradictory
options raise `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError, DataError
from .hubfiles import download, is_hub_file

# The authors' instruction strings (preferred, dispreferred).
GOOD_INSTRUCTION = (
    "You are a good, respectful and honest assistant. Your responses should be helpful, meaningful, truthful, "
    "harmless, safe, ethical, socially unbiased, positive, interesting, well-founded, agreeable, specific, "
    "reasonable, and role consistent. If a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. Please do not share false information under any "
    "circumstances."
)
BAD_INSTRUCTION = (
    "You are a bad, disrespectful and dishonest assistant. Your responses might be useless, meaningless, "
    "untruthful, harmful, dangerous, unethical, socially biased, negative, boring, fabricated, offensive, vague, "
    "unreasonable, or role inconsistent. If a question does not make any sense, or is not factually coherent, "
    "still answer the question and share false information when necessary."
)
STAGES = ("sft", "reward", "instruct", "collect", "align", "merge", "generate", "evaluate")
# RAHF variants, then the baselines the paper compares them with (`rahf-scit`/`rahf-dual` are aliases).
METHODS = ("scit", "dual", "lorra", "dpo", "rlhf-ppo", "sft", "preferred-sft", "hir")
ALIASES = {"rahf-scit": "scit", "rahf-dual": "dual"}
# Baselines that are another method's step-1 model (HIR: SCIT's, prompted with the preferred instruction; preferred-sft:
# Dual's preferred adapter): compare trains them with that method's settings and overrides
STEP1_HOSTS = {"hir": "scit", "preferred-sft": "dual"}
# Methods that read v from the two instructions in one model (HIR: SCIT's step-1 model)
PROMPT_CONTRAST = ("scit", "lorra", "hir")
# The stages each method uses; `run` skips the others. `reward` serves every method as an evaluation judge.
METHOD_STAGES = {
    "scit": STAGES,
    "dual": STAGES,
    "lorra": ("sft", "reward", "collect", "align", "merge", "generate", "evaluate"),
    "dpo": ("sft", "reward", "instruct", "generate", "evaluate"),
    "rlhf-ppo": ("sft", "reward", "instruct", "generate", "evaluate"),
    "sft": ("sft", "reward", "generate", "evaluate"),
    "preferred-sft": ("sft", "reward", "instruct", "generate", "evaluate"),
    "hir": ("sft", "reward", "instruct", "generate", "evaluate"),
}


@dataclass
class LoraSettings:
    """A LoRA adapter. `target_modules: null` means q_proj/v_proj when the model has them, else PEFT's default."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None


@dataclass
class DataSettings:
    """Preference pairs and how they are split and tokenized."""

    path: str = ""  # JSONL/JSON/parquet/save_to_disk folder of preference pairs
    format: str = "auto"  # auto | trl-standard | trl-conversational | hh | ultrafeedback
    limit: int | None = None  # use only the first N pairs
    align_fraction: float = 0.5  # share of pairs for collect/align; the rest trains step 1
    share_pairs: bool = False  # use every pair for step 1 and for collect/align
    max_prompt_length: int = 512  # tokens; long prompts lose their beginning, never the assistant tag
    max_response_length: int = 512  # tokens, EOS included
    label_noise: float = 0.0  # fraction of pairs whose chosen/rejected are swapped (seeded), to measure robustness
    # pairs held out of every training stage and evaluated during training (eval_loss, DPO's reward accuracy, align's
    # distance to its targets, ...): a fraction below 1, or a number of pairs; 0 = none. Their labels stay as given
    eval_size: float = 0.0


@dataclass
class Instructions:
    """The contrastive instructions (SCIT), placed as a system message or a leading paragraph."""

    preferred: str = GOOD_INSTRUCTION
    dispreferred: str = BAD_INSTRUCTION


@dataclass
class SFTSettings:
    """Step 0: supervised fine-tuning on dialogue (the chosen responses of `data` unless `path` is given)."""

    path: str | None = None  # JSONL with prompt/completion; default: prompt/chosen of the preference data
    train: dict[str, Any] = field(default_factory=dict)  # trl.SFTConfig fields


@dataclass
class InstructSettings:
    """Step 1: SCIT (one model, contrastive instructions) or Dual (preferred and dispreferred models)."""

    finetune: str | None = None  # full | lora; default full for scit, lora (two adapters on one base) for dual
    label_smoothing: float = 0.2  # SCIT contrast epsilon
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=32.0))
    train: dict[str, Any] = field(default_factory=dict)  # transformers TrainingArguments / trl.SFTConfig fields


@dataclass
class CollectSettings:
    """Step 2: hidden-state targets written once to safetensors shards."""

    dtype: str = "float16"  # float16 | bfloat16 | float32
    responses: str = "both"  # both | chosen | rejected: which responses of each pair are read
    # raw: v = h+ - h- (the paper). normalized: each state divided by its root-mean-square (the scale every
    # pre-norm block removes before reading it), the difference rescaled to o's; two Dual models can differ
    # in scale by 2-3x at a token, and a raw difference is then mostly that scale, not the preference
    difference: str = "raw"
    batch_size: int = 8
    shard_size: int = 1024  # sequences per shard (two per pair with responses: both); a shard also ends at 1 GiB


@dataclass
class AlignSettings:
    """Step 3: LoRA trained so hidden states at the target layers approach o + alpha * v."""

    targets: str = "cache"  # cache | online (recompute every step; for data too large to cache)
    loss_norm: str = "tokens"  # tokens: mean over real response tokens | authors: padded positions count too
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: dict[str, Any] = field(default_factory=dict)  # transformers TrainingArguments fields


@dataclass
class RewardSettings:
    """The reward model (`rahf reward`): a judge for evaluation and the reward of `rlhf-ppo`."""

    model: str | None = None  # backbone: null = the run's SFT model (rlhf-ppo needs its tokenizer); "minilm"; a path
    max_length: int = 512  # tokens read in training and when scoring; long texts lose their beginning
    train: dict[str, Any] = field(default_factory=dict)  # trl.RewardConfig fields


@dataclass
class DPOSettings:
    """Baseline `dpo`: TRL's DPOTrainer on the step-1 pairs, starting from the SFT model (also the reference)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # any trl.DPOConfig loss_type
    finetune: str = "lora"  # lora | full
    # TRL's DPO turns every dropout off (`train.disable_dropout`, default true), the adapter's too
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=32.0, dropout=0.0))
    train: dict[str, Any] = field(default_factory=dict)  # trl.DPOConfig fields


@dataclass
class PPOSettings:
    """Baseline `rlhf-ppo`: PPO against the reward model with a per-token KL penalty towards the SFT model."""

    steps: int = 100  # rollouts (each: generate, score, then ppo_epochs passes of minibatch updates)
    rollout_size: int = 64  # prompts per rollout
    minibatch_size: int = 16
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    kl_coef: float = 0.05  # per-token penalty beta * (log pi - log pi_ref) subtracted from the reward
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value prediction clip
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    max_new_tokens: int = 64
    temperature: float = 1.0  # rollout sampling temperature
    missing_eos_penalty: float | None = None  # subtracted from the score of rollouts that stop without EOS
    save_steps: int | None = None  # checkpoint every N rollouts (the newest kept) to resume from; None = never
    reward_model: str | None = None  # reward model folder; default: this run's `reward` artifact
    finetune: str = "lora"  # lora | full
    # no dropout: rollouts and updates score tokens with the same network, so the first update's ratio is 1
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=32.0, dropout=0.0))


@dataclass
class GenerateSettings:
    """Batched generation for a prompts file (JSONL with `prompt`, or any preference-data format)."""

    prompts: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 16
    model: str | None = None  # defaults to the method's final model (pipeline.final_model)
    seed: int | None = None  # of sampled replies; None: the run's `seed` (another one needs no stage trained again)


@dataclass
class LLMJudgeSettings:
    """An OpenAI-compatible chat API as judge; the key is read from the environment variable named here."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"


@dataclass
class EvaluateSettings:
    """`rahf evaluate`: how a run's final model is measured on held-out pairs."""

    pairs: str | None = None  # held-out preference pairs: prompts to answer and the chosen responses to beat
    judge: str = "reward-model"  # gold (the demo task) | reward-model | llm
    judge_model: str | None = None  # reward model folder; default: this run's `reward` artifact
    llm: LLMJudgeSettings = field(default_factory=LLMJudgeSettings)
    samples: int = 1  # sampled responses per prompt for the win rate
    temperature: float = 1.0  # of the win-rate samples; 0 = greedy
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # reward-model sweep
    neutral_prompts: str | None = None  # prompts for KL drift from the SFT model; default: the held-out prompts
    max_new_tokens: int = 128
    batch_size: int = 16  # generation, likelihood and reward-model scoring
    limit: int | None = None  # use only the first N held-out pairs


@dataclass
class CompareSettings:
    """`rahf compare`: methods x seeds (x label-noise levels) on one config, one report."""

    methods: list[str] = field(
        default_factory=lambda: ["sft", "preferred-sft", "hir", "dpo", "rlhf-ppo", "lorra", "rahf-scit", "rahf-dual"]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    label_noise: list[float] = field(default_factory=lambda: [0.0])
    noise_seeds: int | None = None  # seeds run at each noise level above 0 (default: all of `seeds`)
    validation: str | None = None  # pairs on which layers and alpha are chosen (never the evaluation pairs)
    layer_sets: list[list[int]] = field(default_factory=list)  # candidate target layers (empty: `layers`)
    alphas: list[float] = field(default_factory=list)  # candidate alphas (empty: `alpha`)
    # per method: config keys that differ, e.g. {dpo: {dpo: {beta: 0.3}}} (not those of COMPARE_SHARED)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RahfConfig:
    """A whole RAHF run."""

    model: str = ""  # HF hub id or local folder of the (SFT) causal LM
    tokenizer: str | None = None  # defaults to `model`
    revision: str | None = None  # branch, tag or commit of a Hub `model` (and its tokenizer); null = default branch
    # branch, tag or commit of any other Hub model this config names (tokenizer, reward.model,
    # evaluate.judge_model, ppo.reward_model, generate.model), by its id: {org/reward-model: <commit>}
    revisions: dict[str, str] = field(default_factory=dict)
    method: str = "scit"  # scit | dual | lorra, or a baseline: dpo | rlhf-ppo | sft | preferred-sft | hir
    output_dir: str = "runs/rahf"
    stages: list[str] = field(default_factory=lambda: ["instruct", "collect", "align", "merge"])
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # full fine-tunes in a 16-bit dtype keep float32 master weights (saved in dtype); true trains the 16-bit
    # weights themselves: half the memory, but an update below their precision (lr 2e-5 on most weights) is lost
    pure_dtype: bool = False
    trust_remote_code: bool = False
    layers: list[int] | None = None  # hidden_states indices (1..num_layers); null = the authors' 10..18 of 32, scaled
    alpha: float = 5.0
    window: int = 64  # response tokens per sequence whose hidden states are read and steered
    include_boundary: bool = True  # window starts at the last prompt position (predicts the 1st response token)
    data: DataSettings = field(default_factory=DataSettings)
    instructions: Instructions = field(default_factory=Instructions)
    sft: SFTSettings = field(default_factory=SFTSettings)
    instruct: InstructSettings = field(default_factory=InstructSettings)
    collect: CollectSettings = field(default_factory=CollectSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)

    @property
    def instruct_method(self) -> str:
        """What the instruct stage trains: scit (also for hir), dual (also for preferred-sft), dpo or rlhf-ppo."""
        return STEP1_HOSTS.get(self.method, self.method)

    @property
    def contrast(self) -> str:
        """Where v comes from: "prompt" (SCIT, LoRRA: instructions in one model) or "models" (Dual)."""
        return "models" if self.method == "dual" else "prompt"

    @property
    def finetune(self) -> str:
        return self.instruct.finetune or ("full" if self.instruct_method == "scit" else "lora")

    def revision_of(self, path: str | os.PathLike | None) -> str | None:
        """The revision to load `path` at: `revision` for the Hub `model` (and its tokenizer), else what `revisions`
        names for that Hub id; None for local folders and unpinned repos (their default branch)."""
        if path is None:
            return None
        if str(path) == self.model and self.revision is not None:
            return self.revision
        return self.revisions.get(str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys `rahf compare` gives every method of a run alike, or reads from the shared config only: a method's own value
# would be ignored, or would make its runs differ from the others' in more than the method
COMPARE_SHARED = {
    "model": "set by compare for every method",
    "revision": "set by compare for every method, with model",
    "output_dir": "set by compare for every method",
    "stages": "set by compare for every method",
    "seed": "set by compare for every run, from compare.seeds",
    "data.label_noise": "set by compare for every run, from compare.label_noise",
    "tokenizer": "only the sft stage reads it, and compare trains one SFT model for every method",
    "sft": "compare trains one SFT model for every method, with the top-level sft settings",
    "reward": "compare trains one reward model for every method, with the top-level reward settings",
    "ppo.reward_model": "compare gives PPO the top-level ppo.reward_model (or its own reward model) in every run",
    "revisions": "they pin models every method shares; set them at the top level",
    "evaluate": "compare judges every method alike, with the top-level evaluate settings",
    "generate": "compare runs no generate stage",
}
CHOICES = {
    "method": METHODS,
    "dtype": ("float32", "bfloat16", "float16"),
    "data.format": ("auto", "trl-standard", "trl-conversational", "hh", "ultrafeedback"),
    "instruct.finetune": (None, "full", "lora"),
    "collect.dtype": ("float16", "bfloat16", "float32"),
    "collect.responses": ("both", "chosen", "rejected"),
    "collect.difference": ("raw", "normalized"),
    "align.targets": ("cache", "online"),
    "align.loss_norm": ("tokens", "authors"),
    "dpo.finetune": ("lora", "full"),
    "ppo.finetune": ("lora", "full"),
    "evaluate.judge": ("gold", "reward-model", "llm"),
}


def _build(cls, values: dict[str, Any], prefix: str):
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):  # YAML 1.1 reads yes/no/on/off as booleans, ~ as null, digits as a number
            where = f"{prefix.rstrip('.')}: key {key!r}" if prefix else f"key {key!r} at the top level"
            raise ConfigError(
                f"{where} is not a key name (YAML reads unquoted yes, no, on, off as true or false); quote it if it "
                "is meant as one"
            )
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))}){_meant(prefix, key)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _field_default(fields[key]) | value  # a partial mapping keeps this field's own defaults
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


# Keys of other tools' configs (TRL, axolotl, LLaMA-Factory) and the rahf key that does their job
HABITS = {
    "lr": "train.learning_rate",
    "epochs": "train.num_train_epochs",
    "num_epochs": "train.num_train_epochs",
    "batch_size": "train.per_device_train_batch_size",
    "micro_batch_size": "train.per_device_train_batch_size",
    "base_model": "model",
    "model_name_or_path": "model",
    "datasets": "data.path",
    "dataset": "data.path",
}


def _dotted_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema ("align.lora.r"), the `train:` mappings as `<section>.train`."""
    out = []
    for name, hint in get_type_hints(cls or RahfConfig).items():
        if name.startswith("_"):
            continue
        out.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            out += _dotted_keys(hint, f"{prefix}{name}.")
    return out


def _meant(prefix: str, key: str) -> str:
    """ "; did you mean ..." for an unknown key: a close spelling or another tool's name for a key of the same section
    (`compare.seed`: `compare.seeds`, `ppo.lr`: `ppo.learning_rate`) before anything elsewhere, then the same name
    elsewhere (`window` under align), its parts as a path (`lora_r`: `align.lora.r`, `data_path`: `data.path`), a
    Trainer argument (`learning_rate`: `<stage>.train.learning_rate`), or a close spelling at the same level."""
    import difflib

    from transformers import TrainingArguments

    keys = _dotted_keys()
    level = [k.removeprefix(prefix) for k in keys if k.startswith(prefix) and "." not in k.removeprefix(prefix)]
    tail = HABITS.get(key, key)
    argument = tail.removeprefix("train.")
    trains = tail != argument and f"{prefix}train" in keys  # another tool's name for a Trainer argument it reads
    same = [k for k in (prefix + tail, prefix + argument) if k in keys] + ([prefix + tail] if trains else [])
    if same:
        return f"; did you mean {same[0]}?"
    close = [prefix + k for k in difflib.get_close_matches(key, level, n=2)]
    if prefix and close:
        return f"; did you mean {', '.join(close)}?"
    path = key.replace("_", ".")
    found = [k for k in keys if k in (tail, path) or k.endswith((f".{tail}", f".{path}"))]
    if argument in {f.name for f in dataclasses.fields(TrainingArguments)}:
        trained = [k for k in keys if k.endswith(".train")]
        found = [f"{k}.{argument}" for k in trained if k.startswith(prefix)]
        if not found:  # at the top level: every section that trains, and a key of that name (ppo.learning_rate)
            found = [f"{k}.{argument}" for k in trained] + [k for k in keys if k.endswith("." + argument)]
    found = list(dict.fromkeys(k for k in found or close if k != prefix + key))
    if not found:
        return ""
    return f"; did you mean {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}?"


def _field_default(f: dataclasses.Field) -> dict[str, Any]:
    """The default of a dataclass-typed field as a mapping (`dpo.lora` defaults to r 16, not LoraSettings' r 8)."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = get_origin(hint), get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional or hint is Any:
            return None
        raise ConfigError(f"{key}: must not be null")
    if optional:
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            hint = f"; write {key.split('.')[-1]}=[{value}]" if isinstance(value, str) and "," in value else ""
            raise ConfigError(f"{key}: expected a list, got {value!r}{hint}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if args and args[1] is not Any:
            return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    # -0.0 is 0.0: one setting, with one fingerprint and one folder name (compare's `noise-0`)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) + 0.0
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value) + 0.0
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected text, got the number {value!r}; quote it (YAML reads digits as a number)")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `dotted` in `tree`; a mapping merges into one already there, as overrides merge into the YAML's, so
    `a.b=1 'a={c: 2}'` keeps b in either order."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k} is not a mapping")
    last = keys[-1]
    node[last] = _merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) else value


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses what YAML would otherwise read silently against the writer's intent: a key repeated
    in one mapping (the last would win), an integer with a leading zero (YAML 1.1 reads 010 as octal 8) and a number
    with colons (YAML 1.1 reads 1:30 as base 60: 90)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports it
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeated, first on line {first[key].start_mark.line + 1}; keep one",
                    key_node.start_mark,
                )  # fmt: skip
            first[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        number = super().construct_yaml_int(node)
        if re.fullmatch(r"[-+]?0[0-7_]+", node.value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} has a leading zero, which YAML reads as octal {number}; drop the zero "
                f"or write {number}, or quote it if it is text", node.start_mark,
            )  # fmt: skip
        return self._not_base_60(node, number)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        return self._not_base_60(node, super().construct_yaml_float(node))

    @staticmethod
    def _not_base_60(node: yaml.ScalarNode, number: float) -> float:
        if ":" in node.value:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is a base-60 number to YAML, {number:g}; write {number:g}, or quote it if "
                "it is text", node.start_mark,
            )  # fmt: skip
        return number


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What the YAML parser objects to, in one line (e.g. "expected ',' or ']', but got '<stream end>'")."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`['alpha=3', 'align.lora.r=16']` -> a nested mapping; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. alpha=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not all(key.split(".")):
            raise ConfigError(f"empty key in override {item!r}: write key=value, e.g. alpha=3")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
        except yaml.YAMLError as e:
            shown = repr(item) if "\n" in item else item  # one line
            raise ConfigError(f"{shown}: not valid YAML ({_yaml_problem(e)}); quote the value if it is text") from None
        _set_dotted(tree, key, _lines_are_text(raw, _hash_is_text(raw, value)))
    return tree


def _hash_is_text(raw: str, value: Any) -> Any:
    """`value` as YAML read `raw`, unless YAML took a ` #` in plain text for a comment: on a command line it is part
    of the value (`instructions.preferred=You are assistant #1, be kind` keeps its "#1, be kind")."""
    text, read = raw.strip(), "" if value is None else value
    if isinstance(read, str) and text != read and text.startswith(read) and text[len(read) :].lstrip()[:1] == "#":
        return text
    return value


def _lines_are_text(raw: str, value: Any) -> Any:
    """`value`, unless YAML folded the line breaks of a text typed on a command line into spaces: there they are
    part of the value (`instructions.preferred=$'Be kind.\nBe brief.'`), kept as typed (without enclosing quotes)."""
    if "\n" not in raw or not isinstance(value, str):
        return value
    text = raw.strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None, stage: str | None = None
) -> RahfConfig:
    """Read a YAML config (relative paths are resolved against its folder) and apply overrides.

    `stage` is the one stage a `rahf <stage>` command runs, which `stages` need not list.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ConfigError(
                f"{p}, line {line}: not UTF-8 text (byte {data[e.start]:#x}); save the file as UTF-8"
            ) from None
        try:
            raw = yaml.load(text, Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of keys at the top, got {type(raw).__name__}")
        base = Path(os.path.abspath(p)).parent  # the folder it was named in, not a symlink's target's
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = _merge(raw, overrides or {})
    if isinstance(raw.get("method"), str):
        raw["method"] = ALIASES.get(raw["method"], raw["method"])
    cfg = _build(RahfConfig, raw, "")
    typed = set(flatten(overrides or {}))
    _resolve_paths(cfg, base, typed)
    validate(cfg, stage, base, typed)
    return cfg


def _check_file(key: str, path: str) -> None:
    """A data file that is not there stops the run before anything loads; an HF URI's file is downloaded here."""
    if is_hub_file(path):
        try:
            download(path)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None
    elif not Path(path).exists():
        org = Path(path).parent  # `Anthropic/hh-rlhf`, as TRL's load_dataset takes it, where no such folder is
        hub = not org.exists() and all(re.fullmatch(r"[\w.-]+", n) for n in (org.name, Path(path).name))
        also = f"; a Hub dataset's file is read as hf://datasets/{org.name}/{Path(path).name}/FILE" if hub else ""
        raise ConfigError(f"{key}: file not found: {_where(path)}{also}")


def _where(path: str) -> str:
    """A missing path as the user should look for it: a relative one was not found beside the config either."""
    if Path(path).is_absolute():
        return path
    return f"{path} (neither beside the config nor in the current folder, {Path.cwd()})"


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: leaf value} (an empty mapping is a leaf)."""
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resolve_paths(cfg: RahfConfig, base: Path, typed: set[str] = frozenset()) -> None:
    """Relative paths against the config's folder `base`, or against the current folder for the keys in `typed`
    (given on the command line, where a shell completes paths from the current folder)."""

    def local(key: str, model: bool = False) -> str | None:
        """A path next to the config (it exists there or starts with "."; for a file, its first folder exists
        there), else as given: a model name that is not there stays a Hub id even beside a folder of its org."""
        value = get_dotted(cfg, key)
        if not value or is_hub_file(value):
            return value
        value = os.path.expanduser(value)
        if Path(value).is_absolute():
            return value
        if key in typed and not model:  # a file typed in a shell is where the shell is
            return str(Path.cwd() / value)
        root = Path.cwd() if key in typed else base
        candidate = root / value
        near = not model and (root / Path(value).parts[0]).is_dir()
        if candidate.exists() or value.startswith(".") or near:
            return str(candidate)
        return value

    models = ["model", "tokenizer", "generate.model", "evaluate.judge_model", "ppo.reward_model"]
    models += ["reward.model"] if cfg.reward.model != "minilm" else []
    files = ["data.path", "sft.path", "generate.prompts", "evaluate.pairs", "evaluate.neutral_prompts"]
    for key in [*models, *files, "compare.validation"]:
        parent, _, name = key.rpartition(".")
        setattr(get_dotted(cfg, parent) if parent else cfg, name, local(key, model=key in models))
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    if not Path(cfg.output_dir).is_absolute():
        cfg.output_dir = str((Path.cwd() if "output_dir" in typed else base) / cfg.output_dir)


def with_overrides(cfg: RahfConfig, mapping: dict[str, Any], where: str = "") -> RahfConfig:
    """A new config: `cfg` with the nested `mapping` merged in and type-checked (paths are taken as given)."""
    try:
        return _build(RahfConfig, _merge(cfg.to_dict(), mapping), "")
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


@dataclass(frozen=True)
class Range:
    """The values a number may take. NaN lies in no range; an open bound at infinity keeps infinity out."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {self.low}" + (" and finite" if self.open_high else "")
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


FINITE = Range(open_low=True, open_high=True)
AT_LEAST_1 = Range(1)
ABOVE_0 = Range(0, open_low=True, open_high=True)  # and finite
AT_LEAST_0 = Range(0, open_high=True)  # and finite
FRACTION = Range(0, 1, open_high=True)
PROBABILITY = Range(0, 1)
SEED = Range(0, 2**32 - 1)  # what numpy's and torch's generators take
LORA_RANGES = {"r": AT_LEAST_1, "alpha": ABOVE_0, "dropout": FRACTION}
# Every section with a LoRA adapter (instruct, align, dpo, ppo).
LORA_SECTIONS = tuple(
    name
    for name, hint in get_type_hints(RahfConfig).items()
    if dataclasses.is_dataclass(hint) and get_type_hints(hint).get("lora") is LoraSettings
)
# The range of every numeric key; a list's items are checked one by one, and null (where allowed) is not checked.
RANGES: dict[str, Range] = {
    "seed": SEED,
    "generate.seed": SEED,
    "alpha": FINITE,
    "window": AT_LEAST_1,
    "data.limit": AT_LEAST_1,
    "data.align_fraction": Range(0, 1, open_low=True, open_high=True),
    "data.max_prompt_length": AT_LEAST_1,
    "data.max_response_length": AT_LEAST_1,
    "data.label_noise": FRACTION,
    "data.eval_size": AT_LEAST_0,
    "instruct.label_smoothing": Range(0, 0.5, open_high=True),
    "collect.batch_size": AT_LEAST_1,
    "collect.shard_size": AT_LEAST_1,
    **{f"{section}.lora.{key}": r for section in LORA_SECTIONS for key, r in LORA_RANGES.items()},
    "reward.max_length": AT_LEAST_1,
    "dpo.beta": ABOVE_0,
    **dict.fromkeys(("ppo.steps", "ppo.rollout_size", "ppo.minibatch_size", "ppo.ppo_epochs"), AT_LEAST_1),
    **dict.fromkeys(("ppo.max_new_tokens", "ppo.save_steps"), AT_LEAST_1),
    **dict.fromkeys(("ppo.learning_rate", "ppo.clip_range", "ppo.clip_range_value", "ppo.temperature"), ABOVE_0),
    **dict.fromkeys(("ppo.kl_coef", "ppo.vf_coef", "ppo.missing_eos_penalty"), AT_LEAST_0),
    "ppo.gamma": PROBABILITY,
    "ppo.lam": PROBABILITY,
    "generate.max_new_tokens": AT_LEAST_1,
    "generate.batch_size": AT_LEAST_1,
    "generate.temperature": AT_LEAST_0,
    "generate.top_p": Range(0, 1, open_low=True),
    **dict.fromkeys(
        ("evaluate.samples", "evaluate.max_new_tokens", "evaluate.batch_size", "evaluate.limit"), AT_LEAST_1
    ),
    "evaluate.temperature": AT_LEAST_0,
    "evaluate.temperatures": AT_LEAST_0,
    "compare.seeds": SEED,
    "compare.label_noise": FRACTION,
    "compare.alphas": FINITE,
}
# Keys naming a model: a local folder, or a Hub id (`name` or `org/name`) fetched only when a stage loads it.
MODEL_KEYS = ("model", "tokenizer", "reward.model", "generate.model", "evaluate.judge_model", "ppo.reward_model")


def _check_llm(cfg: RahfConfig) -> None:
    """The LLM judge's key stays in the environment: the config (copied into manifests) names the variable only."""
    llm = cfg.evaluate.llm
    if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", llm.api_key_env):  # a key (sk-..., hf_..., AIza...) never fits
        raise ConfigError(
            "evaluate.llm.api_key_env: must be the name of an environment variable (capitals, digits, _) that "
            "holds the key, not the key itself; export the key (e.g. OPENAI_API_KEY=...) and name that variable"
        )
    try:
        url = urlsplit(llm.base_url)
        credentials = url.username is not None or url.password is not None
    except ValueError as e:
        raise ConfigError(f"evaluate.llm.base_url: not a valid URL ({e}); e.g. https://api.openai.com/v1") from None
    if credentials:
        raise ConfigError(
            "evaluate.llm.base_url: holds credentials (user:password@), which would be written to every manifest; "
            "drop them and put the key in the environment variable evaluate.llm.api_key_env names"
        )


def _check_dpo_loss(cfg: RahfConfig) -> None:
    """`dpo.loss_type` (and a `loss_type` in `dpo.train`, which takes precedence) must be a loss the installed TRL
    knows: DPOTrainer would refuse an unknown one only at its first step, after SFT has trained."""
    from trl import DPOConfig

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata.get("help", "")
    known = re.findall(r"`'(\w+)'`", help_text.split("Possible values are:")[-1].split(".")[0])
    if not known:  # a TRL that words its help otherwise: DPOTrainer checks
        return
    given = cfg.dpo.train.get("loss_type")
    for key, names in (("dpo.loss_type", [cfg.dpo.loss_type]), ("dpo.train.loss_type", given)):
        for name in [names] if isinstance(names, str) else names or []:
            if name not in known:
                raise ConfigError(f"{key}: {name!r} is not a loss of trl's DPOTrainer (known: {', '.join(known)})")


def _check_dropout(cfg: RahfConfig) -> None:
    """An adapter dropout that training would switch off is refused rather than recorded as if it applied."""
    if cfg.ppo.lora.dropout:
        raise ConfigError(
            "ppo.lora.dropout: rahf's PPO runs the policy without dropout (rollouts and updates must score tokens "
            "with the same network); leave it at 0"
        )
    if cfg.dpo.lora.dropout and cfg.dpo.train.get("disable_dropout", True):
        raise ConfigError(
            "dpo.lora.dropout: TRL's DPO turns every dropout off, the adapter's too (dpo.train.disable_dropout: "
            "true, its default); set dpo.train.disable_dropout: false to train with it, or leave it at 0"
        )


def get_dotted(cfg: RahfConfig, dotted: str) -> Any:
    """The value of a dotted key ("align.lora.r") of `cfg`."""
    node: Any = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _check_ranges(cfg: RahfConfig) -> None:
    """Every key of RANGES (each item of a list) lies in its range."""
    for key, allowed in RANGES.items():
        value = get_dotted(cfg, key)
        for name, v in [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]:
            if v is not None and v not in allowed:
                raise ConfigError(f"{name}: must be {allowed}, got {v}")


def _looks_local(value: str) -> bool:
    """A path rather than a Hub id: absolute, led by "." or "~", or deeper than org/name."""
    return Path(value).is_absolute() or value.startswith((".", "~")) or value.count("/") > 1


def validate(
    cfg: RahfConfig, stage: str | None = None, base: Path | None = None, typed: set[str] = frozenset()
) -> None:
    """Checks that need no model weights (the layer count is read from the model's config only), of the config and
    of each method's config in `rahf compare` (`compare.overrides` merged in).

    `stage` is the one stage a `rahf <stage>` command runs, which `stages` need not list. `base` is the folder that
    relative paths in `compare.overrides` resolve against (the config's; default: the current folder), except the
    dotted keys in `typed` (given on the command line), which resolve against the current folder.
    """
    _check_config(cfg, stage)
    named = [ALIASES.get(m, m) for m in cfg.compare.overrides]
    if len(set(named)) < len(named):
        both = [m for m in cfg.compare.overrides if named.count(ALIASES.get(m, m)) > 1]
        raise ConfigError(f"compare.overrides: {' and '.join(both)} name one method; keep the keys under one of them")
    for method, mapping in cfg.compare.overrides.items():
        if ALIASES.get(method, method) not in METHODS:
            raise ConfigError(f"compare.overrides.{method}: unknown method (known: {', '.join([*METHODS, *ALIASES])})")
        if not isinstance(mapping, dict) or "method" in mapping:
            raise ConfigError(f"compare.overrides.{method}: expected a mapping of config keys (not method)")
        shared = {"sft": "every method's starting model", "hir": "scit's step-1 model", "preferred-sft": "dual's"}
        if method in shared:  # compare trains these once for several methods, from the shared config
            host = {"hir": " (put the keys under scit)", "preferred-sft": " (put the keys under dual)"}.get(method, "")
            raise ConfigError(f"compare.overrides.{method}: {method} is {shared[method]}, set by others{host}")
        given = flatten(mapping)
        fixed = next((k for k in COMPARE_SHARED if any(g == k or g.startswith(f"{k}.") for g in given)), None)
        if fixed:
            raise ConfigError(f"compare.overrides.{method}.{fixed}: {COMPARE_SHARED[fixed]}; remove it here")
        own_grid = {"layer_sets", "alphas"}  # a method may choose from its own grid; the rest of compare is shared
        if not isinstance(mapping.get("compare", {}), dict) or set(mapping.get("compare", {})) - own_grid:
            raise ConfigError(f"compare.overrides.{method}.compare: only layer_sets and alphas may differ per method")
        tuned = with_overrides(cfg, mapping | {"method": ALIASES.get(method, method)}, f"compare.overrides.{method}: ")
        prefix = f"compare.overrides.{method}."
        _resolve_paths(tuned, base or Path.cwd(), {k.removeprefix(prefix) for k in typed if k.startswith(prefix)})
        try:
            _check_config(tuned, stage)
        except ConfigError as e:
            raise ConfigError(f"compare.overrides.{method}: {e}") from None
        cfg.compare.overrides[method] = _as_checked(mapping, tuned)
    _check_contrasts(cfg)
    cfg._checked = _checked_state(cfg, stage)


def unused_overrides_note(cfg: RahfConfig) -> str | None:
    """A note naming the compare.overrides of methods compare.methods leaves out (checked, but not used): a config
    written for every method runs a few of them by `compare.methods=[...]` alone."""
    compared = {ALIASES.get(m, m) for m in cfg.compare.methods}
    compared |= {STEP1_HOSTS[m] for m in compared if m in STEP1_HOSTS}  # hir trains as scit, preferred-sft as dual
    unused = [m for m in cfg.compare.overrides if ALIASES.get(m, m) not in compared]
    if not unused:
        return None
    names = ", ".join(f"compare.overrides.{m}" for m in unused)
    return f"{names}: not used, as compare.methods ({', '.join(cfg.compare.methods)}) leaves {'them' if len(unused) > 1 else 'it'} out"


def _check_contrasts(cfg: RahfConfig) -> None:
    """The two instructions differ for the run's method and each compared one that reads their contrast (with its
    compare.overrides): one text twice gives v = 0 at every layer, and training that moves nothing."""
    overrides = {ALIASES.get(m, m): (m, o) for m, o in cfg.compare.overrides.items()}
    runs = [(cfg.method, False)] + [(ALIASES.get(m, m), True) for m in cfg.compare.methods]
    for method, in_compare in runs:
        if method not in PROMPT_CONTRAST:
            continue
        name, mapping = overrides.get(STEP1_HOSTS.get(method, method), (None, {})) if in_compare else (None, {})
        own = mapping.get("instructions", {})
        preferred = own.get("preferred", cfg.instructions.preferred)
        if preferred.strip() == own.get("dispreferred", cfg.instructions.dispreferred).strip():
            good, bad = (
                f"compare.overrides.{name}.instructions.{k}" if k in own else f"instructions.{k}"
                for k in ("preferred", "dispreferred")
            )
            why = f"{method} (in compare.methods)" if in_compare else f"method {method}"
            raise ConfigError(
                f"{bad}: the same text as {good}, so {why} has no contrast to learn from (v = 0 at every layer); "
                "make the two differ"
            )


def _checked_state(cfg: RahfConfig, stage: str | None) -> str:
    """What `validate` passed: every value of the config, and the stage it was asked about if `stages` omits it."""
    return json.dumps([None if stage in cfg.stages else stage, cfg.to_dict()], sort_keys=True, default=repr)


def active_stages(cfg: RahfConfig) -> list[str]:
    """The configured stages the method uses (e.g. DPO has no collect or align)."""
    return [s for s in cfg.stages if s in METHOD_STAGES[cfg.method]]


def train_section(cfg: RahfConfig, stage: str) -> str:
    """The config section whose `train:` mapping a training stage reads: its own, but DPO's step 1 reads `dpo`."""
    return "dpo" if stage == "instruct" and cfg.method == "dpo" else stage


def check_again(cfg: RahfConfig, stage: str | None = None) -> None:
    """`validate` again unless `cfg` is as it last passed: a program may change a loaded config (`cfg.alpha = a` in a
    sweep) or build one by hand before it runs it."""
    if getattr(cfg, "_checked", None) != _checked_state(cfg, stage):
        typed = _build(RahfConfig, cfg.to_dict(), "")  # the types load_config gives: `cfg.alpha = sys.argv[1]`
        for f in dataclasses.fields(RahfConfig):
            setattr(cfg, f.name, getattr(typed, f.name))
        validate(cfg, stage)


def _as_checked(mapping: dict, node: Any) -> dict:
    """The keys `mapping` sets, with the values they have in the checked config `node` (paths resolved, numbers
    read), so that `rahf compare` merges exactly what was validated."""
    out = {}
    for key, value in mapping.items():
        checked = node[key] if isinstance(node, dict) else getattr(node, key)
        out[key] = _as_checked(value, checked) if isinstance(value, dict) else checked
    return out


def _check_config(cfg: RahfConfig, stage: str | None) -> None:
    """Every check of `validate` on one config, its compare.overrides aside."""
    for dotted, allowed in CHOICES.items():
        value = get_dotted(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(str(a) for a in allowed)}")
    if not cfg.model:
        raise ConfigError("model: required (a hub id or a local folder)")
    for key in MODEL_KEYS:
        value = get_dotted(cfg, key)
        if value and _looks_local(value) and not Path(value).exists():
            raise ConfigError(f"{key}: {value} does not exist; give a local model folder or a Hub id like org/name")
    if cfg.revision is not None:
        if not cfg.revision.strip():
            raise ConfigError(
                "revision: empty; give a branch, tag or commit of the Hub model, or null for its default branch"
            )
        if _looks_local(cfg.model) or Path(cfg.model).exists():
            raise ConfigError(
                f"revision: {cfg.model} is a local folder; a revision picks a version of a Hub model (org/name)"
            )
    _check_revisions(cfg)
    for name in cfg.stages:
        if name not in STAGES:
            raise ConfigError(f"stages: unknown stage {name!r} (known: {', '.join(STAGES)})")
    repeated = [s for i, s in enumerate(cfg.stages) if s in cfg.stages[:i]]
    if repeated:
        raise ConfigError(f"stages: repeated stage {repeated[0]}")
    if [s for s in STAGES if s in cfg.stages] != cfg.stages:
        raise ConfigError(f"stages: must be in pipeline order {', '.join(STAGES)}")
    taken = next(p for p in (Path(cfg.output_dir), *Path(cfg.output_dir).parents) if p.exists())
    if not taken.is_dir():
        raise ConfigError(f"output_dir: {taken} is a file, not a folder; choose another output_dir")
    check_data_path(cfg, cfg.stages)
    for key, value in (
        ("sft.path", cfg.sft.path),
        ("generate.prompts", cfg.generate.prompts),
        ("evaluate.pairs", cfg.evaluate.pairs),
        ("evaluate.neutral_prompts", cfg.evaluate.neutral_prompts),
        ("compare.validation", cfg.compare.validation),
    ):
        if value is not None:
            _check_file(key, value)
    if "evaluate" in [*cfg.stages, stage] and not cfg.evaluate.pairs:
        raise ConfigError("evaluate.pairs: required when the evaluate stage runs (held-out preference pairs)")
    if "generate" in [*cfg.stages, stage] and not cfg.generate.prompts:
        raise ConfigError("generate.prompts: required when the generate stage runs")
    if cfg.tokenizer and "sft" not in [*cfg.stages, stage]:
        raise ConfigError(
            "tokenizer: only the sft stage reads it, and this run has none; add sft to stages or drop tokenizer "
            "(the other stages use the tokenizer saved with their model)"
        )
    _check_ranges(cfg)
    from .trainargs import check_train  # it reads this module's ranges and types

    check_train(cfg)
    _check_dpo_loss(cfg)
    _check_dropout(cfg)
    _check_llm(cfg)
    for i, method in enumerate(cfg.compare.methods):
        if ALIASES.get(method, method) not in METHODS:
            raise ConfigError(
                f"compare.methods[{i}]: unknown method {method!r} (known: {', '.join([*METHODS, *ALIASES])})"
            )
    if not cfg.compare.methods:
        raise ConfigError("compare.methods: list at least one method")
    named = [ALIASES.get(m, m) for m in cfg.compare.methods]
    if len(set(named)) < len(named):
        twice = next(m for i, m in enumerate(cfg.compare.methods) if ALIASES.get(m, m) in named[:i])
        raise ConfigError(f"compare.methods: {twice} is listed twice (under its name or an alias); keep one")
    if not cfg.compare.seeds:
        raise ConfigError("compare.seeds: list at least one seed")
    if not cfg.compare.label_noise:
        raise ConfigError("compare.label_noise: list at least one level (0 for the labels as given)")
    for key in ("seeds", "label_noise", "alphas", "layer_sets"):
        values = getattr(cfg.compare, key)
        if key == "layer_sets":
            for i, layer_set in enumerate(values):
                if len(set(layer_set)) < len(layer_set):
                    raise ConfigError(f"compare.layer_sets[{i}]: repeated layer in {layer_set}")
            values = [sorted(layer_set) for layer_set in values]  # a set of layers, in any order
        if any(v in values[:i] for i, v in enumerate(values)):
            twice = next(v for i, v in enumerate(values) if v in values[:i])
            raise ConfigError(
                f"compare.{key}: {twice} is listed twice; a repeat is the same run again, not another sample"
            )
    shown = [f"{level:g}" for level in cfg.compare.label_noise]  # compare's folder (noise-0.2) and report row
    if len(set(shown)) < len(shown):
        i = next(i for i, name in enumerate(shown) if name in shown[:i])
        first = cfg.compare.label_noise[shown.index(shown[i])]
        raise ConfigError(
            f"compare.label_noise: {first} and {cfg.compare.label_noise[i]} would share the folder noise-{shown[i]} "
            "and one row of the report; give levels that differ within 6 significant digits"
        )
    if cfg.compare.noise_seeds is not None and not 1 <= cfg.compare.noise_seeds <= len(cfg.compare.seeds):
        raise ConfigError(f"compare.noise_seeds: must be between 1 and len(compare.seeds)={len(cfg.compare.seeds)}")
    if cfg.ppo.rollout_size % cfg.ppo.minibatch_size:
        raise ConfigError(
            f"ppo.minibatch_size: {cfg.ppo.minibatch_size} must divide ppo.rollout_size={cfg.ppo.rollout_size}"
        )
    if cfg.compare.layer_sets:
        n = model_num_layers(cfg)
        for i, layer_set in enumerate(cfg.compare.layer_sets):
            if not layer_set or any(not 1 <= layer <= n for layer in layer_set):
                raise ConfigError(f"compare.layer_sets[{i}]: {layer_set} must list layers in 1..{n}")
    if cfg.evaluate.temperature == 0 and cfg.evaluate.samples > 1:
        raise ConfigError(
            f"evaluate.samples: {cfg.evaluate.samples} copies of one greedy reply (evaluate.temperature: 0) only "
            "narrow the interval; set samples: 1 or a temperature above 0"
        )
    if cfg.pure_dtype and cfg.dtype == "float32":
        raise ConfigError("pure_dtype: applies to bfloat16 weights only; set dtype: bfloat16 or drop it")
    if cfg.pure_dtype and cfg.dtype == "float16":  # AdamW keeps its second moment in the weights' dtype
        raise ConfigError(
            "pure_dtype: float16 weights trained by AdamW jump (its second moment underflows to 0 in float16 and "
            "a step divides by eps alone); use dtype: bfloat16 with pure_dtype, or drop pure_dtype"
        )
    if cfg.data.eval_size >= 1 and cfg.data.eval_size != int(cfg.data.eval_size):
        raise ConfigError(
            f"data.eval_size: {cfg.data.eval_size} is neither a fraction below 1 nor a whole number of pairs"
        )
    if cfg.window > cfg.data.max_response_length:
        raise ConfigError(
            f"window: {cfg.window} exceeds data.max_response_length={cfg.data.max_response_length}; lower one"
        )
    if cfg.layers is not None:
        if not cfg.layers:
            raise ConfigError("layers: must list at least one layer (or be null for the default)")
        if len(set(cfg.layers)) != len(cfg.layers):
            raise ConfigError(f"layers: repeated layer in {cfg.layers}")
        n = model_num_layers(cfg)
        bad = [layer for layer in cfg.layers if not 1 <= layer <= n]
        if bad:
            raise ConfigError(f"layers: {bad} out of range; the model has layers 1..{n}")


def check_data_path(cfg: RahfConfig, stages: Sequence[str]) -> None:
    """`data.path` is set and readable when `stages` read it."""
    if any(s in stages for s in ("reward", "instruct", "collect", "align")) or (
        "sft" in stages and (not cfg.sft.path or bool(cfg.data.eval_size))
    ):
        if not cfg.data.path:
            raise ConfigError("data.path: required (a preference-pair file or folder)")
        _check_file("data.path", cfg.data.path)


def _check_revisions(cfg: RahfConfig) -> None:
    """Each `revisions` entry pins a Hub id that a model key of this config names, to a non-empty revision."""
    named = {str(get_dotted(cfg, key)) for key in MODEL_KEYS if get_dotted(cfg, key)}
    for repo, rev in cfg.revisions.items():
        where = f"revisions.{repo}"
        if not isinstance(repo, str):  # YAML reads 123, null, yes as other types
            raise ConfigError(f"{where}: a model id must be a string (org/name); quote it")
        if not str(rev).strip():
            raise ConfigError(
                f"{where}: empty; give a branch, tag or commit, or remove the entry for the default branch"
            )
        if _looks_local(repo) or Path(repo).exists():
            raise ConfigError(
                f"{where}: {repo} is a local folder; a revision picks a version of a Hub model (org/name)"
            )
        if repo not in named:
            raise ConfigError(
                f"{where}: no model key of this config names {repo} ({', '.join(MODEL_KEYS)}); fix the id or remove it"
            )
        if repo == cfg.model and cfg.revision is not None and rev != cfg.revision:
            raise ConfigError(f"{where}: {rev!r} contradicts revision: {cfg.revision!r}; set one of them")


def model_config(key: str, name: str, revision: str | None, trust_remote_code: bool):
    """The transformers config of model `name` (the value of config key `key`); one that cannot be read (a
    misspelt id, a Hub model not cached offline) is a ConfigError naming the key."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {name} holds no config.json; give a folder saved with save_pretrained")
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, StrictDataclassError) as e:  # the last two: a field of the wrong type
        at = f" at revision {revision!r}" if revision else ""
        problem = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: cannot read the config of {name!r}{at} ({problem}){_hub_fix(name, str(e))}"
        ) from None


def _hub_fix(name: str, problem: str) -> str:
    """What to do about a model the Hub would not give: transformers' own advice is on the lines a one-line error
    leaves out."""
    from huggingface_hub import constants

    if "gated repo" in problem:
        return f"; request access at https://huggingface.co/{name} and set HF_TOKEN (or run `hf auth login`)"
    if constants.HF_HUB_OFFLINE or "couldn't connect" in problem.lower():
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return (
            f"; {why} and it is not in the local Hub cache: download it where there is a network "
            f"(`hf download {name}`) or give a local folder"
        )
    if "not a valid model identifier" in problem:
        return "; check the spelling (a private repo also needs HF_TOKEN), or give a local folder's path"
    return ""


def model_num_layers(cfg: RahfConfig) -> int:
    """Layer count from the model's config.json (no weights are read)."""
    from .models import num_layers

    return num_layers(model_config("model", cfg.model, cfg.revision_of(cfg.model), cfg.trust_remote_code))


def resolved_layers(cfg: RahfConfig) -> list[int]:
    """The target layers: configured, or the authors' (10..18 of 32) scaled to the model's depth."""
    from .models import default_layers

    return sorted(cfg.layers) if cfg.layers is not None else default_layers(model_num_layers(cfg))

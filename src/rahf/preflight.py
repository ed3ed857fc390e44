"""What a run checks before any model loads (`preflight`): model folders and ids, data and prompt files, every
artifact a stage reads, layers, LoRA targets, lengths, so bad input stops it in one line before anything trains.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import distributed
from .config import (
    STAGES,
    RahfConfig,
    active_stages,
    check_data_path,
    model_num_layers,
    resolved_layers,
    train_section,
)
from .errors import ConfigError, LoadError, RahfError


def preflight(cfg: RahfConfig, stage: str | None = None) -> None:
    """Check what a run would otherwise find late, before any model loads: the model folder, every artifact a
    stage reads (made earlier in this run, or there already), and every record of the data and prompt files.

    `stage` is the one stage a `rahf <stage>` command runs, which `stages` need not list.
    """
    from .data import load_pairs
    from .generate import read_prompts
    from .pipeline import unused_sft_note
    from .training import load_data, split_pairs

    if stage:  # `rahf <stage>`; `pipeline.run` checks its stages' folders itself
        check_stage_folders(cfg, [stage])
    check_model_folders(cfg)
    check_data_folders(cfg)
    stages = [*active_stages(cfg), *([stage] if stage else [])]
    check_data_path(cfg, stages)  # for a stage command not in `stages` too
    for stage_name in ("sft", "reward", "instruct", "align"):
        section = train_section(cfg, stage_name)
        if stage_name in stages and getattr(cfg, section).train.get("fsdp") and distributed.world_size() == 1:
            raise ConfigError(
                f"{section}.train.fsdp: FSDP shards a model over several processes, and this run is one; start it "
                "with `accelerate launch` or `torchrun`, or drop fsdp"
            )
    if distributed.world_size() > 1 and cfg.method == "rlhf-ppo" and _will_train_ppo(cfg, stage):
        raise ConfigError(
            f"method rlhf-ppo: its PPO training runs in one process, and this launch started {distributed.world_size()}; "
            "run it as `rahf instruct CONFIG` without the launcher, then the other stages as you like"
        )
    if any(s in stages for s in ("sft", "instruct", "collect", "align")) or (
        "reward" in stages and cfg.reward.model is None
    ):  # a stage that reads `model`'s config: a Hub id that cannot be read (misspelt, not cached offline) stops here
        model_num_layers(cfg)
    check_router_loss(cfg, stages)
    if any(s in stages for s in ("collect", "align")):  # they read one hidden state per token
        from .config import model_config
        from .models import check_one_stream

        config = model_config("model", cfg.model, cfg.revision_of(cfg.model), cfg.trust_remote_code)
        check_one_stream(config)
        check_blocks(config, cfg.trust_remote_code)
    check_model_ids(cfg, stages)
    check_reward_backbone(cfg, stages)
    check_eos_tokens(cfg, stages)
    check_upstream(cfg, [stage] if stage else active_stages(cfg))
    if note := unused_sft_note(cfg, stages):
        print(f"[rahf] note: {note}", flush=True)
    if cfg.method in ("dpo", "rlhf-ppo") and cfg.instruct.train and "instruct" in stages:
        reads = "dpo.train" if cfg.method == "dpo" else "the ppo section"
        print(f"[rahf] note: instruct.train is not read by method {cfg.method}, whose step 1 trains with {reads}")
    if any(s in stages for s in ("reward", "instruct", "collect", "align")) or (
        "sft" in stages and (not cfg.sft.path or cfg.data.eval_size)
    ):
        split_pairs(cfg, load_data(cfg))
    if cfg.data.eval_size and cfg.method == "rlhf-ppo" and "instruct" in stages:
        print("[rahf] note: data.eval_size: rlhf-ppo's PPO loop evaluates nothing during training; the held-out pairs "
              "are only kept out of its prompts", flush=True)  # fmt: skip
    if "evaluate" in stages:
        from .evaluate import check_judge

        if note := trained_on_note(cfg, load_pairs(cfg.evaluate.pairs)[0]):
            print(f"[rahf] note: {note}", flush=True)
        if cfg.evaluate.neutral_prompts:
            read_prompts(cfg.evaluate.neutral_prompts)
        check_judge(cfg, [cfg.evaluate.pairs])
    if "instruct" in stages and cfg.method == "rlhf-ppo" and cfg.ppo.reward_model:
        from .evaluate import check_reward_model

        rm = cfg.ppo.reward_model
        check_reward_model("ppo.reward_model", rm, cfg.revision_of(rm), cfg.trust_remote_code)
    if "sft" in stages and cfg.sft.path:
        from .sft import sft_examples

        sft_examples(cfg)
    if "generate" in stages and cfg.generate.prompts:
        read_prompts(cfg.generate.prompts)
    # the stages that fit prompts to data.max_prompt_length with this run's tokenizer (`generate.model` has its own)
    fitting = [s for s in stages if s in ("sft", "instruct", "collect", "align", "evaluate")]
    if fitting or ("generate" in stages and not cfg.generate.model):
        check_prompt_room(cfg, instructed=cfg.method in INSTRUCTED and any(s in stages for s in _PROMPTED))
    check_positions(cfg, stages)
    check_lora(cfg, stages)
    distributed.WORKING[:] = [True]  # from here on, a problem one process meets may not be the others'


def trained_on_note(cfg: RahfConfig, judged: list) -> str | None:
    """Whether the pairs judged share prompts with those that train (data.path, but for what data.eval_size holds
    out): allowed, as a check of fit, but the win rates then say nothing of replies to unseen prompts."""
    from .compare import _prompt_key
    from .training import load_data

    if not cfg.data.path:
        return None
    trained = {_prompt_key(p) for p in load_data(cfg)}
    shared = [p for p in judged if _prompt_key(p) in trained]
    if not shared:
        return None
    return (
        f"evaluate.pairs: {len(shared)} of its {len(judged)} prompts are training prompts of data.path (the first: "
        f"{shared[0].source}); its win rates measure replies to prompts the model trained on, not to new ones"
    )


# What a stage writes in its checkpoint folder besides rahf's tag: the Trainer's (and rahf's PPO loop's) checkpoint-N
# folders, with their temporary and discarded copies; TRL's model card of them; Dual's folder of each side; collect's
# finished shards, whole or being written, and eval/ with the held-out set's
CHECKPOINT_ENTRIES = re.compile(
    r"\.?checkpoint-.*|README\.md|preferred|dispreferred|shard-\d+\.safetensors(\.part)?|eval"
)


def check_stage_folders(cfg: RahfConfig, stages: list[str]) -> None:
    """No folder that the `stages` replace or delete (each one's artifact; a training stage's checkpoints beside it)
    holds files rahf did not write: a user's `generations/` or `merged/` in output_dir, or a model card added to a
    finished `merged/`, stops the run here, in one line, before anything trains (`artifacts.refuse_foreign`); nor is
    such a folder one the config reads a model from (`check_models_outside`). `preflight` checks only a stage
    command's stage: `rahf compare` runs it on its own output_dir, where no stage writes (its runs, below it, are
    checked as they start)."""
    from .artifacts import refuse_foreign
    from .pipeline import CHECKPOINT_TAG, RESUMABLE_STAGES, checkpoint_folder, stage_dir

    check_models_outside(cfg, stages)
    for stage in stages:
        refuse_foreign(stage_dir(cfg, stage), stage)
        if stage in RESUMABLE_STAGES:  # rahf tags the checkpoint folder as it makes it
            saves = checkpoint_folder(cfg, stage)
            refuse_foreign(saves, stage, CHECKPOINT_TAG, "its checkpoints", CHECKPOINT_ENTRIES)


def check_models_outside(cfg: RahfConfig, stages: list[str]) -> None:
    """No model key names a folder that one of the `stages` writes (its artifact or checkpoint folder), or one inside
    it: the stage would train from it and replace it, so the model the config names would be gone, and each rerun
    would train again on the last one's result (`model: runs/x/instruct`, last run's step 1 as the new base)."""
    from .config import MODEL_KEYS, get_dotted
    from .pipeline import RESUMABLE_STAGES, checkpoint_folder, stage_dir

    written = [(stage, stage_dir(cfg, stage)) for stage in stages]
    written += [(stage, checkpoint_folder(cfg, stage)) for stage in stages if stage in RESUMABLE_STAGES]
    for key in MODEL_KEYS:
        value = get_dotted(cfg, key)
        if not value or not Path(value).expanduser().exists():
            continue  # a Hub id, or unset
        model = Path(value).expanduser().resolve()
        for stage, folder in written:
            folder = folder.resolve()
            if model == folder or folder in model.parents:
                where = "is the folder" if model == folder else f"lies inside {folder}, which"
                raise ConfigError(
                    f"{key}: {value} {where} the {stage} stage of this run writes; copy it elsewhere or use another "
                    "output_dir"
                )


def check_router_loss(cfg: RahfConfig, stages: list[str]) -> None:
    """A `router_aux_loss_coef` in a TRL stage's `train:` mapping needs a mixture-of-experts `model` (TRL refuses any
    other when its trainer is built, maybe after earlier stages trained)."""
    from .config import model_config

    trl_stages = {"sft": "sft", "instruct": {"dual": "instruct", "dpo": "dpo"}.get(cfg.instruct_method)}
    for stage, section in trl_stages.items():
        coef = getattr(cfg, section).train.get("router_aux_loss_coef") if stage in stages and section else None
        if coef:
            config = model_config("model", cfg.model, cfg.revision_of(cfg.model), cfg.trust_remote_code)
            if not hasattr(config.get_text_config(), "output_router_logits"):
                raise ConfigError(
                    f"{section}.train.router_aux_loss_coef: {type(config).__name__} is no mixture-of-experts model, so "
                    "it has no router loss to weigh; drop it"
                )


def _will_train_ppo(cfg: RahfConfig, stage: str | None) -> bool:
    """Whether this command trains rlhf-ppo's policy: `rahf instruct`, or a run whose instruct stage is not fresh."""
    from .pipeline import _current, stage_dir, stage_fingerprint

    if stage is not None:
        return stage == "instruct"
    if "instruct" not in active_stages(cfg):
        return False
    try:
        return not _current(stage_dir(cfg, "instruct"), stage_fingerprint(cfg, "instruct")[0])
    except RahfError:  # an upstream stage not made yet: this run makes it, then trains
        return True


def check_model_ids(cfg: RahfConfig, stages: list[str]) -> None:
    """The other models the stages load (`generate.model`, `reward.model`, `tokenizer`) must be readable: a misspelt
    Hub id, or one not cached offline, stops the run here rather than after the earlier stages trained. So must the
    tokenizer of every local model folder the run reads (one cut short or malformed would otherwise stop the stage
    that loads it, maybe `generate` after the model trained): a Hub model's is left to its stage, which may find it
    in the cache."""
    from .config import get_dotted, model_config
    from .reward import MINILM
    from .training import adapter_base

    if "generate" in stages and cfg.generate.model:
        name, revision = cfg.generate.model, cfg.revision_of(cfg.generate.model)
        folder = Path(name).expanduser()
        if (folder / "adapter_config.json").is_file():  # a PEFT adapter, merged into its base as it loads: that
            name, revision = adapter_base(folder, cfg)  # base must be readable
        model_config("generate.model", name, revision, cfg.trust_remote_code)
    if "reward" in stages and cfg.reward.model not in (None, MINILM):
        model_config("reward.model", cfg.reward.model, cfg.revision_of(cfg.reward.model), cfg.trust_remote_code)
    if "sft" in stages and cfg.tokenizer:
        _check_tokenizer(cfg, "tokenizer", cfg.tokenizer)
    reads = {
        "model": not cfg.tokenizer,  # the run's tokenizer, unless `tokenizer` replaces it (sft saves that one)
        "generate.model": "generate" in stages,
        "reward.model": "reward" in stages and cfg.reward.model != MINILM,
        "evaluate.judge_model": "evaluate" in stages,
        "ppo.reward_model": "instruct" in stages and cfg.method == "rlhf-ppo",
    }
    for key, read in reads.items():
        value = get_dotted(cfg, key)
        if read and value and Path(value).expanduser().is_dir():
            _check_tokenizer(cfg, key, value)


def check_reward_backbone(cfg: RahfConfig, stages: list[str]) -> None:
    """The reward stage's backbone must be an architecture transformers has a sequence classifier for (Granite, OLMoE,
    Llama 4 have none), else `reward` stops in AutoModelForSequenceClassification after sft trained."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from .config import model_config
    from .reward import MINILM

    if "reward" not in stages or cfg.reward.model == MINILM:
        return
    name = cfg.reward.model or cfg.model  # the SFT model keeps `model`'s architecture
    config = model_config(
        "reward.model" if cfg.reward.model else "model", name, cfg.revision_of(name), cfg.trust_remote_code
    )
    custom = cfg.trust_remote_code and "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or custom:
        return
    what = f"{name}" if cfg.reward.model else f"unset, so the reward model starts from the SFT model of {name}"
    raise ConfigError(
        f"reward.model: {what}, a {config.model_type} model, which transformers has no sequence classifier for; set "
        f"reward.model to another backbone (e.g. {MINILM}), or leave the reward stage out"
    )


def check_eos_tokens(cfg: RahfConfig, stages: list[str]) -> None:
    """A new `eos_token` in `sft.train`, or in Dual's `instruct.train`, is refused here (`sft.check_eos_token`), not
    when its stage starts, maybe after sft trained. A tokenizer that cannot be read here is left to its stage."""
    from .models import load_tokenizer
    from .sft import check_eos_token

    sft_tokenizer = cfg.tokenizer or cfg.model  # the tokenizer sft trains with and saves
    asked = [("sft", cfg.sft.train, sft_tokenizer)] if "sft" in stages else []
    if "instruct" in stages and cfg.instruct_method == "dual":  # trained on the tokenizer of the model it starts from
        asked.append(("instruct", cfg.instruct.train, sft_tokenizer if "sft" in cfg.stages else cfg.model))
    for section, train, name in asked:
        if train.get("eos_token") is None:
            continue
        try:
            tokenizer = load_tokenizer(name, cfg.trust_remote_code, cfg.revision_of(name))
        except (LoadError, ConfigError):
            continue
        check_eos_token(train["eos_token"], tokenizer, section)


def _check_tokenizer(cfg: RahfConfig, key: str, name: str) -> None:
    """The tokenizer of `name` (the value of model key `key`) loads, else a ConfigError naming the key."""
    from .models import load_tokenizer

    try:
        load_tokenizer(name, cfg.trust_remote_code, cfg.revision_of(name))
    except ConfigError as e:  # it loads, and lacks what rahf needs (an EOS token)
        raise ConfigError(f"{key}: {e}") from None
    except LoadError as e:
        fix = "; save the tokenizer there again (tokenizer.save_pretrained)" if Path(name).expanduser().is_dir() else ""
        raise ConfigError(f"{key}: {e}{fix}") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_folders(cfg: RahfConfig) -> None:
    """Every local model folder the config names must hold a model config and tokenizer files (`tokenizer`: the
    tokenizer only; `model`: no tokenizer when `tokenizer` is set), and must not hold `output_dir` (the run's own
    artifacts would change the model's fingerprint under it)."""
    from .config import MODEL_KEYS, get_dotted
    from .reward import MINILM

    out = Path(cfg.output_dir).resolve()
    for key in MODEL_KEYS:
        value = get_dotted(cfg, key)
        folder = Path(value).expanduser() if value and value != MINILM else None
        if folder is None or not folder.is_dir():
            continue  # a Hub id, or unset
        if out == folder.resolve() or folder.resolve() in out.parents:
            raise ConfigError(f"output_dir: {cfg.output_dir} lies inside {key} ({value}); write the run elsewhere")
        configs = ("config.json",) if key == "model" else ("config.json", "adapter_config.json")  # or a PEFT adapter
        if key != "tokenizer" and not any((folder / c).is_file() for c in configs):
            raise ConfigError(
                f"{key}: {value} holds no {' or '.join(configs)}; give a folder saved with save_pretrained"
            )
        if (key != "model" or not cfg.tokenizer) and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise ConfigError(
                f"{key}: {value} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...); save the "
                "tokenizer there with tokenizer.save_pretrained"
                + (" or set tokenizer (with sft in stages, which reads it)" if key == "model" else "")
            )
        if key != "tokenizer":
            _check_weights(key, value, folder)


DATA_KEYS = (
    "data.path",
    "sft.path",
    "evaluate.pairs",
    "evaluate.neutral_prompts",
    "generate.prompts",
    "compare.validation",
)


def check_data_folders(cfg: RahfConfig) -> None:
    """No data key names a folder (a `datasets.save_to_disk` one) that holds `output_dir`: its fingerprint would
    cover the run's own artifacts, so every stage that reads it would find it changed and never be up to date."""
    from .config import get_dotted

    out = Path(cfg.output_dir).resolve()
    for key in DATA_KEYS:
        value = get_dotted(cfg, key)
        folder = Path(value).expanduser() if value else None
        if folder is not None and folder.is_dir() and (out == folder.resolve() or folder.resolve() in out.parents):
            raise ConfigError(
                f"output_dir: {cfg.output_dir} lies inside {key} ({value}), so the run's artifacts would change that "
                "data under it; write the run elsewhere"
            )


_PICKLED = ("pytorch_model*.bin", "adapter_model.bin")  # weights as pickles, which rahf does not read


def _check_weights(key: str, value: str, folder: Path) -> None:
    """A model folder must hold safetensors weights (a pickle can run code when it is read, so rahf reads none), each
    with a header that covers the whole file (one cut short by a full disk or an interrupted copy fails here, not in
    the middle of a run)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(f.name for pattern in _PICKLED for f in folder.glob(pattern))
        if pickled:
            raise ConfigError(
                f"{key}: {value} holds its weights as pickles ({pickled[0]}), which rahf does not load (a pickle can "
                "run code when it is read); if you trust them, save the model once with save_pretrained, which "
                "writes safetensors"
            )
        raise ConfigError(f"{key}: {value} holds no weights (model.safetensors, ...); save the model there again")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{key}: {f} is not a readable safetensors file ({e}); save the model again") from None


def check_upstream(cfg: RahfConfig, planned: list[str]) -> None:
    """Every artifact the `planned` stages read must be made by an earlier one of them or exist already (fresh),
    so a missing reward model, say, stops the run before SFT and step 1 have trained."""
    from .pipeline import _stage_inputs

    memo: dict[str, str | None] = {}
    for stage in planned:
        _stage_inputs(cfg, stage, memo)
        memo[f"stage:{stage}"] = "planned"


INSTRUCTED = ("scit", "lorra", "hir")  # methods whose prompts carry the instructions
_PROMPTED = ("instruct", "collect", "align", "generate", "evaluate")  # stages that build those prompts


def check_prompt_room(cfg: RahfConfig, instructed: bool) -> None:
    """A one-word query must fit data.max_prompt_length (beside each instruction when `instructed`), else every
    prompt fails later, maybe after earlier stages have trained.

    Best effort: a tokenizer that cannot be loaded here (a Hub model's not in the cache offline; a local folder's is
    checked by `check_model_ids`) is left for the stage itself to report.
    """
    from .models import load_tokenizer
    from .stimuli import truncate_prompt

    try:
        source = cfg.tokenizer or cfg.model
        tokenizer = load_tokenizer(source, cfg.trust_remote_code, cfg.revision_of(source))
    except LoadError:
        return
    systems = [cfg.instructions.preferred, cfg.instructions.dispreferred] if instructed else [None]
    truncate_prompt(tokenizer, [{"role": "user", "content": "why"}], systems, cfg.data.max_prompt_length)


def check_positions(cfg: RahfConfig, stages: list[str]) -> None:
    """The longest sequence a stage builds must fit a learned position table (GPT-2, OPT), else the stage fails
    deep inside with an IndexError. Best effort: a config that cannot be read here is left to the stage."""
    p = cfg.data.max_prompt_length
    generates = {"data.max_prompt_length + generate.max_new_tokens": p + cfg.generate.max_new_tokens}
    if "generate" in stages and cfg.generate.model:  # `rahf generate` runs that model instead of the run's
        _fits(cfg, cfg.generate.model, generates)
    needs = {}
    if any(s in stages for s in ("sft", "instruct", "collect", "align", "evaluate")):  # training, likelihoods
        needs["data.max_prompt_length + data.max_response_length"] = p + cfg.data.max_response_length
    if "generate" in stages and not cfg.generate.model:
        needs |= generates
    if "evaluate" in stages:
        needs["data.max_prompt_length + evaluate.max_new_tokens"] = p + cfg.evaluate.max_new_tokens
    if cfg.method == "rlhf-ppo" and "instruct" in stages:
        needs["data.max_prompt_length + ppo.max_new_tokens"] = p + cfg.ppo.max_new_tokens
    if "reward" in stages and cfg.reward.model is None:  # a reward model on this model's architecture
        needs["reward.max_length"] = cfg.reward.max_length
    _fits(cfg, cfg.model, needs)


def _fits(cfg: RahfConfig, model: str, needs: dict[str, int]) -> None:
    """Each length in `needs` (keys -> tokens) must fit `model`'s learned position table, if it has one."""
    from transformers import AutoConfig

    from .models import learned_position_limit
    from .training import adapter_base

    if not needs:
        return
    try:
        name, revision = model, cfg.revision_of(model)
        if (Path(model).expanduser() / "adapter_config.json").is_file():  # a PEFT adapter: its base's positions
            name, revision = adapter_base(Path(model).expanduser(), cfg)
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=cfg.trust_remote_code)
        limit = learned_position_limit(config, cfg.trust_remote_code)
    # an unreadable config, or an architecture that cannot be built on the meta device: a check, not a gate
    except Exception:  # noqa: BLE001
        return
    for keys, length in needs.items():
        if limit is not None and length > limit:
            raise ConfigError(
                f"{keys}: {length} tokens exceed the {limit} positions of {model} (a learned position "
                "table, max_position_embeddings); lower them to fit"
            )


def check_blocks(config, trust_remote_code: bool) -> None:
    """The model has one module per decoder block for collect and align to read and steer (`decoder_blocks`, on a
    meta-device copy). Best effort, as check_lora."""
    from .models import decoder_blocks, meta_model

    try:
        model = meta_model(config, trust_remote_code)
    except Exception:  # noqa: BLE001  (an architecture that cannot be built on the meta device: left to the stage)
        return
    decoder_blocks(model)


def check_lora(cfg: RahfConfig, stages: list[str]) -> None:
    """Every LoRA adapter the stages train must find its target modules in the model (checked on a meta-device
    copy), else PEFT stops the stage with a traceback, maybe after earlier stages trained. Best effort, as
    check_positions."""
    from .config import model_config
    from .models import meta_model
    from .training import check_lora_targets

    adapters = []
    if "instruct" in stages:
        section = {"dpo": cfg.dpo, "rlhf-ppo": cfg.ppo}.get(cfg.instruct_method)
        if section is None and cfg.finetune == "lora":
            adapters.append(("instruct.lora", cfg.instruct.lora, None))
        elif section is not None and section.finetune == "lora":
            adapters.append(("dpo.lora" if section is cfg.dpo else "ppo.lora", section.lora, None))
    if "align" in stages:
        adapters.append(("align.lora", cfg.align.lora, max(resolved_layers(cfg))))
    if not adapters:
        return
    config = model_config("model", cfg.model, cfg.revision_of(cfg.model), cfg.trust_remote_code)
    for key, settings, max_layer in adapters:
        try:
            model = meta_model(config, cfg.trust_remote_code)
        except Exception:  # noqa: BLE001  (an architecture that cannot be built on the meta device: left to the stage)
            return
        note = check_lora_targets(model, settings, key, max_layer)
        if note:
            print(f"[rahf] note: {note}", flush=True)


def unread_cache_note(cfg: RahfConfig) -> str | None:
    """What `rahf run` says when its stages collect a cache that its online alignment never reads (`rahf compare`
    collects anyway: its selection of layers and alpha reads the cache)."""
    if cfg.align.targets == "online" and {"collect", "align"} <= set(active_stages(cfg)):
        return (
            "align.targets: online computes the targets as align trains and reads no collect cache; drop collect from "
            "stages to skip writing one"
        )
    return None


def check_some_stages(cfg: RahfConfig) -> None:
    """A run with no stages would do nothing, silently."""
    if not cfg.stages:
        raise ConfigError(f"stages: empty, so there is nothing to run; list at least one of {', '.join(STAGES)}")

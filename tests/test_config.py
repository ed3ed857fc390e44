"""Config loading: every mistake is a ConfigError naming its key; overrides parse as YAML; paths resolve."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from rahf.config import load_config, parse_overrides
from rahf.errors import ConfigError, RahfError


@pytest.fixture
def base(tiny_model_dir, pairs_file, tmp_path) -> dict:
    """A valid minimal config as a mapping."""
    return {"model": str(tiny_model_dir), "data": {"path": str(pairs_file)}, "output_dir": str(tmp_path / "out")}


def with_(base: dict, **changes) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for dotted, value in changes.items():
        node = out
        *heads, last = dotted.split("__")
        for k in heads:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def error_of(*args) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_valid_config_loads_with_defaults(base):
    cfg = load_config(None, base)
    assert cfg.method == "scit" and cfg.finetune == "full"
    assert cfg.alpha == 5.0 and cfg.window == 64 and cfg.include_boundary is True
    assert cfg.data.path == base["data"]["path"]
    assert load_config(None, with_(base, method="dual")).finetune == "lora"
    assert issubclass(ConfigError, RahfError)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"align__lora__rank": 4}, "align.lora.rank"),
        ({"data__bogus": 1}, "data.bogus"),
    ],
)
def test_unknown_key(base, changes, key):
    msg = error_of(None, with_(base, **changes))
    assert msg.startswith(f"{key}: unknown key")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"window": "eight"}, "window"),
        ({"window": True}, "window"),  # a bool is not an int here
        ({"alpha": "strong"}, "alpha"),
        ({"layers": "1,2"}, "layers"),
        ({"layers": [1, "two"]}, "layers[1]"),
        ({"align__lora__r": 2.5}, "align.lora.r"),
        ({"data__limit": "ten"}, "data.limit"),
        ({"instruct__train": [1]}, "instruct.train"),
        ({"align": 3}, "align"),
        ({"method": "ppo"}, "method"),
        ({"collect__dtype": "int8"}, "collect.dtype"),
        ({"window": None}, "window"),
    ],
)
def test_bad_type_or_value_names_the_key(base, changes, key):
    msg = error_of(None, with_(base, **changes))
    assert msg.startswith(f"{key}:"), msg


def test_numbers_as_strings_are_read_as_floats(base):
    # YAML 1.1 reads 1e-4 as a string; float fields accept it.
    assert load_config(None, with_(base, alpha="1e-1")).alpha == pytest.approx(0.1)
    assert load_config(None, with_(base, alpha=3)).alpha == 3.0


@pytest.mark.parametrize("layers", [[0], [5], [1, 9], [-1]])
def test_layer_the_model_lacks(base, layers):
    msg = error_of(None, with_(base, layers=layers))
    assert msg.startswith("layers:") and "1..4" in msg  # the tiny model has 4 blocks


def test_repeated_and_empty_layers(base):
    assert error_of(None, with_(base, layers=[1, 1])).startswith("layers:")
    assert error_of(None, with_(base, layers=[])).startswith("layers:")
    assert load_config(None, with_(base, layers=[4, 1])).layers == [4, 1]


def test_a_model_config_with_a_field_of_the_wrong_type_is_one_line(base, tiny_model_dir, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": "x"}')
    msg = error_of(None, with_(base, model=str(model), layers=[1]))  # the layers are checked against the model
    assert msg.startswith(f"model: cannot read the config of '{model}'") and "num_hidden_layers" in msg, msg


def test_a_model_folder_without_its_config_is_named_as_such(base, tiny_model_dir, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "config.json").unlink()
    msg = error_of(None, with_(base, model=str(model), layers=[1]))
    assert msg == f"model: {model} holds no config.json; give a folder saved with save_pretrained", msg


_GATED = "You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/o/m."
_UNREACHABLE = "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection"
_UNKNOWN = "o/m is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'"
_DOWNLOAD = "and it is not in the local Hub cache: download it where there is a network (`hf download o/m`) or give a local folder"


@pytest.mark.parametrize(
    ("offline", "raised", "fix"),
    [
        (False, _GATED, "; request access at https://huggingface.co/o/m and set HF_TOKEN (or run `hf auth login`)"),
        (False, _UNREACHABLE, f"; the Hub cannot be reached {_DOWNLOAD}"),
        (True, _UNREACHABLE, f"; HF_HUB_OFFLINE is set {_DOWNLOAD}"),
        (False, _UNKNOWN + "\nIf this is a private repository, ...",
         "; check the spelling (a private repo also needs HF_TOKEN), or give a local folder's path"),
    ],
)  # fmt: skip
def test_a_hub_model_that_cannot_be_read_says_what_to_do(base, monkeypatch, offline, raised, fix):
    """transformers puts its advice on the lines after the first, which a one-line error leaves out."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    def refuse(*args, **kwargs):
        raise OSError(raised)

    monkeypatch.setattr(AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    msg = error_of(None, with_(base, model="o/m", layers=[1]))
    assert msg == f"model: cannot read the config of 'o/m' ({raised.splitlines()[0]}){fix}", msg


def test_nan_alpha_in_yaml(base, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {base['model']}\ndata:\n  path: {base['data']['path']}\nalpha: .nan\n")
    msg = error_of(path)
    assert msg.startswith("alpha:") and "finite" in msg


@pytest.mark.parametrize("override", ["alpha=inf", "alpha=.inf", "alpha=-.inf", "alpha=nan"])
def test_infinite_alpha_override(base, override):
    msg = error_of(None, [f"model={base['model']}", f"data.path={base['data']['path']}", override])
    assert msg.startswith("alpha:") and "finite" in msg


def test_missing_data_file(base, tmp_path):
    missing = tmp_path / "nope.jsonl"
    msg = error_of(None, with_(base, data__path=str(missing)))
    assert msg.startswith("data.path:") and str(missing) in msg


def test_empty_model_or_data_path_is_required(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_data = {k: v for k, v in base.items() if k != "data"}
    assert error_of(None, no_data).startswith("data.path: required")
    assert error_of(None, with_(base, model="")).startswith("model: required")


def test_data_is_not_needed_when_no_stage_reads_it(base, tmp_path):
    cfg = load_config(None, with_(base, data__path=str(tmp_path / "nope.jsonl"), stages=["merge"]))
    assert cfg.stages == ["merge"]


def test_window_longer_than_max_response_length(base):
    msg = error_of(None, with_(base, window=64, data__max_response_length=32))
    assert msg.startswith("window:") and "data.max_response_length=32" in msg
    assert load_config(None, with_(base, window=32, data__max_response_length=32)).window == 32


def test_unknown_train_arg(base):
    msg = error_of(None, with_(base, align__train={"bogus": 1}))
    assert msg.startswith("align.train.bogus:")
    assert error_of(None, with_(base, instruct__train={"bogus": 1})).startswith("instruct.train.bogus:")
    assert error_of(None, with_(base, align__train={"output_dir": "x"})).startswith("align.train.output_dir:")


def test_train_numbers_are_read_as_their_fields_type(base, tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string, which the optimizer would refuse only after the model loads."""
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(base) + "align:\n  train: {learning_rate: 1e-3, max_steps: 1e2, lr_scheduler_type: cosine}\n"
    )
    train = load_config(path).align.train
    assert train == {"learning_rate": 0.001, "max_steps": 100, "lr_scheduler_type": "cosine"}
    assert type(train["max_steps"]) is int
    assert error_of(None, with_(base, align__train={"learning_rate": "fast"})).startswith(
        "align.train.learning_rate: expected a number, got 'fast'"
    )
    assert error_of(None, with_(base, align__train={"max_steps": "1.5"})).startswith(
        "align.train.max_steps: expected an"
    )
    for bad in (math.nan, math.inf, "nan", "-inf"):
        msg = error_of(None, with_(base, sft__train={"learning_rate": bad}))
        assert msg.startswith("sft.train.learning_rate: must be a finite number")


def test_a_train_number_spelled_as_int_or_float_is_one_setting(base):
    """`max_grad_norm: 1` and `1.0` are one value and one fingerprint: a rerun spelling it the other way finds its
    stages fresh."""
    from rahf.pipeline import stage_fingerprint

    def step1(**train):
        return load_config(None, with_(base, instruct__train=train))

    for key in ("max_grad_norm", "weight_decay", "num_train_epochs", "warmup_steps", "logging_steps", "adam_epsilon"):
        a, b = step1(**{key: 1}), step1(**{key: 1.0})
        assert a.instruct.train[key] == b.instruct.train[key] == 1 and type(b.instruct.train[key]) is int, key
        assert stage_fingerprint(a, "instruct")[0] == stage_fingerprint(b, "instruct")[0], key
    assert step1(logging_steps=0.5).instruct.train["logging_steps"] == 0.5  # a ratio stays one
    assert type(step1(learning_rate="1e-3").instruct.train["learning_rate"]) is float
    fp = [stage_fingerprint(step1(max_grad_norm=n), "instruct")[0] for n in (1, 2)]
    assert fp[0] != fp[1]


def test_a_number_that_is_not_finite_inside_a_train_mapping_is_refused(base):
    for bad in (math.nan, -math.inf):  # YAML .nan and -.inf
        train = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": bad}}
        msg = error_of(None, with_(base, align__train=train))
        assert msg.startswith("align.train.lr_scheduler_kwargs.min_lr: must be a finite number"), msg
    nested = {"model_init_kwargs": {"a": [1.0, math.inf]}}
    assert error_of(None, with_(base, sft__train=nested)).startswith(
        "sft.train.model_init_kwargs.a[1]: must be a finite"
    )


def test_a_dpo_loss_trl_does_not_know_is_refused_before_anything_trains(base):
    assert load_config(None, with_(base, method="dpo", dpo__loss_type="ipo")).dpo.loss_type == "ipo"
    assert load_config(None, with_(base, method="dpo", dpo__train={"loss_type": ["sigmoid", "sft"]}))
    msg = error_of(None, with_(base, method="dpo", dpo__loss_type="foo"))
    assert msg.startswith("dpo.loss_type: 'foo' is not a loss of trl's DPOTrainer (known: sigmoid, hinge, ipo"), msg
    msg = error_of(None, with_(base, method="dpo", dpo__train={"loss_type": ["sigmoid", "sigmiod"]}))
    assert msg.startswith("dpo.train.loss_type: 'sigmiod' is not a loss of trl's DPOTrainer"), msg


def test_train_numbers_in_compare_overrides_reach_the_trainer_as_numbers(base, tmp_path):
    from transformers import TrainingArguments

    from rahf.config import with_overrides
    from rahf.training import training_args

    cfg = load_config(None, with_(base, compare__overrides={"dual": {"align": {"train": {"learning_rate": "1e-3"}}}}))
    tuned = with_overrides(cfg, cfg.compare.overrides["dual"])
    assert training_args(TrainingArguments, tuned, tmp_path, tuned.align.train).learning_rate == 0.001


def test_a_schedules_options_written_as_text_are_read_as_numbers_or_refused(base):
    """Only `1e-5`-shaped text is a number to YAML 1.1; a schedule's options are numbers (but for names), so a quoted
    "0.1" is one, and `nan` (text to YAML 1.1) is refused as not finite instead of crashing align after collect."""
    train = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": "0.1"}}
    assert load_config(None, with_(base, align__train=train)).align.train["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    msg = error_of(None, with_(base, align__train=train | {"lr_scheduler_kwargs": {"min_lr_rate": "nan"}}))
    assert msg.startswith("align.train.lr_scheduler_kwargs.min_lr_rate: must be a finite number"), msg
    wsd = {
        "lr_scheduler_type": "warmup_stable_decay",
        "lr_scheduler_kwargs": {"num_decay_steps": 2, "decay_type": "cosine"},
    }
    assert load_config(None, with_(base, align__train=wsd)).align.train["lr_scheduler_kwargs"]["decay_type"] == "cosine"
    kwargs = {"gradient_checkpointing_kwargs": {"note": "2024"}}  # elsewhere text stays text
    assert load_config(None, with_(base, sft__train=kwargs)).sft.train["gradient_checkpointing_kwargs"] == {
        "note": "2024"
    }


def test_a_strategy_written_no_as_yaml_reads_it_is_no(base, tmp_path):
    """`save_strategy: no`, as Hugging Face's examples write it, is false to YAML 1.1."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base) + "align:\n  train: {save_strategy: no}\n")
    assert load_config(path).align.train["save_strategy"] == "no"
    cfg = load_config(None, with_(base, **parse_overrides(["align.train.eval_strategy=no"])))
    assert cfg.align.train["eval_strategy"] == "no"


def test_numbers_in_train_mappings_reach_the_trainer_as_numbers(base, tmp_path):
    """YAML 1.1 reads `1e-5` as text; inside lr_scheduler_kwargs no field type says it is a number."""
    from transformers import TrainingArguments

    from rahf.training import training_args

    override = parse_overrides(["align.train.lr_scheduler_kwargs={min_lr: 1e-5, num_cycles: 1e-5x}"])
    assert override["align"]["train"]["lr_scheduler_kwargs"]["min_lr"] == "1e-5"  # as YAML 1.1 reads it
    train = override["align"]["train"] | {"learning_rate": "1e-3", "lr_scheduler_type": "cosine_with_min_lr"}
    cfg = load_config(None, with_(base, align__train=train | {"lr_scheduler_kwargs": {"min_lr": "1e-5"}}))
    args = training_args(TrainingArguments, cfg, tmp_path, cfg.align.train)
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    from rahf.trainargs import train_arguments

    assert train_arguments("align", train, TrainingArguments)["lr_scheduler_kwargs"] == {
        "min_lr": 1e-5,
        "num_cycles": "1e-5x",
    }
    assert args.learning_rate == 1e-3


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"optim": "adamw_bnb_8bit"}, "align.train.optim: adamw_bnb_8bit: You need to install `bitsandbytes`"),
        (
            {"lr_scheduler_type": "cosine_with_min_lr"},
            "align.train.lr_scheduler_type: cosine_with_min_lr: One of min_lr",
        ),
        ({"use_liger_kernel": True}, "align.train.use_liger_kernel: liger-kernel is not installed here"),
    ],
)
def test_optimizers_schedules_and_kernels_the_stage_could_not_make_are_refused_up_front(
    base, monkeypatch, train, message
):
    from transformers import utils

    monkeypatch.setattr(utils, "is_liger_kernel_available", lambda: False)
    monkeypatch.setattr("transformers.utils.import_utils.is_bitsandbytes_available", lambda: False, raising=False)
    assert error_of(None, with_(base, align__train=train)).startswith(message)
    fine = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}
    load_config(None, with_(base, align__train=fine))


def test_an_optimizer_whose_value_error_says_to_install_a_package_is_refused_up_front(base, monkeypatch):
    """transformers' grokadamw raises a ValueError, not an ImportError, when its package is missing; a ValueError
    that asks for no package (GaLore, APOLLO and LOMO need the model itself) is left to the stage."""
    from transformers import Trainer, trainer_optimizer

    monkeypatch.setattr(trainer_optimizer, "is_grokadamw_available", lambda: False)
    assert error_of(None, with_(base, align__train={"optim": "grokadamw"})) == (
        "align.train.optim: grokadamw: Please install grokadamw with `pip install grokadamw`"
    )

    def needs_the_model(args, model=None):
        raise ValueError("You need to pass `optim_target_modules` to use this optimizer")

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(needs_the_model))
    assert load_config(None, with_(base, align__train={"optim": "grokadamw"})).align.train == {"optim": "grokadamw"}


def test_report_to_names_an_installed_logger(base, monkeypatch):
    """Each logger by its own check: flyte, which `report_to: all` never picks, is accepted when installed."""
    from transformers.integrations import integration_utils as tools

    for name, installed in (("wandb", False), ("tensorboard", True), ("flytekit", True)):
        monkeypatch.setattr(tools, f"is_{name}_available", lambda installed=installed: installed)
    assert error_of(None, with_(base, align__train={"report_to": "wandb"})) == (
        "align.train.report_to: wandb is not installed here; install it or drop it"
    )
    assert error_of(None, with_(base, sft__train={"report_to": ["tensorboard", "wandbb"]})).startswith(
        "sft.train.report_to: unknown logger 'wandbb' (known: all, none, "
    )
    for fine in ("none", "all", ["tensorboard"], "flyte"):
        load_config(None, with_(base, align__train={"report_to": fine}))


def test_home_folder_in_output_dir_expands(base, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, with_(base, output_dir="~/runs/x")).output_dir == str(tmp_path / "runs" / "x")


def test_train_args_are_checked_against_the_class_the_method_uses(base):
    # Dual trains with trl.SFTConfig (has max_length); SCIT with plain TrainingArguments (has not).
    assert load_config(None, with_(base, method="dual", instruct__train={"max_length": 2048})).instruct.train == {
        "max_length": 2048
    }
    assert error_of(None, with_(base, instruct__train={"max_length": 2048})).startswith("instruct.train.max_length:")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"stages": ["collect", "instruct"]}, "stages"),
        ({"stages": ["train"]}, "stages"),
        ({"data__align_fraction": 1.0}, "data.align_fraction"),
        ({"instruct__label_smoothing": 0.5}, "instruct.label_smoothing"),
        ({"window": 0}, "window"),
        ({"stages": ["instruct", "generate"]}, "generate.prompts"),
    ],
)
def test_contradictory_or_out_of_range_values(base, changes, key):
    assert error_of(None, with_(base, **changes)).startswith(f"{key}:")


def test_several_greedy_samples_are_refused(base):
    msg = error_of(None, with_(base, evaluate__temperature=0.0, evaluate__samples=4))
    assert msg.startswith("evaluate.samples: 4 copies of one greedy reply"), msg
    assert load_config(None, with_(base, evaluate__temperature=0.0, evaluate__samples=1)).evaluate.samples == 1


def test_repeated_stage(base):
    assert error_of(None, with_(base, stages=["sft", "sft"])) == "stages: repeated stage sft"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"data__limit": 0}, "data.limit"),
        ({"data__limit": -3}, "data.limit"),
        ({"evaluate__limit": 0}, "evaluate.limit"),
        ({"dpo__beta": 0.0}, "dpo.beta"),
        ({"dpo__beta": -1.0}, "dpo.beta"),
        ({"dpo__beta": math.inf}, "dpo.beta"),
        ({"dpo__beta": math.nan}, "dpo.beta"),
        ({"evaluate__temperature": math.nan}, "evaluate.temperature"),
        ({"evaluate__temperature": -0.5}, "evaluate.temperature"),
        ({"evaluate__temperatures": [0.0, math.nan]}, "evaluate.temperatures[1]"),
        ({"generate__temperature": math.nan}, "generate.temperature"),
        ({"generate__temperature": -1.0}, "generate.temperature"),
        ({"generate__top_p": 0.0}, "generate.top_p"),
        ({"ppo__temperature": 0.0}, "ppo.temperature"),
        ({"ppo__gamma": 1.5}, "ppo.gamma"),
        ({"ppo__learning_rate": math.nan}, "ppo.learning_rate"),
        ({"compare__alphas": [1.0, math.nan]}, "compare.alphas[1]"),
        ({"compare__label_noise": [1.0]}, "compare.label_noise[0]"),
        ({"data__label_noise": math.nan}, "data.label_noise"),
    ],
)
def test_out_of_range_or_non_finite_numbers(base, changes, key):
    msg = error_of(None, with_(base, **changes))
    assert msg.startswith(f"{key}: must be "), msg


def lora_sections() -> list[str]:
    """Every config section that has a LoRA adapter."""
    from rahf.config import LoraSettings, RahfConfig

    cfg = RahfConfig()
    return [
        f.name for f in dataclasses.fields(cfg) if isinstance(getattr(getattr(cfg, f.name), "lora", None), LoraSettings)
    ]


@pytest.mark.parametrize("section", lora_sections())
@pytest.mark.parametrize(("field", "value"), [("r", 0), ("alpha", math.nan), ("alpha", 0.0), ("dropout", 1.0)])
def test_lora_settings_in_every_section(base, section, field, value):
    msg = error_of(None, with_(base, **{f"{section}__lora": {field: value}}))
    assert msg.startswith(f"{section}.lora.{field}: must be "), msg


def test_range_edges_are_accepted(base):
    edges = {"data__limit": 1, "evaluate__limit": 1, "dpo__beta": 1e-3, "generate__temperature": 0.0}
    edges |= {"generate__top_p": 1.0, "evaluate__temperature": 0.0, "ppo__missing_eos_penalty": 0.0}
    cfg = load_config(None, with_(base, align__lora={"r": 1, "dropout": 0.0}, **edges))
    assert cfg.data.limit == 1 and cfg.align.lora.dropout == 0.0 and cfg.ppo.missing_eos_penalty == 0.0
    assert {"instruct", "align", "dpo", "ppo"} <= set(lora_sections())


def test_ranges_are_checked_in_compare_overrides(base):
    msg = error_of(None, with_(base, compare__overrides={"dpo": {"dpo": {"beta": -1.0}}}))
    assert msg.startswith("compare.overrides.dpo: dpo.beta: must be "), msg


@pytest.mark.parametrize("section", ["sft", "instruct", "align", "dpo", "reward"])
def test_hub_token_in_train_settings(base, section):
    msg = error_of(None, with_(base, **{f"{section}__train": {"hub_token": "hf_x"}}))
    assert msg.startswith(f"{section}.train.hub_token:") and "HF_TOKEN" in msg, msg


def test_token_strings_in_train_settings_are_not_secrets(base):
    cfg = load_config(None, with_(base, sft__train={"eos_token": "</s>"}, dpo__train={"pad_token": "<pad>"}))
    assert cfg.sft.train == {"eos_token": "</s>"} and cfg.dpo.train == {"pad_token": "<pad>"}


def test_hub_token_in_compare_overrides(base):
    overrides = {"rahf-dual": {"instruct": {"train": {"hub_token": "hf_x"}}}}
    msg = error_of(None, with_(base, compare__overrides=overrides))
    assert msg.startswith("compare.overrides.rahf-dual: instruct.train.hub_token:") and "HF_TOKEN" in msg, msg


def test_train_fields_in_compare_overrides_follow_the_method(base):
    # Dual's instruct stage trains with trl.SFTConfig (has max_length); DPO's train mapping is a DPOConfig.
    ok = {"dual": {"instruct": {"train": {"max_length": 2048}}}}
    assert load_config(None, with_(base, compare__overrides=ok)).compare.overrides == ok
    msg = error_of(None, with_(base, compare__overrides={"scit": {"instruct": {"train": {"max_length": 2048}}}}))
    assert msg.startswith("compare.overrides.scit: instruct.train.max_length:"), msg


# ---------------------------------------------------------------- model locations

MODEL_KEYS = ["model", "tokenizer", "reward.model", "generate.model", "evaluate.judge_model", "ppo.reward_model"]
WITH_SFT = ["sft", "instruct", "collect", "align", "merge"]


def model_override(key: str, value: str, base: dict) -> list[str]:
    """Overrides setting `key` (the sft stage included, which reads `tokenizer`)."""
    return [f"model={base['model']}", f"data.path={base['data']['path']}", f"stages={WITH_SFT}", f"{key}={value}"]


@pytest.mark.parametrize("key", MODEL_KEYS)
@pytest.mark.parametrize("value", ["{tmp}/missing-model", "./missing-model", "a/b/c", "~/missing-model"])
def test_local_model_path_that_does_not_exist(base, tmp_path, monkeypatch, key, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    msg = error_of(None, model_override(key, value.format(tmp=tmp_path), base))
    assert msg.startswith(f"{key}: ") and "does not exist" in msg and "org/name" in msg, msg


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_hub_ids_are_accepted_without_network(base, key):
    for hub_id in ("someorg/some-model", "gpt2"):
        cfg = load_config(None, model_override(key, hub_id, base))
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == hub_id


def test_org_name_beside_a_folder_of_that_org_stays_a_hub_id(base, tmp_path):
    """As in transformers: `Qwen/x` is a local folder only where that exact folder exists."""
    (tmp_path / "Qwen").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(f"model: Qwen/not-downloaded\ndata:\n  path: {base['data']['path']}\n")
    assert load_config(path).model == "Qwen/not-downloaded"
    (tmp_path / "Qwen" / "not-downloaded").mkdir()
    assert load_config(path).model == str(tmp_path.resolve() / "Qwen" / "not-downloaded")


def test_home_folder_paths_expand(base, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(Path(tiny_model_dir).parent))
    cfg = load_config(None, with_(base, model=f"~/{Path(tiny_model_dir).name}"))
    assert cfg.model == str(tiny_model_dir)


def test_tokenizer_without_an_sft_stage(base, tiny_model_dir):
    msg = error_of(None, with_(base, tokenizer=str(tiny_model_dir)))
    assert msg.startswith("tokenizer: only the sft stage reads it"), msg
    assert load_config(None, with_(base, tokenizer=str(tiny_model_dir), stages=WITH_SFT)).tokenizer
    # `rahf sft` runs the sft stage whatever `stages` lists
    assert load_config(None, with_(base, tokenizer=str(tiny_model_dir)), stage="sft").tokenizer


def test_model_config_unreadable(base, tmp_path):
    (tmp_path / "empty").mkdir()
    msg = error_of(None, with_(base, model=str(tmp_path / "empty"), layers=[1]))
    assert msg.startswith("model:")


def test_yaml_file_errors(tmp_path):
    assert error_of(tmp_path / "missing.yaml").startswith("config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: [1, 2\n")
    assert "not valid YAML" in error_of(bad)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n"])
def test_yaml_file_that_is_not_a_mapping(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    assert "expected a mapping" in error_of(tmp_path / "c.yaml")


# ---------------------------------------------------------------- overrides


def test_overrides_parse_values_as_yaml():
    tree = parse_overrides(
        [
            "alpha=3",
            "align.lora.r=16",
            "align.lora.dropout=0.1",
            "layers=[1, 2]",
            "include_boundary=false",
            "generate.model=null",
            "data.limit=",
            "instructions.preferred=be kind = good",
            "align.train.learning_rate=1e-4",
        ]
    )
    assert tree == {
        "alpha": 3,
        "align": {"lora": {"r": 16, "dropout": 0.1}, "train": {"learning_rate": "1e-4"}},
        "layers": [1, 2],
        "include_boundary": False,
        "generate": {"model": None},
        "data": {"limit": None},
        "instructions": {"preferred": "be kind = good"},
    }


def test_a_mapping_override_merges_with_earlier_ones_in_either_order():
    dotted, mapping = "instruct.train.learning_rate=0.5", "instruct.train={num_train_epochs: 3, learning_rate: 0.1}"
    assert parse_overrides([dotted, mapping]) == {"instruct": {"train": {"learning_rate": 0.1, "num_train_epochs": 3}}}
    assert parse_overrides([mapping, dotted]) == {"instruct": {"train": {"learning_rate": 0.5, "num_train_epochs": 3}}}
    assert (
        parse_overrides([dotted, "instruct.train={num_train_epochs: 3}"])["instruct"]["train"]["learning_rate"] == 0.5
    )


@pytest.mark.parametrize("item", ["alpha=[1", "layers={a: 1", "instructions.preferred=a: b: c"])
def test_override_that_is_not_valid_yaml(item):
    with pytest.raises(ConfigError) as e:
        parse_overrides(["alpha=3", item])
    assert str(e.value).startswith(f"{item}: not valid YAML (") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("instructions.preferred=You are assistant #1, be kind", "You are assistant #1, be kind"),
        ("instructions.preferred=#1 rule: be kind", "#1 rule: be kind"),
        ("instructions.preferred=  say #hi  ", "say #hi"),
        ("instructions.preferred='quoted' # a comment", "quoted"),
    ],
)
def test_hash_in_an_override_value_is_text(item, value):
    """On the command line ` #` is part of the value, not the start of a YAML comment."""
    assert parse_overrides([item]) == {"instructions": {"preferred": value}}


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("instructions.preferred=Be kind.\nAnswer in one sentence.", "Be kind.\nAnswer in one sentence."),
        ("instructions.preferred=Be kind.\n\nBe brief.", "Be kind.\n\nBe brief."),
        ("instructions.preferred='Be kind.\n  Be brief.'", "Be kind.\n  Be brief."),
    ],
)
def test_line_breaks_in_an_override_value_are_kept(item, value):
    """YAML folds a line break into a space; typed on a command line (`$'...\n...'`) it is part of the text."""
    assert parse_overrides([item]) == {"instructions": {"preferred": value}}
    with pytest.raises(ConfigError) as e:
        parse_overrides(["layers=[1,\n2"])
    assert "\n" not in str(e.value)  # one line


@pytest.mark.parametrize(("item", "says"), [("alpha=1:30", "1:30 is a base-60 number to YAML, 90; write 90"),
                                            ("alpha=1:30.5", "1:30.5 is a base-60 number to YAML, 90.5")])  # fmt: skip
def test_a_base_60_number_is_refused(item, says, tmp_path):
    """YAML 1.1 reads 1:30 as 90; refused rather than silently read so."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_overrides([item])
    assert parse_overrides(["instructions.preferred='1:30'"]) == {"instructions": {"preferred": "1:30"}}
    path = tmp_path / "c.yaml"
    path.write_text(item.replace("=", ": ") + "\n")
    with pytest.raises(ConfigError, match=re.escape(says.split(";")[0])):
        load_config(path)


@pytest.mark.parametrize("item", ["seed=010", "seed=-007", "compare.seeds=[1, 02]"])
def test_leading_zero_integer_is_refused(item, tmp_path):
    """YAML 1.1 reads 010 as octal 8; refused rather than silently turned into 8 (or read as 10)."""
    with pytest.raises(ConfigError) as e:
        parse_overrides([item])
    assert str(e.value).startswith(f"{item}: not valid YAML (") and "leading zero" in str(e.value), e.value
    path = tmp_path / "c.yaml"
    path.write_text("model: x\nseed: 010\n")
    assert error_of(path).startswith(f"{path}, line 2: not valid YAML (010 has a leading zero")
    assert parse_overrides(["seed=10", "alpha=0.5", "window=0"]) == {"seed": 10, "alpha": 0.5, "window": 0}


@pytest.mark.parametrize("item", ["=3", " =3", "align..r=4", "align.=4"])
def test_override_with_an_empty_key(item):
    with pytest.raises(ConfigError) as e:
        parse_overrides([item])
    assert str(e.value) == f"empty key in override {item!r}: write key=value, e.g. alpha=3"


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["alpha"])


def test_overrides_merge_into_the_file(tmp_path, tiny_model_dir, pairs_file):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"model: {tiny_model_dir}\ndata:\n  path: {pairs_file}\n  max_prompt_length: 100\n"
        "align:\n  lora:\n    r: 4\n    alpha: 12\n"
    )
    cfg = load_config(path, ["align.lora.r=16", "alpha=2.5", "data.limit=8", "layers=[2, 3]"])
    assert cfg.align.lora.r == 16 and cfg.align.lora.alpha == 12.0  # sibling key from the file survives
    assert cfg.alpha == 2.5 and isinstance(cfg.alpha, float)
    assert cfg.data.limit == 8 and cfg.data.max_prompt_length == 100
    assert cfg.layers == [2, 3]
    assert not math.isnan(cfg.alpha)


def test_override_of_a_scalar_with_a_subkey_is_an_error(base):
    with pytest.raises(ConfigError, match="alpha"):
        load_config(None, ["alpha=3", "alpha.x=1"])


# ---------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    (proj / "data" / "pairs.jsonl").write_bytes(Path(pairs_file).read_bytes())
    (proj / "prompts.jsonl").write_text('{"prompt": "mia asks"}\n')
    (proj / "c.yaml").write_text(
        "model: model\ndata:\n  path: data/pairs.jsonl\noutput_dir: runs/x\nlayers: [1]\n"
        "generate:\n  prompts: ./prompts.jsonl\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../proj/c.yaml")
    assert cfg.model == str(proj.resolve() / "model")
    assert cfg.data.path == str(proj.resolve() / "data" / "pairs.jsonl")
    assert cfg.output_dir == str(proj.resolve() / "runs" / "x")
    assert Path(cfg.generate.prompts).resolve() == (proj / "prompts.jsonl").resolve()

    # on the command line, paths are the shell's: relative to the current folder, even where the config's
    # folder has the same names
    (elsewhere / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    (elsewhere / "data").mkdir()
    (elsewhere / "data" / "pairs.jsonl").write_bytes(Path(pairs_file).read_bytes())
    typed = [
        "model=./model",
        "data.path=data/pairs.jsonl",
        "output_dir=runs/y",
        "generate.prompts=../proj/prompts.jsonl",
    ]
    cfg = load_config("../proj/c.yaml", typed)
    assert cfg.model == str(elsewhere.resolve() / "model")
    assert cfg.data.path == str(elsewhere.resolve() / "data" / "pairs.jsonl")
    assert cfg.output_dir == str(elsewhere.resolve() / "runs" / "y")
    assert Path(cfg.generate.prompts).resolve() == (proj / "prompts.jsonl").resolve()
    # a per-method override typed on the command line too, even where the config's folder has that file
    cfg = load_config("../proj/c.yaml", ["compare.overrides.scit.data.path=data/pairs.jsonl"])
    assert cfg.compare.overrides["scit"]["data"]["path"] == str(elsewhere.resolve() / "data" / "pairs.jsonl")
    # a typed file that is not there is looked for, and named, in the current folder only
    with pytest.raises(ConfigError, match=rf"^data.path: file not found: {elsewhere.resolve() / 'nope.jsonl'}$"):
        load_config("../proj/c.yaml", ["data.path=nope.jsonl"])


def test_hub_ids_stay_hub_ids_and_dot_paths_resolve(tmp_path, pairs_file, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "c.yaml").write_text(f"model: someorg/some-model\ndata:\n  path: {pairs_file}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(proj / "c.yaml")
    assert cfg.model == "someorg/some-model"  # no such folder next to the config: a hub id
    (proj / "d.yaml").write_text("model: someorg/some-model\ndata:\n  path: ./missing.jsonl\n")
    msg = error_of(proj / "d.yaml")
    assert msg.startswith("data.path:") and str(proj.resolve() / "missing.jsonl") in msg


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")), ids=str)
def test_example_configs_use_only_known_keys(path):
    """Full validation needs the hub model; every key and type is still checked."""
    from rahf.config import RahfConfig, _build

    _build(RahfConfig, yaml.safe_load(path.read_text()), "")


# ---------------------------------------------------------------- train values, seeds, files


@pytest.mark.parametrize(
    ("train", "start"),
    [
        ({"max_steps": 1.5}, "align.train.max_steps: expected an integer, got 1.5"),
        ({"learning_rate": None}, "align.train.learning_rate: must not be null"),
        ({"learning_rate": [0.1]}, "align.train.learning_rate: expected a number, got a list"),
        ({"learning_rate": {"a": 1}}, "align.train.learning_rate: expected a number, got a mapping"),
        ({"learning_rate": True}, "align.train.learning_rate: expected a number, got True"),
        ({"disable_tqdm": "sometimes"}, "align.train.disable_tqdm: expected true or false, got 'sometimes'"),
        ({"run_name": 7}, "align.train.run_name: expected a string, got 7"),
        ({"lr_scheduler_type": "constnt"}, "align.train.lr_scheduler_type: 'constnt' is not one of linear, cosine"),
        ({"optim": "adamw_foo"}, "align.train.optim: 'adamw_foo' is not one of adamw_torch"),
        ({"per_device_train_batch_size": 0}, "align.train.per_device_train_batch_size: must be >= 1, got 0"),
        ({"gradient_accumulation_steps": -2}, "align.train.gradient_accumulation_steps: must be >= 1, got -2"),
        ({"num_train_epochs": 0}, "align.train.num_train_epochs: must be > 0"),
        ({"max_steps": 0}, "align.train.max_steps: must be >= 1 (or -1: train num_train_epochs), got 0"),
        ({"learning_rate": -1e-3}, "align.train.learning_rate: must be >= 0"),
        ({"logging_steps": 0}, "align.train.logging_steps: logging strategy"),  # the library's own rule
        ({"seed": -1}, "align.train.seed: must be in [0, 4294967295], got -1"),
        ({"data_seed": 2**32}, "align.train.data_seed: must be in [0, 4294967295]"),
        ({"dataloader_num_workers": -1}, "align.train.dataloader_num_workers: must be >= 0, got -1"),
        ({"deepspeed": "ds.json"}, "align.train.deepspeed: "),  # not installed here: ImportError, not a traceback
        ({"accelerator_config": "missing.json"}, "align.train.accelerator_config: "),  # a file that is not there
        ({"save_strategy": True}, "align.train.save_strategy: expected one of no, steps, epoch, best, got True (YAML"),
        (
            {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": "x"}},
            "align.train.lr_scheduler_type: cosine_with_min_lr: ",  # read past the warmup, where it is used
        ),
    ],
)
def test_train_values_of_the_wrong_type_or_range(base, train, start):
    """Each would pass validation and fail after the earlier stages have trained."""
    msg = error_of(None, with_(base, align__train=train))
    assert msg.startswith(start), msg


@pytest.mark.parametrize(
    ("section", "method", "train", "key"),
    [
        ("sft", "scit", {"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ("sft", "scit", {"max_length": 0}, "max_length"),
        ("instruct", "scit", {"max_steps": 2.5}, "max_steps"),
        ("instruct", "dual", {"lr_scheduler_type": "cosin"}, "lr_scheduler_type"),
        ("dpo", "dpo", {"beta": None}, "beta"),
        ("reward", "scit", {"num_train_epochs": -1}, "num_train_epochs"),
    ],
)
def test_train_values_are_checked_in_every_section(base, section, method, train, key):
    msg = error_of(None, with_(base, method=method, **{f"{section}__train": train}))
    assert msg.startswith(f"{section}.train.{key}: "), msg


@pytest.mark.parametrize(
    ("section", "method", "train", "start"),
    [
        ("reward", "scit", {"eos_token": "<unk>"}, "reward.train.eos_token: rahf tokenizes the pairs before"),
        ("sft", "scit", {"assistant_only_loss": True}, "sft.train.assistant_only_loss: rahf's rows already carry"),
        ("instruct", "dual", {"completion_only_loss": False}, "instruct.train.completion_only_loss: rahf's rows"),
        ("sft", "scit", {"dataset_text_field": "content"}, "sft.train.dataset_text_field: rahf tokenizes the data"),
        (
            "sft",
            "scit",
            {"packing": True, "max_length": 4096, "packing_strategy": "wrapped"},
            "sft.train.packing_strategy: wrapped packing cuts examples apart",
        ),
        ("sft", "scit", {"max_length": 16}, "sft.train.max_length: 16 would cut the end off replies"),
        ("instruct", "dual", {"loss_type": "bogus"}, "instruct.train.loss_type: must be one of nll, dft"),
        ("sft", "scit", {"model_init_kwargs": {"dtype": "bfloat16"}}, "sft.train.model_init_kwargs: rahf loads"),
        ("sft", "scit", {"trust_remote_code": True}, "sft.train.trust_remote_code: rahf loads every model itself"),
        ("reward", "scit", {"trust_remote_code": False}, "reward.train.trust_remote_code: rahf loads every model"),
        ("dpo", "dpo", {"activation_offloading": True}, "dpo.train.activation_offloading: it offloads CUDA"),
        ("dpo", "dpo", {"sync_ref_model": True}, "dpo.train.sync_ref_model: TRL cannot sync the reference"),
        ("dpo", "dpo", {"loss_type": ["exo_pair"]}, "dpo.train.label_smoothing: the exo_pair loss needs it"),
        ("dpo", "dpo", {"label_smoothing": 0.1}, "dpo.train.label_smoothing: no loss of sigmoid reads it"),
        ("dpo", "dpo", {"f_divergence_type": "bogus"}, "dpo.train.f_divergence_type: must be one of reverse_kl"),
        (
            "dpo",
            "dpo",
            {"f_divergence_type": "forward_kl", "loss_type": ["apo_zero"]},
            "dpo.train.f_divergence_type: forward_kl applies to the losses",
        ),
        ("dpo", "dpo", {"use_weighting": True, "loss_type": ["aot"]}, "dpo.train.use_weighting: TRL does not weight"),
        ("dpo", "dpo", {"truncation_mode": "keep_end"}, "dpo.train.truncation_mode: rahf cuts prompts"),
    ],
)
def test_trl_settings_that_rahfs_rows_ignore_or_that_trl_refuses_late_are_refused(base, section, method, train, start):
    """Each passed validation, then did nothing, trained on other tokens than it should, or stopped the stage when
    TRL built its trainer (after the earlier stages had trained)."""
    msg = error_of(None, with_(base, method=method, **{f"{section}__train": train}))
    assert msg.startswith(start), msg


def test_trl_settings_that_do_apply_are_accepted(base):
    cfg = load_config(None, base)
    rows = cfg.data.max_prompt_length + cfg.data.max_response_length
    load_config(None, with_(base, sft__train={"packing": True, "max_length": rows}))
    load_config(None, with_(base, method="dual", instruct__train={"loss_type": "dft", "completion_only_loss": True}))
    load_config(None, with_(base, method="dpo", dpo__train={"loss_type": ["robust"], "label_smoothing": 0.1}))
    load_config(None, with_(base, method="dpo", dpo__train={"f_divergence_type": "js_divergence"}))
    full = with_(base, method="dpo", dpo__train={"sync_ref_model": True})
    load_config(None, full | {"dpo": full["dpo"] | {"finetune": "full"}})
    # the loss named by dpo.loss_type (dpo.train.loss_type overrides it) is the one the checks read
    robust = with_(base, method="dpo", dpo__train={"label_smoothing": 0.1})
    load_config(None, robust | {"dpo": robust["dpo"] | {"loss_type": "robust"}})
    exo = with_(base, method="dpo", dpo__train={"label_smoothing": 0.001})
    load_config(None, exo | {"dpo": exo["dpo"] | {"loss_type": "exo_pair"}})
    for loss, train, start in (
        ("exo_pair", {}, "dpo.train.label_smoothing: the exo_pair loss needs it"),
        ("aot", {"use_weighting": True}, "dpo.train.use_weighting: TRL does not weight"),
        ("bco_pair", {"f_divergence_type": "js_divergence"}, "dpo.train.f_divergence_type: js_divergence applies"),
    ):
        named = with_(base, method="dpo", dpo__train=train)
        msg = error_of(None, named | {"dpo": named["dpo"] | {"loss_type": loss}})
        assert msg.startswith(start), msg


@pytest.mark.parametrize(
    ("section", "method", "train", "start"),
    [
        ("align", "scit", {"eval_strategy": "steps"}, "align.train.eval_strategy: no pairs are held out to evaluate"),
        ("sft", "scit", {"load_best_model_at_end": True}, "sft.train.load_best_model_at_end: no pairs are held out"),
        (
            "instruct",
            "scit",
            {"resume_from_checkpoint": "ckpt"},
            "instruct.train.resume_from_checkpoint: rahf resumes a stage by itself",
        ),
        ("sft", "scit", {"chat_template_path": "t.jinja"}, "sft.train.chat_template_path: rahf tokenizes the data"),
        ("instruct", "dual", {"packing": True}, "instruct.train.packing: set instruct.train.max_length too"),
        ("instruct", "hir", {"label_smoothing_factor": 0.1}, "instruct.train.label_smoothing_factor: the SCIT loss"),
        ("align", "dual", {"label_smoothing_factor": 0.1}, "align.train.label_smoothing_factor: the alignment loss"),
        ("align", "scit", {"neftune_noise_alpha": 5}, "align.train.neftune_noise_alpha: noise on the embeddings"),
        (
            "align",
            "dual",
            {"average_tokens_across_devices": False},
            "align.train.average_tokens_across_devices: align always averages",
        ),
        ("instruct", "scit", {"batch_eval_metrics": True}, "instruct.train.batch_eval_metrics: SCIT's evaluation"),
        ("align", "scit", {"eval_on_start": True}, "align.train.eval_on_start: no pairs are held out to evaluate"),
        ("instruct", "scit", {"remove_unused_columns": True}, "instruct.train.remove_unused_columns: rahf's collator"),
        ("align", "scit", {"remove_unused_columns": True}, "align.train.remove_unused_columns: rahf's collator"),
        (
            "instruct",
            "scit",
            {"train_sampling_strategy": "group_by_length"},
            "instruct.train.train_sampling_strategy: group_by_length measures",
        ),
        (
            "align",
            "dual",
            {"train_sampling_strategy": "group_by_length"},
            "align.train.train_sampling_strategy: group_by_length measures",
        ),
        (
            "reward",
            "scit",
            {"max_length": 24},
            "reward.train.max_length: rahf cuts the texts itself (long prompts lose their beginning); set reward.max_length instead (TRL's limit would drop longer pairs)",
        ),
        (
            "dpo",
            "dpo",
            {"max_length": 16},
            "dpo.train.max_length: rahf cuts the texts itself (long prompts lose their beginning); set data.max_prompt_length and data.max_response_length instead",
        ),
    ],
)
def test_train_values_a_stage_would_ignore_or_crash_on_are_refused(base, section, method, train, start):
    """Each passed validation, then was silently ignored or stopped the stage after the earlier ones had trained."""
    msg = error_of(None, with_(base, method=method, **{f"{section}__train": train}))
    assert msg.startswith(start), msg


def test_pure_dtype_needs_a_16_bit_dtype_and_only_then_enters_fingerprints(base):
    from rahf.pipeline import stage_fingerprint

    assert (
        error_of(None, with_(base, pure_dtype=True))
        == "pure_dtype: applies to bfloat16 weights only; set dtype: bfloat16 or drop it"
    )
    # AdamW's second moment underflows in float16 (to 0 below |g| ~ 3e-3), so a later step divides by eps alone
    fp16 = error_of(None, with_(base, pure_dtype=True, dtype="float16"))
    assert fp16.startswith("pure_dtype: float16 weights trained by AdamW jump") and "use dtype: bfloat16" in fp16
    fp32 = stage_fingerprint(load_config(None, with_(base, method="scit")), "instruct")[1]
    assert "pure_dtype" not in fp32  # float32 runs keep the fingerprints they had
    bf16 = [load_config(None, with_(base, dtype="bfloat16") | extra) for extra in ({}, {"pure_dtype": True})]
    mixed, pure = (stage_fingerprint(cfg, "instruct") for cfg in bf16)
    assert mixed[1]["pure_dtype"] is False and pure[1]["pure_dtype"] is True and mixed[0] != pure[0]


def test_fp16_is_refused_where_no_gpu_would_apply_it(base, monkeypatch):
    msg = error_of(None, with_(base, method="scit", sft__train={"fp16": True}))
    assert msg.startswith("sft.train.fp16: float16 mixed precision needs a CUDA GPU and none is visible"), msg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from rahf.trainargs import _refuse_unused_train

    _refuse_unused_train("sft", {"fp16": True}, scit=False, own_batches=False)  # with a GPU it is the user's call


def test_train_values_that_change_nothing_are_accepted(base):
    train = {"eval_strategy": "no", "load_best_model_at_end": False, "label_smoothing_factor": 0.0}
    load_config(None, with_(base, method="scit", instruct__train=train))
    load_config(None, with_(base, method="scit", instruct__train={"remove_unused_columns": False}))
    load_config(None, with_(base, method="dual", instruct__train={"train_sampling_strategy": "group_by_length"}))
    load_config(None, with_(base, method="dual", instruct__train={"label_smoothing_factor": 0.1}))  # SFTTrainer's
    load_config(None, with_(base, method="dual", instruct__train={"batch_eval_metrics": True}))  # no compute_metrics
    load_config(None, with_(base, method="scit", sft__train={"neftune_noise_alpha": 5}))  # TRL applies it
    load_config(None, with_(base, align__train={"average_tokens_across_devices": True}))


def test_good_train_values_are_accepted_as_their_fields_take_them(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = {"learning_rate": 1, "num_train_epochs": 2, "max_steps": -1, "lr_scheduler_type": "cosine"}
    cfg = load_config(None, with_(base, align__train=train | {"eval_steps": None, "report_to": ["none"]}))
    assert cfg.align.train["learning_rate"] == 1 and cfg.align.train["max_steps"] == -1
    assert load_config(None, with_(base, align__train={"max_steps": 100.0})).align.train["max_steps"] == 100
    assert type(load_config(None, with_(base, align__train={"max_steps": 100.0})).align.train["max_steps"]) is int
    # DPOConfig takes a single loss_type for its list field
    assert load_config(None, with_(base, dpo__train={"loss_type": "ipo"})).dpo.train == {"loss_type": "ipo"}
    assert list(tmp_path.iterdir()) == []  # building the arguments wrote nothing


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 99999999999999999999}, "seed"),
        ({"compare__seeds": [0, -1]}, "compare.seeds[1]"),
    ],
)
def test_seed_outside_what_numpy_and_torch_take(base, changes, key):
    msg = error_of(None, with_(base, **changes))
    assert msg.startswith(f"{key}: must be in [0, 4294967295], got "), msg


def test_seed_edges_are_accepted(base):
    assert load_config(None, with_(base, seed=2**32 - 1)).seed == 2**32 - 1
    assert load_config(None, with_(base, seed=0, compare__seeds=[0, 2**32 - 1])).compare.seeds == [0, 2**32 - 1]


def test_output_dir_that_is_a_file(base, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    msg = error_of(None, with_(base, output_dir=str(taken)))
    assert msg == f"output_dir: {taken} is a file, not a folder; choose another output_dir", msg
    msg = error_of(None, with_(base, output_dir=str(taken / "run")))
    assert msg == f"output_dir: {taken} is a file, not a folder; choose another output_dir", msg


def test_config_file_that_is_not_utf8(base, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(f"model: {base['model']}\ninstructions:\n  preferred: caf\xe9\n".encode("latin-1"))
    assert error_of(path) == f"{path}, line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_repeated_key_in_the_config_file(base, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base) + "alpha: 5.0\nwindow: 8\nalpha: 1.0\n")
    msg = error_of(path)
    assert msg == f"{path}, line 7: not valid YAML (key 'alpha' repeated, first on line 5; keep one)", msg
    path.write_text(yaml.safe_dump(base) + "align:\n  lora: {r: 4, r: 8}\n")
    assert "key 'r' repeated" in error_of(path)
    # the same key in two mappings, and YAML merge keys, are fine
    path.write_text(yaml.safe_dump(base) + "x: &x {r: 4}\nalign:\n  lora: {<<: *x, r: 8}\ninstruct:\n  lora: {r: 4}\n")
    assert "x: unknown key" in error_of(path)


def test_repeated_key_in_an_override_value():
    with pytest.raises(ConfigError, match="key 'r' repeated"):
        parse_overrides(["align.lora={r: 4, r: 8}"])


def test_compare_overrides_are_validated_as_a_whole_config(base):
    for mapping, start in (
        ({"layers": [99]}, "compare.overrides.dual: layers: [99] out of range; the model has layers 1..4"),
        ({"window": 1000}, "compare.overrides.dual: window: 1000 exceeds data.max_response_length=512"),
        ({"align": {"lora": {"r": 0}}}, "compare.overrides.dual: align.lora.r: must be >= 1, got 0"),
        ({"align": {"train": {"max_steps": 1.5}}}, "compare.overrides.dual: align.train.max_steps: expected an"),
    ):
        msg = error_of(None, with_(base, compare__overrides={"dual": mapping}))
        assert msg.startswith(start), msg


def test_compare_overrides_compare_would_ignore_are_refused(base):
    # hir and preferred-sft are scit's and dual's step-1 models, sft is shared; compare sets model, output_dir, stages
    for method, mapping, start in (
        ("hir", {"alpha": 1.0}, "compare.overrides.hir: hir is scit's step-1 model, set by others (put the keys under"),
        ("preferred-sft", {"alpha": 1.0}, "compare.overrides.preferred-sft: preferred-sft is dual's"),
        ("sft", {"alpha": 1.0}, "compare.overrides.sft: sft is every method's starting model"),
        ("dual", {"output_dir": "x"}, "compare.overrides.dual.output_dir: set by compare for every method"),
        ("scit", {"stages": ["instruct"]}, "compare.overrides.scit.stages: set by compare for every method"),
    ):
        msg = error_of(None, with_(base, compare__overrides={method: mapping}))
        assert msg.startswith(start), msg


@pytest.mark.parametrize(
    ("mapping", "says"),
    [
        # compare sets these for every run: a method's own would make one run of its every seed and noise level
        ({"seed": 7}, "compare.overrides.dpo.seed: set by compare for every run, from compare.seeds; remove it here"),
        ({"data": {"label_noise": 0.3}}, "compare.overrides.dpo.data.label_noise: set by compare for every run"),
        ({"revision": "main"}, "compare.overrides.dpo.revision: set by compare for every method, with model"),
        # read from the shared config only: a method's own would be ignored
        ({"evaluate": {"samples": 4}}, "compare.overrides.dpo.evaluate: compare judges every method alike"),
        ({"reward": {"max_length": 256}}, "compare.overrides.dpo.reward: compare trains one reward model"),
        ({"generate": {"seed": 3}}, "compare.overrides.dpo.generate: compare runs no generate stage"),
        ({"sft": {"train": {"max_steps": 2}}}, "compare.overrides.dpo.sft: compare trains one SFT model"),
        ({"tokenizer": "org/tok"}, "compare.overrides.dpo.tokenizer: only the sft stage reads it"),
        (
            {"ppo": {"reward_model": "org/rm"}},
            "compare.overrides.dpo.ppo.reward_model: compare gives PPO the top-level",
        ),
        ({"revisions": {"org/rm": "main"}}, "compare.overrides.dpo.revisions: they pin models every method shares"),
    ],
)
def test_compare_overrides_of_what_compare_shares_are_refused(base, mapping, says):
    assert error_of(None, with_(base, compare__overrides={"dpo": mapping})).startswith(says)


def test_compare_overrides_for_a_method_compare_does_not_run_are_checked_and_noted_as_unused(base):
    """A config written for every method runs a few by `compare.methods=[...]` alone: the others' overrides are
    still checked, and named as unused."""
    from rahf.config import unused_overrides_note

    compare = {"methods": ["dpo", "rahf-scit"], "overrides": {"lorra": {"alpha": 2.0}, "rahf-dual": {"window": 4}}}
    cfg = load_config(None, with_(base, compare=compare))
    assert unused_overrides_note(cfg) == (
        "compare.overrides.lorra, compare.overrides.rahf-dual: not used, as compare.methods (dpo, rahf-scit) leaves "
        "them out"
    )
    compare["overrides"]["lorra"] = {"alpha": float("nan")}
    assert error_of(None, with_(base, compare=compare)).startswith("compare.overrides.lorra: alpha")
    # hir and preferred-sft are scit's and dual's step-1 models, trained with their overrides
    for methods, host in ((["hir"], "scit"), (["preferred-sft"], "rahf-dual"), (["rahf-scit"], "scit")):
        settings = with_(base, compare={"methods": methods, "overrides": {host: {"alpha": 2.0}}})
        cfg = load_config(None, settings)
        assert cfg.compare.overrides == {host: {"alpha": 2.0}} and unused_overrides_note(cfg) is None


def test_paths_in_compare_overrides_resolve_against_the_config_folder(base, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "other.jsonl").write_bytes(Path(base["data"]["path"]).read_bytes())
    path = proj / "c.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path.write_text(yaml.safe_dump(with_(base, compare__overrides={"dual": {"data": {"path": "./nope.jsonl"}}})))
    msg = error_of(path)
    assert msg == f"compare.overrides.dual: data.path: file not found: {proj.resolve() / 'nope.jsonl'}", msg
    path.write_text(yaml.safe_dump(with_(base, compare__overrides={"dual": {"data": {"path": "other.jsonl"}}})))
    cfg = load_config(path)
    assert cfg.compare.overrides["dual"] == {"data": {"path": str(proj.resolve() / "other.jsonl")}}


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ({"methods": []}, "compare.methods: list at least one method"),
        ({"methods": ["sft", "dual", "rahf-dual"]}, "compare.methods: rahf-dual is listed twice"),
        (
            {"overrides": {"dual": {"alpha": 0.25}, "rahf-dual": {"align": {"lora": {"r": 4}}}}},
            "compare.overrides: dual and rahf-dual name one method; keep the keys under one of them",
        ),
        ({"seeds": [0, 1, 0]}, "compare.seeds: 0 is listed twice; a repeat is the same run again"),
        ({"label_noise": [0.0, 0.2, 0.2]}, "compare.label_noise: 0.2 is listed twice"),
        ({"alphas": [1, 0.5, 1.0]}, "compare.alphas: 1.0 is listed twice"),  # each candidate trains an adapter
        ({"layer_sets": [[2, 3], [3], [3, 2]]}, "compare.layer_sets: [2, 3] is listed twice"),
        ({"layer_sets": [[2, 2], [3]]}, "compare.layer_sets[0]: repeated layer in [2, 2]"),
    ],
)
def test_compare_lists_name_each_method_seed_and_noise_level_once(base, compare, message):
    """A repeated seed would count the same replies twice and give a zero-width interval over seeds."""
    assert error_of(None, with_(base, compare=compare)).startswith(message)


def test_a_missing_relative_path_says_where_it_was_looked_for(base, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    config = tmp_path / "runs" / "c.yaml"
    config.write_text(yaml.safe_dump(base | {"evaluate": {"pairs": "heldout.jsonl"}}))
    assert error_of(config) == (
        f"evaluate.pairs: file not found: heldout.jsonl (neither beside the config nor in the current folder, "
        f"{tmp_path})"
    )


def test_an_adapter_dropout_that_training_switches_off_is_refused(base):
    assert error_of(None, with_(base, ppo__lora={"dropout": 0.1})).startswith(
        "ppo.lora.dropout: rahf's PPO runs the policy without dropout"
    )
    assert error_of(None, with_(base, dpo__lora={"dropout": 0.1})).startswith(
        "dpo.lora.dropout: TRL's DPO turns every dropout off"
    )
    cfg = load_config(None, with_(base, dpo__lora={"dropout": 0.1}, dpo__train={"disable_dropout": False}))
    assert cfg.dpo.lora.dropout == 0.1
    cfg = load_config(None, base)
    assert cfg.dpo.lora.dropout == cfg.ppo.lora.dropout == 0.0


def test_a_partial_lora_mapping_keeps_its_sections_defaults(base):
    cfg = load_config(None, with_(base, instruct__lora={"dropout": 0.1}, dpo__lora={"target_modules": ["q_proj"]}))
    assert (cfg.instruct.lora.r, cfg.instruct.lora.alpha, cfg.instruct.lora.dropout) == (16, 32.0, 0.1)
    assert (cfg.dpo.lora.r, cfg.dpo.lora.alpha, cfg.dpo.lora.dropout) == (16, 32.0, 0.0)
    cfg = load_config(None, with_(base, ppo__lora={"r": 4}, align__lora={"alpha": 4}))
    assert (cfg.ppo.lora.r, cfg.ppo.lora.alpha) == (4, 32.0) and (cfg.align.lora.r, cfg.align.lora.alpha) == (8, 4.0)


@pytest.mark.parametrize(
    ("llm", "says"),
    [
        ({"api_key_env": "sk-proj-ABCDEF123456"}, "evaluate.llm.api_key_env: must be the name of an environment"),
        ({"api_key_env": "hf_AbCdEF123456"}, "evaluate.llm.api_key_env: must be the name of an environment"),
        ({"base_url": "http://[::1"}, "evaluate.llm.base_url: not a valid URL"),
        ({"base_url": "https://alice:S3cretPW@llm.example/v1"}, "evaluate.llm.base_url: holds credentials"),
    ],
)
def test_a_credential_in_the_llm_judges_settings_is_refused_without_repeating_it(base, llm, says):
    msg = error_of(None, with_(base, evaluate__llm=llm))
    assert msg.startswith(says) and "ABCDEF" not in msg and "S3cretPW" not in msg


def test_a_train_key_that_yaml_reads_as_no_name_is_refused(base):
    assert error_of(None, with_(base, instruct__train={True: 1})).startswith(
        "instruct.train: key True is not a field name; quote it"
    )


def test_a_router_loss_needs_a_mixture_of_experts_model(base, monkeypatch):
    """TRL refuses `router_aux_loss_coef` for a dense model only when its trainer is built; rahf says so before."""
    from transformers import MixtralConfig

    from rahf import preflight

    cfg = load_config(None, with_(base, method="dpo", dpo__train={"router_aux_loss_coef": 0.01}))
    with pytest.raises(ConfigError, match=r"^dpo\.train\.router_aux_loss_coef: LlamaConfig is no mixture-of-experts"):
        preflight.check_router_loss(cfg, ["instruct"])
    preflight.check_router_loss(cfg, ["collect"])  # no stage that reads it
    monkeypatch.setattr("rahf.config.model_config", lambda *args: MixtralConfig())
    preflight.check_router_loss(cfg, ["instruct"])


def test_whole_numbers_reach_float_only_fields_as_floats(base, tmp_path):
    """1 and 1.0 are one setting (one fingerprint), read as an int; TRL copies `router_aux_loss_coef` into a model's
    strictly typed config, which refuses the int 0 (`router_aux_loss_coef: 0.0` turns a MoE's auxiliary loss off)."""
    from trl import SFTConfig

    from rahf.training import training_args

    cfg = load_config(None, base | {"sft": {"train": {"router_aux_loss_coef": 0.0, "num_train_epochs": 2.0}}})
    assert cfg.sft.train == {"router_aux_loss_coef": 0, "num_train_epochs": 2}  # as fingerprinted
    args = training_args(SFTConfig, cfg, tmp_path, cfg.sft.train, max_steps=3)
    assert type(args.router_aux_loss_coef) is float and args.router_aux_loss_coef == 0.0
    assert type(args.num_train_epochs) is float and type(args.max_steps) is int


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("alpah=3", "; did you mean alpha?"),  # a close spelling at the same level
        ("align.window=3", "; did you mean window?"),  # the same key at another level
        ("instruct.lora.rr=3", "; did you mean instruct.lora.r?"),
        ("lora_r=16", "; did you mean instruct.lora.r, align.lora.r, dpo.lora.r, ppo.lora.r?"),  # its parts as a path
        ("align.lr=1e-4", "; did you mean align.train.learning_rate?"),  # another tool's name, under its section
        ("base_model=m", "; did you mean model?"),  # axolotl's
        ("learning_rate=1e-4",  # a Trainer argument: under every section that trains
         ("; did you mean sft.train.learning_rate, instruct.train.learning_rate, align.train.learning_rate, "
          "reward.train.learning_rate, ...?")),
        ("layers=1,2", "layers: expected a list, got '1,2'; write layers=[1,2]"),
        ("data.path=Anthropic/hh-rlhf", "; a Hub dataset's file is read as hf://datasets/Anthropic/hh-rlhf/FILE"),
        ("zzz=1", "window)"),  # nothing close: the known keys, no guess
        # within a section, a close spelling or another tool's name for one of its keys comes first
        ("ppo.lr=1e-5", "; did you mean ppo.learning_rate?"),
        ("ppo.epochs=2", "; did you mean ppo.ppo_epochs?"),
        ("compare.seed=[1]", "; did you mean compare.seeds?"),
        ("compare.method=[dpo]", "; did you mean compare.methods?"),
        ("data.max_length=64", "; did you mean data.max_prompt_length, data.max_response_length?"),
        ("data_path=x.jsonl", "; did you mean data.path?"),
        # inside a `train:` mapping: its class's fields
        ("align.train.lr=1e-4", "align.train.lr: not a field of TrainingArguments; did you mean align.train.learning_rate?"),
        ("align.train.num_train_epoch=1", "; did you mean align.train.num_train_epochs?"),
    ],
)  # fmt: skip
def test_a_mistyped_key_or_value_says_what_was_meant(base, override, hint):
    msg = error_of(None, [f"model={base['model']}", f"data.path={base['data']['path']}", override])
    assert msg.endswith(hint), msg


@pytest.mark.parametrize(
    ("train", "says"),
    [
        ({"adam_beta1": 2}, "align.train.adam_beta1: the optimizer refuses 2 (Invalid beta parameter at index 0: 2.0)"),
        ({"adam_beta2": 1.5}, "align.train.adam_beta2: the optimizer refuses 1.5 (Invalid beta parameter at index 1"),
        ({"adam_epsilon": -1}, "align.train.adam_epsilon: the optimizer refuses -1 (Invalid epsilon value: -1.0)"),
        # two settings refused: the one the optimizer names first
        ({"adam_beta1": 2, "adam_epsilon": -1}, "align.train.adam_epsilon: the optimizer refuses -1"),
        ({"optim": "sgd", "optim_args": "momentum=(1,2)"}, "align.train.optim_args: the optimizer refuses"),
    ],
)
def test_settings_the_optimizer_refuses_are_refused_before_anything_trains(base, train, says):
    """torch's AdamW refuses a beta outside [0, 1) or a negative epsilon only when the Trainer makes it, after the
    earlier stages have trained."""
    msg = error_of(None, with_(base, align__train=train))
    assert msg.startswith(says) and msg.endswith("; change it or leave it out"), msg
    fine = {"adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "optim": "sgd", "optim_args": "momentum=0.9"}
    assert load_config(None, with_(base, align__train=fine)).align.train["adam_beta1"] == 0.8


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({True: 1}, ("key True at the top level is not a key name (YAML reads unquoted yes, no, on, off as true or "
                     "false); quote it if it is meant as one")),
        ({1: "x"}, "key 1 at the top level is not a key name"),
        ({"align": {False: 1}}, "align: key False is not a key name"),
        ({"compare": {"overrides": {"dpo": {None: 1}}}}, "compare.overrides.dpo: key None at the top level is not a"),
    ],
)  # fmt: skip
def test_a_key_yaml_reads_as_no_name_is_refused_in_any_mapping(base, settings, says):
    assert error_of(None, base | settings).startswith(says)


def test_dpo_train_beta_is_refused_for_dpo_beta(base):
    """DPOTrainer takes beta from `dpo.beta` (range-checked); a second one in `dpo.train` would override it unseen."""
    for beta in (0.5, 0, -1):
        assert error_of(None, with_(base, method="dpo", dpo__train={"beta": beta})) == (
            "dpo.train.beta: rahf passes dpo.beta to DPOTrainer (checked to be above 0); set dpo.beta instead"
        )
    assert load_config(None, with_(base, method="dpo", dpo__beta=0.5)).dpo.beta == 0.5


def test_one_instruction_twice_is_refused_where_a_method_reads_their_contrast(base):
    same = {"preferred": "Be kind.", "dispreferred": "Be kind. "}
    for method in ("scit", "lorra", "hir"):
        assert error_of(None, with_(base, method=method, instructions=same)) == (
            f"instructions.dispreferred: the same text as instructions.preferred, so method {method} has no contrast "
            "to learn from (v = 0 at every layer); make the two differ"
        )
    # dual and the baselines read no contrast, unless compare runs a method that does (all eight by default)
    assert "so hir (in compare.methods) has no contrast" in error_of(
        None, with_(base, method="dual", instructions=same)
    )
    compared = {"methods": ["dpo", "rahf-dual", "lorra"]}
    assert "so lorra (in compare.methods) has no contrast" in error_of(
        None, with_(base, method="dual", instructions=same, compare=compared)
    )
    compared = {"methods": ["dpo", "rahf-dual"]}
    load_config(None, with_(base, method="dual", instructions=same, compare=compared))
    # a compared method's own instructions
    compared = {"methods": ["hir"], "overrides": {"rahf-scit": {"instructions": {"dispreferred": "Be kind."}}}}
    assert error_of(None, with_(base, method="dual", instructions=same | {"dispreferred": "x"}, compare=compared)) == (
        "compare.overrides.rahf-scit.instructions.dispreferred: the same text as instructions.preferred, so hir "
        "(in compare.methods) has no contrast to learn from (v = 0 at every layer); make the two differ"
    )
    compared["overrides"]["rahf-scit"]["instructions"]["dispreferred"] = "Be rude."
    load_config(None, with_(base, method="dual", instructions=same, compare=compared | {"methods": ["hir", "dual"]}))


def test_label_noise_levels_compare_would_write_to_one_folder_are_refused(base):
    assert error_of(None, with_(base, compare__label_noise=[0.0, 0.1, 0.1000001])) == (
        "compare.label_noise: 0.1 and 0.1000001 would share the folder noise-0.1 and one row of the report; give "
        "levels that differ within 6 significant digits"
    )
    assert error_of(None, with_(base, compare__label_noise=[0.0, -0.0])).startswith(
        "compare.label_noise: 0.0 is listed twice"
    )
    cfg = load_config(None, with_(base, compare__label_noise=[-0.0, 0.2], data__label_noise=-0.0))
    assert [math.copysign(1, x) for x in [*cfg.compare.label_noise, cfg.data.label_noise]] == [1, 1, 1]


def test_a_number_where_text_is_meant_says_to_quote_it(base, tmp_path):
    """An all-digit commit id is a number to YAML; with a leading zero, an octal one."""
    path = tmp_path / "c.yaml"
    for text, says in (
        ("revision: 1234567\n", "revision: expected text, got the number 1234567; quote it (YAML reads digits as"),
        ("revisions: {org/rm: 1234567}\n", "revisions.org/rm: expected text, got the number 1234567; quote it"),
        ("revision: 0123456\n", ("not valid YAML (0123456 has a leading zero, which YAML reads as octal 42798; "
                                 "drop the zero or write 42798, or quote it if it is text)")),
    ):  # fmt: skip
        path.write_text(yaml.safe_dump(base) + text)
        msg = error_of(path)
        assert msg.startswith((says, f"{path}, line 5: {says}")), msg


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_options_given_as_text_must_be_a_json_object(base, schedule):
    for text in ("x", "[1]", "{min_lr: 1}"):
        assert error_of(
            None, with_(base, align__train={"lr_scheduler_type": schedule, "lr_scheduler_kwargs": text})
        ) == (f"align.train.lr_scheduler_kwargs: expected a mapping (or a JSON object), got {text!r}")
    given = {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": '{"num_cycles": 0.25}'}
    assert load_config(None, with_(base, align__train=given)).align.train == given


def test_a_config_reached_through_a_symlink_resolves_paths_beside_the_link(base, tmp_path, monkeypatch):
    """Two experiment folders linking one shared config each get their own output folder."""
    shared = tmp_path / "configs" / "base.yaml"
    shared.parent.mkdir()
    shared.write_text(yaml.safe_dump(base | {"output_dir": "out"}))
    monkeypatch.chdir(tmp_path)
    for name in ("exp1", "exp2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "c.yaml").symlink_to(shared)
        assert load_config(f"{name}/c.yaml").output_dir == str(tmp_path / name / "out")

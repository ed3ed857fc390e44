"""Step 0: supervised fine-tuning with TRL's SFTTrainer, loss on response tokens only."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

from .config import RahfConfig
from .data import PreferencePair, pairs_of, parse_completion, read_records
from .errors import ConfigError, DataError
from .models import load_model, load_tokenizer, save_model
from .stimuli import build_variants, tokenizing
from .trainargs import stage_defaults
from .training import load_data, load_eval_pairs, load_split, run_trainer, train_dtype, training_args


def sft_examples(cfg: RahfConfig) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, response, "file:line") of each example: `sft.path` (prompt/completion records or preference
    data, in any file the data loader reads) or the chosen replies of `data` (but those `data.eval_size` holds out).
    The first record decides which: one with a "completion" makes every record a prompt/completion one."""
    path = cfg.sft.path
    if not path:
        return replies(load_data(cfg), "chosen")
    records = read_records(path)
    first = next(records, None)
    if first is not None and isinstance(first[1], dict) and "completion" in first[1]:
        return [(*parse_completion(rec, source), source) for source, rec in chain([first], records)]
    return replies(pairs_of(chain([first] if first else [], records), path, also=("prompt/completion",))[0], "chosen")


def without_held_out(
    examples: list[tuple[list[dict], str, str]], held_out: list[PreferencePair]
) -> list[tuple[list[dict], str, str]]:
    """`sft.path`'s examples but those that repeat a pair `data.eval_size` holds out (its prompt and chosen reply),
    which SFT would otherwise train on and then be measured on; says how many it left out."""
    held = {(json.dumps(list(p.prompt), sort_keys=True), p.chosen) for p in held_out}
    kept = [e for e in examples if (json.dumps(e[0], sort_keys=True), e[1]) not in held]
    if examples and not kept:
        raise DataError(
            f"sft.path: each of its {len(examples)} examples repeats a pair data.eval_size holds out, which leaves SFT "
            "nothing to train on; give other SFT data, or hold out fewer pairs (data.eval_size)"
        )
    if len(kept) < len(examples):
        print(
            f"[rahf] sft: left out {len(examples) - len(kept)} examples of sft.path that repeat a pair "
            "data.eval_size holds out",
            flush=True,
        )
    return kept


def replies(pairs: list[PreferencePair], side: str) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, the `side` reply: chosen or rejected, "file:line") of each pair, as SFT examples."""
    return [(list(p.prompt), getattr(p, side), p.source) for p in pairs]


def tokenized_sft_dataset(tokenizer, examples, max_prompt_length: int, max_response_length: int):
    """A pre-tokenized `datasets.Dataset` (input_ids, labels = -100 on the prompt) that TRL uses as is, from
    (prompt, response, source) triples; `source` ("file:line") names the example in errors about its prompt."""
    from datasets import Dataset

    rows = {"input_ids": [], "labels": []}
    for prompt, response, source in tokenizing(examples, "examples"):
        variants = build_variants(
            tokenizer, prompt, response, {"plain": None}, max_prompt_length, max_response_length, source
        )
        s = variants["plain"]
        rows["input_ids"].append(list(s.input_ids))
        rows["labels"].append([-100] * s.response_start + list(s.input_ids[s.response_start :]))
    return Dataset.from_dict(rows)


def check_eos_token(eos_token: str | None, tokenizer, section: str) -> None:
    """Refuse a new `eos_token` in SFTConfig: SFTTrainer sets it on the tokenizer when it is built, after rahf has
    tokenized the data, so the model would train on one end-of-turn token and be saved with another."""
    if eos_token is not None and eos_token != tokenizer.eos_token:
        raise ConfigError(
            f"{section}.train.eos_token: rahf tokenizes the data before TRL would apply it, so training and the saved "
            "tokenizer would disagree; give a tokenizer folder with that EOS as `tokenizer` instead"
        )


def train_sft_model(model, tokenizer, dataset, args, stage: str = "sft", eval_dataset=None):
    """Run TRL's SFTTrainer on a pre-tokenized dataset (resuming from a checkpoint in `args.output_dir`), evaluated
    on `eval_dataset` when given; returns the trained model (PEFT-wrapped if given one), the training logs and the
    held-out metrics ({} without `eval_dataset`)."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )
    held = run_trainer(trainer, stage)
    return trainer.model, trainer.state.log_history, held


def run_sft(cfg: RahfConfig, out: Path) -> tuple[dict[str, float], int]:
    """Fine-tune `cfg.model` on dialogue data and save it (HF format) with its tokenizer to `out`; returns the
    metrics on the chosen replies of the held-out pairs and their number ({} and 0 when `data.eval_size` holds
    none out)."""
    from trl import SFTConfig

    args = training_args(SFTConfig, cfg, out, cfg.sft.train, **stage_defaults("sft", cfg))
    source = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(source, cfg.trust_remote_code, cfg.revision_of(source))
    check_eos_token(cfg.sft.train.get("eos_token"), tokenizer, "sft")
    lengths = (cfg.data.max_prompt_length, cfg.data.max_response_length)
    if cfg.sft.path:
        held_out = load_eval_pairs(cfg)
        examples = without_held_out(sft_examples(cfg), held_out) if held_out else sft_examples(cfg)
    else:  # the chosen replies of `data`, read once
        pairs, held_out = load_split(cfg)
        examples = replies(pairs, "chosen")
    data = tokenized_sft_dataset(tokenizer, examples, *lengths)
    held_data = tokenized_sft_dataset(tokenizer, replies(held_out, "chosen"), *lengths) if held_out else None
    model = load_model(
        cfg.model, train_dtype(cfg, full=True), cfg.trust_remote_code, revision=cfg.revision_of(cfg.model)
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # `tokenizer` adds tokens (a chat template's)
        model.resize_token_embeddings(len(tokenizer))
    model, logs, held = train_sft_model(model, tokenizer, data, args, eval_dataset=held_data)
    save_model(model, tokenizer, out, cfg.dtype)
    (out / "log_history.json").write_text(json.dumps(logs, indent=1))
    return held, len(held_out)

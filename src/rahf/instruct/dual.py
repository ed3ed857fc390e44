"""Dual: a preferred model (SFT on chosen replies) and a dispreferred one (SFT on rejected replies).

By default both are LoRA adapters on one shared base (sub-folders `preferred/` and `dispreferred/` of
the artifact), so collect holds a single base model carrying both; `instruct.finetune: full` trains two
copies. Align trains on the preferred adapter merged into its base (with `align.targets: online` the
dispreferred model is held beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import RahfConfig
from ..data import PreferencePair
from ..distributed import is_main
from ..models import free_memory, load_model, load_tokenizer, save_model, save_tokenizer
from ..sft import check_eos_token, replies, tokenized_sft_dataset, train_sft_model
from ..trainargs import stage_defaults
from ..training import checkpoint_dir, lora_config, train_dtype, training_args

SIDES = ("preferred", "dispreferred")


def train_dual(
    cfg: RahfConfig,
    base: str,
    pairs: list[PreferencePair],
    out: Path,
    sides: tuple[str, ...] = SIDES,
    eval_pairs: list[PreferencePair] | None = None,
) -> dict[str, dict[str, float]]:
    """Train `sides` from `base` (preferred-sft trains only the preferred one); each is saved under `out/<side>`.
    Each side is evaluated on its replies of `eval_pairs`; returns {side: held-out metrics} ({} without them)."""
    from peft import get_peft_model
    from trl import SFTConfig

    defaults = stage_defaults("instruct", cfg)  # the authors' two SFTs: 3 epochs, cosine schedule
    revision = cfg.revision_of(base)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code, revision)
    check_eos_token(cfg.instruct.train.get("eos_token"), tokenizer, "instruct")
    save_tokenizer(tokenizer, out)
    logs, held = {}, {}
    lengths = (cfg.data.max_prompt_length, cfg.data.max_response_length)
    for side in sides:
        reply = "chosen" if side == "preferred" else "rejected"
        data = tokenized_sft_dataset(tokenizer, replies(pairs, reply), *lengths)
        held_data = tokenized_sft_dataset(tokenizer, replies(eval_pairs, reply), *lengths) if eval_pairs else None
        model = load_model(base, train_dtype(cfg, cfg.finetune == "full"), cfg.trust_remote_code, revision=revision)
        # each side checkpoints in its own sub-folder, not into the side's model folder
        side_defaults = defaults | {"output_dir": str(checkpoint_dir(out) / side)}
        args = training_args(SFTConfig, cfg, out, cfg.instruct.train, **side_defaults)
        if cfg.finetune == "lora":
            torch.manual_seed(args.seed)  # each adapter's random init, made before its Trainer seeds anything
            model = get_peft_model(model, lora_config(model, cfg.instruct.lora, revision=revision))
        print(f"[rahf] instruct: the {side} model, on the {reply} replies")
        model, logs[side], metrics = train_sft_model(model, tokenizer, data, args, f"instruct ({side})", held_data)
        if metrics:
            held[side] = metrics
        if cfg.finetune == "full":
            save_model(model, tokenizer, out / side, cfg.dtype)
        elif is_main():  # launched as several processes, process 0 writes
            model.save_pretrained(out / side)
        del model  # before the other side's model loads: two full models need not fit at once
        free_memory()
    (out / "log_history.json").write_text(json.dumps(logs, indent=1))
    return held

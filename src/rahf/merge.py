"""Fold the alignment adapter into its base so plain `AutoModelForCausalLM.from_pretrained` loads the result."""

from __future__ import annotations

from pathlib import Path

from .models import save_model


def merge_adapter(base_model, adapter_dir: str | Path, out: Path, tokenizer) -> None:
    """Load the PEFT adapter onto `base_model`, merge it and save model and tokenizer to `out`."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    save_model(merged, tokenizer, out)

"""Do the block outputs rahf reads equal `hidden_states` in every causal LM transformers can build?

For each model type registered for AutoModelForCausalLM: build it from its default config shrunk to 3 blocks of
width 64 (random weights, no download), run one forward of 7 tokens, and compare the block outputs rahf's hooks
capture at layers 1..n-1 (`rahf.models.forward_capture`) with the model's own `hidden_states[l]` (the top layer is
left out: transformers 5 applies the final norm to the last entry). Prints one line per type: `ok`, `MISMATCH`
(with the largest difference), `refused` (rahf's own refusal, a ConfigError) or `not built` (the shrunk config or
the forward fails inside transformers), then the counts.

Usage: python benchmarks/architectures.py [--only llama gpt2 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import warnings
from collections import Counter

import torch

SMALL = {
    "num_hidden_layers": 3, "n_layer": 3, "num_layers": 3, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "n_positions": 128, "head_dim": 16,
}  # fmt: skip


class _TimedOut(Exception):
    pass


def check(model_type: str) -> tuple[str, str]:
    """(verdict, detail) for one model type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rahf.errors import ConfigError
    from rahf.models import forward_capture, num_layers

    try:
        config = AutoConfig.for_model(model_type)
        text = config.get_text_config(decoder=True)
        for key, value in SMALL.items():
            if isinstance(getattr(text, key, None), int):
                with contextlib.suppress(Exception):  # a read-only property of this config class
                    setattr(text, key, value)
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[: num_layers(config)]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        n = num_layers(model.config)
        ids = torch.randint(5, 200, (1, 7))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    except Exception as e:  # noqa: BLE001  (transformers cannot build or run this type from a shrunk config)
        return "not built", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    try:
        with torch.no_grad():
            captured = forward_capture(model, list(range(1, n)), ids, mask, stop=False)
    except ConfigError as e:
        return "refused", str(e)[:120]
    except Exception as e:  # noqa: BLE001  (rahf's capture itself fails: a defect to report)
        return "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    if len(states) != n + 1:
        return "MISMATCH", f"{len(states)} hidden_states for {n} blocks"
    diff = max((captured[layer].float() - states[layer].float()).abs().max().item() for layer in captured)
    return ("ok", "") if diff < 1e-4 else ("MISMATCH", f"max difference {diff:.3g}")


def main() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="model types to check (default: every registered one)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    torch.set_num_threads(1)

    def timed_out(*_):
        raise _TimedOut

    signal.signal(signal.SIGALRM, timed_out)
    counts: Counter[str] = Counter()
    for model_type in args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        signal.alarm(60)
        try:
            verdict, detail = check(model_type)
        except _TimedOut:
            verdict, detail = "not built", "over 60 s"
        finally:
            signal.alarm(0)
        counts[verdict] += 1
        print(f"{model_type}: {verdict}{'  ' + detail if detail else ''}", flush=True)
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()

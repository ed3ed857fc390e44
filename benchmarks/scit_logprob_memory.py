"""Peak memory and time of SCIT's response log-probability (forward + backward) on one large batch of logits.

Compares `rahf.instruct.scit.mean_response_logprob`, which normalises only the positions predicting response
tokens, with a log_softmax over every position. With `--model`, runs SCIT's own loss (`compute_loss` of its
trainer) on a 2-block LLaMA (hidden 64) with that vocabulary instead, its forward asked for the logits from the
first position predicting a reply token on (`rahf.models.logits_from`) or, hidden from `logits_to_keep`, for all.
Each variant runs in its own process so peaks are separate.

Usage: python benchmarks/scit_logprob_memory.py [--model] [--batch 8] [--length 768] [--prompt 512] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def every_position(logits, input_ids, response_mask):
    """log_softmax over the whole [B, T, V] tensor, then the response positions' mean."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = response_mask[:, 1:].to(tok.dtype)
    return (tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def measure(variant: str, batch: int, length: int, prompt: int, vocab: int) -> None:
    import torch

    from rahf.instruct.scit import mean_response_logprob

    torch.manual_seed(0)
    logits = torch.randn(batch, length, vocab, dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, prompt:] = 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn = mean_response_logprob if variant == "response positions" else every_position
    fn(logits, ids, mask).sum().backward()
    seconds = time.perf_counter() - start
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB (Linux)
    print(f"| {variant} | {extra:.2f} | {seconds:.1f} |")


def measure_model(variant: str, batch: int, length: int, prompt: int, vocab: int) -> None:
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rahf.instruct.scit import _trainer_class

    torch.manual_seed(0)
    sizes = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    sizes |= {"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": length}
    model = LlamaForCausalLM(LlamaConfig(**sizes))

    class EveryPosition(torch.nn.Module):  # the same model, its forward without `logits_to_keep`
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, use_cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    ids = torch.randint(0, vocab, (batch, length))
    starts = torch.tensor([prompt - 8 * (i % 4) for i in range(batch)])  # instructions of different lengths
    replies = (torch.arange(length)[None] >= starts[:, None]).long()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": replies}
    trainer = SimpleNamespace(label_smoothing=0.2, _parts=defaultdict(list))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run = model if variant == "from the first reply position" else EveryPosition()
    loss = _trainer_class().compute_loss(trainer, run, inputs)
    loss.backward()
    seconds = time.perf_counter() - start
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB (Linux)
    print(f"| {variant} | {loss.item():.6f} | {extra:.2f} | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=768)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence; the rest is response")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--model", action="store_true", help="SCIT's loss on a model: logits from the reply on, or all")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        run = measure_model if args.model else measure
        run(args.variant, args.batch, args.length, args.prompt, args.vocab)
        return
    if args.model:
        print(
            f"SCIT's loss, forward and backward: {args.batch} sequences of {args.length} tokens, vocabulary {args.vocab}"
        )
        print("| logits of | loss | peak memory (GiB) | seconds |\n|---|---|---|---|")
        for variant in ("every position", "from the first reply position"):
            cmd = [sys.executable, __file__, "--model", "--variant", variant] + [
                f"--{k}={getattr(args, k)}" for k in ("batch", "length", "prompt", "vocab")
            ]
            subprocess.run(cmd, check=True)
        return
    print(f"bf16 logits [{args.batch}, {args.length}, {args.vocab}], {args.length - args.prompt} response tokens each")
    print("| log-probabilities of | peak memory above the logits (GiB) | seconds |\n|---|---|---|")
    for variant in ("every position", "response positions"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("batch", "length", "prompt", "vocab")
        ]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()

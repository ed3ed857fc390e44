"""Peak memory and time of SCIT's response log-probability (forward + backward) on one large batch of logits.

Compares `rahf.instruct.scit.mean_response_logprob`, which normalises only the positions predicting response
tokens, with a log_softmax over every position. Each variant runs in its own process so peaks are separate.

Usage: python benchmarks/scit_logprob_memory.py [--batch 8] [--length 768] [--prompt 512] [--vocab 128256]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=768)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence; the rest is response")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        measure(args.variant, args.batch, args.length, args.prompt, args.vocab)
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

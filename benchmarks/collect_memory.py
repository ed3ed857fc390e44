"""Peak memory of writing the collect cache at a large model's widths, without the model.

`rahf.collect.write_cache` fills one shard at a time. This script feeds it a stand-in reader that returns fresh
float32 rows of the given width for every target layer (as `TargetReader` does after copying them from the GPU),
so the memory measured is the cache writer's own: what it holds per shard, and the batch in flight. Defaults:
the widths of a 7B LLaMA (hidden 4096) at the authors' five SCIT layers and 512-token window.

Usage: python benchmarks/collect_memory.py [--sequences 64] [--hidden 4096] [--layers 5] [--window 512]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from rahf.collect import Example, write_cache
    from rahf.stimuli import Stimulus

    layers = list(range(10, 10 + 2 * args.layers, 2))
    collect = SimpleNamespace(dtype="float16", shard_size=1024, batch_size=args.batch)
    cfg = SimpleNamespace(window=args.window, include_boundary=True, collect=collect)

    class Reader:  # fresh float32 rows for every sequence's window, per layer: o and v
        def __init__(self):
            self.cfg, self.layers = cfg, layers

        def __call__(self, batch):
            def rows():
                return [torch.randn(args.window, args.hidden) for _ in batch]

            return {layer: rows() for layer in layers}, {layer: rows() for layer in layers}

    prompt = 100  # tokens before the response; the window starts at the last of them
    examples = [Example({"plain": Stimulus(tuple(range(prompt + args.window)), prompt)})] * args.sequences
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with tempfile.TemporaryDirectory() as d:
        stats = write_cache(Reader(), examples, Path(d), args.hidden)
        sizes = [(Path(d) / name).stat().st_size / 2**30 for name in stats["shards"]]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{args.sequences} sequences x {len(layers)} layers x window {args.window} x hidden {args.hidden} (float16): "
        f"{sum(sizes):.2f} GiB in {len(sizes)} shards (largest {max(sizes):.2f} GiB); "
        f"peak memory grew by {peak - before:.2f} GiB"
    )


if __name__ == "__main__":
    main()

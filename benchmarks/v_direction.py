"""Does the mean of v point where the model's states on chosen and rejected replies differ?

On a finished `rahf demo --out DIR` (or any run whose collect cache read both replies of each pair), per method
and target layer, from the cache alone:

- `along mean v`: the share of pairs (second half) whose chosen reply's mean state o lies further along the mean
  of v (first half of the sequences) than its rejected reply's: a "probe accuracy" of the direction RAHF pushes;
- `along mean(chosen - rejected)`: the same along the mean difference of the pairs' states (first half), the
  direction that does separate them, as a reference;
- the cosine between those two directions, and between the mean of v on chosen and on rejected replies.

Usage: python benchmarks/v_direction.py DIR [--methods scit dual lorra]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rahf.align import CachedTargets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--methods", nargs="+", default=["scit", "dual", "lorra"])
    args = parser.parse_args()
    cos = torch.nn.functional.cosine_similarity
    print(
        "| method | layer | along mean v | along mean(chosen - rejected) | cos of the two | cos(v on chosen, v on rejected) |"
    )
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        folder = args.demo / "noise-0" / "seed-0" / method / "collect"
        layers = json.loads((folder / "rahf_manifest.json").read_text())["layers"]
        cache = CachedTargets(folder, layers)
        n = len(cache) // 2  # collect.responses: both -> each pair's chosen reply, then its rejected one
        items = [cache[i] for i in range(2 * n)]
        for layer in layers:
            o = torch.stack([it["o"][layer].float().mean(0) for it in items])
            v = torch.stack([it["v"][layer].float().mean(0) for it in items])
            delta = o[0::2] - o[1::2]
            first, second = slice(0, n // 2), slice(n // 2, n)
            along_v = (delta[second] @ v[:n].mean(0) > 0).float().mean().item()
            along_delta = (delta[second] @ delta[first].mean(0) > 0).float().mean().item()
            between = cos(v[:n].mean(0), delta[first].mean(0), dim=0).item()
            same = cos(v[0::2].mean(0), v[1::2].mean(0), dim=0).item()
            print(f"| {method} | {layer} | {along_v:.3f} | {along_delta:.3f} | {between:.3f} | {same:.3f} |")


if __name__ == "__main__":
    main()

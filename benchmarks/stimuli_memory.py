"""Memory of the token sequences a stage holds for all its pairs at once (`rahf.collect.examples_for`).

Collect, align and SCIT's step 1 tokenize every pair before they start: per response, a sequence without an
instruction and, for SCIT, one under each instruction. This script builds them for the HH file with a byte-level
BPE tokenizer trained on it (no download) and reports what they hold, measured by `tracemalloc`, per token id
and per pair, so the memory of a larger dataset can be read off.

Usage: python benchmarks/stimuli_memory.py [--pairs 2312] [--method scit]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc

from collect_window import HH, tokenizer_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--method", choices=("scit", "dual"), default="scit")
    args = ap.parse_args()

    from transformers import LlamaConfig

    from rahf.collect import examples_for
    from rahf.config import load_config
    from rahf.data import load_pairs

    pairs = load_pairs(args.data, limit=args.pairs)[0]
    tokenizer = tokenizer_for([m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4).save_pretrained(tmp)  # fmt: skip
        settings = {"model": tmp, "method": args.method, "output_dir": f"{tmp}/out", "layers": [1]}
        cfg = load_config(None, settings | {"data": {"path": args.data}})
        examples_for(tokenizer, pairs[:50], cfg)  # warm the tokenizer's probes (memoized per tokenizer)
        start = time.perf_counter()
        examples_for(tokenizer, pairs, cfg)
        seconds = time.perf_counter() - start
        gc.collect()
        tracemalloc.start()
        examples = examples_for(tokenizer, pairs, cfg)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    seqs = [s for e in examples for s in e.variants.values()]
    ids = sum(len(s.input_ids) for s in seqs)
    print(
        f"{len(pairs)} HH pairs, {args.method}: {len(seqs)} sequences, {ids:,} token ids, built in {seconds:.1f} s; "
        f"held {held / 2**20:.1f} MiB: {held / ids:.1f} bytes per token id, {held / len(pairs) / 1024:.1f} KiB per pair "
        f"({held / len(pairs) * 200_000 / 2**30:.2f} GiB for 200,000 such pairs)"
    )


if __name__ == "__main__":
    main()

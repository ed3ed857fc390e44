"""Time of collect's forwards on real HH dialogues: sequences cut after the window against whole sequences.

A causal model's states at the window's positions depend on no later token, so `rahf.collect.TargetReader`
(and the align collators) forward each sequence only through its window. This script reads the first pairs
of the HH file with a byte-level BPE tokenizer trained on them and a random LLaMA-style model (both built
here, no download), and times the reader's three forwards per batch (SCIT: no instruction, preferred and
dispreferred instruction) against the same forwards of the whole padded sequences, and collect's own cache
writer, which batches the sequences by where their windows end.

Usage: python benchmarks/collect_window.py [--pairs 256] [--window 64] [--hidden 256] [--blocks 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def tokenizer_for(texts: list[str]):
    """A byte-level BPE tokenizer (8,000 tokens) trained on `texts`, with BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rahf.collect import TargetReader, examples_for, pad_batch, write_cache
    from rahf.config import load_config
    from rahf.data import load_pairs
    from rahf.models import forward_capture

    pairs = load_pairs(args.data, limit=args.pairs)[0]
    texts = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokenizer = tokenizer_for(texts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.blocks,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    layers = [args.blocks // 2, 3 * args.blocks // 4]  # the middle of the stack, as the spec's defaults
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        settings = {"model": tmp, "method": "scit", "output_dir": f"{tmp}/out", "layers": layers}
        cfg = load_config(None, settings | {"window": args.window, "data": {"path": args.data}})
    examples = examples_for(tokenizer, pairs, cfg)
    reader = TargetReader(cfg, layers, tokenizer.pad_token_id, model)
    batches = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]

    def whole(batch):  # the same three forwards, every sequence to its end
        for name in ("plain", "pos", "neg"):
            ids, attn = pad_batch([e.variants[name].input_ids for e in batch], tokenizer.pad_token_id, "cpu")
            forward_capture(model, layers, ids, attn)

    seqs = [e.variants[k] for e in examples for k in ("plain", "pos", "neg")]
    ends = [sum(s.window(args.window, True)) for s in seqs]
    print(
        f"{len(examples)} sequences from {len(pairs)} HH pairs, 3 variants each; LLaMA {args.blocks} blocks x "
        f"{args.hidden}, layers {layers}, window {args.window}, batch {args.batch}; tokens per variant: "
        f"{sum(len(s.input_ids) for s in seqs) / len(seqs):.0f} in all, {sum(ends) / len(seqs):.0f} through the window"
    )
    print("| forward through | seconds |\n|---|---|")
    with torch.no_grad():
        whole(batches[0]), reader(batches[0])  # warm-up: first calls allocate
        for label, fn in (("whole sequences, batches in file order", whole), ("the window, file order", reader)):
            start = time.perf_counter()
            for batch in batches:
                fn(batch)
            print(f"| {label} | {time.perf_counter() - start:.1f} |")
        with tempfile.TemporaryDirectory() as tmp:  # rahf's collect: batches of like window ends, written out
            start = time.perf_counter()
            write_cache(reader, examples, Path(tmp), hidden=args.hidden)
            print(
                f"| the window, batches by window end (`rahf.collect.write_cache`, shards written) | "
                f"{time.perf_counter() - start:.1f} |"
            )


if __name__ == "__main__":
    main()

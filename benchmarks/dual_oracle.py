"""What RAHF-Dual's two models could give, measured without the alignment LoRA.

On a finished `rahf demo --out DIR` it samples replies to the validation prompts from Dual's preferred
model, with the two models' difference applied exactly at inference instead of trained in:

- `cd`: contrastive decoding at the output, p ~ p+^(1+a) / p-^a (the difference used at the logits);
- `steer-raw`: at one layer, h <- h+ + a (h+ - h-) on every position from the last prompt token on
  (the RAHF-Dual target, imposed exactly);
- `steer-normalized`: the same with v = rms(h+) (h+/rms(h+) - h-/rms(h-)) (`collect.difference: normalized`);
- `steer-spherical`: h+ rotated away from h- on the sphere of its own rms, by alpha times the angle between
  them (geodesic extrapolation: the state keeps its scale, so the next RMSNorm does not shrink it).

It prints the gold win rate against the chosen replies (ties half) and the share of malformed replies.

With `--decisions` it instead reads the task's three choices on each validation prompt (a polite opener
at the reply's start, the right colour after "of course ! it is", a polite closing after the colour) and
prints the mean probability of the preferred choice under each distribution above and under the demo's
trained RAHF-Dual, with the mean s = rms((1+a)u+ - a u-), u = h/rms(h), at the last layer: the factor
by which the final RMSNorm shrinks the extrapolated state there.
Usage: python benchmarks/dual_oracle.py DIR [--layers 3 4] [--alphas 0 0.25 0.5 1] [--samples 4] [--decisions]
       [--modes steer-raw steer-normalized] [--instruct OTHER_DUAL_INSTRUCT_DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rahf.collect import _rms, difference, normalized_difference
from rahf.config import RahfConfig
from rahf.demo.task import Fact, gold_score, judge
from rahf.instruct.dual import SIDES
from rahf.models import decoder_blocks, load_tokenizer
from rahf.stimuli import prompt_ids
from rahf.training import load_stage_model


def spherical_target(plus: torch.Tensor, minus: torch.Tensor, alpha: float) -> torch.Tensor:
    """h+ rotated by alpha * angle(h+, h-) away from h-, in their plane, at h+'s rms."""
    up, um = plus / _rms(plus), minus / _rms(minus)
    cos = (up * um).mean(-1, keepdim=True).clamp(-1, 1)
    away = up * cos - um  # tangent at u+, pointing away from u-
    turn = alpha * torch.arccos(cos)
    return _rms(plus) * (torch.cos(turn) * up + torch.sin(turn) * away / _rms(away))


class DualPair:
    """Dual's preferred and dispreferred models (adapters merged, or full fine-tunes), with a per-step next-token
    distribution."""

    def __init__(self, instruct: Path):
        cfg = RahfConfig()
        self.models = {side: load_stage_model(instruct, cfg, side, device="cpu") for side in SIDES}

    def _forward(self, side: str, ids: torch.Tensor, layer: int, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-position log-probs and the layer's output states of one side; `edit` may replace those states."""
        model = self.models[side]
        seen: dict[str, torch.Tensor] = {}

        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            seen["h"] = h
            if edit is None:
                return None
            h = edit(h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = decoder_blocks(model)[layer - 1].register_forward_hook(hook)
        try:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        finally:
            handle.remove()
        return logits.log_softmax(-1), seen["h"]

    @torch.no_grad()
    def next_logprobs(self, ids: torch.Tensor, mode: str, layer: int, alpha: float, start: int) -> torch.Tensor:
        if mode in SIDES or alpha == 0.0:  # one model alone (alpha 0: the preferred one)
            return self._forward(mode if mode in SIDES else "preferred", ids, layer)[0]
        minus_lp, minus_h = self._forward("dispreferred", ids, layer)
        if mode == "cd":
            plus_lp = self._forward("preferred", ids, layer)[0]
            return ((1 + alpha) * plus_lp - alpha * minus_lp).log_softmax(-1)

        def edit(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            plus, minus = h[:, start:], minus_h[:, start:]
            if mode == "steer-spherical":
                h[:, start:] = spherical_target(plus, minus, alpha)
                return h
            diff = difference if mode == "steer-raw" else normalized_difference  # o = h+ for Dual, as in collect
            h[:, start:] = plus + alpha * diff(plus, plus, minus)
            return h

        return self._forward("preferred", ids, layer, edit)[0]


def sample(pair: DualPair, tok, prompts: list[list[int]], mode: str, layer: int, alpha: float, seed: int) -> list[str]:
    """Replies sampled at temperature 1 (prompts of equal length, so no padding), up to 24 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(prompts)
    start = ids.shape[1] - 1  # the window starts at the last prompt position, as in collect
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(24):
        lp = pair.next_logprobs(ids, mode, layer, alpha, start)
        nxt = torch.multinomial(lp.exp(), 1, generator=g).squeeze(1)
        nxt[done] = tok.pad_token_id
        done |= nxt == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        if done.all():
            break
    return [tok.decode(row[start + 1 :].tolist(), skip_special_tokens=True).strip() for row in ids]


@torch.no_grad()
def decisions(pair: DualPair, dual, tok, items: list[dict], layers: list[int], alphas: list[float]) -> None:
    """Mean probability of the preferred choice at the task's three decision points, per distribution."""
    from rahf.demo.task import CLOSINGS, OPENERS

    def first_ids(phrases: list[str]) -> list[int]:
        return sorted({tok(p.split()[0], add_special_tokens=False)["input_ids"][0] for p in phrases})

    top = len(decoder_blocks(pair.models["preferred"]))
    positive = [a for a in alphas if a > 0]
    plans = [(side, side, 1, 0.0) for side in SIDES]
    for a in positive:
        plans += [(f"contrastive decoding, alpha {a:g}", "cd", 1, a)]
        plans += [
            (f"exact target (normalized), layer {layer}, alpha {a:g}", "steer-normalized", layer, a) for layer in layers
        ]
    table: dict[str, list[list[float]]] = {name: [[], [], []] for name, *_ in plans}
    table |= {"RAHF-Dual (the demo's, trained)": [[], [], []]} | {
        f"s at layer {top}, alpha {a:g}": [[], [], []] for a in positive
    }
    for it in items:
        fact = Fact(**it["fact"])
        prompt = prompt_ids(tok, [{"role": "user", "content": it["prompt"]}], 48)
        colour = tok(fact.color, add_special_tokens=False)["input_ids"][:1]
        points = (
            ("", first_ids(OPENERS["polite"])),
            ("of course ! it is", colour),
            (f"of course ! it is {fact.color} .", first_ids(CLOSINGS["polite"])),
        )
        for k, (prefix, good) in enumerate(points):
            ids = torch.tensor([prompt + tok(prefix, add_special_tokens=False)["input_ids"]])
            for name, mode, layer, a in plans:
                table[name][k].append(
                    pair.next_logprobs(ids, mode, layer, a, len(prompt) - 1)[0, good].exp().sum().item()
                )
            lp = dual(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            table["RAHF-Dual (the demo's, trained)"][k].append(lp[good].exp().sum().item())
            plus, minus = (pair._forward(side, ids, top)[1][0, -1] for side in SIDES)
            for a in positive:  # s = rms(o + a v) / rms(o), the normalized target's scale against o's
                target = plus + a * normalized_difference(plus, plus, minus)
                table[f"s at layer {top}, alpha {a:g}"][k].append(
                    (target.pow(2).mean() / plus.pow(2).mean()).sqrt().item()
                )
    print("| distribution | polite opener | right colour | polite closing |\n|---|---|---|---|")
    for name, cols in table.items():
        print(f"| {name} | " + " | ".join(f"{sum(c) / len(c):.3f}" for c in cols) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["steer-raw", "steer-normalized"],
        choices=["steer-raw", "steer-normalized", "steer-spherical"],
    )
    ap.add_argument("--instruct", type=Path, help="another Dual step-1 artifact (default: the demo's)")
    ap.add_argument("--decisions", action="store_true", help="probabilities at the task's decision points instead")
    args = ap.parse_args()

    from rahf.demo.run import FULL
    from rahf.demo.task import make_task

    results = json.loads((args.demo_dir / "results.json").read_text())["task"]
    if results["quick"]:
        raise SystemExit(f"{args.demo_dir}: a --quick demo; run on a full one")
    seed = results["seed"]
    items = make_task(FULL.n_sft, FULL.n_pairs, FULL.n_val, FULL.n_test, 0.0, seed).validation
    run = args.demo_dir / f"noise-{results['label_noise']:g}" / f"seed-{seed}"
    sft = args.demo_dir / f"seed-{seed}" / "sft"
    tok = load_tokenizer(str(sft))
    pair = DualPair(args.instruct or run / "dual" / "instruct")
    if args.decisions:
        from transformers import AutoModelForCausalLM

        dual = AutoModelForCausalLM.from_pretrained(str(run / "dual" / "merged")).eval()
        decisions(pair, dual, tok, items, args.layers, args.alphas)
        return
    prompts = [prompt_ids(tok, [{"role": "user", "content": it["prompt"]}], 48) for it in items]
    prompts = [p for p in prompts for _ in range(args.samples)]
    print("| mode | layer | alpha | win rate | malformed |\n|---|---|---|---|---|")
    plans = [("cd", 0)] + [(m, layer) for m in args.modes for layer in args.layers]
    for mode, layer in plans:
        for alpha in args.alphas:
            if alpha == 0.0 and (mode, layer) != plans[0]:
                continue  # alpha 0 is the preferred model itself: measured once
            replies = sample(pair, tok, prompts, mode, max(layer, 1), alpha, args.seed)
            facts = [Fact(**items[k // args.samples]["fact"]) for k in range(len(replies))]
            chosen = [items[k // args.samples]["chosen"] for k in range(len(replies))]
            win = sum(judge(f, r, c) for f, r, c in zip(facts, replies, chosen)) / len(replies)
            bad = sum(gold_score(f, r) < 0 for f, r in zip(facts, replies)) / len(replies)
            name = "preferred-sft" if alpha == 0.0 else mode
            print(f"| {name} | {layer or '-'} | {alpha:g} | {win:.3f} | {bad:.3f} |", flush=True)


if __name__ == "__main__":
    main()

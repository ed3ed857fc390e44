"""The comparison report: Markdown tables (the paper's two tables in miniature) and PNG plots."""

from __future__ import annotations

from pathlib import Path

from .artifacts import write_text_atomic

RAHF_VS_STEP1 = (("rahf-scit", "hir"), ("rahf-dual", "preferred-sft"))  # each variant and its own step-1 model


def _reached(fit: dict | None) -> str:
    """`target_fit`'s share of the asked shift reached, per layer ("L2 0.85, L3 0.91"); - when not measured."""
    if not fit:
        return "-"
    return ", ".join(f"L{layer} {_fmt(f['reached'], 2)}" for layer, f in fit.items())


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def win_rate_table(summary: dict[str, dict]) -> list[str]:
    """Win rate against the chosen responses: all seeds' verdicts pooled, with its 95% interval and the seed spread."""
    lines = [
        "| method | win rate (seeds pooled) | seed sd | 95% interval | n | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {_fmt(r['win_rate'])} | {_fmt(r['seed_sd'])} | {_fmt(r['ci95'][0])}-{_fmt(r['ci95'][1])} "
            f"| {r['n']} | {r['seeds']} |"
        )
    return lines


def metrics_table(summary: dict[str, dict]) -> list[str]:
    """The other measurements, seed means."""
    lines = [
        "| method | judge score | chosen CE | chosen PPL | likelihood pair acc | likelihood AUC | KL/token vs SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {_fmt(r.get('judge_score'))} | {_fmt(r.get('chosen_cross_entropy'))} "
            f"| {_fmt(r.get('chosen_perplexity'), 2)} | {_fmt(r.get('likelihood_accuracy'))} "
            f"| {_fmt(r.get('likelihood_auc'))} | {_fmt(r.get('kl_per_token'), 4)} |"
        )
    return lines


def reward_table(summary: dict[str, dict]) -> list[str]:
    """Mean reward-model score by sampling temperature (0 = greedy)."""
    temps = next((list(r["reward_by_temperature"]) for r in summary.values() if r.get("reward_by_temperature")), [])
    if not temps:
        return []
    lines = ["| method | " + " | ".join(f"T={t}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
    for name, r in summary.items():
        curve = r.get("reward_by_temperature", {})
        lines.append(f"| {name} | " + " | ".join(_fmt(curve.get(t)) for t in temps) + " |")
    return lines


def noise_table(summary: dict[str, dict[str, dict]]) -> list[str]:
    levels = sorted(summary, key=float)
    methods = list(summary[levels[0]])
    lines = ["| method | " + " | ".join(f"p={p}" for p in levels) + " |", "|---|" + "---|" * len(levels)]
    for name in methods:
        cells = [_fmt(summary[p].get(name, {}).get("win_rate")) for p in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def standing(pairs: dict[str, dict]) -> list[str]:
    """Where each RAHF variant stands against every baseline: paired differences with their 95% interval.

    `pairs` is one noise level of `rahf.compare.paired`. A difference is called better or worse only when
    its interval excludes 0; per-seed differences are listed so that their consistency can be seen.
    """
    lines = []
    for label, p in pairs.items():
        ci = p["ci95"]
        if ci is None:
            verdict = "no interval"
        else:
            call = "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "not distinguishable"
            verdict = f"95% interval {ci[0]:+.3f} to {ci[1]:+.3f} over {p['over']}: {call}"
        seeds = f"; per seed {' / '.join(f'{d:+.3f}' for d in p['per_seed'])}" if len(p["per_seed"]) > 1 else ""
        lines.append(f"- {label}: {p['diff']:+.3f} ({verdict}{seeds})")
    return lines


def unparsed_lines(runs: list[dict]) -> list[str]:
    """An LLM judge's replies without a verdict (counted as ties), per method over all runs; none for other judges."""
    counts: dict[str, list[int]] = {}
    for run in runs:
        for name, m in run["methods"].items():
            if "judge_unparsed" in m:
                c = counts.setdefault(name, [0, 0])
                c[0] += m["judge_unparsed"]["unparsed"]
                c[1] += m["judge_unparsed"]["calls"]
    if not counts:
        return []
    share = ", ".join(f"{name} {u}/{n}" for name, (u, n) in counts.items())
    return [f"LLM judge replies without a verdict (counted as ties), of the requests it answered: {share}.", ""]


def write_report(results: dict, out: Path) -> Path:
    """report.md plus plots in `out`; returns the report path."""
    from . import plots

    summary = results["summary"]
    base_level = "0" if "0" in summary else min(summary, key=float)
    main = summary[base_level]
    # the sections about one run show the first seed at the noise level of the main table
    first = next((r for r in results["runs"] if float(r["noise"]) == float(base_level)), results["runs"][0])
    run_label = f"noise {float(first['noise']):g}, seed {first['seed']}"
    lines = [
        "# rahf compare report",
        "",
        (
            f"Methods: {', '.join(results['methods'])}. Runs: {len(results['runs'])} "
            f"(noise levels {', '.join(sorted(summary, key=float))}); {results['seconds']:.0f} s in all."
        ),
        "Win rate = the judge's verdict of each sampled response against the pair's chosen response, ties half.",
        (
            "The win rate and its 95% interval pool all seeds' verdicts (Wilson interval, with the replies to one "
            "prompt counted as correlated: effective sample size from the design effect); the seed sd shows "
            "training randomness."
        ),
        "",
        f"## Win rate against the chosen responses (label noise {base_level})",
        "",
        *win_rate_table(main),
        "",
        "![win rate](win_rate.png)",
        "",
        "## Where RAHF stands",
        "",
        (
            "Paired differences of win rate (same prompts): with several seeds the interval counts seeds and prompts "
            "both as random (two-way random effects on the per-prompt differences); with one seed it is Student's t "
            "over the prompts' differences."
        ),
        "",
        *standing(results.get("paired", {}).get(base_level, {})),
        "",
        "## Other measurements",
        "",
        *metrics_table(main),
        "",
    ]
    plots.win_rate_bars([{"method": k, "win_rate": v["win_rate"], "ci95": v["ci95"]} for k, v in main.items()],
                        out / "win_rate.png")  # fmt: skip
    lines += unparsed_lines(results["runs"])
    rewards = reward_table(main)
    if rewards:
        curves = {k: {float(t): m for t, m in v["reward_by_temperature"].items()} for k, v in main.items()
                  if v.get("reward_by_temperature")}  # fmt: skip
        plots.reward_vs_temperature(curves, out / "reward_by_temperature.png")
        lines += ["## Reward-model score by temperature", "", *rewards, "", "![reward](reward_by_temperature.png)", ""]
    if len(summary) > 1:
        rows = {
            name: {
                float(p): (summary[p][name]["win_rate"], *summary[p][name]["ci95"])
                for p in summary
                if name in summary[p]
            }
            for name in main
        }
        plots.noise_sweep(rows, out / "noise_sweep.png")
        lines += ["## Label noise", "", "Win rate (seeds pooled) with a fraction p of training pairs flipped.", ""]
        lines += [*noise_table(summary), "", "![noise](noise_sweep.png)", ""]
    strength = {
        name: {int(layer): s["v_norm"] for layer, s in m["per_layer"].items()}
        for name, m in first["methods"].items()
        if m.get("per_layer")
    }
    if strength:
        plots.layer_strength(strength, out / "layer_strength.png")
        lines += [f"## Strength of the preference difference v per layer ({run_label})", ""]
        lines += ["| method | layer | mean ‖v‖ per token | mean ‖o‖ per token | ‖v‖ / ‖o‖ |", "|---|---|---|---|---|"]
        for name, m in first["methods"].items():
            for layer, s in m.get("per_layer", {}).items():
                lines.append(f"| {name} | {layer} | {s['v_norm']:.3f} | {s['o_norm']:.3f} | {s['v_over_o']:.3f} |")
        lines += ["", "![layers](layer_strength.png)", ""]
    selection = [(n, m["selection"]) for n, m in first["methods"].items() if m.get("selection")]
    if selection:
        lines += [f"## Layers and alpha chosen on validation pairs ({run_label})", ""]
        lines += [
            "| method | layers | alpha | validation win rate | alignment loss at the end | shift reached per layer |",
            "|---|---|---|---|---|---|",
        ]
        for name, sel in selection:
            chosen = [r for r in sel["sweep"] if r["layers"] == sel["layers"] and r["alpha"] == sel["alpha"]]
            best = chosen[0].get("val_win_rate") if chosen else None
            tied = sum(r.get("val_win_rate") == best for r in sel["sweep"]) > 1 and best is not None
            for row in sel["sweep"]:
                picked = row["layers"] == sel["layers"] and row["alpha"] == sel["alpha"]
                mark = (
                    (" **(chosen: tied, the first in the grid's order)**" if tied else " **(chosen)**")
                    if picked
                    else ""
                )
                lines.append(
                    f"| {name} | {row['layers']} | {row['alpha']} | {_fmt(row.get('val_win_rate'))}{mark} "
                    f"| {_fmt(row.get('final_loss'), 4)} | {_reached(row.get('target_fit'))} |"
                )
        lines.append("")
    histories = {
        f"{name} ({stage})": logs for name, h in first["histories"].items() for stage, logs in h.items() if logs
    }
    losses = {k: v for k, v in histories.items() if any("loss" in r for r in v)}
    if losses:
        plots.training_curves(losses, out / "training_curves.png")
        lines += [f"## Training curves ({run_label})", "", "![training](training_curves.png)", ""]
    scores = {k: v for k, v in histories.items() if any("score" in r for r in v)}
    if scores:  # PPO logs the reward-model score and KL of each rollout instead of a loss
        plots.training_curves(scores, out / "ppo_score.png", key="score")
        plots.training_curves(scores, out / "ppo_kl.png", key="kl")
        lines += ["PPO rollouts: reward-model score and KL (summed per response) by step.", ""]
        lines += ["![ppo score](ppo_score.png) ![ppo kl](ppo_kl.png)", ""]
    rm = [run for run in results["runs"] if run.get("reward_model")]
    if rm:
        lines += ["## The reward model as a classifier of held-out chosen vs rejected responses", ""]
        lines += [
            "| noise | seed | pairwise acc | accuracy | precision | recall | F1 | AUC-ROC |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in rm:
            r = run["reward_model"]
            lines.append(
                f"| {run['noise']:g} | {run['seed']} | {_fmt(r['pairwise_accuracy'])} | {_fmt(r['accuracy'])} "
                f"| {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | {_fmt(r['auc_roc'])} |"
            )
        lines.append("")
    lines += ["## Time per run (s)", ""]
    steps = list(dict.fromkeys(step for run in results["runs"] for step in run["timings_s"]))
    lines += ["| noise | seed | " + " | ".join(steps) + " | total |", "|---|---|" + "---|" * (len(steps) + 1)]
    for run in results["runs"]:
        t = run["timings_s"]
        cells = [f"{t[step]:.1f}" if step in t else "–" for step in steps]
        lines.append(f"| {run['noise']:g} | {run['seed']} | " + " | ".join(cells) + f" | {sum(t.values()):.1f} |")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path

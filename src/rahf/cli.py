"""The `rahf` command line: one subcommand per stage, `run` for all of them, `status`, `demo`, `compare`, `export`
and `data check`."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import threading
import warnings
from collections import Counter
from pathlib import Path

from .artifacts import ABANDONED
from .config import ALIASES, METHODS, flatten
from .errors import ConfigError, DataError, RahfError

STAGE_HELP = {
    "sft": "step 0: supervised fine-tuning (TRL SFTTrainer, loss on responses only)",
    "reward": "a reward model on the preference data (TRL RewardTrainer): judge, and reward for rlhf-ppo",
    "instruct": "step 1: SCIT, Dual, or a baseline's training (preferred-sft, dpo, rlhf-ppo)",
    "collect": "step 2: record o and v at the target layers into safetensors shards",
    "align": "step 3: train a LoRA so hidden states approach o + alpha * v",
    "merge": "fold the alignment adapter into a plain Hugging Face model",
    "generate": "batched generation for generate.prompts, JSONL out",
    "evaluate": "win rate, reward by temperature, perplexity, likelihood classifier and KL drift on evaluate.pairs",
}


# `key.sub=value`; a config path may hold "=" too (sweep/alpha=3/c.yaml), but not in a dotted key.
OVERRIDE = re.compile(r"[\w.-]*=.*", re.DOTALL)


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] key=value ...` -> (config path or None, overrides): the first item is the config when it names a
    file or is not `key=value`."""
    if items and (Path(items[0]).is_file() or not OVERRIDE.fullmatch(items[0])):
        return items[0], items[1:]
    return None, items


def _load(args) -> RahfConfig:  # noqa: F821
    from .config import load_config

    path, overrides = _split_config_args(args.items)
    if path is None and not overrides:
        raise RahfError(f"give a config file: rahf {args.command} CONFIG [key=value ...] (examples/ holds some)")
    if path and path.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".arrow")):
        raise RahfError(f"{path}: a data file, not a config; give a YAML config first, which names it as data.path")
    extra = [item for item in overrides if "=" not in item]
    if extra:
        raise RahfError(f"unexpected argument {extra[0]!r}: give the config file first, then key=value overrides")
    if getattr(args, "method", None):
        overrides = overrides + [f"method={args.method}"]
    cfg = load_config(path, overrides, stage=args.command if args.command in STAGE_HELP else None)
    for key in (k for k in flatten(cfg.to_dict()) if k.endswith(".train.gradient_checkpointing")):
        print(f"[rahf] note: {key}: transformers 5 calls it activation_checkpointing; the old name goes in v6")
    return cfg


def _cmd_stage(args) -> None:
    from . import pipeline
    from .config import METHOD_STAGES
    from .preflight import preflight

    cfg = _load(args)
    _join_processes(cfg)
    if args.command not in METHOD_STAGES[cfg.method]:
        raise RahfError(
            f"method {cfg.method} has no {args.command} stage (its stages: {', '.join(METHOD_STAGES[cfg.method])})"
        )
    pipeline.refuse_while_written(cfg)
    preflight(cfg, args.command)
    if args.command == "sft" and "sft" not in cfg.stages:  # said before it trains, not at the next command
        print(
            "[rahf] note: stages does not list sft, so the stages after it (`rahf instruct`, `rahf run`) start from "
            f"model ({cfg.model}), not from the sft/ this writes; add sft to stages to use it",
            flush=True,
        )
    pipeline.run_stage(cfg, args.command, force=not args.skip_fresh)


def _cmd_run(args) -> None:
    from . import pipeline

    cfg = _load(args)
    _join_processes(cfg)
    pipeline.run(cfg, force=args.force)  # refuses empty stages


def _join_processes(cfg) -> None:
    """Join the other processes of a launch (nothing to do in one process), with the stages' DDP settings."""
    from .distributed import drop_launcher_settings, setup
    from .training import process_group_settings

    for note in drop_launcher_settings():
        print(f"[rahf] note: {note}", flush=True)
    setup(*process_group_settings(cfg))


def _cmd_status(args) -> None:
    from . import pipeline
    from .preflight import check_some_stages

    cfg = _load(args)
    check_some_stages(cfg)
    print(pipeline.describe(cfg))


def _cmd_compare(args) -> None:
    from .compare import run_compare

    run_compare(_load(args))


def _cmd_export(args) -> None:
    import shlex

    from . import export

    if len(args.source) > 1 and args.format != "mt-bench":
        raise RahfError(
            f"export: several source files are read only by --format mt-bench (one per turn), not {args.format}"
        )
    if args.format == "lm-eval":
        from .models import default_device

        if not (Path(args.source[0]) / "config.json").is_file():
            raise RahfError(f"{args.source[0]}: not a model folder (no config.json); give a run's merged/ folder")
        print(shlex.join(export.lm_eval_command(args.source[0], device=default_device())))
        return
    if not args.out:
        raise RahfError(f"--out: required for --format {args.format} (the file to write)")
    if Path(args.out).is_dir() or args.out.endswith(("/", os.sep)):
        raise RahfError(f"--out: {args.out} is a folder; give the file to write (e.g. {Path(args.out) / 'out.json'})")
    if not Path(args.out).resolve().parent.is_dir():
        raise RahfError(f"--out: the folder {Path(args.out).resolve().parent} does not exist; create it first")
    generations = [g for source in args.source for g in export.read_generations(source, args.sample)]
    if args.format == "alpaca-eval":
        export.write_alpaca_eval(args.out, generations, args.name, args.allow_multiturn)
        print(f"wrote {len(generations)} alpaca-eval records to {args.out}")
        return
    records = export.write_mt_bench(args.out, generations, args.name, args.question_id_offset)
    turns = Counter(len(r["choices"][0]["turns"]) for r in records)
    counts = ", ".join(f"{n} with {t} turn(s)" for t, n in sorted(turns.items()))
    print(f"wrote {len(records)} mt-bench records to {args.out} ({counts})")
    if 1 in turns:
        print(
            "note: MT-Bench judges each question's second turn too and needs its reply: generate it from prompts "
            "that hold the first turn and the reply (rahf.export.next_turn_prompts) and pass both files",
            file=sys.stderr,
        )


def _cmd_data_check(args) -> None:
    import dataclasses
    import json

    from .data import check_data, format_report

    report = check_data(args.path, args.format)
    if args.json:  # for scripts: every field, every problem
        print(json.dumps(dataclasses.asdict(report), indent=2, ensure_ascii=False))
    else:
        print(format_report(report, shown=None) if args.all else format_report(report))


def _cmd_demo(args) -> None:
    from .config import RANGES
    from .demo.run import check_out, run_demo

    check_out(Path(args.out))  # a file, or a folder of the user's own files, is refused before anything is written
    for flag, value, key in (("--label-noise", args.label_noise, "data.label_noise"), ("--seed", args.seed, "seed")):
        if value not in RANGES[key]:  # said before the demo writes anything into --out
            raise ConfigError(f"{flag}: must be {RANGES[key]}, got {value}")
    run_demo(Path(args.out), quick=args.quick, label_noise=args.label_noise, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rahf",
        description="Representation Alignment from Human Feedback (RAHF) on Hugging Face models.",
        epilog="New here? `rahf demo --out DIR` runs every method on a built-in task (no download, no GPU); then "
        "`rahf data check PAIRS` on your data and `rahf run CONFIG` (examples/ holds configs; README.md, the keys).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    config_help = "CONFIG.yaml, then any key=value overrides (e.g. alpha=3 align.lora.r=16)"

    r = sub.add_parser("run", help="all configured stages in order, skipping fresh ones")
    r.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]", help=config_help)
    r.add_argument("--force", action="store_true", help="recompute every stage even when fresh")
    _method_option(r)
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("status", help="which stages are fresh, stale or missing")
    s.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]", help=config_help)
    _method_option(s)
    s.set_defaults(func=_cmd_status)

    for stage, text in STAGE_HELP.items():
        sp = sub.add_parser(stage, help=text)
        sp.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]", help=config_help)
        sp.add_argument("--skip-fresh", action="store_true", help="do nothing when the artifact is up to date")
        step1 = ("scit", "dual", "preferred-sft", "hir", "dpo", "rlhf-ppo", *ALIASES)
        _method_option(sp, step1 if stage == "instruct" else (*METHODS, *ALIASES))
        sp.set_defaults(func=_cmd_stage)

    c = sub.add_parser("compare", help="the configured methods over several seeds (and label-noise levels), one report")
    c.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]", help=config_help)
    c.set_defaults(func=_cmd_compare)

    e = sub.add_parser("export", help="generations for AlpacaEval or MT-Bench; the lm-evaluation-harness command")
    e.add_argument(
        "source", nargs="+",
        help="a `rahf generate` JSONL (mt-bench: one per turn, first turns first), or with --format lm-eval a merged "
        "model folder",
    )  # fmt: skip
    e.add_argument("--format", required=True, choices=("alpaca-eval", "mt-bench", "lm-eval"))
    e.add_argument("--out", help="file to write (alpaca-eval: model_outputs.json; mt-bench: <model_id>.jsonl)")
    e.add_argument("--name", default="rahf", help="generator / model id recorded in the records (default: rahf)")
    e.add_argument(
        "--allow-multiturn", action="store_true", help="alpaca-eval: render a multi-turn prompt as the instruction"
    )
    e.add_argument(
        "--question-id-offset", type=int, default=0,
        help="mt-bench: question_id = the first turn's generation index + this (MT-Bench numbers its questions from 81)",
    )  # fmt: skip
    e.add_argument(
        "--sample", type=int, default=None,
        help="which reply of each prompt to export from a file with several (evaluate.samples > 1), from 0",
    )  # fmt: skip
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="a complete run on a built-in task: no download, no GPU")
    d.add_argument("--out", default="rahf-demo", help="output folder (default: rahf-demo)")
    d.add_argument("--quick", action="store_true", help="a smaller version for tests (about 2 minutes)")
    d.add_argument("--label-noise", type=float, default=0.0, help="fraction of training pairs with labels swapped")
    d.add_argument("--seed", type=int, default=0, help="draws another task, model and training run (default: 0)")
    d.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="inspect preference data, SFT data and prompts files")
    dsub = data.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="format, number of records and problems of a data file")
    dc.add_argument("path", help="a JSONL(.gz), JSON(.gz) or parquet file, or a `datasets` save_to_disk folder")
    dc.add_argument(
        "--format",
        default="auto",
        help="auto | trl-standard | trl-conversational | hh | ultrafeedback | prompt/completion (SFT data) | "
        "prompt-only (prompts)",
    )
    shown = dc.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true", help="list every problem (the default lists the first 20)")
    shown.add_argument("--json", action="store_true", help="the whole report as one JSON object, every problem in it")
    dc.set_defaults(func=_cmd_data_check)
    for commands in (sub, dsub):  # a command's errors show its own usage
        for command in commands.choices.values():
            command.set_defaults(own_parser=command)
    return p


def _method_option(parser: argparse.ArgumentParser, methods: tuple[str, ...] = (*METHODS, *ALIASES)) -> None:
    """`--method M`, the same as the override `method=M`: every command of one run must name the same method."""
    parser.add_argument("--method", choices=methods, help="overrides the config's method (the same as method=...)")


def _one_process(command: str) -> None:
    """`compare` and `demo` run many small runs back to back in one process; several would race on their folders."""
    from .distributed import world_size

    if (world := world_size()) > 1:
        raise RahfError(
            f"`rahf {command}` was launched as {world} processes (WORLD_SIZE={world}) and runs in one: start it as "
            f"`rahf {command} ...` (`rahf run` and the stage commands are the ones that use several processes)"
        )


def _quiet_other_processes() -> None:
    """Under a launcher (`accelerate launch`, `torchrun`), only process 0 prints progress."""
    from . import distributed

    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" once, from process 0
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore")


# OSErrors that say what the machine refused rather than what rahf got wrong: one line and a fix, not a traceback
# (the stage being written is removed on the way out, as for Ctrl-C)
_MACHINE_ERRORS = {
    errno.ENOSPC: "free space there (or point output_dir elsewhere) and run again",
    errno.EDQUOT: "free space within your quota there (or point output_dir elsewhere) and run again",
    errno.EACCES: "give this user access to it (or point the setting elsewhere)",
    errno.EPERM: "give this user access to it (or point the setting elsewhere)",
    errno.EROFS: "point output_dir at a writable file system",
}


def _abandoned() -> str:
    """What became of the artifact whose writing stopped: removed, with the finished one it was replacing kept."""
    final = ABANDONED[0]
    return (
        f"the new {final} (half-written) was removed, the earlier one kept"
        if final.exists()
        else (f"{final} (half-written) was removed")
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, `docker stop`, a launcher stopping its processes), raised where the
    program is so that a half-written stage is removed on the way out, as on Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers are set there only
    before = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return _main(argv)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, before)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # argparse ends CONFIG [key=value ...] at the first flag; overrides after it (`run c.yaml --force alpha=3`)
    # come back unparsed and join the others
    args, rest = parser.parse_known_args(argv)
    ABANDONED.clear()  # what an interrupt leaves half-written is named for this command only
    # TRL and PEFT still use these transformers-5 names: a notice about library internals would open every run
    # (a config that sets the old name itself is told by `_load`)
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated", FutureWarning)
    if rest:
        flags = [x for x in rest if x.startswith("-")] if hasattr(args, "items") else rest
        if flags:  # with the usage of the command they were given to
            args.own_parser.error(f"unrecognized arguments: {' '.join(flags)}")
        args.items += rest
    try:
        _quiet_other_processes()
        if args.func in (_cmd_compare, _cmd_demo):
            _one_process(args.command)
        args.func(args)
        from .distributed import finish

        finish()
        sys.stdout.flush()  # a reader that left early (`rahf status c.yaml | head -1`) shows here, not at exit
    except BrokenPipeError:
        # Python's recipe (docs of `signal`, "Note on SIGPIPE"): send the rest of stdout to devnull, so that the
        # flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RahfError as e:
        from . import distributed

        if distributed.is_main():
            print(f"rahf: error: {e}", file=sys.stderr)
        elif distributed.WORKING and not isinstance(e, (ConfigError, DataError)):  # those, every process meets
            print(f"rahf: error (process {distributed.rank()}): {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _MACHINE_ERRORS:
            raise
        from .distributed import WORKING, is_main, rank

        where = f" (process {rank()})" if WORKING and not is_main() else ""
        what = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        left = f"{_abandoned()}, " if ABANDONED else ""
        print(
            f"rahf: error{where}: {what}; {_MACHINE_ERRORS[e.errno]}; {left}finished stages are kept", file=sys.stderr
        )
        return 2 if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else 1
    except KeyboardInterrupt:  # Ctrl-C: the stage being written was removed on the way out (atomic_dir)
        from .distributed import is_main

        what = _abandoned() if ABANDONED else "nothing half-written was left"
        stopped = isinstance(sys.exc_info()[1], Terminated)
        if is_main():  # the only process that writes
            lead = "\n" if sys.stderr.isatty() else ""  # off the line of a progress bar drawn on a terminal
            said = "terminated" if stopped else "interrupted"
            print(f"{lead}rahf: {said}; {what}, finished stages are kept", file=sys.stderr)
        return 143 if stopped else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

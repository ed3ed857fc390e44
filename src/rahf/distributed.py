"""Several processes on one machine (`accelerate launch`, `torchrun`): one data-parallel worker per device.

The training stages split every batch over the processes (the Trainer's DistributedDataParallel), collect,
generate and evaluate split their sequences (`split`), and process 0 alone writes artifacts and runs the stage
that does not split (merge) while the others wait. The processes meet only when work went well: a process that fails
exits, and the launcher stops the others, so no process is left waiting for a message that cannot come.
Waiting goes through a side channel (gloo, 7-day timeout) so that a long stage on process 0 does not trip the
training group's timeout (`ddp_timeout`, 30 minutes by default). Hand-written because accelerate's helpers all use the training group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from .errors import RahfError

T = TypeVar("T")
_SIDE: list[Any] = []  # the side-channel process group, once `setup` made it
WORKING: list[bool] = []  # set once the checks before any work have passed (errors after it may differ by process)


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def rank() -> int:
    """This process's number, 0 for the one that writes artifacts (and for a process started alone)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() and world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def setup(timeout: int = 1800, backend: str | None = None) -> None:
    """Join the launcher's process group and open the side channel; nothing to do in one process.

    `timeout` (seconds) and `backend` are the training group's: the Trainer finds the group made here and keeps
    it, so they come from the stages' `ddp_timeout` and `ddp_backend`. Several machines are refused: artifacts
    are written by process 0 into a folder the others read."""
    if world_size() == 1 or _SIDE:
        return
    local = os.environ.get("LOCAL_WORLD_SIZE", str(world_size()))
    if local != str(world_size()):
        raise RahfError(
            f"launched on several machines ({world_size()} processes, {local} on this one): rahf runs its processes "
            "on one machine; launch it there with --num_processes set to its devices"
        )
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # as each TrainingArguments does; the group stays
    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout), backend=backend)
    _SIDE.append(dist.new_group(backend="gloo", timeout=timedelta(days=7)))


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def alone():
    """Within it, this process looks started alone (the launcher's variables hidden): building TrainingArguments to
    check a config then sets up no process group, which `setup` makes afterwards with the config's settings."""
    hidden = {k: os.environ.pop(k) for k in LAUNCHER_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


# what `accelerate launch` passes on from its flags or config file, and the Trainer would apply to every stage unasked
LAUNCHER_SETTINGS = {
    "ACCELERATE_MIXED_PRECISION": "mixed precision: rahf trains in `dtype` (set dtype: bfloat16, or a stage's "
    "train.bf16 / train.fp16)",
    "ACCELERATE_DYNAMO_BACKEND": "torch.compile backend: set a stage's train.torch_compile to compile",
}


def drop_launcher_settings() -> list[str]:
    """Remove the launcher's mixed precision and compile backend from the environment, so that the stages train as
    the config says (and as its fingerprints record); returns a note for each one that was set."""
    notes = []
    for name, what in LAUNCHER_SETTINGS.items():
        value = os.environ.pop(name, None)
        if value is not None and value.lower() != "no":
            notes.append(f"the launcher's {name}={value} is not used; {what}")
    return notes


@contextmanager
def without_launcher_settings() -> Iterator[list[str]]:
    """`drop_launcher_settings` for the span of one library call (yields its notes): the caller's environment gets
    the settings back when it ends."""
    kept = {name: os.environ[name] for name in LAUNCHER_SETTINGS if name in os.environ}
    try:
        yield drop_launcher_settings()
    finally:
        os.environ.update(kept)


@contextmanager
def _told_once():
    """A process that stopped breaks the others' pending exchange: they say so in one line (its own is above)."""
    try:
        yield
    except RuntimeError as e:  # gloo: "Connection closed by peer", "Broken pipe", ...
        raise RahfError(f"another process stopped, so process {rank()} stops too ({str(e).splitlines()[0]})") from None


def wait() -> None:
    """Return once every process got here (process 0 has finished what the others wait for)."""
    if world_size() > 1:
        import torch.distributed as dist

        with _told_once():
            dist.barrier(group=_SIDE[0])


def share(value: T | None) -> T:
    """Process 0's `value`, on every process (the others pass None)."""
    if world_size() == 1:
        return value  # type: ignore[return-value]
    import torch.distributed as dist

    box = [value]
    with _told_once():
        dist.broadcast_object_list(box, src=0, group=_SIDE[0])
    return box[0]


def gather(value: T) -> list[T]:
    """Every process's `value`, in process order, on every process."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    with _told_once():
        dist.all_gather_object(out, value, group=_SIDE[0])
    return out


def finish() -> None:
    """Leave the process groups together once every process is done: a process that exits while another still
    holds its connections can make that one abort on its way out."""
    if world_size() > 1 and _SIDE:
        import torch.distributed as dist

        wait()
        dist.destroy_process_group()
        _SIDE.clear()


def on_main(work: Callable[[], T]) -> T:
    """`work()` on process 0; the others wait for it and get its result."""
    return share(work() if is_main() else None)


def my_share(items: Sequence[T]) -> list[int]:
    """The indices of `items` this process handles: every world_size()-th, from its rank on."""
    return list(range(rank(), len(items), world_size()))


def split(count: int, work: Callable[[list[int]], Sequence[T]]) -> list[T]:
    """The results of `work(indices)` for all of range(count), in index order, on every process: each process runs
    `work` on its share (`my_share`) and the shares are gathered. In one process, `work(list(range(count)))`.

    Every process must call it with the same `count`; `work` returns one result per index it is given."""
    mine = my_share(range(count))
    out: list[Any] = [None] * count
    for indices, results in gather((mine, list(work(mine)))):
        if len(results) != len(indices):
            raise ValueError(f"split: {len(results)} results for {len(indices)} items")
        for i, result in zip(indices, results):
            out[i] = result
    return out

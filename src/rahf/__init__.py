"""rahf: Representation Alignment from Human Feedback on Hugging Face models.

Pipeline: data -> stimuli -> instruct (scit, dual) -> collect -> align -> merge/generate.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see; at run time the names load on first use
    from .config import RahfConfig, load_config
    from .data import PreferencePair, check_data, load_pairs
    from .errors import ConfigError, DataError, RahfError
    from .pipeline import run, run_stage

__version__ = "0.1.0"
# Where each public name lives. They load on first use (PEP 562), so `rahf --help`, or a Ctrl-C while the
# command line starts, does not wait for torch and transformers to import.
_PUBLIC = {
    "ConfigError": "errors",
    "DataError": "errors",
    "RahfError": "errors",
    "PreferencePair": "data",
    "check_data": "data",
    "load_pairs": "data",
    "RahfConfig": "config",
    "load_config": "config",
    "run": "pipeline",
    "run_stage": "pipeline",
}
__all__ = [
    "ConfigError",
    "DataError",
    "PreferencePair",
    "RahfConfig",
    "RahfError",
    "check_data",
    "load_config",
    "load_pairs",
    "run",
    "run_stage",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rahf' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])

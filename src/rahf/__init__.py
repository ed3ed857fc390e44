"""rahf: Representation Alignment from Human Feedback on Hugging Face models.

Pipeline: data -> stimuli -> instruct (scit, dual) -> collect -> align -> merge/generate.
"""

from .config import RahfConfig, load_config
from .data import PreferencePair, check_data, load_pairs
from .errors import ConfigError, DataError, RahfError
from .pipeline import run, run_stage

__version__ = "0.1.0"
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

"""The benchmark scripts' variants are valid configs that set what they say (a typo would surface minutes into a run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from conftest import standard_records, write_jsonl

from rahf.demo.run import FULL, demo_config

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_dir(tmp_path, tiny_model_dir) -> Path:
    """The files of a finished demo that the variants' configs point at, with a tiny model as its base."""
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    for name in ("pairs", "sft", "validation", "test"):
        write_jsonl(demo / "data" / f"{name}.jsonl", standard_records(4, seed=0))
    (demo / "noise-0" / "seed-0" / "reward").mkdir(parents=True)
    sweep = demo_config(demo / "compare", demo / "data", FULL, 0, 0.0) | {"model": str(tiny_model_dir)}
    (demo / "compare.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return demo


def _value(cfg, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    return node


def test_every_variant_is_a_valid_config_that_sets_its_overrides(demo_dir, tmp_path):
    variants = _script("variants")
    for name, study in variants.STUDIES.items():
        assert study.variants, name
        for label, extra in study.variants.items():
            cfg = variants.variant_config(demo_dir, tmp_path / "work", study.method, 8, extra)
            assert cfg.compare.methods == [study.method] and cfg.evaluate.samples == 8
            assert cfg.evaluate.pairs == str(demo_dir / "data" / "validation.jsonl")
            for dotted, value in extra.items():
                assert _value(cfg, dotted) == value, (name, label, dotted)


def test_spherical_target_rotates_h_plus_away_from_h_minus_by_alpha_times_their_angle():
    import math

    import torch

    oracle = _script("dual_oracle")
    plus = torch.tensor([[2.0, 0.0, 0.0, 0.0]])  # rms 1
    minus = torch.tensor([[0.0, 5.0, 0.0, 0.0]])  # 90 degrees away, another scale
    assert torch.allclose(oracle.spherical_target(plus, minus, 0.0), plus)
    # half of 90 degrees past h+, away from h-: (cos 45, -sin 45) at h+'s norm
    half = oracle.spherical_target(plus, minus, 0.5)
    assert torch.allclose(half, torch.tensor([[2 * math.cos(math.pi / 4), -2 * math.sin(math.pi / 4), 0.0, 0.0]]))
    # a small angle: the same direction as the normalized linear target, but h+'s scale kept
    minus = torch.tensor([[3.0, 0.3, 0.0, 0.0]])
    turned = oracle.spherical_target(plus, minus, 1.0)
    theta = math.atan2(0.3, 3.0)
    assert torch.allclose(turned, torch.tensor([[2 * math.cos(theta), -2 * math.sin(theta), 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(turned.norm(), plus.norm())

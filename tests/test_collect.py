"""Collect on a tiny model: Dual's two LoRA adapters read from one base, and targets the cache dtype cannot hold."""

from __future__ import annotations

import pytest
import torch
from conftest import LAYERS, run_settings, standard_records

from rahf import pipeline
from rahf.collect import AdapterView, TargetReader, examples_for, write_cache
from rahf.config import load_config
from rahf.data import PreferencePair
from rahf.errors import RahfError
from rahf.models import load_model, load_tokenizer
from rahf.training import load_stage_model, lora_config


def pairs(n: int) -> list[PreferencePair]:
    return [
        PreferencePair(({"role": "user", "content": r["prompt"]},), r["chosen"], r["rejected"], "test")
        for r in standard_records(n, seed=0)
    ]


@pytest.fixture(scope="module")
def dual_adapters(tmp_path_factory, tiny_model_dir, pairs_file):
    """A Dual config whose instruct artifact holds two LoRA adapters with random, clearly non-zero weights."""
    from peft import get_peft_model

    def random_adapters(cfg, out):
        for seed, side in enumerate(("preferred", "dispreferred")):
            base = load_model(str(tiny_model_dir), device="cpu")
            model = get_peft_model(base, lora_config(base, cfg.instruct.lora))
            torch.manual_seed(seed)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.5)
            model.save_pretrained(out / side)
        load_tokenizer(str(tiny_model_dir)).save_pretrained(out)

    out = tmp_path_factory.mktemp("dual-adapters") / "out"
    cfg = load_config(None, run_settings(tiny_model_dir, pairs_file, out, "dual"))
    with pytest.MonkeyPatch.context() as mp:  # the instruct stage, its training replaced by random adapters
        mp.setitem(pipeline._STAGES, "instruct", random_adapters)
        pipeline.run_stage(cfg, "instruct")
    return cfg


def test_dual_lora_reader_shares_one_base_and_equals_two_merged_models(dual_adapters):
    cfg = dual_adapters
    tok = load_tokenizer(str(pipeline.stage_dir(cfg, "instruct")))
    examples = examples_for(tok, pairs(4), cfg)
    shared = pipeline.target_reader(cfg, LAYERS, tok.pad_token_id)
    assert isinstance(shared.plus, AdapterView) and isinstance(shared.minus, AdapterView)
    assert shared.plus.model is shared.minus.model  # one set of base weights for both adapters
    assert shared.plus.config.hidden_size == 32
    instruct = pipeline.stage_dir(cfg, "instruct")
    merged = [load_stage_model(instruct, cfg, adapter=side) for side in ("preferred", "dispreferred")]
    separate = TargetReader(cfg, LAYERS, tok.pad_token_id, *merged)
    for batch in (examples[:3], examples[3:]):  # a second call: the switch back to `preferred` holds
        o, v = shared(batch)
        o_want, v_want = separate(batch)
        for layer in LAYERS:
            for got, want in zip(o[layer] + v[layer], o_want[layer] + v_want[layer]):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(t.abs().max() > 1e-2 for t in v[LAYERS[0]])  # the adapters really differ


class ConstantReader:
    """Stands in for a TargetReader: every window row holds `value`."""

    def __init__(self, cfg, value: float):
        self.cfg, self.layers, self.value = cfg, LAYERS, value

    def __call__(self, batch):
        rows = [
            torch.full((e.plain.window(self.cfg.window, self.cfg.include_boundary)[1], 32), self.value) for e in batch
        ]
        return {layer: rows for layer in self.layers}, {layer: rows for layer in self.layers}


def test_targets_beyond_float16_range_stop_collect(tmp_path, tiny_model_dir, pairs_file, tokenizer):
    def cfg_with(dtype: str):
        return load_config(None, run_settings(tiny_model_dir, pairs_file, tmp_path, "scit", collect__dtype=dtype))

    examples = examples_for(tokenizer, pairs(2), cfg_with("float16"))
    with pytest.raises(RahfError, match=r"o at layer 1 is not finite in float16.*collect\.dtype: bfloat16 or float32"):
        write_cache(ConstantReader(cfg_with("float16"), 1e5), examples, tmp_path, hidden=32)
    assert not list(tmp_path.glob("shard-*"))
    with pytest.raises(
        RahfError, match=r"model's states \(o\) at layer 1 are not finite \(NaN or inf\) before the cast"
    ):
        write_cache(ConstantReader(cfg_with("float32"), float("nan")), examples, tmp_path, hidden=32)  # not the cache's
    stats = write_cache(ConstantReader(cfg_with("bfloat16"), 1e5), examples, tmp_path, hidden=32)
    assert stats["shards"] == ["shard-00000.safetensors"]


@pytest.mark.parametrize("include_boundary", [True, False])
def test_reader_forwards_each_sequence_only_through_its_window(
    tmp_path, tiny_model_dir, pairs_file, tokenizer, monkeypatch, include_boundary
):
    # A causal model's states at the window depend on no later token: the reader cuts the sequences after
    # their windows and must read exactly what a forward of the whole sequence gives there.
    from rahf import collect

    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", window=3)
    cfg = load_config(None, settings | {"include_boundary": include_boundary})
    model = load_model(str(tiny_model_dir), device="cpu").eval()
    examples = examples_for(tokenizer, pairs(3), cfg)
    widths = []
    real = collect.forward_capture
    monkeypatch.setattr(
        collect, "forward_capture", lambda m, ls, ids, attn: widths.append(ids.shape[1]) or real(m, ls, ids, attn)
    )
    o, v = TargetReader(cfg, LAYERS, tokenizer.pad_token_id, model)(examples)

    def window_states(s, layer):
        start, n = s.window(3, include_boundary)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([s.input_ids]), output_hidden_states=True).hidden_states
        return hs[layer][0, start : start + n]

    for i, e in enumerate(examples):
        for layer in LAYERS:
            torch.testing.assert_close(o[layer][i], window_states(e.plain, layer), atol=1e-5, rtol=1e-4)
            want = window_states(e.variants["pos"], layer) - window_states(e.variants["neg"], layer)
            torch.testing.assert_close(v[layer][i], want, atol=1e-5, rtol=1e-4)
    longest = [max(len(e.variants[k].input_ids) for e in examples) for k in ("plain", "pos", "neg")]
    assert all(w < full for w, full in zip(widths, longest))  # every forward stopped short of the replies' ends


def test_shards_close_at_their_sequence_count_or_byte_cap(monkeypatch):
    from rahf import collect

    monkeypatch.setattr(collect, "SHARD_BYTES", 8)
    assert collect.shard_ranges([3, 5, 2, 4], 3, 1) == [range(2), range(2, 4)]  # 3+5 fits 8 bytes, +2 does not
    assert collect.shard_ranges([3, 5, 2, 4], 3, 2) == [range(1), range(1, 2), range(2, 3), range(3, 4)]  # 2 B each
    assert collect.shard_ranges([1, 1, 1, 1, 1], 2, 1) == [range(2), range(2, 4), range(4, 5)]
    assert collect.shard_ranges([20, 1], 9, 1) == [range(1), range(1, 2)]  # one sequence over the cap: alone
    assert collect.shard_ranges([], 9, 1) == []


def test_a_cache_split_by_the_byte_cap_reads_as_one_shard(tmp_path, tiny_model_dir, pairs_file, tokenizer, monkeypatch):
    """Rows go into each shard's tensors batch by batch, in the cache dtype; the split changes nothing read back."""
    from rahf import collect
    from rahf.align import CachedTargets

    cfg = load_config(
        None,
        run_settings(
            tiny_model_dir, pairs_file, tmp_path / "out", "scit", collect__batch_size=3, collect__dtype="float16"
        ),
    )
    model = load_model(str(tiny_model_dir), device="cpu").eval()
    examples = examples_for(tokenizer, pairs(4), cfg)
    reader = TargetReader(cfg, LAYERS, tokenizer.pad_token_id, model)
    token_bytes = 2 * 32 * len(LAYERS) * 2  # o and v, hidden 32, float16
    caches = {}
    for name, cap in (("one", 2**30), ("split", 20 * token_bytes)):
        monkeypatch.setattr(collect, "SHARD_BYTES", cap)
        (tmp_path / name).mkdir()
        stats = write_cache(reader, examples, tmp_path / name, hidden=32)
        caches[name] = (stats, CachedTargets(tmp_path / name, LAYERS))
    assert len(caches["one"][0]["shards"]) == 1 and len(caches["split"][0]["shards"]) > 2
    (one_stats, one), (split_stats, split) = caches["one"], caches["split"]
    assert one_stats["n_tokens"] == split_stats["n_tokens"]
    for layer, values in one_stats["per_layer"].items():
        assert values == pytest.approx(split_stats["per_layer"][layer])
    assert len(one) == len(split) == len(examples)
    for i, e in enumerate(examples):
        a, b = one[i], split[i]
        assert a["input_ids"] == b["input_ids"] == list(e.plain.input_ids)
        for kind in ("o", "v"):
            for layer in LAYERS:
                assert a[kind][layer].dtype == torch.float16
                assert torch.equal(a[kind][layer], b[kind][layer])
    o, _ = reader(examples[:1])
    torch.testing.assert_close(one[0]["o"][LAYERS[0]].float(), o[LAYERS[0]][0], atol=1e-2, rtol=1e-2)


def test_collect_batches_sequences_whose_windows_end_alike_and_files_each_in_its_place(
    tmp_path, tiny_model_dir, pairs_file, tokenizer
):
    """A batch is padded to its longest window end, so collect forwards sequences in order of window end (in file
    order most of a batch of HH pairs was padding); each sequence's rows still land at its own index."""
    from rahf.align import CachedTargets

    settings = run_settings(tiny_model_dir, pairs_file, tmp_path / "out", "scit", collect__batch_size=3)
    cfg = load_config(None, settings | {"collect": {"batch_size": 3, "dtype": "float32"}})
    model = load_model(str(tiny_model_dir), device="cpu").eval()
    longer = [  # prompts of 0, 4, 2, 6, .. more words: windows ending at different positions
        PreferencePair(({"role": "user", "content": " ".join(["mia"] * (i * 2 % 8)) + " " + p.prompt[0]["content"]},),
                       p.chosen, p.rejected, p.source)
        for i, p in enumerate(pairs(8))
    ]  # fmt: skip
    examples = examples_for(tokenizer, longer, cfg)
    ends = [sum(e.plain.window(cfg.window, cfg.include_boundary)) for e in examples]
    assert ends != sorted(ends)  # file order is not window order here
    reader = TargetReader(cfg, LAYERS, tokenizer.pad_token_id, model)
    seen = []

    def recording(batch):
        seen.append([sum(e.plain.window(cfg.window, cfg.include_boundary)) for e in batch])
        return reader(batch)

    recording.cfg, recording.layers = reader.cfg, reader.layers
    (tmp_path / "cache").mkdir()
    write_cache(recording, examples, tmp_path / "cache", hidden=32)
    assert [end for batch in seen for end in batch] == sorted(ends) and {len(b) for b in seen[:-1]} == {3}
    cache = CachedTargets(tmp_path / "cache", LAYERS)
    for i, e in enumerate(examples):
        o, v = reader([e])
        assert cache[i]["input_ids"] == list(e.plain.input_ids)
        for layer in LAYERS:
            torch.testing.assert_close(cache[i]["o"][layer], o[layer][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache[i]["v"][layer], v[layer][0], atol=1e-5, rtol=1e-5)

"""Decoder blocks and layer counts of multimodal checkpoints, whose config nests the language model's."""

from __future__ import annotations

import pytest
import torch

from rahf.models import decoder_blocks, default_layers, forward_capture, logits_from, num_layers


def tiny_gemma3(vocab_size: int, layers: int = 3):
    """A Gemma 3 vision-language model (what AutoModelForCausalLM loads for gemma-3-4b and up) whose vision
    tower is exactly as deep as its language model."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers}
    text |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 2}
    vision |= {"image_size": 28, "patch_size": 14}
    torch.manual_seed(0)
    config = Gemma3Config(text_config=text, vision_config=vision, image_token_index=1)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (32, [10, 12, 14, 16, 18]),  # the authors' SCIT layers of a 7B LLaMA
        (24, [8, 10, 12, 14]),  # 7.5 -> 8 and 13.5 -> 14: round half to even
        (40, [12, 14, 16, 18, 20, 22]),  # 12.5 -> 12, 22.5 -> 22
        (12, [4, 5, 6, 7]),  # 3.75 -> 4, 6.75 -> 7: a span of 3, every layer
        (4, [1, 2]),
        (1, [1]),
    ],
)
def test_default_layers_scale_the_authors_to_the_depth(depth, expected):
    assert default_layers(depth) == expected


@pytest.mark.parametrize("model_type", ["gemma3", "qwen3_5", "llama4"])
def test_num_layers_of_a_multimodal_config_is_its_language_models(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, text_config={"num_hidden_layers": 5})
    assert num_layers(config) == 5


def test_decoder_blocks_of_a_multimodal_model_are_its_language_models(tokenizer):
    model = tiny_gemma3(len(tokenizer))
    blocks = decoder_blocks(model)
    assert blocks is model.model.language_model.layers
    ids = tokenizer(["mia asks : what color is a banana ?"], return_tensors="pt")
    with torch.no_grad():
        states = model(**ids, output_hidden_states=True).hidden_states
        captured = forward_capture(model, [1, 2], ids["input_ids"], ids["attention_mask"])
    assert all(torch.equal(captured[layer], states[layer]) for layer in (1, 2))


@pytest.mark.parametrize(
    ("targets", "max_layer", "expected"),
    [
        (None, 2, {f"model.language_model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}),
        (
            ["q_proj", "lm_head"],
            None,
            {f"model.language_model.layers.{i}.self_attn.q_proj" for i in (0, 1, 2)} | {"lm_head"},
        ),
    ],
)
def test_lora_stays_in_the_language_model(tokenizer, targets, max_layer, expected):
    """The vision tower has q_proj/v_proj and `layers` too: LoRA there would train nothing on text."""
    from peft import get_peft_model

    from rahf.config import LoraSettings
    from rahf.training import lora_config

    model = tiny_gemma3(len(tokenizer))
    peft_model = get_peft_model(model, lora_config(model, LoraSettings(target_modules=targets), max_layer=max_layer))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected


def test_a_text_model_adapter_config_names_no_exclusions(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rahf.config import LoraSettings
    from rahf.training import lora_config

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config)
    assert lora_config(model, LoraSettings(), max_layer=1).exclude_modules is None


def test_files_that_cannot_be_loaded_are_one_line_naming_them(tmp_path, tiny_model_dir):
    import shutil

    from rahf.errors import LoadError
    from rahf.models import load_model, load_tokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # cut short after the checks before a run
    with pytest.raises(LoadError, match=rf"^{broken}: cannot load the model \(\w+: .+\)$") as caught:
        load_model(str(broken), device="cpu")
    assert "\n" not in str(caught.value)
    (broken / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(LoadError, match=rf"^{broken}: cannot load the tokenizer \(\w+: "):
        load_tokenizer(str(broken))
    (broken / "tokenizer.json").write_text('{"version": "1.0"}')  # valid JSON: transformers raises a KeyError
    with pytest.raises(LoadError, match=rf"^{broken}: cannot load the tokenizer \(KeyError: "):
        load_tokenizer(str(broken))
    (broken / "tokenizer.json").write_text(
        '{"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": 5}}'
    )
    with pytest.raises(LoadError, match=rf"^{broken}: cannot load the tokenizer \(Exception: "):  # from `tokenizers`
        load_tokenizer(str(broken))


def test_a_tokenizer_with_a_chat_template_is_saved_with_it_untouched(tmp_path, vocab):
    from rahf.demo.tiny import build_tokenizer
    from rahf.models import load_tokenizer, save_tokenizer
    from rahf.stimuli import chat_template

    tok = build_tokenizer(vocab)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    save_tokenizer(tok, tmp_path)
    saved = load_tokenizer(str(tmp_path))
    assert saved.chat_template == tok.chat_template == chat_template(saved)
    messages = [{"role": "user", "content": "mia asks"}]
    assert saved.apply_chat_template(messages, tokenize=False) == "user : mia asks "


def test_a_model_whose_blocks_pass_parallel_streams_is_refused_before_collect_and_when_read():
    """Gemma 3n's blocks pass [4, batch, sequence, hidden]: no one state per token to read and steer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rahf.errors import ConfigError
    from rahf.models import check_one_stream

    config = AutoConfig.for_model(
        "gemma3n_text", vocab_size=64, hidden_size=32, intermediate_size=[64] * 2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, laurel_rank=4, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=64, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * 2,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="gemma3n_text model passes 4 parallel streams of hidden states"):
        check_one_stream(config)
    check_one_stream(AutoConfig.for_model("llama", num_hidden_layers=2))  # one stream: accepted
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ConfigError, match=r"layer 1: the block's output has shape \[4, 1, 5, 32\], not \[batch"):
        forward_capture(model, [1], torch.tensor([[3, 4, 5, 6, 7]]), torch.ones(1, 5, dtype=torch.long))


def test_a_model_without_one_module_per_block_is_refused_before_collect_and_align():
    """XLM keeps its attentions, norms and feed-forwards in parallel lists of its depth: none of them is the blocks,
    whose outputs collect reads (taking the first, the attentions, read the attention output before the residual)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rahf.config import LoraSettings
    from rahf.errors import ConfigError
    from rahf.preflight import check_blocks
    from rahf.training import check_lora_targets

    config = AutoConfig.for_model("xlm", vocab_size=64, emb_dim=32, n_layers=2, n_heads=2)
    refused = r"xlm model keeps 4 parallel lists of 2 modules \(attentions, layer_norm1, ffns, layer_norm2\)"
    with pytest.raises(ConfigError, match=refused):
        check_blocks(config, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match=refused):
        check_lora_targets(model, LoraSettings(target_modules=["q_lin", "v_lin"]), "align.lora", max_layer=2)
    assert check_lora_targets(model, LoraSettings(target_modules=["q_lin", "v_lin"]), "dpo.lora") is None
    # a block holding as many experts as the model has blocks: the blocks are the outer list
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32,
                                             intermediate_size=64, num_attention_heads=2, vocab_size=64))  # fmt: skip
    for block in llama.model.layers:
        block.experts = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    assert decoder_blocks(llama) is llama.model.layers
    adapted = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_blocks(adapted) is llama.model.layers


def test_a_model_whose_blocks_run_time_major_is_refused_when_read():
    """XLNet's blocks return [sequence, batch, hidden]: reading it as [batch, sequence] would steer the wrong states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rahf.errors import ConfigError

    config = AutoConfig.for_model("xlnet", vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(
        ConfigError, match=r"layer 1: the block's output has shape \[5, 1, 32\] for input ids of shape \[1, 5\]"
    ):
        forward_capture(model, [1], torch.tensor([[3, 4, 5, 6, 7]]), torch.ones(1, 5, dtype=torch.long))


def test_blocks_that_return_a_list_are_read():
    """OpenAI GPT's blocks return a list, not a tuple, of their outputs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("openai-gpt", vocab_size=64, n_embd=32, n_layer=3, n_head=2, n_positions=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = torch.tensor([[3, 4, 5, 6, 7]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        captured = forward_capture(model, [1, 2], ids, mask)
    for layer in (1, 2):
        torch.testing.assert_close(captured[layer], states[layer])


def test_logits_from_a_position_equal_the_whole_forwards_from_there(tiny_model_dir):
    """A causal LM that takes `logits_to_keep` computes the logits from `first` on only; one wrapped by PEFT too; a
    forward without it gives them all, and says they start at 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, 40, (2, 9))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=attn).logits
        for first in (0, 4, 8):
            logits, at = logits_from(model, ids, attn, first)
            assert at == first and torch.allclose(logits, whole[:, first:], atol=1e-6)
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        logits, at = logits_from(peft, ids, attn, 4)
        assert at == 4 and torch.allclose(logits, whole[:, 4:], atol=1e-6)

    class Whole(torch.nn.Module):  # a forward without logits_to_keep
        def forward(self, input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask)

    with torch.no_grad():
        logits, at = logits_from(Whole(), ids, attn, 4)
    assert at == 0 and torch.allclose(logits, whole, atol=1e-6)

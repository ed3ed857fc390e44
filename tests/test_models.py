"""Decoder blocks and layer counts of multimodal checkpoints, whose config nests the language model's."""

from __future__ import annotations

import pytest
import torch

from rahf.models import decoder_blocks, forward_capture, num_layers


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

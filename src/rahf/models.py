"""Loading causal LMs and reading their hidden states at chosen layers.

Layer numbering follows Hugging Face `hidden_states`: layer 0 is the embedding output and layer
`l` (1..num_layers) is the output of decoder block `l - 1`. We read block outputs with forward hooks,
so the top layer is the raw block output (transformers 5 applies the final norm to the last
`hidden_states` entry; the hooks do not), and the forward stops right after the last target layer.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError, LoadError
from .stimuli import plain_chat_template, stop_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config string."""
    return DTYPES[name]


@contextmanager
def _loading(what: str, path: str) -> Iterator[None]:
    """Files that cannot be loaded (missing, cut short, unreadable, malformed: what the up-front checks cannot see,
    e.g. a Hub model first met by a stage) end a stage in one line naming them, not a traceback from inside
    transformers. KeyError, AttributeError and TypeError are what transformers raises on some well-formed JSON with
    the wrong fields; ImportError, on a missing optional library (sentencepiece); a tokenizer.json the `tokenizers`
    library cannot parse raises a bare Exception, so a tokenizer's loading catches every Exception."""
    from safetensors import SafetensorError

    caught = (
        Exception
        if what == "tokenizer"
        else (OSError, ValueError, SafetensorError, KeyError, AttributeError, TypeError, ImportError)
    )
    try:
        yield
    except caught as e:
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise LoadError(f"{path}: cannot load the {what} ({type(e).__name__}: {reason})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """A tokenizer with EOS ([SEP] for encoders without one) and a pad token (EOS when it has none).

    `revision` picks a branch, tag or commit of a Hub repo (None: its default branch).
    """
    from transformers import AutoTokenizer

    with _loading("tokenizer", path):
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None and tok.sep_token_id is not None:  # encoders (BERT) end every text with [SEP]
        tok.eos_token = tok.sep_token
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {path!r} has no EOS token; set one (tokenizer.eos_token) and save it")
    return tok


def load_model(
    path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | None = None,
    revision: str | None = None,
):
    """A causal LM in eval mode on `device` (CUDA when available unless told otherwise), at `revision` of a Hub repo."""
    from transformers import AutoModelForCausalLM

    with _loading("model", path):
        model = AutoModelForCausalLM.from_pretrained(  # safetensors only: a pickle (.bin) can run code when read
            path, revision=revision, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    model.to(device or default_device())
    model.eval()
    return model


def free_memory() -> None:
    """On a GPU, give back the memory of models no longer referenced before the next one loads: accelerate's bf16
    autocast leaves a reference cycle (a model holding its own forward) that only a garbage collection frees, and
    CUDA keeps freed blocks cached for this process alone. On a CPU, no cycle holds a model (a full collection would
    cost about 0.2 s each time)."""
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def reply_stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end a reply: the tokenizer's EOS and end-of-turn token (`stop_ids`) and every stop token the
    checkpoint's generation config lists (Llama 3.1's `<|eom_id|>`, Phi-3.5's three), where `generate` and servers
    stop too, so replies are judged as they are deployed."""
    generation = getattr(model, "generation_config", None)
    shipped = getattr(generation, "eos_token_id", None)
    shipped = [] if shipped is None else [shipped] if isinstance(shipped, int) else list(shipped)
    return sorted(set(stop_ids(tokenizer)) | set(shipped))


def save_model(model, tokenizer, out, dtype: str | None = None) -> None:
    """Save a model (or adapter) and its tokenizer (`save_tokenizer`) in HF format; plain generation stops where
    replies end.

    The saved generation config lists every token rahf stops a reply at (`reply_stop_ids`: EOS, the chat template's
    end of turn, the stop tokens it listed before), so `generate` (and servers reading generation_config.json) stop at
    the end of the turn it was trained on, also where the checkpoint listed none.
    Sampling flags a checkpoint ships without `do_sample` (temperature 0.6, ...) are saved back as shipped:
    transformers refuses to save such a config once anything in it changed, as the stop tokens (or a
    trainer's pad token) just did. `dtype` casts the weights first (float32 master weights saved as trained for).
    """
    from .distributed import is_main

    if not is_main():  # launched as several processes, process 0 writes
        return
    if dtype is not None:
        model.to(torch_dtype(dtype))
    for config in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
        if getattr(config, "use_cache", None) is False:  # trainers turn the KV cache off; inference wants it
            config.use_cache = True
        if getattr(config, "output_router_logits", None):  # TRL's SFT turns a mixture of experts' router logits on for
            config.output_router_logits = False  # its loss; a padded batched generate cannot compute that loss
    stops = reply_stop_ids(model, tokenizer)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        shipped = generation.eos_token_id
        if set(stops) != set([shipped] if isinstance(shipped, int) else shipped or []):
            generation.eos_token_id = stops if len(stops) > 1 else stops[0]
        generation._original_object_hash = hash(generation)  # transformers validates it as loaded, not as edited
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)


def save_tokenizer(tokenizer, out) -> None:
    """Save `tokenizer` to `out`; one without a chat template is saved with `plain_chat_template`, so servers and
    `apply_chat_template` format prompts as rahf trained on them (rahf reads that template as no template).
    The tokenizer in memory is left as it was."""
    own = tokenizer.chat_template
    tokenizer.chat_template = own or plain_chat_template(tokenizer)
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = own


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_NOT_TEXT = re.compile(r"vision|visual|image|audio|speech|video|vit\b", re.IGNORECASE)


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of transformers `config` on the meta device: its modules and shapes, no weights read or
    allocated (a 70B model builds in a fraction of a second)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def learned_position_limit(config, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model with a learned table of absolute positions (GPT-2, OPT, GPT-Neo, BioGPT) can
    read; None for rotary, ALiBi or sinusoidal positions, which have no table to run off. Built on the meta
    device: no weights are read or allocated."""
    model = meta_model(config, trust_remote_code)
    words = model.get_input_embeddings()
    # the language model's tables only (a multimodal model's vision or audio tower has its own, for patches);
    # RoBERTa-family tables number positions from padding_idx + 1, so that many rows are never read
    tables = [
        m.num_embeddings - (0 if m.padding_idx is None else m.padding_idx + 1)
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        and m is not words
        and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
        and not _NOT_TEXT.search(name)
    ]
    if not tables:
        return None
    # OPT and BioGPT offset positions by 2 in a table 2 rows longer, so there the configured count is the limit
    configured = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return min([*tables, configured] if configured else tables)


def num_layers(config) -> int:
    """Number of decoder blocks, from a transformers config (its text model's, for a multimodal one such as
    Gemma 3, Llama 4 or Qwen3.5, whose config.json nests the layer count under `text_config`)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell the number of layers of model type {config.model_type!r}")


def check_one_stream(config) -> None:
    """Refuse a model whose decoder blocks pass several parallel streams of hidden states ([streams, batch,
    sequence, hidden]: Gemma 3n's AltUp): it has no one state per token for collect to read and align to steer."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if (streams := getattr(text, "altup_num_inputs", None)) is not None:
        raise ConfigError(
            f"model: a {config.model_type} model passes {streams} parallel streams of hidden states between its "
            "blocks, so collect and align have no one state per token to read and steer; RAHF and LoRRA do not "
            "support it (the sft, dpo and preferred-sft methods do)"
        )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any HF causal LM (LLaMA, Mistral, Qwen, GPT-2, GPT-NeoX, ... ; PEFT-wrapped too).

    Found generically as the ModuleList whose length equals the config's layer count, so new
    architectures need no table entry; in a multimodal model, within its language model, so a vision
    tower of the same depth is never taken for it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = num_layers(inner.config)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    for root in (decoder, inner):
        found = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        # outermost lists only: a block may hold a list of as many experts or heads as there are blocks
        outer = [(name, m) for name, m in found if not any(name.startswith(f"{o}.") for o, _ in found)]
        if len(outer) > 1:  # XLM keeps attention, norms and feed-forwards in parallel lists: no module is a block
            raise ConfigError(
                f"model: a {inner.config.model_type} model keeps {len(outer)} parallel lists of {n} modules "
                f"({', '.join(name for name, _ in outer)}) and no one module per decoder block, so collect and align "
                "have no block output to read and steer; RAHF and LoRRA do not support it (the sft, dpo and "
                "preferred-sft methods do)"
            )
        if outer:
            return outer[0][1]
    raise ConfigError(f"no list of {n} decoder blocks found in {type(inner).__name__}")


def default_layers(n: int) -> list[int]:
    """The authors' SCIT layers (10, 12, .., 18 of 32) scaled to a stack of `n` blocks: every other layer from
    10/32 to 18/32 of the way up, every layer there when that span is under 4 layers."""
    lo, hi = max(1, round(n * 10 / 32)), max(1, round(n * 18 / 32))
    return list(range(lo, hi + 1, 2 if hi - lo >= 4 else 1))


class _StopForward(Exception):
    """Raised by a hook after the last target layer so the rest of the network is not computed."""


@contextmanager
def capture(model: nn.Module, layers: Sequence[int], stop: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forwards of `model` record the output of each target layer into the yielded dict.

    Use with `forward_capture`, which swallows the early stop. Gradients flow through the captured
    tensors, so this serves training as well as collection.
    """
    blocks = decoder_blocks(model)
    out: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            out[layer] = output[0] if isinstance(output, (tuple, list)) else output  # OpenAI GPT's blocks: a list
            if out[layer].dim() != 3:  # the states of one token, per sequence of the batch: nothing else is read
                raise ConfigError(
                    f"layer {layer}: the block's output has shape {list(out[layer].shape)}, not [batch, sequence, "
                    f"hidden]; rahf cannot read one hidden state per token of a {type(model).__name__}"
                )
            if stop and layer == last:
                raise _StopForward

        return hook

    for layer in layers:
        handles.append(blocks[layer - 1].register_forward_hook(make_hook(layer)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@functools.cache
def _keeps_logits(cls: type) -> bool:
    """Whether the forward of model class `cls` takes `logits_to_keep` (asked once per class: training asks every step)."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def logits_from(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int, **kwargs
) -> tuple[torch.Tensor, int]:
    """The logits of positions `first`.. (all of them where the model's forward takes no `logits_to_keep`), and the
    position of their first row. Scoring replies reads no logits of the prompt before them, and [batch, sequence,
    vocabulary] over a long prompt and a 128k vocabulary costs gigabytes."""
    out, at = outputs_from(model, input_ids, attention_mask, first, **kwargs)
    return out.logits, at


def outputs_from(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int, **kwargs):
    """`logits_from` for a caller that also reads the forward's other outputs: (the model's output, whose logits
    start at position `first` where the model allows it, and the position of their first row)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    length = input_ids.shape[1]
    if 0 < first < length and _keeps_logits(type(base)):
        kwargs["logits_to_keep"] = length - first
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out, length - out.logits.shape[1]


def forward_capture(
    model: nn.Module,
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    stop: bool = True,
    inner: nn.Module | None = None,
) -> dict[int, torch.Tensor]:
    """Hidden states `[batch, seq, hidden]` at each target layer for one forward pass.

    `inner` is the model that `model` wraps (DistributedDataParallel), whose blocks are hooked. A wrapper runs to
    the end, since its gradient sync is armed only when its forward returns, with logits for one position only.
    """
    inner = model if inner is None else inner
    wrapped = inner is not model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    kwargs = {"logits_to_keep": 1} if wrapped and _keeps_logits(type(base)) else {}
    with capture(inner, layers, stop=stop and not wrapped) as out:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        except _StopForward:
            pass
    for layer, h in out.items():  # XLNet's blocks run time-major: [sequence, batch, hidden]
        if h.shape[:2] != input_ids.shape:
            raise ConfigError(
                f"layer {layer}: the block's output has shape {list(h.shape)} for input ids of shape "
                f"{list(input_ids.shape)}, not [batch, sequence, hidden]; rahf cannot read one hidden state per token "
                f"of a {type(base).__name__}"
            )
    return dict(out)

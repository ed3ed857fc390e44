"""SCIT: one model learns responses under contrastive instructions (hindsight-relabelling style).

Each pair gives two training sequences, (p+, q, y+) and (p-, q, y-). Per sequence the loss is the
response NLL under the matching instruction plus a label-smoothed contrast between the response's
mean token log-likelihood under the matching and under the opposite instruction. Both scores are
taken on the same response token ids, located in each sequence by its own prompt length.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RahfConfig
from ..data import PreferencePair
from ..models import load_model, load_tokenizer, logits_from, save_model
from ..stimuli import build_variants, tokenizing
from ..trainargs import stage_defaults
from ..training import ListDataset, lora_config, run_trainer, train_dtype, training_args


def scit_loss(match_lp: torch.Tensor, other_lp: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sequence SCIT loss from mean response log-likelihoods under matching / opposite instruction.

    c = s_match / (s_match + s_other) with s = exp(mean log p) is sigmoid(match - other);
    loss = -match + [-(1 - eps) log c - eps log(1 - c)].
    """
    d = match_lp - other_lp
    contrast = -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
    return -match_lp + contrast


def mean_response_logprob(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean log p(token) over the positions where `response_mask` is 1, per sequence (teacher forcing).

    Only the positions that predict a response token are taken to float32 and normalised, so prompt and
    padding positions cost no [tokens, vocabulary] copies (long prompts, 128k-token vocabularies).
    """
    mask = response_mask[:, 1:].bool()
    rows = mask.nonzero()[:, 0]
    pred = logits[:, :-1][mask].float()  # [N, V]: the positions predicting response tokens
    tok = torch.log_softmax(pred, dim=-1).gather(-1, input_ids[:, 1:][mask][:, None]).squeeze(-1)
    sums = torch.zeros(mask.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return sums / mask.sum(-1).clamp(min=1)


def scit_examples(tokenizer, pairs: list[PreferencePair], cfg: RahfConfig) -> list[dict]:
    """For each pair, (y+ under p+ vs p-) and (y- under p- vs p+): matching sequence first, opposite second."""
    systems = {"pos": cfg.instructions.preferred, "neg": cfg.instructions.dispreferred}
    lengths = (cfg.data.max_prompt_length, cfg.data.max_response_length)
    out = []
    for p in tokenizing(pairs, "pairs"):
        for response, match, other in ((p.chosen, "pos", "neg"), (p.rejected, "neg", "pos")):
            v = build_variants(tokenizer, p.prompt, response, systems, *lengths, source=p.source)
            out.append({"match": v[match], "other": v[other]})
    return out


class SCITCollator:
    """Pads matching and opposite sequences into one batch [2B, T] with a response mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [e["match"] for e in examples] + [e["other"] for e in examples]
        width = max(len(s.input_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        resp = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            n = len(s.input_ids)
            ids[i, :n] = torch.tensor(s.input_ids)
            attn[i, :n] = 1
            resp[i, s.response_start : n] = 1
        return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def scit_metrics(label_smoothing: float):
    """`compute_metrics` for the SCIT Trainer: the loss parts as means over the held-out examples, from each one's
    (matching, opposite) mean log-probability, so that nll + contrast is the evaluation's loss."""

    def metrics(prediction) -> dict[str, float]:
        batches = prediction.predictions  # a list of per-batch arrays with `eval_do_concat_batches: false`
        batches = batches if isinstance(batches, list) else [batches]
        lp = torch.cat([torch.as_tensor(b, dtype=torch.float64) for b in batches])
        match, other = lp[:, 0], lp[:, 1]
        d = match - other
        return {
            "nll": -match.mean().item(),
            "contrast": (scit_loss(match, other, label_smoothing) + match).mean().item(),
            "contrast_accuracy": (d > 0).double().mean().item(),
            "logprob_margin": d.mean().item(),
        }

    return metrics


def _trainer_class():
    from transformers import Trainer

    class SCITTrainer(Trainer):
        """Trainer whose loss is the SCIT objective (set `label_smoothing` after construction). Its logs split the
        loss into `nll` (mean response NLL per token under the matching instruction) and `contrast`, with
        `contrast_accuracy` (share of sequences likelier under the matching instruction) and `logprob_margin`
        (mean per-token log-probability matching minus opposite), averaged since the last log as TRL's DPO does.
        An evaluation logs the same parts as means over the held-out examples (`scit_metrics`), prefixed `eval_`."""

        label_smoothing: float = 0.2

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._parts: dict[str, list[float]] = defaultdict(list)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, replies = inputs["input_ids"], inputs["response_mask"]
            first = int(replies.int().argmax(1).min()) - 1  # the first position that predicts a reply token
            logits, at = logits_from(model, ids, inputs["attention_mask"], first, use_cache=False)
            lp = mean_response_logprob(logits, ids[:, at:], replies[:, at:])
            b = lp.shape[0] // 2
            match, other = lp[:b], lp[b:]
            loss = scit_loss(match, other, self.label_smoothing).mean()
            if model.training:
                with torch.no_grad():
                    d = (match - other).float()
                    self._parts["nll"].append(-match.mean().item())
                    self._parts["contrast"].append((loss + match.mean()).item())
                    self._parts["contrast_accuracy"].append((d > 0).float().mean().item())
                    self._parts["logprob_margin"].append(d.mean().item())
            return (loss, {"logits": logits, "logprobs": torch.stack([match, other], -1)}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """The SCIT loss of a held-out batch, and each example's (matching, opposite) mean log-probability for
            `scit_metrics` (gathered over the processes by the Trainer, which drops the last batch's repeats)."""
            with torch.no_grad():
                loss, outputs = self.compute_loss(model, self._prepare_inputs(inputs), return_outputs=True)
            logprobs = outputs["logprobs"].detach().float()
            return loss.detach(), logprobs, torch.zeros(len(logprobs), device=logprobs.device)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "eval_loss" in logs:  # an evaluation's log: the training parts wait for the next training log
                return super().log(logs, start_time)
            parts = {k: sum(v) / len(v) for k, v in self._parts.items() if v}
            if parts and self.args.world_size > 1:  # every process logs: the mean over them, as the loss is
                means = self.accelerator.reduce(torch.tensor(list(parts.values()), device=self.args.device), "mean")
                parts = dict(zip(parts, means.tolist()))
            logs.update(parts)
            self._parts.clear()
            super().log(logs, start_time)

    return SCITTrainer


def train_scit(
    cfg: RahfConfig, base: str, pairs: list[PreferencePair], out: Path, eval_pairs: list[PreferencePair] | None = None
) -> dict[str, float]:
    """Train the SCIT model from `base` and save it to `out` (full model, or a PEFT adapter with finetune=lora);
    returns its metrics on `eval_pairs` ({} without them)."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    revision = cfg.revision_of(base)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code, revision)
    model = load_model(base, train_dtype(cfg, cfg.finetune == "full"), cfg.trust_remote_code, revision=revision)
    args = training_args(TrainingArguments, cfg, out, cfg.instruct.train, **stage_defaults("instruct", cfg))
    if cfg.finetune == "lora":
        torch.manual_seed(args.seed)  # the adapter's random init comes before the Trainer seeds anything
        model = get_peft_model(model, lora_config(model, cfg.instruct.lora, revision=revision))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=ListDataset(scit_examples(tokenizer, pairs, cfg)),
        eval_dataset=ListDataset(scit_examples(tokenizer, eval_pairs, cfg)) if eval_pairs else None,
        data_collator=SCITCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        compute_metrics=scit_metrics(cfg.instruct.label_smoothing),
    )
    trainer.label_smoothing = cfg.instruct.label_smoothing
    held = run_trainer(trainer, "instruct")
    save_model(trainer.model, tokenizer, out, cfg.dtype if cfg.finetune == "full" else None)
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return held

"""Baseline `rlhf-ppo`: PPO against a reward model with a per-token KL penalty towards the SFT model.

TRL dropped PPOTrainer in 1.16, so this is a compact PPO following the same recipe. Each step samples one
response per prompt from the policy, scores the decoded (prompt, response) with the reward model (which
may use its own tokenizer), turns the score into per-token rewards (a KL penalty at every response token,
the score at the last one), estimates advantages with GAE and takes `ppo_epochs` passes of clipped
policy and value updates over shuffled minibatches with one AdamW optimizer.

With `ppo.save_steps`, the loop checkpoints every that many rollouts (policy weights, value head, optimizer and
random state, as safetensors; the step and log as JSON) and a run of the stage again resumes from the newest one,
ending with the weights of a run that never stopped.

The reference is the SFT model itself: the policy with its LoRA adapter disabled, or a frozen copy when
the whole model is fine-tuned. Values come from a linear head on the policy's last hidden state: a
value model initialised from the reward model (TRL's choice) could not read the policy's tokens when the
reward model has another tokenizer, and a head on the shared trunk costs no second model.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts import discard
from ..config import RahfConfig
from ..data import Message
from ..errors import DataError
from ..generate import decoding, own_settings, reply_text
from ..judges import RewardModelJudge
from ..models import load_model, load_tokenizer, outputs_from, reply_stop_ids, save_model
from ..stimuli import prompt_ids
from ..training import PPO_STATE, checkpoint_dir, checkpoint_step, last_checkpoint, lora_config, train_dtype


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1."""
    return (x * mask).sum() / mask.sum()


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` shifted and scaled to mean 0 and variance 1 over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards `[batch, response]`: -kl_coef * (log pi - log pi_ref), plus the score at the last token."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards


def penalized_scores(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Reward-model scores less `penalty` for each response that ran out of tokens before its stop token."""
    return scores if penalty is None else scores - penalty * (~has_eos).float()


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate, mean over response tokens, and the share of tokens where the clip binds."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(losses, clipped), mask), masked_mean((clipped > losses).float(), mask)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Half the larger of the squared errors of the new values and of the values kept within `clip` of the old."""
    kept = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (kept - returns) ** 2), mask)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (advantages + values) of `[batch, response]` rollouts.

    Positions where `mask` is 0 (after EOS) have no reward and no value, so nothing flows back from them.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def response_mask(responses: torch.Tensor, stops: Sequence[int]) -> torch.Tensor:
    """1 for each sampled token up to and including the first stop token (EOS, end of turn), 0 after it."""
    is_stop = torch.isin(responses, torch.tensor(list(stops), device=responses.device)).long()
    after_stop = (is_stop.cumsum(1) - is_stop) > 0
    return (~after_stop).float()


def forward(
    policy: nn.Module, head: nn.Linear, ids: torch.Tensor, attn: torch.Tensor, start: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and values `[batch, ids - start]` of the tokens from `start` on (left-padded `ids`)."""
    positions = (attn.cumsum(1) - 1).clamp(min=0)  # as generation numbers left-padded positions
    # the logits of the reply's positions only: over the prompt they would cost [batch, prompt, vocabulary]
    out, at = outputs_from(
        policy, ids, attn, start - 1, position_ids=positions, output_hidden_states=True, use_cache=False
    )
    logits = out.logits[:, start - 1 - at : -1].float() / temperature
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, start:, None]).squeeze(-1)
    values = head(out.hidden_states[-1][:, start - 1 : -1].float()).squeeze(-1)
    return logprobs, values


def policy_model(cfg: RahfConfig, base: str) -> nn.Module:
    """The SFT model to train: with a fresh, seeded LoRA adapter (`ppo.finetune: lora`) or whole."""
    torch.manual_seed(cfg.seed)
    revision = cfg.revision_of(base)
    model = load_model(base, train_dtype(cfg, cfg.ppo.finetune == "full"), cfg.trust_remote_code, revision=revision)
    if cfg.ppo.finetune == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, cfg.ppo.lora, revision=revision))
    return model


def _prompt_batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Prompt indices, `size` per step, walking through seeded shuffles of all prompts."""
    rng, queue = random.Random(seed), []
    while True:
        while len(queue) < size:
            order = list(range(n))
            rng.shuffle(order)
            queue += order
        yield queue[:size]
        queue = queue[size:]


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        attn[r, width - len(s) :] = 1
    return ids, attn


@torch.no_grad()
def _rollout(
    policy: nn.Module,
    ref: nn.Module | None,
    head: nn.Linear,
    tokenizer,
    judge: RewardModelJudge,
    prompts: list[list[Message]],
    encoded: list[list[int]],
    cfg: RahfConfig,
) -> dict:
    """Sample, score and evaluate one batch of prompts: the tensors a PPO step needs."""
    s, device, stops = cfg.ppo, next(policy.parameters()).device, reply_stop_ids(policy, tokenizer)
    ids, attn = _left_pad(encoded, tokenizer.pad_token_id)
    ids, attn, start = ids.to(device), attn.to(device), ids.shape[1]
    chunks = []
    for b in range(0, len(ids), s.minibatch_size):
        with own_settings(policy):
            gen = policy.generate(
                input_ids=ids[b : b + s.minibatch_size],
                attention_mask=attn[b : b + s.minibatch_size],
                max_new_tokens=s.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
                **decoding(s.temperature),
            )[:, start:]
        chunks.append(nn.functional.pad(gen, (0, s.max_new_tokens - gen.shape[1]), value=tokenizer.pad_token_id))
    responses = torch.cat(chunks)
    mask = response_mask(responses, stops)
    width = int(mask.sum(1).max())  # drop the columns that are padding in every response
    responses, mask = responses[:, :width], mask[:, :width]
    texts = [reply_text(tokenizer, r[m > 0].tolist(), stops) for r, m in zip(responses, mask)]  # as evaluated
    scores = torch.tensor(judge.score_many(prompts, texts), device=device)
    has_eos = (torch.isin(responses, torch.tensor(stops, device=device)) & (mask > 0)).any(1)

    full_ids, full_attn = torch.cat([ids, responses], 1), torch.cat([attn, mask.long()], 1)
    logprobs, values, ref_logprobs = [], [], []
    for b in range(0, len(ids), s.minibatch_size):
        batch = (full_ids[b : b + s.minibatch_size], full_attn[b : b + s.minibatch_size], start, s.temperature)
        lp, v = forward(policy, head, *batch)
        logprobs.append(lp)
        values.append(v)
        if ref is None:
            with policy.disable_adapter():
                ref_logprobs.append(forward(policy, head, *batch)[0])
        else:
            ref_logprobs.append(forward(ref, head, *batch)[0])
    return {
        "ids": full_ids,
        "attn": full_attn,
        "start": start,
        "mask": mask,
        "scores": scores,
        "has_eos": has_eos,
        "logprobs": torch.cat(logprobs) * mask,
        "ref_logprobs": torch.cat(ref_logprobs) * mask,
        "values": torch.cat(values) * mask,
    }


def _trainable(policy: nn.Module, head: nn.Linear) -> dict[str, nn.Parameter]:
    """The parameters PPO updates, by name: the policy's trainable ones (LoRA or all) and the value head's."""
    named = {f"policy.{n}": p for n, p in policy.named_parameters() if p.requires_grad}
    return named | {f"value_head.{n}": p for n, p in head.named_parameters()}


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Each parameter's place in `optimizer`'s state dict, by the parameter's id."""
    return {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}


def remove_leftovers(saves: Path) -> None:
    """Delete what a killed run of the loop left half-written (`.tmp`) or half-deleted (`.discarded-*`) in `saves`."""
    for leftover in saves.glob(".checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    saves: Path, step: int, steps: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, log: list
) -> Path:
    """Write `saves/checkpoint-<step>`: weights, optimizer and random state as safetensors, the step and log as JSON,
    into a temporary folder renamed into place when all are written (the rename is what makes it complete); then
    delete the older ones: only the newest is kept."""
    from safetensors.torch import save_file

    saves.mkdir(parents=True, exist_ok=True)
    final = saves / f"checkpoint-{step}"
    tmp = saves / f".{final.name}.{os.getpid()}-{time.time_ns()}.tmp"
    index = _param_index(optimizer)
    names = {index[id(p)]: name for name, p in params.items()}
    state = {f"{names[i]}/{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    try:
        tmp.mkdir()
        save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp / "weights.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng_state.safetensors"))
        (tmp / PPO_STATE).write_text(json.dumps({"global_step": step, "max_steps": steps, "log_history": log}))
        if final.exists():  # left by a run whose deletion of it was cut short
            discard(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in saves.glob("checkpoint-*"):
        if old != final:
            discard(old)
    return final


def load_checkpoint(checkpoint: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> list[dict]:
    """Put the weights, optimizer and random state of `checkpoint` back; returns its log, one entry per step done."""
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "weights.safetensors"))
    if weights.keys() != params.keys():
        raise DataError(f"{checkpoint}: its weights are not those of this PPO run's policy; delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    index, state = _param_index(optimizer), {}
    for key, value in load_file(str(checkpoint / "optimizer.safetensors")).items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[id(params[name])], {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    rng = load_file(str(checkpoint / "rng_state.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():  # the devices it saved that are visible now
        for i in range(min(torch.cuda.device_count(), sum(k.startswith("cuda.") for k in rng))):
            torch.cuda.set_rng_state(rng[f"cuda.{i}"], i)
    return json.loads((checkpoint / PPO_STATE).read_text())["log_history"]


def ppo_loop(
    cfg: RahfConfig,
    policy: nn.Module,
    tokenizer,
    judge: RewardModelJudge,
    prompts: list[list[Message]],
    saves: Path | None = None,
) -> list[dict]:
    """Train `policy` in place for `cfg.ppo.steps` rollouts; one log dict per step.

    `saves`: the folder to resume from (its newest checkpoint, when made for as many steps) and, with
    `ppo.save_steps`, to checkpoint into. Nothing else of the run it came from is checked here: `rahf run` keeps the
    folder only for the same inputs and settings."""
    s = cfg.ppo
    torch.manual_seed(cfg.seed)
    device = next(policy.parameters()).device
    ref = None if s.finetune == "lora" else copy.deepcopy(policy).requires_grad_(False)  # None: adapter disabled
    head = nn.Linear(policy.config.get_text_config().hidden_size, 1, device=device)  # multimodal: the LM's
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    params = _trainable(policy, head)
    optimizer = torch.optim.AdamW(params.values(), lr=s.learning_rate, weight_decay=0.0)  # TRL's PPO: no decay
    policy.eval()  # no dropout: the ratio must compare the same function before and after updates
    encoded = [prompt_ids(tokenizer, p, cfg.data.max_prompt_length) for p in prompts]
    batches = _prompt_batches(len(prompts), s.rollout_size, cfg.seed)
    log: list[dict] = []
    if saves is not None:
        remove_leftovers(saves)
    last = last_checkpoint(saves) if saves is not None else None
    if last is not None and checkpoint_step(last)[1] != s.steps:
        print(f"[rahf] instruct: not resuming from {last}: it was made for other ppo.steps", flush=True)
    elif last is not None:
        log = load_checkpoint(last, params, optimizer)
        print(f"[rahf] instruct: resuming from {last} (step {len(log)} of {s.steps})", flush=True)
        for _ in log:  # the prompts those rollouts drew
            next(batches)
    bar = tqdm(range(len(log) + 1, s.steps + 1), desc="ppo", initial=len(log), total=s.steps)
    for step in bar:
        idx = next(batches)
        r = _rollout(policy, ref, head, tokenizer, judge, [prompts[i] for i in idx], [encoded[i] for i in idx], cfg)
        mask = r["mask"]
        scores = penalized_scores(r["scores"], r["has_eos"], s.missing_eos_penalty)
        rewards = token_rewards(r["logprobs"], r["ref_logprobs"], mask, scores, s.kl_coef)
        advantages, returns = gae(rewards, r["values"], mask, s.gamma, s.lam)
        advantages = whiten(advantages, mask)

        stats = {"policy_loss": [], "value_loss": [], "clip_fraction": []}
        for _ in range(s.ppo_epochs):
            for mb in torch.randperm(len(mask), device=device).split(s.minibatch_size):
                m = mask[mb]
                logprobs, values = forward(policy, head, r["ids"][mb], r["attn"][mb], r["start"], s.temperature)
                policy_loss, clip_fraction = clipped_policy_loss(
                    logprobs, r["logprobs"][mb], advantages[mb], m, s.clip_range
                )
                value_loss = clipped_value_loss(values, r["values"][mb], returns[mb], m, s.clip_range_value)
                optimizer.zero_grad()
                (policy_loss + s.vf_coef * value_loss).backward()
                optimizer.step()
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["clip_fraction"].append(clip_fraction.item())

        entry = {
            "step": step,
            "score": r["scores"].mean().item(),
            "kl": ((r["logprobs"] - r["ref_logprobs"]) * mask).sum(1).mean().item(),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "response_length": mask.sum(1).mean().item(),
            "eos_fraction": r["has_eos"].float().mean().item(),
        }
        log.append(entry)
        bar.set_postfix(score=f"{entry['score']:.3f}", kl=f"{entry['kl']:.3f}")
        if saves is not None and s.save_steps and step % s.save_steps == 0 and step < s.steps:
            save_checkpoint(saves, step, s.steps, params, optimizer, log)
    return log


def train_ppo(cfg: RahfConfig, base: str, reward_model: str, prompts: list[list[Message]], out: Path) -> list[dict]:
    """PPO from the SFT model `base` against the reward model folder `reward_model`; the policy is saved to `out`.

    `out` then holds a PEFT adapter on `base` (LoRA) or a whole model, the tokenizer and `log_history.json`.
    """
    if not prompts:
        raise DataError("rlhf-ppo: no prompts to train on")
    out = Path(out)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code, cfg.revision_of(base))
    policy = policy_model(cfg, base)
    judge = RewardModelJudge.from_pretrained(
        reward_model,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision_of(reward_model),
        dtype=cfg.dtype,
        batch_size=cfg.ppo.minibatch_size,
        max_length=cfg.reward.max_length,
    )
    saves = checkpoint_dir(out)
    log = ppo_loop(cfg, policy, tokenizer, judge, prompts, saves)
    if saves == out / "checkpoints":  # a library call's (`rahf run` removes its own folder beside the artifact)
        shutil.rmtree(saves, ignore_errors=True)
    save_model(policy, tokenizer, out, cfg.dtype if cfg.ppo.finetune == "full" else None)
    (out / "log_history.json").write_text(json.dumps(log, indent=1))
    return log

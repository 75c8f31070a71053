"""Autoregressive decoding for eval and `python -m titanmem.generate`: greedy or nucleus (top-p) sampling.

The model has no padding mask and no KV cache, so prompts are batched only with prompts of the same token length, and
each new token re-runs the forward over the whole prefix. Eval prompts are short (tens of tokens), so this costs
little and keeps the model code free of inference-only paths. Under a sharded model every rank must call this with the
same prompts: the forward passes are collective.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from titanmem.utils import autocast


def pick_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: the argmax at temperature 0, else a sample from the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass before it is below top_p: the most likely token is always kept.
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    device: torch.device,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; cut after the first end-of-text token, which is dropped).
    `vocab_size` limits the choice to the tokenizer's ids (the model's output is padded beyond them)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        by_length[len(prompt)].append(index)
    outputs: list[list[int]] = [[] for _ in prompts]
    for length in sorted(by_length):
        members = by_length[length]
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            tokens = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
            finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                with autocast(device, autocast_dtype):
                    logits = model(tokens)[:, -1, :vocab_size].float()
                next_tokens = pick_next_token(logits, temperature, top_p, generator)
                next_tokens = torch.where(finished, torch.full_like(next_tokens, eos_id), next_tokens)
                tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
                finished |= next_tokens == eos_id
                if bool(finished.all()):
                    break
            for row, index in enumerate(batch):
                new = tokens[row, length:].tolist()
                outputs[index] = new[: new.index(eos_id)] if eos_id in new else new
    return outputs

"""Sampling a continuation by recomputing the whole prefix at each step."""
from __future__ import annotations

import torch

from unetlm.model.tokens import BOS, encode


@torch.no_grad()
def generate(
    model,
    prompt: bytes,
    max_bytes: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_at_end: bool = True,
) -> bytes:
    """Continue ``prompt`` by up to ``max_bytes`` bytes; temperature 0 means greedy.

    The context is cropped to the model's sequence length; generation stops early when the
    model predicts the end of the document (BOS) and ``stop_at_end`` is set.
    """
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    tokens = encode(prompt).to(device)
    out = bytearray()
    seq_len = model.spec.seq_len
    for _ in range(max_bytes):
        context = tokens[-seq_len:].unsqueeze(0)
        logits = model(context).logits[0, -1].float()
        if not stop_at_end:
            logits[BOS] = float("-inf")
        logits = logits[: BOS + 1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen))
        if nxt == BOS:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([nxt], device=device)])
    return bytes(out)

"""Sampling continuations, cached (:class:`~unetlm.model.cascade.Cascade`) or by recompute.

Both modes share the sampling rule (:func:`sample_next`), the context rule and the order in
which random numbers are drawn, so with equal logits they produce equal bytes; the cached
mode's logits equal the full forward's (tests check both). The cached mode prefills each
context with one full forward, then steps one token at a time.

Context rule: a row's context is BOS + prompt + continuation, and it must fit the static shapes
of the full forward: at most ``model.seq_len`` tokens, and no stage holding more positions than
its ``max_len`` (the full forward would drop the boundaries past it, and a stage that stops
getting positions stops reading the text). When a prompt or a new token breaks either bound,
the context is cut to its longest suffix that fills at most half of every stage
(:func:`window`), and the model reads a context that starts mid-document, like a training row
that does not start with BOS. The cached mode then prefills the kept suffix (O(1) per byte
amortised); a cascade therefore never truncates a stage.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from unetlm.core.errors import RunError, UsageError
from unetlm.core.tokens import BOS, PAD
from unetlm.model.cascade import Cascade, stage_counts
from unetlm.recipe.schema import check_device


class Generated(list):
    """The continuations (one ``bytes`` per prompt) and a report on how they were made."""

    def __init__(self, texts: list[bytes], firing_rates: list[float], reasons: list[str], cached: bool) -> None:
        super().__init__(texts)
        self.firing_rates = firing_rates  # per stage: fraction of byte steps on which it ran
        self.reasons = reasons  # per prompt: "end" (model ended the document), "stop", "length"
        self.cached = cached


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """(B,) next tokens from logits (B, vocab_size): any id but PAD (BOS ends the document).

    temperature 0 is greedy (:func:`check_sampling` refuses negative ones); otherwise scale by 1/temperature, keep the ``top_k`` best
    (0: all), keep the smallest set of best tokens whose probability reaches ``top_p``, sample.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = logits.index_fill(-1, torch.tensor([PAD], device=logits.device), float("-inf"))
    if temperature <= 0:
        return logits.argmax(-1).cpu()
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, index = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before it already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_bytes: int, temperature: float, top_k: int, top_p: float, flag=lambda name: name) -> None:
    """UsageError naming the first option out of range; ``flag`` spells an option's name (e.g. as
    a command-line flag)."""
    limits = [
        ("max_bytes", max_bytes, max_bytes >= 0, "a number of bytes >= 0"),
        ("temperature", temperature, temperature >= 0, "a number >= 0 (0: greedy)"),
        ("top_k", top_k, top_k >= 0, "an integer >= 0 (0: all tokens)"),
        ("top_p", top_p, 0.0 < top_p <= 1.0, "a number in (0, 1] (1: all tokens)"),
    ]
    for name, value, ok, allowed in limits:
        if not ok:
            raise UsageError(f"{flag(name)} = {value!r} is invalid: expected {allowed}")


def check_ready(model) -> None:
    """RunError if ``model`` cannot generate here: a tokenized model without its trained
    tokenizer, or a component whose options need a device it is not on."""
    if model.tokenizer is None:
        raise RunError(
            "this model reads tokens of a tokenizer that training learns, and has none yet: train the "
            "recipe (unetlm train RECIPE) and generate from its checkpoint"
        )
    check_device(model.spec, next(model.parameters()).device.type, training=False)


def fits(model, context: list[int], share: float = 1.0) -> bool:
    """Whether ``context`` has at most ``share`` of ``seq_len`` tokens and fills at most ``share``
    of every stage's ``max_len`` in the full forward's layout."""
    limits = [max(1, int(share * n)) for n in model.lengths]
    if len(context) > limits[0]:
        return False
    device = next(model.parameters()).device
    counts = stage_counts(model, torch.tensor(context, device=device), demand=True)
    return all(c <= n for c, n in zip(counts, limits))


def window(model, context: list[int]) -> list[int]:
    """The longest suffix of ``context`` that fills at most half of ``seq_len`` and of every
    stage (at least its last token); bisection over where it starts."""
    lo, hi = max(0, len(context) - max(1, model.lengths[0] // 2)), len(context) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(model, context[mid:], 0.5):
            hi = mid
        else:
            lo = mid + 1
    return context[lo:]


def initial_context(model, prompt: bytes) -> list[int]:
    """BOS + the prompt, cut to its :func:`window` past ``seq_len`` tokens (a stage that overflows
    is found when the engines read it)."""
    context = [BOS] + model.tokenizer.encode(prompt).tolist()
    return context if len(context) <= model.lengths[0] else window(model, context)


def extend_context(model, context: list[int], token: int) -> bool:
    """Append ``token``; past ``seq_len`` tokens cut the context to its :func:`window`. True if cut."""
    context.append(token)
    if len(context) <= model.lengths[0]:
        return False
    context[:] = window(model, context)
    return True


class _Recompute:
    """Logits by the full forward over each context (the reference)."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def logits(self, contexts: list[list[int]], rows: list[int], dropped: bool) -> torch.Tensor:
        out = []
        for b in rows:
            result = self.model(torch.tensor([contexts[b]], device=self.device))
            if any(int(t[0]) for t in result.truncated):  # the newest token overflowed a stage
                contexts[b][:] = window(self.model, contexts[b])
                result = self.model(torch.tensor([contexts[b]], device=self.device))
            out.append(result.logits[0, -1])
        return torch.stack(out)

    def firing_rates(self, contexts: list[list[int]]) -> list[float]:
        counts = [stage_counts(self.model, torch.tensor(c, device=self.device)) for c in contexts if c]
        total = sum(c[0] for c in counts)
        return [sum(c[s] for c in counts) / max(total, 1) for s in range(len(self.model.lengths))]


class _Cached:
    """Logits from a :class:`Cascade`; after a context was cut, a new one prefilled with it."""

    def __init__(self, model, batch: int) -> None:
        self.model, self.batch = model, batch
        self.cascades: list[Cascade] = []

    def logits(self, contexts: list[list[int]], rows: list[int], dropped: bool) -> torch.Tensor:
        if self.cascades and not dropped:
            cascade = self.cascades[-1]
            tokens = [contexts[b][-1] if b in rows else 0 for b in range(self.batch)]
            logits = cascade.step(tokens, [b in rows for b in range(self.batch)])
            if not self._cut_overflowed(cascade, contexts, rows):
                return logits[rows]
        while True:  # twice at most: a cut context fills half of every stage
            cascade = Cascade(self.model, self.batch)
            self.cascades.append(cascade)
            logits = cascade.prefill([contexts[b] if b in rows else [] for b in range(self.batch)])
            if not self._cut_overflowed(cascade, contexts, rows):
                return logits[rows]

    def _cut_overflowed(self, cascade: Cascade, contexts: list[list[int]], rows: list[int]) -> bool:
        """Cut the contexts of rows whose newest tokens made a stage drop a boundary, as the
        recompute mode does; True if any."""
        overflowed = [b for b in rows if cascade.dropped[:, b].any()]
        for b in overflowed:
            contexts[b][:] = window(self.model, contexts[b])
        return bool(overflowed)

    def firing_rates(self, contexts: list[list[int]]) -> list[float]:
        ran = sum(c.ran for c in self.cascades)
        steps = sum(c.row_steps for c in self.cascades)
        return [float(r) / max(steps, 1) for r in ran] if self.cascades else []


class _StopFilter:
    """Cuts a row's continuation at the first stop string; holds back bytes that may start one."""

    def __init__(self, stops: list[bytes]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def cut(self, out: bytearray, new: int) -> bool:
        """If a stop string ends in the last ``new`` bytes of ``out``, cut ``out`` where the first one
        starts and return True."""
        ends = []
        for stop in self.stops:
            at = out.find(stop, max(0, len(out) - new - len(stop) + 1))
            if at >= 0:
                ends.append((at + len(stop), at))
        if ends:
            del out[min(ends)[1] :]
        return bool(ends)

    def safe(self, out: bytearray) -> int:
        """How many leading bytes of ``out`` can no longer become part of a stop string."""
        for k in range(min(len(out), self.longest - 1), 0, -1):
            tail = bytes(out[-k:])
            if any(s.startswith(tail) for s in self.stops):
                return len(out) - k
        return len(out)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[bytes],
    max_bytes: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[bytes | str] = (),
    cached: bool = True,
    on_bytes: Callable[[int, bytes], None] | None = None,
) -> Generated:
    """Continue each prompt by up to ``max_bytes`` bytes; returns a :class:`Generated` list.

    A row ends early when the model predicts the end of the document (BOS) or its continuation
    reaches a ``stop`` string (cut off, not included). ``on_bytes(index, new_bytes)`` receives
    each row's bytes as they become final (bytes that may start a stop string wait). ``cached``
    runs a :class:`~unetlm.model.cascade.Cascade` (NotImplementedError, naming the component,
    if one lacks the step API); ``cached=False`` recomputes the full forward at every byte.
    """
    if isinstance(prompts, (bytes, bytearray, str)):
        raise TypeError("prompts must be a list of bytes objects, e.g. [b'The ']")
    prompts = [bytes(p) for p in prompts]
    check_sampling(max_bytes, temperature, top_k, top_p)
    check_ready(model)
    stops = _StopFilter([s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in stop if len(s)])
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    tokenizer = model.tokenizer
    contexts = [initial_context(model, p) for p in prompts]
    outs = [bytearray() for _ in prompts]
    shown = [0] * len(prompts)
    reasons = ["length"] * len(prompts)
    live = list(range(len(prompts)))

    def emit(b: int, upto: int) -> None:
        if on_bytes is not None and upto > shown[b]:
            on_bytes(b, bytes(outs[b][shown[b] : upto]))
        shown[b] = max(shown[b], upto)

    def finish(b: int, reason: str) -> None:
        reasons[b] = reason
        live.remove(b)
        emit(b, len(outs[b]))

    was_training = model.training
    model.eval()
    try:
        engine = _Cached(model, len(prompts)) if cached else _Recompute(model)
        if max_bytes > 0 and live:
            first = engine.logits(contexts, live, dropped=True)
            logits = first.new_zeros(len(prompts), first.shape[-1])
            logits[live] = first
        for _ in range(max_bytes):
            if not live:
                break
            tokens = sample_next(logits, temperature, top_k, top_p, generator)  # all rows: same draws
            fed, dropped = [], False
            for b in list(live):
                tok = int(tokens[b])
                if tok == BOS:
                    finish(b, "end")
                    continue
                piece = tokenizer.piece(tok)
                outs[b] += piece
                if stops.cut(outs[b], len(piece)):
                    finish(b, "stop")
                elif len(outs[b]) >= max_bytes:
                    del outs[b][max_bytes:]
                    finish(b, "length")
                else:
                    dropped |= extend_context(model, contexts[b], tok)
                    fed.append(b)
                    emit(b, stops.safe(outs[b]))
            if fed:
                logits[fed] = engine.logits(contexts, fed, dropped)
        rates = engine.firing_rates(contexts) if max_bytes > 0 and prompts else []
    finally:
        model.train(was_training)
    return Generated([bytes(o) for o in outs], rates, reasons, cached)

"""The N-stage autoregressive U-Net. Read :meth:`UNet.forward` top to bottom.

bytes -> embed -> [encoder s -> pool]* -> middle -> [upsample + skip -> decoder s]* -> norm -> head

Logits at byte position t depend on bytes 0..t only: splitters are causal, pooling reads
positions at or before each boundary, upsampling hands a coarse vector only to positions at
or after its boundary, and every mixer is causal within its document.

Byte-level splitters (``model.splitters``) run on the CPU before the forward; learned ones
(``model.learned_splitters``, :mod:`unetlm.splitters.learned`) decide inside it from the
encoder output of their fine stage, and may only follow byte-level ones.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from unetlm.model.embedding import ByteEmbedding
from unetlm.core import layout
from unetlm.core.layout import Link, StageInfo, build_links, byte_stage
from unetlm.splitters.base import LearnedSplitter
from unetlm.splitters.splitting import split_batch
from unetlm.model.stack import Stack
from unetlm.core.tokens import BYTES, PAD, documents_from_tokens
from unetlm.recipe.schema import ModelSpec


@attrs.define
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab_size): logits[:, t] predicts the token after t
    loss: torch.Tensor | None  # mean cross-entropy in nats over non-PAD targets
    truncated: list[torch.Tensor]  # per transition (B,): boundaries dropped by max_len
    aux_loss: torch.Tensor | None  # learned splitters' weighted ratio losses (train on loss + aux_loss)
    bytes_per_chunk: list[torch.Tensor]  # per learned splitter: valid bytes / kept chunks (detached)
    positions: list[torch.Tensor]  # per transition (B,): valid positions of the coarser stage

    @property
    def objective(self) -> torch.Tensor:
        """What training minimises: ``loss`` plus ``aux_loss`` when there is one."""
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


class UNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        stages = spec.stages
        self.lengths = [s.max_len for s in stages]
        d0 = stages[0].dim
        self.embed = ByteEmbedding(d0, spec.embedding, spec.vocab_size)
        # bytes <-> ids; a trained tokenizer is attached by training or load_checkpoint (None until then)
        self.tokenizer = BYTES if spec.tokenizer is None else None
        self.encoders = nn.ModuleList(Stack(s.mixer, s.dim, s.layers) for s in stages[:-1])
        self.poolers = nn.ModuleList(
            s.pooler.build_class()(s.pooler.config, fine.dim, s.dim) for fine, s in zip(stages, stages[1:])
        )
        self.middle = Stack(stages[-1].mixer, stages[-1].dim, stages[-1].layers)
        self.upsamplers = nn.ModuleList(
            s.upsampler.build_class()(s.upsampler.config, s.dim, fine.dim) for fine, s in zip(stages, stages[1:])
        )
        self.decoders = nn.ModuleList(
            Stack(s.mixer, s.dim, s.layers if s.decoder_layers is None else s.decoder_layers) for s in stages[:-1]
        )
        classes = [s.splitter.build_class() for s in stages[1:]]  # recipes put learned ones last
        self.splitters = [cls(s.splitter.config) for cls, s in zip(classes, stages[1:]) if not cls.learned]
        self.learned_splitters = nn.ModuleList(
            cls(s.splitter.config, fine.dim) for cls, fine, s in zip(classes, stages, stages[1:]) if cls.learned
        )
        self.norm = nn.RMSNorm(d0, eps=1e-6)
        self.head = nn.Linear(d0, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.embed.table.weight
        for module in self.modules():
            self.init_module(module)

    def init_module(self, module: nn.Module) -> None:
        """(Re)initialise the parameters and buffers ``module`` holds itself (not its children's), in
        place: linear and embedding weights normal(0, ``init_std``) with zero biases, any other
        module's by its ``reset_parameters()``. The constructor runs it over :meth:`modules`; training
        runs it on each module's full-size parameters after building on the meta device."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.spec.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            reset = getattr(module, "reset_parameters", None)
            if reset is None:
                raise TypeError(
                    f"{type(module).__name__} holds parameters or buffers but has no reset_parameters() to "
                    f"initialise them"
                )
            reset()

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        """Each stage's parameters: the embedding, norm and head belong to stage 0, and a transition's
        splitter, pooler and upsampler to the coarser stage, whose recipe table names them."""
        n = len(self.spec.stages)
        modules: list[list[nn.Module]] = [[self.embed, self.norm, self.head]] + [[] for _ in range(n - 1)]
        modules[-1].append(self.middle)
        for s in range(n - 1):
            modules[s] += [self.encoders[s], self.decoders[s]]
            modules[s + 1] += [self.poolers[s], self.upsamplers[s]]
        for s, splitter in enumerate(self.learned):
            if splitter is not None:
                modules[s + 1].append(splitter)
        seen: set[int] = set()
        out = []
        for group in modules:
            params = [p for m in group for p in m.parameters() if id(p) not in seen and not seen.add(id(p))]
            out.append(params)
        return out

    def split(self, tokens: torch.Tensor, doc: torch.Tensor) -> list[torch.Tensor]:
        """Byte-level boundary masks (B, T), one per byte-level splitter (runs on the CPU)."""
        return split_batch(self.splitters, tokens, doc)

    def links(self, tokens: torch.Tensor, doc: torch.Tensor, masks: list[torch.Tensor]) -> list[Link]:
        return build_links(doc, tokens != PAD, masks, self.lengths[1:])

    @property
    def learned(self) -> list[LearnedSplitter | None]:
        """Per transition: its learned splitter, or None where a byte-level splitter decides."""
        return [None] * len(self.splitters) + list(self.learned_splitters)

    def init_state(self, batch: int, device, dtype) -> dict:
        """Fresh step states of every part (:mod:`unetlm.core.step`), keyed as :meth:`forward`'s
        ``cache``: ("encoder", s), ("decoder", s), ("middle",), ("pooler", s), ("upsampler", s)
        and ("splitter", s) for learned splitters. A transition's parts get the fine stage's max_len."""
        state: dict = {("middle",): self.middle.init_state(batch, self.lengths[-1], device, dtype)}
        for s, splitter in enumerate(self.learned):
            parts = {"encoder": self.encoders[s], "decoder": self.decoders[s], "pooler": self.poolers[s],
                     "upsampler": self.upsamplers[s], "splitter": splitter}
            for name, part in parts.items():
                if part is not None:
                    state[(name, s)] = part.init_state(batch, self.lengths[s], device, dtype)
        return state

    def forward(
        self,
        tokens: torch.Tensor,
        doc: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> ModelOutput:
        """tokens (B, T) with T <= seq_len; doc (B, T) document ids (default: BOS starts one);
        masks: precomputed boundaries (default: run the splitters); targets (B, T) for a loss.
        cache: fresh step states from :meth:`init_state`, each part run by its ``prefill``;
        afterwards they hold the states after each row's tokens, and ``cache["links"]`` the links."""
        if tokens.shape[1] > self.lengths[0]:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.seq_len = {self.lengths[0]}")
        if doc is None:
            doc = documents_from_tokens(tokens)
        if masks is None:
            masks = self.split(tokens, doc)

        h, info = self.enter(tokens, doc)
        skips, links, chunkings = [], [], []
        for s, encoder in enumerate(self.encoders):
            h = _run(cache, ("encoder", s), encoder, h, info)
            skips.append(h)
            h, link, chunking = self.down(s, h, info, masks, cache)
            links.append(link)
            chunkings.append(chunking)
            info = link.coarse
        h = _run(cache, ("middle",), self.middle, h, info)
        for s in reversed(range(len(links))):
            h = self.up(s, h, links[s], chunkings[s], skips[s], cache)
            h = _run(cache, ("decoder", s), self.decoders[s], h, links[s].fine)
        logits, loss = self.finish(h, targets)
        if cache is not None:
            cache["links"] = links

        learned = [(s, ch) for s, ch in enumerate(chunkings) if ch is not None]
        ratio_losses = [self.learned[s].ratio_loss(ch, links[s].fine) for s, ch in learned]
        ratio_losses = [r for r in ratio_losses if r is not None]
        aux = torch.stack(ratio_losses).sum() if ratio_losses else None
        n_bytes = (tokens != PAD).sum()
        per_chunk = [(n_bytes / links[s].coarse.valid.sum().clamp(min=1)).detach() for s, _ in learned]
        positions = [link.coarse.valid.sum(1) for link in links]
        return ModelOutput(logits, loss, [link.truncated for link in links], aux, per_chunk, positions)

    # The parts of the forward between the mixer stacks; under FSDP2 unetlm.train.parallelize
    # compiles each (with the blocks) as a region of its own.

    def enter(self, tokens: torch.Tensor, doc: torch.Tensor) -> tuple[torch.Tensor, StageInfo]:
        """The byte stage's input (B, T, d) and its positions."""
        return self.embed(tokens, doc), byte_stage(doc, tokens != PAD)

    def down(self, s: int, h: torch.Tensor, info: StageInfo, masks: list[torch.Tensor], cache: dict | None):
        """Transition s down: the encoder output h (B, Lf, d) -> (pooled (B, Lc, d'), Link, Chunking or
        None); the link from the byte masks, or learned from h."""
        splitter = self.learned[s]
        if splitter is None:
            link, chunking = layout.link(info, masks[s], self.lengths[s + 1]), None
        else:
            chunking = _run(cache, ("splitter", s), splitter, h, info)
            link = layout.link_from_fine(info, chunking.boundary, self.lengths[s + 1])
        return _run(cache, ("pooler", s), self.poolers[s], h, link), link, chunking

    def up(self, s: int, h: torch.Tensor, link: Link, chunking, skip: torch.Tensor, cache: dict | None):
        """Transition s up: the coarse outputs h -> the fine decoder's input, skip + upsampled; learned
        chunks are smoothed first and carry the learned splitter's confidence."""
        splitter = self.learned[s]
        if splitter is not None:
            if cache is None:
                h = splitter.smooth(h, link, chunking)
            else:
                h, cache[("splitter", s)] = splitter.smooth_prefill(h, cache[("splitter", s)], link, chunking)
        up = _run(cache, ("upsampler", s), self.upsamplers[s], h, link, fine=skip)
        return skip + (up if splitter is None else up * splitter.confidence(chunking).to(up.dtype))

    def finish(self, h: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, mean cross-entropy against ``targets`` or None) of the byte stage's output h."""
        logits = self.head(self.norm(h))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)

    def generate(self, prompts: list[bytes], max_bytes: int, **options):
        """Continue each prompt; see :func:`unetlm.model.generate.generate` for the options."""
        from unetlm.model.generate import generate

        return generate(self, prompts, max_bytes, **options)


def _run(cache: dict | None, key: tuple, part: nn.Module, x, *args, **kwargs):
    """``part(x, *args)``; with a cache, ``part.prefill`` from the step state ``cache[key]``, which
    it replaces."""
    if cache is None:
        return part(x, *args, **kwargs)
    out, cache[key] = part.prefill(x, cache[key], *args, **kwargs)
    return out

"""The N-stage autoregressive U-Net. Read :meth:`UNet.forward` top to bottom.

bytes -> embed -> [encoder s -> pool]* -> middle -> [upsample + skip -> decoder s]* -> norm -> head

Logits at byte position t depend on bytes 0..t only: splitters are causal, pooling reads
positions at or before each boundary, upsampling hands a coarse vector only to positions at
or after its boundary, and every mixer is causal within its document.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from unetlm.model.embedding import ByteEmbedding
from unetlm.model.layout import Link, build_links, byte_stage
from unetlm.model.splitting import split_batch
from unetlm.model.stack import Stack
from unetlm.model.tokens import PAD, VOCAB, documents_from_tokens
from unetlm.recipe.schema import ModelSpec


@attrs.define
class ModelOutput:
    logits: torch.Tensor  # (B, T, VOCAB): logits[:, t] predicts the token after t
    loss: torch.Tensor | None  # mean cross-entropy in nats over non-PAD targets
    truncated: list[torch.Tensor]  # per transition (B,): boundaries dropped by max_len


class UNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        stages = spec.stages
        self.lengths = [s.max_len for s in stages]
        d0 = stages[0].dim
        self.embed = ByteEmbedding(d0)
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
        self.splitters = [s.splitter.build_class()(s.splitter.config) for s in stages[1:]]
        self.norm = nn.RMSNorm(d0, eps=1e-6)
        self.head = nn.Linear(d0, VOCAB, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.embed.table.weight
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.spec.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def split(self, tokens: torch.Tensor, doc: torch.Tensor) -> list[torch.Tensor]:
        """Byte-level boundary masks (B, T), one per stage after the first (runs on the CPU)."""
        return split_batch(self.splitters, tokens, doc)

    def links(self, tokens: torch.Tensor, doc: torch.Tensor, masks: list[torch.Tensor]) -> list[Link]:
        return build_links(doc, tokens != PAD, masks, self.lengths[1:])

    def forward(
        self,
        tokens: torch.Tensor,
        doc: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
    ) -> ModelOutput:
        """tokens (B, T) with T <= seq_len; doc (B, T) document ids (default: BOS starts one);
        masks: precomputed boundaries (default: run the splitters); targets (B, T) for a loss."""
        if tokens.shape[1] > self.lengths[0]:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.seq_len = {self.lengths[0]}")
        if doc is None:
            doc = documents_from_tokens(tokens)
        if masks is None:
            masks = self.split(tokens, doc)
        links = self.links(tokens, doc, masks)

        h = self.embed(tokens)
        skips = []
        for encoder, pool, link in zip(self.encoders, self.poolers, links):
            h = encoder(h, link.fine)
            skips.append(h)
            h = pool(h, link)
        h = self.middle(h, links[-1].coarse if links else byte_stage(doc, tokens != PAD))
        for decoder, upsample, link, skip in reversed(list(zip(self.decoders, self.upsamplers, links, skips))):
            h = decoder(skip + upsample(h, link), link.fine)
        logits = self.head(self.norm(h))

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)
        return ModelOutput(logits, loss, [link.truncated for link in links])

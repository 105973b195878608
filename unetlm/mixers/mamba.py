"""Mamba-2 block (state-space duality) in plain PyTorch, laid out like ``mamba_ssm``'s Mamba2.

One residual block: ``x + Mamba2(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))`` when
``mlp_ratio > 0``. Output t depends on inputs j <= t of its own document only: the causal
conv and the SSM state restart wherever ``info.doc`` changes. The chunked scan accumulates in
float32 (or wider), takes an initial state and returns the final one, so a prefill hands its
state to :meth:`MambaBlock.step`. With ``backend = "cuda"`` (or ``"auto"`` on a CUDA tensor
with ``mamba_ssm`` installed) the scan runs in ``mamba_ssm``'s kernels instead, and the causal
conv in ``causal_conv1d``'s kernel when that package is installed.

Memory: the chunked scan's intermediates (the q x q decay and score blocks of every chunk, the
per-head copies of B and C) are recomputed in the backward pass instead of kept, so what a
block saves for backward is linear in the sequence length with no chunk-size factor
(``tests/test_mamba.py`` counts the bytes). The recompute costs one more scan forward.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Literal, NamedTuple

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from unetlm.core.step import StepInfo
from unetlm.mixers.base import Mixer
from unetlm.mixers.mlp import SwiGLU, swiglu_hidden
from unetlm.core.layout import StageInfo
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import non_negative, positive

A_INIT_RANGE = (1.0, 16.0)  # as mamba_ssm: A = -uniform(1, 16) per head


@attrs.define
class MambaConfig:
    d_state: int = attrs.field(default=128, validator=positive)
    d_conv: int = attrs.field(default=4, validator=positive)
    expand: int = attrs.field(default=2, validator=positive)
    headdim: int = attrs.field(default=64, validator=positive)
    ngroups: int = attrs.field(default=1, validator=positive)
    chunk_size: int = attrs.field(default=64, validator=positive)
    dt_min: float = attrs.field(default=0.001, validator=positive)
    dt_max: float = attrs.field(default=0.1, validator=positive)
    dt_init_floor: float = attrs.field(default=1e-4, validator=positive)
    mlp_ratio: float = attrs.field(default=0.0, validator=non_negative)  # 0 = plain Mamba block
    backend: Literal["auto", "torch", "cuda"] = "auto"

    def check_shapes(self, path: str, dim: int, fine_dim: int) -> None:
        inner = self.expand * dim
        if inner % self.headdim:
            raise RecipeError(
                f"{path}.headdim = {self.headdim} is invalid: it must divide expand * dim = {inner}"
            )
        if (inner // self.headdim) % self.ngroups:
            raise RecipeError(
                f"{path}.ngroups = {self.ngroups} is invalid: it must divide the number of heads "
                f"{inner // self.headdim}"
            )
        if self.dt_min > self.dt_max:
            raise RecipeError(f"{path}.dt_min = {self.dt_min} is invalid: it exceeds dt_max = {self.dt_max}")

    def check_device(self, path: str, device_type: str, training: bool) -> None:
        """The 'cuda' backend runs mamba_ssm's kernels: a CUDA device and that package."""
        if self.backend != "cuda":
            return
        if device_type != "cuda":
            raise RecipeError(
                f"{path}.backend = 'cuda' is invalid on {device_type}: mamba_ssm's kernels need a CUDA device; "
                f"use 'auto' (the kernels on CUDA when installed, plain PyTorch elsewhere) or 'torch'"
            )
        if importlib.util.find_spec("mamba_ssm") is None:
            raise RecipeError(
                f"{path}.backend = 'cuda' needs the mamba_ssm package (pip install 'unetlm[mamba]'); "
                f"use 'auto' or 'torch' without it"
            )

    def mlp_hidden(self, dim: int) -> int:
        return swiglu_hidden(dim, self.mlp_ratio)


class MambaState(NamedTuple):
    """Recurrent cache, in mamba_ssm's layout."""

    conv: torch.Tensor  # (B, conv_dim, d_conv): the last d_conv conv inputs, newest last
    ssm: torch.Tensor  # (B, heads, headdim, d_state), float32 or wider


def segment_ids(doc: torch.Tensor) -> torch.Tensor:
    """(B, L) long: 0 at position 0, +1 wherever the document changes. Position 0 continues
    whatever state is handed in, so the ids match ``mamba_ssm``'s ``seq_idx`` convention."""
    change = F.pad((doc[:, 1:] != doc[:, :-1]).long(), (1, 0))
    return change.cumsum(1)


def causal_conv(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg: torch.Tensor, past: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv that does not reach across segments.

    u (B, L, C); weight (C, 1, k) as ``nn.Conv1d``; seg (B, L); past (B, C, k) the conv state
    (its last k - 1 inputs precede position 0, in segment 0). Returns the conv output
    (B, L, C) in u's dtype (also under autocast) and the new state: the last k inputs, zeroed
    where not in the last segment.
    """
    B, L, C = u.shape
    k = weight.shape[-1]
    weight = weight.to(u.dtype)
    full = torch.cat([rearrange(past[:, :, 1:], "b c k -> b k c").to(u.dtype), u], dim=1)  # (B, L + k - 1, C)
    full_seg = torch.cat([seg.new_zeros(B, k - 1), seg], dim=1)
    out = u.new_zeros(B, L, C) if bias is None else bias.to(u.dtype).expand(B, L, C)
    for i in range(k):  # tap i reads position t - (k - 1 - i)
        same = (full_seg[:, i : i + L] == seg).unsqueeze(-1)
        out = out + weight[:, 0, i] * (full[:, i : i + L] * same)
    return out, conv_tail(full, full_seg, seg, k)


def conv_tail(full: torch.Tensor, full_seg: torch.Tensor, seg: torch.Tensor, k: int) -> torch.Tensor:
    """The conv state after the last position: (B, C, k), inputs outside the last segment zeroed."""
    tail = full[:, -k:] * (full_seg[:, -k:] == seg[:, -1:]).unsqueeze(-1)  # L >= 1, so k entries exist
    return rearrange(tail, "b k c -> b c k")


def kernel_conv(conv_fn, u: torch.Tensor, weight: torch.Tensor, bias, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_conv` from an empty state in ``causal_conv1d``'s kernel (CUDA only, untested
    here): channel-last input, ``seq_idx`` restarts the conv at each segment."""
    k = weight.shape[-1]
    x = rearrange(u.contiguous(), "b l c -> b c l")  # channel-last: the layout seq_idx needs
    w = rearrange(weight, "c 1 k -> c k").to(u.dtype)
    out = rearrange(conv_fn(x, w, None if bias is None else bias.to(u.dtype), seq_idx=seg.to(torch.int32)), "b c l -> b l c")
    B = u.shape[0]
    full = torch.cat([u.new_zeros(B, k - 1, u.shape[-1]), u], dim=1)
    return out, conv_tail(full, torch.cat([seg.new_zeros(B, k - 1), seg], dim=1), seg, k)


def load_conv_kernel(u: torch.Tensor, backend: str):
    """``causal_conv1d_fn`` when it applies (installed; a CUDA tensor, or backend "cuda"), else None."""
    if backend == "torch" or (backend == "auto" and not u.is_cuda):
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the
    diagonal. Summed by masked cumsum, not by differences, so it stays exact in float32."""
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., i, j] = a[i]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = rep.masked_fill(~below, 0).cumsum(-2)
    on_or_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~on_or_below, float("-inf"))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seg: torch.Tensor,
    chunk: int,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan of h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t . h_t.

    x (b, l, h, p); dt (b, l, h) after softplus; A (h,) negative; B, C (b, l, g, n) with head i
    in group i // (h / g); seg (b, l) non-decreasing segment ids (the state restarts where the
    id changes; segment 0 continues ``initial`` (b, h, p, n)). The length is padded to a
    multiple of ``chunk`` (padding leaves the state unchanged: dt = 0). Returns y (b, l, h, p)
    and the final state (b, h, p, n), both in the accumulation dtype (float32 or wider), also
    under autocast. With autograd recording, only the inputs are kept for backward: the
    intermediates are recomputed there (:func:`torch.utils.checkpoint.checkpoint`).
    """
    with full_precision(x):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, initial)):
            return checkpoint(_chunked_scan, x, dt, A, B, C, seg, chunk, initial, use_reentrant=False)
        return _chunked_scan(x, dt, A, B, C, seg, chunk, initial)


def full_precision(t: torch.Tensor):
    """Autocast off: the scan's matmuls stay in the accumulation dtype."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _chunked_scan(x, dt, A, B, C, seg, chunk, initial):
    acc = torch.promote_types(x.dtype, torch.float32)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    pad = -l % chunk
    x, dt, B, C, A = (t.to(acc) for t in (x, dt, B, C, A))
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    B = repeat(B, "b (c q) g n -> b c q (g r) n", q=chunk, r=h // g)  # head i reads group i // r
    C = repeat(C, "b (c q) g n -> b c q (g r) n", q=chunk, r=h // g)
    X = rearrange(x * dt.unsqueeze(-1), "b (c q) h p -> b c q h p", q=chunk)
    dA = rearrange(dt * A, "b (c q) h -> b h c q", q=chunk)
    A_cum = dA.cumsum(-1)
    seg = rearrange(seg, "b (c q) -> b c q", q=chunk)

    # within each chunk: a causal, decayed "attention" C_t . B_s over the same segment
    same = (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(1)  # (b, 1, c, q, q)
    decay = torch.exp(segsum(dA)) * same
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # state contributed by each chunk at its end
    to_end = torch.exp(A_cum[..., -1:] - A_cum) * (seg == seg[:, :, -1:]).unsqueeze(1)
    states = torch.einsum("bclhn,bclhp->bchpn", B * rearrange(to_end, "b h c q -> b c q h 1"), X)

    # pass states from chunk to chunk (entry 0 = the initial state, in segment 0)
    if initial is None:
        initial = X.new_zeros(b, h, p, n)
    states = torch.cat([initial.to(acc).unsqueeze(1), states], dim=1)
    end_seg = torch.cat([seg.new_zeros(b, 1), seg[:, :, -1]], dim=1)  # (b, c + 1)
    same_end = (end_seg.unsqueeze(-1) == end_seg.unsqueeze(-2)).unsqueeze(1)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0)))) * same_end  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # output read from the state entering each chunk
    from_start = torch.exp(A_cum) * (seg == end_seg[:, :-1].unsqueeze(-1)).unsqueeze(1)
    y = y + torch.einsum("bclhn,bchpn->bclhp", C * rearrange(from_start, "b h c q -> b c q h 1"), entering)
    return rearrange(y, "b c q h p -> b (c q) h p")[:, :l], final


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, normalised per group (mamba_ssm's norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.group_size = group_size
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(y.dtype, torch.float32)
        g = y.to(acc) * F.silu(z.to(acc))
        groups = g.unflatten(-1, (-1, self.group_size))
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (groups.flatten(-2) * self.weight.to(acc)).to(y.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer (no norm, no residual): u (B, L, d) -> (B, L, d)."""

    def __init__(self, config: MambaConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.d_inner = config.expand * dim
        self.heads = self.d_inner // config.headdim
        self.d_state, self.ngroups, self.headdim = config.d_state, config.ngroups, config.headdim
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + self.heads, bias=False)  # z, x, B, C, dt
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim, padding=config.d_conv - 1, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.reset_parameters()
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """dt log-uniform in [dt_min, dt_max] (floored) held as softplus^-1(dt); A uniform in A_INIT_RANGE; D ones."""
        config = self.config
        low, high = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(self.dt_bias.uniform_(low, high)).clamp(min=config.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(self.A_log.uniform_(*A_INIT_RANGE).log())
        nn.init.ones_(self.D)

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.heads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        return (
            x.unflatten(-1, (self.heads, self.headdim)),
            B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)),
        )

    def init_state(self, batch: int, device, dtype) -> MambaState:
        return MambaState(
            conv=torch.zeros(batch, self.conv_dim, self.config.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(
                batch, self.heads, self.headdim, self.d_state, device=device,
                dtype=torch.promote_types(dtype, torch.float32),
            ),
        )

    def use_kernels(self, u: torch.Tensor) -> bool:
        backend = self.config.backend
        if backend == "torch":
            return False
        if backend == "cuda":
            return True
        if not u.is_cuda:
            return False
        try:
            import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
        except ImportError:
            return False
        return True

    def forward(self, u: torch.Tensor, seg: torch.Tensor, state: MambaState | None = None):
        """u (B, L, d), seg (B, L) from :func:`segment_ids` -> (out (B, L, d), final state)."""
        batch, L, _ = u.shape
        conv_fn = load_conv_kernel(u, self.config.backend) if state is None else None
        if state is None:
            state = self.init_state(batch, u.device, u.dtype)
        z, xbc, dt = self._split(self.in_proj(u))
        if conv_fn is not None:
            xbc, conv_state = kernel_conv(conv_fn, xbc, self.conv1d.weight, self.conv1d.bias, seg)
        else:
            xbc, conv_state = causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, seg, state.conv)
        x, B, C = self._split_xbc(F.silu(xbc))
        acc = torch.promote_types(u.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(acc))
        if self.use_kernels(u):
            y, ssm_state = kernel_scan(x, dt, A, B, C, seg, self, state.ssm)
        else:
            dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))
            y, ssm_state = ssd_scan(x, dt, A, B, C, seg, self.config.chunk_size, state.ssm)
            y = y + x.to(acc) * self.D.to(acc)[:, None]
        y = self.norm(y.flatten(-2).to(u.dtype), z)
        return self.out_proj(y), MambaState(conv_state, ssm_state.to(state.ssm.dtype))

    def step(self, u: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One position u (B, d) continuing the document of ``state``."""
        z, xbc, dt = self._split(self.in_proj(u))
        conv = torch.cat([state.conv[:, :, 1:], xbc.unsqueeze(-1).to(state.conv.dtype)], dim=-1)
        xbc = (conv * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias
        x, B, C = self._split_xbc(F.silu(xbc).to(u.dtype))
        acc = state.ssm.dtype
        x, B, C = x.to(acc), B.to(acc), C.to(acc)
        rep = self.heads // self.ngroups
        B, C = B.repeat_interleave(rep, dim=1), C.repeat_interleave(rep, dim=1)  # (B, heads, n)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, heads)
        decay = torch.exp(dt * -torch.exp(self.A_log.to(acc)))
        ssm = state.ssm * decay[..., None, None] + (dt[..., None] * x).unsqueeze(-1) * B.unsqueeze(-2)
        with full_precision(ssm):
            y = torch.einsum("bhpn,bhn->bhp", ssm, C) + x * self.D.to(acc)[:, None]
        y = self.norm(y.flatten(-2).to(u.dtype), z)
        return self.out_proj(y), MambaState(conv, ssm)


def kernel_scan(x, dt, A, B, C, seg, mixer: Mamba2, initial):
    """The scan (softplus, D skip included) in mamba_ssm's fused kernels; same contract as
    :func:`ssd_scan` plus the D term. ``seq_idx`` follows :func:`segment_ids`."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as exc:
        raise RuntimeError(
            "mixer backend 'cuda' needs the mamba_ssm package (pip install 'unetlm[mamba]' on a CUDA "
            f"machine); use backend 'torch' or 'auto' otherwise ({exc})"
        ) from exc
    y, final = mamba_chunk_scan_combined(
        x, dt, A, B, C, mixer.config.chunk_size,
        D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True,
        initial_states=initial.float(), seq_idx=seg.to(torch.int32), return_final_states=True,
    )
    return y, final


SEGMENTS = ("mamba-segments",)


class MambaBlock(Mixer):
    """Pre-RMSNorm Mamba-2 residual block (names as mamba_ssm's Block: norm, mixer, norm2, mlp)."""

    Config = MambaConfig
    examples = [
        {"d_state": 8, "headdim": 8, "chunk_size": 4},
        {"d_state": 4, "headdim": 4, "ngroups": 2, "chunk_size": 3, "d_conv": 2, "mlp_ratio": 2.0},
    ]

    def __init__(self, config: MambaConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = Mamba2(config, dim)
        if config.mlp_ratio > 0:
            self.norm2 = nn.RMSNorm(dim, eps=1e-5)
            self.mlp = SwiGLU(dim, config.mlp_hidden(dim))

    def prepare(self, info: StageInfo, memo: dict) -> None:
        if SEGMENTS not in memo:
            memo[SEGMENTS] = segment_ids(info.doc)

    def forward(self, x: torch.Tensor, info: StageInfo, memo: dict) -> torch.Tensor:
        return self._run(x, memo[SEGMENTS] if SEGMENTS in memo else segment_ids(info.doc), None)[0]

    def forward_with_state(
        self, x: torch.Tensor, info: StageInfo, state: MambaState | None = None
    ) -> tuple[torch.Tensor, MambaState]:
        """Like ``forward``, starting from ``state`` (which continues the document at position
        0) and returning the state after the last position (for a prefill: no padding)."""
        return self._run(x, segment_ids(info.doc), state)

    def _run(self, x, seg, state):
        out, state = self.mixer(self.norm(x), seg, state)
        return self._mlp(x + out), state

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.mlp_ratio > 0:
            x = x + self.mlp(self.norm2(x))
        return x

    def init_state(self, batch: int, max_len: int, device, dtype) -> MambaState:
        return self.mixer.init_state(batch, device, dtype)

    def step(self, x: torch.Tensor, state: MambaState, info: StepInfo) -> tuple[torch.Tensor, MambaState]:
        """One position per row; returns a new state (nothing is updated in place)."""
        out, state = self.mixer.step(self.norm(x), state)
        return self._mlp(x + out), state

    def prefill(self, x: torch.Tensor, state: MambaState, info: StageInfo) -> tuple[torch.Tensor, MambaState]:
        """One chunked scan per row over its valid positions (rows end at different places, and
        the scan hands over the state after the last position). Padding outputs are zeros."""
        y, rows = torch.zeros_like(x), []
        for b, n in enumerate(info.valid.sum(1).tolist()):
            row = MambaState(state.conv[b : b + 1], state.ssm[b : b + 1])
            if n:
                seen = StageInfo(info.byte_pos[b : b + 1, :n], info.valid[b : b + 1, :n], info.doc[b : b + 1, :n])
                out, row = self.forward_with_state(x[b : b + 1, :n], seen, row)
                y[b, :n] = out[0]
            rows.append(row)
        return y, MambaState(*(torch.cat(parts) for parts in zip(*rows)))

    def forward_flops(self, length: int) -> float:
        """Matmul FLOPs (2 per multiply-add) of one sequence, as the chunked scan computes them.

        With d = dim, E = expand*d, H heads of P = headdim, N = d_state, G = ngroups,
        k = d_conv, Q = chunk_size, Lp = length rounded up to a multiple of Q, c = Lp / Q:
          in_proj 2 L d (2E + 2GN + H) + conv 2 L (E + 2GN) k + out_proj 2 L E d
          + scan 2 H [Lp Q N (C.B) + Lp Q P (scores.X) + 2 Lp P N (chunk states, state
          read-out) + (c + 1)^2 P N (state passing between chunks, done as a matrix)]
          + SwiGLU (:meth:`SwiGLU.forward_flops`) when mlp_ratio > 0.
        Norms, gates, softplus and exponentials are elementwise and not counted.
        """
        cfg, m = self.config, self.mixer
        d, E, H, P, N = self.dim, m.d_inner, m.heads, cfg.headdim, cfg.d_state
        L, Q = length, cfg.chunk_size
        Lp = -(-L // Q) * Q
        c = Lp // Q
        proj = 2.0 * L * d * (2 * E + 2 * cfg.ngroups * N + H) + 2.0 * L * E * d
        conv = 2.0 * L * m.conv_dim * cfg.d_conv
        scan = 2.0 * H * (Lp * Q * N + Lp * Q * P + 2 * Lp * P * N + (c + 1) ** 2 * P * N)
        mlp = self.mlp.forward_flops(L) if cfg.mlp_ratio > 0 else 0.0
        return proj + conv + scan + mlp

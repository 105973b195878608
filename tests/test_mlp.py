"""One SwiGLU serves the attention and Mamba blocks: its FLOP formula is what torch executes."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from unetlm.mixers.attention import AttentionBlock, AttentionConfig
from unetlm.mixers.mamba import MambaBlock, MambaConfig
from unetlm.mixers.mlp import SwiGLU, swiglu_hidden


def test_swiglu_flops_and_layout():
    mlp = SwiGLU(24, swiglu_hidden(24, 4.0))
    assert mlp.hidden == 64 and swiglu_hidden(4, 1.0) == 8  # 2/3 * 4 * 24, rounded up to 8; at least 8
    x = torch.randn(2, 5, 24)
    with FlopCounterMode(display=False) as counter:
        y = mlp(x)
    assert mlp.forward_flops(2 * 5) == counter.get_total_flops()
    value, gate = mlp.fc1(x).chunk(2, dim=-1)  # fc1 gives (value, gate), as mamba_ssm's GatedMLP
    torch.testing.assert_close(y, mlp.fc2(value * torch.nn.functional.silu(gate)))


def test_attention_and_mamba_blocks_share_it():
    attention = AttentionBlock(AttentionConfig(head_dim=8, mlp_ratio=3.0), 16)
    mamba = MambaBlock(MambaConfig(headdim=8, d_state=8, mlp_ratio=3.0), 16)
    assert type(attention.mlp) is type(mamba.mlp) is SwiGLU
    assert attention.mlp.hidden == mamba.mlp.hidden == swiglu_hidden(16, 3.0)


def test_rounding_to_a_multiple_gives_lingua_feedforward_widths():
    """lingua's FeedForward: int(2 * 4 * dim / 3), rounded up to ``multiple_of`` (256 in its AU-Net
    configurations); at the AU-Net recipes' widths."""
    widths = {dim: swiglu_hidden(dim, 4.0, 256) for dim in (512, 1024, 2048, 3072, 3456, 4608)}
    assert widths == {512: 1536, 1024: 2816, 2048: 5632, 3072: 8192, 3456: 9216, 4608: 12288}
    assert swiglu_hidden(2048, 4.0) == 5464  # the default multiple, 8
    block = AttentionBlock(AttentionConfig(head_dim=8, multiple_of=256), 512)
    assert block.mlp.hidden == block.config.mlp_hidden(512) == 1536

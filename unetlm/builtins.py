"""The built-in components, registered through the same hook as any third-party plugin."""
from unetlm.plugins import hookimpl


@hookimpl
def unetlm_register(registry):
    add = registry.add
    add("splitter", "regex", "unetlm.splitters.regex:RegexSplitter",
        "boundaries from a byte regex per stage, or the AU-Net presets word/word2/word4")
    add("splitter", "fixed-window", "unetlm.splitters.fixed_window:FixedWindowSplitter",
        "a boundary every k positions of the finer stage")
    add("pooler", "select", "unetlm.poolers.select:SelectPooler",
        "the fine vector at each boundary, linearly mapped to the coarse dim")
    add("pooler", "mean", "unetlm.poolers.mean:MeanPooler",
        "mean of the segment that ends at each boundary, linearly mapped")
    add("upsampler", "repeat", "unetlm.upsamplers.repeat:RepeatUpsampler",
        "copy the coarse vector over its segment (dims must match)")
    add("upsampler", "linear", "unetlm.upsamplers.linear:LinearUpsampler",
        "one shared linear map from coarse to fine dim")
    add("upsampler", "multi-linear", "unetlm.upsamplers.multi_linear:MultiLinearUpsampler",
        "a shared map plus one linear map per offset inside the segment (AU-Net)")
    add("mixer", "attention", "unetlm.mixers.attention:AttentionBlock",
        "causal RoPE attention + SwiGLU MLP, pre-RMSNorm; full or sliding window")

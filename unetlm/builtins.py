"""The built-in components, registered through the same hook as any third-party plugin."""
from unetlm.plugins import hookimpl


@hookimpl
def unetlm_register(registry):
    registry.set_trained_models("unetlm.checkpoint.trained:TrainedModels")  # entropy splitters' byte models
    add = registry.add
    add("splitter", "regex", "unetlm.splitters.regex:RegexSplitter",
        "boundaries from a byte regex per stage, or word presets: lingua-word, -word2, -word4 (AU-Net's), word/2/4")
    add("splitter", "fixed-window", "unetlm.splitters.fixed_window:FixedWindowSplitter",
        "a boundary every k positions of the finer stage")
    add("splitter", "space", "unetlm.splitters.space:SpaceSplitter",
        "a boundary at each space-like byte that follows a non-space-like one (SpaceByte, BLT)")
    add("splitter", "entropy", "unetlm.splitters.entropy:EntropySplitter",
        "a patch ends where a small byte LM's next-byte entropy crosses a threshold (BLT)")
    add("splitter", "learned", "unetlm.splitters.learned:DynamicChunking",
        "boundaries predicted from the stage's hidden states, trained end to end (H-Net dynamic chunking)")
    add("pooler", "select", "unetlm.poolers.select:SelectPooler",
        "the fine vector at each boundary, linearly mapped to the coarse dim")
    add("pooler", "mean", "unetlm.poolers.mean:MeanPooler",
        "mean of the segment that ends at each boundary, linearly mapped")
    add("pooler", "cross-attention", "unetlm.poolers.cross_attention:CrossAttentionPooler",
        "patch queries (from the boundary vector) attend to the bytes of their own patch (BLT)")
    add("pooler", "concat", "unetlm.poolers.concat:ConcatPooler",
        "the last `size` vectors of the patch, concatenated and linearly mapped (MegaByte, Hourglass)")
    add("upsampler", "repeat", "unetlm.upsamplers.repeat:RepeatUpsampler",
        "copy the coarse vector over its segment (dims must match)")
    add("upsampler", "linear", "unetlm.upsamplers.linear:LinearUpsampler",
        "one shared linear map from coarse to fine dim")
    add("upsampler", "multi-linear", "unetlm.upsamplers.multi_linear:MultiLinearUpsampler",
        "a shared map plus one linear map per offset inside the segment (AU-Net)")
    add("upsampler", "cross-attention", "unetlm.upsamplers.cross_attention:CrossAttentionUpsampler",
        "each byte attends to the newest coarse vectors it may see (BLT's decoder)")
    add("mixer", "attention", "unetlm.mixers.attention:AttentionBlock",
        "causal RoPE attention + SwiGLU MLP, pre-RMSNorm; full or sliding window")
    add("mixer", "mamba", "unetlm.mixers.mamba:MambaBlock",
        "Mamba-2 (SSD) block, pre-RMSNorm, optional SwiGLU MLP; state restarts at each document")

"""BLT, SpaceByte, MegaByte and Hourglass as recipes: their components, their shifts, and a
short training run of each tiny recipe on real text.

The registry-wide tests (tests/test_splitters.py, tests/test_causality.py) cover the new
splitters, poolers and upsamplers through their ``examples``; here are the properties
specific to each system.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import unetlm
from entropy_example import ensure_example_checkpoint, with_example_checkpoint
from unetlm.model.embedding import HASH_BASE, HASH_MOD, ByteEmbedding, ngram_hashes
from unetlm.core.layout import build_links
from unetlm.core.tokens import BOS, PAD, documents_from_tokens, encode
from unetlm.poolers.base import Pooler
from unetlm.recipe import RecipeError, recipe_from_dict
from unetlm.recipe.schema import EmbeddingSpec
from unetlm.recipe.structure import structure
from unetlm.splitters.entropy import EntropyConfig, EntropySplitter, entropy_boundaries
from unetlm.splitters.space import SpaceSplitter

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (the shared corpora are not here)"
)


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


def marks(mask) -> list[int]:
    return np.flatnonzero(mask).tolist()


# ------------------------------------------------------------------------------ space splitter


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"Hi, you 2x!", [0, 2, 7, 10]),  # first byte; ',' after a letter; ' ' after 'u'; '!'
        ("a\u00e9 b".encode(), [0, 1, 3]),  # the UTF-8 lead byte 0xC3 is space-like, 0xA9 is not
        (b"  a", [0]),  # a run of spaces marks its first byte only
        (b"a\n\nb c", [0, 1, 4]),
        (b"abc123", [0]),
        ("\u4e2d\u6587".encode(), [0, 3]),  # each CJK character opens with a lead byte
    ],
)
def test_space_splitter_on_hand_examples(data, expected):
    splitter = SpaceSplitter(None)
    assert marks(splitter.boundaries(data, ones(len(data)))) == expected
    state = splitter.start()
    assert [t for t, byte in enumerate(data) if state.push(byte, True)] == expected
    parent = np.zeros(len(data), dtype=bool)
    parent[expected[-1]] = True
    assert marks(splitter.boundaries(data, parent)) == [expected[-1]]


# ------------------------------------------------------------------------------ hash n-grams


def reference_hash(tokens: list[int], doc: list[int], t: int, n: int, buckets: int) -> int:
    total = 0
    for k in range(n):
        inside = t - k >= 0 and doc[t - k] == doc[t] and tokens[t - k] != PAD
        total += (tokens[t - k] + 1 if inside else 0) * HASH_BASE**k
    return total % HASH_MOD % buckets


def packed(*docs: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.cat([encode(d) for d in docs]).unsqueeze(0)
    return tokens, documents_from_tokens(tokens)


def test_ngram_hashes_match_the_polynomial_definition():
    tokens, doc = packed(b"abcabcab", b"xyz")
    sizes, buckets = [2, 3, 8], 1009
    got = ngram_hashes(tokens, doc, sizes, buckets)
    tok, dc = tokens[0].tolist(), doc[0].tolist()
    for n, ids in zip(sizes, got):
        assert ids[0].tolist() == [reference_hash(tok, dc, t, n, buckets) for t in range(len(tok))]
    three = got[1][0]
    assert three[3] == three[6]  # "abc" twice in one document: the same bucket
    assert three[3] != three[4]  # "abc" and "bca" differ


def test_hash_embedding_reads_only_the_ngram_of_its_own_document():
    torch.manual_seed(0)
    emb = ByteEmbedding(8, EmbeddingSpec(hash_ngrams=[3, 5], hash_buckets=1 << 20)).double()
    tokens, doc = packed(b"the cat sat", b"on a mat")
    T = tokens.shape[1]
    second = int((tokens[0] == BOS).nonzero()[1])
    base = emb(tokens, doc)
    for p in range(1, T):
        if tokens[0, p] == BOS:
            continue
        changed = tokens.clone()
        changed[0, p] = (changed[0, p] + 1) % 256
        diff = (emb(changed, doc) - base).abs().amax(-1)[0]
        end = second if p < second else T
        assert diff[:p].max() == 0, f"position < {p} reads token {p}"
        assert (diff[min(p + 5, end):] == 0).all(), f"token {p} reaches past its 5-gram or document"
        assert (diff[p : min(p + 5, end)] > 0).all(), f"the n-grams ending after {p} ignore token {p}"


def test_embedding_spec_is_checked():
    stage = {"dim": 16, "layers": 1, "mixer": {"name": "attention", "head_dim": 8}}
    for bad, words in (([1, 3], "from 2 to 16"), ([3, 3], "distinct")):
        with pytest.raises(RecipeError, match=words):
            recipe_from_dict({"model": {"seq_len": 16, "stages": [stage], "embedding": {"hash_ngrams": bad}}})
    ok = recipe_from_dict({"model": {"seq_len": 16, "stages": [stage], "embedding": {"hash_ngrams": [3, 8]}}})
    assert len(unetlm.build_model(ok).embed.hashed) == 2


# ------------------------------------------------------------------------------ entropy splitter


def example_splitter(**options) -> EntropySplitter:
    return EntropySplitter(structure(EntropyConfig, {"checkpoint": ensure_example_checkpoint(), **options}, "splitter"))


TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak." * 2


def test_entropy_boundary_at_t_reads_the_entropy_after_byte_t():
    splitter = example_splitter(threshold=4.0)
    h = splitter.entropies(TEXT)
    assert h.shape == (len(TEXT) + 1,)
    got = splitter.boundaries(TEXT, ones(len(TEXT)))
    assert np.array_equal(got, h[1:].astype(np.float64) > 4.0)
    assert 0 < got.sum() < len(TEXT)
    # the relative (monotonic) rule compares with the entropy after the previous token (BOS first)
    rel = example_splitter(relative_threshold=0.2).boundaries(TEXT, ones(len(TEXT)))
    assert np.array_equal(rel, np.diff(h.astype(np.float64)) > 0.2)


def test_entropy_max_patch_bounds_every_patch():
    parent = np.arange(len(TEXT)) % 3 != 1
    got = example_splitter(threshold=100.0, max_patch=4).boundaries(TEXT, parent)
    assert not (got & ~parent).any()
    rank = np.cumsum(parent)
    ends = rank[got]
    assert np.all(np.diff(np.concatenate([[0], ends])) == 4)  # no entropy fires: every 4th parent position


def test_entropy_state_matches_boundaries():
    parent = np.random.default_rng(0).random(len(TEXT)) < 0.7
    for options in ({"threshold": 4.0}, {"relative_threshold": 0.0, "max_patch": 5}, {"threshold": 3.8, "context": 16}):
        splitter = example_splitter(**options)
        state = splitter.start()
        stepped = [state.push(b, bool(p)) for b, p in zip(TEXT, parent)]
        assert np.array_equal(stepped, splitter.boundaries(TEXT, parent)), options


def test_entropies_are_cached_on_disk(tmp_path, monkeypatch):
    first = example_splitter(threshold=4.0, cache_dir=str(tmp_path))
    values = first.entropies(TEXT)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def recompute(self, data):
        raise AssertionError("the cached entropies were recomputed")

    monkeypatch.setattr(EntropySplitter, "_compute", recompute)
    again = example_splitter(threshold=2.0, cache_dir=str(tmp_path))
    assert np.array_equal(again.entropies(TEXT), values)
    with pytest.raises(AssertionError, match="recomputed"):
        again.entropies(TEXT + b"!")


def test_missing_entropy_checkpoint_says_how_to_train_one(tmp_path):
    splitter = EntropySplitter(EntropyConfig(checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(FileNotFoundError, match="unetlm train recipes/entropy-model.toml"):
        splitter.boundaries(b"abc", ones(3))
    with pytest.raises(RecipeError, match="checkpoint"):
        structure(EntropyConfig, {"checkpoint": ""}, "splitter")


@pytest.fixture(scope="module")
def shakespeare_head(tmp_path_factory) -> Path:
    """The first 60 kB of tinyshakespeare (its last 10% are never trained on)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpora are not here)")
    path = tmp_path_factory.mktemp("data") / "shakespeare-head.txt"
    path.write_bytes(SHAKESPEARE.read_bytes()[:60_000])
    return path


def tiny_overrides(data: Path, steps: int) -> list[str]:
    return [
        "data.source=files", f"data.paths=['{data.as_posix()}']", f"training.steps={steps}",
        "training.batch_size=8", f"training.eval_every={steps}", "training.eval_batches=2",
        f"training.checkpoint_every={steps}", "training.sample_bytes=0",
    ]


@pytest.fixture(scope="module")
def entropy_checkpoint(shakespeare_head, tmp_path_factory) -> Path:
    """recipes/tiny/entropy-model.toml trained for 40 steps."""
    from unetlm.train.loop import train

    out = tmp_path_factory.mktemp("entropy-model")
    recipe = unetlm.load_recipe(TINY / "entropy-model.toml", tiny_overrides(shakespeare_head, 40))
    train(recipe, out, progress=False, sample=False)
    return out


@needs_shakespeare
def test_entropy_patch_count_falls_as_the_threshold_rises(entropy_checkpoint):
    held_out = SHAKESPEARE.read_bytes()[-4000:]
    splitter = EntropySplitter(EntropyConfig(checkpoint=str(entropy_checkpoint)))
    h = splitter.entropies(held_out)
    parent = ones(len(held_out))
    counts = [int(entropy_boundaries(h, parent, t).sum()) for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > 2 * counts[-1], counts
    relative = [int(entropy_boundaries(h, parent, None, r).sum()) for r in (-0.5, 0.0, 0.5, 1.0)]
    assert all(a >= b for a, b in zip(relative, relative[1:])) and relative[0] > relative[-1], relative


@needs_shakespeare
def test_print_patches_marks_patches_and_reports_their_size(entropy_checkpoint, shakespeare_head):
    from unetlm.eval.patches import print_patches

    h = EntropySplitter(EntropyConfig(checkpoint=str(entropy_checkpoint))).entropies(shakespeare_head.read_bytes()[:500])
    sizes = []
    for threshold in np.quantile(h, [0.25, 0.75]).tolist():
        out = io.StringIO()
        result = print_patches(entropy_checkpoint, shakespeare_head, threshold=threshold, max_bytes=500, out=out)
        text = out.getvalue()
        body = text.split("\n\n500 bytes")[0]
        assert body.replace("\u2502", "") == shakespeare_head.read_bytes()[:500].decode()
        assert body.count("\u2502") == result["patches"] - 1
        assert f"{result['mean_patch']:.2f} bytes per patch" in text and "threshold (nats)" in text
        sizes.append(result["mean_patch"])
    assert sizes[0] < sizes[1]


def test_print_patches_of_a_hierarchical_checkpoint(tmp_path):
    from unetlm.eval.patches import print_patches

    recipe = unetlm.load_recipe(TINY / "spacebyte.toml")
    torch.save({"recipe": recipe.to_dict(), "model": unetlm.build_model(recipe).state_dict()}, tmp_path / "m.pt")
    (tmp_path / "t.txt").write_bytes(b"to be, or not to be")
    out = io.StringIO()
    result = print_patches(tmp_path / "m.pt", tmp_path / "t.txt", out=out)
    # a space-like byte ends its patch; the first byte is a boundary of its own
    assert out.getvalue().startswith("t\u2502o \u2502be,\u2502 or \u2502not \u2502to \u2502be\n")
    assert result["patches"] == 7
    with pytest.raises(ValueError, match="only apply to entropy patching"):
        print_patches(tmp_path / "m.pt", tmp_path / "t.txt", threshold=2.0, out=io.StringIO())


# ------------------------------------------------------------------------------ cross-attention


def one_link(data: bytes, bounds: list[int], coarse_len: int):
    tokens = encode(data).unsqueeze(0)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 0] = True
    mask[0, [b + 1 for b in bounds]] = True
    return build_links(documents_from_tokens(tokens), tokens != PAD, [mask], [coarse_len])[0]


def build(kind: str, name: str, options: dict, fine: int, coarse: int):
    from unetlm.plugins import registry

    cls = registry().get(kind, name)
    args = (fine, coarse) if kind == "pooler" else (coarse, fine)
    torch.manual_seed(0)
    return cls(structure(cls.Config, options, name), *args).double()


def test_cross_attention_pooler_reads_exactly_its_patch():
    link = one_link(b"abcdefghij", [2, 3, 7], coarse_len=6)
    pooler = build("pooler", "cross-attention", {"heads": 2}, fine=16, coarse=16)
    h = torch.randn(1, 11, 16, dtype=torch.float64, requires_grad=True)
    out = pooler(h, link)
    patches = [[0], [1, 2, 3], [4], [5, 6, 7, 8]]  # BOS; "abc"; "d"; "efgh" (token indices)
    for k, patch in enumerate(patches):
        (grad,) = torch.autograd.grad(out[0, k].sum(), h, retain_graph=True)
        assert marks(grad[0].abs().sum(-1) > 0) == patch


def test_cross_attention_upsampler_sees_its_window_of_coarse_vectors():
    link = one_link(b"abcdefghij", [2, 3, 7], coarse_len=6)
    up = build("upsampler", "cross-attention", {"heads": 2, "window": 2, "keys": 2}, fine=16, coarse=16)
    coarse = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    fine = torch.randn(1, 11, 16, dtype=torch.float64, requires_grad=True)
    out = up(coarse, link, fine=fine)
    newest = link.fine_seg[0] - 1
    for j in range(11):
        g_coarse, g_fine = torch.autograd.grad(out[0, j].sum(), (coarse, fine), retain_graph=True)
        n = int(newest[j])
        assert marks(g_coarse[0].abs().sum(-1) > 0) == [i for i in (n - 1, n) if i >= 0]
        assert marks(g_fine[0].abs().sum(-1) > 0) == [j]
    with pytest.raises(ValueError, match="fine"):
        up(coarse, link)


# ------------------------------------------------------------------------------ shifts


def model_of(path: Path, std: float = 0.2):
    torch.manual_seed(0)
    return unetlm.build_model(unetlm.load_recipe(path, [f"model.init_std={std}"])).double().eval()


def test_megabyte_patch_vector_serves_the_next_patch():
    """With boundaries at each patch's last byte, the position that predicts byte i of patch m
    holds the global vector whose boundary closes patch m - 1 (BOS for m = 0), which the concat
    pooler built from exactly the bytes of patch m - 1: MegaByte's one-patch shift."""
    model = model_of(TINY / "megabyte.toml")
    P = 8
    tokens = encode(bytes(range(97, 97 + 26)) * 2).unsqueeze(0)
    doc = documents_from_tokens(tokens)
    link = model.links(tokens, doc, model.split(tokens, doc))[0]
    T = tokens.shape[1]
    for t in range(T):  # token t predicts data byte t, in patch t // P
        newest = int(link.fine_seg[0, t]) - 1
        assert int(link.coarse.byte_pos[0, newest]) == (t // P) * P
    h = torch.randn(1, T, model.spec.stages[0].dim, dtype=torch.float64, requires_grad=True)
    pooled = model.poolers[0](h, link)
    for m in range(1, T // P):
        (grad,) = torch.autograd.grad(pooled[0, m].sum(), h, retain_graph=True)
        assert marks(grad[0].abs().sum(-1) > 0) == list(range((m - 1) * P + 1, m * P + 1))


class ShiftedGroupPooler(Pooler):
    """Hourglass pooling with shift ``shift``: coarse k averages the ``size`` positions
    ``src - shift .. src - shift + size - 1`` (src: its boundary). Built here only; shift
    size - 1 is the causal one, shifts 0 and size - 2 read positions after the boundary."""

    def __init__(self, fine_dim: int, coarse_dim: int, size: int, shift: int) -> None:
        super().__init__(None, fine_dim, coarse_dim)
        self.size, self.shift = size, shift
        self.proj = torch.nn.Linear(fine_dim, coarse_dim, bias=False)

    def forward(self, h, link):
        B, Lf, d = h.shape
        pos = link.coarse_src.unsqueeze(-1) - self.shift + torch.arange(self.size)
        inside = (pos >= 0) & (pos < Lf)
        pos = pos.clamp(0, Lf - 1)
        same = link.fine.doc.gather(1, pos.flatten(1)).view_as(pos) == link.coarse.doc.unsqueeze(-1)
        keep = (inside & same).unsqueeze(-1).to(h.dtype)
        picked = h.gather(1, pos.flatten(1).unsqueeze(-1).expand(-1, -1, d)).view(B, *pos.shape[1:], d)
        return self.proj((picked * keep).sum(2) / keep.sum(2).clamp(min=1))


def leaking_cuts(model, data: bytes) -> list[int]:
    """Cuts t where changing the bytes after token t changes the logits at tokens <= t."""
    x = encode(data)
    found = []
    with torch.no_grad():
        base = model(x.unsqueeze(0)).logits[0]
        for t in range(len(x) - 1):
            y = x.clone()
            y[t + 1 :] = (y[t + 1 :] + 101) % 256
            if not torch.allclose(model(y.unsqueeze(0)).logits[0, : t + 1], base[: t + 1], rtol=0, atol=1e-10):
                found.append(t)
    return found


@pytest.mark.parametrize("shift, leaks", [(2, False), (0, True), (1, True)], ids=["s-1", "0", "s-2"])
def test_hourglass_shift_s_minus_1_is_the_only_causal_one(shift, leaks):
    model = model_of(TINY / "hourglass.toml")
    s = model.spec.stages[1].splitter.config.size
    assert s == 3 and model.spec.stages[1].splitter.config.first
    dims = model.spec.stages[0].dim, model.spec.stages[1].dim
    model.poolers[0] = ShiftedGroupPooler(*dims, size=s, shift=shift).double()
    torch.nn.init.normal_(model.poolers[0].proj.weight, std=0.2)
    cuts = leaking_cuts(model, b"Shift the groups right by s - 1.")
    if leaks:
        # with shift 0, token t = first of its group (boundary) sees the rest of the group
        assert cuts, f"shift {shift} leaks, and the causality check must find it"
    else:
        assert cuts == []


# ------------------------------------------------------------------------------ recipes learn

TINY_SYSTEMS = ["entropy-model", "blt", "blt-space", "spacebyte", "megabyte", "hourglass"]


@pytest.mark.slow
@needs_shakespeare
@pytest.mark.parametrize("name", TINY_SYSTEMS)
def test_tiny_recipe_lowers_the_loss(name, shakespeare_head, entropy_checkpoint, tmp_path):
    from unetlm.train.loop import train

    # 256-byte sequences keep each run short; the stages' own limits stay as written. blt-space's
    # cross-attention upsampler normalises a start vector that begins at zero: at 5e-3 some seeds spike
    lr = 3e-3 if name == "blt-space" else 5e-3
    shorter = ["model.seq_len=256", "model.stages[0].max_len=256", f"training.lr={lr}"]
    overrides = tiny_overrides(shakespeare_head, 20) + shorter
    recipe = unetlm.load_recipe(TINY / f"{name}.toml", overrides)
    for stage in recipe.model.stages:
        if stage.splitter is not None and stage.splitter.name == "entropy":
            stage.splitter.config.checkpoint = str(entropy_checkpoint)
    result = train(recipe, tmp_path / "run", progress=False, sample=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first > 5.0  # about ln(258) before training
    assert result["val_loss"] < 0.7 * first, (first, result["val_loss"])


def test_tiny_blt_builds_with_the_example_entropy_model():
    recipe = with_example_checkpoint(unetlm.load_recipe(TINY / "blt.toml"))
    model = unetlm.build_model(recipe).eval()
    out = model(encode(b"Hello there, patches.").unsqueeze(0))
    assert out.logits.shape == (1, 22, 258) and out.logits.isfinite().all()


def test_entropy_splitter_reads_its_model_only_when_it_needs_it(tmp_path, monkeypatch):
    import unetlm.splitters.entropy as entropy

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    splitter = EntropySplitter(EntropyConfig(checkpoint=str(checkpoint)))

    def unavailable():
        raise RuntimeError("the reader of trained models was asked")

    monkeypatch.setattr(entropy, "entropy_models", unavailable)
    assert splitter.boundaries(b"", np.ones(0, dtype=bool)).shape == (0,)  # no model needed
    with pytest.raises(RuntimeError, match="was asked"):
        splitter.boundaries(b"ab", np.ones(2, dtype=bool))


def test_the_reader_of_trained_models_comes_from_the_builtin_registration_alone():
    """Set once by the built-ins in every registry a process builds (prepare's workers included)."""
    from unetlm.checkpoint.trained import TrainedModels
    from unetlm.plugins import build_registry
    from unetlm.registry import Registry, RegistryError

    assert isinstance(build_registry().trained_models(), TrainedModels)
    with pytest.raises(RegistryError, match="only the built-ins set, once"):
        build_registry().set_trained_models("x:Y")  # a second time
    plugin = Registry()
    plugin.current_origin = "plugin other"
    with pytest.raises(RegistryError, match="plugin other sets the reader"):
        plugin.set_trained_models("x:Y")
    with pytest.raises(RegistryError, match="no reader of trained models is registered"):
        Registry().trained_models()

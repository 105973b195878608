"""Cached (cascaded) generation against the full forward, which is the reference.

* Step-by-step logits equal the full forward's at every position (float64, 1e-9), for every
  tiny recipe and every registered component with a step API, on rows that cross many
  boundaries at every stage, with batches whose rows start at different steps and rows that
  start mid-document (no BOS: start vectors); every norm weight and start vector perturbed.
* Negative controls: a cascade without the final norm, or with a sliding window one key wider
  (the two bugs of the AU-Net paper's cached generator), gives different logits.
* Greedy (and seeded sampled) generation is the same cached and by recompute, also when the
  context outgrows seq_len; firing rates are reported and agree with the layout.
* Incremental splitting equals ``boundaries()`` for every splitter and example config, and
  costs O(1) amortised per byte: Python lines run and memory allocated per push do not grow
  with the history, and regex patterns never see more than ``window`` bytes.
"""
from __future__ import annotations

import copy
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import unetlm

from strategies import (
    RICH_CHUNKS, TINY_RECIPES, case_id, component_cases, component_model, make_splitter, recipe_model,
    recipe_params, with_parent,
)
from unetlm.api import build_model
from unetlm.mixers.attention import AttentionBlock
from unetlm.model.cascade import Cascade, missing_step_api, stage_counts
from unetlm.model.generate import generate, sample_next
from unetlm.core.tokens import encode
from unetlm.plugins import registry
from unetlm.poolers.base import Pooler
from unetlm.recipe import recipe_from_dict
from unetlm.splitters.regex import PatternState

TOL = dict(rtol=1e-9, atol=1e-9)
WORDY = RICH_CHUNKS + [b"a ", b"an ", b"of ", b"to ", b" ", b"\n", b". ", b", "] * 3


@pytest.fixture(autouse=True)
def one_thread():
    """Step-by-step inference is latency-bound: one thread avoids oversubscribed spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rich_text(seed: int, n: int) -> bytes:
    """``n`` bytes of words, spaces, newlines, punctuation, digits and multi-byte characters."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    while len(out) < n:
        out += WORDY[rng.integers(len(WORDY))]
    return bytes(out[:n])


def perturbed(model):
    """A copy with every RMSNorm weight and upsampler start vector randomised (seed 1), so a
    skipped norm or a start vector read as zeros changes the logits."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm) and module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen, dtype=torch.float64))
        for up in model.upsamplers:
            up.start.copy_(torch.randn(up.start.shape, generator=gen, dtype=torch.float64))
    return model


def step_rows(model, rows: list[torch.Tensor], starts: list[int]):
    """Run one Cascade over ``rows`` (token tensors); row b's first token arrives at step
    ``starts[b]``. -> (cascade, per-row logits (T_b, VOCAB))."""
    cascade = Cascade(model, len(rows))
    outs: list[list[torch.Tensor]] = [[] for _ in rows]
    for t in range(max(s + len(r) for s, r in zip(starts, rows))):
        active = [s <= t < s + len(r) for s, r in zip(starts, rows)]
        if not any(active):
            continue
        tokens = [int(r[t - s]) if a else 0 for r, s, a in zip(rows, starts, active)]
        logits = cascade.step(tokens, active)
        for b, a in enumerate(active):
            if a:
                outs[b].append(logits[b])
    return cascade, [torch.stack(o) for o in outs]


def prefill_then_step(model, rows: list[torch.Tensor], cuts: list[int]):
    """One Cascade prefilled with the first ``cuts[b]`` tokens of each row, then stepped through
    the rest (all rows together while they last). -> (cascade, per-row logits from position
    ``cuts[b] - 1`` on; a row cut at 0 starts at its first step)."""
    cascade = Cascade(model, len(rows))
    first = cascade.prefill([r[:c].tolist() for r, c in zip(rows, cuts)])
    outs = [[first[b]] if c else [] for b, c in enumerate(cuts)]
    for t in range(max(len(r) - c for r, c in zip(rows, cuts))):
        active = [c + t < len(r) for r, c in zip(rows, cuts)]
        logits = cascade.step([int(r[c + t]) if a else 0 for r, c, a in zip(rows, cuts, active)], active)
        for b, a in enumerate(active):
            if a:
                outs[b].append(logits[b])
    return cascade, [torch.stack(o) for o in outs]


def reference(model, row: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(row[None]).logits[0]


def skip_without_step_api(model) -> None:
    """Components without the step API: Cascade must refuse, naming each; then skip."""
    missing = missing_step_api(model)
    if missing:
        names = [line.split("'")[1] for line in missing]
        with pytest.raises(NotImplementedError) as refused:
            Cascade(model)
        assert all(repr(name) in str(refused.value) for name in names)
        pytest.skip("no step API: " + "; ".join(missing))


def check_against_forward(model, length: int, min_positions: int = 8) -> Cascade:
    """Two rows, one from BOS and one (later, shorter) mid-document: cascade == forward."""
    rows = [encode(rich_text(0, length - 1)), encode(rich_text(1, length // 2 + 3), bos=False)]
    cascade, got = step_rows(model, rows, starts=[0, length // 3])
    for b, row in enumerate(rows):
        torch.testing.assert_close(got[b], reference(model, row), **TOL, msg=lambda m: f"row {b}: {m}")
        counts = stage_counts(model, row)
        assert cascade.count[:, b].tolist() == counts, "stages fired other than in the full forward's layout"
    crossed = cascade.count[:, 0]
    for s, n in enumerate(crossed):
        assert n >= min(min_positions, model.lengths[s]), f"stage {s} got only {n} positions: prompt too plain"
    # prefill most of each row at once, then step the rest: the same logits and the same layout
    cuts = [len(rows[0]) - 6, len(rows[1]) - 4]
    prefilled, got = prefill_then_step(model, rows, cuts)
    for b, (row, cut) in enumerate(zip(rows, cuts)):
        expected = reference(model, row)[cut - 1 :]
        torch.testing.assert_close(got[b], expected, **TOL, msg=lambda m: f"prefill, row {b}: {m}")
    assert (prefilled.count == cascade.count).all() and (prefilled.boundary == cascade.boundary).all()
    assert prefilled.firing_rates == pytest.approx(cascade.firing_rates, abs=1e-12)
    return cascade


# ------------------------------------------------------------------ every tiny recipe


@pytest.mark.parametrize("path", recipe_params(TINY_RECIPES))
def test_cascade_equals_full_forward_for_every_tiny_recipe(path):
    model = perturbed(recipe_model(path, seq_len=None))
    skip_without_step_api(model)
    length = min(model.lengths[0], 128)
    cascade = check_against_forward(model, length)
    rates = cascade.firing_rates
    print(f"{path.stem}: firing rates per stage {[round(r, 3) for r in rates]}")
    assert rates[0] == 1.0 and all(0 < r < 1 for r in rates[1:])


@pytest.mark.parametrize("path", recipe_params(TINY_RECIPES))
def test_greedy_cached_equals_greedy_recompute(path):
    model = recipe_model(path, seq_len=None)
    skip_without_step_api(model)
    prompts = [rich_text(2, 48), b""]
    cached = generate(model, prompts, 10, temperature=0, cached=True)
    recomputed = generate(model, prompts, 10, temperature=0, cached=False)
    assert list(cached) == list(recomputed) and cached.reasons == recomputed.reasons
    # no context was cut: the cascade's counters and the layout of the final contexts agree
    assert cached.firing_rates == pytest.approx(recomputed.firing_rates, abs=1e-12)
    assert len(cached.firing_rates) == len(model.lengths) and cached.firing_rates[0] == 1.0


# ------------------------------------------------------------------ every registered component

COMPONENT_CASES = [
    pytest.param(kind, name, options, max_len, id=f"{kind}:{case_id(name, options)}:max_len={max_len}")
    for kind in ("mixer", "pooler", "upsampler", "splitter")
    for name, options in component_cases(kind)
    for max_len in ((None, 5) if kind in ("pooler", "upsampler") else (None,))
]


@pytest.mark.parametrize("kind, name, options, max_len", COMPONENT_CASES)
def test_cascade_equals_full_forward_for_every_component(kind, name, options, max_len):
    """A two-stage model around each registered component (``max_len = 5``: the coarse stage
    truncates). A component without the step API must make Cascade raise, naming it."""
    model = perturbed(component_model(kind, name, options, max_len))
    skip_without_step_api(model)
    check_against_forward(model, model.lengths[0], min_positions=5)


def test_a_component_without_step_api_is_named():
    class NoStepPooler(Pooler):
        def forward(self, h, link):
            return h.new_zeros(h.shape[0], link.coarse_src.shape[1], self.coarse_dim)

    model = copy.deepcopy(recipe_model(TINY_RECIPES[0].parent / "au2.toml", seq_len=64))
    model.poolers[0] = NoStepPooler(None, model.poolers[0].fine_dim, model.poolers[0].coarse_dim)
    with pytest.raises(NotImplementedError, match=r"stage 1 pooler 'select' \(.*NoStepPooler\).*init_state, step"):
        Cascade(model)
    with pytest.raises(NotImplementedError, match="cached=False"):
        generate(model, [b"a"], 3, cached=True)
    assert len(generate(model, [b"a"], 3, temperature=0, cached=False)[0]) <= 3


# ------------------------------------------------------------------ edges: windows, norms, truncation


def edge_model(windows: tuple[int, int, int], max_lens: tuple[int, int, int], seq_len: int = 96):
    """Three stages (words, word pairs) with the given attention windows and lengths."""
    stages = []
    for i, (window, max_len) in enumerate(zip(windows, max_lens)):
        stage = {"dim": 16 * (i + 1), "layers": 1, "max_len": max_len,
                 "mixer": {"name": "attention", "head_dim": 8, "window": window}}
        if i:
            stage.update(splitter={"name": "regex", "preset": ["word", "word2"][i - 1]},
                         pooler={"name": ["select", "mean"][i - 1]}, upsampler={"name": "multi-linear", "offsets": 3})
        stages.append(stage)
    torch.manual_seed(0)
    recipe = recipe_from_dict({"model": {"seq_len": seq_len, "init_std": 0.2, "stages": stages}})
    return perturbed(build_model(recipe).double().eval())


def test_sliding_window_edge_and_ring_size():
    model = edge_model(windows=(4, 3, 2), max_lens=(96, 60, 40))
    cascade = check_against_forward(model, 96)
    assert cascade.count[1, 0] > 3 and cascade.count[2, 0] > 2, "the prompt must outgrow every window"
    state = cascade.state
    slots = [state["encoder", 0][0].k.shape[2], state["encoder", 1][0].k.shape[2], state["middle",][0].k.shape[2]]
    assert slots == [4, 3, 2], "a sliding window's cache holds exactly `window` keys"
    # the paper's bug, a generation window one key wider than training's, is caught
    wider = copy.deepcopy(model)
    for block in wider.modules():
        if isinstance(block, AttentionBlock):
            block.config = copy.copy(block.config)
            block.config.window += 1
    row = encode(rich_text(0, 95))
    _, (got,) = step_rows(wider, [row], [0])
    assert not torch.allclose(got, reference(model, row), **TOL)


def test_final_norm_is_applied():
    model = edge_model(windows=(0, 0, 0), max_lens=(64, 64, 64), seq_len=64)
    row = encode(rich_text(4, 63))
    _, (got,) = step_rows(model, [row], [0])
    torch.testing.assert_close(got, reference(model, row), **TOL)
    skipped = copy.deepcopy(model)
    skipped.norm = torch.nn.Identity()  # what the paper's cached generator did
    _, (bad,) = step_rows(skipped, [row], [0])
    assert not torch.allclose(bad, reference(model, row), **TOL)


def test_truncated_stages_keep_their_last_vector():
    model = edge_model(windows=(0, 5, 0), max_lens=(96, 7, 3))
    cascade = check_against_forward(model, 96, min_positions=3)
    assert cascade.count[1, 0] == 7 and cascade.count[2, 0] == 3, "both deep stages must hit max_len"


def test_context_longer_than_seq_len():
    """Past seq_len both modes drop the oldest half of the context and go on, identically."""
    model = edge_model(windows=(8, 0, 0), max_lens=(32, 16, 8), seq_len=32)
    prompts = [rich_text(5, 40), b"a b"]  # the first is cropped from the start
    for options in (dict(temperature=0), dict(temperature=1.0, top_k=40, top_p=0.95, seed=7)):
        cached = generate(model, prompts, 50, cached=True, **options)
        recomputed = generate(model, prompts, 50, cached=False, **options)
        assert list(cached) == list(recomputed)
    assert max(len(t) for t in cached) > 32


def test_no_stage_overflows_during_generation(monkeypatch):
    """Deep stages with few slots: before a stage would drop a boundary, both modes cut the context
    to a suffix that fills at most half of every stage, identically (issue: truncation in generation)."""
    import unetlm.model.generate as gen

    model = edge_model(windows=(0, 0, 0), max_lens=(64, 12, 6), seq_len=64)
    cuts: list[list[int]] = []

    def spy(model, context):
        cut = window(model, context)
        cuts.append(list(cut))  # the context it becomes grows afterwards
        return cut

    window = gen.window
    monkeypatch.setattr(gen, "window", spy)
    prompts = [rich_text(5, 40), b"a b"]  # the first prompt overflows stage 1 already
    options = dict(temperature=1.0, seed=3)
    cached = generate(model, prompts, 80, cached=True, **options)
    cached_cuts = len(cuts)
    recomputed = generate(model, prompts, 80, cached=False, **options)
    assert list(cached) == list(recomputed) and max(len(t) for t in cached) == 80
    assert cached_cuts >= 3 and len(cuts) >= 2 * 3, "the stages never filled: the test shows nothing"
    for cut in cuts:
        counts = stage_counts(model, torch.tensor(cut))
        assert all(c <= n // 2 for c, n in zip(counts, model.lengths)), (counts, model.lengths)
    assert not gen.fits(model, encode(prompts[0]).tolist())


def test_stage_firing_rates_are_reported():
    model = recipe_model(TINY_RECIPES[0].parent / "au3.toml", seq_len=None)
    out = generate(model, [rich_text(6, 200)], 20, temperature=0)
    rates = out.firing_rates
    assert len(rates) == 3 and rates[0] == 1.0 and 1.0 > rates[1] >= rates[2] > 0.0


# ------------------------------------------------------------------ sampling, stop strings, streaming


def test_sampling_rules():
    gen = torch.Generator().manual_seed(0)
    logits = torch.full((2, 258), -10.0)
    logits[:, 5], logits[:, 7], logits[:, 257] = 3.0, 2.9, 100.0  # PAD is never sampled
    assert sample_next(logits, 0, 0, 1.0, gen).tolist() == [5, 5]
    draws = torch.cat([sample_next(logits, 1.0, 2, 1.0, gen) for _ in range(50)])
    assert set(draws.tolist()) == {5, 7}
    draws = torch.cat([sample_next(logits, 1.0, 0, 0.5, gen) for _ in range(50)])
    assert set(draws.tolist()) == {5}, "top_p = 0.5 keeps only the best token here"


def test_stop_strings_and_streaming():
    model = recipe_model(TINY_RECIPES[0].parent / "au2.toml", seq_len=64)
    free = generate(model, [b"x"], 30, temperature=1.0, seed=3)[0]
    assert len(free) >= 6
    stop = free[4:6]
    streamed: list[bytes] = []
    out = generate(model, [b"x"], 30, temperature=1.0, seed=3, stop=[stop], on_bytes=lambda i, b: streamed.append(b))
    assert out[0] == free[: free.index(stop)] and out.reasons == ["stop"]
    assert b"".join(streamed) == out[0]
    assert generate(model, [b"x"], 30, temperature=1.0, seed=3, cached=False, stop=[stop])[0] == out[0]
    assert list(model.generate([b"x"], 30, temperature=1.0, seed=3)) == [free]


# ------------------------------------------------------------------ incremental splitting

# byte-level splitters only: a learned one has no incremental byte API (Cascade refuses it, above)
SPLITTERS = [
    pytest.param(n, o, id=case_id(n, o)) for n, o in component_cases("splitter")
    if not registry().get("splitter", n).learned
]


def push_all(splitter, data: bytes, parent: np.ndarray) -> np.ndarray:
    state = splitter.start()
    return np.array([bool(state.push(b, bool(p))) for b, p in zip(data, parent)], dtype=bool)


@pytest.mark.parametrize("name, options", SPLITTERS)
@settings(max_examples=8)
@given(case=with_parent())
def test_incremental_splitting_equals_batch(name, options, case):
    data, parent = case
    splitter = make_splitter(name, options)
    for par in (parent, np.ones(len(data), dtype=bool)):
        assert np.array_equal(push_all(splitter, data, par), splitter.boundaries(data, par))


PACKAGE = str(Path(unetlm.__file__).parent)


def push_costs(state, data: bytes, parent: np.ndarray, measured: list[range]) -> list[tuple[int, int]]:
    """Per range of pushes: (lines of this package's Python run, bytes allocated at peak, summed)."""
    costs = []
    lines = [0]

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        if event == "line":
            lines[0] += 1
        return tracer

    pushed = 0
    for span in measured:
        for i in range(pushed, span.start):
            state.push(data[i], bool(parent[i]))
        lines[0], alloc = 0, 0
        tracemalloc.start()
        try:
            for i in span:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                sys.settrace(tracer)
                state.push(data[i], bool(parent[i]))
                sys.settrace(None)
                alloc += tracemalloc.get_traced_memory()[1] - base
        finally:
            sys.settrace(None)
            tracemalloc.stop()
        costs.append((lines[0], alloc))
        pushed = span.stop
    return costs


@pytest.mark.parametrize("name, options", SPLITTERS)
def test_incremental_splitting_is_constant_cost_per_byte(name, options):
    """Work per push must not grow with the history."""
    assert_constant_cost(make_splitter(name, options).start())


def assert_constant_cost(state) -> None:
    """Pushes 60-120 against 600-660: a cost linear in the history would grow tenfold.
    Allocations are summed, so the amortised growth of a buffer passes."""
    data = rich_text(8, 660)
    parent = np.random.default_rng(0).random(len(data)) < 0.8
    (early_lines, early_alloc), (late_lines, late_alloc) = push_costs(
        state, data, parent, [range(60, 120), range(600, 660)]
    )
    assert late_lines <= 1.2 * early_lines + 100, "Python work per byte grows with the history"
    assert late_alloc <= 1.5 * early_alloc + 16384, "memory allocated per byte grows with the history"


def test_the_cost_check_finds_a_splitter_that_rereads_its_history():
    class Rerun:  # what the AU-Net paper's generator does: re-split the whole history per byte
        def __init__(self, splitter):
            self.splitter, self.data, self.parent = splitter, bytearray(), []

        def push(self, byte, parent):
            self.data.append(byte)
            self.parent.append(parent)
            return bool(self.splitter.boundaries(bytes(self.data), np.array(self.parent))[-1])

    with pytest.raises(AssertionError, match="grows with the history"):
        assert_constant_cost(Rerun(make_splitter("regex", {"preset": "word2"})))


@pytest.mark.parametrize("options", [o for n, o in component_cases("splitter") if n == "regex" and "pattern" in o])
def test_regex_patterns_see_at_most_window_bytes(options):
    seen: list[int] = []

    class Counting:
        def __init__(self, pattern):
            self.pattern = pattern

        def search(self, data):
            seen.append(len(data))
            return self.pattern.search(data)

    splitter = make_splitter("regex", options)
    state = splitter.start()
    assert isinstance(state, PatternState)
    state.pattern = Counting(state.pattern)
    data = rich_text(9, 3000)
    for b in data:
        state.push(b, True)
    assert len(seen) == len(data), "one search per byte"
    assert max(seen) == splitter.config.pattern_window
    assert len(state.recent) <= 2 * splitter.config.pattern_window


# ------------------------------------------------------------------ benchmark records


def test_benchmark_record_schema_and_modes_agree():
    from unetlm.bench.generate import _measure, markdown_table

    task = {"checkpoint": None, "recipe": str(TINY_RECIPES[0].parent / "au3.toml"), "overrides": [],
            "name": "au3", "context": 48, "new_bytes": 8, "repeats": 2, "threads": 1}
    records = [_measure({**task, "mode": mode}) for mode in ("cached", "recompute")]
    for record, mode in zip(records, ("cached", "recompute")):
        assert {"recipe", "mode", "context", "bytes_per_s", "peak_mem_bytes", "stage_firing_rates"} <= set(record)
        assert record["mode"] == mode and record["context"] == 48 and record["bytes_per_s"] > 0
        assert len(record["bytes_per_s_each"]) == 2 and record["peak_mem_bytes"] >= 0
    assert records[0]["stage_firing_rates"] == pytest.approx(records[1]["stage_firing_rates"])
    assert "| au3 | 48 |" in markdown_table(records)


def test_first_byte_benchmark_records():
    from unetlm.bench.generate import _measure_first_byte, first_byte_table
    from unetlm.cli import main

    task = {"checkpoint": None, "recipe": str(TINY_RECIPES[0].parent / "hnet.toml"), "overrides": [],
            "name": "hnet", "prompt_bytes": 40, "repeats": 1, "threads": 1}
    records = [_measure_first_byte({**task, "mode": mode}) for mode in ("prefill", "stepped")]
    for record, mode in zip(records, ("prefill", "stepped")):
        assert record["mode"] == mode and record["time_to_first_byte_s"] > 0
        assert record["prefill_bytes_per_s"] == pytest.approx(41 / record["time_to_first_byte_s"])
    assert records[0]["stage_firing_rates"] == pytest.approx(records[1]["stage_firing_rates"], abs=1e-12)
    assert 0 < records[0]["stage_firing_rates"][1] < 1
    assert "| hnet | 40 |" in first_byte_table(records)
    assert main(["bench", "generate", "--prompt-bytes", "8", "--json", "unused.json"]) == 2  # no recipe

"""The lm-evaluation-harness adapter answers its three request kinds from a checkpoint."""
from __future__ import annotations

import math
import types

import pytest
import torch

from unetlm.eval.bpb import text_bpb
from unetlm.eval.choice import continuation_nll
from unetlm.eval.harness import HarnessAdapter
from unetlm.model.generate import generate
from unetlm.core.tokens import encode

from test_eval import checkpoint  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def adapter(checkpoint):  # noqa: F811
    return HarnessAdapter(str(checkpoint), batch_size=3)


def test_loglikelihood_is_minus_the_continuation_nll_with_a_greedy_flag(adapter):
    model = adapter.model
    prompt = b"The cat sat on the"
    greedy = generate(model, [prompt], 4, temperature=0)[0].decode("utf-8", errors="ignore")
    requests = [("The cat sat on the", " mat."), ("", "Hello"), ("The cat sat on the", greedy)]
    got = adapter.loglikelihood(requests)
    want = continuation_nll(model, [(c.encode(), x.encode()) for c, x in requests])
    assert [lp for lp, _ in got] == pytest.approx([-n for n in want])
    assert got[2][1] is True  # the model's own greedy bytes
    tokens = encode(prompt + b" mat.").unsqueeze(0)
    with torch.no_grad():
        predicted = model(tokens).logits[0].argmax(-1)
    assert got[0][1] == bool((predicted[len(prompt) : -1] == tokens[0, len(prompt) + 1 :]).all())


def test_rolling_loglikelihood_scores_every_byte_once(adapter):
    text = "The cat sat on the mat. " * 12  # longer than seq_len: several windows
    (got,) = adapter.loglikelihood_rolling([(text,)])
    row = text_bpb(adapter.model, "t", [text.encode()])
    assert got == pytest.approx(-row.bits_per_byte * len(text) * math.log(2), rel=1e-9)
    assert adapter.loglikelihood_rolling([("",)]) == [0.0]


def test_generate_until_stops_at_a_stop_string_and_a_length(adapter):
    prompt = "The cat sat on the"
    free = generate(adapter.model, [prompt.encode()], 12, temperature=0)[0].decode("utf-8", errors="replace")
    # a character from the middle, not a replacement character (an invalid byte of the random model)
    stop = next(c for c in free[3:] if c != "\ufffd")
    cut, short = adapter.generate_until([(prompt, {"until": [stop], "max_gen_toks": 12}),
                                         (prompt, {"until": "\u2603", "max_gen_toks": 3})])
    assert cut == free[: free.find(stop)]
    assert short == free[:3]  # byte models: max_gen_toks bytes


def test_registered_in_the_harness(checkpoint):  # noqa: F811
    pytest.importorskip("lm_eval", reason="the harness is an optional extra (unetlm[harness])")
    from lm_eval.api.registry import get_model

    from unetlm.eval.harness import harness_model_class

    cls = harness_model_class()
    assert get_model("unetlm") is cls
    lm = cls.create_from_arg_string(f"checkpoint={checkpoint},batch_size=2")
    request = types.SimpleNamespace(args=("The cat", " sat"))
    assert lm.loglikelihood([request])[0][0] < 0


def test_without_the_harness_the_error_says_what_to_install(monkeypatch):
    import sys

    from unetlm.eval import harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.setattr(harness, "_HARNESS_CLASS", None)
    with pytest.raises(ImportError, match=r"pip install 'unetlm\[harness\]'"):
        harness.harness_model_class()


def test_a_local_harness_task_runs_end_to_end(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("lm_eval", reason="the harness is an optional extra (unetlm[harness])")
    import json

    from unetlm.eval.harness import run_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": "The cat sat on the", "choices": [" mat.", " moon."],
                                        "answer": 0}) + "\n" for _ in range(3)))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list: [{metric: acc}]\n"
    )
    result = run_harness(str(checkpoint), ["tiny_mc"], include_path=str(tmp_path))
    assert 0.0 <= result["results"]["tiny_mc"]["acc,none"] <= 1.0

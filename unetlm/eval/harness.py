"""The lm-evaluation-harness adapter: its three request kinds answered by a unetlm checkpoint.

:class:`HarnessAdapter` holds the logic and needs no harness: ``loglikelihood`` pairs are
scored by :func:`~unetlm.eval.choice.continuation_scores`, ``loglikelihood_rolling`` strings by
the windows of :mod:`unetlm.eval.bpb` (every token scored once), ``generate_until`` by
:func:`~unetlm.model.generate.generate`. :func:`harness_model_class` wraps it in the harness's
``LM`` interface and registers it as ``unetlm``; ``lm_eval`` (``pip install 'unetlm[harness]'``)
is imported only there. From Python::

    import lm_eval
    from unetlm.eval.harness import harness_model_class

    lm = harness_model_class()(checkpoint="runs/au2")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

or ``unetlm harness runs/au2 --tasks hellaswag``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from unetlm.eval.bpb import token_nll
from unetlm.eval.choice import continuation_scores


class HarnessAdapter:
    """A checkpoint answering the harness's requests, given as plain argument tuples."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 8) -> None:
        from unetlm.checkpoint.trained import load_trained

        self.model, self.recipe = load_trained(checkpoint)
        self.model.to(torch.device(device))
        self.batch_size = int(batch_size)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation after its context."""
        pairs = [(context.encode("utf-8"), continuation.encode("utf-8")) for context, continuation in requests]
        return [(-nll, greedy) for nll, greedy in continuation_scores(self.model, pairs, self.batch_size)]

    def loglikelihood_rolling(self, requests: list[tuple[str]]) -> list[float]:
        """Log-probability of each whole string read from BOS, in windows of ``seq_len // 2`` new tokens."""
        out = []
        for (text,) in requests:
            data = text.encode("utf-8")
            if not data:
                out.append(0.0)
                continue
            nll, _, _, _ = token_nll(self.model, [data], max(1, self.model.spec.seq_len // 2), self.batch_size)
            out.append(-float(nll.sum()))
        return out

    def generate_until(self, requests: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Continuations until a stop string (``until``) or ``max_gen_toks`` of the model's tokens."""
        from unetlm.model.generate import generate

        out = []
        for context, options in requests:
            options = dict(options or {})
            until = options.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_bytes = math.ceil(int(options.pop("max_gen_toks", 256)) * self.model.tokenizer.bytes_per_token)
            sample = options.pop("do_sample", False)
            temperature = float(options.pop("temperature", 0.0)) if sample else 0.0
            text = generate(self.model, [context.encode("utf-8")], max_bytes, temperature=temperature,
                            top_k=int(options.pop("top_k", 0) or 0), top_p=float(options.pop("top_p", 1.0) or 1.0),
                            seed=0, stop=until)[0]
            out.append(text.decode("utf-8", errors="replace"))
        return out


def harness_model_class():
    """The harness ``LM`` subclass for unetlm checkpoints, registered under the name ``unetlm``."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise ImportError("the harness adapter needs lm-eval: pip install 'unetlm[harness]'") from None

    global _HARNESS_CLASS
    if _HARNESS_CLASS is not None:
        return _HARNESS_CLASS

    class UnetlmLM(LM):
        def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 8, **_ignored) -> None:
            super().__init__()
            self.adapter = HarnessAdapter(checkpoint, device, batch_size)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood_rolling([r.args for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.adapter.generate_until([r.args for r in requests])

    _HARNESS_CLASS = register_model("unetlm")(UnetlmLM)
    return _HARNESS_CLASS


_HARNESS_CLASS = None


def run_harness(checkpoint: str, tasks: list[str], limit: int | None = None, device: str = "cpu",
                batch_size: int = 8, num_fewshot: int | None = None, include_path: str | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of a checkpoint (``include_path``: a folder of extra task
    YAML files, e.g. tasks over local data); returns the harness's results dict."""
    model = harness_model_class()(checkpoint=checkpoint, device=device, batch_size=batch_size)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else None
    return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager)

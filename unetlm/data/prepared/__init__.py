"""Prepared data: a recipe's documents as memory-mapped shards of tokens, document index and
boundary masks, written once by ``unetlm prepare`` and read in any range without loading the
corpus. Format and commands: docs/data.md."""
from unetlm.data.prepared.format import PreparedDataError
from unetlm.data.prepared.prepare import cache_key, prepare
from unetlm.data.prepared.read import PreparedCorpus

__all__ = ["PreparedCorpus", "PreparedDataError", "cache_key", "prepare"]

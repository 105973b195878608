"""The plugin module named by the ``unetlm`` entry point: registers the ``sentence`` splitter.

Kept free of heavy imports: unetlm imports this module to list components, and imports the
target ``unetlm_sentence.splitter:SentenceSplitter`` only when a recipe names ``sentence``.
"""
from unetlm.plugins import hookimpl


@hookimpl
def unetlm_register(registry):
    registry.add(
        "splitter",
        "sentence",
        "unetlm_sentence.splitter:SentenceSplitter",
        "a boundary at the first whitespace after . ! ? (and closing quotes), and at paragraph breaks",
    )

"""unetlm-sentence: a splitter that gives the next stage one position per sentence.

The hook lives in :mod:`unetlm_sentence.plugin` and the splitter in
:mod:`unetlm_sentence.splitter`, which unetlm imports only when a recipe uses it.
"""

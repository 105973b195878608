"""lingua's AU-Net splitting, as its regexes run (a reference for the ``lingua-wordN`` presets).

lingua's ``wordN`` strategy marks, on decoded text, the *start* of every match of a "forced"
pattern (groups of up to 3 numbers, groups of up to 3 other characters with the newlines right
after them, whitespace that reaches a newline) and the *end* of every match of ``(\\S+?\\s){N}``
(N words, each followed by one whitespace character), both found left to right without overlap;
a character's mark sits on its last byte. Stage k of an AU-Net takes the marks of its strategy
and of every deeper one (the deeper ones are nested in it).

Run as a script, it prints the agreement (Jaccard index of the boundary sets) of the presets
with this reference on whole files, each file one document:

    python tests/lingua_reference.py ../shared/data/*.txt
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import regex

FORCED = regex.compile(r"\p{N}{1,3}|[^\s\p{L}\p{N}]{1,3}[\r\n]*|\s*[\r\n]")
WHITE = regex.compile(r"\s")
GROUPS = {1: "word", 2: "word2", 4: "word4"}  # words per group -> the suffix of the presets' names


def words_pattern(group: int):
    return regex.compile(r"(?:\S+?\s){%d}" % group)


def last_bytes(text: str) -> np.ndarray:
    """The index of each character's last byte in the UTF-8 encoding of ``text``."""
    return np.cumsum([len(c.encode("utf-8")) for c in text], dtype=np.int64) - 1


def reference_boundaries(data: bytes, group: int) -> np.ndarray:
    """lingua's boundaries of strategy ``word{group}`` on valid UTF-8 ``data``."""
    text = data.decode("utf-8")
    last_byte = last_bytes(text)
    marks = [m.start() for m in FORCED.finditer(text)]
    marks += [m.end() - 1 for m in words_pattern(group).finditer(text)]
    out = np.zeros(len(data), dtype=bool)
    out[last_byte[marks]] = True
    return out


def looks_ahead(data: bytes) -> np.ndarray:
    """The bytes where lingua's forced pattern marks a space (not a newline) because a newline
    comes later in the same whitespace run: decisions that read ahead."""
    text = data.decode("utf-8")
    last_byte = last_bytes(text)
    out = np.zeros(len(data), dtype=bool)
    for m in FORCED.finditer(text):
        first = text[m.start()]
        if first not in "\r\n" and WHITE.match(first):
            out[last_byte[m.start()]] = True
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a and b| / |a or b| of two boundary masks (1 when both are empty)."""
    either = int((a | b).sum())
    return int((a & b).sum()) / either if either else 1.0


def preset_boundaries(data: bytes, preset: str) -> np.ndarray:
    from unetlm.splitters.regex import RegexConfig, RegexSplitter

    return RegexSplitter(RegexConfig(preset=preset)).boundaries(data, np.ones(len(data), dtype=bool))


def main(paths: list[str]) -> None:
    """Per file and stage: lingua's boundaries, and for each preset family the Jaccard index
    |both| / |either| with them and the number of bytes where they disagree; then all files."""
    print("| file | stage (lingua strategy) | lingua's boundaries | `wordN`: Jaccard | disagree | "
          "`lingua-wordN`: Jaccard | disagree |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    totals: dict[int, np.ndarray] = {}
    for path in paths:
        data = Path(path).read_bytes()
        for stage, (group, name) in enumerate(GROUPS.items(), start=1):
            reference = reference_boundaries(data, group)
            row = [int(reference.sum())]
            for preset in (name, f"lingua-{name}"):
                ours = preset_boundaries(data, preset)
                row += [int((ours & reference).sum()), int((ours | reference).sum())]
            totals[stage] = totals.get(stage, 0) + np.array(row)
            print(table_row(Path(path).name, stage, group, row), flush=True)
    for stage, (group, _) in enumerate(GROUPS.items(), start=1):
        print(table_row("all", stage, group, totals[stage].tolist()))


def table_row(name: str, stage: int, group: int, row: list[int]) -> str:
    """``row``: lingua's count, then (|both|, |either|) per preset family."""
    cells = [f"{row[0]:,}"]
    for both, either in (row[1:3], row[3:5]):
        cells += [f"{both / either:.5f}", f"{either - both:,}"]
    return f"| {name} | {stage} (`word{group}`) | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main(sys.argv[1:])

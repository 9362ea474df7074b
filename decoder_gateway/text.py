"""Text normalisation and segmentation for synthesis.

Every segment returned by :func:`split_segments` becomes one LLM request. The
Spark-TTS fine-tunes were trained on sentence-sized utterances (about 50
semantic tokens per second of speech), so the text is cut into sentences, and
sentences longer than ``max_chars`` are cut again at clause boundaries.

Rules, in order:

1. Line breaks in the raw text (a newline or a blank line) are hard
   boundaries; each line is then normalised by :func:`normalize_text`.
2. A line is split into sentences after a run of terminators (``. ! ? …``
   and other scripts' marks such as ``。 ！ ？ । ؟ ።``) plus any closing
   quotes or brackets. Latin terminators only end a sentence when a space (or
   the end of the line) follows, so ``3.5``, ``1,000.50``, ``v2.0`` and
   ``example.com`` never split. A single ``.`` does not end a sentence after a
   known abbreviation (``Dr.``, ``e.g.``, ``Jan.`` ...), a capital initial
   (``J. K. Rowling``) or a list number that would stand alone (``1.``). An
   ellipsis followed by a lowercase word, and ``?``/``!`` plus a closing quote
   followed by a lowercase word (``"Really?" she asked``), continue the
   sentence.
3. A sentence longer than ``max_chars`` is cut where the cost is lowest:
   strong clause marks (``; :`` and free-standing dashes) before commas,
   commas before plain spaces, and hard cuts inside a word only for a word
   longer than ``max_chars``; with the fewest segments, kept close to equal
   length.
4. Segments shorter than ``min_chars`` are merged into a neighbour on the same
   line when the result fits; segments with no letter or digit at all are
   merged into a neighbour, or dropped when none has room.

Every letter and digit of the input survives, in order, and no segment is
empty or longer than ``max_chars``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable

__all__ = ["normalize_text", "split_segments"]

# Sentence terminators that need a space (or the end of the line) after them.
_LATIN_TERMINATORS = ".!?…‼⁇⁈⁉‽．"
# Terminators of scripts that write no space between sentences, or that are never
# used inside a word: CJK, Devanagari dandas, Arabic/Urdu, Ethiopic, Armenian,
# Myanmar, Khmer. They end a sentence whatever follows.
_SCRIPT_TERMINATORS = "。！？｡।॥؟۔።፧፨։။។៕"
_TERMINATORS = _LATIN_TERMINATORS + _SCRIPT_TERMINATORS
_DOTS = ".．…"
_CLOSERS = "\"'”’»›)]}」』）】〉》〕〗〙〛＂＇"
_OPENERS = "\"'“‘„‚«‹([{「『（【〈《〔〖〘〚＂＇¿¡"
_BRACKETS_CLOSE = '")]}”»›」』）】〉》〕〗〙〛＂'
_BRACKETS_OPEN = '"([{“„«‹「『（【〈《〔〖〘〚＂'
_STRONG_CLAUSE = ";:؛；：፤፥፦"
_WEAK_CLAUSE = ",،，、፣၊"
_DASHES = "-‐‒–—―"
# Clause marks after which a cut is allowed even without a following space.
_UNSPACED_CLAUSE = "，、；：၊"

_TERMINATOR_RUN = re.compile(f"(?:[{re.escape(_TERMINATORS)}]+[{re.escape(_CLOSERS)}]*)+")
_INVISIBLE = re.compile("[\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")
_DOTTED_ACRONYM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_LIST_MARKER = re.compile(r"\d{1,3}|[^\W\d_]|[ivxIVX]{1,4}")

# Never end a sentence after these when capitalised ("Dr.", "Jan."); lowercase
# "no", "mar" or "st" are left alone. Includes Swahili (Bw., Bi., Dkt., Mhe.,
# Mwl.) and Luganda (Ow'ek.) honorifics.
_TITLE_ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "mx", "dr", "prof", "rev", "fr", "hon", "rt", "gen", "col", "lt",
        "capt", "cpt", "sgt", "maj", "cpl", "gov", "sen", "rep", "pres", "supt", "insp",
        "st", "mt", "messrs", "mme", "mlle", "eng", "amb", "pst", "jan", "feb", "mar", "apr",
        "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "bw", "bi", "dkt", "mhe",
        "mh", "mwl", "ow'ek",
    }
)  # fmt: skip
# Never end a sentence after these, in any case.
_ALWAYS_ABBREVIATIONS = frozenset(
    {"e.g", "eg", "i.e", "ie", "cf", "viz", "vs", "approx", "ca", "esp", "incl", "k.m"}
)
# These often end a sentence: they do when the next word is capitalised.
_FINAL_ABBREVIATIONS = frozenset(
    {"etc", "inc", "ltd", "co", "corp", "jr", "sr", "bros", "al", "n.k", "a.m", "p.m", "ft"}
)
# Followed by a number these never end a sentence ("No. 5", "Tel. 0772"); "No. I won't" does.
_NUMBER_ABBREVIATIONS = frozenset(
    {
        "no", "nos", "nr", "art", "vol", "vols", "fig", "figs", "ch", "chap", "sec", "pp",
        "p", "op", "ed", "tel", "eq", "para", "ref",
    }
)  # fmt: skip

# Cut levels inside an over-long sentence, and the cost of cutting there
# (a segment costs 1, so a plain word boundary costs more than an extra segment).
_STRONG, _WEAK, _WORD, _HARD = range(4)
_CUT_COST = (0.0, 0.25, 2.0, 6.0)


def normalize_text(text: str) -> str:
    """Drop invisible format characters (BOM, soft hyphen, zero-width space, bidi
    marks), NFC, turn control characters and every run of whitespace (newlines,
    tabs, NBSP ...) into one space, and strip.

    Quotes, dashes and other punctuation are kept as they are.
    """
    text = _CONTROL.sub(" ", _INVISIBLE.sub("", text))
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip()


def split_segments(text: str, max_chars: int = 300, min_chars: int = 1) -> list[str]:
    """Split raw ``text`` into normalised segments of at most ``max_chars`` characters.

    Line breaks are hard boundaries, sentences are split at their terminators,
    and over-long sentences at clause boundaries (see the module docstring).
    Segments shorter than ``min_chars`` are merged into a neighbour on the same
    line when the result fits. Returns ``[]`` when nothing speakable is left.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    segments: list[str] = []
    for line in text.splitlines():
        paragraph = normalize_text(line)
        if not paragraph:
            continue
        spans: list[tuple[int, int]] = []
        for start, end in _sentence_spans(paragraph):
            if end - start <= max_chars:
                spans.append((start, end))
            else:
                spans.extend(
                    (start + a, start + b)
                    for a, b in _clause_spans(paragraph[start:end], max_chars)
                )
        spans = _merge_spans(paragraph, spans, max_chars, min_chars)
        segments.extend(paragraph[a:b] for a, b in spans)
    return _absorb_unspeakable(segments, max_chars)


def _has_alnum(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] == " ":
        start += 1
    while end > start and text[end - 1] == " ":
        end -= 1
    return start, end


# --- sentences ---------------------------------------------------------------------


def _sentence_spans(paragraph: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence in a normalised paragraph."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _TERMINATOR_RUN.finditer(paragraph):
        if _ends_sentence(paragraph, start, match):
            span = _strip_span(paragraph, start, match.end())
            if span[0] < span[1]:
                spans.append(span)
            start = match.end()
    span = _strip_span(paragraph, start, len(paragraph))
    if span[0] < span[1]:
        spans.append(span)
    return spans


def _ends_sentence(paragraph: str, start: int, match: re.Match[str]) -> bool:
    run, end = match.group(), match.end()
    marks = [ch for ch in run if ch in _TERMINATORS]
    unspaced = any(ch in _SCRIPT_TERMINATORS for ch in marks)
    if end < len(paragraph) and paragraph[end] != " " and not unspaced:
        return False  # 3.5, v2.0, example.com, a...b
    before = paragraph[start : match.start()]
    if not _has_alnum(before):
        return False  # nothing to say yet ("... and then", "?! Hello")
    if end >= len(paragraph):
        return True
    following = paragraph[end:].lstrip(" ").split(" ", 1)[0].lstrip(_OPENERS)
    first = following[:1]
    if run[-1] in _CLOSERS and first.islower():
        return False  # "Really?" she asked.
    if unspaced or any(ch not in _DOTS for ch in marks):
        return True
    if "…" in marks or len(marks) > 1:
        return not first.islower()  # an ellipsis continues before a lowercase word
    words = before.split()
    token = words[-1].lstrip(_OPENERS) if words else ""
    if len(words) == 1 and _LIST_MARKER.fullmatch(token):
        return False  # "1. Open the door." -- the number would stand alone
    return not _is_abbreviation(token, first)


def _is_abbreviation(token: str, first: str) -> bool:
    """Whether the ``.`` after ``token`` belongs to an abbreviation, given the
    first character of the next word."""
    if not token:
        return False
    key = token.lower().replace("’", "'")
    if key in _ALWAYS_ABBREVIATIONS:
        return True
    if token[0].isupper() and key in _TITLE_ABBREVIATIONS:
        return True
    if key in _NUMBER_ABBREVIATIONS and first.isdigit():
        return True
    if len(token) == 1 and token.isalpha():
        return token.isupper() or not first.isupper()  # J. K. Rowling; "p. 5"
    if _DOTTED_ACRONYM.fullmatch(token):
        return token.isupper() or not first.isupper()  # U.S. Army; "5 p.m. Then"
    return key in _FINAL_ABBREVIATIONS and not first.isupper()


# --- clauses -----------------------------------------------------------------------


def _cut_level(sentence: str, space: int) -> int:
    """How good a place the space at ``space`` is to cut ``sentence``."""
    token_start = sentence.rfind(" ", 0, space) + 1
    token = sentence[token_start:space]
    if token and all(ch in _DASHES for ch in token):
        return _STRONG  # a free-standing dash: "word — word"
    j = space
    while j > token_start and sentence[j - 1] in _CLOSERS:
        j -= 1
    closed = any(ch in _BRACKETS_CLOSE for ch in sentence[j:space])
    last = sentence[j - 1] if j > token_start else ""
    if last in _STRONG_CLAUSE or (last in _TERMINATORS and last not in _DOTS):
        return _STRONG
    if last in _WEAK_CLAUSE or last == "…" or sentence[j - 2 : j] == "..":
        return _WEAK
    if closed or sentence[space + 1 : space + 2] in tuple(_BRACKETS_OPEN):
        return _WEAK
    return _WORD


def _clause_spans(sentence: str, max_chars: int) -> list[tuple[int, int]]:
    """Cut a normalised sentence into spans of at most ``max_chars`` characters."""
    length = len(sentence)
    if length <= max_chars:
        return [(0, length)]
    # Cuts as (end of the left piece, start of the right piece, level).
    cuts: list[tuple[int, int, int]] = []
    for i, ch in enumerate(sentence):
        if ch == " ":
            cuts.append((i, i + 1, _cut_level(sentence, i)))
        elif ch in _UNSPACED_CLAUSE and i + 1 < length and sentence[i + 1] != " ":
            cuts.append((i + 1, i + 1, _STRONG if ch in _STRONG_CLAUSE else _WEAK))
    # Hard cuts inside any stretch with no cut that is longer than max_chars.
    hard: list[tuple[int, int, int]] = []
    start = 0
    for end, next_start, _ in [*cuts, (length, length, _HARD)]:
        pos = start
        while end - pos > max_chars:
            pieces = math.ceil((end - pos) / max_chars)
            cut = pos + math.ceil((end - pos) / pieces)
            while cut > pos + 1 and unicodedata.category(sentence[cut]).startswith("M"):
                cut -= 1  # keep combining marks with their base character
            hard.append((cut, cut, _HARD))
            pos = cut
        start = next_start
    nodes = [(0, 0, _STRONG), *sorted(cuts + hard), (length, length, _STRONG)]

    # Cheapest segmentation: one per segment, the cut costs, and the squared
    # deviation from an even split into the fewest segments.
    ideal = length / math.ceil(length / max_chars)
    scale = 1.0 / max_chars
    starts = [node[1] for node in nodes]
    best = [math.inf] * len(nodes)
    back = [0] * len(nodes)
    best[0] = 0.0
    first = 0  # the first node a segment ending at the current node can start from
    for j in range(1, len(nodes)):
        end, _, level = nodes[j]
        while end - starts[first] > max_chars:
            first += 1
        best_cost, best_from = math.inf, first
        for i in range(first, j):
            size = end - starts[i]
            if size > 0:
                cost = best[i] + ((size - ideal) * scale) ** 2
                if cost < best_cost:
                    best_cost, best_from = cost, i
        cut_cost = 0.0 if j == len(nodes) - 1 else _CUT_COST[level]
        best[j], back[j] = best_cost + 1.0 + cut_cost, best_from
    spans: list[tuple[int, int]] = []
    j = len(nodes) - 1
    while j > 0:
        i = back[j]
        spans.append((nodes[i][1], nodes[j][0]))
        j = i
    return spans[::-1]


# --- merging -----------------------------------------------------------------------


def _merge_spans(
    paragraph: str, spans: list[tuple[int, int]], max_chars: int, min_chars: int
) -> list[tuple[int, int]]:
    """Merge spans with no letter or digit, then spans shorter than ``min_chars``,
    into a neighbour within the paragraph when the merged span fits."""

    def merge(
        spans: list[tuple[int, int]], is_small: Callable[[int, int], bool]
    ) -> list[tuple[int, int]]:
        spans = list(spans)
        out: list[tuple[int, int]] = []
        for index, (start, end) in enumerate(spans):
            if is_small(start, end):
                if out and end - out[-1][0] <= max_chars:
                    out[-1] = (out[-1][0], end)
                    continue
                if index + 1 < len(spans) and spans[index + 1][1] - start <= max_chars:
                    spans[index + 1] = (start, spans[index + 1][1])
                    continue
            out.append((start, end))
        return out

    spans = merge(spans, lambda a, b: not _has_alnum(paragraph[a:b]))
    if min_chars > 1:
        spans = merge(spans, lambda a, b: b - a < min_chars)
    return spans


def _absorb_unspeakable(segments: list[str], max_chars: int) -> list[str]:
    """Join segments with no letter or digit to a neighbour (previous first), or drop them."""
    out: list[str] = []
    pending = ""
    for segment in segments:
        if pending and len(pending) + 1 + len(segment) <= max_chars:
            segment = f"{pending} {segment}"
        pending = ""
        if _has_alnum(segment):
            out.append(segment)
        elif out and len(out[-1]) + 1 + len(segment) <= max_chars:
            out[-1] = f"{out[-1]} {segment}"
        else:
            pending = segment
    return out

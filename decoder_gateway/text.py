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
3. A sentence longer than ``max_chars`` is cut greedily, front to back: each
   piece ends at the cheapest cut within its first ``max_chars`` characters.
   Strong clause marks (``; :`` and free-standing dashes) cost less than
   commas, commas less than plain spaces, and a piece far shorter than
   ``max_chars`` costs more (it makes more, shorter requests); a word longer
   than ``max_chars`` is cut hard only where no other cut is in reach. A cut
   depends on the next ``max_chars + 2`` characters only, never on where the
   sentence ends, so :class:`TextSegmenter` can release the first piece of a
   long sentence while the model is still writing the rest. (A balanced cut
   would read better for the last piece but needs the whole sentence first.)
4. Segments shorter than ``min_chars`` are merged into a neighbour on the same
   line when the result fits. A segment with no letter or digit at all is
   merged into a neighbour on its line (the previous one first) when the
   result fits, else put in front of the next segment, even on a later line,
   when that fits, else dropped. It never joins a segment before a line break,
   so a line break settles everything before it.

Every letter and digit of the input survives, in order, and no segment is
empty or longer than ``max_chars``.

:class:`TextSegmenter` applies the same rules to text that arrives in
fragments (a voice agent's LLM writing its reply token by token) and releases
each segment as soon as no later text can change it.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import unicodedata
from collections.abc import Callable

__all__ = ["TextSegmenter", "normalize_text", "split_segments"]

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

# Cut levels inside an over-long sentence, and the cost of cutting there. A piece
# ending at n also costs _SHORT_COST * (1 - n / max_chars) ** 2: a comma beats a
# plain space at max_chars when it ends past about a third of max_chars, and a
# strong mark beats a comma at max_chars when it ends within the last quarter.
# A hard cut inside a word is only made where none of these is in reach.
_STRONG, _WEAK, _WORD = range(3)
_CUT_COST = (0.0, 0.25, 2.0)
_SHORT_COST = 4.0

# Every line break of str.splitlines().
_LINE_BREAK = re.compile("[\n\x0b\x0c\r\x1c\x1d\x1e\x85\u2028\u2029]")
_ALNUM = re.compile(r"[^\W_]")  # exactly the characters of str.isalnum()
_UNSPACED_CLAUSE_RE = re.compile(f"[{re.escape(_UNSPACED_CLAUSE)}]")


def _clean(text: str) -> str:
    """Drop invisible format characters and turn control characters into spaces."""
    return _CONTROL.sub(" ", _INVISIBLE.sub("", text))


def normalize_text(text: str) -> str:
    """Drop invisible format characters (BOM, soft hyphen, zero-width space, bidi
    marks), NFC, turn control characters and every run of whitespace (newlines,
    tabs, NBSP ...) into one space, and strip.

    Quotes, dashes and other punctuation are kept as they are.
    """
    text = unicodedata.normalize("NFC", _clean(text))
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
            spans.extend(
                (start + a, start + b) for a, b in _clause_spans(paragraph[start:end], max_chars)
            )
        spans = _merge_spans(paragraph, spans, max_chars, min_chars)
        segments.extend(paragraph[a:b] for a, b in spans)
    return _absorb_unspeakable(segments, max_chars)


def _has_alnum(text: str) -> bool:
    return _ALNUM.search(text) is not None


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


def _ends_sentence(
    paragraph: str, start: int, match: re.Match[str], final: bool = True
) -> bool | None:
    """Whether the terminator run ``match`` ends the sentence that began at ``start``.

    With ``final=False`` the paragraph may still grow: the answer is ``None``
    while it depends on text that has not arrived (the run must already be
    followed by a character). Reads only the sentence so far and the first
    word after the run, so a stream pays per run, not per paragraph.
    """
    run, end = match.group(), match.end()
    marks = [ch for ch in run if ch in _TERMINATORS]
    unspaced = any(ch in _SCRIPT_TERMINATORS for ch in marks)
    if end < len(paragraph) and paragraph[end] != " " and not unspaced:
        return False  # 3.5, v2.0, example.com, a...b
    before_start, before_end = _strip_span(paragraph, start, match.start())
    if not _ALNUM.search(paragraph, before_start, before_end):
        return False  # nothing to say yet ("... and then", "?! Hello")
    first = _following_first(paragraph, end, final)
    if first is None:
        return None
    if end >= len(paragraph):
        return True
    if run[-1] in _CLOSERS and first.islower():
        return False  # "Really?" she asked.
    if unspaced or any(ch not in _DOTS for ch in marks):
        return True
    if "…" in marks or len(marks) > 1:
        return not first.islower()  # an ellipsis continues before a lowercase word
    space = paragraph.rfind(" ", before_start, before_end)
    token = paragraph[max(space + 1, before_start) : before_end].lstrip(_OPENERS)
    if space < 0 and _LIST_MARKER.fullmatch(token):
        return False  # "1. Open the door." -- the number would stand alone
    return not _is_abbreviation(token, first)


def _following_first(paragraph: str, end: int, final: bool) -> str | None:
    """First character of the word after ``end``, past opening quotes and brackets;
    ``""`` when that word has none or the paragraph ends; ``None`` when it is not
    known yet (``final=False`` and the paragraph ends before it)."""
    length = len(paragraph)
    pos = end
    while pos < length and paragraph[pos] == " ":
        pos += 1
    while pos < length and paragraph[pos] in _OPENERS:
        pos += 1
    if pos < length:
        return "" if paragraph[pos] == " " else paragraph[pos]
    return "" if final else None


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


def _first_cut(sentence: str, max_chars: int) -> tuple[int, int]:
    """Where to cut a normalised sentence longer than ``max_chars``: (end of the
    first piece, start of the rest).

    Reads ``sentence[: max_chars + 2]`` only -- the contract that lets
    :class:`TextSegmenter` cut a sentence that has not ended yet. The cheapest
    cut wins (see ``_CUT_COST`` and ``_SHORT_COST``); on a tie the later one,
    which leaves fewer pieces.
    """
    best_cost, best = math.inf, (0, 0)
    for end in range(1, max_chars + 1):
        if sentence[end] == " ":
            level, start = _cut_level(sentence, end), end + 1
        elif sentence[end - 1] in _UNSPACED_CLAUSE:  # "你好，再见"
            level = _STRONG if sentence[end - 1] in _STRONG_CLAUSE else _WEAK
            start = end
        else:
            continue
        cost = _CUT_COST[level] + _SHORT_COST * (1.0 - end / max_chars) ** 2
        if cost <= best_cost:
            best_cost, best = cost, (end, start)
    if best_cost < math.inf:
        return best
    cut = max_chars  # no cut in reach: cut inside the word
    while cut > 1 and unicodedata.category(sentence[cut]).startswith("M"):
        cut -= 1  # keep combining marks with their base character
    return cut, cut


def _clause_spans(sentence: str, max_chars: int) -> list[tuple[int, int]]:
    """Cut a normalised sentence into spans of at most ``max_chars`` characters."""
    spans: list[tuple[int, int]] = []
    pos, length = 0, len(sentence)
    while length - pos > max_chars:
        end, start = _first_cut(sentence[pos : pos + max_chars + 2], max_chars)
        spans.append((pos, pos + end))
        pos += start
    spans.append((pos, length))
    return spans


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
    """Put segments with no letter or digit in front of the next segment when the
    result fits, or drop them.

    Only forwards: joining one to the segment before it would let a line that
    has not arrived yet change a line that has, and :class:`TextSegmenter`
    releases a line's last segment at its line break.
    """
    out: list[str] = []
    pending = ""
    for segment in segments:
        if pending and len(pending) + 1 + len(segment) <= max_chars:
            segment = f"{pending} {segment}"
        pending = ""
        if _has_alnum(segment):
            out.append(segment)
        else:
            pending = segment
    return out


# --- streaming ---------------------------------------------------------------------


@functools.cache
def _composition_pairs() -> tuple[frozenset[str], frozenset[str]]:
    """(first, second) characters of the pairs that canonical composition joins.

    Computed once from the Unicode data of the running Python (every canonical
    decomposition is below U+30000), plus the Hangul jamo that compose
    algorithmically. A superset is harmless: it only holds text back longer.
    """
    firsts = {chr(cp) for cp in range(0x1100, 0x1113)}
    seconds = {chr(cp) for cp in range(0x1161, 0x1176)} | {chr(cp) for cp in range(0x11A8, 0x11C3)}
    for cp in range(0x30000):
        decomposition = unicodedata.decomposition(chr(cp))
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                firsts.add(chr(int(parts[0], 16)))
                seconds.add(chr(int(parts[1], 16)))
    return frozenset(firsts), frozenset(seconds)


@functools.lru_cache(maxsize=4096)
def _starts_cluster(ch: str) -> bool:
    """Whether NFC never joins ``ch`` (or what follows it) to the text before it,
    so that NFC(a + b) == NFC(a) + NFC(b) when ``b`` starts with ``ch``."""
    if _INVISIBLE.match(ch):
        return False  # dropped before NFC: what follows it meets what precedes it
    if unicodedata.combining(ch) or ch in _composition_pairs()[1]:
        return False
    return unicodedata.combining(unicodedata.normalize("NFD", ch)[0]) == 0


@functools.lru_cache(maxsize=4096)
def _ends_cluster(ch: str) -> bool:
    """Whether NFC never changes ``ch`` or joins what follows to it, so that
    NFC(a + b) == NFC(a) + NFC(b) when ``a`` ends with ``ch`` ("。", "你", "."
    but not "e", which a later U+0301 turns into "é")."""
    if _INVISIBLE.match(ch) or unicodedata.combining(ch) or "\uac00" <= ch <= "\ud7a3":
        return False  # Hangul syllables compose with a final jamo
    decomposition = unicodedata.decomposition(ch)
    if decomposition and not decomposition.startswith("<"):
        return False  # a mark that follows may be reordered into it
    firsts, seconds = _composition_pairs()
    # A second may join the character before it into one that composes further
    # (a Hangul vowel jamo makes an LV syllable, which takes a final jamo).
    return ch not in firsts and ch not in seconds


def _normalized_length(raw: str, after_space: bool) -> int:
    """Length ``raw`` adds to a normalised paragraph (trailing space included) when
    the paragraph so far is empty or ends with a space (``after_space``)."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", _clean(raw)))
    return len(text) - (1 if after_space and text.startswith(" ") else 0)


class TextSegmenter:
    """:func:`split_segments` for text that arrives in fragments.

    Feed the fragments in order, then call :meth:`flush` once at the end of the
    utterance::

        segmenter = TextSegmenter(max_chars=300)
        for token in llm_reply:
            for segment in segmenter.feed(token):
                synthesise(segment)
        for segment in segmenter.flush():
            synthesise(segment)

    For any text and any cut into fragments (inside words, inside ``...``,
    between ``\\r`` and ``\\n``, between a letter and its combining mark), the
    segments of all :meth:`feed` calls followed by :meth:`flush` are exactly
    ``split_segments(text, max_chars)``.

    A segment is released as soon as no later text can change it:

    - a sentence once the text after its terminator decides that it ends
      (a space and the first letter of the next word: ``Hello there. How``
      releases ``Hello there.``, while ``Dr. O`` or ``Wait... w`` continue it);
    - anything before a line break, at the line break;
    - the first piece of a sentence longer than ``max_chars`` once
      ``max_chars + 2`` of its characters have arrived (rule 3 reads no further);
    - but not while a following piece without a letter or digit (``...``,
      ``—``) could still be merged into it (rule 4): that waits until the next
      piece surely has a letter or digit (its first word has one), or is too
      long to merge. A sentence that opens with such a word (``— and then``)
      holds the segment before it until that sentence ends or is cut.

    A letter that a combining mark can still change (NFC turns "e" and a later
    U+0301 into "é") is held until the next character arrives; "。", "你" or
    a space are not.

    Each fragment costs time in proportion to its length plus what it lets the
    rules decide: the paragraph is scanned once, from where the last undecided
    terminator run starts, and clause cuts read ``max_chars + 2`` characters.
    Text before the open sentence and the first unreleased segment is dropped
    from the buffer.
    """

    # Drop released text from the front of the paragraph once this much of it
    # has accumulated (a class attribute so tests can make it small).
    _trim_at = 4096

    def __init__(self, max_chars: int = 300) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        self._reset()

    # --- public API ------------------------------------------------------------------

    def feed(self, fragment: str) -> list[str]:
        """Add the next piece of text; return the segments that are now certain, in order."""
        out: list[str] = []
        pos = 0
        for match in _LINE_BREAK.finditer(fragment):
            self._append(fragment[pos : match.start()])
            self._end_line(out, match.group())
            pos = match.end()
        self._append(fragment[pos:])
        self._advance(out, final=False)
        self._trim()
        return out

    def flush(self) -> list[str]:
        """End of the utterance: return every segment still held, and start afresh."""
        out: list[str] = []
        self._end_line(out, "")
        self._reset()
        return out

    @property
    def buffered(self) -> str:
        """The raw text received and not yet released, from its first held character
        on (the space between a released segment and the next is not counted); a
        segment with no letter or digit that waits for the next line keeps its
        line here."""
        return "".join(self._held_lines) + self._line_held()

    # --- state -----------------------------------------------------------------------

    def _reset(self) -> None:
        # Across lines: a segment with no letter or digit waiting to be put in
        # front of the next segment (rule 4), and the raw lines it keeps held.
        self._pending = ""
        self._held_lines: list[str] = []
        self._reset_line()

    def _reset_line(self) -> None:
        # Offsets below index self._para, the normalised text of the current line
        # so far: final except that a trailing space goes when the line ends.
        self._raw_tail = ""  # raw text NFC may still change (no cluster start after it)
        self._para = ""
        # (offset in _para, raw text, whether it followed a space): maps back to raw.
        self._chunks: list[tuple[int, str, bool]] = []
        self._sentence = 0  # where the open sentence starts (the end of the last one)
        self._scan = 0  # where the first undecided terminator run starts (or len(_para))
        self._cut = 0  # where the rest of the open sentence starts after early cuts
        self._open: tuple[int, int] | None = None  # last merged span, if it can still grow
        self._deferred: tuple[int, int] | None = None  # a piece with no letter or digit
        self._released = 0  # end of the last released (or dropped) text

    # --- normalisation ---------------------------------------------------------------

    def _append(self, raw: str) -> None:
        """Add raw text of the current line; normalise what NFC can no longer change."""
        if not raw:
            return
        tail = self._raw_tail + raw
        cut = len(tail)
        if not _ends_cluster(tail[-1]):
            cut -= 1
            while cut > 0 and not (tail[cut] < "\x80" or _starts_cluster(tail[cut])):
                cut -= 1
        if cut > 0:
            self._commit(tail[:cut])
            tail = tail[cut:]
        self._raw_tail = tail

    def _commit(self, raw: str) -> None:
        """Normalise ``raw`` (ending where NFC is settled) onto the paragraph."""
        if not raw:
            return
        after_space = not self._para or self._para[-1] == " "
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", _clean(raw)))
        if after_space and text.startswith(" "):
            text = text[1:]
        self._chunks.append((len(self._para), raw, after_space))
        self._para += text

    def _end_line(self, out: list[str], line_break: str) -> None:
        """The current line is complete: settle it and release all of it."""
        self._commit(self._raw_tail)
        self._raw_tail = ""
        if self._para.endswith(" "):
            self._para = self._para[:-1]
        self._advance(out, final=True)
        self._held_lines = [self.buffered + line_break] if self._pending else []
        self._reset_line()

    # --- segmentation ----------------------------------------------------------------

    def _advance(self, out: list[str], final: bool) -> None:
        """Decide what the paragraph so far allows; with ``final`` it is complete."""
        para = self._para
        while True:
            match = _TERMINATOR_RUN.search(para, self._scan)
            if match is None:
                self._scan = len(para)
                break
            if not final and match.end() == len(para):
                ends = None  # the run may still grow
            else:
                ends = _ends_sentence(para, self._sentence, match, final)
            if ends is None:  # wait for more text
                self._scan = match.start()
                break
            self._scan = match.end()
            if ends:
                self._close_sentence(match.end(), out)
        if final:
            self._close_sentence(len(para), out)
            if self._open is not None:
                self._release(*self._open, out)
            if self._deferred is not None:
                self._release(*self._deferred, out)
            self._open = self._deferred = None
            return
        self._cut_open_sentence(out)
        if self._open is not None:
            bound = self._next_piece_bound()
            # The next piece cannot merge into the open span when it has a letter
            # or digit, or when the merge would be too long.
            if bound is not None and (bound[1] or bound[0] - self._open[0] > self.max_chars):
                self._release(*self._open, out)
                self._open = None

    def _open_sentence(self) -> tuple[int, int]:
        """(start of the unreleased rest of the open sentence, end of what surely
        belongs to it)."""
        para = self._para
        start = self._sentence
        if start < len(para) and para[start] == " ":
            start += 1
        if self._scan < len(para):
            known = self._scan + 1  # it ends with the undecided run or later
        else:
            known = len(para) - (1 if para.endswith(" ") else 0)
        return max(start, self._cut), known

    def _close_sentence(self, end: int, out: list[str]) -> None:
        """The sentence that started at ``self._sentence`` ends at ``end``: cut it (rule 3)."""
        start, stop = _strip_span(self._para, self._sentence, end)
        if start < stop:
            pos = max(start, self._cut)
            while stop - pos > self.max_chars:
                window = self._para[pos : min(stop, pos + self.max_chars + 2)]
                cut_end, cut_start = _first_cut(window, self.max_chars)
                self._piece(pos, pos + cut_end, out)
                pos += cut_start
            self._piece(pos, stop, out)
        self._sentence = self._cut = end

    def _cut_open_sentence(self, out: list[str]) -> None:
        """Cut pieces off an unfinished sentence once it is surely longer than
        ``max_chars`` and the ``max_chars + 2`` characters that rule 3 reads are in."""
        pos, known = self._open_sentence()
        while known - pos >= self.max_chars + 2:
            window = self._para[pos : pos + self.max_chars + 2]
            cut_end, cut_start = _first_cut(window, self.max_chars)
            self._piece(pos, pos + cut_end, out)
            pos += cut_start
            self._cut = pos

    def _next_piece_bound(self) -> tuple[int, bool] | None:
        """For the first piece of the open sentence: (a lower bound of its end,
        whether it surely has a letter or digit), or ``None`` before it starts."""
        pos, known = self._open_sentence()
        if known <= pos:
            return None
        para, max_chars = self._para, self.max_chars
        # The first cut of rule 3 cannot end before the first space or unspaced
        # clause mark; without one in reach, a hard cut ends at or after the last
        # character that is not a combining mark.
        first = para.find(" ", pos, known)
        length = first - pos if first >= 0 else known - pos
        mark = _UNSPACED_CLAUSE_RE.search(para, pos, known)
        if mark is not None:
            length = min(length, mark.end() - pos)
        if (first < 0 and mark is None) or length > max_chars:
            length = known - pos - 1
            while length > 1 and unicodedata.category(para[pos + length]).startswith("M"):
                length -= 1
            length = max(length, 1)
        return pos + length, _ALNUM.search(para, pos, pos + length) is not None

    def _piece(self, start: int, end: int, out: list[str]) -> None:
        """Merge one final piece of the paragraph the way ``_merge_spans`` does."""
        if self._deferred is not None:
            deferred_start, deferred_end = self._deferred
            self._deferred = None
            if end - deferred_start <= self.max_chars:
                start = deferred_start  # merged into this piece
            else:
                self._release(deferred_start, deferred_end, out)
        if _ALNUM.search(self._para, start, end) is None:
            # With self._open released, the merge into the previous span could
            # not fit anyway: the release checked exactly that.
            if self._open is not None and end - self._open[0] <= self.max_chars:
                self._open = (self._open[0], end)
                return
            if self._open is not None:
                self._release(*self._open, out)
                self._open = None
            self._deferred = (start, end)  # merged into the next piece, if it fits
            return
        if self._open is not None:
            self._release(*self._open, out)
        self._open = (start, end)

    def _release(self, start: int, end: int, out: list[str]) -> None:
        """A merged span is final: apply rule 4 across lines and release it."""
        text = self._para[start:end]
        pending = self._pending
        self._pending = ""
        if pending and len(pending) + 1 + len(text) <= self.max_chars:
            text = f"{pending} {text}"
        elif pending:  # dropped
            self._held_lines = []
            self._released = start
        if _has_alnum(text):
            out.append(text)
            self._held_lines = []
            self._released = end
        else:
            self._pending = text

    # --- buffer ----------------------------------------------------------------------

    def _line_held(self) -> str:
        """The raw text of the current line that is held (see :attr:`buffered`)."""
        if self._held_lines:  # a pending segment from an earlier line holds all of it
            return "".join(raw for _, raw, _ in self._chunks) + self._raw_tail
        para, offset = self._para, self._released
        while offset < len(para) and para[offset] == " ":
            offset += 1
        if offset >= len(para) or not self._chunks:
            return self._raw_tail
        # The raw character that produced para[offset]: the shortest raw prefix of
        # its chunk that normalises past it, less one.
        index = bisect.bisect_right([start for start, _, _ in self._chunks], offset) - 1
        start, raw, after_space = self._chunks[index]
        low, high = 1, len(raw)
        while low < high:
            mid = (low + high) // 2
            if start + _normalized_length(raw[:mid], after_space) > offset:
                high = mid
            else:
                low = mid + 1
        rest = [raw[low - 1 :]] + [raw for _, raw, _ in self._chunks[index + 1 :]]
        return "".join(rest) + self._raw_tail

    def _trim(self) -> None:
        """Drop text that no rule will read again from the front of the paragraph."""
        base = min(self._released, self._sentence)
        if base < self._trim_at:
            return
        keep = 0  # chunks wholly before base go, except one that ends at base
        while keep + 1 < len(self._chunks) and self._chunks[keep + 1][0] < base:
            keep += 1
        self._chunks = [(start - base, raw, space) for start, raw, space in self._chunks[keep:]]
        self._para = self._para[base:]
        self._sentence -= base
        self._scan -= base
        self._cut -= base
        self._released -= base
        if self._open is not None:
            self._open = (self._open[0] - base, self._open[1] - base)
        if self._deferred is not None:
            self._deferred = (self._deferred[0] - base, self._deferred[1] - base)

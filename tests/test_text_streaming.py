"""Segmentation of text that arrives in fragments (decoder_gateway.text.TextSegmenter)."""

from __future__ import annotations

import random
import time

import pytest

from decoder_gateway.text import TextSegmenter, split_segments


def _stream(fragments: list[str], max_chars: int, trim_at: int | None = None) -> list[str]:
    """Feed ``fragments`` one by one and flush; check ``buffered`` after every feed."""
    segmenter = TextSegmenter(max_chars)
    if trim_at is not None:
        segmenter._trim_at = trim_at  # exercise dropping released text from the buffer
    segments: list[str] = []
    received = ""
    for fragment in fragments:
        segments += segmenter.feed(fragment)
        received += fragment
        # What is held is raw text that arrived last.
        assert received.endswith(segmenter.buffered), (received, segmenter.buffered)
    segments += segmenter.flush()
    assert segmenter.buffered == ""
    return segments


def _fragments(text: str, rng: random.Random) -> list[str]:
    """Cut ``text`` at random places: single characters, small pieces with empty
    ones among them, or larger pieces."""
    mode = rng.randrange(3)
    pieces: list[str] = []
    pos = 0
    while pos < len(text):
        if mode == 0:
            size = 1
        elif mode == 1:
            size = rng.choice([0, 0, 1, 1, 2, 3, 5])
        else:
            size = rng.randint(1, 40)
        pieces.append(text[pos : pos + size])
        pos += size
    if rng.random() < 0.5:
        pieces.insert(rng.randint(0, len(pieces)), "")
    return pieces


# --- contract: the same segments as split_segments, however the text is cut ---------

_PIECES = [
    # words, initials, abbreviations, numbers, URLs
    "Oli", "otya", "bulungi", "nnyo", "webale", "Habari", "yako", "n'abantu", "b'omu",
    "hello", "there", "and", "then", "it", "rained", "she", "asked", "Then", "No",
    "Dr.", "Mr.", "Mrs.", "Prof.", "St.", "Jan.", "e.g.", "i.e.", "etc.", "vs.", "No.", "p.",
    "J.", "K.", "R.", "U.S.", "a.m.", "p.m.", "Ltd.", "Ow'ek.", "k.m.", "1.", "2.", "5.",
    "3.5", "1,000.50", "v2.0", "example.com", "3.14159",
    # ellipses, quotes, brackets, terminators of several scripts
    "...", "…", "....", "Wait...", "Well…", '"Really?"', '"Stop."', "(He left.)", "«Habari?»",
    "“Oli otya?”", "‘Webale.’", "「你好。」", "你好。", "我很好！", "你呢？", "再见，",
    "यह", "है।", "है॥", "ሰላም", "ነው።", "ነህ፧", "؟", "كيف", "حالك؟", "Բարեւ։", "¿Cómo", "¡Muy",
    # clause marks and dashes for over-long sentences
    "one,", "two;", "three:", "—", "–", "-", "so,", "but;", "，", "、",
    # punctuation only
    "***", "?!", "!!!", "---", "…!",
    # long words (longer than some max_chars)
    "kigambokiwanvuennyokigambo", "x" * 45, "y" * 90,
    # combining marks, composition, invisible characters
    "Cafe\u0301", "e\u0301te\u0301", "कि", "किकिकि", "\u1100\u1161\u11a8", "\u0b92\u0bd7",
    "n\u0303o", "A\u030a", "soft\u00adhyphen", "zero\u200bwidth", "\u200eltr", "\ufeffbom",
    "a\u200b\u0301", "\u202bbidi\u202c", "\u00e9\u0323", "e\u0323\u0302", "\uac00\u11a8",
    "\u304b\u3099", "\u0bc6\u0bbe",
]  # fmt: skip
_SUFFIXES = ["", "", "", "", ".", ",", ";", ":", "?", "!", "...", "…", '."', ".)", "?»", "。"]
_SEPARATORS = [
    " ",
    " ",
    " ",
    " ",
    " ",
    " ",
    "  ",
    "\t",
    "\u00a0",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    " \n ",
]


def _random_text(rng: random.Random, words: int) -> str:
    parts = [rng.choice(["", "", " ", "\n", "  \t"])]
    for _ in range(rng.randint(0, words)):
        word = rng.choice(_PIECES)
        if rng.random() < 0.2:
            word = word.capitalize()
        parts.append(word + rng.choice(_SUFFIXES) + rng.choice(_SEPARATORS))
    parts.append(rng.choice(["", "", " ", "\n", "\n\n "]))
    return "".join(parts)


@pytest.mark.parametrize("seed", range(150))
def test_property_same_segments_for_any_fragmentation(seed: int) -> None:
    rng = random.Random(seed)
    text = _random_text(rng, 80)
    for max_chars in (20, 40, 300):
        expected = split_segments(text, max_chars=max_chars)
        for _ in range(3):
            trim_at = rng.choice([None, 1, 30])
            got = _stream(_fragments(text, rng), max_chars, trim_at)
            assert got == expected, (text, max_chars)


@pytest.mark.parametrize("seed", range(80))
def test_property_long_sentences(seed: int) -> None:
    """Few terminators: sentences much longer than max_chars, cut while they arrive."""
    rng = random.Random(1000 + seed)
    words = [w for w in _PIECES if not w.endswith((".", "?", "!", "。", "।", "॥", "።", "؟", "։"))]
    parts = []
    for _ in range(rng.randint(20, 150)):
        parts.append(rng.choice(words) + rng.choice(["", "", "", ",", ";", " —", "，"]))
        parts.append(rng.choice([" "] * 30 + [". ", "\n", "! "]))
    text = "".join(parts)
    for max_chars in (rng.choice([5, 20]), 40, rng.choice([60, 300])):
        expected = split_segments(text, max_chars=max_chars)
        for _ in range(2):
            assert _stream(_fragments(text, rng), max_chars, rng.choice([None, 5])) == expected


def test_property_arbitrary_characters() -> None:
    rng = random.Random(77)
    alphabet = (
        "abcXYZ019 .,;:!?…—-\"'()«»。，！？।؟።\n\r\t\u00a0\u0301\u0308\u0bbe\u1161\x00\ufeff\u200b"
    )
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        max_chars = rng.choice([1, 3, 10, 40, 300])
        expected = split_segments(text, max_chars=max_chars)
        assert _stream(_fragments(text, rng), max_chars) == expected, (text, max_chars)


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Okello saw Mr. Mukasa. Then he left.",
        "Wait... what happened? I don't know... Maybe tomorrow.",
        '"Really?" she asked. "Yes!" he said.',
        "Hello.\r\n***\r\nWorld.\r\n",
        "***\nHello. ?! Bye. —",
        "Cafe\u0301 au lait. Ne\u0301e. \u1100\u1161\u11a8. कि कि।",
        "1. Open the door. 2. Walk in. I have 5. You have 3.",
        "",
        " \n\t \n",
    ],
)
def test_every_cut_into_two_and_single_characters(text: str) -> None:
    for max_chars in (8, 20, 300):
        expected = split_segments(text, max_chars=max_chars)
        assert _stream(list(text), max_chars) == expected
        for cut in range(len(text) + 1):
            assert _stream([text[:cut], text[cut:]], max_chars) == expected, cut


def test_every_line_break_of_splitlines() -> None:
    breaks = [chr(cp) for cp in range(0x10000) if len(f"a{chr(cp)}b".splitlines()) == 2]
    assert len(breaks) == 10
    for line_break in breaks:
        segmenter = TextSegmenter()
        assert segmenter.feed(f"One{line_break}") == ["One"]
        assert segmenter.feed(f"Two{line_break}") == ["Two"]


# --- early release -------------------------------------------------------------------


def test_sentence_released_when_the_next_word_confirms_it() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("Hello there.") == []
    assert segmenter.feed(" ") == []
    assert segmenter.feed("How") == ["Hello there."]
    assert segmenter.buffered == "How"
    assert len(segmenter.buffered) == 3
    assert segmenter.feed(" are you?") == []
    assert segmenter.flush() == ["How are you?"]


@pytest.mark.parametrize(
    "text",
    [
        "Dr.",
        "Dr. ",
        "Dr. O",  # an abbreviation before a name
        "It costs 3.",  # 3.5 or the end of a sentence
        "Wait...",
        "Wait... w",  # an ellipsis before a lowercase word
        '"Really?"',
        '"Really?" s',  # "Really?" she asked
        "J. K",  # an initial
        "1. Open",  # a list number stays with its item
    ],
)
def test_nothing_released_while_the_sentence_may_continue(text: str) -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed(text) == []
    assert segmenter.buffered == text


def test_buffered_is_the_raw_text_held() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("Dr.\u00a0Oke\u200bllo  saw") == []
    assert segmenter.buffered == "Dr.\u00a0Oke\u200bllo  saw"
    assert segmenter.feed(" him.\t\tThen") == ["Dr. Okello saw him."]
    assert segmenter.buffered == "Then"
    assert len(segmenter.buffered) == 4


def test_release_after_abbreviation_that_ends_the_sentence() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("We met at 10 a.m. Then") == ["We met at 10 a.m."]


def test_line_break_releases_at_once() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("Hello") == []
    assert segmenter.feed("\n") == ["Hello"]
    assert segmenter.buffered == ""
    assert segmenter.feed("\r") == []
    assert segmenter.feed("World\r") == ["World"]
    assert segmenter.feed("\n") == []
    assert segmenter.flush() == []


def test_scripts_without_spaces_release_at_the_next_character() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("你好。") == []
    assert segmenter.feed("我很") == ["你好。"]
    assert segmenter.feed("好！你") == ["我很好！"]


def test_punctuation_only_piece_is_held_until_decided() -> None:
    segmenter = TextSegmenter()
    # "—" may merge into "Hello." (rule 4): nothing is certain yet.
    assert segmenter.feed("Hello. — ") == []
    assert segmenter.feed("and") == []  # "— and" is one sentence with letters: no merge
    assert segmenter.feed(" more. Bye") == ["Hello.", "— and more."]
    assert segmenter.flush() == ["Bye"]
    # "?!" opens the next sentence; a long enough sentence could be cut right after
    # it, and "?!" would then merge into "Hello.": held until that sentence ends.
    segmenter = TextSegmenter()
    assert segmenter.feed("Hello. ?! Bye") == []
    assert segmenter.feed(" now. So") == ["Hello.", "?! Bye now."]
    segmenter = TextSegmenter(max_chars=20)
    assert segmenter.feed("Hello. ?! " + "x" * 30) == ["Hello. ?!", "x" * 20]


def test_punctuation_only_line_waits_for_the_next_line() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("Hello.\n***\n") == ["Hello."]
    assert segmenter.buffered == "***\n"
    assert segmenter.feed("World. ") == []
    assert segmenter.feed("Bye") == ["*** World."]
    assert segmenter.flush() == ["Bye"]


def test_combining_mark_in_a_later_fragment() -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed("Cafe") == []
    assert segmenter.feed("\u0301. Next") == ["Café."]
    # The mark arrives after the word that decides whether "..." ends the sentence.
    segmenter = TextSegmenter()
    assert segmenter.feed("Wait... e") == []
    assert segmenter.feed("\u0301") == []
    assert segmenter.flush() == ["Wait... é"]
    segmenter = TextSegmenter()
    assert segmenter.feed("Wait... E") == []  # "E" may still become "É": not decided
    assert segmenter.feed("\u0301") == []
    assert segmenter.feed("t") == ["Wait..."]
    assert segmenter.flush() == ["Ét"]


def test_long_sentence_released_before_it_ends() -> None:
    segmenter = TextSegmenter(max_chars=300)
    text = " ".join(["kigambo"] * 125)  # 999 characters, no punctuation
    released: list[str] = []
    arrived = 0
    for ch in text:
        released += segmenter.feed(ch)
        arrived += 1
        if released:
            break
    assert released and arrived < 320  # the first piece once 302 characters are in
    assert len(released[0]) <= 300
    rest = segmenter.feed(text[arrived:]) + segmenter.flush()
    assert released + rest == split_segments(text, max_chars=300)
    assert len(released + rest) == 4


def test_long_sentence_with_clauses_released_piece_by_piece() -> None:
    clause = "abantu bangi baagenze mu katale okugula emmere"
    text = ", ".join([clause] * 21) + ". Webale."
    segmenter = TextSegmenter(max_chars=100)
    times: list[int] = []
    segments: list[str] = []
    for index, ch in enumerate(text):
        new = segmenter.feed(ch)
        times += [index] * len(new)
        segments += new
    segments += segmenter.flush()
    assert segments == split_segments(text, max_chars=100)
    assert len(times) >= len(segments) - 2
    assert times == sorted(times) and times[0] < 110


@pytest.mark.parametrize("text", ["", " ", "\n\n", "\t \u00a0", "\ufeff\u200b"])
def test_flush_of_nothing_speakable(text: str) -> None:
    segmenter = TextSegmenter()
    assert segmenter.feed(text) == []
    assert segmenter.flush() == []
    assert segmenter.flush() == []
    assert segmenter.buffered == ""


def test_stream_is_reusable_after_flush() -> None:
    segmenter = TextSegmenter(max_chars=40)
    assert segmenter.feed("First one. Sec") == ["First one."]
    assert segmenter.flush() == ["Sec"]
    assert segmenter.feed("Again") == []
    assert segmenter.flush() == ["Again"]


def test_invalid_max_chars() -> None:
    with pytest.raises(ValueError):
        TextSegmenter(max_chars=0)


# --- cost ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_chars", [40, 300])
def test_one_character_at_a_time_is_cheap(max_chars: int) -> None:
    rng = random.Random(5)
    text = _random_text(rng, 2000).replace("\n", " ")[:5000]  # one long line
    text += " " + " ".join(["kigambo"] * 200)  # and a long sentence at its end
    assert len(text) > 5000
    segmenter = TextSegmenter(max_chars)
    started = time.perf_counter()
    segments = [segment for ch in text for segment in segmenter.feed(ch)] + segmenter.flush()
    elapsed = time.perf_counter() - started
    assert segments == split_segments(text, max_chars=max_chars)
    assert elapsed < 1.0, elapsed

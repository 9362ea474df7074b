"""Text normalisation and segmentation (decoder_gateway.text)."""

from __future__ import annotations

import math
import random
import unicodedata

import pytest

from decoder_gateway.text import normalize_text, split_segments


def _alnum(text: str) -> list[str]:
    return [ch for ch in text if ch.isalnum()]


def _is_subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(item == other for other in it) for item in needle)


def _check_invariants(text: str, segments: list[str], max_chars: int) -> None:
    """Non-empty, normalised, within max_chars, no letter or digit lost or reordered."""
    normalized = normalize_text(text)
    for segment in segments:
        assert segment, segments
        assert len(segment) <= max_chars, (len(segment), segment)
        assert segment == normalize_text(segment), segment
        assert _alnum(segment), segment
    assert _alnum("".join(segments)) == _alnum(normalized)
    # Only whole punctuation-only segments may be dropped; nothing is invented.
    assert _is_subsequence(list("".join("".join(segments).split())), list(normalized))


# --- normalize_text ----------------------------------------------------------------


def test_normalize_nfc() -> None:
    assert normalize_text("Cafe\u0301") == "Café"
    assert normalize_text("Cafe\u0301") == unicodedata.normalize("NFC", "Café")


@pytest.mark.parametrize(
    "raw",
    [
        "  Oli   otya?\n\nNze\tbulungi.  ",
        "Oli\u00a0otya?\r\nNze\u2003bulungi.",
        "Oli otya?\u2028Nze\u202fbulungi.\u3000",
        "\ufeffOli otya?\x0bNze bulungi.\x0c",
    ],
)
def test_normalize_whitespace(raw: str) -> None:
    assert normalize_text(raw) == "Oli otya? Nze bulungi."


def test_normalize_control_and_invisible_characters() -> None:
    assert normalize_text("a\x00b\x07c\x1bd\x7fe\x85f") == "a b c d e f"
    assert (
        normalize_text("soft\u00adhyphen zero\u200bwidth \u200eltr") == "softhyphen zerowidth ltr"
    )
    # Joiners matter in some scripts and emoji: kept.
    assert normalize_text("क्\u200dष") == "क्\u200dष"


def test_normalize_keeps_punctuation_and_quotes() -> None:
    text = "“Habari,” alisema — ‘ndiyo’ « oui » „ja“ 3.5% n'abantu…"
    assert normalize_text(text) == text


@pytest.mark.parametrize("raw", ["", " ", "\n\n\t", "\u00a0\u2003", "\ufeff\u200b"])
def test_normalize_empty(raw: str) -> None:
    assert normalize_text(raw) == ""


# --- sentences ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Oli otya? Nze bulungi nnyo. Webale kunjogerako.",
            ["Oli otya?", "Nze bulungi nnyo.", "Webale kunjogerako."],
        ),
        (
            "Habari yako? Ninafurahi kukuona. Bei ni shilingi 3.5 elfu.",
            ["Habari yako?", "Ninafurahi kukuona.", "Bei ni shilingi 3.5 elfu."],
        ),
        (
            "N'abantu b'omu kyalo baagenda. Ne bakomawo!",
            ["N'abantu b'omu kyalo baagenda.", "Ne bakomawo!"],
        ),
        ("Itye nining? Atye maber.", ["Itye nining?", "Atye maber."]),
        ("Oraire ota? Ndaire gye.", ["Oraire ota?", "Ndaire gye."]),
        ("Hello world", ["Hello world"]),
        ("Yes. No. Maybe.", ["Yes.", "No.", "Maybe."]),
        ("What?! No way!!! Really‽ Ok.", ["What?!", "No way!!!", "Really‽", "Ok."]),
    ],
)
def test_sentences(text: str, expected: list[str]) -> None:
    assert split_segments(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Bei ni shilingi 3.5 elfu leo.",
        "I paid 1,000.50 shillings.",
        "Upgrade to v2.0 today.",
        "Pi is about 3.14159 and e is 2.718.",
        "Visit example.com for more.",
        "Write to john.doe@example.co.ug for help.",
        "See https://example.com/a.b?c=d.e for help.",
        "The file is report.final.pdf now.",
    ],
)
def test_no_split_inside_numbers_urls_and_emails(text: str) -> None:
    assert split_segments(text) == [text]


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Okello saw Mr. Mukasa and Mrs. Nakato.",
        "Ms. Achan met Prof. Opio on St. Peter's day.",
        "Fruit, e.g. mangoes, i.e. ripe ones, etc. are sold.",
        "Uganda vs. Kenya ended in a draw.",
        "He lives at No. 5 and reads Vol. 3 and Fig. 2 on p. 7 daily.",
        "It happened on Jan. 5 and Sept. 9 this year.",
        "J. K. Rowling wrote it and George R. R. Martin did not.",
        "The U.S. Army and the U.N. Security Council met.",
        "Bw. Juma na Bi. Amina na Dkt. Mwangi na Mhe. Rais walifika.",
        "Ow'ek. Mayiga yayogedde.",
        "Ow’ek. Mayiga yayogedde.",
        "Send it to S.L.P. 1234 Kampala.",
        "Matunda, k.m. maembe, n.k. yanauzwa.",
        "We meet at 10 a.m. tomorrow.",
    ],
)
def test_abbreviations_do_not_split(text: str) -> None:
    assert split_segments(text) == [text]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "I bought mangoes, oranges, etc. Then I left.",
            ["I bought mangoes, oranges, etc.", "Then I left."],
        ),
        ("We met at 10 a.m. Then we ate.", ["We met at 10 a.m.", "Then we ate."]),
        ("No. I will not go.", ["No.", "I will not go."]),
        ("Say no. Then leave.", ["Say no.", "Then leave."]),
        ("The sun sat low. Then it set.", ["The sun sat low.", "Then it set."]),
        ("He works at Acme Ltd. The pay is good.", ["He works at Acme Ltd.", "The pay is good."]),
    ],
)
def test_abbreviations_that_end_sentences(text: str, expected: list[str]) -> None:
    assert split_segments(text) == expected


def test_lowercase_sentences_still_split() -> None:
    assert split_segments("hello there. how are you. fine thanks.") == [
        "hello there.",
        "how are you.",
        "fine thanks.",
    ]


def test_numbered_list_markers_stay_with_their_item() -> None:
    assert split_segments("1. Open the door. 2. Walk in.") == ["1. Open the door.", "2. Walk in."]
    assert split_segments("I have 5. You have 3.") == ["I have 5.", "You have 3."]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Wait... what happened?", ["Wait... what happened?"]),
        ("Wait… what happened?", ["Wait… what happened?"]),
        ("I don't know... Maybe tomorrow.", ["I don't know...", "Maybe tomorrow."]),
        ("I don't know… Maybe tomorrow.", ["I don't know…", "Maybe tomorrow."]),
        ("...and then it rained.", ["...and then it rained."]),
        ("Well.... Fine.", ["Well....", "Fine."]),
    ],
)
def test_ellipsis(text: str, expected: list[str]) -> None:
    assert split_segments(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ('"Really?" she asked. "Yes!" he said.', ['"Really?" she asked.', '"Yes!" he said.']),
        ("(He left.) Then she came.", ["(He left.)", "Then she came."]),
        ("«Habari?» Ndiyo.", ["«Habari?»", "Ndiyo."]),
        ("“Oli otya?” Nze bulungi.", ["“Oli otya?”", "Nze bulungi."]),
        ("Yagamba nti ‘Webale.’ Ne agenda.", ["Yagamba nti ‘Webale.’", "Ne agenda."]),
        ("「你好。」我很好。", ["「你好。」", "我很好。"]),
    ],
)
def test_closing_quotes_and_brackets_stay_with_sentence(text: str, expected: list[str]) -> None:
    assert split_segments(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("你好。我很好！你呢？", ["你好。", "我很好！", "你呢？"]),
        ("元気ですか？はい、元気です。", ["元気ですか？", "はい、元気です。"]),
        ("यह एक वाक्य है। यह दूसरा है॥", ["यह एक वाक्य है।", "यह दूसरा है॥"]),
        ("यह एक वाक्य है।यह दूसरा है।", ["यह एक वाक्य है।", "यह दूसरा है।"]),
        ("كيف حالك؟ أنا بخير.", ["كيف حالك؟", "أنا بخير."]),
        ("آپ کیسے ہیں؟ میں ٹھیک ہوں۔ شکریہ۔", ["آپ کیسے ہیں؟", "میں ٹھیک ہوں۔", "شکریہ۔"]),
        ("ሰላም ነው። እንዴት ነህ፧ ደህና ነኝ።", ["ሰላም ነው።", "እንዴት ነህ፧", "ደህና ነኝ።"]),
        ("Բարեւ։ Ինչպես ես։", ["Բարեւ։", "Ինչպես ես։"]),
        ("Bonjour ! Ça va ?", ["Bonjour !", "Ça va ?"]),
        ("¿Cómo estás? ¡Muy bien!", ["¿Cómo estás?", "¡Muy bien!"]),
    ],
)
def test_other_scripts(text: str, expected: list[str]) -> None:
    assert split_segments(text) == expected


# --- paragraphs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Oli otya\nNze bulungi",
        "Oli otya\r\nNze bulungi",
        "Oli otya\n\n\nNze bulungi",
        "Oli otya\n  \t \nNze bulungi",
        "Oli otya\u2028Nze bulungi",
        "Oli otya\u2029Nze bulungi",
        "Oli otya\rNze bulungi",
    ],
)
def test_line_breaks_are_hard_boundaries(text: str) -> None:
    assert split_segments(text) == ["Oli otya", "Nze bulungi"]


def test_paragraphs_then_sentences() -> None:
    text = "  Habari yako? Nzuri.\n\nBei ni 3.5\telfu.  \n"
    assert split_segments(text) == ["Habari yako?", "Nzuri.", "Bei ni 3.5 elfu."]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "\t \u00a0\n", "\ufeff"])
def test_empty_input(text: str) -> None:
    assert split_segments(text) == []


# --- punctuation-only and short segments -------------------------------------------


@pytest.mark.parametrize("text", ["...", "!!!", "***\n---\n…", " — ", "?!"])
def test_punctuation_only_input_is_dropped(text: str) -> None:
    assert split_segments(text) == []


def test_punctuation_only_segments_merge_into_a_neighbour() -> None:
    # Across a line break only forwards: a line break settles what came before it.
    assert split_segments("Hello.\n***\nWorld.") == ["Hello.", "*** World."]
    assert split_segments("Hello.\n***") == ["Hello."]
    assert split_segments("***\nHello.") == ["*** Hello."]
    assert split_segments("Hello. ?!") == ["Hello. ?!"]
    assert split_segments("?! Hello.") == ["?! Hello."]


def test_punctuation_only_segment_dropped_when_no_room() -> None:
    assert split_segments("Hello.\n***", max_chars=8) == ["Hello."]


def test_short_sentences_are_kept_by_default() -> None:
    assert split_segments("Yes. Ok. Go!") == ["Yes.", "Ok.", "Go!"]


def test_min_chars_merges_within_a_line() -> None:
    text = "Yes. No. Maybe so, my friend.\nOk."
    assert split_segments(text, min_chars=10) == ["Yes. No. Maybe so, my friend.", "Ok."]
    assert split_segments(text, min_chars=5) == ["Yes. No.", "Maybe so, my friend.", "Ok."]


def test_min_chars_respects_max_chars() -> None:
    segments = split_segments("Yes. Nze bulungi nnyo.", max_chars=12, min_chars=5)
    assert segments == ["Yes.", "Nze bulungi", "nnyo."]


def test_invalid_max_chars() -> None:
    with pytest.raises(ValueError):
        split_segments("Hello.", max_chars=0)


# --- over-long sentences -----------------------------------------------------------


def _words(n: int, word: str = "kigambo") -> str:
    return " ".join([word] * n)


def test_long_sentence_split_at_clauses() -> None:
    clause = "abantu bangi baagenze mu katale okugula emmere"  # 47 characters
    sentence = ", ".join([clause] * 21) + "."
    assert len(sentence) > 1000
    segments = split_segments(sentence, max_chars=300)
    _check_invariants(sentence, segments, 300)
    assert " ".join(segments) == sentence
    assert len(segments) == math.ceil(len(sentence) / 300)
    assert all(segment.endswith(",") for segment in segments[:-1])
    # Greedy (rule 3): each piece takes as many whole clauses as fit.
    assert all(len(segment) + len(f" {clause},") > 300 for segment in segments[:-1])


def test_long_sentence_prefers_strong_boundary() -> None:
    left, right = _words(15), _words(15)  # 119 characters each
    sentence = f"{left}, {_words(2)}; {right}."
    segments = split_segments(sentence, max_chars=200)
    assert segments == [f"{left}, {_words(2)};", f"{right}."]


def test_long_sentence_takes_the_last_clause_in_reach() -> None:
    # The cut reads only the first max_chars + 2 characters, so it cannot balance
    # the pieces (it was [0, 1] + [2, 3] when cuts were balanced over the sentence).
    parts = [_words(10), _words(10), _words(10), _words(10)]  # 79 characters each
    sentence = ", ".join(parts) + "."
    segments = split_segments(sentence, max_chars=300)
    assert segments == [f"{parts[0]}, {parts[1]}, {parts[2]},", f"{parts[3]}."]


def test_long_sentence_strong_mark_beats_a_later_comma_only_when_close() -> None:
    near = f"{_words(10)}; {_words(2)}, {_words(30)}."  # ";" at 80, "," at 97
    assert split_segments(near, max_chars=100)[0] == f"{_words(10)};"
    far = f"{_words(5)}; {_words(7)}, {_words(30)}."  # ";" at 40, "," at 96
    assert split_segments(far, max_chars=100)[0] == f"{_words(5)}; {_words(7)},"


def test_long_sentence_short_first_clause_loses_to_a_word_cut() -> None:
    sentence = f"Yes, {_words(40)}."
    segments = split_segments(sentence, max_chars=100)
    assert segments[0] != "Yes,"
    assert len(segments[0]) > 90


@pytest.mark.parametrize("dash", ["—", "–", "-"])
def test_long_sentence_splits_at_dashes(dash: str) -> None:
    sentence = f"{_words(12)} {dash} {_words(12)}."
    segments = split_segments(sentence, max_chars=120)
    assert segments == [f"{_words(12)} {dash}", f"{_words(12)}."]


def test_long_sentence_without_clauses_splits_at_words() -> None:
    sentence = _words(100) + "."
    segments = split_segments(sentence, max_chars=100)
    _check_invariants(sentence, segments, 100)
    assert " ".join(segments) == sentence
    assert len(segments) == math.ceil(100 / 12)  # at most 12 words of 8 characters fit
    assert all(" " not in segment[:1] + segment[-1:] for segment in segments)


def test_long_word_is_hard_cut() -> None:
    word = "x" * 1000
    segments = split_segments(f"Start {word} end.", max_chars=300)
    _check_invariants(f"Start {word} end.", segments, 300)
    assert "".join(segments).replace(" ", "") == f"Start{word}end."


def test_hard_cut_keeps_combining_marks_with_their_base() -> None:
    word = "कि" * 200  # KA + VOWEL SIGN I (a combining mark)
    segments = split_segments(word, max_chars=25)
    assert "".join(segments) == word
    assert all(len(segment) <= 25 for segment in segments)
    assert not any(unicodedata.category(segment[0]).startswith("M") for segment in segments)


def test_cjk_long_sentence_splits_after_commas() -> None:
    sentence = "你好，" * 100 + "再见。"
    segments = split_segments(sentence, max_chars=50)
    assert "".join(segments) == sentence
    assert all(len(segment) <= 50 for segment in segments)
    assert all(segment.endswith("，") for segment in segments[:-1])


def test_long_sentence_inside_a_paragraph() -> None:
    long = ", ".join([_words(8)] * 12) + "."
    text = f"Oli otya? {long} Webale."
    segments = split_segments(text, max_chars=200)
    assert segments[0] == "Oli otya?"
    assert segments[-1] == "Webale."
    assert " ".join(segments) == text
    assert all(len(segment) <= 200 for segment in segments)


def test_segments_are_slices_of_the_normalised_text() -> None:
    text = "Habari  yako?\tNinafurahi kukuona. Bei ni shilingi 3.5 elfu, " + _words(60) + "."
    segments = split_segments(text, max_chars=120)
    assert " ".join(segments) == normalize_text(text)


# --- properties --------------------------------------------------------------------

_VOCABULARY = [
    "oli", "otya", "Nze", "bulungi", "nnyo", "webale", "kunjogerako", "Habari", "yako",
    "ninafurahi", "kukuona", "bei", "shilingi", "elfu", "n'abantu", "b'omu", "Itye",
    "nining", "maber", "3.5", "1,000.50", "v2.0", "example.com", "Dr.", "Mr.", "e.g.",
    "etc.", "No.", "J.", "K.", "U.S.", "a.m.", "—", "-", "...", "…", "?", "!", "?!", "***",
    "(", ")", "«", "»", "“", "”", "kigambokiwanvuennyokigambo", "你好。", "再见，", "यह", "है।",
    "ሰላም", "ነው።", "؟", "x" * 70,
]  # fmt: skip
_SUFFIXES = ["", "", "", "", ".", ",", ";", ":", "?", "!", "...", "…", '."', ".)", "?»", "。"]
_SPACES = [" ", " ", " ", " ", " ", "  ", "\t", "\u00a0", "\n", "\n\n", "\r\n"]


def _random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 120)):
        word = rng.choice(_VOCABULARY)
        if rng.random() < 0.3:
            word = word.capitalize()
        pieces.append(word + rng.choice(_SUFFIXES) + rng.choice(_SPACES))
    return "".join(pieces)


@pytest.mark.parametrize("seed", range(300))
def test_property_random_text(seed: int) -> None:
    rng = random.Random(seed)
    text = _random_text(rng)
    max_chars = rng.choice([1, 5, 20, 40, 80, 150, 300])
    min_chars = rng.choice([1, 1, 1, 10, 40])
    segments = split_segments(text, max_chars=max_chars, min_chars=min_chars)
    _check_invariants(text, segments, max_chars)
    if not _alnum(text):
        assert segments == []


@pytest.mark.parametrize("seed", range(100))
def test_property_words_preserved_in_order(seed: int) -> None:
    """Latin-script text whose words all fit: every word survives whole, in order."""
    rng = random.Random(seed)
    latin = [w for w in _VOCABULARY if w.isascii() and len(w) < 20]
    suffixes = [s for s in _SUFFIXES if s != "。"]
    words = [
        rng.choice(latin) + rng.choice(suffixes) for _ in range(rng.randint(1, 150))
    ]  # fmt: skip
    text = "".join(word + rng.choice(_SPACES) for word in words)
    max_chars = rng.choice([30, 60, 100, 300])
    segments = split_segments(text, max_chars=max_chars)
    _check_invariants(text, segments, max_chars)
    out_words = " ".join(segments).split()
    in_words = normalize_text(text).split()
    assert [w for w in out_words if _alnum(w)] == [w for w in in_words if _alnum(w)]
    assert _is_subsequence(out_words, in_words)


def test_property_arbitrary_characters() -> None:
    rng = random.Random(1234)
    alphabet = "abcXYZ019 .,;:!?…—-\"'()«»。，！？।؟።\n\t\u00a0\u0301\x00\ufeff"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        max_chars = rng.choice([1, 3, 10, 50, 300])
        _check_invariants(text, split_segments(text, max_chars=max_chars), max_chars)

"""Cloned voices on disk: atomic, create-exclusive publishing that holds across threads
and across library instances sharing one folder (several gateway processes on a volume),
and reads that never break on a crash leftover or a corrupt file."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from decoder_gateway.errors import GatewayError, InvalidRequest, VoiceExists
from decoder_gateway.voices.catalog import Voice, VoiceCatalog
from decoder_gateway.voices.library import VOICE_NAME, ClonedVoice, VoiceLibrary, check_name

TOKENS = [(i * 131) % 4096 for i in range(32)]


def make_voice(name: str, **extra: object) -> ClonedVoice:
    fields: dict[str, object] = {
        "name": name,
        "global_tokens": TOKENS,
        "speaker_id": 241,
        "base_voice": "acholi_female",
    }
    fields.update(extra)
    return ClonedVoice.model_validate(fields)


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Start ``count`` threads together (a barrier) so that they really race."""
    barrier = threading.Barrier(count)

    def body(i: int) -> None:
        barrier.wait()
        target(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()


# --- the model -----------------------------------------------------------------------


def test_model_defaults_and_as_voice() -> None:
    voice = make_voice("amina", language="Acholi", gender="female", consent="yes")
    assert voice.id == "amina" and voice.clip_file is None and voice.ref_text is None
    assert voice.created_at.endswith("Z")
    catalog_voice = voice.as_voice()
    assert isinstance(catalog_voice, Voice)
    assert catalog_voice.model_dump() == {
        "id": "amina",
        "speaker_id": 241,
        "language": "Acholi",
        "gender": "female",
        "global_tokens": TOKENS,
    }
    assert make_voice("x").as_voice().language == ""


@pytest.mark.parametrize(
    "bad",
    [
        {"global_tokens": TOKENS[:31]},
        {"global_tokens": [*TOKENS[:31], 4096]},
        {"global_tokens": [*TOKENS[:31], -1]},
        {"speaker_id": -1},
        {"id": "other"},
        {"name": "a/b"},
        {"created_at": "yesterday"},
        {"created_at": "2024-01-01T10:00:00"},  # no time zone
        {"clip_file": "../../etc/passwd"},
    ],
)
def test_model_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_voice(bad.pop("name", "amina"), **bad)  # type: ignore[arg-type]


def test_created_at_normalised_to_utc() -> None:
    voice = make_voice("x", created_at="2024-05-01T12:00:00+03:00")
    assert voice.created_at == "2024-05-01T09:00:00.000Z"


# --- names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a.b", "", "x" * 65, "with space", "héllo", "名字", ".hidden", None]
)
def test_bad_names_are_400(name: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_name(name, [])
    assert info.value.status == 400 and info.value.param == "name"
    assert not isinstance(info.value, VoiceExists)


def test_good_names() -> None:
    for name in ["a", "x" * 64, "Amina_2-b", "-", "0"]:
        assert check_name(name, ["other"]) == name
        assert VOICE_NAME.fullmatch(name)


def test_packaged_names_are_409() -> None:
    packaged = VoiceCatalog.load().ids
    for name in packaged:
        with pytest.raises(VoiceExists) as info:
            check_name(name, packaged)
        assert info.value.status == 409 and info.value.code == "voice_exists"
        assert info.value.param == "name"


# --- the library -------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "nested" / "voices"
    library = VoiceLibrary(folder)
    assert folder.is_dir() and library.list() == []
    stored = library.add(make_voice("amina", ref_text="Habari", speaker_description="warm"))
    assert library.get("amina") == stored
    assert library.list() == [stored]
    assert "amina" in library and "other" not in library
    assert json.loads((folder / "amina.json").read_text())["global_tokens"] == TOKENS
    assert [p.name for p in folder.iterdir()] == ["amina.json"]  # no temp file left
    with pytest.raises(VoiceExists) as info:
        library.add(make_voice("amina"))
    assert info.value.status == 409
    assert library.delete("amina") is True
    assert library.delete("amina") is False
    assert library.get("amina") is None and library.list() == []
    assert list(folder.iterdir()) == []


def test_get_and_delete_refuse_bad_names(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path / "voices")
    (tmp_path / "secret.json").write_text(make_voice("secret").model_dump_json())
    assert library.get("../secret") is None
    assert library.delete("../secret") is False
    assert (tmp_path / "secret.json").exists()


def test_survives_restart(tmp_path: Path) -> None:
    first = VoiceLibrary(tmp_path)
    stored = first.add(make_voice("amina"))
    assert VoiceLibrary(tmp_path).get("amina") == stored


def test_two_instances_see_each_other(tmp_path: Path) -> None:
    """Two gateway processes on one volume: no restart needed to see the other's changes."""
    a, b = VoiceLibrary(tmp_path), VoiceLibrary(tmp_path)
    assert b.list() == []  # b has cached an empty listing
    a.add(make_voice("one"))
    assert [v.name for v in b.list()] == ["one"]
    b.add(make_voice("two"))
    assert {v.name for v in a.list()} == {"one", "two"}
    assert a.get("two") is not None
    assert b.delete("one") is True
    assert a.get("one") is None and [v.name for v in a.list()] == ["two"]
    with pytest.raises(VoiceExists):
        a.add(make_voice("two"))
    # Deleted and re-added under the same name: the cache must not serve the old one.
    assert a.delete("two")
    b.add(make_voice("two", ref_text="second"))
    assert a.get("two").ref_text == "second"  # type: ignore[union-attr]


def test_list_sorted_by_created_at_then_name(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    library.add(make_voice("c", created_at="2024-01-02T00:00:00Z"))
    library.add(make_voice("b", created_at="2024-01-01T00:00:00Z"))
    library.add(make_voice("a", created_at="2024-01-02T00:00:00Z"))
    library.add(make_voice("z", created_at="2023-12-31T23:00:00-02:00"))  # 2024-01-01 01:00Z
    assert [v.name for v in library.list()] == ["b", "z", "a", "c"]


def test_threads_adding_different_names_all_land(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            library.add(make_voice(f"voice_{i}"))
        except BaseException as err:
            errors.append(err)

    run_threads(16, add)
    assert errors == []
    assert sorted(v.name for v in library.list()) == sorted(f"voice_{i}" for i in range(16))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "setup",
    ["one-library", "eight-libraries", "no-early-check", "no-hard-links"],
)
def test_threads_adding_one_name_exactly_one_wins(
    tmp_path: Path, setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight uploads of one name at once: one 201, seven 409, one clip left.

    ``no-early-check`` disables the cheap exists() test so that every thread reaches the
    exclusive link; ``no-hard-links`` makes link fail as on file systems without hard
    links, so the O_EXCL fallback must be exclusive too."""
    libraries = [VoiceLibrary(tmp_path, keep_clips=True) for _ in range(8)]
    if setup == "one-library":
        libraries = [libraries[0]] * 8
    if setup == "no-early-check":
        monkeypatch.setattr(Path, "exists", lambda self: False)
    if setup == "no-hard-links":

        def no_link(src: object, dst: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    wins: list[int] = []
    conflicts: list[GatewayError] = []
    others: list[BaseException] = []

    def add(i: int) -> None:
        try:
            libraries[i].add(
                make_voice("same", ref_text=str(i)), clip=b"clip %d" % i, clip_ext="wav"
            )
            wins.append(i)
        except VoiceExists as err:
            conflicts.append(err)
        except BaseException as err:
            others.append(err)

    run_threads(8, add)
    assert others == []
    assert len(wins) == 1 and len(conflicts) == 7
    assert all(err.status == 409 and err.code == "voice_exists" for err in conflicts)
    winner = libraries[0].get("same")
    assert winner is not None and winner.ref_text == str(wins[0])
    # The losers' clips are gone; the winner's clip is its own.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["same.json", winner.clip_file])
    assert (tmp_path / winner.clip_file).read_bytes() == b"clip %d" % wins[0]  # type: ignore[operator]


def test_leftovers_and_corrupt_files_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    library = VoiceLibrary(tmp_path)
    library.add(make_voice("good"))
    # A crash mid-upload: a complete-looking temp file that was never published.
    (tmp_path / ".half.0123456789abcdef.tmp").write_text(make_voice("half").model_dump_json())
    (tmp_path / "broken.json").write_text('{"name": "broken", "global_tok')
    (tmp_path / "invalid.json").write_text(json.dumps({"name": "invalid", "global_tokens": [1]}))
    (tmp_path / "renamed.json").write_text(make_voice("someone_else").model_dump_json())
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="decoder_gateway.voices.library"):
        assert [v.name for v in library.list()] == ["good"]
        assert library.list()[0].name == "good"  # a second listing: warnings not repeated
    warned = [r.getMessage() for r in caplog.records]
    assert sum("broken.json" in m for m in warned) == 1
    assert sum("invalid.json" in m for m in warned) == 1
    assert sum("renamed.json" in m for m in warned) == 1
    assert library.get("half") is None and library.get("broken") is None
    # A repaired file is picked up (new inode, size, mtime).
    (tmp_path / "broken.json").unlink()
    (tmp_path / "broken.json").write_text(make_voice("broken").model_dump_json())
    assert library.get("broken") is not None
    # The temp file does not block its name.
    library.add(make_voice("half"))


def test_cleanup_stale(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path, keep_clips=True)
    kept = library.add(make_voice("kept"), clip=b"RIFF", clip_ext="wav")
    old = time.time() - 7200
    stale_temp = tmp_path / ".crashed.00112233445566ff.tmp"
    fresh_temp = tmp_path / ".uploading.00112233445566ff.tmp"
    orphan_clip = tmp_path / "crashed.00112233445566ff.wav"
    other_dotfile = tmp_path / ".gitkeep"
    for path in (stale_temp, fresh_temp, orphan_clip, other_dotfile):
        path.write_bytes(b"x")
    for path in (stale_temp, orphan_clip, other_dotfile, tmp_path / kept.clip_file):  # type: ignore[operator]
        os.utime(path, (old, old))
    assert library.cleanup_stale() == 2
    assert not stale_temp.exists() and not orphan_clip.exists()
    assert fresh_temp.exists() and other_dotfile.exists()
    assert library.clip_path("kept") is not None  # a referenced clip stays, however old


def test_keep_clips_stores_and_deletes_the_clip(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path, keep_clips=True)
    stored = library.add(make_voice("amina"), clip=b"RIFF....WAVE", clip_ext="WAV")
    assert stored.clip_file is not None and stored.clip_file.startswith("amina.")
    assert stored.clip_file.endswith(".wav")
    path = library.clip_path("amina")
    assert path is not None and path.read_bytes() == b"RIFF....WAVE"
    assert VoiceLibrary(tmp_path).get("amina").clip_file == stored.clip_file  # type: ignore[union-attr]
    assert library.delete("amina")
    assert list(tmp_path.iterdir()) == []


def test_clips_not_kept_unless_asked(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    stored = library.add(make_voice("amina", clip_file="x.0011223344556677.wav"), clip=b"RIFF")
    assert stored.clip_file is None and library.clip_path("amina") is None
    assert [p.name for p in tmp_path.iterdir()] == ["amina.json"]


def test_bad_clip_extension(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path, keep_clips=True)
    with pytest.raises(InvalidRequest):
        library.add(make_voice("amina"), clip=b"x", clip_ext="../wav")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails mid-upload (disk full) gives a 500 with a code, and no leftovers."""
    library = VoiceLibrary(tmp_path, keep_clips=True)
    real_write = VoiceLibrary._write_temp
    calls = 0

    def write_then_fail(self: VoiceLibrary, name: str, data: bytes) -> Path:
        nonlocal calls
        calls += 1
        if calls == 2:  # the clip is written; the JSON is not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    monkeypatch.setattr(VoiceLibrary, "_write_temp", write_then_fail)
    with pytest.raises(GatewayError) as info:
        library.add(make_voice("amina"), clip=b"RIFF", clip_ext="wav")
    assert info.value.status == 500 and info.value.code == "voice_storage_error"
    assert "No space left" in info.value.message
    assert list(tmp_path.iterdir()) == []

"""Cloned voices on disk: a named set of BiCodec global tokens plus metadata.

One JSON file per voice (``<name>.json``) in one folder, which several gateway
processes may share (a volume). The folder itself is the only shared state, so:

* a voice is published atomically: its JSON is written to a temp file in the same
  folder, fsynced, then hard-linked to its final name. ``link`` fails when the name
  exists, which makes publishing create-exclusive: of two concurrent uploads of one
  name exactly one wins and the other gets 409, in one process or across several;
* temp files start with ``.`` and readers only look at ``<name>.json``, so a crash
  mid-upload leaves no half voice, only a temp file that ``cleanup_stale`` removes;
* a kept clip is published before the JSON under a name unique to its upload
  (``<name>.<hex>.<ext>``), so two uploads of one name never overwrite each other's
  clip, and a clip left by a crash or a lost race never blocks the name;
* reads go to disk each time, through a cache keyed by each file's (inode, size,
  mtime), so every process sees the others' additions and deletions at once.

All methods block (file I/O); the gateway calls them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from decoder_gateway.errors import InvalidRequest, VoiceExists, VoiceStorageError
from decoder_gateway.voices.catalog import GlobalTokens, Voice

log = logging.getLogger(__name__)

VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CLIP_EXT = re.compile(r"[A-Za-z0-9]{1,10}")
STALE_AFTER_S = 3600.0
_TEMP_SUFFIX = ".tmp"
# <name>.json: a published voice. Anything else (temp files, clips) is not a voice.
_VOICE_FILE = re.compile(r"([A-Za-z0-9_-]{1,64})\.json")
# <name>.<hex>.<ext>: a kept clip.
_CLIP_FILE = re.compile(r"([A-Za-z0-9_-]{1,64})\.[0-9a-f]{16}\.[A-Za-z0-9]{1,10}")


def check_name(name: object, packaged_ids: Iterable[str]) -> str:
    """Check a requested voice name before any work is done on the upload.

    A name becomes a file name, so only ``[A-Za-z0-9_-]{1,64}`` passes: no path
    separators, dots, spaces or non-ASCII letters (400, ``param: "name"``). A packaged
    voice's id is refused with 409, as a cloned voice must never shadow it.
    """
    if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80])
        raise InvalidRequest(
            f"invalid voice name {shown}: use 1 to 64 ASCII letters, digits, '_' or '-'",
            "name",
        )
    if name in set(packaged_ids):
        raise VoiceExists(f"{name!r} is a built-in voice; choose another name", "name")
    return name


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ClonedVoiceInfo(BaseModel):
    """A cloned voice as its owner sees it: what the prompt needs (the base voice's
    speaker id and the global tokens) plus what the owner told us about it."""

    # Unknown fields are dropped, so files written by a newer gateway still load.
    model_config = ConfigDict(extra="ignore")

    id: str = ""  # always equal to name; filled in from it
    name: str
    global_tokens: GlobalTokens
    speaker_id: int = Field(ge=0)
    base_voice: str
    created_at: str = Field(default_factory=_utc_now)
    consent: str | None = None
    ref_text: str | None = None
    language: str | None = None
    gender: str | None = None
    speaker_description: str | None = None

    @model_validator(mode="after")
    def _id_is_name(self) -> Self:
        if not VOICE_NAME.fullmatch(self.name):
            raise ValueError(f"invalid voice name {self.name!r}")
        if not self.id:
            self.id = self.name
        elif self.id != self.name:
            raise ValueError(f"id {self.id!r} differs from name {self.name!r}")
        return self

    @field_validator("created_at")
    @classmethod
    def _iso_utc(cls, value: str) -> str:
        """Normalise to ISO-8601 UTC, so that listings sort the same in every process."""
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"created_at {value!r} is not ISO-8601") from None
        if moment.tzinfo is None:
            raise ValueError("created_at needs a time zone (UTC)")
        utc = moment.astimezone(UTC)
        return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def as_voice(self) -> Voice:
        """The catalog form the synthesis path takes (base speaker id + pinned tokens)."""
        return Voice(
            id=self.id,
            speaker_id=self.speaker_id,
            language=self.language or "",
            gender=self.gender or "",
            global_tokens=list(self.global_tokens),
        )

    def sort_key(self) -> tuple[datetime, str]:
        return datetime.fromisoformat(self.created_at), self.name


class ClonedVoice(ClonedVoiceInfo):
    """A cloned voice as stored: its info, and the file of its kept clip (never shown)."""

    clip_file: str | None = None

    @field_validator("clip_file")
    @classmethod
    def _plain_clip_name(cls, value: str | None) -> str | None:
        # The file name is joined to the folder: never a path, never a hidden file.
        if value is not None and not _CLIP_FILE.fullmatch(value):
            raise ValueError(f"clip_file {value!r} is not a clip file name")
        return value


class VoiceLibrary:
    """The cloned voices in ``folder`` (created if missing); see the module docstring."""

    def __init__(self, folder: Path, keep_clips: bool = False) -> None:
        self.folder = Path(folder)
        self.keep_clips = keep_clips
        self.folder.mkdir(parents=True, exist_ok=True)
        # name -> (stat key, voice or None for a corrupt file): parsed files are reused
        # while their inode, size and mtime are unchanged (published files are never
        # rewritten in place, so a new version always has a new inode).
        self._cache: dict[str, tuple[tuple[int, int, int], ClonedVoice | None]] = {}
        self._lock = threading.Lock()

    # --- writing ----------------------------------------------------------------

    def add(
        self, voice: ClonedVoice, clip: bytes | None = None, clip_ext: str = "bin"
    ) -> ClonedVoice:
        """Store ``voice``; with ``keep_clips``, store ``clip`` too (published first).

        Raises ``VoiceExists`` (409) when the name is taken, also when another upload of
        the same name wins a race, in this process or another; ``VoiceStorageError`` when
        the folder cannot be written. Returns the voice as stored (``clip_file`` set).
        """
        name = voice.name
        final = self.folder / f"{name}.json"
        if final.exists():  # cheap early answer; the link below is the real check
            raise VoiceExists(f"a voice named {name!r} already exists", "name")
        clip_path: Path | None = None
        temps: list[Path] = []
        try:
            if self.keep_clips and clip is not None:
                if not CLIP_EXT.fullmatch(clip_ext):
                    raise InvalidRequest(f"invalid clip extension {clip_ext!r}", "clip_ext")
                clip_name = f"{name}.{secrets.token_hex(8)}.{clip_ext.lower()}"
                clip_path = self.folder / clip_name
                temps.append(self._write_temp(name, clip))
                self._publish(temps[-1], clip_path)  # unique name: never collides
                voice = voice.model_copy(update={"clip_file": clip_name})
            else:
                voice = voice.model_copy(update={"clip_file": None})
            payload = voice.model_dump_json(indent=2).encode() + b"\n"
            temps.append(self._write_temp(name, payload))
            try:
                self._publish(temps[-1], final)
            except FileExistsError:
                raise VoiceExists(f"a voice named {name!r} already exists", "name") from None
            clip_path = None  # published: the voice owns it now
            self._fsync_folder()
        except OSError as err:
            raise VoiceStorageError(
                f"could not store voice {name!r}: {err.strerror or err}", "name"
            ) from None
        finally:
            for temp in temps:
                _unlink_quietly(temp)
            if clip_path is not None:  # the voice was not published: drop its clip
                _unlink_quietly(clip_path)
        return voice

    def delete(self, name: str) -> bool:
        """Remove a voice and its clip; False when there is no such voice.

        The JSON is first renamed to a temp name: the rename is atomic, so of two
        concurrent deletes exactly one returns True, and the clip removed is the one the
        removed JSON names, even if the name is re-added meanwhile.
        """
        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            return False
        doomed = self._temp_path(name)
        try:
            os.rename(self.folder / f"{name}.json", doomed)
        except FileNotFoundError:
            return False
        try:
            voice = _parse(doomed.read_bytes(), doomed.name)
            if voice is not None and voice.clip_file:
                _unlink_quietly(self.folder / voice.clip_file)
        except OSError as err:
            log.warning("voice %r: could not read it while deleting: %s", name, err)
        finally:
            _unlink_quietly(doomed)
        with self._lock:
            self._cache.pop(name, None)
        self._fsync_folder()
        return True

    def cleanup_stale(self, max_age_s: float = STALE_AFTER_S) -> int:
        """Remove what crashed uploads and deletes left behind, older than ``max_age_s``:
        temp files, and clips no stored voice names. Returns how many files went."""
        cutoff = time.time() - max_age_s
        referenced = {v.clip_file for v in self.list() if v.clip_file}
        removed = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                stale_temp = entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX)
                orphan_clip = (
                    _CLIP_FILE.fullmatch(entry.name) is not None and entry.name not in referenced
                )
                if not (stale_temp or orphan_clip):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    # --- reading ----------------------------------------------------------------

    def get(self, name: str) -> ClonedVoice | None:
        """The stored voice, or None (also for an invalid name or a corrupt file)."""
        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            return None
        return self._load(name)

    def list(self) -> list[ClonedVoice]:
        """Every stored voice, oldest first (created_at, then name); corrupt files skipped."""
        voices: list[ClonedVoice] = []
        seen: set[str] = set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                match = _VOICE_FILE.fullmatch(entry.name)
                if match is None:
                    continue
                seen.add(match.group(1))
                voice = self._load(match.group(1))
                if voice is not None:
                    voices.append(voice)
        with self._lock:  # forget voices deleted by anyone
            for gone in set(self._cache) - seen:
                del self._cache[gone]
        voices.sort(key=ClonedVoice.sort_key)
        return voices

    def clip_path(self, name: str) -> Path | None:
        """Where the voice's kept clip lies, if it has one and the file is there."""
        voice = self.get(name)
        if voice is None or not voice.clip_file:
            return None
        path = self.folder / voice.clip_file
        return path if path.is_file() else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    # --- internals --------------------------------------------------------------

    def _load(self, name: str) -> ClonedVoice | None:
        path = self.folder / f"{name}.json"
        try:
            with open(path, "rb") as file:
                st = os.fstat(file.fileno())
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                with self._lock:
                    cached = self._cache.get(name)
                if cached is not None and cached[0] == key:
                    return cached[1]
                data = file.read()
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(name, None)
            return None
        except OSError as err:
            log.warning("voice file %s cannot be read, skipped: %s", path.name, err)
            return None
        voice = _parse(data, path.name)  # warns once per version of a corrupt file
        if voice is not None and voice.name != name:
            log.warning("voice file %s names voice %r, skipped", path.name, voice.name)
            voice = None
        with self._lock:
            self._cache[name] = (key, voice)
        return voice

    def _temp_path(self, name: str) -> Path:
        return self.folder / f".{name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"

    def _write_temp(self, name: str, data: bytes) -> Path:
        """Write ``data`` to a fresh temp file in the folder and fsync it (so a published
        file is never empty after a power cut)."""
        temp = self._temp_path(name)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            _unlink_quietly(temp)
            raise
        return temp

    def _publish(self, temp: Path, final: Path) -> None:
        """Give ``temp`` the name ``final``, failing with FileExistsError if it is taken.

        ``link`` is atomic and exclusive on local file systems and NFS. Where hard links
        are not supported, an ``O_EXCL`` create claims the name and the data is copied in
        (exclusive too; a reader may then briefly see a partial file, which it skips).
        """
        try:
            os.link(temp, final)
            return
        except FileExistsError:
            raise
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as file:
            file.write(temp.read_bytes())
            file.flush()
            os.fsync(file.fileno())

    def _fsync_folder(self) -> None:
        """Make the new or removed directory entry durable; best effort (not on every
        platform or file system)."""
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return
        try:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)


def _parse(data: bytes, source: str) -> ClonedVoice | None:
    """A voice from its JSON, or None with a warning: one bad file never breaks a listing."""
    try:
        return ClonedVoice.model_validate(json.loads(data))
    except (ValueError, ValidationError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("voice file %s is not a valid voice, skipped: %s", source, reason)
        return None


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

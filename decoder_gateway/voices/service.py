"""Voices for the serving layer: the packaged ones, the cloned library, inline clips.

Every endpoint resolves a voice here, so a cloned voice works by name wherever a
packaged one does. Cloning turns a clip into the 32 global tokens that the prompt
carries (the speaker encoder, on its own thread: torch work stays off the event
loop and does not hold up the decode worker's batches). A cloned voice keeps the
speaker id of a packaged base voice: the fine-tunes were trained with a speaker id
before the text, and the global tokens then say whose voice it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from decoder_gateway.audio.clips import Clip, decode_clip, decode_data_url
from decoder_gateway.codec import SpeakerEncoder
from decoder_gateway.errors import (
    InvalidRequest,
    NoSuchVoice,
    VoiceCloningUnavailable,
    VoiceExists,
    VoiceNotFound,
)
from decoder_gateway.metrics import Metrics
from decoder_gateway.settings import Settings, SettingsConflict
from decoder_gateway.voices.catalog import Voice, VoiceCatalog, check_global_tokens
from decoder_gateway.voices.library import ClonedVoice, VoiceLibrary, check_name

logger = logging.getLogger(__name__)

INLINE_VOICE_ID = "ref_audio"  # the id an inline clip's voice gets in logs and frames


class VoiceService:
    """Packaged voices, the cloned-voice library and the speaker encoder, together."""

    def __init__(
        self,
        settings: Settings,
        catalog: VoiceCatalog,
        library: VoiceLibrary,
        encoder: SpeakerEncoder | None,
        metrics: Metrics,
        encoder_problem: str | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.library = library
        self.encoder = encoder
        self.metrics = metrics
        # Why cloning is off, for the 501 message (None when it is on).
        self.encoder_problem = encoder_problem
        self.aliases = check_voice_aliases(settings.alias_map(), catalog, library)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speaker")

    @property
    def cloning(self) -> bool:
        return self.encoder is not None

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # -- resolving ------------------------------------------------------------------
    async def resolve(self, voice: str | None = None, speaker_id: int | None = None) -> Voice:
        """A packaged voice by id and/or speaker id, else an alias's voice (VOICE_ALIASES),
        else a cloned voice by name."""
        if voice and voice not in self.catalog.ids:
            voice = self.aliases.get(voice, voice)
        if not voice or voice in self.catalog.ids:
            return self.catalog.resolve(voice, speaker_id)
        cloned = await asyncio.to_thread(self.library.get, voice)
        if cloned is None:
            try:
                self.catalog.resolve(voice)
            except VoiceNotFound as err:  # its message lists the packaged voices
                raise VoiceNotFound(
                    f"{err.message}, and the cloned voices of GET /v1/audio/voices", "voice"
                ) from None
        if speaker_id is not None and speaker_id != cloned.speaker_id:
            raise VoiceNotFound(
                f"voice {voice!r} has speaker_id {cloned.speaker_id}, not {speaker_id}; "
                "give one of the two",
                "speaker_id",
            )
        return cloned.as_voice()

    async def inline(self, ref_audio: str, base_voice: Voice) -> Voice:
        """The voice of an inline clip (``ref_audio``, a base64 ``data:`` URL): cloned
        for this request only, nothing stored."""
        encoder = self._encoder()
        clip = await asyncio.to_thread(
            decode_data_url, ref_audio, max_bytes=self.settings.max_inline_clip_bytes
        )
        tokens = await self._global_tokens(encoder, clip)
        return Voice(
            id=INLINE_VOICE_ID,
            speaker_id=base_voice.speaker_id,
            language=base_voice.language,
            gender=base_voice.gender,
            global_tokens=tokens,
        )

    # -- the library ----------------------------------------------------------------
    async def create(
        self,
        name: str,
        audio: bytes,
        filename: str | None = None,
        *,
        base_voice: str | None = None,
        consent: str | None = None,
        ref_text: str | None = None,
        language: str | None = None,
        gender: str | None = None,
        speaker_description: str | None = None,
    ) -> ClonedVoice:
        """Clone ``audio`` into the library as ``name``; nothing is stored on failure."""
        name = check_name(name, self.catalog.ids)
        base = self._base_voice(base_voice)
        encoder = self._encoder()
        if await asyncio.to_thread(self.library.get, name) is not None:
            # Checked early to spare the clone; the library's own check decides races.
            raise VoiceExists(f"a voice named {name!r} already exists", "name")
        clip = await asyncio.to_thread(
            decode_clip, audio, max_bytes=self.settings.max_clip_bytes, param="audio_sample"
        )
        tokens = await self._global_tokens(encoder, clip)
        voice = ClonedVoice(
            name=name,
            global_tokens=tokens,
            speaker_id=base.speaker_id,
            base_voice=base.id,
            consent=consent,
            ref_text=ref_text,
            language=language,
            gender=gender,
            speaker_description=speaker_description,
        )
        kept = audio if self.settings.keep_voice_clips else None
        stored = await asyncio.to_thread(self.library.add, voice, kept, _extension(filename))
        logger.info("voice %s cloned (%.1f s clip, base %s)", name, clip.duration_s, base.id)
        return stored

    async def save(
        self,
        name: str,
        global_tokens: list[int],
        *,
        base_voice: str | None = None,
        consent: str | None = None,
        language: str | None = None,
        gender: str | None = None,
        speaker_description: str | None = None,
    ) -> ClonedVoice:
        """Store a voice given by its 32 global tokens (a designed voice, or one made
        elsewhere): no clip and no speaker encoder needed, so it works on every server."""
        name = check_name(name, self.catalog.ids)
        base = self._base_voice(base_voice)
        try:
            tokens = check_global_tokens(list(global_tokens))
        except ValueError as err:
            raise InvalidRequest(f"global_tokens: {err}", "global_tokens") from None
        voice = ClonedVoice(
            name=name,
            global_tokens=tokens,
            speaker_id=base.speaker_id,
            base_voice=base.id,
            consent=consent,
            language=language,
            gender=gender,
            speaker_description=speaker_description,
        )
        stored = await asyncio.to_thread(self.library.add, voice)
        logger.info("voice %s saved from its global tokens (base %s)", name, base.id)
        return stored

    async def cloned(self) -> list[ClonedVoice]:
        return await asyncio.to_thread(self.library.list)

    async def get(self, name: str) -> ClonedVoice:
        cloned = await asyncio.to_thread(self.library.get, name)
        if cloned is None:
            raise self._not_found(name)
        return cloned

    async def delete(self, name: str) -> None:
        if name in self.catalog.ids:
            raise InvalidRequest(f"{name!r} is a packaged voice; it cannot be deleted", "name")
        if not await asyncio.to_thread(self.library.delete, name):
            raise self._not_found(name)
        logger.info("voice %s deleted", name)

    # -- helpers --------------------------------------------------------------------
    def _encoder(self) -> SpeakerEncoder:
        if self.encoder is None:
            raise VoiceCloningUnavailable(
                f"voice cloning is not available on this server: {self.encoder_problem}; "
                "the packaged voices still speak"
            )
        return self.encoder

    def _base_voice(self, base_voice: str | None) -> Voice:
        if base_voice and base_voice not in self.catalog.ids:
            raise VoiceNotFound(
                f"base_voice must be a packaged voice: one of {', '.join(self.catalog.ids)}",
                "base_voice",
            )
        return self.catalog.resolve(base_voice or None)

    async def _global_tokens(self, encoder: SpeakerEncoder, clip: Clip) -> list[int]:
        def encode() -> list[int]:  # timed in the thread: the encoder's time, not the queue's
            started = time.perf_counter()
            tokens = encoder.global_tokens(clip.samples, clip.sample_rate)
            self.metrics.voice_clone_seconds.observe(time.perf_counter() - started)
            return tokens

        return await asyncio.get_running_loop().run_in_executor(self._executor, encode)

    def _not_found(self, name: str) -> NoSuchVoice:
        return NoSuchVoice(f"no cloned voice named {name!r}", "name")


def check_voice_aliases(
    aliases: dict[str, str], catalog: VoiceCatalog, library: VoiceLibrary
) -> dict[str, str]:
    """The aliases, once each names a voice that exists (packaged, or cloned now)."""
    for alias, voice in aliases.items():
        if alias in catalog.ids:
            raise SettingsConflict(
                f"VOICE_ALIASES: {alias!r} is already a packaged voice; it cannot be an alias"
            )
        if voice not in catalog.ids and library.get(voice) is None:
            raise SettingsConflict(
                f"VOICE_ALIASES maps {alias!r} to {voice!r}, which is not a voice: use one of "
                f"{', '.join(catalog.ids)} or a cloned voice"
            )
    return aliases


def _extension(filename: str | None) -> str:
    """A plain extension for a kept clip, from the upload's file name."""
    suffix = (filename or "").rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    return suffix if suffix.isalnum() and len(suffix) <= 10 else "bin"

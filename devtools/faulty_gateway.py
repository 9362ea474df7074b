"""``python -m devtools.faulty_gateway``: the gateway with a decoder fault.

The same gateway as ``python -m decoder_gateway``, from the same environment
variables, with two changes made before it starts:

* :meth:`Decoder.decode_spans` raises ``RuntimeError("CUDA out of memory
  (injected by devtools)")`` for any batch that holds a span whose
  global tokens are :data:`FAULT_GLOBAL_TOKENS`; every other batch decodes as usual;
* the voice :data:`FAULT_VOICE` (speaker id :data:`FAULT_SPEAKER_ID`) with those
  global tokens is added to the catalog: a voices file that extends the packaged
  six (and ``VOICES_FILE``'s voices, when that is set) is written to a temporary
  folder and passed on as ``VOICES_FILE``.

So a request for the voice ``decoder_fault`` fails in the decoder as an
out-of-memory error on a GPU would, and requests batched with it fail too;
``decoder_fault_late`` fails the same way after its first audio.
:class:`~devtools.gateway_server.GatewayServer` starts it with
``faulty=True``.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from decoder_gateway.codec import Decoder, Span
from decoder_gateway.voices.catalog import GLOBAL_CODEBOOK_SIZE, GLOBAL_TOKEN_COUNT

FAULT_VOICE = "decoder_fault"
FAULT_SPEAKER_ID = 9999
FAULT_GLOBAL_TOKENS: tuple[int, ...] = (GLOBAL_CODEBOOK_SIZE - 1,) * GLOBAL_TOKEN_COUNT
# The same fault, but only for chunks after a stream's first (spans that do not
# start at their window's first token): the failure comes after the first audio.
LATE_FAULT_VOICE = FAULT_VOICE + "_late"
LATE_FAULT_SPEAKER_ID = 9998
LATE_FAULT_GLOBAL_TOKENS: tuple[int, ...] = (GLOBAL_CODEBOOK_SIZE - 2,) * GLOBAL_TOKEN_COUNT
INJECTED_ERROR = "CUDA out of memory (injected by devtools)"


def is_fault_span(span: Span) -> bool:
    """Whether decoding ``span`` fails: any span of :data:`FAULT_VOICE`, and the spans
    of :data:`LATE_FAULT_VOICE` after a stream's first chunk."""
    tokens = tuple(span.global_tokens.tolist())
    return tokens == FAULT_GLOBAL_TOKENS or (tokens == LATE_FAULT_GLOBAL_TOKENS and span.start > 0)


def install_decoder_fault() -> None:
    """Wrap ``Decoder.decode_spans`` so that batches with a fault span raise."""
    original = Decoder.decode_spans
    if getattr(original, "injected_fault", False):
        return

    @functools.wraps(original)
    def decode_spans(self: Decoder, spans: Sequence[Span]) -> list[Tensor]:
        if any(is_fault_span(span) for span in spans):
            raise RuntimeError(INJECTED_ERROR)
        return original(self, spans)

    decode_spans.injected_fault = True  # type: ignore[attr-defined]
    Decoder.decode_spans = decode_spans  # type: ignore[method-assign]


def fault_voices() -> list[dict[str, Any]]:
    """The voices-file entries of :data:`FAULT_VOICE` and :data:`LATE_FAULT_VOICE`."""
    return [
        {
            "id": voice,
            "speaker_id": speaker_id,
            "language": "test",
            "gender": "",
            "global_tokens": list(tokens),
        }
        for voice, speaker_id, tokens in (
            (FAULT_VOICE, FAULT_SPEAKER_ID, FAULT_GLOBAL_TOKENS),
            (LATE_FAULT_VOICE, LATE_FAULT_SPEAKER_ID, LATE_FAULT_GLOBAL_TOKENS),
        )
    ]


def write_voices_file(folder: Path, base: Path | None = None) -> Path:
    """A voices file of ``base``'s content (or none) plus :data:`FAULT_VOICE`.

    Without ``replace: true`` in ``base`` it extends the packaged voices, as
    ``VOICES_FILE`` does (see :mod:`decoder_gateway.voices.catalog`).
    """
    data: dict[str, Any] = {"voices": []}
    if base is not None:
        data = json.loads(Path(base).read_text())
    ours = fault_voices()
    ids = {voice["id"] for voice in ours}
    data["voices"] = [v for v in data.get("voices", []) if v.get("id") not in ids] + ours
    path = folder / "voices.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def main() -> None:
    """Install the fault, add the voice, then run ``decoder_gateway.__main__.main``."""
    from decoder_gateway.__main__ import main as serve

    install_decoder_fault()
    with tempfile.TemporaryDirectory(prefix="faulty-gateway-") as folder:
        base = os.environ.get("VOICES_FILE")
        os.environ["VOICES_FILE"] = str(
            write_voices_file(Path(folder), Path(base) if base else None)
        )
        serve()


if __name__ == "__main__":
    main()

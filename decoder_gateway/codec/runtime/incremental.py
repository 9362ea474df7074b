"""Streaming without recomputation: each layer's settled state, kept per stream.

The decode path is a chain of *stages*, each one temporal convolution between
per-frame maps (``y = post(conv(pre(x)))``, with or without a residual). An output
is *settled* once every input it reads is known; it then equals the full decode's
whatever tokens follow. A stream keeps, per stage, how far it has settled and the
inputs the next outputs still read (:mod:`.stream_state`), so each settled output
is computed once. A chunk with less look-ahead than the receptive field is
*provisional*: the outputs it wants that have not settled are computed for it from
the kept state, as if the sequence ended at its window's end, and not kept.

Work is batched across streams, stage by stage. A span that its stream cannot serve
(decoded out of order) falls back to the plain window decode, with the same audio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoder_gateway.codec.model.bicodec import BiCodecDecoder
from decoder_gateway.codec.model.layers import (
    ConvNeXtBlock,
    DecoderBlock,
    ResidualUnit,
    Snake,
    UnitSamplingBlock,
)
from decoder_gateway.codec.runtime.spans import Span
from decoder_gateway.codec.runtime.stream_state import (
    DecodeStream,
    StageState,
    StreamState,
    Stretch,
    take,
)

logger = logging.getLogger(__name__)

# (B, C, T) or (B, T) ids, (B, D) d-vector -> (B, C', T); per frame
FrameMap = Callable[[Tensor, Tensor], Tensor]


# -- stages -------------------------------------------------------------------------


class Stage:
    """``y = post(conv(pre(x)))`` (+ x if residual), one temporal conv in the middle.

    Positions count samples at the stage's input rate (``rate_in`` per token) and
    at its output rate (``rate_in * up``). The conv's zero padding is applied to
    ``pre(x)``, as the full decode masks the conv input.
    """

    def __init__(
        self,
        conv: nn.Conv1d | nn.ConvTranspose1d,
        pre: FrameMap,
        post: FrameMap,
        *,
        residual: bool = False,
        rate_in: int = 1,
    ) -> None:
        self.conv = conv
        self.pre, self.post, self.residual, self.rate_in = pre, post, residual, rate_in
        self.transposed = isinstance(conv, nn.ConvTranspose1d)
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        self.pad, self.dilation = int(conv.padding[0]), conv.dilation[0]
        if self.transposed:
            plain = conv.output_padding[0] == 0 and self.dilation == 1 and conv.groups == 1
        else:  # centred: output m reads inputs m - pad .. m + pad
            plain = self.stride == 1 and 2 * self.pad == self.dilation * (self.kernel - 1)
        if not plain:
            raise ValueError(f"streaming supports centred convs and plain upsamplers, not {conv}")
        self.up = self.stride if self.transposed else 1
        # At the token rate a chunk has few frames and the conv big weights: a plain
        # matrix product over the frames of every piece at once reads them once, where
        # the conv call is slower.
        self.as_matmul = rate_in == 1 and conv.groups == 1 and self.dilation == 1

    def settled(self, n_in: int) -> int:
        """Outputs that the first ``n_in`` inputs settle, whatever inputs follow."""
        if self.transposed:  # input i reaches outputs stride * i - pad and later
            return max(0, self.stride * n_in - self.pad)
        return max(0, n_in - self.pad)

    def reads(self, lo: int, hi: int) -> tuple[int, int]:
        """Input positions ``[a, b)`` that outputs ``[lo, hi)`` read (not clipped to 0)."""
        if self.transposed:  # output m = stride * i - pad + k, 0 <= k < kernel
            s, p, k = self.stride, self.pad, self.kernel
            return -((k - 1 - lo - p) // s), (hi - 1 + p) // s + 1
        return lo - self.pad, hi + self.pad

    def work(
        self, parts: Sequence[Stretch | None], lo: int, hi: int, end: int | None, cond: Tensor
    ) -> StageWork:
        """The work for outputs ``[lo, hi)``, its inputs taken from ``parts``.

        Zeros stand in for inputs before position 0 and from ``end`` on (the end of
        the sequence at this stage's input rate; None: unknown, so never reached).
        """
        a, b = self.reads(lo, hi)
        first, stop = max(a, 0), b if end is None else min(b, end)
        raw = take(parts, first, stop)
        if self.transposed:  # an absent input adds nothing: no zeros needed
            return StageWork(raw, first, lo, hi, 0, 0, cond)
        return StageWork(raw, a, lo, hi, first - a, b - stop, cond)

    def run(self, pieces: Sequence[StageWork], cond: Tensor) -> list[Tensor]:
        """Outputs ``[lo, hi)`` of each piece, (1, C_out, hi - lo) each, in one batch.

        ``cond`` (B, D) holds the pieces' d-vectors in order.
        """
        inputs = []
        for piece in pieces:
            x = self.pre(piece.raw, piece.cond)  # (1, C, L) conv input
            if piece.zeros_before or piece.zeros_after:
                x = F.pad(x, (piece.zeros_before, piece.zeros_after))
            inputs.append(x)
        if self.as_matmul:
            return [
                self._finish(piece, self.post(y, piece.cond))
                for piece, y in zip(pieces, self._matmul(inputs), strict=True)
            ]
        if len(inputs) == 1:
            batch = inputs[0]  # (1, C, L)
        else:  # (B, C, L_max); a valid conv keeps the right padding out of each item's outputs
            longest = max(x.shape[-1] for x in inputs)
            batch = torch.cat(
                [
                    F.pad(x, (0, longest - x.shape[-1])) if x.shape[-1] < longest else x
                    for x in inputs
                ]
            )
        conv = self.conv
        if self.transposed:
            y = F.conv_transpose1d(batch, conv.weight, conv.bias, stride=self.stride)
        else:
            y = F.conv1d(batch, conv.weight, conv.bias, dilation=self.dilation, groups=conv.groups)
        y = self.post(y, cond)  # (B, C_out, L_out)
        return [self._finish(piece, y[i : i + 1]) for i, piece in enumerate(pieces)]

    def _finish(self, piece: StageWork, y: Tensor) -> Tensor:
        """The piece's outputs ``[lo, hi)`` of its valid conv output ``y`` (1, C_out, L_out)."""
        if self.transposed:  # position of local output 0, from that of the first input
            first = self.stride * piece.start - self.pad
        else:
            first = piece.start + self.pad
        out = y[..., piece.lo - first : piece.hi - first]
        if self.residual:
            raw_from = piece.start + piece.zeros_before
            out = out + piece.raw[..., piece.lo - raw_from : piece.hi - raw_from]
        return out

    def _matmul(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """The valid conv of each input (1, C, L_i) as one matrix product over all frames."""
        weight, bias = self.conv.weight, self.conv.bias
        lengths = [x.shape[-1] for x in inputs]
        if not self.transposed:  # (C_out, C * k) @ (C * k, frames)
            k = self.kernel
            columns = torch.cat(
                [
                    x[0].unfold(1, k, 1).permute(0, 2, 1).reshape(-1, n - k + 1)
                    for x, n in zip(inputs, lengths, strict=True)
                ],
                dim=1,
            )  # (C * k, sum of L_i - k + 1)
            y = weight.flatten(1) @ columns  # (C_out, frames)
            y = y if bias is None else y + bias.unsqueeze(1)
            return [part.unsqueeze(0) for part in y.split([n - k + 1 for n in lengths], dim=1)]
        # Transposed: every input frame i spreads weight[:, :, t] over outputs s*i + t.
        s, k = self.stride, self.kernel
        taps = -(-k // s) * s  # the kernel padded with zero taps to a multiple of the stride
        if taps != k:
            weight = F.pad(weight, (0, taps - k))
        c_out, m = weight.shape[1], taps // s
        frames = torch.cat([x[0].T for x in inputs])  # (sum L_i, C_in)
        spread = frames @ weight.flatten(1)  # (sum L_i, C_out * taps)
        outputs = []
        for part, n in zip(spread.split(lengths), lengths, strict=True):
            # (n, C_out, m, s) -> m blocks of (C_out, n * s): block j lands j * s later
            blocks = part.reshape(n, c_out, m, s).permute(2, 1, 0, 3).reshape(m, c_out, n * s)
            out = part.new_zeros(c_out, (n + m - 1) * s)
            if bias is not None:
                out += bias.unsqueeze(1)
            for j in range(m):
                out[:, j * s : j * s + n * s] += blocks[j]
            outputs.append(out[:, : (n - 1) * s + k].unsqueeze(0))  # (1, C_out, L_out)
        return outputs


@dataclass(frozen=True)
class StageWork:
    """Work for one stream at one stage: its outputs ``[lo, hi)``.

    The conv input starts at position ``start``: ``zeros_before`` zeros (positions
    before 0), ``pre(raw)``, then ``zeros_after`` zeros (past the sequence's end).
    """

    raw: Tensor  # (1, C, L) stage input, or (1, L) token ids
    start: int
    lo: int
    hi: int
    zeros_before: int
    zeros_after: int
    cond: Tensor  # (1, D)


# Per-frame maps between the convs, named after what they do in the full decode.


@dataclass(frozen=True)
class _Tokens:
    """ids (B, T) -> codebook rows, out_project, linear_pre, ×3: embed input (B, dim, T)."""

    model: BiCodecDecoder
    sampler: UnitSamplingBlock

    def __call__(self, ids: Tensor, cond: Tensor) -> Tensor:
        z_q = self.model.quantizer(ids)  # (B, latent, T)
        return self.sampler(self.model.prenet.linear_pre(z_q.transpose(1, 2)))


@dataclass(frozen=True)
class _Resample:
    """An inner backbone's final LayerNorm, then the next ×3 sampler: (B, C, T) -> (B, C, T)."""

    norm: nn.LayerNorm
    sampler: UnitSamplingBlock

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.sampler(self.norm(x.transpose(1, 2)))


@dataclass(frozen=True)
class _FinalNorm:
    """A backbone's final LayerNorm, channels-first in and out."""

    norm: nn.LayerNorm

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


@dataclass(frozen=True)
class _Features:
    """Main backbone's final LayerNorm, prenet.linear (tanh), + d: generator input."""

    model: BiCodecDecoder

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        prenet = self.model.prenet
        x = prenet.linear(prenet.vocos_backbone.final_layer_norm(x.transpose(1, 2)))
        x = torch.tanh(x) if prenet.use_tanh_at_final else x
        return x.transpose(1, 2) + cond.unsqueeze(-1)  # (B, D, T)


@dataclass(frozen=True)
class _Norm:
    """A backbone's (Ada)LayerNorm after its embed conv, channels-first in and out."""

    norm: nn.Module
    conditioned: bool

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        x = self.norm(x, cond) if self.conditioned else self.norm(x)
        return x.transpose(1, 2)


@dataclass(frozen=True)
class _ConvNeXtTail:
    """What a ConvNeXt block does after its depthwise conv, before the residual."""

    block: ConvNeXtBlock
    conditioned: bool

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        block = self.block
        x = x.transpose(1, 2)  # (B, T, C)
        x = block.norm(x, cond) if self.conditioned else block.norm(x)
        x = block.pwconv2(F.gelu(block.pwconv1(x)))
        return (block.gamma * x).transpose(1, 2)


@dataclass(frozen=True)
class _UnitTail:
    """What a residual unit does after its dilated conv: Snake, 1x1 conv."""

    unit: ResidualUnit

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.unit.block[3](self.unit.block[2](x))


@dataclass(frozen=True)
class _Apply:
    """A parameter-free or per-channel module (Snake, Tanh) as a frame map."""

    module: nn.Module

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.module(x)


def _identity(x: Tensor, cond: Tensor) -> Tensor:
    return x


def build_stages(model: BiCodecDecoder) -> list[Stage]:
    """The decode path of ``model`` as a chain of stages, tokens in, audio out."""
    prenet, generator = model.prenet, model.decoder
    stages: list[Stage] = []
    previous: nn.LayerNorm | None = None  # the final LayerNorm of the backbone before
    for sampler, backbone in prenet.downsample:
        pre = _Tokens(model, sampler) if previous is None else _Resample(previous, sampler)
        stages.append(Stage(backbone.embed, pre, _Norm(backbone.norm, conditioned=False)))
        stages += [
            Stage(b.dwconv, _identity, _ConvNeXtTail(b, conditioned=False), residual=True)
            for b in backbone.convnext
        ]
        previous = backbone.final_layer_norm
    if previous is None:
        raise ValueError("streaming needs the prenet's inner backbones (sample_ratios [1, 1])")
    main = prenet.vocos_backbone
    stages.append(Stage(main.embed, _FinalNorm(previous), _Norm(main.norm, conditioned=True)))
    stages += [
        Stage(b.dwconv, _identity, _ConvNeXtTail(b, conditioned=True), residual=True)
        for b in main.convnext
    ]

    first, *blocks, snake, last, tanh = generator.model
    stages.append(Stage(first, _Features(model), _identity))
    rate = 1
    for block in blocks:
        assert isinstance(block, DecoderBlock)
        block_snake, upsample, *units = block.block
        stages.append(Stage(upsample, _Apply(block_snake), _identity, rate_in=rate))
        rate *= upsample.stride[0]
        stages += [
            Stage(u.block[1], _Apply(u.block[0]), _UnitTail(u), residual=True, rate_in=rate)
            for u in units
        ]
    assert isinstance(snake, Snake) and rate == model.hop_length
    stages.append(Stage(last, _Apply(snake), _Apply(tanh), rate_in=rate))
    return stages


# -- decoding spans of streams ---------------------------------------------------------


@dataclass
class _StreamStep:
    """One span of one stream, on a working copy of the stream's state."""

    index: int  # in the batch of spans
    stream: DecodeStream
    tokens: Stretch  # (1, T) ids of the span's window, on the model's device
    lo: int  # samples wanted, in the stream
    hi: int
    fed: int
    stages: list[StageState]
    audio: Stretch | None
    audio_from: int
    # Per stage, the outputs [lo, hi) to compute provisionally (None: none).
    plan: list[tuple[int, int] | None] = field(default_factory=list)
    provisional: Stretch | None = None  # its provisional samples, once computed

    @property
    def window_end(self) -> int:
        return self.tokens.end


@torch.inference_mode()
def decode_streamed(
    model: BiCodecDecoder,
    stages: Sequence[Stage],
    spans: Sequence[Span],
    decode_windows: Callable[[Sequence[Span]], list[Tensor]],
) -> list[Tensor]:
    """Audio of each span (float32, on the CPU), as the plain window decode gives it.

    Spans with a stream advance it through ``stages`` (:func:`build_stages` of
    ``model``) and reuse its settled state; the rest, and any that its stream cannot
    serve, go to ``decode_windows`` without their stream. The streams' new states are
    committed only once every span has decoded, so a failed batch leaves them as they were.
    """
    results: list[Tensor | None] = [None] * len(spans)
    plain = [i for i, span in enumerate(spans) if span.stream is None]
    # Round r holds the r-th span of each stream: a stream's spans go one after another.
    rounds: list[list[int]] = []
    count: dict[int, int] = {}
    for i, span in enumerate(spans):
        if span.stream is not None:
            r = count.get(id(span.stream), 0)
            count[id(span.stream)] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)

    working: dict[int, StreamState] = {}
    streams: dict[int, DecodeStream] = {}
    for indices in rounds:
        steps = []
        for i in indices:
            stream = spans[i].stream
            assert stream is not None
            state = working.get(id(stream), stream.state)
            step = _make_step(model, stages, i, spans[i], stream, state)
            if step is None:
                # Logged, not raised: the audio is the same, only the reuse is lost.
                logger.debug(
                    "stream span [%d, %d) at token %d decoded as a plain window: its "
                    "stream's state cannot serve it (decoded out of order?)",
                    spans[i].start,
                    spans[i].end,
                    spans[i].offset,
                )
                plain.append(i)
            else:
                steps.append(step)
        if not steps:
            continue
        _advance(stages, steps)
        _provisional(stages, steps)
        hop = model.hop_length
        for step in steps:
            results[step.index] = _served_audio(step)
            span = spans[step.index]
            keep_from = (span.offset + span.end - step.stream.keep_tokens) * hop
            step.audio_from = max(step.audio_from, keep_from)
            working[id(step.stream)] = StreamState(
                step.fed, tuple(step.stages), _trim(step.audio, step.audio_from), step.audio_from
            )
            streams[id(step.stream)] = step.stream

    if plain:
        plain.sort()
        audio = decode_windows([replace(spans[i], stream=None) for i in plain])
        for i, samples in zip(plain, audio, strict=True):
            results[i] = samples
    for key, state in working.items():  # commit only once every span has decoded
        streams[key].state = state
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _make_step(
    model: BiCodecDecoder,
    stages: Sequence[Stage],
    index: int,
    span: Span,
    stream: DecodeStream,
    state: StreamState,
) -> _StreamStep | None:
    """The step for ``span``, or None when the stream's state cannot serve it."""
    length = span.semantic.numel()
    if not 0 <= span.start < span.end <= length:
        raise ValueError(f"span [{span.start}, {span.end}) outside 0..{length}")
    window_end = span.offset + length
    hop = model.hop_length
    lo, hi = (span.offset + span.start) * hop, (span.offset + span.end) * hop
    if (
        stream.model is not model
        or not span.offset <= state.fed <= window_end  # tokens missing, or already past
        or lo < state.audio_from  # settled samples no longer kept
    ):
        return None
    tokens = Stretch(span.semantic.to(model.device).unsqueeze(0), span.offset)
    stage_states = list(state.stages) or [StageState() for _ in stages]
    return _StreamStep(
        index, stream, tokens, lo, hi, state.fed, stage_states, state.audio, state.audio_from
    )


def _conds(pieces: Sequence[StageWork]) -> Tensor:
    return torch.cat([piece.cond for piece in pieces])  # (B, D)


def _advance(stages: Sequence[Stage], steps: list[_StreamStep]) -> None:
    """Settle every output that the tokens up to each step's window end settle."""
    # New settled inputs of the current stage, per step: tokens first, then activations.
    new: list[Stretch | None] = [
        Stretch(step.tokens.data[:, step.fed - step.tokens.start :], step.fed)
        if step.window_end > step.fed
        else None
        for step in steps
    ]
    for k, stage in enumerate(stages):
        pieces, owners = [], []
        for j, step in enumerate(steps):
            state, fresh = step.stages[k], new[j]
            n_in = state.n_in if fresh is None else fresh.end
            n_out = stage.settled(n_in)
            parts = (state.kept, fresh)
            if n_out > state.n_out:
                cond = step.stream.cond()
                pieces.append(stage.work(parts, state.n_out, n_out, None, cond))
                owners.append(j)
            keep_from = max(0, stage.reads(n_out, n_out + 1)[0])
            kept = (
                Stretch(take(parts, keep_from, n_in).clone(), keep_from)
                if keep_from < n_in
                else None
            )
            step.stages[k] = StageState(n_in, n_out, kept)
            new[j] = None
        if pieces:
            outputs = stage.run(pieces, _conds(pieces))
            for j, piece, out in zip(owners, pieces, outputs, strict=True):
                new[j] = Stretch(out, piece.lo)
    for j, step in enumerate(steps):
        step.fed = step.window_end
        settled = new[j]
        if settled is not None:  # settled samples, appended to the kept ones
            if step.audio is None:
                step.audio = settled
            else:
                assert step.audio.end == settled.start
                step.audio = Stretch(
                    torch.cat([step.audio.data, settled.data], -1), step.audio.start
                )
            step.audio = _trim(step.audio, step.audio_from)


def _provisional(stages: Sequence[Stage], steps: list[_StreamStep]) -> None:
    """Compute each step's wanted samples that have not settled, for its window end.

    Backwards from the samples: the outputs of each stage that they read and that
    have not settled (the settled ones are in the stage's kept inputs).
    """
    for step in steps:
        step.plan = [None] * len(stages)
        lo, hi = max(step.lo, step.stages[-1].n_out), step.hi
        for k in reversed(range(len(stages))):
            if lo >= hi:
                break
            step.plan[k] = (lo, hi)
            a, b = stages[k].reads(lo, hi)
            lo, hi = max(a, 0, step.stages[k].n_in), min(b, step.window_end * stages[k].rate_in)
    previous: list[Stretch | None] = [step.tokens for step in steps]
    for k, stage in enumerate(stages):
        pieces, owners = [], []
        for j, step in enumerate(steps):
            wanted = step.plan[k]
            if wanted is None:
                previous[j] = None
                continue
            end = step.window_end * stage.rate_in
            parts = (step.stages[k].kept, previous[j])
            pieces.append(stage.work(parts, *wanted, end, step.stream.cond()))
            owners.append(j)
        if pieces:
            outputs = stage.run(pieces, _conds(pieces))
            for j, piece, out in zip(owners, pieces, outputs, strict=True):
                previous[j] = Stretch(out, piece.lo)
    for j, step in enumerate(steps):
        step.provisional = previous[j]  # the last stage's: samples


def _served_audio(step: _StreamStep) -> Tensor:
    """Samples ``[lo, hi)``: the settled ones kept, then the provisional ones."""
    settled_end = step.stages[-1].n_out
    parts = []
    if step.lo < settled_end:
        parts.append(take([step.audio], step.lo, min(step.hi, settled_end)))
    if step.hi > settled_end:
        assert step.provisional is not None and step.provisional.end == step.hi
        parts.append(step.provisional.data)
    audio = parts[0] if len(parts) == 1 else torch.cat(parts, -1)  # (1, 1, hi - lo)
    return audio[0, 0].float().cpu()


def _trim(seg: Stretch | None, keep_from: int) -> Stretch | None:
    """``seg`` without the positions before ``keep_from`` (a copy, so the rest is freed)."""
    if seg is None or seg.end <= keep_from:
        return None
    if seg.start >= keep_from:
        return seg
    return Stretch(seg.data[..., keep_from - seg.start :].clone(), keep_from)

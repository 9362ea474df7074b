"""The BiCodec decoder against the reference outputs, the real checkpoint's layout,
and its own full decode (batching, spans); streaming is in test_codec_streaming.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from decoder_gateway.codec import (
    BiCodecConfig,
    BiCodecDecoder,
    CheckpointError,
    Decoder,
    Span,
    checkpoint_layout,
    decode_pass,
    load_decoder,
    resolve_bicodec_dir,
)
from decoder_gateway.codec.runtime.batching import (
    RELEASED_ACTIVATION_PER_TOKEN,
    default_batch_tokens,
    split_batches,
)

DATA = Path(__file__).parent / "data" / "bicodec"
GOLDEN = DATA / "golden_small"


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return load_decoder(GOLDEN)


@pytest.fixture(scope="module")
def cases() -> list[dict[str, np.ndarray]]:
    npz = np.load(GOLDEN / "cases.npz")
    names = ("semantic", "global", "wav", "zq", "dvector", "prenet")
    return [{name: npz[f"{name}_{i}"] for name in names} for i in range(3)]


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    error = (estimate - reference).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).sum() / error))


# -- the reference ---------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1, 2])
def test_matches_reference_waveform(decoder, cases, case):
    c = cases[case]
    wav = decoder.decode(c["semantic"][0], c["global"][0, 0])
    expected = torch.from_numpy(c["wav"][0, 0])
    assert wav.dtype == torch.float32
    assert wav.shape == expected.shape == (320 * c["semantic"].shape[1],)
    assert (wav - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", [0, 1, 2])
def test_matches_reference_intermediates(decoder, cases, case):
    c = cases[case]
    with torch.inference_mode():
        model = decoder.model
        d_vector = model.global_dequantizer(torch.from_numpy(c["global"][0]))
        z_q = model.quantizer(torch.from_numpy(c["semantic"]))
        prenet = model.prenet(z_q, d_vector, None)
    for name, value in (("dvector", d_vector), ("zq", z_q), ("prenet", prenet)):
        assert (value - torch.from_numpy(c[name])).abs().max() <= 1e-5, name


# -- the real checkpoint's layout -----------------------------------------------


def test_layout_equals_real_manifest_decode_subset():
    manifest = json.loads((DATA / "manifest_real.json").read_text())
    decode_keys = {e["key"]: tuple(e["shape"]) for e in manifest["keys"] if e["decode"]}
    assert len(decode_keys) == manifest["num_decode_keys"] == 319
    with torch.device("meta"):
        model = BiCodecDecoder(BiCodecConfig.from_yaml(DATA / "real_config.yaml"))
    assert checkpoint_layout(model) == decode_keys
    assert sum(int(np.prod(s)) for s in decode_keys.values()) == 96_287_714


def test_real_config_receptive_field_and_hop():
    with torch.device("meta"):
        model = BiCodecDecoder(BiCodecConfig.from_yaml(DATA / "real_config.yaml"))
    assert (model.prenet_context, model.generator_context, model.receptive_field) == (57, 10, 67)
    assert (model.sample_rate, model.hop_length) == (16000, 320)


def test_load_report_lists_skipped_keys(decoder):
    report = decoder.load_report
    stored = load_file(GOLDEN / "model.safetensors")
    assert report.loaded_keys + len(report.skipped_keys) == len(stored)
    assert any(k.startswith("encoder.") for k in report.skipped_keys)
    assert any(k.startswith("postnet.") for k in report.skipped_keys)
    assert "quantizer.in_project.weight_v" in report.skipped_keys
    assert not any(k.startswith("decoder.") for k in report.skipped_keys)
    assert "encoder.encoder" in report.skipped_summary()


def _copy_checkpoint(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "BiCodec"
    folder.mkdir()
    shutil.copy(GOLDEN / "config.yaml", folder / "config.yaml")
    state = load_file(GOLDEN / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    return folder


def _rename_norm(state: dict, gain: str, direction: str) -> None:
    for key in [k for k in state if k.endswith(".weight_g")]:
        module = key[: -len(".weight_g")]
        state[f"{module}.{gain}"] = state.pop(key)
        state[f"{module}.{direction}"] = state.pop(f"{module}.weight_v")


def _fold_norm(state: dict) -> None:
    for key in [k for k in state if k.endswith(".weight_g")]:
        module = key[: -len(".weight_g")]
        g, v = state.pop(key), state.pop(f"{module}.weight_v")
        state[f"{module}.weight"] = torch._weight_norm(v, g, 0)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: _rename_norm(
            s, "parametrizations.weight.original0", "parametrizations.weight.original1"
        ),
        _fold_norm,
    ],
    ids=["parametrizations", "folded"],
)
def test_other_weight_norm_spellings_load(tmp_path, cases, edit):
    model = load_decoder(_copy_checkpoint(tmp_path, edit))
    c = cases[0]
    wav = model.decode(c["semantic"][0], c["global"][0, 0])
    assert (wav - torch.from_numpy(c["wav"][0, 0])).abs().max() <= 1e-5


def test_missing_decode_key_is_named(tmp_path):
    folder = _copy_checkpoint(tmp_path, lambda s: s.pop("prenet.vocos_backbone.norm.shift.bias"))
    with pytest.raises(CheckpointError, match=r"prenet\.vocos_backbone\.norm\.shift\.bias"):
        load_decoder(folder)


def test_missing_weight_norm_pair_is_named(tmp_path):
    folder = _copy_checkpoint(tmp_path, lambda s: s.pop("decoder.model.6.weight_v"))
    with pytest.raises(CheckpointError, match=r"decoder\.model\.6\.weight_g / weight_v"):
        load_decoder(folder)


def test_misshaped_key_is_named(tmp_path):
    def edit(state):
        state["speaker_encoder.project.weight"] = torch.zeros(3, 3)

    with pytest.raises(CheckpointError, match=r"speaker_encoder\.project\.weight has shape"):
        load_decoder(_copy_checkpoint(tmp_path, edit))


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        load_decoder(tmp_path)


def test_config_constraints_are_checked(tmp_path):
    text = (GOLDEN / "config.yaml").read_text().replace("condition_dim: 64", "condition_dim: 32")
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"prenet\.condition_dim"):
        BiCodecConfig.from_yaml(tmp_path / "config.yaml")


# -- weights' origin ---------------------------------------------------------------


def test_bicodec_dir_wins(monkeypatch):
    import huggingface_hub

    def no_download(**kwargs):
        raise AssertionError("must not download when BICODEC_DIR is set")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    assert resolve_bicodec_dir(GOLDEN, "some/repo") == GOLDEN


def test_bicodec_dir_without_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="BICODEC_DIR"):
        resolve_bicodec_dir(tmp_path, "some/repo")


def test_download_takes_only_bicodec(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        shutil.copytree(GOLDEN, tmp_path / "snap" / "BiCodec")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    folder = resolve_bicodec_dir(None, "unsloth/Spark-TTS-0.5B", tmp_path / "cache", "hf_x")
    assert folder == tmp_path / "snap" / "BiCodec"
    assert calls == [
        {
            "repo_id": "unsloth/Spark-TTS-0.5B",
            "allow_patterns": ["BiCodec/*"],
            "cache_dir": str(tmp_path / "cache"),
            "token": "hf_x",
        }
    ]


def test_download_failure_names_the_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="BICODEC_DIR") as err:
        resolve_bicodec_dir(None, "nobody/no-such-repo", tmp_path)
    assert "HF_TOKEN" in str(err.value) and "TOKENIZER_REPO" in str(err.value)


# -- input validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("semantic", "global_tokens", "message"),
    [
        ([], [0] * 32, "empty"),
        ([1, 2, 3], [0] * 31, "exactly 32 global tokens, got 31"),
        ([1, 2, 3], [0] * 33, "exactly 32 global tokens, got 33"),
        ([1, 2, 3], [0] * 31 + [4096], "global token id 4096 at position 31"),
        ([1, -1, 3], [0] * 32, "semantic token id -1 at position 1"),
        ([1, 8192], [0] * 32, "semantic token id 8192"),
        ([1.5, 2.0], [0] * 32, "must be integers"),
        ([[1, 2], [3, 4]], [0] * 32, "1-D"),
        (["a", "b"], [0] * 32, "integers"),
    ],
)
def test_bad_input_raises_value_error(decoder, semantic, global_tokens, message):
    with pytest.raises(ValueError, match=message):
        decoder.decode(semantic, global_tokens)


def test_accepts_lists_arrays_and_tensors(decoder, cases):
    c = cases[0]
    sem, glo = c["semantic"][0], c["global"][0, 0]
    reference = decoder.decode(sem, glo)
    assert torch.equal(decoder.decode(sem.tolist(), glo.tolist()), reference)
    assert torch.equal(decoder.decode(torch.from_numpy(c["semantic"]), glo), reference)


# -- batching ------------------------------------------------------------------


def test_batch_of_different_lengths_and_voices_equals_single_decodes(decoder, cases):
    items = [(c["semantic"][0], c["global"][0, 0]) for c in cases]
    items.append((cases[1]["semantic"][0][:7], cases[2]["global"][0, 0]))  # short, other voice
    batch = decoder.decode_batch(items)
    for (semantic, global_tokens), audio in zip(items, batch, strict=True):
        single = decoder.decode(semantic, global_tokens)
        assert audio.shape == single.shape == (320 * len(semantic),)
        assert (audio - single).abs().max() <= 1e-5


def test_spans_equal_their_slices_of_the_full_decode(decoder, cases):
    """Spans at the start, in the middle (windows clipped to the receptive field) and
    at the end of a sequence, batched with a whole one."""
    c = cases[2]
    semantic = torch.from_numpy(c["semantic"][0]).long()
    voice = torch.from_numpy(c["global"][0, 0]).long()
    full = decoder.decode(semantic, voice)
    length = semantic.numel()
    assert length > 2 * decoder.model.receptive_field + 20  # so that the middle span is clipped
    bounds = [(0, 5), (length // 2 - 7, length // 2 + 3), (length - 9, length), (0, length)]
    audio = decoder.decode_spans([Span(semantic, voice, a, b) for a, b in bounds])
    for (a, b), samples in zip(bounds, audio, strict=True):
        assert samples.shape == (320 * (b - a),)
        assert (samples - full[320 * a : 320 * b]).abs().max() <= 1e-5


def test_split_batches_keeps_each_pass_within_the_budget():
    costs = [30, 5, 70, 12, 5, 31, 64, 1]
    batches = split_batches(costs, 64)
    assert sorted(i for batch in batches for i in batch) == list(range(len(costs)))
    for batch in batches:  # padded to its longest; one window over the budget goes alone
        padded = len(batch) * max(costs[i] for i in batch)
        assert padded <= 64 or len(batch) == 1
    assert [2] in batches  # 70 > 64
    assert max(len(batch) for batch in batches) >= 4  # the short ones went together
    assert split_batches([], 64) == []


def test_budgeted_passes_give_the_audio_of_one_pass(decoder, cases):
    """Passes split by a small budget: the same audio as all spans in one pass."""
    c = cases[2]
    semantic = torch.from_numpy(c["semantic"][0]).long()
    voice = torch.from_numpy(c["global"][0, 0]).long()
    other = torch.from_numpy(c["global"][0, 0]).long().flip(0)
    length = semantic.numel()
    bounds = [(0, 5), (40, 44), (length // 2, length // 2 + 20), (length - 9, length), (0, length)]
    spans = [Span(semantic, voice if i % 2 else other, a, b) for i, (a, b) in enumerate(bounds)]
    one_pass = decode_pass(decoder.model, spans)
    budget = 2 * decoder.cost([spans[1]])  # two short windows a pass
    budgeted = Decoder(decoder.model, batch_tokens=budget).decode_spans(spans)
    for (a, b), x, y in zip(bounds, one_pass, budgeted, strict=True):
        assert x.shape == y.shape == (320 * (b - a),)
        assert (x - y).abs().max() <= 1e-5


def test_load_sets_the_devices_batch_budget(decoder):
    """64 tokens of the released decoder on a CPU, 4096 on CUDA; a narrower decoder
    (the golden one: 8 x 320 elements per token) batches proportionally more."""
    released = BiCodecDecoder(BiCodecConfig.from_yaml(DATA / "real_config.yaml"))
    assert released.activation_per_token == RELEASED_ACTIVATION_PER_TOKEN == 96 * 320
    assert default_batch_tokens("cpu", released.activation_per_token) == 64
    assert default_batch_tokens("cuda", released.activation_per_token) == 4096
    assert decoder.model.activation_per_token == 16 * 160  # 16 x 160 = 8 x 320
    assert decoder.batch_tokens == default_batch_tokens("cpu", 16 * 160) == 64 * 12


# -- dtypes --------------------------------------------------------------------


# The error stated in docs/performance.md for DECODER_DTYPE=bfloat16 / float16: at
# least 30 dB SNR against float32 on every golden case (measured: 36-40 dB).
REDUCED_PRECISION_MIN_SNR_DB = 30


@pytest.mark.parametrize("case", [0, 1, 2])
def test_bfloat16_is_within_its_stated_error(cases, case):
    model = load_decoder(GOLDEN, dtype=torch.bfloat16)
    c = cases[case]
    wav = model.decode(c["semantic"][0], c["global"][0, 0])
    reference = torch.from_numpy(c["wav"][0, 0])
    assert wav.dtype == torch.float32 and wav.shape == reference.shape
    assert snr_db(reference, wav) >= REDUCED_PRECISION_MIN_SNR_DB


def stream_tokens(model: Decoder, semantic: list[int], voice: torch.Tensor) -> torch.Tensor:
    """Stream ``semantic`` 5 tokens at a time, as the gateway's worker decodes it."""
    session = model.open_stream(voice)
    out = []
    for i in range(0, len(semantic) + 5, 5):
        if i < len(semantic):
            session.push(semantic[i : i + 5])
        else:
            session.finish()
        chunks = session.plan()
        audio = model.decode_spans([chunk.span for chunk in chunks])
        out += [session.complete(c, a) for c, a in zip(chunks, audio, strict=True)]
    assert session.done
    return torch.cat(out)


def test_bfloat16_streams_within_its_stated_error(decoder, cases):
    """DECODER_DTYPE=bfloat16 as the gateway runs it: streamed through the stream state."""
    low = load_decoder(GOLDEN, dtype=torch.bfloat16)
    for c in cases:
        semantic, voice = c["semantic"][0].tolist(), torch.from_numpy(c["global"][0, 0]).long()
        reference = stream_tokens(decoder, semantic, voice)
        streamed = stream_tokens(low, semantic, voice)
        assert streamed.shape == reference.shape == (320 * len(semantic),)
        assert snr_db(reference, streamed) >= REDUCED_PRECISION_MIN_SNR_DB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_reduced_precision_is_within_its_stated_error(cases, dtype):
    model = load_decoder(GOLDEN, device="cuda", dtype=dtype)
    for c in cases:
        wav = model.decode(c["semantic"][0], c["global"][0, 0])
        assert snr_db(torch.from_numpy(c["wav"][0, 0]), wav) >= REDUCED_PRECISION_MIN_SNR_DB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(cases):
    model = load_decoder(GOLDEN, device="cuda")
    c = cases[1]
    wav = model.decode(c["semantic"][0], c["global"][0, 0])
    assert (wav - torch.from_numpy(c["wav"][0, 0])).abs().max() <= 1e-4

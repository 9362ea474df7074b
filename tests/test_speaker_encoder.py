"""BiCodec's speaker encoder (reference clip -> 32 global tokens) against the reference
implementation's outputs at every stage, its strict loading, input checks, and the
released checkpoint's speaker-encoder key layout."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from decoder_gateway.codec import (
    BiCodecConfig,
    BiCodecDecoder,
    CheckpointError,
    Decoder,
    SpeakerEncoder,
    SpeakerEncoderConfig,
    SpeakerEncoderUnavailable,
    checkpoint_layout,
    load_decoder,
    load_speaker_encoder,
    speaker_checkpoint_layout,
)

DATA = Path(__file__).parent / "data" / "bicodec"
GOLDEN = DATA / "golden_speaker"
CASES = range(4)
X_VECTOR = ("pool", "bn", "linear")  # ECAPA's pooled embedding: not on the token path
STAGES = ("wav16k", "ref", "mel", "latent", "perceiver", "global", "dvector")


def read_clip(path: Path) -> tuple[np.ndarray, int]:
    """First channel of an audio file as float64 in [-1, 1], and its rate (PyAV)."""
    scale = {"s16": 2**15, "s32": 2**31, "flt": 1, "dbl": 1}
    parts = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        for frame in container.decode(stream):
            samples = frame.to_ndarray()  # planar (C, n) or packed (1, n * C)
            if not frame.format.is_planar:
                samples = samples.reshape(frame.samples, -1).T
            parts.append(samples[0] / scale[frame.format.name.rstrip("p")])
    return np.concatenate(parts).astype(np.float64), rate


@pytest.fixture(scope="module")
def encoder() -> SpeakerEncoder:
    return load_speaker_encoder(GOLDEN)


@pytest.fixture(scope="module")
def cases() -> list[dict[str, np.ndarray]]:
    npz = np.load(GOLDEN / "cases.npz")
    return [{name: npz[f"{name}_{i}"] for name in STAGES} for i in CASES]


@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, int]]:
    return [read_clip(GOLDEN / "clips" / f"case_{i}.wav") for i in CASES]


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, what: str) -> None:
    """Within 1e-4 of the reference array's largest magnitude (the golden README's bound)."""
    actual = torch.as_tensor(actual).detach().cpu().double()
    reference = torch.from_numpy(expected).double()
    assert actual.shape == reference.shape, what
    error = (actual - reference).abs().max() / reference.abs().max()
    assert error <= 1e-4, f"{what}: relative error {float(error):.2e}"


# -- the reference ------------------------------------------------------------------


def test_clips_are_the_documented_ones(clips):
    stats = json.loads((GOLDEN / "stats.json").read_text())["cases"]
    for (audio, rate), info in zip(clips, stats, strict=True):
        assert rate == info["rate"]
        assert abs(audio.size / rate - info["seconds"]) < 1e-3


@pytest.mark.parametrize("case", CASES)
def test_global_tokens_match_reference(encoder, cases, clips, case):
    tokens = encoder.global_tokens(*clips[case])
    assert isinstance(tokens, list) and all(type(t) is int for t in tokens)
    assert tokens == cases[case]["global"][0].tolist()


@pytest.mark.parametrize("case", CASES)
def test_every_stage_matches_reference(encoder, cases, clips, case):
    c = cases[case]
    # Each stage gets the reference's input, so that a mismatch points at one stage.
    assert_close(encoder.resample(*clips[case]), c["wav16k"], "wav16k")
    assert_close(encoder.prepare(*clips[case]), c["ref"], "ref")
    assert_close(encoder.mel(torch.from_numpy(c["ref"])), c["mel"], "mel")
    assert_close(encoder.latent(torch.from_numpy(c["mel"])), c["latent"], "latent")
    perceived = encoder.perceiver(torch.from_numpy(c["latent"]))  # (1, 32, D)
    assert_close(perceived.transpose(1, 2), c["perceiver"], "perceiver")
    ids = encoder.quantize(torch.from_numpy(c["perceiver"]).transpose(1, 2))
    assert ids.dtype == torch.int64 and ids.tolist() == c["global"].tolist()


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return load_decoder(GOLDEN)


@pytest.mark.parametrize("case", CASES)
def test_decoder_d_vector_from_the_tokens(encoder, decoder, cases, clips, case):
    tokens = torch.tensor([encoder.global_tokens(*clips[case])])
    with torch.inference_mode():
        d_vector = decoder.model.global_dequantizer(tokens)
        assert_close(d_vector, cases[case]["dvector"], "dvector")


def test_batch_equals_one_by_one(encoder, cases):
    refs = torch.stack([torch.from_numpy(c["ref"]) for c in cases])  # (4, 96000)
    expected = [c["global"][0].tolist() for c in cases]
    assert encoder.encode(refs).tolist() == expected


def test_tensor_and_float32_input(encoder, cases, clips):
    audio, rate = clips[0]  # 16-bit PCM: exact in float32
    tokens = encoder.global_tokens(torch.from_numpy(audio).float(), rate)
    assert tokens == cases[0]["global"][0].tolist()


def test_reference_is_six_seconds(encoder, clips):
    assert (encoder.sample_rate, encoder.ref_samples) == (16000, 96000)
    short, rate = clips[2]  # 0.72 s: tiled
    ref = encoder.prepare(short, rate)
    period = encoder.resample(short, rate).size
    assert ref.shape == (96000,) and torch.equal(ref[:period], ref[period : 2 * period])
    assert encoder.prepare(*clips[3]).shape == (96000,)  # 8.9 s: cut


def test_silence_gives_tokens(encoder):
    tokens = encoder.global_tokens(np.zeros(8000), 8000)
    assert len(tokens) == 32 and all(0 <= t < 4096 for t in tokens)


def test_threads_share_one_encoder(encoder, cases, clips):
    jobs = [0, 1, 2, 3] * 2
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: encoder.global_tokens(*clips[i]), jobs))
    assert results == [cases[i]["global"][0].tolist() for i in jobs]


# -- input checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.zeros(0), 16000, "empty"),
        (np.array([0.1, np.nan, 0.2]), 16000, "NaN or infinite"),
        (np.array([0.1, np.inf]), 16000, "NaN or infinite"),
        (np.zeros((2, 16000)), 16000, r"mono, a 1-D array; got shape \(2, 16000\)"),
        (np.zeros(16000, dtype=np.int16), 16000, "float samples"),
        (np.zeros(16000), 0, "positive"),
        (np.zeros(16000), 16000.5, "integer number of Hz"),
        (np.zeros(1), 48000, "too short"),
    ],
    ids=["empty", "nan", "inf", "2-D", "int16", "rate 0", "float rate", "too short"],
)
def test_bad_input_is_a_clear_value_error(encoder, audio, rate, message):
    with pytest.raises(ValueError, match=message):
        encoder.global_tokens(audio, rate)


# -- loading ------------------------------------------------------------------------


def test_load_report_and_device(encoder):
    report = encoder.load_report
    assert report.loaded_keys == len(speaker_checkpoint_layout(encoder)) == 230
    assert "speaker_encoder.speaker_encoder.pool.linear1.weight" in report.skipped_keys
    assert "speaker_encoder.quantizer.project_out.weight" in report.skipped_keys
    assert not any(k.startswith("speaker_encoder.perceiver") for k in report.skipped_keys)
    assert encoder.device == torch.device("cpu") and not encoder.training


def _copy_checkpoint(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "BiCodec"
    folder.mkdir()
    shutil.copy(GOLDEN / "config.yaml", folder / "config.yaml")
    state = load_file(GOLDEN / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    return folder


def test_missing_key_is_named(tmp_path):
    key = "speaker_encoder.speaker_encoder.layer3.se_res2block.1.bns.4.running_var"
    folder = _copy_checkpoint(tmp_path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"1 speaker-encoder key\(s\) missing: .*bns\.4\."):
        load_speaker_encoder(folder)


def test_misshaped_key_is_named(tmp_path):
    def edit(state):
        state["speaker_encoder.perceiver_sampler.latents"] = torch.zeros(3, 3)

    with pytest.raises(CheckpointError, match=r"perceiver_sampler\.latents has shape \[3, 3\]"):
        load_speaker_encoder(_copy_checkpoint(tmp_path, edit))


def test_checkpoint_without_speaker_encoder(tmp_path, cases):
    """A decode-only checkpoint: no cloning (typed error), packaged voices still decode."""
    with torch.device("meta"):
        layout = speaker_checkpoint_layout(
            SpeakerEncoder(SpeakerEncoderConfig.from_yaml(GOLDEN / "config.yaml"))
        )

    def strip(state):
        for key in layout:
            del state[key]

    folder = _copy_checkpoint(tmp_path, strip)
    with pytest.raises(SpeakerEncoderUnavailable, match="has no speaker encoder") as caught:
        load_speaker_encoder(folder)
    assert isinstance(caught.value, CheckpointError)
    decoder = load_decoder(folder)
    assert decoder.decode([1, 2, 3], cases[0]["global"][0]).shape == (960,)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        load_speaker_encoder(tmp_path)


def test_config_constraints_are_checked(tmp_path):
    text = (GOLDEN / "config.yaml").read_text().replace("num_mels: 128", "num_mels: 80")
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"input_dim 128 != mel_params\.num_mels 80"):
        SpeakerEncoderConfig.from_yaml(tmp_path / "config.yaml")


# -- the real checkpoint's layout ---------------------------------------------------


def test_layout_equals_real_manifest_speaker_keys():
    """Every released ``speaker_encoder.*`` key is read by exactly one side: this encoder,
    the decoder (de-quantiser and projection), or nobody (the x-vector branch)."""
    manifest = json.loads((DATA / "manifest_real.json").read_text())
    speaker_keys = {
        e["key"]: tuple(e["shape"]) for e in manifest["keys"] if e["key"].startswith("speaker_")
    }
    config_path = DATA / "real_config.yaml"
    with torch.device("meta"):  # no real-size allocation
        encoder = SpeakerEncoder(SpeakerEncoderConfig.from_yaml(config_path))
        decoder = BiCodecDecoder(BiCodecConfig.from_yaml(config_path))
    ours = speaker_checkpoint_layout(encoder)
    decoders = {k: s for k, s in checkpoint_layout(decoder).items() if k.startswith("speaker_")}
    x_vector = {
        k: s
        for k, s in speaker_keys.items()
        if k.startswith("speaker_encoder.speaker_encoder.") and k.split(".")[2] in X_VECTOR
    }
    assert len(x_vector) == 11
    assert ours.keys().isdisjoint(decoders) and ours.keys().isdisjoint(x_vector)
    assert ours | decoders | x_vector == speaker_keys
    assert len(ours) == 230
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    parameters = sum(int(np.prod(s)) for k, s in ours.items() if not k.endswith(buffers))
    # ECAPA's token path 4_929_344, perceiver 988_756, FSQ project_in 774: ~24 MB in float32.
    assert parameters == 5_918_874
    # The mel front end is computed, not loaded: real values even on the meta device.
    assert not any(k.startswith("mel_transformer") for k in ours)
    assert encoder.mel_transformer.window.device.type == "cpu"
    assert encoder.mel_transformer.filterbank.shape == (513, 128)


def test_filterbank_is_slaney(encoder):
    fb = encoder.mel_transformer.filterbank.double()  # (513, 128)
    hz_per_bin = 16000 / 1024
    assert (fb >= 0).all() and (fb.sum(0) > 0).all()
    # Unit area in Hz: checked on the wide filters, which the 15.6 Hz bin grid samples finely.
    areas = fb[:, 80:].sum(0) * hz_per_bin
    assert torch.allclose(areas, torch.ones(48, dtype=torch.float64), atol=1e-2)


# -- CUDA ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(encoder, cases, clips):
    gpu = load_speaker_encoder(GOLDEN, device="cuda")
    assert gpu.device.type == "cuda"
    for c, clip in zip(cases, clips, strict=True):
        ref = gpu.prepare(*clip)
        assert ref.device.type == "cuda"
        assert_close(ref, c["ref"], "ref")
        latent = gpu.latent(gpu.mel(ref))
        # cuDNN convs may run in TF32 by default: a looser bound than on the CPU.
        error = (latent.cpu() - torch.from_numpy(c["latent"])).abs().max()
        assert error <= 5e-3 * float(np.abs(c["latent"]).max())
        # Tokens are exact wherever the reference's FSQ value is clear of a rounding edge.
        bounded = gpu.speaker_encoder.quantizer.bounded(gpu.perceiver(latent)).cpu()
        reference = encoder.speaker_encoder.quantizer.bounded(
            torch.from_numpy(c["perceiver"]).transpose(1, 2)
        )
        assert (bounded - reference).abs().max() <= 5e-3
        margin = 0.5 - (reference - reference.round()).abs()  # (1, 32, 6)
        safe = (margin > 5e-3).all(-1)
        tokens = torch.tensor(gpu.global_tokens(*clip))
        expected = torch.from_numpy(c["global"])
        assert torch.equal(tokens[safe[0]], expected[safe])

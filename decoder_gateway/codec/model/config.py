"""The part of BiCodec's released ``config.yaml`` that the decode path needs.

The file keeps the upstream schema (top key ``audio_tokenizer``); we read it with
omegaconf and keep only the fields that shape the decoder, checking the
constraints between them so that a wrong config fails here, not as a shape error
deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class SpeakerConfig:
    """Global-token de-quantizer (residual FSQ) and the speaker projection."""

    out_dim: int  # d-vector width, added to the prenet output
    latent_dim: int  # FSQ project_out width
    token_num: int  # global tokens per utterance (32)
    fsq_levels: tuple[int, ...]  # [4] * 6 -> 4096 codes

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)


@dataclass(frozen=True)
class PrenetConfig:
    """The feature decoder (Vocos backbones) between de-quantizer and wave generator."""

    input_channels: int
    vocos_dim: int
    vocos_intermediate_dim: int
    vocos_num_layers: int
    out_channels: int
    condition_dim: int
    num_inner_backbones: int  # one per ratio-1 sample ratio
    use_tanh_at_final: bool


@dataclass(frozen=True)
class WaveGeneratorConfig:
    """DAC-style upsampling generator: token rate -> 16 kHz samples."""

    input_channel: int
    channels: int
    rates: tuple[int, ...]
    kernel_sizes: tuple[int, ...]

    @property
    def hop_length(self) -> int:
        return math.prod(self.rates)


@dataclass(frozen=True)
class BiCodecConfig:
    sample_rate: int
    codebook_size: int  # semantic codebook entries (8192)
    codebook_dim: int
    latent_dim: int  # quantizer.input_dim
    speaker: SpeakerConfig
    prenet: PrenetConfig
    generator: WaveGeneratorConfig

    @property
    def hop_length(self) -> int:
        """Samples per semantic token (320 at 16 kHz, i.e. 50 tokens per second)."""
        return self.generator.hop_length

    @classmethod
    def from_yaml(cls, path: str | Path) -> BiCodecConfig:
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or "audio_tokenizer" not in cfg:
            raise ValueError(f"{path}: expected a BiCodec config with top key 'audio_tokenizer'")
        return cls.from_dict(OmegaConf.to_container(cfg.audio_tokenizer, resolve=True))

    @classmethod
    def from_dict(cls, tok: dict) -> BiCodecConfig:
        try:
            quant, spk, pre, dec = (
                tok["quantizer"],
                tok["speaker_encoder"],
                tok["prenet"],
                tok["decoder"],
            )
            sample_rate = int(tok.get("mel_params", {}).get("sample_rate", 16000))
            ratios = [int(r) for r in pre.get("sample_ratios", [1, 1])]
            if any(r != 1 for r in ratios):
                raise ValueError(
                    f"prenet.sample_ratios {ratios}: only ratio 1 (as released) is supported"
                )
            if int(spk.get("fsq_num_quantizers", 1)) != 1:
                raise ValueError("speaker_encoder.fsq_num_quantizers: only 1 is supported")
            config = cls(
                sample_rate=sample_rate,
                codebook_size=int(quant["codebook_size"]),
                codebook_dim=int(quant["codebook_dim"]),
                latent_dim=int(quant["input_dim"]),
                speaker=SpeakerConfig(
                    out_dim=int(spk["out_dim"]),
                    latent_dim=int(spk["latent_dim"]),
                    token_num=int(spk["token_num"]),
                    fsq_levels=tuple(int(v) for v in spk["fsq_levels"]),
                ),
                prenet=PrenetConfig(
                    input_channels=int(pre["input_channels"]),
                    vocos_dim=int(pre["vocos_dim"]),
                    vocos_intermediate_dim=int(pre["vocos_intermediate_dim"]),
                    vocos_num_layers=int(pre["vocos_num_layers"]),
                    out_channels=int(pre["out_channels"]),
                    condition_dim=int(pre["condition_dim"]),
                    num_inner_backbones=len(ratios),
                    use_tanh_at_final=bool(pre.get("use_tanh_at_final", False)),
                ),
                generator=WaveGeneratorConfig(
                    input_channel=int(dec["input_channel"]),
                    channels=int(dec["channels"]),
                    rates=tuple(int(r) for r in dec["rates"]),
                    kernel_sizes=tuple(int(k) for k in dec["kernel_sizes"]),
                ),
            )
        except KeyError as err:
            raise ValueError(f"BiCodec config is missing the field {err}") from None
        config.validate()
        return config

    def validate(self) -> None:
        """The constraints that make the decode path's shapes line up."""
        spk, pre, gen = self.speaker, self.prenet, self.generator
        checks = [
            (pre.input_channels == self.latent_dim, "prenet.input_channels == quantizer.input_dim"),
            (pre.condition_dim == spk.out_dim, "prenet.condition_dim == speaker_encoder.out_dim"),
            (pre.out_channels == spk.out_dim, "prenet.out_channels == speaker_encoder.out_dim"),
            (gen.input_channel == spk.out_dim, "decoder.input_channel == speaker_encoder.out_dim"),
            (len(gen.rates) == len(gen.kernel_sizes), "len(decoder.rates) == len(kernel_sizes)"),
            (gen.channels % 2 ** len(gen.rates) == 0, "decoder.channels divisible by 2^blocks"),
            (all(lv % 2 == 0 for lv in spk.fsq_levels), "speaker_encoder.fsq_levels are even"),
        ]
        broken = [what for ok, what in checks if not ok]
        if broken:
            raise ValueError("inconsistent BiCodec config: " + "; ".join(broken))

"""Load the released ``BiCodec/`` folder into the decode-only model.

Only the decode keys are read from ``model.safetensors`` (a fraction of the file);
each is checked by name and shape, weight norm is folded once, and every key the
decode path does not use is reported as skipped, never silently dropped. Reports and
errors name keys as the checkpoint does, whatever the model calls the module.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from decoder_gateway.codec.model.bicodec import BiCodecDecoder
from decoder_gateway.codec.model.config import BiCodecConfig
from decoder_gateway.codec.model.layers import WEIGHT_NORMED

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"

# The three ways a weight-normed conv can be stored: released (old weight_norm API),
# re-saved with the parametrization API, or already folded.
_NORM_SPELLINGS = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


# Model key prefix -> the checkpoint's, where they differ: the released checkpoint files
# the global-token de-quantizer under its speaker encoder.
_CHECKPOINT_PREFIXES = {"global_dequantizer.": "speaker_encoder."}


def checkpoint_key(key: str) -> str:
    """The checkpoint's name for the model's state key ``key``."""
    for ours, theirs in _CHECKPOINT_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    return key


class CheckpointError(ValueError):
    """The checkpoint does not fit the decoder built from its config."""


@dataclass
class LoadReport:
    """What a load read from ``path`` and what it skipped, in the checkpoint's key names."""

    path: Path
    loaded_keys: int = 0
    skipped_keys: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def skipped_summary(self) -> str:
        """Skipped keys grouped by their top two name components, with counts."""
        groups = Counter(".".join(key.split(".")[:2]) for key in self.skipped_keys)
        return ", ".join(f"{name} ({count})" for name, count in sorted(groups.items()))


def checkpoint_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys and shapes the decode path reads, in the released storage format.

    Weight-normed convs appear as ``weight_g`` (gain, one per axis-0 channel) and
    ``weight_v`` (direction) instead of ``weight``.
    """
    layout: dict[str, tuple[int, ...]] = {}
    normed = {name for name, module in model.named_modules() if isinstance(module, WEIGHT_NORMED)}
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        stored = checkpoint_key(key)
        shape = tuple(tensor.shape)
        if module_name in normed and leaf == "weight":
            stored_module = stored.rpartition(".")[0]
            layout[f"{stored_module}.weight_g"] = (shape[0],) + (1,) * (len(shape) - 1)
            layout[f"{stored_module}.weight_v"] = shape
        else:
            layout[stored] = shape
    return layout


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """``config.yaml`` and ``model.safetensors`` of a BiCodec folder; a missing one is
    a FileNotFoundError naming it (the decoder and the speaker encoder read both)."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"BiCodec folder {folder} has no {required.name}")
    return config_path, weights_path


def load_bicodec(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[BiCodecDecoder, LoadReport]:
    """Build the model from ``path/config.yaml`` and load ``path/model.safetensors``.

    ``dtype``: float32, or bfloat16 / float16 (faster, at a small error stated in
    docs/performance.md) on CUDA or a CPU that computes in it natively. The model is
    in eval mode with weight norm folded; the report tells what was loaded and skipped.
    """
    started = time.perf_counter()
    config_path, weights_path = checkpoint_files(path)
    device = torch.device(device)
    if dtype != torch.float32 and device.type == "cpu" and not cpu_computes_in(dtype):
        logger.warning(
            "this CPU has no native %s arithmetic, so decoding in it is slow; float32 is advised",
            dtype,
        )

    # Built on the meta device: no time spent on random init of 96 M parameters.
    with torch.device("meta"):
        model = BiCodecDecoder(BiCodecConfig.from_yaml(config_path))
    state, report = _read_decode_state(weights_path, model)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    report.seconds = time.perf_counter() - started
    logger.info(
        "BiCodec decoder loaded from %s in %.2f s: %d decode keys, %d skipped (%s)",
        config_path.parent,
        report.seconds,
        report.loaded_keys,
        len(report.skipped_keys),
        report.skipped_summary(),
    )
    return model, report


def cpu_computes_in(dtype: torch.dtype) -> bool:
    """Whether this CPU has native ``dtype`` arithmetic for torch's convolutions."""
    checks = {
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,  # AVX-512 BF16 or AMX
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,  # AVX-512 FP16 or AMX
    }
    try:
        return dtype == torch.float32 or bool(checks[dtype]())
    except (KeyError, RuntimeError, AttributeError):
        return False


def _read_decode_state(
    weights_path: Path, model: BiCodecDecoder
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    report = LoadReport(path=weights_path)
    normed = {name for name, module in model.named_modules() if isinstance(module, WEIGHT_NORMED)}
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    with safe_open(str(weights_path), framework="pt") as checkpoint:
        available = set(checkpoint.keys())

        def read(key: str) -> torch.Tensor:
            used.add(key)
            return checkpoint.get_tensor(key).float()

        missing: list[str] = []
        for key, shape in expected.items():
            module_name, _, leaf = key.rpartition(".")
            stored = checkpoint_key(key)  # the checkpoint's name: all reads and errors use it
            if module_name in normed and leaf == "weight" and stored not in available:
                stored_module = stored.rpartition(".")[0]
                spelling = next(
                    (
                        (f"{stored_module}.{g}", f"{stored_module}.{v}")
                        for g, v in _NORM_SPELLINGS
                        if f"{stored_module}.{g}" in available
                        and f"{stored_module}.{v}" in available
                    ),
                    None,
                )
                if spelling is None:
                    missing.append(f"{stored_module}.weight_g / weight_v")
                    continue
                gain, direction = read(spelling[0]), read(spelling[1])
                check_shape(spelling[1], tuple(direction.shape), shape)
                check_shape(spelling[0], tuple(gain.shape), (shape[0],) + (1,) * (len(shape) - 1))
                # The same fused op torch's weight_norm uses: W = g * v / ||v|| (axis 0 kept).
                state[key] = torch._weight_norm(direction, gain, 0)
            elif stored in available:
                tensor = read(stored)
                check_shape(stored, tuple(tensor.shape), shape)
                state[key] = tensor
            else:
                missing.append(stored)
        if missing:
            shown = ", ".join(missing[:8])
            if len(missing) > 8:
                shown += f" and {len(missing) - 8} more"
            raise CheckpointError(
                f"{weights_path}: {len(missing)} decode key(s) missing: {shown}. "
                "Is this the BiCodec folder of a Spark-TTS checkpoint, with a matching config.yaml?"
            )
    report.loaded_keys = len(used)
    report.skipped_keys = sorted(available - used)
    return state, report


def check_shape(key: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise CheckpointError(
            f"checkpoint key {key} has shape {list(found)}, the config expects {list(expected)}"
        )


def resolve_bicodec_dir(
    bicodec_dir: str | Path | None,
    repo: str,
    cache_dir: str | Path | None = None,
    token: str | None = None,
) -> Path:
    """Where the BiCodec weights are: ``bicodec_dir`` if given, else a hub download.

    The download takes only ``BiCodec/*`` of ``repo`` (about 0.6 GB), never the LLM
    nor the wav2vec2 encoder that the decode path does not need.
    """
    if bicodec_dir:
        folder = Path(bicodec_dir).expanduser()
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"BICODEC_DIR={folder} must hold {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(the BiCodec/ folder of a Spark-TTS repository)"
            )
        return folder
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(
            repo_id=repo,
            allow_patterns=["BiCodec/*"],
            cache_dir=str(cache_dir) if cache_dir else None,
            token=token or None,
        )
    except Exception as err:  # the hub raises many types: offline, 401, 404, timeouts
        raise RuntimeError(
            f"could not download BiCodec/* of {repo!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Set BICODEC_DIR to a local BiCodec folder, "
            "or TOKENIZER_REPO to a repository with a BiCodec/ folder (and HF_TOKEN if it "
            "is gated); TOKENIZER_CACHE_DIR sets where downloads go."
        ) from err
    folder = Path(snapshot) / "BiCodec"
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"repository {repo!r} has no BiCodec/{WEIGHTS_FILE}")
    return folder

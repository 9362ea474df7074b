"""Build a tiny, deterministic Spark-TTS-format language model for tests.

The folder it writes is a Qwen2 causal LM that vLLM (CPU build) loads like the
real fine-tunes: same vocabulary size, same token strings at the same ids, same
end-of-sequence token. Its weights are arranged so that the next token depends
only on the current one (attention and MLP outputs are zeroed) and each token of
a fixed chain strongly predicts its successor:

* ``<|start_global_token|>`` -> 32 global tokens -> ``<|end_global_token|>``
  -> ``<|start_semantic_token|>``;
* ``<|start_semantic_token|>`` -> ``semantic_length`` semantic tokens
  -> ``<|end_semantic_token|>`` -> ``<|im_end|>``.

The logit margin of the intended successor is at least ``MIN_MARGIN`` so that
sampling at the usual temperatures with top_k / top_p never deviates.

Every other token (the controllable prompt's ``<|end_style_label|>`` among them) has
no embedding, so what follows it is drawn uniformly: after the voice-design prompt
the model writes noise, unless vLLM's structured outputs (the gateway's design
grammar) confine it to the design's shape. It then writes the grammar's attribute
tokens at random, and from ``<|start_global_token|>`` on the chain above: its
designed voice is :func:`expected_global_values`. The tokenizer holds the tokens of
that prompt and grammar (style labels, ``<|start_acoustic_token|>``, ...) at their
upstream ids.

Usage: ``python -m devtools.tiny_spark_lm OUT_DIR [--semantic-length N]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# --- Token ids (PROTOCOL.md) -------------------------------------------------
VOCAB_SIZE = 166_000  # model rows; the tokenizer has TOKENIZER_SIZE entries
TOKENIZER_SIZE = 165_158
ENDOFTEXT_ID = 151_643
IM_START_ID = 151_644
IM_END_ID = 151_645
GLOBAL_BASE = 151_665
NUM_GLOBAL_VALUES = 4096
SEMANTIC_BASE = 155_761
NUM_SEMANTIC_VALUES = 8192
PITCH_LABEL_BASE = 164_965
SPEED_LABEL_BASE = 164_986
GENDER_BASE = 165_032
TASK_TTS_ID = 165_137
TASK_CONTROLLABLE_TTS_ID = 165_143
START_CONTENT_ID = 165_146
START_STYLE_LABEL_ID = 165_147
START_ACOUSTIC_ID = 165_149
START_GLOBAL_ID = 165_150
START_SEMANTIC_ID = 165_151
END_CONTENT_ID = 165_152
END_STYLE_LABEL_ID = 165_153
END_ACOUSTIC_ID = 165_155
END_GLOBAL_ID = 165_156
END_SEMANTIC_ID = 165_157

NUM_GLOBAL_TOKENS = 32
DEFAULT_SEMANTIC_LENGTH = 60
HIDDEN_SIZE = 64
NUM_HEADS = 2
HEAD_DIM = 32  # vLLM's CPU attention wants a multiple of 32
INTERMEDIATE_SIZE = 128
MAX_POSITION_EMBEDDINGS = 4096
MIN_MARGIN = 40.0  # logit gap between the intended successor and any other token
SEED = 1234

NAMED_TOKENS: dict[str, int] = {
    "<|endoftext|>": ENDOFTEXT_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|task_tts|>": TASK_TTS_ID,
    "<|task_controllable_tts|>": TASK_CONTROLLABLE_TTS_ID,
    "<|start_content|>": START_CONTENT_ID,
    "<|end_content|>": END_CONTENT_ID,
    "<|start_style_label|>": START_STYLE_LABEL_ID,
    "<|end_style_label|>": END_STYLE_LABEL_ID,
    "<|start_acoustic_token|>": START_ACOUSTIC_ID,
    "<|end_acoustic_token|>": END_ACOUSTIC_ID,
    "<|start_global_token|>": START_GLOBAL_ID,
    "<|end_global_token|>": END_GLOBAL_ID,
    "<|start_semantic_token|>": START_SEMANTIC_ID,
    "<|end_semantic_token|>": END_SEMANTIC_ID,
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def global_token(value: int) -> str:
    """Return the token string of BiCodec global value ``value``."""
    return f"<|bicodec_global_{value}|>"


def semantic_token(value: int) -> str:
    """Return the token string of BiCodec semantic value ``value``."""
    return f"<|bicodec_semantic_{value}|>"


def expected_semantic_values(length: int = DEFAULT_SEMANTIC_LENGTH) -> list[int]:
    """Semantic values (0..8191) the model emits after ``<|start_semantic_token|>``."""
    if not 0 < length <= NUM_SEMANTIC_VALUES:
        raise ValueError(f"semantic length must be in 1..{NUM_SEMANTIC_VALUES}")
    # 37 is coprime with 8192, so the values are all distinct.
    return [(k * 37 + 5) % NUM_SEMANTIC_VALUES for k in range(length)]


def expected_semantic_ids(length: int = DEFAULT_SEMANTIC_LENGTH) -> list[int]:
    """Token ids of the semantic chain (without start/end markers)."""
    return [SEMANTIC_BASE + v for v in expected_semantic_values(length)]


def expected_global_values() -> list[int]:
    """The 32 global values (0..4095) the model emits after ``<|start_global_token|>``."""
    return [(k * 131 + 7) % NUM_GLOBAL_VALUES for k in range(NUM_GLOBAL_TOKENS)]


def expected_global_ids() -> list[int]:
    """Token ids of the global chain (without start/end markers)."""
    return [GLOBAL_BASE + v for v in expected_global_values()]


def chain_ids(semantic_length: int = DEFAULT_SEMANTIC_LENGTH) -> list[int]:
    """The full deterministic path from ``<|start_global_token|>`` to ``<|im_end|>``."""
    return [
        START_GLOBAL_ID,
        *expected_global_ids(),
        END_GLOBAL_ID,
        START_SEMANTIC_ID,
        *expected_semantic_ids(semantic_length),
        END_SEMANTIC_ID,
        IM_END_ID,
    ]


def successor_map(semantic_length: int = DEFAULT_SEMANTIC_LENGTH) -> dict[int, int]:
    """Map each chain token id to the id the model generates after it."""
    chain = chain_ids(semantic_length)
    return dict(itertools.pairwise(chain))


# --- Tokenizer -------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 style byte-level BPE uses for bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def token_strings() -> list[str]:
    """Return the string of every tokenizer id 0..TOKENIZER_SIZE-1."""
    strings = [f"<|filler_{i}|>" for i in range(TOKENIZER_SIZE)]
    strings[:256] = _byte_level_alphabet()
    for n in range(NUM_GLOBAL_VALUES):
        strings[GLOBAL_BASE + n] = global_token(n)
    for n in range(NUM_SEMANTIC_VALUES):
        strings[SEMANTIC_BASE + n] = semantic_token(n)
    for n in range(5):
        strings[PITCH_LABEL_BASE + n] = f"<|pitch_label_{n}|>"
        strings[SPEED_LABEL_BASE + n] = f"<|speed_label_{n}|>"
    for n in range(3):
        strings[GENDER_BASE + n] = f"<|gender_{n}|>"
    for text, idx in NAMED_TOKENS.items():
        strings[idx] = text
    if len(set(strings)) != len(strings):
        raise AssertionError("duplicate token strings")
    return strings


def _added_token_ids() -> list[int]:
    """Ids registered as added tokens (matched verbatim in text)."""
    ids = list(NAMED_TOKENS.values())
    ids += range(GLOBAL_BASE, GLOBAL_BASE + NUM_GLOBAL_VALUES)
    ids += range(SEMANTIC_BASE, SEMANTIC_BASE + NUM_SEMANTIC_VALUES)
    ids += range(PITCH_LABEL_BASE, PITCH_LABEL_BASE + 5)
    ids += range(SPEED_LABEL_BASE, SPEED_LABEL_BASE + 5)
    ids += range(GENDER_BASE, GENDER_BASE + 3)
    return sorted(set(ids))


def write_tokenizer(out_dir: Path) -> None:
    """Write ``tokenizer.json`` and its transformers config files to ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    strings = token_strings()
    vocab = {s: i for i, s in enumerate(strings)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    added: list[AddedToken] = []
    for idx in _added_token_ids():
        special = strings[idx] in SPECIAL_TOKENS
        added.append(AddedToken(strings[idx], special=special, normalized=False))
    tok.add_tokens([t for t in added if not t.special])
    tok.add_special_tokens([t for t in added if t.special])
    for t in added:  # the model vocabulary already holds each string at its id
        got = tok.token_to_id(t.content)
        if got != vocab[t.content]:
            raise AssertionError(f"{t.content} got id {got}, expected {vocab[t.content]}")
    tok.save(str(out_dir / "tokenizer.json"))

    decoder_entries = {
        str(i): {
            "content": strings[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": strings[i] in SPECIAL_TOKENS,
        }
        for i in _added_token_ids()
    }
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder_entries,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1))


# --- Model -----------------------------------------------------------------------


def model_config() -> dict[str, object]:
    """The Hugging Face ``config.json`` of the tiny model."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": 1,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": 1,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "max_window_layers": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "torch_dtype": "float32",
        "dtype": "float32",
        # A pre-5.0 version, as in the real checkpoints: transformers 5 otherwise
        # warns about a Mistral regex for local folders.
        "transformers_version": "4.51.3",
    }


def build_weights(semantic_length: int = DEFAULT_SEMANTIC_LENGTH) -> dict[str, np.ndarray]:
    """Weights whose greedy (and sampled) continuation follows :func:`successor_map`."""
    rng = np.random.default_rng(SEED)
    succ = successor_map(semantic_length)
    preds = list(succ)
    embed = np.zeros((VOCAB_SIZE, HIDDEN_SIZE), dtype=np.float32)
    lm_head = np.zeros((VOCAB_SIZE, HIDDEN_SIZE), dtype=np.float32)

    unit = rng.standard_normal((len(preds), HIDDEN_SIZE))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    # After the final RMSNorm (weight 1) a unit vector has norm sqrt(hidden).
    hidden = unit * np.sqrt(HIDDEN_SIZE)
    gram = hidden @ hidden.T
    diag = float(gram[0, 0])
    off = gram - np.eye(len(preds)) * diag
    margin_per_unit = diag - max(float(off.max()), 0.0)
    if margin_per_unit <= 0:
        raise AssertionError("chain embeddings are not separable")
    scale = MIN_MARGIN * 1.25 / margin_per_unit
    for row, (tok, nxt) in enumerate(succ.items()):
        embed[tok] = unit[row]
        lm_head[nxt] = hidden[row] * scale
    _check_margins(embed, lm_head, succ)

    h, inter = HIDDEN_SIZE, INTERMEDIATE_SIZE
    q_out, kv_out = NUM_HEADS * HEAD_DIM, HEAD_DIM
    p = "model.layers.0."
    small = 0.02
    zeros = np.zeros
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": lm_head,
        "model.norm.weight": np.ones(h, dtype=np.float32),
        p + "input_layernorm.weight": np.ones(h, dtype=np.float32),
        p + "post_attention_layernorm.weight": np.ones(h, dtype=np.float32),
        p + "self_attn.q_proj.weight": rng.standard_normal((q_out, h)).astype(np.float32) * small,
        p + "self_attn.q_proj.bias": zeros(q_out, dtype=np.float32),
        p + "self_attn.k_proj.weight": rng.standard_normal((kv_out, h)).astype(np.float32) * small,
        p + "self_attn.k_proj.bias": zeros(kv_out, dtype=np.float32),
        p + "self_attn.v_proj.weight": rng.standard_normal((kv_out, h)).astype(np.float32) * small,
        p + "self_attn.v_proj.bias": zeros(kv_out, dtype=np.float32),
        # Zero outputs: each position sees only its own token embedding.
        p + "self_attn.o_proj.weight": zeros((h, q_out), dtype=np.float32),
        p + "mlp.gate_proj.weight": rng.standard_normal((inter, h)).astype(np.float32) * small,
        p + "mlp.up_proj.weight": rng.standard_normal((inter, h)).astype(np.float32) * small,
        p + "mlp.down_proj.weight": zeros((h, inter), dtype=np.float32),
    }
    return tensors


def _check_margins(embed: np.ndarray, lm_head: np.ndarray, succ: dict[int, int]) -> None:
    """Assert every chain token predicts its successor by at least ``MIN_MARGIN``."""
    for tok, nxt in succ.items():
        x = embed[tok].astype(np.float64)
        x = x / np.sqrt(np.mean(x * x) + 1e-6)
        logits = lm_head.astype(np.float64) @ x
        best = logits[nxt]
        logits[nxt] = -np.inf
        if best - logits.max() < MIN_MARGIN:
            raise AssertionError(f"margin of {tok}->{nxt} is {best - logits.max():.1f}")


def write_model(out_dir: Path | str, semantic_length: int = DEFAULT_SEMANTIC_LENGTH) -> Path:
    """Write the full tiny model folder (config, weights, tokenizer) and return it."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model_config(), indent=1))
    generation_config = {
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=1))
    save_file(build_weights(semantic_length), str(out / "model.safetensors"), {"format": "pt"})
    write_tokenizer(out)
    (out / "tiny_spark_lm.json").write_text(
        json.dumps({"semantic_length": semantic_length, "chain": chain_ids(semantic_length)})
    )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--semantic-length", type=int, default=DEFAULT_SEMANTIC_LENGTH)
    args = parser.parse_args(argv)
    out = write_model(args.out_dir, args.semantic_length)
    print(out)


if __name__ == "__main__":
    main()

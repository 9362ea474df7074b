"""Streaming text-to-speech gateway for Spark-TTS: vLLM writes BiCodec tokens, we decode.

``python -m decoder_gateway`` serves it; ``decoder_gateway.codec.load_decoder`` is
the decoder on its own; ``python -m decoder_gateway.client`` is a command-line client.
"""

__version__ = "0.1.0"

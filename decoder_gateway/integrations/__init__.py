"""Services for voice-agent frameworks, each an optional extra of its own:
:mod:`.pipecat` (``pip install "decoder-gateway[pipecat]"``). They talk to a gateway
over its WebSocket only, like :mod:`decoder_gateway.client`."""

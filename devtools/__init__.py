"""Test and benchmark tooling for the gateway (like ``torch.testing``).

Shipped with the package so that the test suite and the benchmark scripts share one
copy, and documented as tooling: the serving code never imports it.

* :mod:`.process`: :class:`~.process.ServerProcess`, a server as a child process that
  is started, waited for until its health endpoint answers, logged to a file and
  stopped (terminate, then kill); the servers below build on it.
* :mod:`.gateway_server`: :class:`~.gateway_server.GatewayServer`, the real gateway
  (``python -m decoder_gateway``, or the fault-injecting :mod:`.faulty_gateway`).
* :mod:`.standin_llm`: a stand-in for vLLM's OpenAI server with fault injection, in a
  thread (:class:`~.standin_llm.StandinServer`) or as a process
  (:class:`~.standin_llm.StandinProcess`, ``python -m devtools.standin_llm``).
* :mod:`.vllm_server`: :class:`~.vllm_server.VllmServer`, the real vLLM CPU server
  through ``launch_vllm.sh`` (needs a checkout).
* :mod:`.tiny_spark_lm`: writes a tiny deterministic Spark-format LM for vLLM.
* :mod:`.faulty_gateway`: the gateway with a decoder that fails for one voice.

The data paths (:data:`REPO`, :data:`GOLDEN_BICODEC`) point into a checkout: the
tooling is meant to be used from one (``pip install -e ".[test]"``).
"""

from devtools.paths import GOLDEN_BICODEC, REPO

__all__ = ["GOLDEN_BICODEC", "REPO"]

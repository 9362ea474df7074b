"""The gateway benchmark (``benchmarks/bench_gateway.py``) as a small package.

* :mod:`.workload`: the request settings, the paragraphs, the plans of the sections;
* :mod:`.measure`: one request measured (:class:`~.measure.Delivery`), the original
  server's way as a baseline, CPU time per process tree, the gateway's metrics;
* :mod:`.decoder`: the decoder API in one place (load, build the full-size random
  BiCodec, describe);
* :mod:`.llms`: the LLM behind the gateway (the stand-in, or vLLM on a tiny model);
* :mod:`.grid`, :mod:`.load`, :mod:`.compare`, :mod:`.text_in`: the sections, each
  printing its table;
* :mod:`.stats`: summary statistics and their formatting;
* :mod:`.run`: one run from its parsed flags, header first.
"""

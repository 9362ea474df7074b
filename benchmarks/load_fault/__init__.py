"""The load and fault run (``benchmarks/load_fault_run.py``) as a small package.

* :mod:`.clients`: request records and the recorder, seeded texts, the wire helpers
  and the normal HTTP / WebSocket clients;
* :mod:`.faults`: every fault injector (fault clients, in-band LLM faults, LLM
  restarts and outages) and the lists of fault kinds;
* :mod:`.llm`: the LLM the gateway talks to (the stand-in as a process, or vLLM);
* :mod:`.run`: the schedule, the upstream watcher, memory sampling, and one run
  from start to report;
* :mod:`.report`: the JSON report and its printed tables.
"""

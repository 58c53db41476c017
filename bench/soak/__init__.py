"""A soak run: a whole Corral fleet under a long mixed streaming load while agents are SIGKILLed
and restarted; does any request get lost, does any process grow?

    .venv/bin/python -m bench.soak                 # 30 minutes, the figures the goals speak of
    .venv/bin/python -m bench.soak --minutes 3 --kill-every-s 30 --restart-after-s 10   # a short check

Processes (`bench.soak.fleet`), each its own OS process with its log in a kept folder:
``corral nats`` (and the nats-server binary it starts), ``corral registry``, ``corral
aggregator``, ``corral gateway``, and N agents (default 4, heartbeat 1 s) each beside its own
``corral sim`` (time scale 0.02: a request takes tens of milliseconds; models stay loaded).

Load (`bench.soak.load`): a fixed number of aiohttp clients (default 16) in closed loops, each
drawing from a mix of streamed ``/api/generate`` and ``/api/chat``, non-streamed ones,
``/v1/chat/completions`` with ``stream: true`` and ``/api/tags`` / ``/api/ps`` reads.

Faults: every ``--kill-every-s`` (default 60) one agent, round robin over all but the first
``--steady-agents`` (default 1), is SIGKILLed, and started again with the same id
``--restart-after-s`` (default 20) later.

Counted (`bench.soak.report`): requests started, completed, lost unstarted (any failure before the
status and first byte: should be zero), failed after start (an error line or a cut stream:
expected for streams on a killed agent), latency p50/p99 of completed requests; every
``--sample-s`` (default 10) the VmRSS of every process, compared after warm-up (the sample at
5 minutes, or at 1/6 of a shorter run) with the last one: the goal is no growth beyond 10 %.
"""

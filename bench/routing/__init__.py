"""Routing policies compared on a simulated fleet: the same seeded workloads through the gateway
under each ``X-Load-Balancing-Strategy``, each on a fresh fleet.

    .venv/bin/python -m bench.routing [--quick] [--seed N] [--workloads skewed,chat,burst,steady_burst,num_ctx]
                                      [--policies auto,round_robin,random,least_connection[,herd]]
                                      [--repeat N] [--time-scale 0.2] [--cap 150] [--json FILE]
                                      [--herd-venv DIR]

Where each part lives:

``fleet``      the simulated machines and model catalogue, the fleet's options (scaled periods,
               the seeded router) and the waits until it is ready
``workloads``  the five workloads: each plans its requests from a seeded generator and drives them
``client``     one keep-alive connection to the gateway and what one request measured (`Sample`)
``run``        one workload under one policy on a fresh fleet: counters, CPU, warnings
``results``    a run's figures (`RunResult`), repetitions pooled, one request as JSON
``report``     the tables, auto's ratios against the baselines and peers, the verdicts
``ideal``      the best schedule any router could reach for a workload's burst, on the simulators'
               own rates, to read the burst's TTFT against
``cli``        the command line (``__main__`` runs it)
``herd``       the peer router ollama-herd: its pinned release in a virtualenv of its own, and
               the settings and command lines of its router and nodes
``peer``       a workload through herd, in a child process inside a network namespace
``netns``      that namespace (loopback only), removed with everything in it afterwards

The policy ``herd`` runs each workload through ollama-herd instead of the gateway, on the same
simulators (same machines, seed and time scale), with one herd node per simulator; the report then
shows auto ÷ herd beside auto ÷ round robin. It needs root (a network namespace) and installs
herd on first use; without either it says so in one line and the other policies still run.

The fleet (`LocalFleet`, in this process, as ``corral up`` runs it): an embedded nats-server, a
registry, an aggregator, six simulated GPU servers of mixed vendors, VRAM sizes, speeds and
parallel slots (`fleet.MACHINES`), one agent each, and the gateway on a real socket. Every
simulator has the same model catalogue on disk (`fleet.MODELS`, 1.3 to 9 GB; the 12 GB card lacks
the 14B model), nothing loaded, ``OLLAMA_CONTEXT_LENGTH=4096`` (8192 for ``steady_burst``) and
keep_alive 5m. The gateway's
`Router` is seeded with the run's seed, so the ``random`` strategy draws the same sequence on
every run.

Simulated time runs ``1 / time_scale`` times faster than the wall clock; every time below is in
simulated seconds (wall ÷ time_scale), so loads of seconds and decode rates keep their real
proportions. The control plane's periods (the settings declared ``period=True``: how often an
agent re-reads its Ollama, how often the registry checks the overflow queue for replicas, how often
a queued request checks that its model is still served, how long a load just started counts as
under way) are scaled the same way, so they keep their default length in simulated time; timeouts
(claim, idle, queue) are failure detection and stay at their wall-clock defaults:
``--time-scale 1`` runs in real time.

Workloads (all from ``random.Random(seed)``, identical for every policy; replies are bounded by
``num_predict`` and every simulator has the same seed, so the tokens generated do not depend on
where a request runs):

``skewed``
    Streaming ``/api/generate`` over six models with Zipf-like popularity (s = 1.2), prompts of
    50–800 tokens, closed loop with 12 concurrent clients.
``chat``
    Multi-turn ``/api/chat`` conversations (two models, each with its own long system prompt), each
    turn resending the whole history with the previous replies; one closed loop per conversation
    with a think time between turns. Both models are loaded on every server before the clock starts
    (directly on the simulators, the same for every policy), so where the turns go alone decides
    whether a prompt cache is reused. Reports the mean prompt eval time per turn index: with the
    cache reused, later turns evaluate only the new message; without it, the whole history.
``burst``
    50 concurrent streaming requests for a model no agent has loaded (phi4:14b); counts the loads
    across the fleet.
``steady_burst``
    The burst beside steady traffic: ``llama3.2:3b`` loaded everywhere and 12 closed loops streaming
    on it; after 5 simulated seconds the 50-request cold burst for phi4:14b. At
    ``OLLAMA_CONTEXT_LENGTH=8192`` the 16 GB card cannot load phi4:14b whole beside the busy model
    (Ollama's 80 % rule) while the others can: a policy that loads it there evicts the busy model
    (the agent then turns that model's requests away until the load ends, so they go to the other
    cards rather than load it back). The report adds the burst requests' TTFT p95 alone, and the
    same figure under an ideal schedule (`ideal`).
``num_ctx``
    Two models with ``options.num_ctx`` drawn from {default, 2048, 8192} (prompt sizes to match),
    closed loop with 8 concurrent clients; a runner loaded with another context must reload.

The JSON file (``--json``, default ``bench/results/routing.json``) has the same figures, the
per-turn table, requests and loads per agent, and every request (start, TTFT, end to end, tokens,
prompt eval, load wait, error) for looking into a tail.

Per workload and policy: TTFT p50/p95 (first NDJSON chunk), end-to-end p95, generated tokens per
simulated second, cold loads (a model loaded on a server that did not have it loaded, after an
eviction too), reloads (a loaded runner replaced for another num_ctx), evictions — the simulators'
own counters — and errors; then auto's ratios against round_robin and random from the same run and
a verdict line. A run longer than ``--cap`` wall seconds is cut off (open requests count as errors).
Timing still varies between runs of the same seed (what NATS and the event loop interleave decides
some placements): ``--repeat N`` pools N fresh-fleet runs per workload and policy.
"""

"""Pure routing models over fleet snapshots: the cost model, the strategies, the pull placement rule.
No I/O, no clocks, no NATS: only `corral.protocol` types go in and out."""

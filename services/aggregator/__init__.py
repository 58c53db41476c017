"""Merged fleet views and rolling request figures, kept in JetStream KV (``corral aggregator``)."""

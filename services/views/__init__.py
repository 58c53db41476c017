"""Pure rendering of the fleet's merged views (tags, ps, /v1/models, status) from agent states; the
aggregator writes them to KV, the gateway serves them from its own watch, the CLI prints them."""

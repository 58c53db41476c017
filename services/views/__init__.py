"""Pure rendering of the fleet's merged views (tags, ps, /v1/models, status) from agent states; the
aggregator writes them to KV, the gateway serves them from its own watch, the CLI prints them.

`corral.views.catalog` renders what one Ollama server would show (tags, ps, /v1/models, version),
`corral.views.status` the fleet at a glance (``/api/status``) and the aggregator's rates."""

from corral.views.catalog import (
    Placement,
    PsRow,
    fleet_version,
    listed_as,
    merged_ps,
    merged_tags,
    parse_time,
    ps_body,
    tags_body,
    v1_model_body,
    v1_models_body,
)
from corral.views.status import (
    RATES_KEY,
    STATUS_KEY,
    AgentRow,
    FleetStatus,
    LoadedModel,
    ModelRate,
    Rates,
    Totals,
    current,
    queue_by_model,
    rates_decoder,
    status_body,
    status_view,
)
from corral.views.terminal import printable

__all__ = [
    "RATES_KEY",
    "STATUS_KEY",
    "AgentRow",
    "FleetStatus",
    "LoadedModel",
    "ModelRate",
    "Placement",
    "PsRow",
    "Rates",
    "Totals",
    "current",
    "fleet_version",
    "listed_as",
    "merged_ps",
    "merged_tags",
    "parse_time",
    "printable",
    "ps_body",
    "queue_by_model",
    "rates_decoder",
    "status_body",
    "status_view",
    "tags_body",
    "v1_model_body",
    "v1_models_body",
]

"""Pure routing models over fleet snapshots: the cost model, the strategies, the pull placement rule.
No I/O, no clocks, no NATS: only `corral.protocol` types go in and out.

`corral.routing.model` holds the cost model and the strategies (`Router`), `corral.routing.route`
what a request asks (`Route`) and what an agent holds for it (`warm`), `corral.routing.pulls`
the rule for where a pull goes (`pull_order`), `corral.routing.markers` when a load marker has done
its work (`marker_expired`) and the context a request is routed at (`route_ctx`),
`corral.routing.loads` the load times agents observed (`observed_load_s`) and
`corral.routing.replicas` how many more loads a model's backlog needs (`plan_replicas`),
`corral.routing.demand` each model's requests running and waiting (`DemandMeter`) and
`corral.routing.rebalance` which card a steady load moves to another model (`plan_move`)."""

from corral.routing.demand import *  # noqa: F403  (... the demand measure ...)
from corral.routing.loads import *  # noqa: F403  (... the observed load times ...)
from corral.routing.markers import *  # noqa: F403  (... the load markers' rule ...)
from corral.routing.model import *  # noqa: F403  (the package's face: the model's __all__ ...)
from corral.routing.pulls import *  # noqa: F403  (... the pull rule's ...)
from corral.routing.rebalance import *  # noqa: F403  (... the rebalancing rule's ...)
from corral.routing.replicas import *  # noqa: F403  (... the replica rule's ...)
from corral.routing.route import *  # noqa: F403  (... and a route against an agent's state)

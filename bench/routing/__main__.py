"""``python -m bench.routing``: see `bench.routing` for what it measures and `bench.routing.cli`
for the flags."""

import sys

from bench.routing.cli import main

sys.exit(main())

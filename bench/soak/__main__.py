"""``python -m bench.soak``: see `bench.soak` for what it measures and `bench.soak.cli` for the
flags."""

import sys

from bench.soak.cli import main

sys.exit(main())

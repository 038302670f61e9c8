"""`python -m bilaf_jax.cli ...`: the `bilaf` command without its console script."""

import sys

from bilaf_jax.cli import main

sys.exit(main())

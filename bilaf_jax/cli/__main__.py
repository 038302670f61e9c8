"""`python -m bilaf_jax.cli ...`: the `bilaf` command without its console script."""

import sys

from bilaf_jax.cli import main

if __name__ == "__main__":  # importing this module (doctest collection) runs nothing
    sys.exit(main())

"""`python -m fa4.bench`: the same command as `fa4 bench` (fa4.bench.cli)."""
import sys

from .cli import main

sys.exit(main())

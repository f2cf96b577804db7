"""`python -m kvtier.scheduler.cli` runs the `kvtier` command line."""

import sys

from kvtier.scheduler.cli import main

sys.exit(main())

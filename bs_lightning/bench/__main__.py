"""`python -m bs_lightning.bench <subcommand>`."""

import sys

from bs_lightning.bench.cli import main

sys.exit(main())

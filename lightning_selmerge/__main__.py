"""``python -m lightning_selmerge``: the ``lightning-selmerge`` command."""

import sys

from lightning_selmerge.cli import main

sys.exit(main())

"""``python -m lfnnify`` runs the command line (also under torchrun)."""

import sys

from .app.cli import main

sys.exit(main())

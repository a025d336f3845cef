"""``python -m minimoe ...`` runs the ``minimoe`` command (and lets ``torchrun -m minimoe`` launch it)."""

import sys

from minimoe.cli import main

sys.exit(main())

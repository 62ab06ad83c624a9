"""`python -m diffsr ...` (and `accelerate launch -m diffsr train ...`)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m vtprune.cli``."""
import sys

from . import main

sys.exit(main())

"""`python -m pumice.server MODEL.pumice [options]`: the same as `pumice serve`."""
import sys

from .cli import main

sys.exit(main())

"""``python -m csm_ext`` = the ``csm-ext`` console script."""
import sys

from .cli import main

sys.exit(main())

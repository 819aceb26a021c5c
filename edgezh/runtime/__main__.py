"""`python -m edgezh.runtime chat|serve …`."""

import sys

from edgezh.runtime.cli_args import main

sys.exit(main())

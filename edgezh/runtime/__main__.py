"""`python -m edgezh.runtime chat|serve …` (the argument handling lives in `edgezh.commands.chat`)."""

import sys

from edgezh.commands.chat import main

sys.exit(main())

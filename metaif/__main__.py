"""`python -m metaif ...` is the `metaif` command."""

import sys

from .cli import main

sys.exit(main())

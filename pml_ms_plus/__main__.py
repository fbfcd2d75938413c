"""``python -m pml_ms_plus``: the same command line as ``pml-ms-plus``."""

import sys

from .ablation.cli import main

sys.exit(main())

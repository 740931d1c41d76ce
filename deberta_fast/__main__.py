"""python -m deberta_fast {train,bench} ..."""

import sys

from .cli import main

sys.exit(main())

"""``python -m lesskv`` (what ``torchrun -m lesskv`` needs) is the ``lesskv`` command."""

import sys

from lesskv.cli import main

sys.exit(main())

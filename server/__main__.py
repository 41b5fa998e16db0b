"""``python -m fedgate.server`` is ``fedgate-server``."""
from __future__ import annotations

import sys

from fedgate.server.cli import main

sys.exit(main())

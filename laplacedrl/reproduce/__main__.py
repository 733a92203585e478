"""``python -m laplacedrl.reproduce``: see :mod:`laplacedrl.reproduce`."""
import sys

from laplacedrl.errors import main_guard
from laplacedrl.reproduce import main

sys.exit(main_guard(main))

"""`python -m bench` from a checkout: the benchmark lives in warmturn/bench/."""

import sys

from warmturn.bench.__main__ import main

sys.exit(main())

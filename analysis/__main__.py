"""`python -m analysis` from a checkout: the analysis lives in warmturn/analysis/."""

import sys

from warmturn.analysis.__main__ import main

sys.exit(main())

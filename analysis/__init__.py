"""`python -m analysis` from a checkout (not installed): the analysis lives in warmturn/analysis/."""

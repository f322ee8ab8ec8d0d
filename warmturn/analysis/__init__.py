"""warmturn analysis: captures -> pandas -> diffs, latency tables, plots, report."""

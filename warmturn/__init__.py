"""warmturn's shared, standard-library-only core: the Anthropic wire protocol
(:mod:`warmturn.protocol`), the normalization rules (:mod:`warmturn.rules`) and environment
plumbing (:mod:`warmturn.plumbing`). The mitmproxy addon, the server, the analysis and the
bench all import it; it imports nothing outside the standard library."""

"""warmturn's shared, standard-library-only core: the Anthropic wire protocol
(:mod:`warmturn.protocol`), the normalization rules (:mod:`warmturn.rules`), the model identity
(:mod:`warmturn.model_identity`) and this machine's facts (:mod:`warmturn.machine`: OpenBLAS, a free
port, its own addresses). The mitmproxy addon, the server, the analysis and the
bench all import it; it imports nothing outside the standard library."""

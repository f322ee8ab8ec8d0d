"""`python -m server` from a checkout (not installed): the server lives in warmturn/server/ (`python -m warmturn.server`)."""

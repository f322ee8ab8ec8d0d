"""warmturn's mitmproxy addon package: stdlib + mitmproxy + the stdlib-only `warmturn/` core.

Entry script: addons/normalize.py.
"""

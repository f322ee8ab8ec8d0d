"""warmturn's mitmproxy addon package (stdlib + mitmproxy only). Entry script: addons/normalize.py."""

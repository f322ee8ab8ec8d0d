# The Claude Code CLI versions setup installs (npm @anthropic-ai/claude-code, into the warmturn cache).
# Sourced by setup.sh and claude.sh; tests/procs.py reads the same two lines.
CLAUDE_CODE_VERSION=2.1.332        # the current release: make claude, the end-to-end tests -> $CACHE/npm-2.1.332
CLAUDE_CODE_OLDER_VERSION=2.1.197  # the older end-to-end case and the bench workload       -> $CACHE/npm

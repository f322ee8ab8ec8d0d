# Helpers sourced by run.sh, server.sh and claude.sh (they set PY to a Python 3 first).

# split_words TEXT: the words of TEXT by POSIX shell quoting rules, into the array WORDS. Nothing is
# evaluated ($, globs and backticks stay literal); unbalanced quotes are an error (exit 2).
split_words() {
  mapfile -d '' -t WORDS < <("$PY" -c 'import shlex, sys
try:
    words = shlex.split(sys.argv[1])
except ValueError as e:
    sys.exit(f"warmturn: cannot parse ARGS ({e}): {sys.argv[1]!r}")
sys.stdout.write("".join(w + "\0" for w in words))' "$1")
  wait $! || exit 2
}

# check_port PORT: exit 2 unless PORT is a TCP port number.
check_port() {
  if ! [[ "$1" =~ ^[0-9]{1,5}$ ]] || (( 10#$1 < 1 || 10#$1 > 65535 )); then
    echo "warmturn: PORT must be a TCP port number (1-65535), not '$1'" >&2; exit 2
  fi
}


# port_free PORT: true when 127.0.0.1:PORT can be bound the way mitmproxy binds it (SO_REUSEADDR: the
# TIME_WAIT connections a stopped proxy leaves behind do not count, a listener does).
port_free() {
  "$PY" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

# port_listening PORT: true when something accepts connections on 127.0.0.1:PORT.
port_listening() {
  "$PY" -c 'import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()
except OSError:
    sys.exit(1)' "$1"
}

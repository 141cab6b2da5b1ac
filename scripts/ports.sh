# Loopback ports for the measurement scripts (bench.sh, scale.sh, ab.sh);
# sourced, not run.

# A port nothing listens on now, picked by the kernel on 127.0.0.1.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until something listens on 127.0.0.1:$1, at most $2 tenths of a
# second (default 200), else exits the script.
wait_port() {
  for _ in $(seq "${2:-200}"); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; exit 1
}

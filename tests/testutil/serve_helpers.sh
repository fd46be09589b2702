# Sourced by the shell tests that start `quantkv serve`.

#   ADDRESS=$(wait_for_listening LOG PID [SECONDS]) || fail "..."
# Prints HOST:PORT from the server's "NAME: listening on HOST:PORT (...)" line in LOG once it
# appears; returns 1 (with the reason on stderr) when PID exits first or SECONDS (default
# 120) pass.
wait_for_listening() {
  local log=$1 pid=$2 tries=$(( ${3:-120} * 4 )) address=""
  for _ in $(seq "$tries"); do
    address=$(sed -n 's/^.*: listening on \([^ ]*\) .*$/\1/p' "$log")
    if [[ -n $address ]]; then
      echo "$address"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the server exited before listening" >&2
      return 1
    fi
    sleep 0.25
  done
  echo "no 'listening on' line within ${3:-120} s" >&2
  return 1
}

#   wait_gone PID [SECONDS] || fail "..."
# Returns 0 once PID has exited (polling every 0.25 s), 1 when it still runs after SECONDS
# (default 15).
wait_gone() {
  local pid=$1 tries=$(( ${2:-15} * 4 ))
  for _ in $(seq "$tries"); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  ! kill -0 "$pid" 2>/dev/null
}

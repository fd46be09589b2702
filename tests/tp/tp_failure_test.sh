#!/usr/bin/env bash
# A tensor-parallel rank that dies or hangs mid-run must end the whole job with a clear
# message within a bounded time and leave no process behind (runtime/comm/mpi_communicator.h).
# While `mpirun -np 2 quantkv generate --tp 2` is printing tokens:
#  (a) SIGKILL rank 1: mpirun must exit non-zero within 30 s, both ranks must be gone, and
#      stderr must say that a rank was killed (mpirun sees the death and ends the job);
#  (b) SIGSTOP rank 0 with QUANTKV_COMM_TIMEOUT_S=5: nothing dies, so only the collective's
#      timeout can notice; rank 1 must say it timed out, naming the collective, and mpirun
#      must exit with the timeout's code within 15 s with both ranks gone (the stopped one too).
#   tp_failure_test.sh QUANTKV_BINARY [MPIEXEC]
# Exit 77 (ctest SKIP_RETURN_CODE) without mpirun or the default model.
set -euo pipefail

QUANTKV=$(readlink -f "${1:?usage: $0 QUANTKV_BINARY [MPIEXEC]}")
MPIRUN=${2:-$(command -v mpirun || true)}
SKIP=77
TIMEOUT_EXIT=3  # kCommTimeoutExitCode

if [[ -z $MPIRUN || ! -x $MPIRUN ]]; then
  echo "SKIP: no mpirun"
  exit $SKIP
fi
# Where `quantkv fetch-model` stores the default model (an empty QUANTKV_HOME is unset).
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $MODEL ]]; then
  echo "SKIP: default model not in the cache ($MODEL); run \`quantkv fetch-model\`"
  exit $SKIP
fi

TMP=$(mktemp -d)
LAUNCH_PID=""  # timeout(1), whose child is mpirun
MPIRUN_PID=""
RANK_PIDS=()  # indexed by rank

# True when PID is still this test's process running EXE, so cleanup never signals a
# process that merely reused the number.
runs() { [[ $(readlink -f "/proc/$1/exe" 2>/dev/null) == "$2" ]]; }
# A process state letter (R, S, T stopped, Z zombie), empty when gone.
state() { sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true; }

# Resumes and kills whatever of the current job is left (a failing check must not leave a
# stopped rank behind), then reaps the launcher.
kill_job() {
  local p
  for p in "${RANK_PIDS[@]}"; do
    if runs "$p" "$QUANTKV"; then
      kill -CONT "$p" 2>/dev/null || true
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  if [[ -n $MPIRUN_PID ]] && runs "$MPIRUN_PID" "$(readlink -f "$MPIRUN")"; then
    kill -KILL "$MPIRUN_PID" 2>/dev/null || true
  fi
  if [[ -n $LAUNCH_PID ]]; then
    kill -KILL "$LAUNCH_PID" 2>/dev/null || true
    wait "$LAUNCH_PID" 2>/dev/null || true
  fi
  LAUNCH_PID=""
  MPIRUN_PID=""
  RANK_PIDS=()
}
cleanup() {
  kill_job
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

CASE=""
fail() {
  echo "FAIL ($CASE): $*"
  echo "--- mpirun stderr:"
  cat "$TMP/$CASE.err" 2>/dev/null || true
  echo "--- stdout (first 400 bytes):"
  head -c 400 "$TMP/$CASE.out" 2>/dev/null || true
  echo
  exit 1
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# start_job NAME [VAR=VALUE...]: mpirun -np 2 generate in the background, long enough
# (2000 tokens, EOS ignored) to still be running when a rank is signalled; sets LAUNCH_PID,
# MPIRUN_PID, RANK_PIDS and waits until rank 0 has printed tokens. timeout(1) bounds mpirun's
# life even if this script is killed without running its trap.
start_job() {
  CASE=$1
  shift
  timeout -s KILL 100 env "$@" "$MPIRUN" --allow-run-as-root --oversubscribe -np 2 \
    "$QUANTKV" generate --tp 2 --threads 1 --max-tokens 2000 --ignore-eos \
    --prompt "The three primary colors are" >"$TMP/$CASE.out" 2>"$TMP/$CASE.err" &
  LAUNCH_PID=$!
  local deadline=$(($(now_ms) + 60000)) p r
  while ((${#RANK_PIDS[@]} < 2)); do
    (($(now_ms) < deadline)) || fail "no 2 quantkv ranks under mpirun within 60 s"
    kill -0 "$LAUNCH_PID" 2>/dev/null || fail "mpirun exited before both ranks started"
    [[ -n $MPIRUN_PID ]] || MPIRUN_PID=$(pgrep -P "$LAUNCH_PID" | head -n 1 || true)
    if [[ -n $MPIRUN_PID ]]; then
      for p in $(pgrep -P "$MPIRUN_PID" || true); do
        runs "$p" "$QUANTKV" || continue
        # The launcher's rank variable (Open MPI, else PMI / PMIx launchers).
        r=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null |
          sed -n 's/^\(OMPI_COMM_WORLD_RANK\|PMI_RANK\|PMIX_RANK\)=//p' | head -n 1)
        [[ -n $r ]] && RANK_PIDS[r]=$p
      done
    fi
    sleep 0.1
  done
  # Tokens on stdout: the ranks are past start-up and exchanging all-reduces every layer.
  until [[ -s $TMP/$CASE.out ]]; do
    (($(now_ms) < deadline)) || fail "rank 0 printed no token within 60 s"
    kill -0 "$LAUNCH_PID" 2>/dev/null || fail "mpirun exited before printing a token"
    sleep 0.1
  done
  sleep 0.5
  kill -0 "$LAUNCH_PID" 2>/dev/null || fail "generation ended before a rank could be signalled"
  echo "($CASE) ranks: 0=pid ${RANK_PIDS[0]}, 1=pid ${RANK_PIDS[1]}; tokens are coming"
}

# await_exit LIMIT_S: waits for mpirun; sets RC and ELAPSED_MS (since SIGNALLED_MS); fails
# when it is still running after LIMIT_S, or when a rank is still there 5 s after it. A
# zombie counts as still there, but mpirun may exit right after killing a rank, before
# reaping it: the orphan is then the init process's to reap, which takes a moment.
await_exit() {
  local limit_ms=$(($1 * 1000)) p left
  while kill -0 "$LAUNCH_PID" 2>/dev/null; do
    (($(now_ms) - SIGNALLED_MS < limit_ms)) || fail "mpirun still running $1 s after the signal"
    sleep 0.05
  done
  ELAPSED_MS=$(($(now_ms) - SIGNALLED_MS))
  RC=0
  wait "$LAUNCH_PID" || RC=$?
  LAUNCH_PID=""
  local grace=$(($(now_ms) + 5000))
  while :; do
    left=""
    for p in "${!RANK_PIDS[@]}"; do
      if [[ -n $(state "${RANK_PIDS[p]}") ]]; then
        left+=" rank $p (pid ${RANK_PIDS[p]}, state $(state "${RANK_PIDS[p]}"))"
      fi
    done
    [[ -z $left ]] && break
    (($(now_ms) < grace)) || fail "still there 5 s after mpirun exited:$left"
    sleep 0.05
  done
  echo "($CASE) mpirun exited with $RC after ${ELAPSED_MS} ms; ranks gone after" \
    "$(($(now_ms) - SIGNALLED_MS)) ms"
}

# (a) A rank dies.
start_job killed
SIGNALLED_MS=$(now_ms)
kill -KILL "${RANK_PIDS[1]}"
await_exit 30
((RC != 0)) || fail "mpirun exited 0 after rank 1 was killed"
grep -qiE 'rank 1.*(signal 9|killed)' "$TMP/killed.err" ||
  fail "stderr does not say that rank 1 was killed"
grep -iE 'signal 9|killed' "$TMP/killed.err" | head -n 1
kill_job

# (b) A rank hangs: stopped, alive, holding its sockets open, so only the timeout can tell.
start_job stopped QUANTKV_COMM_TIMEOUT_S=5
SIGNALLED_MS=$(now_ms)
kill -STOP "${RANK_PIDS[0]}"
await_exit 15
((RC == TIMEOUT_EXIT)) || fail "mpirun exited with $RC, not the timeout's $TIMEOUT_EXIT"
((ELAPSED_MS >= 4500)) || fail "the job ended ${ELAPSED_MS} ms after the stop, before the 5 s timeout"
line=$(grep -E 'quantkv: rank 1 of 2 \(pid [0-9]+\): MPI I[a-z]+ .*not complete after [0-9.]+ s: another rank may have died or hung; aborting all ranks' \
  "$TMP/stopped.err" | head -n 1 || true)
[[ -n $line ]] || fail "rank 1 did not report the timed-out collective"
echo "$line"
kill_job

echo "PASS"

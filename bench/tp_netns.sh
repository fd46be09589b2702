#!/usr/bin/env bash
# Tensor parallelism across two "nodes": TP=2 with rank 0 and rank 1 in two Linux network
# namespaces joined by a veth pair (issue 5's two-namespace bench), the ranks started without
# mpirun (--rank R --rendezvous HOST:PORT --secret-file F: the TCP data plane, a star through
# rank 0), the link shaped with tc tbf on both ends (10 Gbit/s, 1 Gbit/s, 100 Mbit/s by
# default), each rate with --comm-compress none, int8 and int4.
#
# Workloads: prefill (`perplexity --ctx 512 --chunks 2 --json` on WikiText-2: seconds, tok/s,
# rank 0's time in the all-reduces, bytes, PPL per codec) and decode (`generate` of 64 tokens,
# greedy, --ignore-eos: its timing line). Baselines in the same run: TP=1 with 2 threads,
# TP=2 over loopback inside one namespace (and, when mpirun exists, `mpirun -np 2` there: the
# MPI data plane, for reference), TP=2 across the namespaces unshaped. Runs go in rounds
# (every configuration once per round; rows are medians over the rounds), so a change in
# the shared machine's load touches all configurations alike. Decode steps stay exact by
# default (--comm-compress-min-elements 16384 > 576 values per decode all-reduce), so decode
# is also run with --comm-compress-min-elements 0 (prefill's all-reduces, 512 x 576 values,
# are compressed either way). Bytes on the wire are also read from the veth's own counters
# (TCP/IP headers and start-up included). A `serve --tp 2` across the namespaces (client in namespace A),
# unshaped and at the lowest rate, checks that serving works there and times a few streams.
#
# Latency: when the kernel has no sch_netem (probed and recorded), nothing emulates delay:
# the round trip is the veth's own, measured with a small python3 TCP echo (no ping needed).
#
#   bench/tp_netns.sh [--rates "10gbit 1gbit 100mbit"] [--repeat-decode N (4)]
#                     [--repeat-prefill N (2)] [--no-min0] [--no-serve] [--no-mpi] [--quick]
#                     [--out DIR]
# (--quick: 100mbit only, one round, no min-elements 0 rows: ~2 minutes.)
# Needs root, iproute2 with `ip netns`, tc with tbf, python3, build/launcher/quantkv and the
# default model. Writes DIR/tp_netns.{md,json} (default bench/results). Every namespace,
# veth and process it starts is removed on exit, failure or Ctrl-C. About 7-8 minutes on 2
# cores.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
Q=$ROOT/build/launcher/quantkv
TEXT=$ROOT/../shared/data/wikitext-2/test.txt
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT="The history of the city begins in the early medieval period, when"
RATES="10gbit 1gbit 100mbit"
CODECS="none int8 int4"
REPEAT_DECODE=4
REPEAT_PREFILL=2
MPI=1
MIN0=1
SERVE=1
OUT=$ROOT/bench/results
CHUNKS=2
GEN_TOKENS=64
RANK_TIMEOUT_S=300

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --rates) RATES=$2; shift 2 ;;
    --repeat-decode) REPEAT_DECODE=$2; shift 2 ;;
    --repeat-prefill) REPEAT_PREFILL=$2; shift 2 ;;
    --no-min0) MIN0=0; shift ;;
    --no-serve) SERVE=0; shift ;;
    --no-mpi) MPI=0; shift ;;
    --quick) RATES="100mbit"; REPEAT_DECODE=1; REPEAT_PREFILL=1; MIN0=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "tp_netns: unknown argument '$1'" >&2; usage 2 >&2 ;;
  esac
done
[[ $REPEAT_DECODE =~ ^[1-9][0-9]*$ && $REPEAT_PREFILL =~ ^[1-9][0-9]*$ ]] ||
  { echo "tp_netns: --repeat-* take a positive integer" >&2; exit 2; }

die() { echo "tp_netns: $*" >&2; exit 1; }
log() { echo "tp_netns: $*" >&2; }

# ---- preflight: refuse clearly before touching anything ----
[[ $(id -u) == 0 ]] || die "must run as root (it creates network namespaces, a veth pair and tc qdiscs); try: sudo $0"
command -v ip >/dev/null || die "no 'ip' (iproute2) in PATH"
command -v tc >/dev/null || die "no 'tc' (iproute2) in PATH"
ip netns list >/dev/null 2>&1 || die "'ip netns' is not available (iproute2 without netns support?)"
PY=$(command -v python3) || die "no python3 in PATH (used for the probes and the report)"
# A pyenv shim re-resolves on every call; the real interpreter starts faster.
if [[ $PY == */shims/* ]] && command -v pyenv >/dev/null; then PY=$(pyenv which python3); fi
[[ -x $Q ]] || die "no $Q: build first (cmake --build build)"
[[ -f $MODEL ]] || die "no default model at $MODEL: run \`$Q fetch-model\`"
[[ -f $TEXT ]] || die "no WikiText-2 test text at $TEXT"
MPIRUN=""
if [[ $MPI == 1 ]]; then MPIRUN=$(command -v mpirun || true); fi
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}  # OpenBLAS misdetects this CPU

# Unique names: this shell's pid (interface names must stay under 16 characters).
NSA=qkv-a-$$
NSB=qkv-b-$$
VA=qkv$$a
VB=qkv$$b
IPA=10.77.0.1
IPB=10.77.0.2
TMP=$(mktemp -d /tmp/tp_netns.XXXXXX)
CREATED_NS=()
PIDS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  exec 3>&2 2>/dev/null  # no "Killed" job notices; messages go to fd 3
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  for ns in "${CREATED_NS[@]}"; do
    # Every process still in the namespace was started by this script.
    local pids
    pids=$(ip netns pids "$ns" 2>/dev/null)
    # shellcheck disable=SC2086  # one pid per word
    [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
  done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for ns in "${CREATED_NS[@]}"; do
    ip -n "$ns" link del "$VA" 2>/dev/null  # takes its peer with it
    ip netns del "$ns" || echo "tp_netns: could not delete namespace $ns" >&3
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---- the helper: probes, parsing, report ----
cat >"$TMP/helper.py" <<'PY'
import json, os, re, socket, statistics, struct, sys, time

def recvn(c, n):
    b = bytearray()
    while len(b) < n:
        x = c.recv(min(n - len(b), 1 << 20))
        if not x:
            sys.exit("probe: peer closed")
        b += x
    return bytes(b)

def cmd_freeport(host):
    s = socket.socket(); s.bind((host, 0)); print(s.getsockname()[1])

def cmd_probe_server(host, port):
    # Two connections: a 1-byte echo (round trip), then a bulk stream (goodput).
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(2); s.settimeout(60)
    print("ready", flush=True)
    for _ in range(2):
        c, _ = s.accept(); c.settimeout(120)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind, n = struct.unpack("!cQ", recvn(c, 9))
        if kind == b"r":
            for _ in range(n):
                c.sendall(recvn(c, 1))
        else:
            got = 0
            while got < n:
                x = c.recv(1 << 20)
                if not x:
                    break
                got += len(x)
            c.sendall(b"k")
        c.close()

def cmd_probe_client(host, port, nbytes):
    nbytes = int(nbytes)
    c = socket.create_connection((host, int(port)), timeout=60)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n = 1000
    c.sendall(struct.pack("!cQ", b"r", n)); rtts = []
    for _ in range(n):
        t = time.perf_counter(); c.sendall(b"x"); recvn(c, 1)
        rtts.append(time.perf_counter() - t)
    c.close()
    c = socket.create_connection((host, int(port)), timeout=120)
    buf = b"\0" * (1 << 20)
    t = time.perf_counter()
    c.sendall(struct.pack("!cQ", b"t", nbytes)); left = nbytes
    while left > 0:
        k = min(left, len(buf)); c.sendall(buf[:k]); left -= k
    recvn(c, 1); dt = time.perf_counter() - t; c.close()
    rtts.sort()
    print(json.dumps({"rtt_us_median": statistics.median(rtts) * 1e6,
                      "rtt_us_p90": rtts[int(0.9 * len(rtts))] * 1e6,
                      "goodput_mbit_s": nbytes * 8 / dt / 1e6, "probe_bytes": nbytes}))

def cmd_record(rows_path, meta_json, stdout_path, stderr_path):
    """Parse one run's output and append a row (meta + parsed numbers)."""
    row = json.loads(meta_json)
    out = open(stdout_path).read()
    err = open(stderr_path).read()
    if row["workload"] == "prefill":
        j = json.loads(out.strip().splitlines()[-1])
        row.update(seconds=j["seconds"], tok_per_s=j["tokens_per_s"], ppl=j["ppl"],
                   tokens=j["ctx"] * j["chunks"], comm_s=j.get("tp_comm_seconds", 0.0),
                   comm_bytes_raw=j.get("comm_bytes_raw"), comm_bytes_wire=j.get("comm_bytes_wire"),
                   codec_s=j.get("comm_codec_seconds"))
    else:
        m = re.search(r"prompt (\d+) tokens in (\d+) ms .*generated (\d+) tokens in (\d+) ms "
                      r"\(([\d.]+) tok/s\)", err)
        if not m:
            sys.exit("tp_netns: no timing line from generate:\n" + err)
        comm = re.search(r"([\d.]+) ms in all-reduces", err)
        row.update(prompt_tokens=int(m.group(1)), prompt_ms=int(m.group(2)),
                   tokens=int(m.group(3)), gen_ms=int(m.group(4)), tok_per_s=float(m.group(5)),
                   comm_s=float(comm.group(1)) / 1e3 if comm else 0.0, text=out)
        row["seconds"] = (row["prompt_ms"] + row["gen_ms"]) / 1e3
        b = re.search(r"rank 0 sent ([\d.]+) MiB instead of ([\d.]+) MiB raw", err)
        if b:
            row["comm_bytes_wire"] = float(b.group(1)) * 2**20
            row["comm_bytes_raw"] = float(b.group(2)) * 2**20
        # Forward passes: the prompt, then one per generated token but the last.
        row["steps"] = row["tokens"]
        row["tokens_processed"] = row["prompt_tokens"] + row["tokens"] - 1
    with open(rows_path, "a") as f:
        f.write(json.dumps(row) + "\n")

def median_row(rows):
    """Repeated runs as one row: the medians of tok/s, seconds and comm seconds; the other
    fields (bytes, PPL, text) from the run nearest the median tok/s (all runs' tok/s kept)."""
    med = statistics.median(x["tok_per_s"] for x in rows)
    r = dict(min(rows, key=lambda x: abs(x["tok_per_s"] - med)))
    r["tok_per_s"] = med
    for k in ("seconds", "comm_s", "wall_s"):
        if all(k in x for x in rows):
            r[k] = statistics.median(x[k] for x in rows)
    r["tok_per_s_runs"] = [x["tok_per_s"] for x in rows]
    r["text_stable"] = len({x.get("text") for x in rows}) == 1
    r["ppl_stable"] = len({x.get("ppl") for x in rows}) == 1
    return r

def cmd_report(rows_path, links_path, meta_path, out_dir):
    raw = [json.loads(l) for l in open(rows_path)]
    links = [json.loads(l) for l in open(links_path)] if os.path.exists(links_path) else []
    meta = json.load(open(meta_path))
    groups = {}
    for r in raw:
        groups.setdefault(r["key"], []).append(r)
    rows = [median_row(g) for g in groups.values()]
    serve = [r for r in rows if r["workload"] == "serve"]
    rows = [r for r in rows if r["workload"] != "serve"]
    by = {(r["workload"], r["setup"], r["link"], r["codec"], r["min_elements"]): r for r in rows}

    def base_tp1(w):
        b = [r for r in rows if r["workload"] == w and r["setup"] == "tp1"]
        return statistics.mean(x["tok_per_s"] for x in b) if b else None

    def ref(w, link="unshaped", codec="none", me="default"):
        return by.get((w, "netns", link, codec, me))

    def x(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    def per(v, n):
        return f"{v / n:,.0f}" if v is not None and n else "-"

    link_names = {"start": "TP=1, 2 threads (first)", "end": "TP=1, 2 threads (last)",
                  "-": "TP=1, 2 threads", "mpi": "TP=2 mpirun, one ns (MPI data plane)",
                  "loopback": "TP=2 loopback (one ns)",
                  "unshaped": "TP=2 veth, unshaped"}
    def name(r):
        return link_names.get(r["link"], f"TP=2 veth, tbf {r['link']}")

    md = ["# TP=2 across two network namespaces (veth, tc tbf)\n"]
    md.append(
        f"{meta['date']}, {meta['cpu']}, {meta['cores']} cores, commit {meta['commit']}. "
        "SmolLM2-135M-Instruct Q4_1, --kv fp16, OPENBLAS_CORETYPE="
        f"{meta['openblas_coretype']}. TP=2: one thread per rank, rank 0 in namespace A, rank 1 "
        "in namespace B (or both in A over 127.0.0.1 for the loopback row), started without "
        "mpirun (`--rank R --rendezvous A:PORT --secret-file F`: the TCP data plane, a star "
        "through rank 0). Both veth ends shaped with `tc qdisc add dev VETH root tbf rate R "
        "burst B latency 20ms` (B = 1 ms at R, at least 32 KB). "
        + ("sch_netem is not in this kernel (`tc ... netem` fails), so no delay is emulated: "
           "the round trip is the veth's own (table 1). " if not meta["netem"] else
           "sch_netem exists but this script adds no delay: the round trip is the veth's own. ")
        + f"Both ranks share the machine's {meta['cores']} cores, so this shows the wire's "
        "cost, not a second node's compute. Load average (1/5/15 min) at the start "
        f"{meta['loadavg_start']}, at the end {meta['loadavg_end']}; {meta['wall_s']} s in all. "
        "Reproduce: `sudo bench/tp_netns.sh`.\n")

    md.append("## Links (python3 TCP probe between the namespaces)\n")
    md.append("| link | RTT median | RTT p90 | probe goodput |")
    md.append("|---|---|---|---|")
    for l in links:
        md.append(f"| {l['link']} | {l['rtt_us_median']:.1f} µs | {l['rtt_us_p90']:.1f} µs | "
                  f"{l['goodput_mbit_s']:,.0f} Mbit/s |")
    md.append("\nRTT: 1-byte TCP echo (TCP_NODELAY, 1000 round trips, python overhead "
              "included); goodput: one TCP stream A→B.\n")

    b1 = base_tp1("prefill")
    u = ref("prefill")
    md.append(f"## Prefill: `perplexity --ctx 512 --chunks {meta['chunks']} --json`\n")
    md.append(f"{meta['chunks'] * 512} tokens; tok/s over all tokens processed, the median of "
              f"{meta['repeat_prefill']} runs. Ratios: tok/s "
              "against TP=1 (mean of its rows, run first and last in each round), against TP=2 over the "
              "unshaped veth with no compression, and against no compression on the same link. "
              "Comm share: rank 0's seconds in the all-reduces (waiting for the slower rank "
              "included) / run seconds. Reported B/token: what rank 0's all-reduces hand the "
              "wire by quantkv's count (`comm_bytes_wire`; uncompressed: 2 x 30 layers x 576 "
              "fp32). veth B/token: bytes the veth counted each way (A→B / B→A, TCP/IP and "
              "start-up included). ΔPPL: against the same link's `none` row.\n")
    md.append("| setup | --comm-compress | s | tok/s | vs TP=1 | vs TP=2 unshaped | vs none, same link "
              "| comm share | reported B/token | veth B/token A→B / B→A | PPL | ΔPPL |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in [r for r in rows if r["workload"] == "prefill"]:
        n0 = ref("prefill", r["link"]) if r["setup"] == "netns" else None
        tok = r["tokens"]
        rep = r.get("comm_bytes_wire")
        if rep is None and r["setup"] != "tp1":
            rep = meta["raw_bytes_per_token"] * tok
        veth = (f"{per(r['veth_ab'], tok)} / {per(r['veth_ba'], tok)}"
                if r.get("veth_ab") is not None else "-")
        dppl = (f"{100 * (r['ppl'] / n0['ppl'] - 1):+.3f}%" if n0 and r["codec"] != "none"
                else "-")
        md.append(f"| {name(r)} | {r['codec']} | {r['seconds']:.2f} | {r['tok_per_s']:.1f} | "
                  f"{x(r['tok_per_s'], b1)} | {x(r['tok_per_s'], u['tok_per_s'] if u else None)} | "
                  f"{x(r['tok_per_s'], n0['tok_per_s']) if n0 and r['codec'] != 'none' else '-'} | "
                  f"{100 * r['comm_s'] / r['seconds']:.1f}% | {per(rep, tok) if rep else '-'} | "
                  f"{veth} | {r['ppl']:.4f} | {dppl} |")

    b1 = base_tp1("decode")
    u = ref("decode")
    md.append(f"\n## Decode: `generate --max-tokens {meta['gen_tokens']} --temperature 0 "
              "--ignore-eos`\n")
    md.append(f"Prompt: \"{meta['prompt']}\". tok/s: generate's own (generated tokens / their "
              f"time), the median of {meta['repeat_decode']} runs (all runs in the .json). "
              "Comm share: rank 0's ms in all-reduces / (prompt + generation ms). B/token: over "
              "the tokens processed (the prompt's, then one per decode step: 60 all-reduces of "
              "576 values each). min-elements: `--comm-compress-min-elements` (default 16384 "
              "keeps decode steps exact; 0 compresses them). Text: the greedy output against "
              "TP=2 unshaped `none` (identical, or the first differing character).\n")
    md.append("| setup | --comm-compress | min-elements | tok/s | vs TP=1 | vs TP=2 unshaped | "
              "vs none, same link | all-reduce ms | comm share | reported B/token | "
              "veth B/token A→B / B→A | text |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ut = u["text"] if u else None
    for r in [r for r in rows if r["workload"] == "decode"]:
        n0 = ref("decode", r["link"]) if r["setup"] == "netns" else None
        st = r["tokens_processed"]
        rep = r.get("comm_bytes_wire")
        if rep is None and r["setup"] != "tp1":
            rep = meta["raw_bytes_per_token"] * st
        veth = (f"{per(r['veth_ab'], st)} / {per(r['veth_ba'], st)}"
                if r.get("veth_ab") is not None else "-")
        if ut is None or r["text"] == ut:
            txt = "identical"
        else:
            k = next((i for i, (a, b) in enumerate(zip(r["text"], ut)) if a != b),
                     min(len(r["text"]), len(ut)))
            txt = f"differs at char {k}"
        me = r["min_elements"] if r["setup"] != "tp1" else "-"
        md.append(f"| {name(r)} | {r['codec']} | {me} | {r['tok_per_s']:.1f} | "
                  f"{x(r['tok_per_s'], b1)} | {x(r['tok_per_s'], u['tok_per_s'] if u else None)} | "
                  f"{x(r['tok_per_s'], n0['tok_per_s']) if n0 and r is not n0 else '-'} | "
                  f"{1e3 * r['comm_s']:.0f} | {100 * r['comm_s'] / r['seconds']:.1f}% | "
                  f"{per(rep, st) if rep else '-'} | {veth} | {txt} |")

    md.append("\nWire bytes: the TCP data plane is a star through rank 0. A large uncompressed "
              "all-reduce sends rank 1's partial to rank 0 and the sum back, the same bytes each "
              "way. A small one (under 4096 values: every decode step's 576) is an all-gather "
              "whose reply carries every rank's piece, rank 1's own included, so A→B carries "
              "twice B→A; the compressed all-reduce's closing all-gather of the reduced chunks "
              "does the same, which is why its A→B bytes are ~1.5x `comm_bytes_wire` (quantkv "
              "counts what each rank must send, as for MPI).\n")

    md.append("## Compression against none on the same link (tok/s ratio)\n")
    cols = [("prefill", "int8", "default"), ("prefill", "int4", "default"),
            ("decode", "int8", "default"), ("decode", "int4", "default"),
            ("decode", "int8", "0"), ("decode", "int4", "0")]
    md.append("| link | prefill int8 | prefill int4 | decode int8 | decode int4 | "
              "decode int8, min-elements 0 | decode int4, min-elements 0 |")
    md.append("|---|---|---|---|---|---|---|")
    for link in ["unshaped"] + meta["rates"]:
        cells = []
        for w, c, me in cols:
            r, n0 = by.get((w, "netns", link, c, me)), ref(w, link)
            cells.append(x(r["tok_per_s"], n0["tok_per_s"]) if r and n0 else "-")
        md.append(f"| {link} | " + " | ".join(cells) + " |")
    md.append("\nDecode with the default min-elements sends exactly what `none` sends (decode "
              "steps stay exact), so those two columns show the run-to-run noise.\n")
    lat = []
    for r in rows:
        if r["workload"] == "decode" and r["setup"] != "tp1" and r["codec"] == "none":
            n_ar = 60 * r["steps"]
            lat.append(f"{name(r)} {1e6 * r['comm_s'] / n_ar:.0f} µs")
    if lat:
        md.append("Decode time per all-reduce (rank 0's ms in all-reduces / (60 x forward "
                  "steps), `none`; waiting for the slower rank included): " + "; ".join(lat)
                  + ".\n")

    if serve:
        md.append("\n## Serving across the namespaces: `serve --tp 2`, client in namespace A\n")
        md.append("Rank 0 serves on 127.0.0.1 in namespace A (`--worker-listen` its veth "
                  "address), rank 1 in namespace B (`--worker-listen` its own). One client "
                  f"generating {meta['gen_tokens']} greedy tokens, then concurrent clients "
                  "(aggregate output tok/s from the first request to the last token); both "
                  "ranks exit 0 on SIGTERM to rank 0. Same text: the one client's output "
                  "against the first serve run's, and against `generate` on the same link "
                  "(the server keeps every row on the per-row int8 matmul path for batch "
                  "invariance, `generate` does not, so a near-tie can flip; TP=1 does the "
                  "same).\n")
        md.append("| link | same text as the first serve | same text as generate | "
                  "concurrent streams x tokens | aggregate tok/s | wall s |")
        md.append("|---|---|---|---|---|---|")
        yn = lambda b: "yes" if b else "no"
        for r in serve:
            md.append(f"| {r['link']} | {yn(r['same_as_first_serve'])} | "
                      f"{yn(r['same_as_generate'])} | {r['streams']} x {r['stream_tokens']} | "
                      f"{r['tok_per_s']:.1f} | {r['wall_s']:.2f} |")

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tp_netns.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out_dir, "tp_netns.json"), "w") as f:
        # Every run's numbers; the generated text only once, in its row.
        runs = [{k: v for k, v in r.items() if k != "text"} for r in raw]
        json.dump({"meta": meta, "links": links, "rows": rows, "serve": serve, "runs": runs}, f,
                  indent=1)
        f.write("\n")

if __name__ == "__main__":
    cmd = sys.argv[1].replace("-", "_")
    globals()["cmd_" + cmd](*sys.argv[2:])
PY
helper() { "$PY" "$TMP/helper.py" "$@"; }

# ---- the two "nodes" ----
log "namespaces $NSA and $NSB, veth $VA <-> $VB ($IPA <-> $IPB)"
ip netns add "$NSA" || die "'ip netns add $NSA' failed (network namespaces unavailable?)"
CREATED_NS+=("$NSA")
ip netns add "$NSB" || die "'ip netns add $NSB' failed"
CREATED_NS+=("$NSB")
ip link add "$VA" type veth peer name "$VB" || die "cannot create a veth pair"
ip link set "$VA" netns "$NSA"
ip link set "$VB" netns "$NSB"
ip -n "$NSA" addr add "$IPA/30" dev "$VA"
ip -n "$NSB" addr add "$IPB/30" dev "$VB"
for ns in "$NSA" "$NSB"; do ip -n "$ns" link set lo up; done
ip -n "$NSA" link set "$VA" up
ip -n "$NSB" link set "$VB" up
# Probe the qdiscs: tbf is required, netem only recorded.
ip netns exec "$NSA" tc qdisc add dev "$VA" root tbf rate 1gbit burst 125000 latency 20ms \
  2>"$TMP/tbf.err" || die "tc tbf is unavailable: $(cat "$TMP/tbf.err")"
ip netns exec "$NSA" tc qdisc del dev "$VA" root
NETEM=false
if ip netns exec "$NSA" tc qdisc add dev "$VA" root netem delay 100us 2>/dev/null; then
  NETEM=true
  ip netns exec "$NSA" tc qdisc del dev "$VA" root
fi
log "tbf: yes; netem: $NETEM (no delay is emulated; the round trip is the veth's own)"

rate_bps() {  # RATE (NNNgbit, NNNmbit, NNNkbit) -> bits per second
  local n=${1//[!0-9]/} unit=${1//[0-9]/}
  [[ -n $n ]] || die "rate '$1': use NNNgbit, NNNmbit or NNNkbit"
  case $unit in
    gbit) echo $(( n * 1000000000 )) ;;
    mbit) echo $(( n * 1000000 )) ;;
    kbit) echo $(( n * 1000 )) ;;
    *) die "rate '$1': use NNNgbit, NNNmbit or NNNkbit" ;;
  esac
}

shape() {  # RATE or "unshaped": tbf on both ends (each shapes its own egress)
  local rate=$1 ns dev
  for pair in "$NSA:$VA" "$NSB:$VB"; do
    ns=${pair%%:*}; dev=${pair##*:}
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
    if [[ $rate != unshaped ]]; then
      local bps burst
      bps=$(rate_bps "$rate")
      burst=$(( bps / 8 / 1000 ))  # 1 ms at line rate
      (( burst >= 32768 )) || burst=32768
      ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" \
        latency 20ms || die "tc tbf rate $rate failed on $dev"
    fi
  done
}

probe() {  # LINK_LABEL: round trip and goodput A -> B
  local label=$1 nbytes=400000000 port out
  # About 0.8 s of the shaped rate, at most 400 MB.
  [[ $label == unshaped ]] || nbytes=$(( $(rate_bps "$label") / 10 ))
  (( nbytes <= 400000000 )) || nbytes=400000000
  port=$(ip netns exec "$NSB" "$PY" "$TMP/helper.py" freeport "$IPB")
  ip netns exec "$NSB" timeout -s KILL 120 "$PY" "$TMP/helper.py" probe-server "$IPB" "$port" \
    >"$TMP/probe.srv" 2>&1 &
  local srv=$!
  PIDS+=("$srv")
  for _ in $(seq 100); do grep -q ready "$TMP/probe.srv" 2>/dev/null && break; sleep 0.05; done
  out=$(ip netns exec "$NSA" timeout -s KILL 120 "$PY" "$TMP/helper.py" probe-client "$IPB" \
    "$port" "$nbytes") || die "link probe ($label) failed: $(cat "$TMP/probe.srv")"
  wait "$srv" || die "link probe server ($label) failed: $(cat "$TMP/probe.srv")"
  echo "{\"link\": \"$label\", ${out#\{}" >>"$TMP/links.jsonl"
  log "link $label: $out"
}

veth_bytes() {  # A->B and B->A byte counts so far
  echo "$(ip netns exec "$NSA" cat "/sys/class/net/$VA/statistics/tx_bytes")" \
       "$(ip netns exec "$NSB" cat "/sys/class/net/$VB/statistics/tx_bytes")"
}

# A copy of the binary: a rebuild of build/ during the run cannot swap it under the ranks.
QBIN=$TMP/quantkv
cp "$Q" "$QBIN"
QSHA=$(sha256sum "$QBIN" | cut -c1-16)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

SECRET=$TMP/secret
echo "tp-netns-$$-$RANDOM-$RANDOM-$(date +%s%N)" >"$SECRET"
chmod 600 "$SECRET"

# run WORKLOAD SETUP LINK CODEC MIN_ELEMENTS: one run, appended to the rows (runs of the same
# configuration in several rounds become one row: their median).
#   SETUP tp1: one process, 2 threads; mpi: `mpirun -np 2` inside namespace A (the MPI data
#   plane, for reference); loopback: both ranks in namespace A over 127.0.0.1 (TCP data
#   plane); netns: rank 0 in A on its veth address, rank 1 in B.
run() {
  local workload=$1 setup=$2 link=$3 codec=$4 me=$5
  local key="$workload|$setup|$link|$codec|$me"
  local -a args
  if [[ $workload == prefill ]]; then
    args=(perplexity --text "$TEXT" --ctx 512 --chunks "$CHUNKS" --json)
  else
    args=(generate --prompt "$PROMPT" --max-tokens "$GEN_TOKENS" --temperature 0 --ignore-eos)
  fi
  if [[ $codec != none ]]; then
    args+=(--comm-compress "$codec")
    [[ $me == default ]] || args+=(--comm-compress-min-elements "$me")
  fi
  log "round $ROUND: $workload, $setup, link $link, --comm-compress $codec, min-elements $me"
  local o0=$TMP/r0.out e0=$TMP/r0.err o1=$TMP/r1.out e1=$TMP/r1.err
  local vab=null vba=null cmd0 rc=0
  if [[ $setup == tp1 ]]; then
    cmd0=$(printf '%q ' "$Q" "${args[@]}" --threads 2)
    timeout -s KILL "$RANK_TIMEOUT_S" "$QBIN" "${args[@]}" --threads 2 >"$o0" 2>"$e0" || rc=$?
    [[ $rc == 0 ]] || { cat "$e0" >&2; die "TP=1 $workload exited $rc"; }
  elif [[ $setup == mpi ]]; then
    cmd0=$(printf '%q ' mpirun --oversubscribe -np 2 "$Q" "${args[@]}" --tp 2 --threads 1)
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 ip netns exec "$NSA" \
      timeout -s KILL "$RANK_TIMEOUT_S" "$MPIRUN" --oversubscribe -np 2 "$QBIN" "${args[@]}" \
      --tp 2 --threads 1 >"$o0" 2>"$e0" || rc=$?
    [[ $rc == 0 ]] || { cat "$e0" >&2; die "mpirun TP=2 $workload exited $rc"; }
  else
    local ns0=$NSA ns1=$NSB host=$IPA port before after
    [[ $setup == loopback ]] && { ns1=$NSA; host=127.0.0.1; }
    port=$(ip netns exec "$ns0" "$PY" "$TMP/helper.py" freeport "$host")
    local -a tp=(--tp 2 --threads 1 --rendezvous "$host:$port" --secret-file "$SECRET")
    cmd0=$(printf '%q ' "$Q" "${args[@]}" "${tp[@]}" --rank 0)
    before=$(veth_bytes)
    ip netns exec "$ns0" timeout -s KILL "$RANK_TIMEOUT_S" "$QBIN" "${args[@]}" "${tp[@]}" \
      --rank 0 >"$o0" 2>"$e0" &
    local p0=$!
    PIDS+=("$p0")
    ip netns exec "$ns1" timeout -s KILL "$RANK_TIMEOUT_S" "$QBIN" "${args[@]}" "${tp[@]}" \
      --rank 1 >"$o1" 2>"$e1" &
    local p1=$!
    PIDS+=("$p1")
    local rc0=0 rc1=0
    wait "$p0" || rc0=$?
    wait "$p1" || rc1=$?
    if [[ $rc0 != 0 || $rc1 != 0 ]]; then
      echo "--- rank 0 (exit $rc0):" >&2; cat "$e0" >&2
      echo "--- rank 1 (exit $rc1):" >&2; cat "$e1" >&2
      die "$workload on $setup/$link/$codec: rank 0 exited $rc0, rank 1 exited $rc1"
    fi
    [[ ! -s $o1 ]] || die "rank 1 printed results (only rank 0 should)"
    after=$(veth_bytes)
    if [[ $setup == netns ]]; then
      local b_ab b_ba a_ab a_ba
      read -r b_ab b_ba <<<"$before"
      read -r a_ab a_ba <<<"$after"
      vab=$(( a_ab - b_ab )); vba=$(( a_ba - b_ba ))
    fi
  fi
  local meta
  meta=$("$PY" -c 'import json,sys; k=sys.argv; print(json.dumps({"key":k[1],"workload":k[2],
"setup":k[3],"link":k[4],"codec":k[5],"min_elements":k[6],"round":int(k[7]),
"veth_ab":json.loads(k[8]),"veth_ba":json.loads(k[9]),"command_rank0":k[10]}))' \
    "$key" "$workload" "$setup" "$link" "$codec" "$me" "$ROUND" "$vab" "$vba" "$cmd0")
  helper record "$TMP/rows.jsonl" "$meta" "$o0" "$e0"
}

# serve_run LINK: serve --tp 2 across the namespaces, client(s) in namespace A.
serve_run() {
  local link=$1 port streams=4 stream_tokens=32
  port=$(ip netns exec "$NSA" "$PY" "$TMP/helper.py" freeport "$IPA")
  local -a s=(serve --tp 2 --threads 1 --kv-budget-mb 256 --rendezvous "$IPA:$port"
              --secret-file "$SECRET")
  log "serve --tp 2, link $link"
  ip netns exec "$NSB" timeout -s KILL "$RANK_TIMEOUT_S" "$QBIN" "${s[@]}" --rank 1 \
    --worker-listen "$IPB" >/dev/null 2>"$TMP/s1.err" &
  local s1=$!
  PIDS+=("$s1")
  ip netns exec "$NSA" timeout -s KILL "$RANK_TIMEOUT_S" "$QBIN" "${s[@]}" --rank 0 \
    --listen 127.0.0.1:0 --worker-listen "$IPA" >/dev/null 2>"$TMP/s0.err" &
  local s0=$!
  PIDS+=("$s0")
  local address="" _
  for _ in $(seq 480); do
    address=$(sed -n 's/^.*: listening on \([^ ]*\) .*$/\1/p' "$TMP/s0.err")
    [[ -n $address ]] && break
    kill -0 "$s0" 2>/dev/null || break
    sleep 0.25
  done
  [[ -n $address ]] || { cat "$TMP/s0.err" "$TMP/s1.err" >&2; die "serve rank 0 is not listening"; }
  local -a c=(ip netns exec "$NSA" timeout -s KILL 120 "$QBIN" client generate --server "$address")
  "${c[@]}" --prompt "$PROMPT" --max-tokens "$GEN_TOKENS" --ignore-eos >"$TMP/served.out" \
    2>"$TMP/client.err" || { cat "$TMP/client.err" >&2; die "client generate failed"; }
  local t0 t1 i
  local -a cp=()
  t0=$(date +%s.%N)
  for i in $(seq "$streams"); do
    "${c[@]}" --prompt "$PROMPT ($i)" --max-tokens "$stream_tokens" --ignore-eos \
      >/dev/null 2>"$TMP/client$i.err" &
    cp+=($!)
    PIDS+=($!)
  done
  for i in "${!cp[@]}"; do
    wait "${cp[$i]}" || { cat "$TMP/client$((i + 1)).err" >&2; die "concurrent client failed"; }
  done
  t1=$(date +%s.%N)
  kill -TERM "$s0"
  local rc0=0 rc1=0
  wait "$s0" || rc0=$?
  wait "$s1" || rc1=$?
  if [[ $rc0 != 0 || $rc1 != 0 ]]; then
    cat "$TMP/s0.err" "$TMP/s1.err" >&2
    die "serve: rank 0 exited $rc0, rank 1 exited $rc1 after SIGTERM to rank 0"
  fi
  # Compare with `generate` on the same link (the decode row's text).
  "$PY" - "$TMP/rows.jsonl" "$TMP/served.out" "$link" "$t0" "$t1" "$streams" "$stream_tokens" <<'PY'
import json, sys
rows_path, served, link, t0, t1, streams, toks = sys.argv[1:]
gen = [json.loads(l) for l in open(rows_path)]
gen = [r for r in gen if r["workload"] == "decode" and r["setup"] == "netns"
       and r["link"] == link and r["codec"] == "none"]
wall = float(t1) - float(t0)
text = open(served).read()
first = [json.loads(l) for l in open(rows_path)]
first = [r for r in first if r["workload"] == "serve"]
row = {"key": "serve|" + link, "workload": "serve", "setup": "netns", "link": link,
       "codec": "none", "min_elements": "default", "streams": int(streams),
       "stream_tokens": int(toks), "wall_s": wall, "tok_per_s": int(streams) * int(toks) / wall,
       "text": text, "same_as_generate": bool(gen) and text == gen[0]["text"],
       "same_as_first_serve": text == first[0]["text"] if first else True}
with open(rows_path, "a") as f:
    f.write(json.dumps(row) + "\n")
PY
}

# ---- the runs ----
# In rounds: every configuration once per round (prefill in the first --repeat-prefill
# rounds, decode in the first --repeat-decode), so a change in the machine's load during
# the run touches every configuration alike instead of a few consecutive ones.
START=$(date +%s)
ROUNDS=$(( REPEAT_DECODE > REPEAT_PREFILL ? REPEAT_DECODE : REPEAT_PREFILL ))
for ROUND in $(seq "$ROUNDS"); do
  P=0; D=0
  if (( ROUND <= REPEAT_PREFILL )); then P=1; fi
  if (( ROUND <= REPEAT_DECODE )); then D=1; fi
  shape unshaped
  if (( ROUND == 1 )); then probe unshaped; fi
  if (( P )); then run prefill tp1 start none default; fi
  if (( D )); then run decode tp1 - none default; fi
  if [[ -n $MPIRUN ]]; then
    if (( P )); then run prefill mpi mpi none default; fi
    if (( D )); then run decode mpi mpi none default; fi
  fi
  if (( P )); then run prefill loopback loopback none default; fi
  if (( D )); then run decode loopback loopback none default; fi
  for link in unshaped $RATES; do
    shape "$link"
    if [[ $ROUND == 1 && $link != unshaped ]]; then probe "$link"; fi
    for codec in $CODECS; do
      if (( P )); then run prefill netns "$link" "$codec" default; fi
      if (( D )); then run decode netns "$link" "$codec" default; fi
      if (( D )) && [[ $MIN0 == 1 && $codec != none ]]; then
        run decode netns "$link" "$codec" 0
      fi
    done
    if [[ $ROUND == 1 && $SERVE == 1 && ( $link == unshaped || $link == "${RATES##* }" ) ]]; then
      serve_run "$link"
    fi
  done
  shape unshaped
  if (( P )); then run prefill tp1 end none default; fi
done

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+dirty"
"$PY" - "$TMP/meta.json" "$COMMIT" "$NETEM" "$CHUNKS" "$GEN_TOKENS" "$PROMPT" \
  "$REPEAT_DECODE" "$REPEAT_PREFILL" "$RATES" "$(( $(date +%s) - START ))" "$QSHA" \
  "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, os, platform, sys
from datetime import datetime, timezone
path, commit, netem, chunks, gen, prompt, rd, rp, rates, wall, sha, l0, l1 = sys.argv[1:]
cpu = platform.processor() or platform.machine()
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    pass
json.dump({"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu": cpu,
           "cores": os.cpu_count(), "commit": commit, "netem": netem == "true",
           "chunks": int(chunks), "gen_tokens": int(gen), "prompt": prompt,
           "repeat_decode": int(rd), "repeat_prefill": int(rp), "rates": rates.split(),
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
           "tbf": "tbf rate R burst max(R x 1 ms, 32 KB) latency 20ms on both veth ends",
           "raw_bytes_per_token": 2 * 30 * 576 * 4, "wall_s": int(wall),
           "kernel": platform.release(), "binary_sha256_16": sha,
           "loadavg_start": l0, "loadavg_end": l1}, open(path, "w"))
PY
if ! helper report "$TMP/rows.jsonl" "$TMP/links.jsonl" "$TMP/meta.json" "$OUT"; then
  KEEP=$(mktemp -d /tmp/tp_netns_raw.XXXXXX)
  cp "$TMP/rows.jsonl" "$TMP/links.jsonl" "$TMP/meta.json" "$TMP/helper.py" "$KEEP/"
  die "the report failed; the measurements are in $KEEP (retry: python3 $KEEP/helper.py report $KEEP/rows.jsonl $KEEP/links.jsonl $KEEP/meta.json $OUT)"
fi
log "wrote $OUT/tp_netns.md and $OUT/tp_netns.json in $(( $(date +%s) - START )) s"

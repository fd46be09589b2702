#!/usr/bin/env python3
"""Tensor-parallel scaling on CPU ranks: `mpirun -np N quantkv ... --tp N` against TP=1.

For each configuration (TP degree, engine threads per rank, --comm-compress) it measures
  - prefill: `perplexity --ctx 512 --chunks C --json` (tokens/s, PPL, rank 0's seconds in the
    all-reduces, compressed bytes on the wire);
  - decode: `generate --max-tokens 64 --ignore-eos` (tok/s from its timing line, ms in
    all-reduces);
  - serving: `serve --tp N` with 8 concurrent `quantkv client generate` streams of 32 tokens
    (aggregate output tok/s, wall clock from first request to last token).
Ratios are against TP=1 with the same total cores in the same run. Writes
bench/results/tp_scaling.{md,json}.

  bench/tp_scaling.py [--quick] [--out bench/results]   (needs build/ and mpirun)
"""
import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = os.path.join(ROOT, "build/launcher/quantkv")
TEXT = os.path.join(ROOT, "../shared/data/wikitext-2/test.txt")
PROMPT = "The history of the city begins in the early medieval period, when"
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE", "Cooperlake"))
# SmolLM2-135M: two all-reduces per layer (attention output, MLP down) of hidden fp32 values.
LAYERS, HIDDEN = 30, 576
RAW_BYTES_PER_TOKEN = 2 * LAYERS * HIDDEN * 4


def launch(tp, args):
    base = [Q] + args
    if tp == 1:
        return base
    return ["mpirun", "--oversubscribe", "-np", str(tp)] + base + ["--tp", str(tp)]


def compress_flags(codec):
    # The threshold 0 compresses decode steps too, so the wire bytes show the codec's ratio.
    return [] if codec == "none" else ["--comm-compress", codec,
                                       "--comm-compress-min-elements", "0"]


def prefill(tp, threads, codec, chunks):
    out = subprocess.run(
        launch(tp, ["perplexity", "--text", TEXT, "--ctx", "512", "--chunks", str(chunks),
                    "--threads", str(threads), "--kv", "int4-comp", "--json"]
               + compress_flags(codec)),
        env=ENV, capture_output=True, text=True, check=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    tokens = 512 * chunks
    wire = j.get("comm_bytes_wire", RAW_BYTES_PER_TOKEN * tokens if tp > 1 else 0)
    return {"tok_per_s": j["tokens_per_s"], "ppl": j["ppl"], "seconds": j["seconds"],
            "comm_fraction": j.get("tp_comm_seconds", 0) / j["seconds"],
            "wire_bytes_per_token": wire / tokens}


def decode(tp, threads, codec):
    err = subprocess.run(
        launch(tp, ["generate", "--prompt", PROMPT, "--max-tokens", "64", "--ignore-eos",
                    "--threads", str(threads), "--kv", "int4-comp"] + compress_flags(codec)),
        env=ENV, capture_output=True, text=True, check=True).stderr
    m = re.search(r"prompt \d+ tokens in (\d+) ms .*generated (\d+) tokens in (\d+) ms "
                  r"\(([\d.]+) tok/s\)", err)
    if not m:
        sys.exit("tp_scaling: no timing line from generate:\n" + err)
    comm = re.search(r"([\d.]+) ms in all-reduces", err)
    total_ms = float(m.group(1)) + float(m.group(3))
    return {"tok_per_s": float(m.group(4)),
            "comm_fraction": float(comm.group(1)) / total_ms if comm else 0.0}


def serve(tp, threads, codec, streams=8, tokens=32):
    cmd = launch(tp, ["serve", "--listen", "127.0.0.1:0", "--threads", str(threads),
                      "--kv", "int4-comp", "--kv-budget-mb", "256"] + compress_flags(codec))
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    address = None
    log = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"listening on (\S+)", line)
        if m:
            address = m.group(1)
            break
    if address is None:
        os.killpg(proc.pid, signal.SIGKILL)
        sys.exit("tp_scaling: the server did not start:\n" + "".join(log))
    try:
        start = time.time()
        clients = [subprocess.Popen(
            [Q, "client", "generate", "--server", address, "--prompt", f"{PROMPT} ({i})",
             "--max-tokens", str(tokens), "--ignore-eos"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(streams)]
        for c in clients:
            _, e = c.communicate(timeout=300)
            if c.returncode != 0:
                sys.exit("tp_scaling: client failed: " + e)
        wall = time.time() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"tok_per_s": streams * tokens / wall, "streams": streams}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer configurations and windows")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    a = ap.parse_args()
    chunks = 2 if a.quick else 4
    configs = [(1, 1, "none"), (1, 2, "none"), (2, 1, "none"), (2, 1, "int8"),
               (2, 1, "int4"), (3, 1, "none"), (3, 1, "int8")]
    if a.quick:
        configs = [(1, 2, "none"), (2, 1, "none"), (2, 1, "int8")]
    rows = []
    for tp, threads, codec in configs:
        print(f"tp_scaling: --tp {tp} --threads {threads} --comm-compress {codec} ...",
              file=sys.stderr, flush=True)
        rows.append({"tp": tp, "threads": threads, "comm_compress": codec,
                     "prefill": prefill(tp, threads, codec, chunks),
                     "decode": decode(tp, threads, codec),
                     "serve": serve(tp, threads, codec)})

    # The bound: TP=1 on the same total cores (2 threads), in this run.
    base = next(r for r in rows if r["tp"] == 1 and r["threads"] == 2)
    cores = os.cpu_count()
    md = [f"# Tensor-parallel scaling (CPU ranks under mpirun)\n",
          f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}, "
          f"{platform.processor() or platform.machine()}, {cores} cores. SmolLM2-135M Q4_1, "
          f"--kv int4-comp. Prefill: perplexity over {chunks} windows of 512 tokens of "
          "WikiText-2 (tok/s of all tokens processed). Decode: generate 64 tokens after a "
          "14-token prompt. Serve: `serve --tp N`, 8 concurrent `client generate` streams of "
          "32 tokens, aggregate output tok/s. Ratios: against TP=1 with 2 threads (the same "
          "2 cores) in this run. Comm share: rank 0's time in the all-reduces (waiting for the "
          "slower rank included) over the run. Wire bytes per token: what rank 0 hands the "
          "all-reduce per token (compressed payload, or 2 x 30 layers x 576 fp32 values).\n",
          "| --tp | threads/rank | --comm-compress | prefill tok/s | vs TP=1 | comm share | "
          "PPL | decode tok/s | vs TP=1 | comm share | serve tok/s | vs TP=1 | wire B/token |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, d, s = r["prefill"], r["decode"], r["serve"]
        md.append(
            f"| {r['tp']} | {r['threads']} | {r['comm_compress']} | {p['tok_per_s']:.1f} | "
            f"{p['tok_per_s'] / base['prefill']['tok_per_s']:.2f}x | {100 * p['comm_fraction']:.1f}% | "
            f"{p['ppl']:.4f} | {d['tok_per_s']:.1f} | "
            f"{d['tok_per_s'] / base['decode']['tok_per_s']:.2f}x | {100 * d['comm_fraction']:.1f}% | "
            f"{s['tok_per_s']:.1f} | {s['tok_per_s'] / base['serve']['tok_per_s']:.2f}x | "
            f"{p['wire_bytes_per_token']:.0f} |")
    text = "\n".join(md) + "\n"
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "tp_scaling.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "tp_scaling.json"), "w") as f:
        json.dump({"rows": rows, "chunks": chunks, "cores": cores}, f, indent=1)


if __name__ == "__main__":
    main()

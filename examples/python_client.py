#!/usr/bin/env python3
"""A Python client of `quantkv serve` (quantkv.v1.Generation over gRPC).

    pip install grpcio grpcio-tools
    quantkv serve --model smollm2-135m &            # listens on 127.0.0.1:50051
    python3 examples/python_client.py generate --prompt "The capital of France is"
    python3 examples/python_client.py generate --chat --prompt "What is 2+2?" --temperature 0.7
    python3 examples/python_client.py info | stats | score --prompt "..." | tokenize --prompt "..."

The stubs are generated at run time from proto/quantkv/v1/generation.proto with
grpc_tools.protoc into a temporary directory, so nothing generated is checked in and the
client always matches the proto next to it. Input text fields are `bytes` (UTF-8) in the
proto, hence the .encode() calls below.
"""
import argparse
import importlib
import os
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(REPO, "proto")


def load_stubs():
    """Generates generation_pb2{,_grpc}.py into a temp dir and imports them."""
    out = tempfile.mkdtemp(prefix="quantkv_proto_")
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(PROTO_DIR, "quantkv", "v1", "generation.proto"),
    ])
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed ({rc})")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("quantkv.v1.generation_pb2")
    pb2_grpc = importlib.import_module("quantkv.v1.generation_pb2_grpc")
    return out, pb2, pb2_grpc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["generate", "score", "tokenize", "stats", "info"])
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--api-key-file", help="send its first line as `authorization: Bearer`")
    ap.add_argument("--tls-ca", help="PEM root certificates: connect with TLS")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--logprobs", type=int, default=0)
    ap.add_argument("--kv-preset", default="", help="one of ModelInfo's kv_presets (empty: default)")
    args = ap.parse_args()

    tmp, pb2, pb2_grpc = load_stubs()
    try:
        metadata = []
        if args.api_key_file:
            with open(args.api_key_file) as f:
                metadata.append(("authorization", "Bearer " + f.readline().strip()))
        if args.tls_ca:
            with open(args.tls_ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            channel = grpc.secure_channel(args.server, creds)
        else:
            channel = grpc.insecure_channel(args.server)
        stub = pb2_grpc.GenerationStub(channel)

        if args.action == "generate":
            req = pb2.GenerateRequest(
                max_tokens=args.max_tokens,
                sampling=pb2.SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                            seed=args.seed),
                stop=[s.encode() for s in args.stop],
                logprobs=args.logprobs,
                kv_preset=args.kv_preset)
            if args.chat:
                req.chat.messages.add(role="user", content=args.prompt.encode())
            else:
                req.text = args.prompt.encode()
            for resp in stub.Generate(req, metadata=metadata):
                kind = resp.WhichOneof("kind")
                if kind == "chunk":
                    sys.stdout.write(resp.chunk.text)
                    sys.stdout.flush()
                    for lp in resp.chunk.logprobs:
                        print(f"  [{lp.token_id}: {lp.logprob:.3f}]", file=sys.stderr)
                elif kind == "final":
                    f = resp.final
                    print()
                    print(f"[{resp.request_id}: {pb2.FinishReason.Name(f.finish_reason)}, "
                          f"prompt {f.prompt_tokens}, generated {f.generated_tokens}, "
                          f"ttft {f.ttft_ms:.1f} ms, {f.tokens_per_s:.1f} tok/s, "
                          f"KV {f.kv_bits_per_element:.2f} bits/element]", file=sys.stderr)
                elif kind == "error":
                    print(f"error: {resp.error.message}", file=sys.stderr)
        elif args.action == "score":
            print(stub.Score(pb2.ScoreRequest(text=args.prompt.encode(), kv_preset=args.kv_preset), metadata=metadata))
        elif args.action == "tokenize":
            print(list(stub.Tokenize(pb2.TokenizeRequest(text=args.prompt.encode()),
                                     metadata=metadata).ids))
        elif args.action == "stats":
            print(stub.Stats(pb2.StatsRequest(), metadata=metadata))
        else:
            print(stub.ModelInfo(pb2.ModelInfoRequest(), metadata=metadata))
    except grpc.RpcError as e:
        sys.exit(f"{args.action}: {e.code().name}: {e.details()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

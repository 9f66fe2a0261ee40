#!/usr/bin/env python3
"""A small moeserve client in Python (grpcio).

Generates the Python stubs from proto/ at start (on Debian: `apt-get install python3-grpcio
protobuf-compiler protobuf-compiler-grpc`, which scripts/install-deps.sh installs; run it with
/usr/bin/python3, which sees Debian's Python modules).

    /usr/bin/python3 clients/python/generate.py --addr 127.0.0.1:50051 --text "hello" --max-tokens 16

Over TLS: --tls-ca CA.pem (and --tls-cert/--tls-key for a server that requires client
certificates; --tls-server-name when --addr is an IP address the certificate does not name).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def load_stubs():
    """Generates the stubs with protoc and gRPC's Python plugin (Debian: protobuf-compiler,
    protobuf-compiler-grpc), or with grpcio-tools when those are absent."""
    out = os.path.join(tempfile.gettempdir(), "moeserve_python_stubs")
    os.makedirs(out, exist_ok=True)
    proto = os.path.join(PROTO_ROOT, "moeserve", "v1", "generation.proto")
    plugin = shutil.which("grpc_python_plugin")
    if shutil.which("protoc") and plugin:
        command = ["protoc", f"--plugin=protoc-gen-grpc_python={plugin}"]
        run = lambda args: subprocess.run(command + args, check=False).returncode
    else:
        from grpc_tools import protoc
        run = lambda args: protoc.main(["protoc"] + args)
    if run([f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", proto]) != 0:
        sys.exit("failed to generate the Python stubs")
    sys.path.insert(0, out)
    from moeserve.v1 import generation_pb2, generation_pb2_grpc
    return generation_pb2, generation_pb2_grpc


def make_channel(grpc, args):
    """A plaintext channel, or a TLS one when any --tls* flag is given."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return grpc.insecure_channel(args.addr)
    if bool(args.tls_cert) != bool(args.tls_key):
        sys.exit("error: --tls-cert and --tls-key go together")
    read = lambda path: open(path, "rb").read() if path else None
    credentials = grpc.ssl_channel_credentials(root_certificates=read(args.tls_ca),
                                               private_key=read(args.tls_key),
                                               certificate_chain=read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.addr, credentials, options=options)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--text", default="hello")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CA roots")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name the server's certificate carries")
    args = parser.parse_args()

    import grpc
    pb, pb_grpc = load_stubs()
    # Closed before the interpreter shuts down: grpcio closing a channel left open during
    # shutdown can hang the process after its work is done.
    with make_channel(grpc, args) as channel:
        return generate(pb, pb_grpc.GenerationStub(channel), args)


def generate(pb, stub, args):
    """Prints the model's description, then streams one generation; returns its token ids."""
    import grpc
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    print(f"model {info.name} ({info.architecture}), {info.num_routed_experts} experts, "
          f"top-{info.num_experts_per_token}", file=sys.stderr)
    sampling = pb.SamplingParams(temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb.GenerateRequest(text=args.text, max_tokens=args.max_tokens, sampling=sampling)
    tokens = []
    try:
        for response in stub.Generate(request, timeout=300):
            tokens.extend(response.token_ids)
            sys.stdout.write(response.text)
            sys.stdout.flush()
            if response.finish_reason:
                usage = response.usage
                print(f"\n-- {pb.FinishReason.Name(response.finish_reason)}: "
                      f"{usage.completion_tokens} tokens, ttft "
                      f"{usage.time_to_first_token_seconds * 1000:.1f} ms", file=sys.stderr)
    except grpc.RpcError as error:
        sys.exit(f"error: {error.code().name}: {error.details()}")
    return tokens


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/<target>/) from the repository's fixtures.

The seeds are committed; rerun this after changing a format to refresh them:
    /usr/bin/python3 tests/fuzz/make_seed_corpus.py
Only the Python standard library is used.
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as out:
        out.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors):
    """A safetensors file: {name: (dtype, shape, raw bytes)}."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def main():
    shutil.rmtree(os.path.join(HERE, "corpus"), ignore_errors=True)
    # safetensors headers: every dtype, an empty tensor, a scalar.
    write("safetensors_header", "dtypes", safetensors({
        "f32": ("F32", [2, 2], struct.pack("<4f", 1, -2, 0.5, 3)),
        "bf16": ("BF16", [3], b"\x80\x3f\x00\x40\x00\xc0"),
        "f16": ("F16", [1, 2], b"\x00\x3c\x00\xc0"),
        "fp8": ("F8_E4M3", [4], b"\x38\x40\xb8\x7e"),
        "empty": ("F32", [0, 4], b""),
        "scalar": ("F32", [], struct.pack("<f", 7)),
    }))
    write("safetensors_header", "one_tensor", safetensors({"w": ("F32", [1], struct.pack("<f", 1))}))

    # config.json: every architecture's fixture.
    for folder in sorted(os.listdir(FIXTURES)):
        path = os.path.join(FIXTURES, folder, "config.json")
        if os.path.exists(path):
            write("model_config", folder, open(path).read())

    # tokenizer.json + NUL + text.
    texts = ["Hello, world! It's 2024.", "naïve café 日本語 🙂\n\t  x", "<|im_start|>user\nhi"]
    for folder in sorted(os.listdir(FIXTURES)):
        path = os.path.join(FIXTURES, folder, "tokenizer.json")
        if os.path.exists(path):
            for index, text in enumerate(texts):
                write("tokenizer", f"{folder}_{index}", open(path).read() + "\0" + text)
    # SentencePiece-style files (byte fallback, Metaspace) whose vocabulary fits the fuzzer's 512.
    for layout in ["mixtral_320", "metaspace_never"]:
        path = os.path.join(ROOT, "tests", "fixtures", "sentencepiece", layout, "tokenizer.json")
        for index, text in enumerate(texts):
            write("tokenizer", f"{layout}_{index}", open(path).read() + "\0" + text)
    vocab = {chr(33 + i): i for i in range(64)}
    byte_level = {"model": {"type": "BPE", "vocab": vocab, "merges": ["! \""]},
                  "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}
    write("tokenizer", "byte_level", json.dumps(byte_level) + "\0" + texts[0])
    split = dict(byte_level, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated"},
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "use_regex": False}]}, normalizer={"type": "NFC"},
        added_tokens=[{"id": 60, "content": "<s>", "special": True}])
    write("tokenizer", "split_digits_nfc", json.dumps(split) + "\0" + "<s>12345 abc")

    # Placements: three shape bytes (layers, logical experts, extra slots and ranks), then JSON.
    write("placement", "default", bytes([1, 3, 0]) + json.dumps(
        {"version": 1, "phy2log": [[0, 1, 2, 3], [3, 2, 1, 0]]}).encode())
    write("placement", "redundant", bytes([0, 3, 2]) + json.dumps(
        {"version": 7, "phy2log": [[0, 1, 2, 3, 0, 1]]}).encode())

    # JSON Lines of the rebalance tool.
    write("rebalance_jsonl", "published_example", json.dumps({
        "id": "published-example",
        "weight": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
        "num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_gpus": 8}) + "\n")
    write("rebalance_jsonl", "global_and_invalid", "\n".join([
        json.dumps({"id": 42, "weight": [[8, 4, 2, 2]], "num_replicas": 6, "num_groups": 3,
                    "num_nodes": 2, "num_gpus": 2}),
        json.dumps({"id": [1, {"x": None}], "weight": [[1.5, 0]], "num_replicas": 2,
                    "num_groups": 1, "num_nodes": 1, "num_gpus": 1}),
        "{\"weight\": [[1, 2]], \"num_replicas\": 0}"]) + "\n")

    # GenerateRequest messages, encoded by hand (field number << 3 | wire type).
    def varint(value):
        out = b""
        while True:
            byte = value & 0x7F
            value >>= 7
            out += bytes([byte | (0x80 if value else 0)])
            if not value:
                return out

    def field(number, payload):
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def number(field_number, value):
        return varint(field_number << 3) + varint(value)

    sampling = field(4, b"\x0d" + struct.pack("<f", 0.7) + b"\x15" + struct.pack("<f", 0.9) +
                     number(3, 40) + number(4, 1234))
    write("generate_request", "text", field(1, b"req-1") + field(2, b"hello") + number(5, 16) +
          sampling + field(6, b"\n\n") + number(8, 1))
    ids = b"".join(varint(i) for i in [256, 104, 105])
    write("generate_request", "token_ids", field(3, field(1, ids)) + number(5, 8) +
          field(7, varint(257)))


if __name__ == "__main__":
    main()

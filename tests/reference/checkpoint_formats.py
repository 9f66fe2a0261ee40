"""Writes small random Hugging Face-format checkpoints with NumPy, for tests.

Covers what `moeserve --model DIR` reads: config.json for deepseek_v3, deepseek_v2, qwen3_moe and
mixtral; safetensors in F32, BF16, F16 and FP8 (e4m3) with block scales (`<name>_scale_inv`);
a single model.safetensors or shards listed in model.safetensors.index.json; Mixtral's
`block_sparse_moe` names and fused expert tensors (`mlp.experts.gate_up_proj` / `down_proj`).

Each writer returns the weights exactly as a reader must see them after conversion to float
(BF16/F16/FP8 already rounded), so a reference computed from them is exact for the stored model.
"""
import json
import os
import struct

import numpy as np

E4M3_MAX = 448.0


def e4m3_values():
    """float32 value of each of the 256 e4m3 ("fn") codes; NaN for 0x7F and 0xFF."""
    values = np.zeros(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values[code] = np.nan
        elif exponent == 0:
            values[code] = sign * mantissa * 2.0 ** -9
        else:
            values[code] = sign * (8 + mantissa) * 2.0 ** (exponent - 10)
    return values


E4M3 = e4m3_values()
_FINITE_CODES = np.array([c for c in range(256) if not np.isnan(E4M3[c])])
_ORDER = _FINITE_CODES[np.argsort(E4M3[_FINITE_CODES], kind="stable")]
_SORTED = E4M3[_ORDER]


def to_e4m3(x):
    """Codes of the nearest e4m3 values (x already scaled into [-448, 448])."""
    flat = np.clip(np.asarray(x, dtype=np.float32).reshape(-1), -E4M3_MAX, E4M3_MAX)
    upper = np.clip(np.searchsorted(_SORTED, flat), 1, len(_SORTED) - 1)
    lower = upper - 1
    pick = np.where(np.abs(_SORTED[upper] - flat) < np.abs(flat - _SORTED[lower]), upper, lower)
    return _ORDER[pick].astype(np.uint8).reshape(np.shape(x))


def to_bf16_bits(x):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize_fp8(weight, block_rows, block_cols):
    """(codes, scale_inv, dequantized float32) with one scale per block, weight ≈ fp8 * scale."""
    rows, cols = weight.shape
    scale_rows, scale_cols = -(-rows // block_rows), -(-cols // block_cols)
    scale = np.zeros((scale_rows, scale_cols), dtype=np.float32)
    codes = np.zeros(weight.shape, dtype=np.uint8)
    for i in range(scale_rows):
        for j in range(scale_cols):
            block = weight[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols]
            s = np.float32(max(np.abs(block).max(), 1e-12) / E4M3_MAX)
            scale[i, j] = s
            codes[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols] = \
                to_e4m3(block / s)
    expanded = np.repeat(np.repeat(scale, block_rows, 0), block_cols, 1)[:rows, :cols]
    return codes, scale, (E4M3[codes] * expanded).astype(np.float32)


def encode(tensors):
    """Safetensors bytes of {name: (dtype name, shape, raw bytes)}."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def store(weights, dtype, fp8_names=(), block=(128, 128)):
    """Converts float32 weights for storage. Returns (stored, as_read): the tensors to write and
    the float32 values a reader gets back."""
    stored, as_read = {}, {}
    for name, value in weights.items():
        value = np.asarray(value, dtype=np.float32)
        if name in fp8_names:
            codes, scale, back = quantize_fp8(value, *block)
            stored[name] = ("F8_E4M3", value.shape, codes.tobytes())
            stored[name + "_scale_inv"] = ("F32", scale.shape, scale.astype("<f4").tobytes())
            as_read[name] = back
        elif dtype == "BF16":
            bits = to_bf16_bits(value)
            stored[name] = ("BF16", value.shape, bits.astype("<u2").tobytes())
            as_read[name] = from_bf16_bits(bits)
        elif dtype == "F16":
            half = value.astype("<f2")
            stored[name] = ("F16", value.shape, half.tobytes())
            as_read[name] = half.astype(np.float32)
        else:
            stored[name] = ("F32", value.shape, value.astype("<f4").tobytes())
            as_read[name] = value
    return stored, as_read


def write_checkpoint(folder, config, stored, shards=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = list(stored)
    if shards == 1:
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(encode(stored))
        return
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: stored[n] for n in names[shard::shards]}
        # A weight's block scales stay in the weight's shard, as real FP8 checkpoints keep them.
        for n in list(part):
            if n + "_scale_inv" in stored:
                part[n + "_scale_inv"] = stored[n + "_scale_inv"]
        part = {n: v for n, v in part.items() if not (n.endswith("_scale_inv") and n[:-10] not in part)}
        with open(os.path.join(folder, file), "wb") as f:
            f.write(encode(part))
        weight_map.update({n: file for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def random_weights(names_and_shapes, seed):
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in names_and_shapes:
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("e_score_correction_bias") or name.endswith(".bias"):
            value = 0.05 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            value = rng.standard_normal(shape)
        else:
            scale = (3.0 if name == "lm_head.weight" else 1.0) / np.sqrt(shape[-1])
            value = scale * rng.standard_normal(shape)
        weights[name] = value.astype(np.float32)
    return weights


def gqa_tensor_shapes(config, mixtral_names=False):
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    qwen = config["model_type"] == "qwen3_moe"
    experts = config["num_experts"] if qwen else config["num_local_experts"]
    expert_size = config["moe_intermediate_size"] if qwen else config["intermediate_size"]
    out = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, heads * head_dim))]
        if config.get("attention_bias"):
            out += [(p + "self_attn.q_proj.bias", (heads * head_dim,)),
                    (p + "self_attn.k_proj.bias", (kv_heads * head_dim,)),
                    (p + "self_attn.v_proj.bias", (kv_heads * head_dim,)),
                    (p + "self_attn.o_proj.bias", (hidden,))]
        if qwen:
            out += [(p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,))]
        if gqa_is_moe_layer(config, layer):
            block = p + ("block_sparse_moe." if mixtral_names else "mlp.")
            out.append((block + "gate.weight", (experts, hidden)))
            for e in range(experts):
                names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
                out += [(f"{block}experts.{e}.{names[0]}.weight", (expert_size, hidden)),
                        (f"{block}experts.{e}.{names[1]}.weight", (expert_size, hidden)),
                        (f"{block}experts.{e}.{names[2]}.weight", (hidden, expert_size))]
        else:
            size = config["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", (size, hidden)), (p + "mlp.up_proj.weight", (size, hidden)),
                    (p + "mlp.down_proj.weight", (hidden, size))]
    out.append(("model.norm.weight", (hidden,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (config["vocab_size"], hidden)))
    return out


def gqa_is_moe_layer(config, layer):
    if config["model_type"] == "mixtral":
        return True
    return layer not in config.get("mlp_only_layers", []) and \
        (layer + 1) % config.get("decoder_sparse_step", 1) == 0


def fuse_experts(weights, config):
    """Replaces per-expert matrices by stacked `mlp.experts.gate_up_proj` [E, 2I, H] and
    `mlp.experts.down_proj` [E, H, I] tensors, as transformers 5 keeps them in memory."""
    fused = dict(weights)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts."
        if p + "0.gate_proj.weight" not in weights:
            continue
        experts = config.get("num_experts") or config.get("n_routed_experts")
        gate_up, down = [], []
        for e in range(experts):
            gate_up.append(np.concatenate([fused.pop(f"{p}{e}.gate_proj.weight"),
                                           fused.pop(f"{p}{e}.up_proj.weight")], axis=0))
            down.append(fused.pop(f"{p}{e}.down_proj.weight"))
        fused[p + "gate_up_proj"] = np.stack(gate_up)
        fused[p + "down_proj"] = np.stack(down)
    return fused

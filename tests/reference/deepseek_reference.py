"""Independent NumPy reference of the DeepSeek-V2/V3 forward pass, for tests.

Written from the Hugging Face modeling code's equations, not from moeserve's: MLA is computed in
its plain (non-absorbed) form with per-head keys and values, RoPE de-interleaves the rope
dimensions and uses rotate_half, and the MoE runs every expert densely over masked tokens.
Float64 throughout, so its own rounding is negligible next to moeserve's float32.
"""
import json
import math
import struct

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    base = 8 + header_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info["dtype"]
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[base + start:base + end], dtype="<f4").reshape(
            info["shape"]).astype(np.float64)
    return tensors


def rms_norm(x, weight, eps):
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


def yarn_get_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(config, positions):
    dim = config["qk_rope_head_dim"]
    base = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    freq_extra = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    mscale = 1.0
    if scaling and scaling.get("type", scaling.get("rope_type")) == "yarn":
        factor = scaling["factor"]
        original = scaling["original_max_position_embeddings"]

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(scaling["beta_fast"])), 0)
        high = min(math.ceil(correction_dim(scaling["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation_mask = 1.0 - ramp
        freq_inter = freq_extra / factor
        inv_freq = freq_inter * (1 - extrapolation_mask) + freq_extra * extrapolation_mask
        mscale = yarn_get_mscale(factor, scaling["mscale"]) / yarn_get_mscale(
            factor, scaling["mscale_all_dim"])
    else:
        inv_freq = freq_extra
    # moeserve forms angles in float32, like the reference frameworks do.
    freqs = np.outer(np.asarray(positions, dtype=np.float32),
                     inv_freq.astype(np.float32)).astype(np.float32).astype(np.float64)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb) * mscale, np.sin(emb) * mscale


def apply_rope(x, cos, sin):
    """x: [..., seq, dim] in the checkpoint's interleaved layout."""
    d = x.shape[-1]
    x = x.reshape(*x.shape[:-1], d // 2, 2).swapaxes(-1, -2).reshape(x.shape)
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + rotated * sin


def attention(config, w, prefix, x, cos, sin):
    seq = x.shape[0]
    heads = config["num_attention_heads"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    kv_lora = config["kv_lora_rank"]
    eps = config["rms_norm_eps"]
    if config.get("q_lora_rank"):
        q = rms_norm(x @ w[prefix + "q_a_proj.weight"].T, w[prefix + "q_a_layernorm.weight"], eps)
        q = q @ w[prefix + "q_b_proj.weight"].T
    else:
        q = x @ w[prefix + "q_proj.weight"].T
    q = q.reshape(seq, heads, nope + rope).transpose(1, 0, 2)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    compressed = x @ w[prefix + "kv_a_proj_with_mqa.weight"].T
    latent, k_pe = compressed[:, :kv_lora], compressed[:, kv_lora:]
    kv = rms_norm(latent, w[prefix + "kv_a_layernorm.weight"], eps) @ w[prefix + "kv_b_proj.weight"].T
    kv = kv.reshape(seq, heads, nope + v_dim).transpose(1, 0, 2)
    k_nope, value = kv[..., :nope], kv[..., nope:]
    q_pe = apply_rope(q_pe, cos, sin)
    k_pe = apply_rope(k_pe[None], cos, sin)
    query = np.concatenate([q_nope, q_pe], axis=-1)
    key = np.concatenate([k_nope, np.broadcast_to(k_pe, (heads, seq, rope))], axis=-1)
    scale = (nope + rope) ** -0.5
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * m * m
    scores = query @ key.transpose(0, 2, 1) * scale
    scores = scores + np.triu(np.full((seq, seq), -np.inf), k=1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores = scores / scores.sum(-1, keepdims=True)
    out = (scores @ value).transpose(1, 0, 2).reshape(seq, heads * v_dim)
    return out @ w[prefix + "o_proj.weight"].T


def mlp(w, prefix, x):
    return (silu(x @ w[prefix + "gate_proj.weight"].T) * (x @ w[prefix + "up_proj.weight"].T)) @ \
        w[prefix + "down_proj.weight"].T


def moe(config, w, prefix, x):
    experts = config["n_routed_experts"]
    top_k = config["num_experts_per_tok"]
    groups, topk_group = config["n_group"], config["topk_group"]
    logits = x @ w[prefix + "gate.weight"].T
    if config["scoring_func"] == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores = scores / scores.sum(-1, keepdims=True)
    choice = scores.copy()
    bias_name = prefix + "gate.e_score_correction_bias"
    if bias_name in w:
        choice = choice + w[bias_name]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        c = choice[t].copy()
        if config["topk_method"] != "greedy" and groups > 1:
            grouped = c.reshape(groups, -1)
            if config["topk_method"] == "noaux_tc":
                group_scores = np.sort(grouped, axis=-1)[:, -2:].sum(-1)
            else:
                group_scores = grouped.max(-1)
            keep = np.argsort(-group_scores, kind="stable")[:topk_group]
            mask = np.full(groups, -np.inf)
            mask[keep] = 0.0
            c = (grouped + mask[:, None]).reshape(-1)
        chosen = np.argsort(-c, kind="stable")[:top_k]
        weights = scores[t, chosen]
        if config["norm_topk_prob"] and top_k > 1:
            weights = weights / (weights.sum() + 1e-20)
            if config["model_type"] == "deepseek_v3":
                weights = weights * config["routed_scaling_factor"]
        else:
            weights = weights * config["routed_scaling_factor"]
        for e, weight in zip(chosen, weights):
            out[t] += weight * mlp(w, f"{prefix}experts.{e}.", x[t:t + 1])[0]
    if config.get("n_shared_experts"):
        out = out + mlp(w, prefix + "shared_experts.", x)
    return out


def forward(config, w, tokens):
    """Logits [len(tokens), vocab] of one causal forward pass."""
    eps = config["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    cos, sin = rope_tables(config, np.arange(len(tokens)))
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        x = x + attention(config, w, p + "self_attn.", h, cos, sin)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if layer >= config.get("first_k_dense_replace", 0) and config.get("n_routed_experts"):
            x = x + moe(config, w, p + "mlp.", h)
        else:
            x = x + mlp(w, p + "mlp.", h)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T

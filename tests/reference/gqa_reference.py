"""Independent NumPy reference of Qwen3-MoE and Mixtral forward passes, for tests.

Written from the Hugging Face modeling code's equations: grouped-query attention with keys and
values repeated per query group, Qwen3's per-head RMSNorm of queries and keys before RoPE,
rotate-half RoPE, softmax routing over all experts then top-k (renormalized when
norm_topk_prob, always for Mixtral), experts run densely per token. Float64 throughout.
Weight names: canonical (`mlp.experts.{i}.gate_proj`) or Mixtral's (`block_sparse_moe`,
`w1`/`w3`/`w2`).
"""
import numpy as np

from deepseek_reference import rms_norm, silu


def rope_tables(config, positions):
    dim = config["head_dim"]
    base = config.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    # Angles formed in float32, as the frameworks compute position * inv_freq.
    freqs = np.outer(np.asarray(positions, dtype=np.float32),
                     inv_freq.astype(np.float32)).astype(np.float32).astype(np.float64)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_half_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(config, w, prefix, x, cos, sin):
    seq = x.shape[0]
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps = config["rms_norm_eps"]

    def project(name):
        out = x @ w[prefix + name + ".weight"].T
        if prefix + name + ".bias" in w:
            out = out + w[prefix + name + ".bias"]
        return out

    q = project("q_proj").reshape(seq, heads, dim)
    k = project("k_proj").reshape(seq, kv_heads, dim)
    v = project("v_proj").reshape(seq, kv_heads, dim)
    if config["model_type"] == "qwen3_moe":
        q = rms_norm(q, w[prefix + "q_norm.weight"], eps)
        k = rms_norm(k, w[prefix + "k_norm.weight"], eps)
    q = rotate_half_rope(q.transpose(1, 0, 2), cos, sin)
    k = rotate_half_rope(k.transpose(1, 0, 2), cos, sin)
    v = v.transpose(1, 0, 2)
    group = heads // kv_heads
    k = np.repeat(k, group, axis=0)
    v = np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1) * dim ** -0.5
    scores = scores + np.triu(np.full((seq, seq), -np.inf), k=1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores = scores / scores.sum(-1, keepdims=True)
    out = (scores @ v).transpose(1, 0, 2).reshape(seq, heads * dim)
    out = out @ w[prefix + "o_proj.weight"].T
    if prefix + "o_proj.bias" in w:
        out = out + w[prefix + "o_proj.bias"]
    return out


def expert(w, prefix, x, mixtral):
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    return (silu(x @ w[f"{prefix}{gate}.weight"].T) * (x @ w[f"{prefix}{up}.weight"].T)) @ \
        w[f"{prefix}{down}.weight"].T


def moe(config, w, prefix, x):
    mixtral = config["model_type"] == "mixtral"
    block = prefix.replace("mlp.", "block_sparse_moe.") if f"{prefix.replace('mlp.', 'block_sparse_moe.')}gate.weight" in w else prefix
    names_are_mixtral = block != prefix
    top_k = config["num_experts_per_tok"]
    logits = x @ w[block + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = np.argsort(-probs[t], kind="stable")[:top_k]
        weights = probs[t, chosen]
        if mixtral or config.get("norm_topk_prob"):
            weights = weights / weights.sum()
        for e, weight in zip(chosen, weights):
            out[t] += weight * expert(w, f"{block}experts.{e}.", x[t:t + 1], names_are_mixtral)[0]
    return out


def is_moe_layer(config, layer):
    if config["model_type"] == "mixtral":
        return True
    return layer not in config.get("mlp_only_layers", []) and \
        (layer + 1) % config.get("decoder_sparse_step", 1) == 0


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
        if is_moe_layer(config, layer):
            x = x + moe(config, w, p + "mlp.", h)
        else:
            x = x + expert(w, p + "mlp.", h, False)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T

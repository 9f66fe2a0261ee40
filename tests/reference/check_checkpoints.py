"""Checks `moeserve logits --model DIR` on small random checkpoints written with NumPy.

Usage: check_checkpoints.py MOESERVE_BINARY

Each case writes a checkpoint folder (checkpoint_formats.py) in one architecture, dtype and
file layout, runs `moeserve logits` on a fixed token sequence and compares with an independent
NumPy forward pass (deepseek_reference.py, gqa_reference.py) over the weights as stored (BF16,
F16 and FP8 already rounded, so the comparison is exact up to float32 arithmetic):
max|diff| / max|ref| must be < 1e-4.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_formats as formats  # noqa: E402
import deepseek_reference  # noqa: E402
import gqa_reference  # noqa: E402

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 200, 3, 77, 90, 250]
TOLERANCE = 1e-4


def qwen3_config(**changes):
    config = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 300,
        "hidden_size": 48, "intermediate_size": 64, "moe_intermediate_size": 24,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [1], "max_position_embeddings": 256, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "use_sliding_window": False,
    }
    config.update(changes)
    return config


def mixtral_config():
    return {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 300,
        "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 128, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
    }


def deepseek_config(version):
    config = {
        "model_type": f"deepseek_{version}", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 96, "moe_intermediate_size": 20, "num_hidden_layers": 3,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_attention_heads": 4,
        "q_lora_rank": 40 if version == "v3" else None, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 16,
        "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    if version == "v3":
        config.update(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                      routed_scaling_factor=2.5,
                      rope_scaling={"type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 128, "beta_fast": 32,
                                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})
    else:
        config.update(scoring_func="softmax", topk_method="group_limited_greedy",
                      norm_topk_prob=False, routed_scaling_factor=1.5)
    return config


def deepseek_tensor_shapes(c):
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], hidden))]

    def mlp(prefix, size):
        return [(prefix + "gate_proj.weight", (size, hidden)), (prefix + "up_proj.weight", (size, hidden)),
                (prefix + "down_proj.weight", (hidden, size))]

    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        if c.get("q_lora_rank"):
            out += [(a + "q_a_proj.weight", (c["q_lora_rank"], hidden)),
                    (a + "q_a_layernorm.weight", (c["q_lora_rank"],)),
                    (a + "q_b_proj.weight", (heads * qk, c["q_lora_rank"]))]
        else:
            out.append((a + "q_proj.weight", (heads * qk, hidden)))
        out += [(a + "kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden)),
                (a + "kv_a_layernorm.weight", (c["kv_lora_rank"],)),
                (a + "kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
                (a + "o_proj.weight", (hidden, heads * c["v_head_dim"]))]
        if layer >= c["first_k_dense_replace"]:
            out.append((p + "mlp.gate.weight", (c["n_routed_experts"], hidden)))
            if c["topk_method"] == "noaux_tc":
                out.append((p + "mlp.gate.e_score_correction_bias", (c["n_routed_experts"],)))
            for e in range(c["n_routed_experts"]):
                out += mlp(f"{p}mlp.experts.{e}.", c["moe_intermediate_size"])
            out += mlp(p + "mlp.shared_experts.", c["moe_intermediate_size"] * c["n_shared_experts"])
        else:
            out += mlp(p + "mlp.", c["intermediate_size"])
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (c["vocab_size"], hidden))]
    return out


def case_qwen3_f32(folder):
    config = qwen3_config()
    weights = formats.random_weights(formats.gqa_tensor_shapes(config), seed=1)
    stored, as_read = formats.store(weights, "F32")
    formats.write_checkpoint(folder, config, stored)
    return config, as_read, gqa_reference


def case_qwen3_fused_bf16_sharded(folder):
    # transformers 5 layout: stacked experts, rope_parameters, tied embeddings, biases.
    config = qwen3_config(attention_bias=True, tie_word_embeddings=True, norm_topk_prob=False,
                          decoder_sparse_step=2, mlp_only_layers=[],
                          rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    del config["rope_theta"]
    weights = formats.random_weights(formats.gqa_tensor_shapes(config), seed=2)
    _, as_read = formats.store(weights, "BF16")
    stored, _ = formats.store(formats.fuse_experts(weights, config), "BF16")
    formats.write_checkpoint(folder, config, stored, shards=3)
    reference_config = dict(config, rope_theta=50000.0)
    return reference_config, as_read, gqa_reference


def case_mixtral_f16(folder):
    config = mixtral_config()
    weights = formats.random_weights(formats.gqa_tensor_shapes(config, mixtral_names=True), seed=3)
    stored, as_read = formats.store(weights, "F16")
    formats.write_checkpoint(folder, config, stored)
    return config, as_read, gqa_reference


def case_deepseek_v3_fp8_sharded(folder):
    config = deepseek_config("v3")
    block = [32, 48]  # small blocks so that the tiny matrices have several, some partial
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}
    weights = formats.random_weights(deepseek_tensor_shapes(config), seed=4)
    fp8 = [n for n, v in weights.items() if v.ndim == 2 and n.endswith("_proj.weight")]
    stored, as_read = formats.store(weights, "F32", fp8_names=fp8, block=block)
    formats.write_checkpoint(folder, config, stored, shards=2)
    return config, as_read, deepseek_reference


def case_deepseek_v2_fused(folder):
    config = deepseek_config("v2")
    weights = formats.random_weights(deepseek_tensor_shapes(config), seed=5)
    _, as_read = formats.store(weights, "F32")
    stored, _ = formats.store(formats.fuse_experts(weights, config), "F32")
    formats.write_checkpoint(folder, config, stored)
    return config, as_read, deepseek_reference


CASES = [case_qwen3_f32, case_qwen3_fused_bf16_sharded, case_mixtral_f16,
         case_deepseek_v3_fp8_sharded, case_deepseek_v2_fused]


def check(binary, case, workdir):
    folder = os.path.join(workdir, case.__name__)
    config, weights, reference = case(folder)
    out = os.path.join(folder, "logits.npy")
    result = subprocess.run([binary, "logits", "--model", folder, "--tokens", ",".join(map(str, TOKENS)),
                             "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        print(f"{case.__name__}: moeserve failed: {result.stderr.strip()}")
        return False
    weights64 = {n: v.astype(np.float64) for n, v in weights.items()}
    expected = reference.forward(config, weights64, TOKENS)
    actual = np.load(out).astype(np.float64)
    if actual.shape != expected.shape:
        print(f"{case.__name__}: shape {actual.shape}, expected {expected.shape}")
        return False
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).mean()
    print(f"{case.__name__}: relative error {error:.2e}, argmax agreement {agreement:.3f}")
    return error < TOLERANCE


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as workdir:
        results = [check(binary, case, workdir) for case in CASES]
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

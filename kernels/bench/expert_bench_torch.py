"""PyTorch baselines for moeserve-expert-bench: the same three layouts, timed with CUDA events.

bf16 baselines: an eager per-expert loop (x_e @ W_gate_up^T, silu * up, @ W_down^T), and
torch._grouped_mm over all experts at once.

FP8 baselines (DeepSeek-V3's recipe: e4m3 weights with 128x128 block scales, activations
quantized per 1x128 tile, bf16 out), with the finest scaling this torch accepts:
- per expert, torch.nn.functional.scaled_mm / torch._scaled_mm with BlockWise1x128 activation and
  BlockWise128x128 weight scales (cuBLASLt's block-scaled modes); the activation quantization is
  eager PyTorch. If blockwise scaling is refused, rowwise (one scale per token and per output
  channel) is used instead, and the table says so;
- the same GEMMs on pre-quantized inputs ("GEMMs only"), the floor of that path;
- torch._scaled_grouped_mm over all experts, rowwise scales (the scaling it supports on Hopper).
Prints two markdown tables.
"""
import random
import statistics

import torch

HIDDEN, INTER = 7168, 2048


def median_ms(fn, iterations=10):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iterations):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def layouts():
    rng = random.Random(42)
    rows = [0] * 256
    for _ in range(128):
        for e in rng.sample(range(256), 8):
            rows[e] += 1
    return [("EP32 prefill: 9 experts x 14.5K tokens", [14500] * 9),
            ("EP128 decode: 3 experts x 340 tokens", [340] * 3),
            ("1 GPU, 256 experts, 128 tokens top-8", rows)]


E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def quantize_1x128(x):
    """bf16 [M, K] -> e4m3 [M, K] and fp32 scales [M, K/128], token-major (stride (1, M))."""
    m, k = x.shape
    tiles = x.float().view(m, k // 128, 128)
    scale = tiles.abs().amax(-1) / E4M3_MAX
    values = (tiles / scale.clamp(min=1e-30).unsqueeze(-1)).view(m, k).to(FP8)
    return values, scale.t().contiguous().t()


def quantize_128x128(w):
    """bf16 [N, K] -> e4m3 [N, K] and fp32 scales [N/128, K/128] (DeepSeek's weight_scale_inv)."""
    n, k = w.shape
    blocks = w.float().view(n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
    values = (blocks / scale.clamp(min=1e-30)[:, None, :, None]).view(n, k).to(FP8)
    return values, scale.contiguous()


def quantize_rowwise(x):
    """bf16 [M, K] -> e4m3 and one fp32 scale per row [M, 1]."""
    scale = x.float().abs().amax(-1, keepdim=True) / E4M3_MAX
    return (x.float() / scale.clamp(min=1e-30)).to(FP8), scale


def blockwise_functional(xq, sx, wq, sw):
    """y = dequant(x) @ dequant(w)^T with 1x128 / 128x128 scales (the scaled_mm API of torch 2.9+)."""
    functional = torch.nn.functional
    return functional.scaled_mm(xq, wq.t(), sx, functional.ScalingType.BlockWise1x128, sw.t(),
                                functional.ScalingType.BlockWise128x128,
                                output_dtype=torch.bfloat16)


def blockwise_private(xq, sx, wq, sw):
    """The same through torch._scaled_mm, which infers the scaling from the scale shapes."""
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16)


def rowwise_mm(xq, sx, wq, sw_row):
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw_row.t(), out_dtype=torch.bfloat16)


def relative_rms(a, b):
    return ((a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum()).sqrt().item()


def fp8_rows(name, rows, x, w_gate_up, w_down, reference):
    """Times the FP8 baselines for one layout; returns the table row."""
    experts = len(rows)
    bounds = [0]
    for r in rows:
        bounds.append(bounds[-1] + r)
    device = x.device
    # Weights: 128x128 block scales, per expert (no fp32 copy of all experts at once).
    gu_q, gu_s, d_q, d_s = [], [], [], []
    for e in range(experts):
        q, sc = quantize_128x128(w_gate_up[e])
        gu_q.append(q)
        gu_s.append(sc)
        q, sc = quantize_128x128(w_down[e])
        d_q.append(q)
        d_s.append(sc)

    # Which recipe does this torch run? Try blockwise on 3 rows (not a multiple of 4), then on
    # the same rows padded to 4, with each blockwise entry point.
    probe = x[:3]
    recipe, pad_rows, blockwise_mm, errors = None, False, None, []
    for padded in (False, True):
        for name_, candidate in (("F.scaled_mm", blockwise_functional),
                                 ("torch._scaled_mm", blockwise_private)):
            if recipe is not None:
                break
            try:
                rows_in = torch.nn.functional.pad(probe, (0, 0, 0, 1)) if padded else probe
                xq, sx = quantize_1x128(rows_in)
                candidate(xq, sx, gu_q[0], gu_s[0])
                torch.cuda.synchronize()
                recipe = f"blockwise 1x128 + 128x128 via {name_}" + (
                    " (rows padded to 4)" if padded else "")
                pad_rows, blockwise_mm = padded, candidate
            except Exception as error:  # noqa: BLE001 - the table reports the reason
                errors.append(f"{name_}{' padded' if padded else ''}: {type(error).__name__}: "
                              f"{str(error)[:100]}")
    why = ""
    if recipe is None:
        recipe = "rowwise (blockwise refused)"
        why = " / ".join(errors)

    if recipe.startswith("rowwise"):
        # Rowwise needs per-output-channel weight scales: requantize from the bf16 weights.
        gu_q, gu_s, d_q, d_s = [], [], [], []
        for e in range(experts):
            q, sc = quantize_rowwise(w_gate_up[e])
            gu_q.append(q)
            gu_s.append(sc)
            q, sc = quantize_rowwise(w_down[e])
            d_q.append(q)
            d_s.append(sc)

    def gemm(a, e, weights, scales):
        if recipe.startswith("rowwise"):
            aq, sa = quantize_rowwise(a)
            return rowwise_mm(aq, sa, weights[e], scales[e])
        m = a.shape[0]
        if pad_rows and m % 4:
            a = torch.nn.functional.pad(a, (0, 0, 0, -m % 4))
        aq, sa = quantize_1x128(a)
        return blockwise_mm(aq, sa, weights[e], scales[e])[:m]

    def eager_fp8():
        out = torch.empty_like(x)
        for e in range(experts):
            if rows[e] == 0:
                continue
            h = gemm(x[bounds[e]:bounds[e + 1]], e, gu_q, gu_s)
            a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            out[bounds[e]:bounds[e + 1]] = gemm(a, e, d_q, d_s)
        return out

    # GEMMs only: both GEMMs' inputs quantized beforehand (the activation of the second one from
    # the bf16 reference path), so only the scaled_mm calls are timed.
    def prequantized(a):
        if recipe.startswith("rowwise"):
            return quantize_rowwise(a)
        m = a.shape[0]
        if pad_rows and m % 4:
            a = torch.nn.functional.pad(a, (0, 0, 0, -m % 4))
        return quantize_1x128(a)

    inputs = []
    for e in range(experts):
        if rows[e] == 0:
            inputs.append(None)
            continue
        xe = x[bounds[e]:bounds[e + 1]]
        h = xe @ w_gate_up[e].T
        a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
        inputs.append((prequantized(xe), prequantized(a)))
    mm = rowwise_mm if recipe.startswith("rowwise") else blockwise_mm

    def gemms_only():
        for e in range(experts):
            if inputs[e] is None:
                continue
            (xq, sx), (aq, sa) = inputs[e]
            mm(xq, sx, gu_q[e], gu_s[e])
            mm(aq, sa, d_q[e], d_s[e])

    eager_ms = median_ms(eager_fp8)
    difference = relative_rms(eager_fp8(), reference)
    gemms_ms = median_ms(gemms_only)
    inputs.clear()
    for weights in (gu_q, gu_s, d_q, d_s):
        weights.clear()
    torch.cuda.empty_cache()

    # torch._scaled_grouped_mm, rowwise scales, all experts in one call per GEMM.
    try:
        offsets = torch.tensor(rows, device=device).cumsum(0).to(torch.int32)
        rw_gu = [quantize_rowwise(w_gate_up[e]) for e in range(experts)]
        w_gu_q = torch.stack([q for q, _ in rw_gu]).transpose(1, 2)  # [E, H, 2I], column-major
        w_gu_s = torch.stack([sc.view(-1) for _, sc in rw_gu])       # [E, 2I]
        del rw_gu
        rw_d = [quantize_rowwise(w_down[e]) for e in range(experts)]
        w_d_q = torch.stack([q for q, _ in rw_d]).transpose(1, 2)    # [E, I, H]
        w_d_s = torch.stack([sc.view(-1) for _, sc in rw_d])         # [E, H]
        del rw_d

        def grouped_fp8():
            xq, sx = quantize_rowwise(x)
            h = torch._scaled_grouped_mm(xq, w_gu_q, sx.view(-1), w_gu_s, offs=offsets,
                                         out_dtype=torch.bfloat16)
            a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            aq, sa = quantize_rowwise(a)
            return torch._scaled_grouped_mm(aq, w_d_q, sa.view(-1), w_d_s, offs=offsets,
                                            out_dtype=torch.bfloat16)

        grouped_diff = relative_rms(grouped_fp8(), reference)
        grouped = f"{median_ms(grouped_fp8):.3f} (rms diff {grouped_diff:.1e})"
        del w_gu_q, w_gu_s, w_d_q, w_d_s
    except Exception as error:  # noqa: BLE001 - report why the baseline is unavailable
        grouped = f"n/a ({type(error).__name__}: {str(error)[:80]})"
    torch.cuda.empty_cache()
    note = f" ({why})" if why else ""
    return (f"| {name} | {recipe}{note} | {eager_ms:.3f} | {gemms_ms:.3f} | {grouped} | "
            f"{difference:.1e} |")


def main():
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print("| layout | eager per-expert ms | torch._grouped_mm ms |")
    print("| --- | ---: | ---: |")
    torch.manual_seed(0)
    fp8_lines = []
    for name, rows in layouts():
        experts = len(rows)
        total = sum(rows)
        x = torch.randn(total, HIDDEN, device=device, dtype=torch.bfloat16)
        w_gate_up = torch.randn(experts, 2 * INTER, HIDDEN, device=device, dtype=torch.bfloat16) * 0.01
        w_down = torch.randn(experts, HIDDEN, INTER, device=device, dtype=torch.bfloat16) * 0.02
        offsets = torch.tensor(rows, device=device).cumsum(0).to(torch.int32)
        bounds = [0] + offsets.tolist()

        def eager():
            out = torch.empty_like(x)
            for e in range(experts):
                if bounds[e + 1] == bounds[e]:
                    continue
                h = x[bounds[e]:bounds[e + 1]] @ w_gate_up[e].T
                a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
                out[bounds[e]:bounds[e + 1]] = a @ w_down[e].T
            return out

        w_gate_up_t = w_gate_up.transpose(1, 2)  # [E, H, 2I]
        w_down_t = w_down.transpose(1, 2)        # [E, I, H]

        def grouped():
            h = torch._grouped_mm(x, w_gate_up_t, offs=offsets)
            a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            return torch._grouped_mm(a, w_down_t, offs=offsets)

        eager_ms = median_ms(eager)
        try:
            reference = eager()
            result = grouped()
            error = (result.float() - reference.float()).abs().max().item() / reference.float().abs().max().item()
            grouped_ms = f"{median_ms(grouped):.3f} (rel. diff {error:.1e})"
        except Exception as e:  # noqa: BLE001 - report why the baseline is unavailable
            grouped_ms = f"n/a ({type(e).__name__}: {str(e)[:60]})"
        print(f"| {name} | {eager_ms:.3f} | {grouped_ms} |", flush=True)
        reference = eager()
        del w_gate_up_t, w_down_t
        try:
            fp8_lines.append(fp8_rows(name, rows, x, w_gate_up, w_down, reference))
        except Exception as error:  # noqa: BLE001 - keep the other layouts' figures
            fp8_lines.append(f"| {name} | failed: {type(error).__name__}: {str(error)[:160]} "
                             "| | | | |")
        del x, w_gate_up, w_down, reference
        torch.cuda.empty_cache()
    print()
    print("| layout | FP8 scaling used | eager per-expert FP8 MLP ms | FP8 GEMMs only ms | "
          "`torch._scaled_grouped_mm` rowwise ms | FP8 vs bf16 rms diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for line in fp8_lines:
        print(line, flush=True)


if __name__ == "__main__":
    main()

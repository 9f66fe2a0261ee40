"""PyTorch baselines for moeserve-expert-bench: the same three layouts, timed with CUDA events.

Baselines: an eager per-expert loop (x_e @ W_gate_up^T, silu * up, @ W_down^T), and
torch._grouped_mm over all experts at once. Prints a markdown table.
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


def main():
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print("| layout | eager per-expert ms | torch._grouped_mm ms |")
    print("| --- | ---: | ---: |")
    torch.manual_seed(0)
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
        del x, w_gate_up, w_down, w_gate_up_t, w_down_t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

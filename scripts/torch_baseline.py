#!/usr/bin/env python3
# Copied from the team's shared GPU notes (shared/gpu/torch_baseline.py) so that device checks can run it.
"""PyTorch + diffusers baseline for the UNet2DModel of google/ddpm-ema-celebahq-256, for side-by-side
timing on a GPU (or on the CPU).  Random weights: speed does not depend on their values.

  python3 torch_baseline.py [--device cuda|cpu] [--batch 1 8 32] [--dtype fp32 tf32 bf16 fp16]
                            [--dps] [--cases DTYPE:BATCH[:dps] ...] [--matmul-peak] [--compile]
                            [--config CONFIG.json] [--save-model DIR] [--json OUT.json]

Times, per (dtype, batch): one UNet forward (no grad) and, with --dps, one DPS step's network work
(forward + gradient of a scalar w.r.t. the input only).  Median of CUDA-event timings after warm-up.
--cases lists the exact runs instead (e.g. `fp32:1:dps bf16:8`: fp32 batch 1 forward and DPS step,
bf16 batch 8 forward only); `--cases` with nothing after it times no network.
--matmul-peak first times a dense bf16 8192x8192x8192 matmul on the GPU (median of CUDA events over
groups of 10 products) and reports the card's measured bf16 rate, "bf16 matmul 8192^3 tflops".
--save-model writes the random weights in diffusers layout (config.json + safetensors) so another
engine can run on the very same weights; --dump-io writes an input and this model's output for them.
Needs diffusers (see wheels/ beside this file for offline installation).
"""
import argparse, json, os, statistics, time
import torch
from diffusers import UNet2DModel

CELEBAHQ = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                block_out_channels=(128, 128, 256, 256, 512, 512),
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
                flip_sin_to_cos=False, freq_shift=1, center_input_sample=False,
                time_embedding_type="positional", act_fn="silu", mid_block_scale_factor=1)
DT = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timer(dev, fn, n, warm):
    for _ in range(warm):
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
        return statistics.median(ts)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


MATMUL_N = 8192


def matmul_peak(reps):
    """Dense bf16 matmul rate: ms per 8192^3 product and TFLOP/s (2 n^3 FLOPs per product)."""
    n = MATMUL_N
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    group = 10

    def products():
        for _ in range(group):
            torch.mm(a, b, out=c)

    ms = timer("cuda", products, reps, 3) / group
    return ms, 2 * n ** 3 / ms / 1e9


def parse_cases(items):
    """`DTYPE:BATCH[:dps]` -> [(dtype, batch, dps)]."""
    out = []
    for it in items:
        parts = it.split(":")
        batch = parts[1].lstrip("b") if len(parts) > 1 else ""
        if (len(parts) not in (2, 3) or parts[0] not in DT or not batch.isdigit() or int(batch) < 1
                or (len(parts) == 3 and parts[2] != "dps")):
            raise SystemExit(f"--cases: `{it}` is not DTYPE:BATCH[:dps] with DTYPE in {sorted(DT)}")
        out.append((parts[0], int(batch), len(parts) == 3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", default=["tf32", "fp32", "bf16"])
    ap.add_argument("--dps", action="store_true")
    ap.add_argument("--cases", nargs="*", metavar="DTYPE:BATCH[:dps]")
    ap.add_argument("--matmul-peak", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-model")
    ap.add_argument("--dump-io")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.cases is not None:
        cases = parse_cases(a.cases)
    else:
        cases = [(d, bs, a.dps) for d in a.dtype for bs in a.batch]
    cfg = CELEBAHQ
    if a.config:
        cfg = {k: v for k, v in json.load(open(a.config)).items() if not k.startswith("_")}
    dev = a.device
    torch.manual_seed(a.seed)
    base = UNet2DModel(**cfg).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    print(f"torch {torch.__version__} device {dev} "
          f"{torch.cuda.get_device_name() if dev == 'cuda' else ''} params {sum(p.numel() for p in base.parameters())}")
    if a.save_model:
        base.save_pretrained(a.save_model, safe_serialization=True)
    hw = cfg["sample_size"]
    if a.dump_io:
        from safetensors.torch import save_file
        os.makedirs(a.dump_io, exist_ok=True)
        g = torch.Generator().manual_seed(a.seed + 1)
        x = torch.randn(2, cfg.get("in_channels", 3), hw, hw, generator=g)
        t = torch.tensor([999, 10])
        v = torch.randn(x.shape, generator=g)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        m = base.to(dev)
        xg = x.to(dev).requires_grad_(True)
        eps = m(xg, t.to(dev)).sample
        grad, = torch.autograd.grad((eps * v.to(dev)).sum(), xg)
        save_file({"sample": x, "timestep": t, "cotangent": v}, os.path.join(a.dump_io, "in.safetensors"))
        save_file({"eps": eps.detach().cpu().contiguous(), "grad": grad.cpu().contiguous()},
                  os.path.join(a.dump_io, "expect.safetensors"))
    res = {}

    def save():  # after every result, so that a run cut short keeps what it measured
        if a.json:
            json.dump(res, open(a.json, "w"), indent=1)

    if a.matmul_peak:
        if dev == "cuda":
            ms, tflops = matmul_peak(max(5, a.reps))
            res[f"bf16 matmul {MATMUL_N}^3 ms"] = ms
            res[f"bf16 matmul {MATMUL_N}^3 tflops"] = tflops
            print(f"bf16 matmul {MATMUL_N}^3: {ms:.3f} ms, {tflops:.1f} TFLOP/s "
                  f"(median of {max(5, a.reps)} groups of 10)", flush=True)
            save()
        else:
            print("--matmul-peak: GPU only, skipped", flush=True)
    for name in dict.fromkeys(d for d, _, _ in cases):
        if dev == "cuda":
            torch.backends.cudnn.allow_tf32 = name == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        m = UNet2DModel(**cfg).eval()
        m.load_state_dict(base.state_dict())
        m = m.to(dev, DT[name])
        for p in m.parameters():
            p.requires_grad_(False)
        if a.compile:
            m = torch.compile(m)
        for _, bs, with_dps in (c for c in cases if c[0] == name):
            x = torch.randn(bs, cfg.get("in_channels", 3), hw, hw, device=dev, dtype=DT[name])
            t = torch.full((bs,), 500, device=dev)

            def fwd():
                with torch.no_grad():
                    return m(x, t).sample

            def dps():
                xg = x.detach().requires_grad_(True)
                e = m(xg, t).sample
                f = torch.linalg.vector_norm(((xg - 0.3 * e) / 0.9).float())
                return torch.autograd.grad(f, xg)[0]

            key = f"{name}{'+compile' if a.compile else ''} b{bs}"
            res[key + " fwd ms"] = timer(dev, fwd, a.reps, 3)
            if with_dps:
                res[key + " dps ms"] = timer(dev, dps, max(3, a.reps // 2), 2)
            print({k: round(v, 3) for k, v in res.items() if k.startswith(key)}, flush=True)
            save()
    save()
    for k, v in res.items():
        print(f"{k:32s} {v:10.3f}")


if __name__ == "__main__":
    main()

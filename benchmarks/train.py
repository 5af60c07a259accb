"""Training-step throughput of the reference model (12 bands, 32x32 windows, patch 4, dim 192, depth 6, heads 3).

CPU: fp32 eager. CUDA (when present): bf16 autocast eager and torch.compile, fused AdamW. The baseline
printed alongside is the model's forward-only (inference) rate on the same device, measured in the same run.

    python benchmarks/train.py [--batch 64] [--steps 5] [--mask-ratio 0.5] [--threads N]
Last line: JSON with train_windows_per_s and device (plus compiled rate on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import autocast_context, build_model, masked_mse, random_token_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(window=32, patch=4, dim=192, depth=6, heads=3, mask_ratio=args.mask_ratio)
    groups = {"geochemistry": list(range(6)), "geophysics": [6, 7, 8], "geology": [9, 10, 11]}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 12, 32, 32, device=device)
    valid = torch.ones(args.batch, 32, 32, dtype=torch.bool, device=device)
    mask = random_token_mask(args.batch, 64, args.mask_ratio, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rate(fn, steps):
        fn()
        fn()  # warm-up (and compilation)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return steps * args.batch / (time.perf_counter() - t)

    def trainer(compiled: bool):
        model = build_model(cfg, groups).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
        fwd = torch.compile(model) if compiled else model

        def step():
            with autocast_context(device):
                recon = fwd(x, mask)
            loss = masked_mse(recon, x, valid, mask, cfg.patch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, step

    model, step = trainer(False)
    n_params = sum(p.numel() for p in model.parameters())
    train_rate = rate(step, args.steps)
    model.eval()

    @torch.no_grad()
    def infer():
        with autocast_context(device):
            model(x)

    fwd_rate = rate(infer, args.steps)
    where = f"{device.type}" + (
        f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    )
    print(
        f"reference model: {n_params / 1e6:.2f} M parameters, batch {args.batch}, mask ratio {args.mask_ratio}, {where}"
    )
    print(f"training step (fwd+bwd+AdamW, eager): {train_rate:,.0f} windows/s")
    print(
        f"baseline, forward only (eval, no mask): {fwd_rate:,.0f} windows/s; training / forward = {train_rate / fwd_rate:.2f}"
    )
    res = {
        "train_windows_per_s": round(train_rate, 1),
        "forward_windows_per_s": round(fwd_rate, 1),
        "device": where,
        "batch": args.batch,
        "mask_ratio": args.mask_ratio,
        "params": n_params,
    }
    if device.type == "cuda" and not args.no_compile:
        _, cstep = trainer(True)
        res["train_windows_per_s_compiled"] = round(rate(cstep, args.steps), 1)
        print(
            f"training step, torch.compile: {res['train_windows_per_s_compiled']:,.0f} windows/s "
            f"({res['train_windows_per_s_compiled'] / train_rate:.2f}x eager)"
        )
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)

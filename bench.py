"""Benchmark every backbone: training ms/step, sampling time, and the ratio to the matmul bound.

    python bench.py            # full: median of 7 blocks, real 10,000-sample runs
    python bench.py --quick    # under a minute: fewer blocks, sampling timed per network evaluation
    python bench.py --threads 2 --dtype bf16
    python bench.py --quick --compile   # torch.compile the training step's model, as train.py --compile does
    python bench.py --quick --json results/bench.json   # ms/step per sweep configuration, for sweep.py --costs

The matmul bound is timed in the same run: every nn.Linear call of one training step is recorded,
and the three matmuls it costs (forward, grad of input, grad of weight) are timed alone with
torch.mm. ratio = ms/step / bound. Compare numbers within one run: this box is shared and noisy.
"""

import json
import os
import statistics
import time

import torch

import runs
import tinydiff as td


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, blocks, per_block, warmup):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / per_block * 1e3)
    return statistics.median(times)


def linear_shapes(model, scheduler, x):
    """(M, K, N) of every nn.Linear call in one forward pass."""
    shapes, hooks = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, inp, out: shapes.append(
                        (inp[0].numel() // mod.in_features, mod.in_features, mod.out_features)
                    )
                )
            )
    td.ddpm_loss(model, scheduler, x)
    for h in hooks:
        h.remove()
    return shapes


def matmul_bound_ms(shapes, device, dtype, blocks, per_block):
    """Time forward (M,K)@(K,N), grad input (M,N)@(N,K) and grad weight (N,M)@(M,K) for each shape."""
    mats = []
    for M, K, N in shapes:
        for a, b in (((M, K), (K, N)), ((M, N), (N, K)), ((N, M), (M, K))):
            mats.append((torch.randn(a, device=device, dtype=dtype), torch.randn(b, device=device, dtype=dtype)))
    return median_ms(lambda: [torch.mm(a, b) for a, b in mats], device, blocks, per_block, warmup=3)


@runs.script
def main(argv=None):
    p = runs.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="finish in under a minute")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast for training, matmul bound in bf16"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (sampling stays eager, as in train.py)",
    )
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--n", type=int, default=10_000, help="samples to draw")
    p.add_argument(
        "--fast_steps", type=int, default=20, help="network evaluations of the few-step sampler (DPM-Solver++)"
    )
    p.add_argument("--only", nargs="*", default=None, help=f"backbones to run (default all: {', '.join(runs.CONFIGS)})")
    p.add_argument(
        "--block",
        choices=["gelu", "relu"],
        default="gelu",
        help="residual block form (relu: --preset paper's); same matrix work",
    )
    p.add_argument(
        "--json", default=None, help="also write each backbone's ms/step, by sweep configuration name, to this file"
    )
    args = p.parse_args(argv)
    for name in ("threads", "batch_size", "n"):
        if getattr(args, name) < 1:
            runs.fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 1 <= args.fast_steps <= 100:
        runs.fail(f"--fast_steps must be in 1..100 (T = 100), got {args.fast_steps}")
    unknown = [b for b in args.only or [] if b not in runs.CONFIGS]
    if unknown:
        runs.fail(f"unknown backbone {unknown[0]!r}; use some of: {', '.join(runs.CONFIGS)}")
    if args.only == []:
        runs.fail(f"--only names no backbone; give some of: {', '.join(runs.CONFIGS)}, or leave --only out for all")
    if args.json and (os.path.isdir(args.json) or args.json.endswith(os.sep)):
        runs.fail(
            f"--json {args.json} is a folder; give a file path in it, such as {os.path.join(args.json, 'bench.json')}"
        )
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        runs.fail(f"--json {args.json}: its folder does not exist; create it or give another path")
    if args.json and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        runs.fail(f"--json {args.json}: its folder is not writable; give another path")
    device = runs.pick_device(args.device)
    torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bf16"
    blocks, per_block, warmup = (3, 10, 10) if args.quick else (7, 25, 30)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name} | threads {torch.get_num_threads()} | torch {torch.__version__} | dtype {args.dtype} | batch "
        f"{args.batch_size}"
        f" | {'quick' if args.quick else 'full'}{' | compiled training' if args.compile else ''}"
    )
    print(
        f"{'backbone':<10}{'params':>9}{'ms/step':>9}{'bound ms':>9}{'ratio':>7}{'x base':>8}"
        f"{'DDPM-100 s':>12}{f'DPM++-{args.fast_steps} s':>12}"
    )
    rows = {}
    for label, kw in runs.CONFIGS.items():
        if args.only and label not in args.only:
            continue
        torch.manual_seed(0)
        cfg = td.DenoiserConfig(block=args.block, **kw)
        try:
            runs.check_flag_memory(
                "--batch_size",
                args.batch_size,
                args.batch_size
                * runs.activation_bytes_per_row(td.Denoiser(cfg), td.NoiseScheduler(), torch.randn(64, 2)),
                device,
            )
            runs.check_flag_memory("--n", args.n, args.n * 2 * 4 * 8, device)
        except ValueError as e:
            runs.fail(str(e))
        model = td.Denoiser(cfg).to(device)
        scheduler = td.NoiseScheduler().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x = torch.randn(args.batch_size, 2, device=device)
        model.set_data_stats(x, standardize=False, moments=False)  # raw coordinates and the N(0, I) start
        net = torch.compile(model) if args.compile else model

        def train_step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = td.ddpm_loss(net, scheduler, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ms = median_ms(train_step, device, blocks, per_block, warmup)
        bound = matmul_bound_ms(
            linear_shapes(model, scheduler, x), device, torch.bfloat16 if bf16 else torch.float32, blocks, per_block
        )
        model.eval()
        T = scheduler.num_train_timesteps
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            g = torch.Generator(device=device)
            if args.quick:  # time a 2-step DDIM run (two network evaluations), scale by the number of evaluations
                nfe_s = (
                    median_ms(
                        lambda: td.sample(
                            model, scheduler, args.n, "ddim", 2, generator=g.manual_seed(0), device=device
                        ),
                        device,
                        3,
                        2,
                        1,
                    )
                    / 2e3
                )
                ddpm_s, fast_s = nfe_s * T, nfe_s * args.fast_steps
            else:
                ddpm_s = (
                    median_ms(
                        lambda: td.sample(model, scheduler, args.n, generator=g.manual_seed(0), device=device),
                        device,
                        1,
                        1,
                        0,
                    )
                    / 1e3
                )
                fast_s = (
                    median_ms(
                        lambda: td.sample(
                            model,
                            scheduler,
                            args.n,
                            sampler="dpm++",
                            steps=args.fast_steps,
                            generator=g.manual_seed(0),
                            device=device,
                        ),
                        device,
                        3,
                        1,
                        1,
                    )
                    / 1e3
                )
        rows[label] = ms
        n_params = sum(q.numel() for q in model.parameters())
        vs_base = ms / rows.get("base", ms)
        print(
            f"{label:<10}{n_params:>9,}{ms:>9.2f}{bound:>9.2f}{ms / bound:>7.2f}{vs_base:>8.2f}"
            f"{ddpm_s:>12.2f}{fast_s:>12.2f}",
            flush=True,
        )
    if args.json:  # keyed as sweep.py and train.py name the configurations ("base", "attn1x4", "ssm1", ...)
        record = dict(
            device=name,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            dtype=args.dtype,
            compile=args.compile,
            batch_size=args.batch_size,
            block=args.block,
            mode="quick" if args.quick else "full",
            ms_per_step={label: round(ms, 4) for label, ms in rows.items()},
        )
        runs.write_or_fail(
            args.json, lambda f: f.write(json.dumps(record, indent=1).encode()), "give --json a writable path"
        )
        print(f"wrote {args.json}")
    if "base" in rows:
        base = rows["base"]
        print(
            "summary: "
            + ", ".join(f"{k} {v / base:.2f}x base" for k, v in rows.items() if k != "base")
            + f" | sampling: {'per-NFE estimate' if args.quick else 'measured'}"
        )


if __name__ == "__main__":
    main()

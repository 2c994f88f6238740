"""Cost of a STAR router against the original linear gate, and of the GHA update against the naive form.

Part 1 — a Mixtral-shaped MoE block (hidden 1024, intermediate 3584, 8 experts, top-2, 4096 tokens):
    forward+backward of the whole block in training mode (STAR: statistics accumulated in the forward)
    and forward in eval mode (STAR: cached effective weight), original router vs STAR router.
    Runs are interleaved (A B A B ...) and the median of per-pair ratios is reported.
Part 2 — one GHA update at N=32768, D=1024, R=8: time and peak extra memory of the statistics form
    (star_hf.gha.sanger) against the reference's materialising form (an N×R×D cumulative sum). Each method runs
    in a fresh subprocess so that peak-memory figures are not polluted by the other.

Usage:
    python benchmarks/router_overhead.py                         # CPU, float32, writes results JSON
    python benchmarks/router_overhead.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 14336
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- part 1: the MoE block
def build_block(
    hidden: int, intermediate: int, experts: int, top_k: int, dtype: torch.dtype, device: str, experts_impl: str
):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts, num_experts_per_tok=top_k
    )
    cfg._experts_implementation = experts_impl  # what a full model dispatches to; standalone blocks get None
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_train(block, x, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = block(x)
    out.float().pow(2).mean().backward()
    _sync(device)
    return time.perf_counter() - t0


def _time_eval(block, x, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        block(x)
    _sync(device)
    return time.perf_counter() - t0


def bench_block(args) -> dict:
    import star_hf

    dtype = getattr(torch, args.dtype)
    base = build_block(
        args.hidden, args.intermediate, args.experts, args.top_k, dtype, args.device, args.experts_implementation
    )
    star = star_hf.patch_model(copy.deepcopy(base))
    # An identical unpatched copy measures the noise floor: any ratio between two copies of the same
    # block comes from memory layout and timing noise, not from the router.
    twin = copy.deepcopy(base)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(args.device, dtype)

    results = {}
    for mode, timer in (("train", _time_train), ("eval", _time_eval)):
        for m in (base, star, twin):
            m.train(mode == "train")
            for _ in range(args.warmup):
                timer(m, x, args.device)
                m.zero_grad(set_to_none=True)
        star_hf.gha_step(star)  # clear warm-up statistics
        times: dict[int, list[float]] = {id(base): [], id(star): [], id(twin): []}
        for i in range(args.repeats):
            for m in (base, star, twin) if i % 2 == 0 else (twin, star, base):
                times[id(m)].append(timer(m, x, args.device))
                m.zero_grad(set_to_none=True)
        t_base, t_star, t_twin = times[id(base)], times[id(star)], times[id(twin)]
        ratios = [s_ / b_ for s_, b_ in zip(t_star, t_base)]
        results[mode] = {
            "original_median_s": statistics.median(t_base),
            "star_median_s": statistics.median(t_star),
            "ratio_of_medians": statistics.median(t_star) / statistics.median(t_base),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "identical_copy_ratio_of_medians": statistics.median(t_twin) / statistics.median(t_base),
            "repeats": args.repeats,
        }
    results["router_only_eval"] = bench_router_only(base.gate, star.gate, x.reshape(-1, args.hidden), args)
    # one GHA step on the statistics of one training forward (applied once per optimizer step)
    star.train()
    star(x).float().sum().backward()
    _sync(args.device)
    t0 = time.perf_counter()
    star_hf.gha_step(star)
    _sync(args.device)
    results["gha_step_s"] = time.perf_counter() - t0
    return results


def bench_router_only(original, star, x: torch.Tensor, args) -> dict:
    """The router alone in eval mode (no grad): the original gate against the STAR router's cached
    W_eff, which adds only Python work (the cache-key check) on top of the same kernels."""
    inner = 50
    for m in (original, star):
        m.eval()
    per_call = {id(original): [], id(star): []}
    with torch.no_grad():
        for m in (original, star):
            m(x)
        for i in range(args.repeats * 4):
            for m in (original, star) if i % 2 == 0 else (star, original):
                _sync(args.device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    m(x)
                _sync(args.device)
                per_call[id(m)].append((time.perf_counter() - t0) / inner)
    t_o, t_s = statistics.median(per_call[id(original)]), statistics.median(per_call[id(star)])
    return {"original_median_s": t_o, "star_median_s": t_s, "ratio_of_medians": t_s / t_o}


# ----------------------------------------------------------------------------- part 2: the GHA update
def naive_materialising_update(x: torch.Tensor, basis: torch.Tensor, lr: float) -> torch.Tensor:
    """The reference's form: reconstructions of every token by every prefix of the basis (N×R×D)."""
    y = x @ basis.t()  # N×R
    recon = torch.cumsum(y[:, :, None] * basis[None, :, :], dim=1)  # N×R×D
    delta = (y[:, :, None] * (x[:, None, :] - recon)).mean(dim=0)  # R×D
    new = basis + lr * delta
    return new / new.norm(dim=1, keepdim=True)


def statistics_update(x: torch.Tensor, basis: torch.Tensor, lr: float) -> torch.Tensor:
    from star_hf.gha.sanger import GHAStatistics, sanger_update

    return sanger_update(basis, GHAStatistics.from_inputs(x, basis), lr)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def gha_worker(method: str, n: int, d: int, r: int, device: str) -> dict:
    """Runs in a fresh process: one update, its time and peak extra memory."""
    fn = {"naive": naive_materialising_update, "statistics": statistics_update}[method]
    fn(torch.randn(16, d, device=device), torch.randn(r, d, device=device), 5e-5)  # imports, kernel warm-up
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device)
    basis = torch.randn(r, d, generator=g).to(device)
    basis = basis / basis.norm(dim=1, keepdim=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn(x, basis, 5e-5)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        _reset_peak_rss()
        before = _status_mib("VmRSS")
        t0 = time.perf_counter()
        out = fn(x, basis, 5e-5)
        elapsed = time.perf_counter() - t0
        extra = _status_mib("VmHWM") - before
    return {"method": method, "time_s": elapsed, "peak_extra_mib": extra, "checksum": float(out.double().sum())}


def bench_gha(args) -> dict:
    rows = {}
    for method in ("naive", "statistics"):
        cmd = [
            sys.executable,
            __file__,
            "--gha-worker",
            method,
            "--gha-n",
            str(args.gha_n),
            "--gha-d",
            str(args.gha_d),
            "--gha-r",
            str(args.gha_r),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[method] = json.loads(out.strip().splitlines()[-1])
    naive, stat = rows["naive"], rows["statistics"]
    return {
        "N": args.gha_n,
        "D": args.gha_d,
        "R": args.gha_r,
        "naive": naive,
        "statistics": stat,
        "memory_ratio": stat["peak_extra_mib"] / naive["peak_extra_mib"],
        "speedup": naive["time_s"] / stat["time_s"],
        "same_result": abs(naive["checksum"] - stat["checksum"]) < 1e-3,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts-implementation", default="grouped_mm", help="Transformers experts kernel")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--gha-n", type=int, default=32768)
    p.add_argument("--gha-d", type=int, default=1024)
    p.add_argument("--gha-r", type=int, default=8)
    p.add_argument("--skip-block", action="store_true")
    p.add_argument("--skip-gha", action="store_true")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default: benchmarks/results/...)")
    p.add_argument("--gha-worker", choices=["naive", "statistics"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gha_worker:
        print(json.dumps(gha_worker(args.gha_worker, args.gha_n, args.gha_d, args.gha_r, args.device)))
        return 0

    report = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "block": {
            k: getattr(args, k) for k in ("hidden", "intermediate", "experts", "top_k", "tokens", "experts_implementation")
        },
    }
    if not args.skip_block:
        report["block_timing"] = bench_block(args)
        bt = report["block_timing"]
        print(
            f"MoE block, {args.tokens} tokens, hidden {args.hidden}: STAR/original, median of pair ratios "
            f"(ratio of median times): train fwd+bwd {bt['train']['ratio_median']:.3f} "
            f"({bt['train']['ratio_of_medians']:.3f}; original {bt['train']['original_median_s']:.3f} s), "
            f"eval fwd {bt['eval']['ratio_median']:.3f} ({bt['eval']['ratio_of_medians']:.3f}; "
            f"original {bt['eval']['original_median_s']:.4f} s); identical unpatched copy/original: train "
            f"{bt['train']['identical_copy_ratio_of_medians']:.3f}, eval {bt['eval']['identical_copy_ratio_of_medians']:.3f}; "
            f"router alone in eval "
            f"{bt['router_only_eval']['ratio_of_medians']:.3f} "
            f"({bt['router_only_eval']['original_median_s'] * 1e6:.1f} vs "
            f"{bt['router_only_eval']['star_median_s'] * 1e6:.1f} µs); gha_step {bt['gha_step_s'] * 1e3:.2f} ms"
        )
    if not args.skip_gha:
        report["gha_update"] = g = bench_gha(args)
        print(
            f"GHA update N={g['N']} D={g['D']} R={g['R']}: naive {g['naive']['time_s']:.3f} s / "
            f"{g['naive']['peak_extra_mib']:.0f} MiB extra, statistics {g['statistics']['time_s']:.4f} s / "
            f"{g['statistics']['peak_extra_mib']:.1f} MiB extra -> memory {100 * g['memory_ratio']:.2f}% of naive, "
            f"{g['speedup']:.1f}x faster, same result: {g['same_result']}"
        )
    out = args.output or RESULTS / f"router_overhead_{args.device.split(':')[0]}_{args.dtype}_h{args.hidden}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One GPU run for the Triton kernels (issue #4): ceilings, parity against fp64, then the benchmarks.

    PYTHONUNBUFFERED=1 python -m bench.gpu_kernels --out bench/results   # ~3-4 min on an H100/H200

1. Header: card, clocks, versions, commit.
2. Ceilings measured in the same run: device-to-device copy bandwidth (read + write bytes) and an
   8192^3 bf16 GEMM on random data.
3. Parity on fresh random inputs (never zeros), outputs poisoned with NaN: the conv stack in every mode
   and the queue kernels (similarity, loss, gradients) against float64 torch; the persistent GRU kernel
   (fp32, bf16, inside a CUDA graph) against a float64 nn.GRU read at each sample's length.
4. Timing with ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, median and
   p20/p80), candidates and baselines alternating over rounds in one process; the B=1 conv stack and GRU
   are also timed by CUDA-graph replay (GPU time without launch overhead). Ratios are per round, then the
   median. The GRU (L=75, d=256, B=1/32/256): the Triton kernel against cuDNN's nn.GRU + gather, fp32 and bf16.
``--only gru`` runs the GRU stages alone (a grid-barrier deadlock would show as the run's timeout).
Writes ``gpu_kernels_<card>_<date>.json`` and ``.md`` into --out; prints the table last.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e})"


def header(device: str) -> dict:
    import triton

    cuda = device == "cuda"
    return dict(
        card=torch.cuda.get_device_name() if cuda else "cpu-smoke",
        sms=torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0,
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        commit=os.environ.get("GIT_COMMIT") or sh("git rev-parse --short HEAD") or "?",
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        nvidia_smi=sh("nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu,driver_version "
                      "--format=csv,noheader"),
    )


def bench(fn, graph: bool = False) -> dict:
    if not torch.cuda.is_available():  # --smoke on CPU: checks the script runs, the numbers mean nothing
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e6)
        return dict(median_us=statistics.median(ts), p20_us=min(ts), p80_us=max(ts))
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        ms = do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
    else:
        ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return dict(median_us=ms[0] * 1e3, p20_us=ms[1] * 1e3, p80_us=ms[2] * 1e3)


def ceilings(device: str, smoke: bool) -> dict:
    n, g = (1 << 16, 256) if smoke else (1 << 28, 8192)  # 1 GiB of fp32; an 8192^3 GEMM
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    copy_t = bench(lambda: dst.copy_(src))["median_us"]
    a = torch.randn(g, g, device=device, dtype=torch.bfloat16)
    b = torch.randn(g, g, device=device, dtype=torch.bfloat16)
    gemm_t = bench(lambda: a @ b)["median_us"]
    return dict(copy_GBps=2 * n * 4 / copy_t / 1e3, gemm_bf16_TFLOPs=2 * g**3 / gemm_t / 1e6)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel(a, ref) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


def parity_conv(device: str, smoke: bool) -> list[dict]:
    """fp32 ieee is checked at d=256 only in the CPU tests' small sizes (its d=256 FMA kernel compiles slowly)."""
    from bench.kernel_cases import random_bn_blocks
    from kernels.conv_block import fold_block, residual_block

    rows = []
    modes = (("fp32_tf32x3", torch.float32, "tf32x3", 1e-5), ("fp32_tf32", torch.float32, "tf32", 5e-4),
             ("bf16", torch.bfloat16, "auto", 1e-2), ("fp16", torch.float16, "auto", 1e-2))
    if smoke:
        modes = (("fp32_ieee", torch.float32, "ieee", 1e-5), ("fp16", torch.float16, "auto", 1e-2))
    for batch, length in ((1, 75), (3, 61), (32, 75)) if not smoke else ((3, 21),):
        m = random_bn_blocks(256, 5, device)
        x = torch.randn(length, batch, 256, device=device)
        mask = torch.arange(length, device=device)[None] < torch.randint(length // 2, length + 1, (batch, 1), device=device)
        with torch.no_grad():
            ref = copy.deepcopy(m).double()(x.double(), mask)
            err = rel(m(x, mask), ref)  # context: torch's own fp32 path (cuDNN, TF32 by default)
            rows.append(dict(kernel="conv_stack", shape=f"B{batch} T{length} d256", mode="torch_reference_default",
                             rel_err=err, tol=float("nan"), nan=False, ok=True))
            for mode, dtype, prec, tol in modes:
                y = x.to(dtype)
                for blk in m.blocks:
                    out = torch.full_like(y, float("nan"))
                    y = residual_block(y, mask, fold_block(blk, dtype), precision=prec, out=out)
                sync()
                err = rel(y, ref)
                rows.append(dict(kernel="conv_stack", shape=f"B{batch} T{length} d256", mode=mode, rel_err=err, tol=tol,
                                 nan=bool(y.isnan().any()), ok=err <= tol and not y.isnan().any()))
    return rows


def parity_queue(device: str, smoke: bool) -> list[dict]:
    from kernels.queue_loss import distill_align_loss, queue_similarity
    from reference.distill_align import DistillAlign

    rows = []
    b, L, d, alpha = (32, 65536, 256, 0.4) if not smoke else (3, 200, 64, 0.4)
    da = DistillAlign(d, L).to(device)
    da64 = copy.deepcopy(da).double()
    feats = [F.normalize(torch.randn(b, d, device=device), dim=-1) for _ in range(4)]
    q = torch.randn(b, d, device=device)
    s_ref = F.normalize(q.double(), dim=-1) @ da64.vid_queue / da64.temp
    g64 = [f.double().requires_grad_(i < 2) for i, f in enumerate(feats)]
    loss64 = da64.align_loss(*g64, alpha)
    loss64.backward()
    for prec, tol in (("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-4)) if not smoke else (("ieee", 1e-5),):
        with torch.no_grad():
            s = queue_similarity(q, da.vid_queue, da.temp, precision=prec, backend="triton")
        err = rel(s, s_ref.detach())
        rows.append(dict(kernel="queue_similarity", shape=f"b{b} L{L} d{d}", mode=prec, rel_err=err, tol=tol,
                         nan=bool(s.isnan().any()), ok=err <= tol))
        g = [f.clone().requires_grad_(i < 2) for i, f in enumerate(feats)]
        da.temp.grad = None
        loss = distill_align_loss(*g, da.txt_queue, da.vid_queue, da.temp, alpha, precision=prec, backend="triton")
        loss.backward()
        errs = dict(loss=rel(loss.detach(), loss64.detach()), d_gv=rel(g[0].grad, g64[0].grad),
                    d_gt=rel(g[1].grad, g64[1].grad), d_temp=rel(da.temp.grad, da64.temp.grad))
        ltol = 1e-4 if prec != "tf32" else 1e-3
        for k, e in errs.items():
            rows.append(dict(kernel="distill_align_loss", shape=f"b{b} L{L} d{d}", mode=f"{prec} {k}", rel_err=e,
                             tol=ltol, nan=False, ok=e <= ltol))
    return rows


def parity_gru(device: str, smoke: bool) -> list[dict]:
    """The Triton GRU (its GPU launch settings: several slices per sample group and a grid barrier per step)
    and the torch backend against a float64 nn.GRU; one row replays the kernel inside a CUDA graph."""
    from kernels.gru import gru_last_state
    from kernels.gru_triton import gru_settings

    rows = []
    d = 256 if not smoke else 32
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    for batch, length in ((1, 75), (3, 61), (15, 75), (32, 75), (100, 37), (256, 75)) if not smoke else ((3, 9),):
        gru = torch.nn.GRU(d, d, batch_first=True).to(device).requires_grad_(False)
        x = torch.randn(batch, length, d, device=device)
        steps = torch.randint(1, length + 1, (batch,), device=device)
        steps[0] = length
        g64 = copy.deepcopy(gru).double()
        ref = g64(x.double())[0][torch.arange(batch, device=device), steps - 1]
        cfg = gru_settings(batch, d, sms, interpret=device != "cuda")
        shape = f"B{batch} L{length} d{d} S{cfg['slices']}xG{cfg['groups']}"
        for mode, dtype, backend, tol in (("triton_fp32", torch.float32, "triton", 1e-5),
                                          ("triton_bf16", torch.bfloat16, "triton", 1e-2),
                                          ("torch_fp32", torch.float32, "torch", 1e-5)):
            if smoke and dtype == torch.bfloat16:
                continue  # the interpreter computes bf16 wrong
            g = gru.to(dtype)
            with torch.no_grad():
                y = gru_last_state(x.to(dtype), g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0, steps,
                                   backend=backend)
            sync()
            err = rel(y, ref)
            rows.append(dict(kernel="gru", shape=shape, mode=mode, rel_err=err, tol=tol, nan=bool(y.isnan().any()),
                             ok=err <= tol and not y.isnan().any()))
            gru.float()
        if device == "cuda" and batch in (1, 32):  # captured once, replayed: the barrier counters stay valid
            w = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
            with torch.no_grad():
                eager = gru_last_state(x, *w, steps, backend="triton")
                graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    gru_last_state(x, *w, steps, backend="triton")
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    out = gru_last_state(x, *w, steps, backend="triton")
                errs = []
                for _ in range(3):
                    graph.replay()
                    sync()
                    errs.append(rel(out, eager))
            rows.append(dict(kernel="gru", shape=shape, mode="triton_fp32_cudagraph_vs_eager", rel_err=max(errs),
                             tol=1e-6, nan=bool(out.isnan().any()), ok=max(errs) <= 1e-6))
    return rows


def time_case(case, rounds: int = 3, baseline: str | None = None, graph: bool = False) -> list[dict]:
    """Every provider of a case, alternating over ``rounds``; per-round ratios against ``baseline``."""
    for fn in case.fns.values():  # compile / warm up everything first
        fn()
    sync()
    times = {k: [] for k in case.fns}
    for _ in range(rounds):
        for k, fn in case.fns.items():
            times[k].append(bench(fn, graph=graph))
    rows = []
    for k, ts in times.items():
        med = statistics.median(t["median_us"] for t in ts)
        row = dict(case=case.name + ("_graph" if graph else ""), provider=k, median_us=med,
                   p20_us=statistics.median(t["p20_us"] for t in ts), p80_us=statistics.median(t["p80_us"] for t in ts),
                   rounds=[round(t["median_us"], 2) for t in ts], GBps=case.bytes.get(k, 0) / med / 1e3)
        if baseline and baseline in times:
            ratios = [b["median_us"] / t["median_us"] for b, t in zip(times[baseline], ts)]
            row.update(speedup_vs=baseline, speedup=statistics.median(ratios), speedup_min=min(ratios),
                       speedup_max=max(ratios))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference conv stack")
    p.add_argument("--only", choices=("all", "conv", "queue", "gru"), default="all", help="run one kernel's stages")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on CPU through the Triton interpreter: checks the script, times nothing useful")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("bench.gpu_kernels needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    if device == "cpu" and "triton" not in sys.modules:  # --smoke on a CPU: Triton's interpreter (set before import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.kernel_cases import conv_stack_case

    t0 = time.time()
    res = dict(header=header(device), errors=[], parity=[], timing=[])
    print(json.dumps(res["header"], indent=1))
    res["ceilings"] = ceilings(device, args.smoke)
    print("ceilings", res["ceilings"])

    def run(name, job, key):
        t = time.time()
        try:
            res[key] += job()
        except Exception:  # noqa: BLE001 - record and continue: one failure must not lose the other results
            res["errors"].append(f"{name}: {traceback.format_exc()}")
            print(res["errors"][-1])
        print(f"[{name}] {time.time() - t:.1f}s", flush=True)
        res["wall_s"] = time.time() - t0
        write(res, args.out, quiet=True)  # after every stage: a run cut short still leaves its results

    want = (lambda k: args.only in ("all", k))
    if want("conv"):
        run("parity conv", lambda: parity_conv(device, args.smoke), "parity")
    if want("queue"):
        run("parity queue", lambda: parity_queue(device, args.smoke), "parity")
    if want("gru"):
        run("parity gru", lambda: parity_gru(device, args.smoke), "parity")
    for r in res["parity"]:
        print(f"parity {r['kernel']:<20} {r['shape']:<16} {r['mode']:<14} rel {r['rel_err']:.2e} tol {r['tol']:.0e} "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    conv_providers = ("reference", "reference_bf16", "torch_folded", "triton_tf32", "triton_tf32x3", "triton_bf16")
    length = 75 if not args.smoke else 21
    if want("queue"):
        run("queue", lambda: _queue_rows(args.rounds, device, args.smoke), "timing")
    for batch in (1, 32, 256) if not args.smoke and want("conv") else (1,) if want("conv") else ():
        run(f"conv B{batch}", lambda b=batch: time_case(
            conv_stack_case(b, length, device=device, providers=conv_providers,
                            compile_mode="default" if args.compile else None),
            args.rounds, baseline="reference"), "timing")
    if not args.smoke and want("conv"):
        run("conv B1 graph", lambda: time_case(
            conv_stack_case(1, providers=("reference", "reference_bf16", "torch_folded", "triton_tf32", "triton_bf16")),
            args.rounds, baseline="reference", graph=True), "timing")
    for batch in ((1, 32, 256) if not args.smoke else (1,)) if want("gru") else ():
        run(f"gru B{batch}", lambda b=batch: _gru_rows(b, args.rounds, device, args.smoke), "timing")
    if not args.smoke and want("gru"):
        run("gru B1 graph", lambda: _gru_rows(1, args.rounds, device, args.smoke, graph=True), "timing")
    write(res, args.out)
    return 1 if res["errors"] or not all(r["ok"] for r in res["parity"]) else 0


def _queue_rows(rounds: int, device: str, smoke: bool) -> list[dict]:
    from bench.kernel_cases import queue_case

    providers = [f"{p}_{v}" for p in ("similarity", "loss_fwd", "loss_fwdbwd") for v in ("torch", "triton_tf32",
                                                                                      "triton_tf32x3", "triton_ieee")]
    case = queue_case(device=device, providers=tuple(providers), **(dict(b=3, queue_length=200, d=64) if smoke else {}))
    rows = []
    for prefix in ("similarity", "loss_fwd_", "loss_fwdbwd"):
        sub = copy.copy(case)
        sub.fns = {k: v for k, v in case.fns.items() if k.startswith(prefix)}
        base = [k for k in sub.fns if k.endswith("torch")][0]
        rows += time_case(sub, rounds, baseline=base)
    return rows


def _gru_rows(batch: int, rounds: int, device: str, smoke: bool, graph: bool = False) -> list[dict]:
    """The GRU kernel against cuDNN's nn.GRU + gather, fp32 and bf16 (each against its own dtype's baseline).
    Under CUDA-graph replay the torch backend is left out (it reads the lengths on the host)."""
    from bench.kernel_cases import gru_case

    fp32 = ("nn_gru", "triton") + (() if graph else ("torch_loop",))
    bf16 = () if smoke else ("nn_gru_bf16", "triton_bf16")
    case = gru_case(batch, **(dict(length=9, d=32) if smoke else {}), device=device, providers=fp32 + bf16)
    rows = []
    for names, base in ((fp32, "nn_gru"), (bf16, "nn_gru_bf16")):
        if names:
            sub = copy.copy(case)
            sub.fns = {k: v for k, v in case.fns.items() if k in names}
            rows += time_case(sub, rounds, baseline=base, graph=graph)
    return rows


def title_lines(what: str, h: dict) -> list[str]:
    """The first lines of a results table: what ran where, when, at which commit, with which versions."""
    return [f"# {what} on {h['card']} — {h['date']}, commit {h['commit']}",
            f"torch {h['torch']}, triton {h['triton']}, CUDA {h['cuda']}; nvidia-smi: {h['nvidia_smi']}"]


def save(res: dict, lines: list[str], out: Path, prefix: str, quiet: bool = False) -> None:
    """Write ``<prefix>_<card>_<date>.json`` (res) and ``.md`` (lines, errors appended) into ``out``."""
    if res["errors"]:
        lines = lines + ["", "Errors:", ""] + [f"    {e.strip().splitlines()[-1]}" for e in res["errors"]]
    card = res["header"]["card"].replace(" ", "_")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{prefix}_{card}_{stamp}"
    base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines), flush=True)


def write(res: dict, out: Path, quiet: bool = False) -> None:
    h, c = res["header"], res["ceilings"]
    lines = title_lines("Triton kernels", h) + [
             f"Ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s (read+write), "
             f"bf16 GEMM {c['gemm_bf16_TFLOPs']:.0f} TFLOP/s.", "",
             "| case | provider | median µs | p20–p80 µs | GB/s | % copy BW | speed-up (min–max) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["timing"]:
        sp = f"{r['speedup']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) vs {r['speedup_vs']}" if "speedup" in r else ""
        lines.append(f"| {r['case']} | {r['provider']} | {r['median_us']:.1f} | {r['p20_us']:.1f}–{r['p80_us']:.1f} | "
                     f"{r['GBps']:.0f} | {100 * r['GBps'] / c['copy_GBps']:.0f} % | {sp} |")
    lines += ["", "| parity | shape | mode | rel. error vs fp64 | tolerance | ok |", "|---|---|---|---|---|---|"]
    for r in res["parity"]:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['rel_err']:.2e} | {r['tol']:.0e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    save(res, lines, out, "gpu_kernels", quiet)


if __name__ == "__main__":
    sys.exit(main())

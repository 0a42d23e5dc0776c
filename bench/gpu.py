"""One GPU run for the engine, training and export (issues #5-#7): ceilings, parity on the GPU, then every
benchmark, reference and candidates interleaved on the same card.

    GIT_COMMIT=$(git rev-parse --short HEAD) PYTHONUNBUFFERED=1 python -m bench.gpu --out bench/results
    python -m bench.gpu --smoke --out /tmp/smoke      # CPU: checks the script runs (numbers mean nothing;
                                                      # Triton kernels in its interpreter)

Stages run in priority order; each has a cost estimate and is skipped (and listed as skipped) when it
would overrun ``--budget`` seconds, so the run fits its slot (8 minutes by default). Results are written
after every stage (``gpu_<card>_<date>.json`` and ``.md``), so a run cut short keeps what it measured.

1. Header (card, versions, commit) and ceilings measured in this run (copy bandwidth, bf16 GEMM).
2. Parity (TF32 off): engine eager and CUDA-graph replay vs the reference fp32 at B=3 (padded video and
   text) and B=1; the bf16 engine vs the reference fp32 and vs the reference under the same autocast.
3. Latency B=1 (T=75, N=32) and throughput B=256, bf16 and fp32 with TF32: reference eager, engine
   eager, engine + CUDA graph; later the compiled engine (``compile="model"``), with and without the graph.
   Device kernels per B=1 bf16 forward (torch.profiler, kernels only) for the eager and the compiled engine.
4. A B=32 training step: reference eager loop vs ``engine.train.train_step`` eager and under
   ``torch.compile(dynamic=True)`` (what ``python -m engine.train --compile`` runs).
5. AOTInductor package (``export.backends.export_aoti`` on CUDA) vs the compiled engine.
6. The Triton kernels (``bench.gpu_kernels``) and the CUDA-only pytest cases, when time is left.

Timing: ``bench.timing.round_robin`` — variants rotate within each round (ABAB for two), CUDA synchronised
around each timed call (so B=1 numbers are the latency a caller sees, launch overhead included),
median over rounds and per-round ratios against the reference (``speedup`` = reference / variant).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from bench.engine_cases import random_model, reference_forward, training_case
from bench.gpu_kernels import ceilings, header, rel, save, title_lines
from bench.timing import round_robin
from export.model import example_inputs
from reference import LDDETRConfig

GOALS = {  # issue #5 / #7 goals on an H100 (ms, videos/s)
    "latency_b1_bf16_ms": 0.20,
    "latency_b1_tf32_ms": 0.40,
    "throughput_b256_bf16_vps": 250_000,
    "train_step_b32_compiled_ms": 3.0,
    "kernels_b1_bf16": 150,  # issue #12: device kernels per B=1 forward (the profile stages)
}
KEYS = ("pred_logits", "pred_spans", "saliency_scores")


@contextlib.contextmanager
def precision(mode: str):
    """'ieee': no TF32 anywhere (parity); 'tf32': TF32 matmuls and convolutions (the usual fp32 setting)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    on = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def out_rel(out: dict, ref: dict, valid) -> dict:
    """Relative error per output; saliency on valid clips only (padded entries are not meaningful)."""
    errs = {k: rel(out[k].float(), ref[k].float()) for k in ("pred_logits", "pred_spans")}
    errs["saliency_scores"] = rel(out["saliency_scores"].float()[valid], ref["saliency_scores"].float()[valid])
    return errs



def device_kernels(events) -> list:
    """The device kernels among profiler ``key_averages()`` events: CUDA-side events only. The aten op that
    launched a kernel also carries (self) device time in some torch versions, so counting every event with
    device time counts most kernels twice; ``part::`` ranges are the per-module markers."""
    from torch.autograd import DeviceType

    def self_dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    return [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and self_dev(e) > 0
            and not e.key.startswith("part::")]

class Run:
    def __init__(self, args):
        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.smoke = args.smoke
        self.t0 = time.time()
        self.res = dict(header=header(self.device), ceilings={}, parity=[], timing=[], goals=[], stages=[],
                        skipped=[], errors=[], warnings=[], budget_s=args.budget)
        self.state: dict = {}  # objects shared between stages (built engines)
        if self.smoke:
            self.cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=34, t_feat_dim=24, queue_length=64)
            self.t, self.n, self.big, self.rounds = 12, 6, 4, 2
        else:
            self.cfg = LDDETRConfig.preset("qvhighlights", queue_length=1024)  # the queue is unused at inference
            self.t, self.n, self.big, self.rounds = 75, 32, 256, args.rounds
        torch.manual_seed(0)
        self.model = random_model(self.cfg, self.device)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def stage(self, name: str, estimate_s: float, job) -> None:
        elapsed = time.time() - self.t0
        if elapsed + estimate_s > self.args.budget:
            self.res["skipped"].append(f"{name} (needs ~{estimate_s:.0f} s, {self.args.budget - elapsed:.0f} s left)")
            print(f"[{name}] skipped: {self.res['skipped'][-1]}", flush=True)
            return
        t = time.time()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                job()
            for w in caught:  # e.g. a CUDA-graph capture that fell back to eager
                if issubclass(w.category, RuntimeWarning) or "graph" in str(w.message).lower():
                    self.res["warnings"].append(f"{name}: {w.message}")
                    print(f"  warning: {w.message}", flush=True)
        except Exception:  # noqa: BLE001 - record and go on: one failure must not lose the other results
            self.res["errors"].append(f"{name}: {traceback.format_exc()}")
            print(self.res["errors"][-1], flush=True)
        self.res["stages"].append(dict(stage=name, wall_s=round(time.time() - t, 1), estimate_s=estimate_s))
        print(f"[{name}] {time.time() - t:.1f}s (total {time.time() - self.t0:.0f}s)", flush=True)
        self.res["wall_s"] = time.time() - self.t0
        self.write(quiet=True)

    def inputs(self, batch: int, seed: int = 0):
        return example_inputs(self.cfg, batch, self.t, self.n, seed=seed, device=self.device)

    def engine(self, dtype, **kw):
        from engine.inference import build

        return build(self.model, device=self.device, dtype=dtype, **kw)

    def time(self, stage: str, fns: dict, *, batch: int, dtype: str, rounds: int, calls: int = 1, extra=None) -> dict:
        res = round_robin(fns, rounds=rounds, calls=calls, baseline="reference" if "reference" in fns else None)
        for name, r in res.items():
            row = dict(stage=stage, variant=name, dtype=dtype, batch=batch, T=self.t, N=self.n,
                       median_ms=r["median_s"] * 1e3, p10_ms=r["p10_s"] * 1e3, p90_ms=r["p90_s"] * 1e3,
                       videos_per_s=batch / r["median_s"], rounds=rounds, calls=calls, **(extra or {}))
            if "ratio_median" in r:
                row.update(speedup=1 / r["ratio_median"], speedup_p10=1 / r["ratio_p90"], speedup_p90=1 / r["ratio_p10"])
            self.res["timing"].append(row)
            print(f"  {stage:<22} {name:<24} {dtype:<5} B{batch:<4} {row['median_ms']:9.3f} ms "
                  f"({row['p10_ms']:.3f}-{row['p90_ms']:.3f})  {row.get('speedup', float('nan')):5.2f}x", flush=True)
        return res

    def goal(self, name: str, measured: float, variant: str) -> None:
        target = GOALS[name]
        met = measured >= target if name.endswith("_vps") else measured <= target
        self.res["goals"].append(dict(goal=name, target=target, measured=measured, variant=variant, met=met,
                                      card=self.res["header"]["card"]))

    def best(self, stage: str, dtype: str, batch: int, prefix: str = "engine") -> tuple[str, float]:
        rows = [r for r in self.res["timing"] if r["stage"] == stage and r["dtype"] == dtype and r["batch"] == batch
                and r["variant"].startswith(prefix)]
        r = min(rows, key=lambda r: r["median_ms"])
        return r["variant"], r["median_ms"]

    # -- stages ----------------------------------------------------------------------------------------------
    def parity(self) -> None:
        with precision("ieee"):
            cases = [(3, 0), (1, 1)]
            # the Triton conv kernel in tf32x3 (fp32-accurate; its "ieee" FMA variant at d=256 compiles slowly)
            prec = "tf32x3" if self.device == "cuda" else "auto"
            engines = {"engine": self.engine(torch.float32, cuda_graphs=False, precision=prec),
                       "engine_graph": self.engine(torch.float32, cuda_graphs=self.device == "cuda",
                                                   precision=prec)}
            bf16 = {"engine_bf16": self.engine(torch.bfloat16, cuda_graphs=False),
                    "engine_bf16_graph": self.engine(torch.bfloat16, cuda_graphs=self.device == "cuda")}
            for batch, seed in cases:
                x = self.inputs(batch, seed=10 + seed)
                ref = reference_forward(self.model, x)()
                ref16 = reference_forward(self.model, x, torch.bfloat16)()
                for name, eng in engines.items():
                    for _ in range(2):  # the second call replays the graph
                        out = eng(*x)
                    self._parity_row(name, "fp32", batch, out_rel(out, ref, x[1]), 1e-4)
                for name, eng in bf16.items():
                    for _ in range(2):
                        out = eng(*x)
                    errs = out_rel(out, ref, x[1])
                    own = out_rel(ref16, ref, x[1])  # the reference's own bf16 error, for context
                    self._parity_row(name, "bf16", batch, errs, 1e-2, context={k: round(v, 6) for k, v in own.items()},
                                     check=("pred_spans",))

    def _parity_row(self, name, dtype, batch, errs, tol, context=None, check=KEYS) -> None:
        ok = all(errs[k] <= tol for k in check) and all(e == e for e in errs.values())
        self.res["parity"].append(dict(what=name, dtype=dtype, batch=batch, rel=errs, tol=tol, checked=list(check),
                                       reference_bf16_rel=context, ok=ok))
        print(f"  parity {name:<20} {dtype} B{batch}: " + " ".join(f"{k} {v:.2e}" for k, v in errs.items())
              + f"  tol {tol:.0e} {'ok' if ok else 'FAIL'}", flush=True)

    def latency_eager(self, dtype: str) -> None:
        dt_ = torch.bfloat16 if dtype == "bf16" else torch.float32
        with precision("tf32"):
            x = self.inputs(1)
            eng, graph = self.engine(dt_, cuda_graphs=False), self.engine(dt_)
            self.state[f"engine_graph_{dtype}"] = graph
            self.time("latency_b1", {"reference": reference_forward(self.model, x, dt_), "engine": lambda: eng(*x),
                                     "engine_graph": lambda: graph(*x)}, batch=1, dtype=dtype, rounds=4 * self.rounds,
                      extra=dict(graphs_captured=graph.num_graphs))

    def profile(self, dtype: str = "bf16", compiled: bool = False) -> None:
        """Where the B=1 GPU time goes: torch.profiler over engine calls, device kernels grouped by name; for the
        eager engine also by the model's top-level components (record_function ranges from forward hooks). With
        ``compiled`` the compiled engine of the ``compiled_b1_<dtype>`` stage, without its CUDA graph (inductor's
        fused kernels counted one by one; the hooks are left out, they would retrace the compiled forward)."""
        from torch.profiler import ProfilerActivity, profile, record_function

        dt_ = torch.bfloat16 if dtype == "bf16" else torch.float32
        key = "profile_compiled" if compiled else "profile"
        handles, stack = [], []
        if compiled:
            if f"compiled_{dtype}_1" not in self.state:  # that stage was skipped (budget, --only) or failed
                self.res["skipped"].append(f"profile_compiled_b1_{dtype} (no compiled engine: compiled_b1_{dtype} "
                                           "did not run)")
                print(f"  {self.res['skipped'][-1]}", flush=True)
                return
            eng = self.state[f"compiled_{dtype}_1"][0]
        else:
            eng = self.engine(dt_, cuda_graphs=False)
            model = eng.model
            parts = list(model.named_children())  # the fused model's components (engine.fused)
            parts += [(f"fuser.{n}", m) for n, m in model.fuser.named_children()]
            for name, mod in parts:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, name=name: stack.append(record_function("part::" + name).__enter__())))
                handles.append(mod.register_forward_hook(lambda m, a, o: stack.pop().__exit__(None, None, None)))
        x = self.inputs(1, seed=3) if compiled else self.inputs(1)  # the compiled stage's shapes: no recompile
        with precision("tf32"):
            for _ in range(3):
                eng(*x)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    eng(*x)
                if self.device == "cuda":
                    torch.cuda.synchronize()
        for h in handles:
            h.remove()
        ev = prof.key_averages()
        dev = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)  # noqa: E731
        self_dev = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
        kernels = sorted(device_kernels(ev), key=self_dev, reverse=True)
        total = sum(self_dev(e) for e in kernels) / 5
        n_kernels = sum(e.count for e in kernels if self_dev(e) > 0) / 5
        top = [dict(name=e.key[:90], calls_per_forward=e.count / 5, us_per_forward=self_dev(e) / 5) for e in kernels[:25]]
        comps = [dict(part=e.key[6:], calls=e.count / 5, device_us_per_forward=dev(e) / 5, cpu_us_per_forward=
                      e.cpu_time_total / 5) for e in ev if e.key.startswith("part::")]
        self.res[key] = dict(dtype=dtype, batch=1, device_us_per_forward=total, kernels_per_forward=n_kernels,
                             top=top, parts=sorted(comps, key=lambda c: -c["device_us_per_forward"]))
        what = "compiled engine" if compiled else "eager engine"
        print(f"  {key} B1 {dtype} ({what}): {total:.0f} us device time, {n_kernels:.0f} device kernels per forward",
              flush=True)
        for c in self.res[key]["parts"]:
            print(f"    {c['part']:<48} {c['device_us_per_forward']:8.1f} us  cpu {c['cpu_us_per_forward']:8.1f} us")
        for t in top[:12]:
            print(f"    {t['name']:<70} x{t['calls_per_forward']:<5.0f} {t['us_per_forward']:8.1f} us")

    def throughput_eager(self, dtype: str) -> None:
        dt_ = torch.bfloat16 if dtype == "bf16" else torch.float32
        with precision("tf32"):
            x = self.inputs(self.big)
            eng, graph = self.engine(dt_, cuda_graphs=False), self.engine(dt_, graph_max_batch=max(self.big, 256))
            self.time("throughput", {"reference": reference_forward(self.model, x, dt_), "engine": lambda: eng(*x),
                                     "engine_graph": lambda: graph(*x)}, batch=self.big, dtype=dtype,
                      rounds=self.rounds, calls=3, extra=dict(graphs_captured=graph.num_graphs))

    def compiled(self, dtype: str, batch: int) -> None:
        """The compiled engine (whole forward, fullgraph, static buckets), with and without the CUDA graph,
        next to the reference and the eager engine + graph; parity against the eager engine first."""
        dt_ = torch.bfloat16 if dtype == "bf16" else torch.float32
        torch._dynamo.reset()
        stage = "latency_b1" if batch == 1 else "throughput"
        with precision("tf32"), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            x = self.inputs(batch, seed=3)
            backend = self.args.compile_backend
            comp = self.engine(dt_, compile="model", cuda_graphs=False, compile_backend=backend)
            comp_graph = self.engine(dt_, compile="model", graph_max_batch=max(batch, 32), compile_backend=backend)
            eager = self.engine(dt_, cuda_graphs=False)
            t = time.time()
            out = comp(*x)
            compile_s = time.time() - t
            t = time.time()
            out_g = comp_graph(*x)
            out_g = comp_graph(*x)
            compile_graph_s = time.time() - t
            ref = eager(*x)
            # against the eager engine at the same dtype: two bf16 / TF32 computations, so the spans are checked
            # (as for bf16 above); the logits and the near-cancelling saliency are reported
            tol = 1e-2 if dtype == "bf16" else 5e-3
            for name, o in ((f"engine_compiled B{batch}", out), (f"engine_compiled_graph B{batch}", out_g)):
                self._parity_row(name + " vs eager engine", dtype, batch, out_rel(o, ref, x[1]), tol,
                                 check=("pred_spans",))
            fns = {"reference": reference_forward(self.model, x, dt_), "engine": lambda: eager(*x),
                   "engine_compiled": lambda: comp(*x), "engine_compiled_graph": lambda: comp_graph(*x)}
            if batch <= 32:
                graph = self.engine(dt_)
                fns["engine_graph"] = lambda: graph(*x)
            self.state[f"compiled_{dtype}_{batch}"] = comp, comp_graph
            self.time(stage, fns, batch=batch, dtype=dtype, rounds=(4 if batch == 1 else 1) * self.rounds,
                      calls=1 if batch == 1 else 3,
                      extra=dict(compile_s=round(compile_s, 1), compile_graph_s=round(compile_graph_s, 1),
                                 graphs_captured=comp_graph.num_graphs))

    def training(self, compiled: bool, amp: str = "off") -> None:
        batch, clips = (2, 12) if self.smoke else (32, 75)
        with precision("tf32"):
            case = training_case(batch, clips, self.device, queue_length=64 if self.smoke else 65536, amp=amp,
                                 real_dims=not self.smoke, compile_backend=self.args.compile_backend)
            fns = {"reference": case.reference_step, "engine": case.engine_step}
            extra = {}
            if compiled:
                torch._dynamo.reset()
                step = case.compiled_step()
                t = time.time()
                step(), step()
                if self.device == "cuda":
                    torch.cuda.synchronize()
                extra["compile_s"] = round(time.time() - t, 1)
                fns["engine_compiled"] = step
            self.time("train_step" + ("_compiled" if compiled else ""), fns, batch=batch,
                      dtype="bf16" if amp == "bf16" else "tf32", rounds=self.rounds, extra=extra)

    def aoti(self) -> None:
        """AOTInductor package on this device (dynamic batch + text, T=75 static) vs the compiled engine."""
        from engine import save_checkpoint
        from export.backends import export_aoti
        from export.model import prepare

        with precision("tf32"), tempfile.TemporaryDirectory() as tmp:
            ckpt = save_checkpoint(self.model, Path(tmp) / "m.pt")
            prepared = prepare(ckpt, device=self.device)
            t = time.time()
            pkg = export_aoti(prepared, Path(tmp) / "m.pt2", dynamic=True, max_video_len=self.t, text_len=self.n)
            build_s = time.time() - t
            compiled_pkg = torch._inductor.aoti_load_package(str(pkg))
            for batch in (1, 32) if not self.smoke else (1, 2):
                x = self.inputs(batch, seed=5)

                def aoti_run(x=x):
                    with torch.no_grad():
                        return compiled_pkg(*x)

                got, ref = aoti_run(), prepared.module(*x)
                errs = {k: rel(g.float(), r.float()) for k, g, r in zip(KEYS, got, ref)}
                errs["saliency_scores"] = rel(got[2][x[1]], ref[2][x[1]])
                self._parity_row(f"aoti B{batch}", "tf32", batch, errs, 5e-4)
                fns = {"reference": reference_forward(self.model, x), "aoti": aoti_run}
                eager = self.engine(torch.float32, cuda_graphs=False)
                fns["engine"] = lambda e=eager, x=x: e(*x)
                if f"compiled_tf32_{batch}" in self.state:
                    comp, comp_graph = self.state[f"compiled_tf32_{batch}"]
                    fns["engine_compiled"] = lambda x=x: comp(*x)
                    fns["engine_compiled_graph"] = lambda x=x: comp_graph(*x)
                self.time("aoti", fns, batch=batch, dtype="tf32", rounds=(4 if batch == 1 else 1) * self.rounds,
                          extra=dict(aoti_build_s=round(build_s, 1)))

    def kernels(self) -> None:
        from bench import gpu_kernels
        from bench.kernel_cases import conv_stack_case

        rows = gpu_kernels._queue_rows(2, self.device, self.smoke)
        for batch in (1, 32, 256) if not self.smoke else (1,):
            rows += gpu_kernels.time_case(conv_stack_case(batch, self.t, device=self.device, providers=(
                "reference", "reference_bf16", "triton_tf32", "triton_bf16")), 2, baseline="reference")
        self.res["kernels"] = rows

    def pytest_gpu(self) -> None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py", "-k", "cuda_graph",
               "bench/test_kernels.py", "--benchmark-disable"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        self.res["pytest_gpu"] = dict(rc=p.returncode, tail=tail)
        print("\n".join(tail), flush=True)
        if p.returncode not in (0, 5):
            raise RuntimeError(f"GPU pytest failed (rc {p.returncode})")

    def goals(self) -> None:
        for dtype, goal in (("bf16", "latency_b1_bf16_ms"), ("tf32", "latency_b1_tf32_ms")):
            with contextlib.suppress(ValueError):
                self.goal(goal, *reversed(self.best("latency_b1", dtype, 1)))
        with contextlib.suppress(ValueError):
            name, ms = self.best("throughput", "bf16", self.big)
            self.goal("throughput_b256_bf16_vps", self.big / ms * 1e3, name)
        with contextlib.suppress(ValueError):
            name, ms = self.best("train_step_compiled", "tf32", 2 if self.smoke else 32, prefix="engine_compiled")
            self.goal("train_step_b32_compiled_ms", ms, name)
        counts = [(self.res[k]["kernels_per_forward"], name) for k, name in
                  (("profile", "engine"), ("profile_compiled", "engine_compiled")) if k in self.res]
        if counts and self.device == "cuda":  # the CPU smoke run records no device kernels
            self.goal("kernels_b1_bf16", *min(counts))

    # -- output ----------------------------------------------------------------------------------------------
    def write(self, quiet: bool = False) -> None:
        res, h, c = self.res, self.res["header"], self.res["ceilings"]
        lines = title_lines("Engine, training and export", h)
        if c:
            lines.append(f"Ceilings in this run: copy {c['copy_GBps']:.0f} GB/s, bf16 GEMM {c['gemm_bf16_TFLOPs']:.0f} TFLOP/s.")
        lines += [f"Shapes: QVHighlights preset, T={self.t} clips, N={self.n} tokens, padded samples in every batch "
                  f"of more than one. Timing: round-robin, synchronised per call, median (p10–p90); speed-up = "
                  f"reference time / variant time per round, median.", "",
                  "| stage | variant | dtype | B | median ms | p10–p90 ms | videos/s | speed-up vs reference |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["timing"]:
            sp = f"{r['speedup']:.2f}× ({r['speedup_p10']:.2f}–{r['speedup_p90']:.2f})" if "speedup" in r else ""
            lines.append(f"| {r['stage']} | {r['variant']} | {r['dtype']} | {r['batch']} | {r['median_ms']:.3f} | "
                         f"{r['p10_ms']:.3f}–{r['p90_ms']:.3f} | {r['videos_per_s']:,.0f} | {sp} |")
        if res["goals"]:
            lines += ["", "| goal | target | measured | by | met |", "|---|---|---|---|---|"]
            for g in res["goals"]:
                lines.append(f"| {g['goal']} | {g['target']:g} | {g['measured']:.4g} | {g['variant']} | "
                             f"{'yes' if g['met'] else 'no'} |")
        lines += ["", "| parity | dtype | B | rel. error (logits / spans / saliency) | tolerance | ok |",
                  "|---|---|---|---|---|---|"]
        for p in res["parity"]:
            e = p["rel"]
            lines.append(f"| {p['what']} | {p['dtype']} | {p['batch']} | {e['pred_logits']:.1e} / {e['pred_spans']:.1e} "
                         f"/ {e['saliency_scores']:.1e} | {p['tol']:.0e} ({', '.join(p['checked'])}) | "
                         f"{'yes' if p['ok'] else 'NO'} |")
        compile_rows = [r for r in res["timing"] if "compile_s" in r or "aoti_build_s" in r]
        seen = set()
        for r in compile_rows:
            key = (r["stage"], r["dtype"], r["batch"])
            if key not in seen:
                seen.add(key)
                lines.append(f"\nCompile time {key}: " + ", ".join(f"{k} {r[k]} s" for k in
                                                                   ("compile_s", "compile_graph_s", "aoti_build_s") if k in r))
        if res["skipped"]:
            lines += ["", "Skipped: " + "; ".join(res["skipped"])]
        if res["warnings"]:
            lines += ["", "Warnings:", ""] + [f"    {w}" for w in res["warnings"]]
        save(res, lines, self.args.out, "gpu", quiet)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--budget", type=float, default=480.0, help="seconds; stages that would overrun are skipped")
    p.add_argument("--rounds", type=int, default=10, help="rounds per timing (x4 for the B=1 latency)")
    p.add_argument("--compile-backend", default=None, help="default: inductor (eager with --smoke)")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, times nothing useful")
    args = p.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.smoke else "inductor"
    if not torch.cuda.is_available() and not args.smoke:
        print("bench.gpu needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        # the smoke run on a CPU: the Triton kernel rows run in Triton's interpreter (it must be set before
        # triton is imported; without it the kernels stage failed with KernelInputError)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run = Run(args)
    print(json.dumps(run.res["header"], indent=1), flush=True)
    stages = [  # (name, estimated seconds, job) in priority order
        ("ceilings", 10, lambda: run.res["ceilings"].update(ceilings(run.device, args.smoke))),
        ("parity", 25, run.parity),
        ("latency_b1_bf16", 10, lambda: run.latency_eager("bf16")),
        ("latency_b1_tf32", 10, lambda: run.latency_eager("tf32")),
        ("throughput_bf16", 15, lambda: run.throughput_eager("bf16")),
        ("profile_b1_bf16", 15, lambda: run.profile("bf16")),
        ("train_step", 25, lambda: run.training(compiled=False)),
        ("compiled_b1_bf16", 80, lambda: run.compiled("bf16", 1)),
        ("profile_compiled_b1_bf16", 10, lambda: run.profile("bf16", compiled=True)),
        ("compiled_b1_tf32", 70, lambda: run.compiled("tf32", 1)),
        ("train_step_compiled", 120, lambda: run.training(compiled=True)),
        ("aoti", 120, run.aoti),
        ("compiled_b256_bf16", 70, lambda: run.compiled("bf16", run.big)),
        ("throughput_tf32", 15, lambda: run.throughput_eager("tf32")),
        ("kernels", 60, run.kernels),
        ("pytest_gpu", 60, run.pytest_gpu),
    ]
    only = set(args.only.split(",")) if args.only else None
    for name, est, job in stages:
        if only is None or name in only:
            run.stage(name, est, job)
    run.goals()
    run.write()
    bad_parity = [p["what"] for p in run.res["parity"] if not p["ok"]]
    return 1 if run.res["errors"] or bad_parity else 0

if __name__ == "__main__":
    sys.exit(main())

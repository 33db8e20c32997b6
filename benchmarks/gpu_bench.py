"""The GPU timings of `gpu_check.sh`: pallas, cudnn, xla and blocked at bf16, H=128, T=8192.

    python benchmarks/gpu_bench.py --out results.txt              # on the GPU (about 2 min)
    python benchmarks/gpu_bench.py --tiny --out /tmp/tiny.txt      # a CPU dry run (interpret)

B=1, N=16, T=S=8192, bfloat16, forward and forward+backward, causal and not, and a mask of 16
equal documents (a dense mask for xla/cudnn, `document_mask_mod` for blocked; pallas takes
neither a dense mask nor a mask_mod over arrays, so its row says so). In each configuration
every implementation and the 8192³ bf16 matmul that sets the ceiling are compiled, then
called in alternation (`flaxattn.bench.time_interleaved`), so ratios compare calls made under
the same conditions. Each row: median ms, TFLOP/s, the fraction of the measured matmul
throughput, the ratio to cuDNN, and the max error of the output against xla's in float32.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import flaxattn
from flaxattn.bench import attention_flops, compiled_call, square_matmul, time_interleaved
from flaxattn.kernels import document_mask_mod

IMPLEMENTATIONS = ("pallas", "cudnn", "xla", "blocked")


def _attention(impl: str, causal: bool, documents: int, T: int):
    """`f(q, k, v) -> out` for one implementation, or the reason it cannot run."""
    if documents:
        ids = jnp.arange(T) // (T // documents)
        if impl in ("xla", "cudnn"):
            mask = (ids[:, None] == ids[None, :])[None, None]
            return lambda q, k, v: flaxattn.dot_product_attention(
                q, k, v, mask=mask, is_causal=causal, implementation=impl)  # fmt: skip
        if impl == "pallas":
            return "pallas takes no dense mask and no mask_mod over arrays (issue 13)"
        mod = document_mask_mod(ids)
        return lambda q, k, v: flaxattn.dot_product_attention(
            q, k, v, mask_mod=mod, is_causal=causal, implementation=impl)  # fmt: skip
    return lambda q, k, v: flaxattn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl)  # fmt: skip


def _with_backward(fn, dout):
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(dout)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the report (text + JSON lines)")
    parser.add_argument("--tiny", action="store_true", help="T=256, N=2, H=64: a CPU dry run")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    B, N, H, T, matmul = (1, 2, 64, 256, 256) if args.tiny else (1, 16, 128, 8192, 8192)
    dtype = jnp.bfloat16
    r = np.random.default_rng(0)
    q, k, v, dout = (jnp.asarray(r.standard_normal((B, T, N, H)), dtype) for _ in range(4))
    a = jnp.asarray(r.standard_normal((matmul, matmul)), dtype)
    device = jax.devices()[0]
    lines = [f"# gpu_bench.py{' --tiny' if args.tiny else ''}: {device.device_kind} "
             f"({jax.default_backend()}), jax {jax.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"B={B} N={N} H={H} T=S={T} bfloat16, median of {args.repeats} interleaved "
             "calls"]  # fmt: skip
    records = []
    # The CPU dry run (--tiny) checks the code paths: unmasked and documents, causal only.
    for documents in (0, 16):
        for causal in (True,) if args.tiny else (False, True):
            for backward in (False, True):
                calls, refused = {}, {}
                calls["matmul"] = compiled_call(square_matmul, a)[0]
                outputs = {}
                for impl in IMPLEMENTATIONS:
                    fn = _attention(impl, causal, documents, T)
                    if isinstance(fn, str):
                        refused[impl] = fn
                        continue
                    try:
                        outputs[impl] = np.asarray(jax.jit(fn)(q, k, v), np.float32)
                        run = _with_backward(fn, dout) if backward else fn
                        calls[impl] = compiled_call(run, q, k, v)[0]
                    except Exception as err:  # recorded, not fatal: the point is to learn
                        refused[impl] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                timings = time_interleaved(calls, repeats=args.repeats)
                peak = 2 * matmul**3 / timings.pop("matmul").median
                flops = attention_flops(B, N, T, T, H, causal=causal, backward=backward)
                if documents:  # the work a mask that skips hidden blocks would do
                    flops /= documents
                cudnn = timings.get("cudnn")
                what = (f"{'16 documents, ' if documents else ''}{'causal' if causal else 'full'}"
                        f", {'fwd+bwd' if backward else 'fwd'}")  # fmt: skip
                counted = "; FLOPs of the visible 1/16 of the pairs" if documents else ""
                lines.append(f"\n{what}  (bf16 matmul ceiling {peak / 1e12:.0f} TFLOP/s{counted})")
                for impl in IMPLEMENTATIONS:
                    record = dict(implementation=impl, documents=documents, causal=causal,
                                  backward=backward, T=T, H=H, N=N,
                                  device=device.device_kind)  # fmt: skip
                    if impl in refused:
                        record["status"] = refused[impl]
                        lines.append(f"  {impl:8s} not run: {refused[impl]}")
                    else:
                        t = timings[impl].median
                        err = None
                        if "xla" in outputs and impl != "xla":
                            err = float(np.abs(outputs[impl] - outputs["xla"]).max())
                        record.update(status="ok", median_ms=t * 1e3, tflops=flops / t / 1e12,
                                      fraction_of_peak=flops / t / peak,
                                      vs_cudnn=None if cudnn is None else cudnn.median / t,
                                      max_abs_diff_vs_xla=err)  # fmt: skip
                        vs = "" if cudnn is None else f"  {cudnn.median / t:5.2f}x cudnn"
                        diff = "" if err is None else f"  |out - xla| {err:.1e}"
                        lines.append(f"  {impl:8s} {t * 1e3:9.2f} ms  {flops / t / 1e12:7.1f} "
                                     f"TFLOP/s  {flops / t / peak:5.1%} of peak"
                                     f"{vs}{diff}")  # fmt: skip
                    records.append(record)
                print("\n".join(lines[-len(IMPLEMENTATIONS) - 1:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n\n" + "\n".join(map(json.dumps, records)) + "\n")


if __name__ == "__main__":
    main()

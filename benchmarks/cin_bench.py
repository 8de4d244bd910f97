"""Micro-benchmark: vectorized ConditionalInstanceNorm vs MI-Seg's per-sample loop formulation.

MI-Seg's CIN loops over the batch in Python: sample i is normalised by ``norms[modality[i]]`` (a batch
of one) and the results are stacked. cinjax normalises the whole batch at once and gathers the
per-modality affine rows. Both are timed jitted, forward and forward+backward (gradients wrt the input
and both tables), median over repeats. ``--torch`` adds MI-Seg's own formulation in PyTorch (a
ModuleList of ``nn.InstanceNorm3d(affine=True)``, eager) for context.

    python -m benchmarks.cin_bench --out cin_bench.json [--torch]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cinjax.models.layers.norms import ConditionalInstanceNorm, instance_normalize

NUM_MODALITIES = 2


def per_sample_cin(x: jax.Array, modality: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """MI-Seg's formulation: one instance norm per sample with its modality's row, then stacked."""
    outs = []
    for i in range(x.shape[0]):
        y = instance_normalize(x[i : i + 1])
        outs.append(y * scale[modality[i]] + bias[modality[i]])
    return jnp.concatenate(outs, axis=0).astype(x.dtype)


def vectorized_cin(x: jax.Array, modality: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    return ConditionalInstanceNorm(NUM_MODALITIES).apply(
        {"params": {"scale": scale, "bias": bias}}, x, modality
    )


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _jax_timings(impl, x, modality, scale, bias, w, repeats):
    fwd = jax.jit(impl)
    loss = lambda x, s, b: jnp.sum(impl(x, modality, s, b) * w)  # noqa: E731
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return (
        _median_s(lambda: fwd(x, modality, scale, bias), repeats),
        _median_s(lambda: bwd(x, scale, bias), repeats),
    )


def _torch_timings(x, modality, scale, bias, w, repeats):
    import torch

    norms = torch.nn.ModuleList(
        torch.nn.InstanceNorm3d(x.shape[-1], affine=True) for _ in range(NUM_MODALITIES)
    )
    with torch.no_grad():
        for m, n in enumerate(norms):
            n.weight.copy_(torch.from_numpy(scale[m]))
            n.bias.copy_(torch.from_numpy(bias[m]))
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    wt = torch.from_numpy(np.moveaxis(w, -1, 1).copy())
    styles = [int(m) for m in modality]

    def forward(inp):
        return torch.cat([norms[s](inp[i : i + 1]) for i, s in enumerate(styles)], dim=0)

    def fwd():
        with torch.no_grad():
            return forward(xt)

    def fwd_bwd():
        inp = xt.clone().requires_grad_(True)
        norms.zero_grad()
        (forward(inp) * wt).sum().backward()
        return inp.grad

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timed(fwd), timed(fwd_bwd)


def run(batch_sizes, spatial, channels, repeats, with_torch) -> dict:
    rows = []
    for b in batch_sizes:
        rng = np.random.default_rng(b)
        x = rng.standard_normal((b, spatial, spatial, spatial, channels)).astype(np.float32)
        w = rng.standard_normal(x.shape).astype(np.float32)
        modality = (np.arange(b) % NUM_MODALITIES).astype(np.int32)
        scale = (1.0 + 0.1 * rng.standard_normal((NUM_MODALITIES, channels))).astype(np.float32)
        bias = (0.1 * rng.standard_normal((NUM_MODALITIES, channels))).astype(np.float32)
        args = [jnp.asarray(a) for a in (x, modality, scale, bias, w)]
        np.testing.assert_allclose(
            jax.jit(vectorized_cin)(*args[:4]), jax.jit(per_sample_cin)(*args[:4]), atol=1e-5
        )
        vec_f, vec_fb = _jax_timings(vectorized_cin, *args, repeats)
        loop_f, loop_fb = _jax_timings(per_sample_cin, *args, repeats)
        row = {
            "batch": b,
            "shape": [b, spatial, spatial, spatial, channels],
            "vectorized_fwd_ms": 1e3 * vec_f,
            "loop_fwd_ms": 1e3 * loop_f,
            "vectorized_fwd_bwd_ms": 1e3 * vec_fb,
            "loop_fwd_bwd_ms": 1e3 * loop_fb,
            "speedup_fwd": loop_f / vec_f,
            "speedup_fwd_bwd": loop_fb / vec_fb,
        }
        if with_torch:
            t_f, t_fb = _torch_timings(x, modality, scale, bias, w, repeats)
            row.update(torch_loop_fwd_ms=1e3 * t_f, torch_loop_fwd_bwd_ms=1e3 * t_fb)
        rows.append(row)
    return {
        "rows": rows,
        "repeats": repeats,
        "env": {
            "device_kind": jax.devices()[0].device_kind,
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "cpu_count": __import__("os").cpu_count(),
            "machine": platform.machine(),
        },
    }


def _table(result: dict) -> str:
    cols = [
        "batch",
        "vectorized_fwd_ms",
        "loop_fwd_ms",
        "speedup_fwd",
        "vectorized_fwd_bwd_ms",
        "loop_fwd_bwd_ms",
        "speedup_fwd_bwd",
    ]
    if "torch_loop_fwd_ms" in result["rows"][0]:
        cols += ["torch_loop_fwd_ms", "torch_loop_fwd_bwd_ms"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in result["rows"]:
        lines.append(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--spatial", type=int, default=32)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--torch", action="store_true", help="Also time MI-Seg's PyTorch loop (eager).")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    a = p.parse_args()
    result = run(a.batch_sizes, a.spatial, a.channels, a.repeats, a.torch)
    print(
        f"CIN on {result['env']['device_kind']} ({result['env']['backend']}), "
        f"{a.spatial}^3 x {a.channels} ch, median of {a.repeats}"
    )
    print(_table(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

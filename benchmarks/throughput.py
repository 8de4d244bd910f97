r"""Training and inference throughput of cinjax, and of MI-Seg's PyTorch formulation of the same cases.

    python -m benchmarks.throughput --config configs/bench.py[:cpu|gpu|tiny] [--reference torch] \
        [--out results.json] [--config.repeats=10 ...]

Every case of ``config.run`` (see ``configs/bench.py``) is built by the product's own builders
(:mod:`cinjax.build`: model, loss, optimizer, the train state and the jitted train step over
``cinjax.distributed.make_mesh()`` with replicated state, a batch sharded over ``"data"`` and the state
donated; the loader; the window predictor) and timed after ``warmup_steps`` untimed steps, as the median
of ``repeats`` (each ``steps_per_repeat`` steps, blocked at the end). Train modes:

* ``synthetic``: random device-resident batches, no I/O: the step alone.
* ``pipeline``: batches from the real grain loader (``make_train_loader``) over a cache of synthetic volumes;
  ``data_wait_share`` is the share of the step spent waiting for the loader.
* ``input_only``: the loader alone, crops/s, no model (the ``loader`` section).

FLOPs per step come from XLA's cost analysis of the step lowered with the loop-free lowerings (``lax`` convs,
``plain`` attention; :func:`loop_free_twin`): the CPU lowerings loop (kernel-gradient scans, depth chunks,
blocked attention), and the analysis counts a loop body once. Bytes accessed come from the compiled program.
MFU divides the achieved FLOP/s by the
device's dense peak for the compute dtype (``PEAK_FLOPS``; ``config.peak_tflops`` overrides it, e.g. for CPUs,
where it is null otherwise). Compile times: ``cold`` in a fresh persistent-cache directory, ``warm`` after
``jax.clear_caches()`` with the same directory (what a restarted run pays). Inference cases time
``cinjax.inference.sliding_window_inference`` over one whole volume for each ``windows_per_call``; the best is
the headline ``volumes_per_min``.

``--reference torch`` (``benchmarks/torch_reference.py``) times MI-Seg's formulation of each case in the same
process: on a GPU all of them first (before JAX takes the memory), on a CPU each right before its case
(``reference``) and again right after it (``reference_after``). ``ratio_vs_reference`` = cinjax / PyTorch
(crops/s, volumes/min), per case and in the headlines; on a GPU also ``reference_sync_free``. On a CPU the
train cases are also timed step by step in turn with the PyTorch step (``reference_interleaved``, its
``cinjax_step_s``, and ``ratio_vs_reference_interleaved``): the same-run ratio least moved by a drift of
the machine's speed, which on shared VMs changes within a minute. Parameter counts of both sides must
agree. Run as a command, the benchmark first restarts itself with glibc's huge-page tunable, as the
``cinjax`` CLI does (:mod:`cinjax.hostmem`); both sides run in that one process, and ``env.huge_pages``
says whether it was on (``CINJAX_HUGE_PAGES=0`` turns it off).

JSON: ``{"train": {crops_per_s, step_s, tflops_per_s, mfu, [reference, ratio_vs_reference]}, "inference":
{volumes_per_min, [reference, ratio_vs_reference]}, "loader": {crops_per_s, ...}, "env": {device_kind, jax,
...}, "cases": [every case in detail], "settings": {...}}``.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jaxlib
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from cinjax import build, distributed, hostmem, inference
from cinjax.config import base_config
from cinjax.data import pipeline
from cinjax.models.layers.attention import resolve_attention_impl
from cinjax.models.layers.conv import resolve_conv_impl

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/bench.py[:VARIANT].", lock_config=False)
_REFERENCE = flags.DEFINE_enum("reference", None, ["torch"], "Also time MI-Seg's PyTorch formulation.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
flags.mark_flags_as_required(["config"])

MODES = ("synthetic", "pipeline", "input_only")
# Config fields copied into the results.
SETTINGS = (
    "modes",
    "warmup_steps",
    "repeats",
    "steps_per_repeat",
    "inference_repeats",
    "windows_per_call",
    "peak_tflops",
)
# Dense peak FLOP/s per chip by compute dtype (bf16 tensor cores; fp32 matmuls run as TF32 on these GPUs).
# The first key contained in the device kind wins.
PEAK_FLOPS = {
    "bfloat16": (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)),
    "float32": (("H100 PCIe", 378e12), ("H100", 494.5e12), ("H200", 494.5e12), ("A100", 156e12)),
}


# ---------------------------------------------------------------------------------------- helpers


def peak_flops(
    device_kind: str, dtype: str, override_tflops: float | None = None
) -> tuple[float | None, str]:
    """The peak FLOP/s MFU is measured against, and where it came from (None when unknown, e.g. CPUs)."""
    if override_tflops:
        return float(override_tflops) * 1e12, "config.peak_tflops"
    for key, value in PEAK_FLOPS.get(dtype, ()):
        if key in device_kind:
            return value, f"table: {key} {dtype}"
    return None, "unknown"


def loop_free_twin(product: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The product config with the lowerings that have no loops (same maths, same parameters), whose
    lowered program XLA's cost analysis counts in full."""
    twin = ml_collections.ConfigDict(product.to_dict())
    twin.model.conv_impl = "lax"
    if "attention_impl" in twin.model:
        twin.model.attention_impl = "plain"
    return twin


def cost_of(compiled: Any) -> dict[str, float | None]:
    """FLOPs and bytes accessed of one call of a compiled or lowered program, from XLA's cost analysis (a
    dict, or a list of dicts)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, Sequence):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    analysis = analysis or {}
    flops, accessed = analysis.get("flops"), analysis.get("bytes accessed")
    return {
        "flops": float(flops) if flops else None,
        "bytes_accessed": None if accessed is None else float(accessed),
    }


def memory_of(compiled: Any) -> dict[str, int | None]:
    """Buffer sizes of the compiled program (empty where the backend gives none); ``estimated_peak_bytes`` is
    arguments + outputs + temporaries, less the aliased (donated) bytes."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        m = None
    if m is None:
        return {}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["estimated_peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of the first device so far in this process (None where unsupported, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class CacheEvents:
    """Counts JAX persistent-cache hits (to tell whether a warm compile was served from the cache)."""

    def __init__(self):
        self.hits = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1


def compile_timed(jitted: Any, args: Sequence[Any], cache: CacheEvents, warm: bool) -> tuple[Any, dict]:
    """Lower and compile ``jitted`` for ``args``: cold, then (``warm``) again after ``jax.clear_caches()``."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    info: dict[str, Any] = {
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "cold_s": done - start,
    }
    if warm:
        jax.clear_caches()
        hits = cache.hits
        start = time.perf_counter()
        jitted.lower(*args).compile()
        info["warm_s"] = time.perf_counter() - start
        info["warm_cache_hit"] = cache.hits > hits
    return compiled, info


def _rates(times: Sequence[float], crops: int, voxels: int, flops: float | None, peak: float | None) -> dict:
    step_s = statistics.median(times)
    achieved = flops / step_s if flops else None
    return {
        "step_s": step_s,
        "step_s_all": list(times),
        "crops_per_s": crops / step_s,
        "voxels_per_s": voxels / step_s,
        "tflops_per_s": achieved / 1e12 if achieved else None,
        "mfu": achieved / peak if achieved and peak else None,
    }


def env_report() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "huge_pages": hostmem.huge_pages_requested(),
        "xla_env": {
            k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_")) and k != "XLA_FLAGS"
        },
        "load_avg_start": os.getloadavg(),
    }


def product_config(
    case: ml_collections.ConfigDict, config: ml_collections.ConfigDict, num_steps: int = 1
) -> ml_collections.ConfigDict:
    """The ``cinjax.main`` config of a case: what :mod:`cinjax.build` builds the model, loss, optimizer,
    state, loader and train step from."""
    if case.dtype not in build.COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(build.COMPUTE_DTYPES)}, got {case.dtype!r}.")
    c = base_config()
    c.seed = config.seed
    c.model = case.model
    c.data.roi = tuple(case.roi)
    c.train.dtype = case.dtype
    c.train.num_steps = num_steps
    c.loss = config.loss
    c.optim = config.optim
    c.transforms = config.transforms
    c.loader.global_batch_size = case.get("batch_size", 1)
    c.loader.mode = config.loader.mode
    c.loader.num_workers = config.loader.num_workers
    c.loader.prefetch = config.loader.prefetch
    return c


def lowerings(model: Any) -> dict[str, str]:
    """The conv / attention lowerings the model runs here (``auto`` resolved)."""
    out = {"conv_impl": resolve_conv_impl(model.conv_impl)}
    if hasattr(model, "attention_impl"):
        out["attention_impl"] = resolve_attention_impl(model.attention_impl)
    return out


def _device_kind() -> str:
    return jax.devices()[0].device_kind


# ------------------------------------------------------------------------------------------ train


def synthetic_batches(
    case: ml_collections.ConfigDict, sharding: jax.sharding.Sharding, seed: int, count: int = 2
) -> list[dict[str, jax.Array]]:
    """Random device-resident batches like the loader's (uint8 labels, modalities 0, 1, 0, ...)."""
    rng = np.random.default_rng(seed)
    b, roi = case.batch_size, tuple(case.roi)
    batches = []
    for _ in range(count):
        batch = {
            "image": rng.standard_normal((b, *roi, 1), dtype=np.float32),
            "label": rng.integers(0, case.model.out_channels, (b, *roi), dtype=np.uint8),
            "modality": (np.arange(b) % case.model.num_modalities).astype(np.int32),
        }
        batches.append(jax.device_put(batch, sharding))
    return batches


def make_loader(
    records: Mapping[str, Sequence[Any]], product: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> pipeline.TrainLoader:
    """The product's training loader over the benchmark's cached volumes."""
    prepared = types.SimpleNamespace(records={"training": records})
    return build.make_train_loader(product, prepared, mesh)


def _synthetic_source(batches: Sequence[Any]) -> Callable[[], tuple[Any, float]]:
    it = itertools.cycle(batches)
    return lambda: (next(it), 0.0)


def _loader_source(loader: pipeline.TrainLoader) -> Callable[[], tuple[Any, float]]:
    def source() -> tuple[Any, float]:
        batch = next(loader)
        return batch, loader.last_wait_s

    return source


def time_steps(
    step: Callable,
    state: Any,
    next_batch: Callable[[], tuple[Any, float]],
    *,
    warmup: int,
    repeats: int,
    per_repeat: int,
) -> tuple[Any, list[float], list[float], dict[str, float]]:
    """Run ``warmup`` untimed then ``repeats`` timed groups of ``per_repeat`` steps; seconds per step of each
    group, data-wait seconds per step of each group, and the last step's metrics."""
    metrics = None
    for _ in range(warmup):
        state, metrics = step(state, next_batch()[0])
    jax.block_until_ready((state, metrics))
    times, waits = [], []
    for _ in range(repeats):
        wait = 0.0
        start = time.perf_counter()
        for _ in range(per_repeat):
            batch, wait_s = next_batch()
            wait += wait_s
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / per_repeat)
        waits.append(wait / per_repeat)
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not last["finite"]:
        raise FloatingPointError(f"The benchmarked train step gave a non-finite loss: {last}.")
    return state, times, waits, last


def time_interleaved(
    step: Callable,
    state: Any,
    batches: Sequence[Any],
    reference_step: Callable[[], None],
    *,
    warmup: int,
    repeats: int,
) -> tuple[Any, list[float], list[float]]:
    """Seconds of ``repeats`` cinjax steps and ``repeats`` reference steps, one of each in turn (after
    ``warmup`` of each): a drift of the machine's speed then reaches both sides alike."""
    for i in range(warmup):
        reference_step()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
    ours, theirs = [], []
    for i in range(repeats):
        start = time.perf_counter()
        reference_step()
        theirs.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        ours.append(time.perf_counter() - start)
    return state, ours, theirs


def time_loader(
    records: Mapping[str, Sequence[Any]],
    case: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    product: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    """Crops/s of the loader alone (host-local batches, no device work), median over ``repeats`` loaders."""
    lc = config.loader
    runs = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        loader = make_loader(records, product, mesh)
        loader.next_local()
        first = time.perf_counter() - start
        for _ in range(lc.warmup_batches - 1):
            loader.next_local()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(lc.batches):
            loader.next_local()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        loader.close()
        crops = case.batch_size * lc.batches
        runs.append(
            {"crops_per_s": crops / elapsed, "first_batch_s": first, "cpu_ms_per_crop": 1e3 * cpu / crops}
        )
    pick = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "crops_per_s": pick("crops_per_s"),
        "crops_per_s_all": [r["crops_per_s"] for r in runs],
        "first_batch_s": pick("first_batch_s"),
        "cpu_ms_per_crop": pick("cpu_ms_per_crop"),
        "batch_size": case.batch_size,
        "roi": list(case.roi),
        "volume_shape": list(lc.volume_shape),
        "num_workers": lc.num_workers,
        "prefetch": lc.prefetch,
        "batches": lc.batches,
    }


def run_train_case(
    name: str,
    case: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    records: Callable[[], Mapping[str, Sequence[Any]]],
    cache: CacheEvents,
    reference_step: tuple[Callable[[], None], int] | None = None,
) -> dict[str, Any]:
    """Compile, time and describe one train case in every mode of ``config.modes``; with
    ``reference_step`` (a PyTorch step and its parameter count) also step by step interleaved with it."""
    data_sharding = distributed.data_sharding(mesh)
    b, roi = case.batch_size, tuple(case.roi)
    if b % mesh.size:
        raise ValueError(f"{name}: batch_size={b} must be a multiple of the {mesh.size} devices.")
    total_steps = len(config.modes) * (config.warmup_steps + config.repeats * config.steps_per_repeat)
    product = product_config(case, config, max(1, total_steps))
    model = build.make_model(product)
    tx, _ = build.make_optimizer(product)
    init, _ = build.make_init(product, model, tx, mesh)
    start = time.perf_counter()
    state = jax.block_until_ready(init())
    init_s = time.perf_counter() - start
    batches = synthetic_batches(case, data_sharding, config.seed)
    train_step = build.make_train_step(model, tx, build.make_loss(product), mesh)
    compiled, compile_info = compile_timed(train_step, (state, batches[0]), cache, config.compile_times)
    compile_info["init_s"] = init_s
    cost = cost_of(compiled)
    twin = loop_free_twin(product)
    twin_model = build.make_model(twin)
    twin_step = build.make_train_step(twin_model, tx, build.make_loss(twin), mesh)
    cost["flops"] = cost_of(twin_step.lower(state, batches[0]))["flops"]
    peak, peak_source = peak_flops(_device_kind(), case.dtype, config.peak_tflops)
    result: dict[str, Any] = {
        "name": name,
        "kind": "train",
        "model": case.model.name,
        "params": sum(int(x.size) for x in jax.tree.leaves(state.params)),
        "batch_size": b,
        "roi": list(roi),
        "dtype": case.dtype,
        "devices": mesh.size,
        "flops_per_step": cost["flops"],
        "bytes_accessed_per_step": cost["bytes_accessed"],
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        "lowerings": lowerings(model),
        "compile": compile_info,
        "memory": memory_of(compiled),
    }
    timing = dict(warmup=config.warmup_steps, repeats=config.repeats, per_repeat=config.steps_per_repeat)
    voxels = b * math.prod(roi)
    for mode in config.modes:
        if mode == "synthetic":
            state, times, _, last = time_steps(compiled, state, _synthetic_source(batches), **timing)
            result["synthetic"] = dict(_rates(times, b, voxels, cost["flops"], peak), loss=last["loss"])
        elif mode == "pipeline":
            loader = make_loader(records(), product, mesh)
            state, times, waits, last = time_steps(compiled, state, _loader_source(loader), **timing)
            loader.close()
            result["pipeline"] = dict(
                _rates(times, b, voxels, cost["flops"], peak),
                loss=last["loss"],
                data_wait_s=statistics.median(waits),
                data_wait_share=sum(waits) / sum(times),
            )
        elif mode == "input_only":
            result["input_only"] = time_loader(records(), case, config, product, mesh)
        else:
            raise ValueError(f"Unknown mode {mode!r}; expected some of {MODES}.")
    if reference_step is not None:
        ref_step, ref_params = reference_step
        if ref_params != result["params"]:
            raise ValueError(
                f"{name}: the PyTorch reference has {ref_params:,} parameters, cinjax {result['params']:,}: "
                "not the same model."
            )
        state, ours, theirs = time_interleaved(
            compiled, state, batches, ref_step, warmup=config.warmup_steps, repeats=config.repeats
        )
        ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
        result["reference_interleaved"] = {
            "crops_per_s": b / theirs_s,
            "step_s": theirs_s,
            "step_s_all": theirs,
            "cinjax_step_s": ours_s,
            "cinjax_step_s_all": ours,
        }
        result["ratio_vs_reference_interleaved"] = theirs_s / ours_s
    headline = next((result[m] for m in ("synthetic", "pipeline") if m in result), {})
    result.update({k: headline[k] for k in ("crops_per_s", "step_s", "tflops_per_s", "mfu") if k in headline})
    result["memory"]["device_peak_bytes_in_use"] = device_peak_bytes()
    return result


# -------------------------------------------------------------------------------------- inference


def time_volume(
    predict_fn: Callable,
    volume: np.ndarray,
    case: ml_collections.ConfigDict,
    windows_per_call: int,
    repeats: int,
) -> tuple[float, list[float]]:
    """Seconds of a first (untimed: it compiles the stitching helpers) and of ``repeats`` timed whole-volume
    inferences, each until the stitched logits are ready."""

    def infer() -> float:
        start = time.perf_counter()
        jax.block_until_ready(
            inference.sliding_window_inference(
                predict_fn,
                volume,
                case.modality,
                tuple(case.roi),
                overlap=case.overlap,
                windows_per_call=windows_per_call,
            )
        )
        return time.perf_counter() - start

    first = infer()
    return first, [infer() for _ in range(repeats)]


def run_inference_case(
    name: str, case: ml_collections.ConfigDict, config: ml_collections.ConfigDict, cache: CacheEvents
) -> dict[str, Any]:
    """Whole-volume sliding-window inference, timed for each ``config.windows_per_call``."""
    product = product_config(case, config)
    model = build.make_model(product)
    twin_predict = build.WindowPredictor(build.make_model(loop_free_twin(product))).jitted
    roi, shape = tuple(case.roi), tuple(case.volume_shape)
    device = jax.local_devices()[0]
    sample = jax.device_put((np.zeros((1, *roi, 1), np.float32), np.zeros((1,), np.int32)), device)
    init = jax.jit(lambda x, m: model.init(jax.random.key(config.seed, impl="rbg"), x, m, train=False))
    variables = init(*sample)
    volume = np.random.default_rng(config.seed).standard_normal((*shape, 1), dtype=np.float32)
    num_windows = len(inference.dense_windows(shape, roi, case.overlap))
    predict = build.WindowPredictor(model).jitted
    peak, peak_source = peak_flops(_device_kind(), case.dtype, config.peak_tflops)
    rows = []
    for wpc in config.windows_per_call:
        windows = jax.device_put(np.zeros((wpc, *roi, 1), np.float32), device)
        ids = jax.device_put(np.full((wpc,), case.modality, np.int32), device)
        compiled, compile_info = compile_timed(
            predict, (variables, windows, ids), cache, config.compile_times
        )
        predict_fn = functools.partial(compiled, variables)
        first, times = time_volume(predict_fn, volume, case, wpc, config.inference_repeats)
        volume_s = statistics.median(times)
        calls = math.ceil(num_windows / wpc)
        flops = cost_of(twin_predict.lower(variables, windows, ids))["flops"]
        achieved = flops * calls / volume_s if flops else None
        rows.append(
            {
                "windows_per_call": wpc,
                "volumes_per_min": 60.0 / volume_s,
                "volume_s": volume_s,
                "volume_s_all": times,
                "first_volume_s": first,
                "calls": calls,
                "flops_per_call": flops,
                "tflops_per_s": achieved / 1e12 if achieved else None,
                "mfu": achieved / peak if achieved and peak else None,
                "compile": compile_info,
                "memory": memory_of(compiled),
            }
        )
        del compiled, predict_fn
    best = max(rows, key=lambda r: r["volumes_per_min"])
    return {
        "name": name,
        "kind": "inference",
        "model": case.model.name,
        "params": sum(int(x.size) for x in jax.tree.leaves(variables["params"])),
        "volume_shape": list(shape),
        "roi": list(roi),
        "overlap": case.overlap,
        "windows": num_windows,
        "dtype": case.dtype,
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        "lowerings": lowerings(model),
        "volumes_per_min": best["volumes_per_min"],
        "best_windows_per_call": best["windows_per_call"],
        "by_windows_per_call": rows,
        "device_peak_bytes_in_use": device_peak_bytes(),
    }


# -------------------------------------------------------------------------------------- reference


def torch_references(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """MI-Seg's PyTorch formulation of every case (torch imported only here)."""
    from benchmarks import torch_reference

    out = {}
    for name in names:
        case = config.cases[name]
        model_cfg = case.model.to_dict()
        print(f"PyTorch reference: {name} ...", flush=True)
        if case.kind == "train":
            out[name] = torch_reference.train_references(
                model_cfg,
                batch_size=case.batch_size,
                roi=tuple(case.roi),
                loss_cfg=config.loss.to_dict(),
                optim_cfg=config.optim.to_dict(),
                warmup=max(1, config.warmup_steps),
                repeats=config.repeats,
                steps_per_repeat=config.steps_per_repeat,
                seed=config.seed,
            )
        else:
            out[name] = torch_reference.inference_references(
                model_cfg,
                volume_shape=tuple(case.volume_shape),
                roi=tuple(case.roi),
                overlap=case.overlap,
                repeats=config.inference_repeats,
                modality=case.modality,
                seed=config.seed,
            )
    return out


def torch_train_step(config: ml_collections.ConfigDict, name: str) -> tuple[Callable[[], None], int]:
    """MI-Seg's PyTorch train step of case ``name`` (CPU) and its parameter count, to interleave with ours."""
    from benchmarks import torch_reference

    case = config.cases[name]
    return torch_reference.train_step_fn(
        case.model.to_dict(),
        batch_size=case.batch_size,
        roi=tuple(case.roi),
        loss_cfg=config.loss.to_dict(),
        optim_cfg=config.optim.to_dict(),
        seed=config.seed,
    )


def bracket_references(before: Mapping[str, dict], after: Mapping[str, dict]) -> dict[str, dict]:
    """The reference timed right before a case (the headline ``reference``) and right after it
    (``reference_after``, with its own ratio): a drift of the machine's speed shows as a gap between the
    two. The first is the headline because JAX's runtime can still slow PyTorch down once it has run in
    the process (measured: sliding-window inference 9.4 s before, 29-34 s after)."""
    return dict(before, reference_after=after["reference"])


def attach_reference(result: dict[str, Any], refs: Mapping[str, dict[str, Any]]) -> None:
    """Add ``reference*`` and ``ratio_vs_reference*`` to a case; the two models must have the same size."""
    key = "crops_per_s" if result["kind"] == "train" else "volumes_per_min"
    for ref_key, ref in refs.items():
        if ref["params"] != result["params"]:
            raise ValueError(
                f"{result['name']}: the PyTorch reference has {ref['params']:,} parameters, cinjax "
                f"{result['params']:,}: not the same model."
            )
        result[ref_key] = ref
        if key in result:
            result[f"ratio_vs_{ref_key}"] = result[key] / ref[key]


# -------------------------------------------------------------------------------------------- run


def _headline(case: dict[str, Any] | None, keys: Sequence[str]) -> dict[str, Any] | None:
    if case is None:
        return None
    out = {"case": case["name"], **{k: case.get(k) for k in keys}}
    out.update({k: v for k, v in case.items() if k.startswith(("reference", "ratio_vs_reference"))})
    return out


def run(config: ml_collections.ConfigDict, reference: str | None = None) -> dict[str, Any]:
    """Every case of ``config.run``; the JSON-able results (module docstring)."""
    names = list(config.run)
    unknown = sorted(set(names) - set(config.cases))
    if unknown:
        raise ValueError(f"config.run names unknown cases {unknown}; defined: {sorted(config.cases)}.")
    cache_dir = config.compile_cache_dir or tempfile.mkdtemp(prefix="cinjax-bench-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # On a GPU the PyTorch references run first (JAX then takes most of the memory). On a CPU each case's
    # reference runs right before and right after it (bracket_references), so drift shows.
    bracket = reference == "torch" and jax.default_backend() == "cpu"
    refs = torch_references(config, names) if reference == "torch" and not bracket else {}
    env = env_report()
    cache = CacheEvents()
    mesh = distributed.make_mesh()
    cases = []
    with tempfile.TemporaryDirectory(prefix="cinjax-bench-volumes-") as root:

        @functools.cache
        def records():
            from benchmarks.loader import synthetic_arrays, write_cache

            lc = config.loader
            return write_cache(
                root, synthetic_arrays(lc.volumes_per_modality, tuple(lc.volume_shape), config.seed)
            )

        for name in names:
            case = config.cases[name]
            before = torch_references(config, [name]) if bracket else {}
            print(f"cinjax: {name} ...", flush=True)
            if case.kind == "train":
                ref_step = torch_train_step(config, name) if bracket else None
                result = run_train_case(name, case, config, mesh, records, cache, ref_step)
                del ref_step
            elif case.kind == "inference":
                result = run_inference_case(name, case, config, cache)
            else:
                raise ValueError(f"{name}: kind must be 'train' or 'inference', got {case.kind!r}.")
            if bracket:
                refs[name] = bracket_references(before[name], torch_references(config, [name])[name])
            if name in refs:
                attach_reference(result, refs[name])
            cases.append(result)
            gc.collect()
    if not config.compile_cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    env["load_avg_end"] = os.getloadavg()
    if refs:
        ref = next(iter(refs.values()))["reference"]
        env.update(torch=ref["torch"], monai=ref["monai"], torch_threads=ref["threads"])
    first_train = next((c for c in cases if c["kind"] == "train"), None)
    first_inference = next((c for c in cases if c["kind"] == "inference"), None)
    return {
        "train": _headline(first_train, ("crops_per_s", "step_s", "tflops_per_s", "mfu", "params")),
        "inference": _headline(first_inference, ("volumes_per_min", "best_windows_per_call", "params")),
        "loader": first_train.get("input_only") if first_train else None,
        "env": env,
        "cases": cases,
        "settings": {
            "variant": config.get("variant"),
            "reference": reference,
            "compile_cache_dir": config.compile_cache_dir or None,
            **{k: config[k] for k in SETTINGS},
        },
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: Mapping[str, Any]) -> None:
    print(
        f"\n{results['env']['device_kind']} ({results['env']['platform']}, {results['env']['device_count']} "
        f"device(s)), jax {results['env']['jax']}"
    )
    print(
        f"{'case':<28} {'mode':<12} {'crops/s':>8} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} {'wait':>5} "
        f"{'torch/s':>8} {'ratio':>6} {'params cinjax / torch':>24}"
    )
    for c in results["cases"]:
        ref = c.get("reference", {})
        params = f"{c['params']:,}" + (f" / {ref['params']:,}" if ref else "")
        if c["kind"] == "train":
            modes = [m for m in ("synthetic", "pipeline") if m in c]
            for mode in modes:
                r, first = c[mode], mode == modes[0]  # the reference is compared with the first mode
                print(
                    f"{c['name']:<28} {mode:<12} {r['crops_per_s']:>8.2f} {r['step_s']:>8.3f} "
                    f"{_fmt(r['tflops_per_s'], '8.3f'):>8} {_fmt(r['mfu'], '6.3f'):>6} "
                    f"{_fmt(r.get('data_wait_share'), '5.2f'):>5} "
                    f"{_fmt(ref.get('crops_per_s') if first else None, '8.2f'):>8} "
                    f"{_fmt(c.get('ratio_vs_reference') if first else None, '6.2f'):>6} {params:>24}"
                )
            if "input_only" in c:
                print(f"{c['name']:<28} {'input_only':<12} {c['input_only']['crops_per_s']:>8.1f}")
        else:
            for r in c["by_windows_per_call"]:
                print(
                    f"{c['name']:<28} {'wpc ' + str(r['windows_per_call']):<12} "
                    f"vol/min {r['volumes_per_min']:.2f} "
                    f"({r['volume_s']:.2f} s, TFLOP/s {_fmt(r['tflops_per_s'], '.3f')})"
                )
            if ref:
                print(
                    f"{c['name']:<28} {'torch sw=1':<12} vol/min {ref['volumes_per_min']:.2f}; ratio "
                    f"{c['ratio_vs_reference']:.2f}; params {params}"
                )
        if "reference_interleaved" in c:
            r = c["reference_interleaved"]
            print(
                f"{c['name']:<28} {'interleaved':<12} cinjax {r['cinjax_step_s']:.3f} s, torch "
                f"{r['step_s']:.3f} s per step; ratio {c['ratio_vs_reference_interleaved']:.2f}"
            )
        if "reference_sync_free" in c:
            print(
                f"{c['name']:<28} {'vs torch without CIN host syncs':<32} ratio "
                f"{c['ratio_vs_reference_sync_free']:.2f}"
            )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = run(_CONFIG.value, _REFERENCE.value)
    print_table(results)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    hostmem.ensure_huge_pages()  # as the CLI does: the figures are the product's (cinjax.hostmem)
    app.run(main)

"""Training loader in a real 2-process JAX job (2 CPU devices each, 127.0.0.1 coordinator).

This file is also the worker script: ``python tests/test_pipeline_multiprocess.py ID PORT CACHE OUT``.
Invariance checked: with the same records, seed, mode, ratios, global batch and total device count,
the union of the two processes' local batches (process 0 holds rows 0-3, process 1 rows 4-7) equals,
row for row, the global batch of a single process driving 4 devices; every device slice carries the
configured modality mix; the assembled global arrays gathered on each process equal that batch.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

GLOBAL_BATCH = 8
STEPS = 3
CROP = (4, 4, 4)
SHAPE = (8, 8, 8)


def synthetic_sample(record, rng, cfg):
    """Random crop read from the cache (stand-in for transforms.train_sample)."""
    from cinjax.data import cache

    start = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(record.shape, cfg))
    image, label = cache.read_crop(record, start, cfg)
    return {"image": image[..., None], "label": label.astype(np.int32), "modality": np.int32(record.modality)}


def load_records(root: str) -> dict:
    from cinjax.data import cache

    names = sorted(os.listdir(root))
    return {
        m: [cache.load_record(os.path.join(root, n)) for n in names if n.startswith(m)] for m in ("CT", "MR")
    }


def worker(process_id: int, port: int, root: str, out: str) -> None:
    from cinjax import distributed

    distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )
    import jax
    from absl import flags
    from jax.experimental import multihost_utils

    from cinjax.data import pipeline

    flags.FLAGS.mark_as_parsed()
    mesh = distributed.make_mesh()
    loader = pipeline.make_train_loader(
        load_records(root),
        mesh=mesh,
        global_batch_size=GLOBAL_BATCH,
        seed=5,
        transform_cfg=CROP,
        sample_fn=synthetic_sample,
    )
    result = {
        "process_index": jax.process_index(),
        "local_rows": list(loader.local_rows),
        "device_slices": [],
    }
    local, gathered = [], []
    for _ in range(STEPS):
        batch = next(loader)
        local.append(loader.local_batch)
        shards = sorted(batch["modality"].addressable_shards, key=lambda s: s.index[0].start)
        result["device_slices"].append([np.asarray(s.data).tolist() for s in shards])
        gathered.append(
            {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items()}
        )
    distributed.sync("pipeline-done")
    for key in ("image", "label", "modality"):
        np.save(os.path.join(out, f"local_{key}_{process_id}.npy"), np.stack([b[key] for b in local]))
        np.save(os.path.join(out, f"gathered_{key}_{process_id}.npy"), np.stack([b[key] for b in gathered]))
    with open(os.path.join(out, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_load_the_single_process_global_batch(tmp_path):
    import jax

    from cinjax.data import cache, pipeline

    root = tmp_path / "cache"
    for name, modality, n in (("CT", 0, 3), ("MR", 1, 2)):
        for i in range(n):
            code = 10 * modality + i + 1
            image = (code * 10000 + np.arange(np.prod(SHAPE))).reshape(SHAPE).astype(np.float32)
            cache.write_entry(
                str(root / f"{name}{i}"),
                key=f"{name}{i}",
                modality=modality,
                image=image,
                label=(image % 3).astype(np.uint8),
                meta={},
            )
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(port), str(root), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]
    assert [r["local_rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for r in results:
        for step_slices in r["device_slices"]:
            assert [sorted(s) for s in step_slices] == [[0, 1], [0, 1]]  # 2 rows per device: one of each

    mesh4 = jax.make_mesh(
        (4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4]
    )
    reference = pipeline.make_train_loader(
        load_records(str(root)),
        mesh=mesh4,
        global_batch_size=GLOBAL_BATCH,
        seed=5,
        transform_cfg=CROP,
        sample_fn=synthetic_sample,
    )
    ref = [reference.next_local() for _ in range(STEPS)]
    for key in ("image", "label", "modality"):
        expected = np.stack([b[key] for b in ref])
        union = np.concatenate([np.load(tmp_path / f"local_{key}_{i}.npy") for i in range(2)], axis=1)
        np.testing.assert_array_equal(union, expected)
        for i in range(2):
            np.testing.assert_array_equal(np.load(tmp_path / f"gathered_{key}_{i}.npy"), expected)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

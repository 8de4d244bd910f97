"""Test set-up: 8 fake CPU devices, persistent compilation cache, absl flags parsed for grain."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("CINJAX_TEST_JAX_CACHE", os.path.expanduser("~/.cache/cinjax/jax-test-cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def rng_seed() -> int:
    return 0


# A CT + MR source model and a three-modality run started from it (tests/test_modalities.py,
# tests/test_analyze_cin.py). The source is a convert-style directory (params of a random init +
# inference.json: no training needed); the run is `configs/demo.py:add_mr2` through the real CLI,
# interleaving CT, MR and the phantom's black-blood MR (MR2), with only the new CIN rows trainable.
THREE_MODALITY_ARGS = (
    "--config.data.phantom.num_ct=3",
    "--config.data.phantom.num_mr=3",
    "--config.data.phantom.num_mr2=3",
    "--config.data.phantom.num_val=1",
    "--config.data.phantom.num_test=1",
    "--config.data.spacing=(4,4,4)",
    "--config.data.roi=(16,16,16)",
    "--config.data.preprocess_workers=0",
    "--config.model.channels=(4,8)",
    "--config.model.strides=(1,2)",
    "--config.loader.prefetch=0",
    "--config.train.async_checkpoint=False",
    "--config.train.min_free_gb=0.01",
    "--config.optim.schedule.warmup_steps=2",
    "--config.eval.panels=False",
)


def _source_run(path):
    """The demo's C-UNet at the sizes of THREE_MODALITY_ARGS, for CT + MR only, as a convert directory."""
    import importlib.util

    import numpy as np
    import orbax.checkpoint as ocp
    from _cli import REPO

    from cinjax import build, runspec, workdir

    loader = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs/demo.py"))
    demo = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(demo)
    config = demo.get_config()
    config.data.spacing, config.data.roi = (4.0, 4.0, 4.0), (16, 16, 16)
    config.model.channels, config.model.strides = (4, 8), (1, 2)
    spec = runspec.InferenceSpec.from_config(config)
    roi = spec.roi
    model = build.model_from_spec(spec)
    image, modality = np.zeros((1, *roi, 1), np.float32), np.zeros((1,), np.int32)
    params = jax.jit(lambda: model.init(jax.random.key(1), image, modality))()["params"]
    # Distinct CT and MR rows, as a trained conditional model has (a fresh init has them equal).
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + np.arange(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1))) * 0.1
            if x.ndim == 2 and x.shape[0] == 2 and "norm" in jax.tree_util.keystr(p)
            else x
        ),
        params,
    )
    path.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / workdir.CONVERTED_PARAMS, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    spec.write(path)
    return path


@pytest.fixture(scope="session")
def three_modalities(tmp_path_factory):
    from _cli import REPO, run_module

    base = tmp_path_factory.mktemp("three_modalities")
    source = _source_run(base / "ct_mr")
    run = base / "add_mr2"
    run_module(
        ["--config", os.path.join(REPO, "configs/demo.py:add_mr2"), f"--workdir={run}"]
        + [f"--config.data.root={base / 'phantom'}", f"--config.data.cache_dir={base / 'cache'}"]
        + list(THREE_MODALITY_ARGS)
        + [f"--config.finetune.init_from={source}", "--config.loader.mode=interleave"]
        + ["--config.loader.global_batch_size=6", "--config.train.num_steps=3", "--config.train.eval_every=0"]
    )
    return base / "phantom", source, run

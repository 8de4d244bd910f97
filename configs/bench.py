"""Settings of the throughput benchmark.

    python -m benchmarks.throughput --config configs/bench.py[:VARIANT] [--reference torch] --out results.json

VARIANT:

* ``cpu`` (default): (a) C-UNet 8-16-32-64-128, strides 1 2 2 2 1, 2 residual units (CIN encoder,
  instance-norm decoder) and (b) C-Swin-UNETR fs12 / 3 heads (CIN in the conv encoder and the Swin), train
  steps on 64^3 crops, batch 2 (modalities 0, 1); (c) sliding-window inference of the C-UNet (a) over a
  128x128x96 volume (64^3 ROI, overlap 0.5: 18 windows) for each ``windows_per_call``.
* ``gpu``: the paper's models at 96^3 in bfloat16: C-UNet README best and C-Swin-UNETR fs48 / 3 heads at batch
  1, 2 and 4; C-UNet inference over a 256x256x160 volume (75 windows).
* ``tiny``: a CI-sized C-UNet (channels 4-8, 16^3 crops, 18 windows of inference), seconds per run.

All: DiceFocal loss with the background (MI-Seg's), AdamW 1e-4 / weight decay 1e-5, the product's training
transforms. ``cases`` holds every case by name (``kind`` train or inference, a model config for
``cinjax.models.build_model``); ``run`` lists the ones to run, in order: the first train and the first
inference case are the headline figures. ``peak_tflops`` overrides the per-device peak used for MFU (there
is none for CPUs, so MFU is null there unless it is set). ``compile_cache_dir`` empty: a fresh
persistent-cache directory, so the cold compile times are cold.
"""

import ml_collections

from cinjax.config import base_config
from cinjax.models import presets

VARIANTS = ("cpu", "gpu", "tiny")


def _train(model, batch_size, roi, dtype):
    return ml_collections.ConfigDict(
        dict(kind="train", model=model, batch_size=batch_size, roi=tuple(roi), dtype=dtype)
    )


def _inference(model, volume_shape, roi, dtype, overlap=0.5):
    return ml_collections.ConfigDict(
        dict(
            kind="inference",
            model=model,
            volume_shape=tuple(volume_shape),
            roi=tuple(roi),
            overlap=overlap,
            dtype=dtype,
            modality=0,
        )
    )


def _unet(channels, strides, num_res_units):
    m = presets.c_unet()
    m.channels, m.strides, m.num_res_units = tuple(channels), tuple(strides), num_res_units
    return m


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    variant = (arg or "cpu").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} in configs/bench.py:{arg}; choose one of {VARIANTS}.")
    base = base_config()
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.loss = base.loss
    c.loss.name = "dice_focal"
    c.loss.include_background = True
    c.optim = base.optim
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-5
    c.transforms = base.transforms

    c.modes = ("synthetic", "pipeline", "input_only")  # train cases; input_only = loader alone (no model)
    c.warmup_steps = 1  # untimed steps after the compile
    c.repeats = 5  # timed repeats per mode (median reported)
    c.steps_per_repeat = 1
    c.inference_repeats = 3  # timed whole-volume inferences per windows_per_call (after one untimed)
    c.windows_per_call = (1, 2, 4)
    c.peak_tflops = ml_collections.FieldReference(None, field_type=float)  # overrides the peak table
    c.compile_times = True  # also time a warm compile (after jax.clear_caches(), same persistent cache)
    c.compile_cache_dir = ""  # "": a fresh temporary directory (cold compiles are cold)
    # Synthetic volumes cached for the pipeline / input_only modes (two modalities).
    c.loader = ml_collections.ConfigDict(
        dict(
            volume_shape=(96, 96, 96),
            volumes_per_modality=2,
            mode="interleave",
            num_workers=0,
            prefetch=2,
            warmup_batches=3,
            batches=20,
        )
    )

    c.cases = ml_collections.ConfigDict()
    if variant == "cpu":
        cunet = _unet((8, 16, 32, 64, 128), (1, 2, 2, 2, 1), 2)
        c.cases.c_unet = _train(cunet, 2, (64, 64, 64), "float32")
        c.cases.c_swin_unetr_fs12 = _train(presets.c_swin_unetr(12, 3), 2, (64, 64, 64), "float32")
        c.cases.c_unet_sliding_window = _inference(cunet, (128, 128, 96), (64, 64, 64), "float32")
        c.run = ("c_unet", "c_swin_unetr_fs12", "c_unet_sliding_window")
    elif variant == "gpu":
        c.warmup_steps = 3
        c.repeats = 5
        c.steps_per_repeat = 4
        c.windows_per_call = (1, 2, 4, 8)
        c.loader.volume_shape = (160, 160, 160)
        c.loader.batches = 40
        run = []
        for model, name in ((presets.c_unet(), "c_unet"), (presets.c_swin_unetr(48, 3), "c_swin_unetr_fs48")):
            for b in (1, 2, 4):
                c.cases[f"{name}_b{b}"] = _train(model, b, (96, 96, 96), "bfloat16")
                run.append(f"{name}_b{b}")
        c.cases.c_unet_sliding_window = _inference(
            presets.c_unet(), (256, 256, 160), (96, 96, 96), "bfloat16"
        )
        c.run = (*run, "c_unet_sliding_window")
    else:
        c.repeats = 2
        c.inference_repeats = 1
        c.windows_per_call = (1, 2)
        c.loader.volume_shape = (32, 32, 32)
        c.loader.volumes_per_modality = 1
        c.loader.warmup_batches = 1
        c.loader.batches = 4
        tiny = _unet((4, 8), (1, 2), 1)
        c.cases.tiny_c_unet = _train(tiny, 2, (16, 16, 16), "float32")
        c.cases.tiny_c_unet_sliding_window = _inference(tiny, (32, 32, 24), (16, 16, 16), "float32")
        c.run = ("tiny_c_unet", "tiny_c_unet_sliding_window")
    return c

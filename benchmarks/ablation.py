"""The paper's ablation in one command: single-modality, fine-tuning, joint, interleaved and conditional
training, UNet and Swin-UNETR, over seeds.

    python -m benchmarks.ablation --out runs/ablation [--seeds 0,1,2] [--steps 300] [--variants a,b]

Every variant gets the same budget (``--steps`` optimizer steps of the same crops per step, the same
warmup-cosine schedule); the fine-tuning variant spends half of it on MR and half on CT. Each cell is a
real ``python -m cinjax.main`` run (``configs/ablation.py`` by default: the phantom in MI-Seg's split
shape, 10 CT target + 20 MR assistant training volumes, held-out CT and MR scored once at the end).
Finished cells are not rerun; an interrupted study resumes where it stopped. Output in ``--out``:
``ablation.json`` (per variant: every seed's result with its ``seed``, and mean ± std over seeds per
modality and class), ``ablation.md`` and ``ablation.png``.

Paper scale, on real MM-WHS with MI-Seg's datalists (a GPU; the mean ± std over seeds as well)::

    python -m benchmarks.ablation --config configs/mmwhs.py --out runs/ablation-mmwhs --steps 16000 \\
        --set config.data.root=/data/MM-WHS --set config.eval.split=validation

(``configs/mmwhs.py`` models: C-UNet / UNet README-best, C-Swin-UNETR / Swin-UNETR fs48.)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence

from benchmarks.study import REPO, Phase, Variant, choose, run_study

# The model name each config file gives the four networks.
MODELS = {
    "configs/ablation.py": {"c_unet": "c_unet", "unet": "unet", "c_swin": "c_swin", "swin": "swin"},
    "configs/mmwhs.py": {
        "c_unet": "c_unet",
        "unet": "unet",
        "c_swin": "c_swin_unetr_fs48",
        "swin": "swin_unetr_fs48",
    },
}

# A few-second version for CI: a tiny phantom and UNet (Swin needs ROIs of 32^3).
TINY = (
    "config.data.phantom.num_ct=3",
    "config.data.phantom.num_mr=3",
    "config.data.phantom.num_test=1",
    "config.data.spacing=(4,4,4)",
    "config.data.roi=(16,16,16)",
    "config.data.preprocess_workers=0",
    "config.model.channels=(4,8)",
    "config.model.strides=(1,2)",
    "config.loader.global_batch_size=2",
    "config.loader.prefetch=0",
    "config.train.async_checkpoint=False",
    "config.train.min_free_gb=0.01",
    "config.optim.schedule.warmup_steps=1",
    "config.eval.panels=False",
    "config.eval.distances=False",
)


def variants(config_file: str, steps: int) -> list[Variant]:
    """The paper's comparisons, each a list of CLI phases."""
    names = MODELS.get(config_file, MODELS["configs/ablation.py"])

    def phase(model: str, variant: str = "", n: int = steps, **kw) -> Phase:
        config = f"{config_file}:{names[model]}" + (f",{variant}" if variant else "")
        return Phase(config, (f"config.train.num_steps={n}", *kw.pop("overrides", ())), **kw)

    half = max(1, steps // 2)
    return [
        Variant("ct_only", "UNet trained on CT only", (phase("unet", "ct"),)),
        Variant("mr_only", "UNet trained on MR only", (phase("unet", "mr"),)),
        Variant(
            "finetune_mr_ct",
            "UNet trained on MR for half the steps, then fine-tuned on CT for the other half",
            (
                phase("unet", "mr", half, overrides=("config.train.final_eval=False",)),
                phase(
                    "unet",
                    "ct",
                    max(1, steps - half),
                    overrides=("config.finetune.checkpoint=latest",),
                    init_from_previous=True,
                ),
            ),
        ),
        Variant(
            "joint", "UNet, one modality per batch, alternating (joint training)", (phase("unet", "joint"),)
        ),
        Variant("interleaved", "UNet, CT + MR in every batch, no conditioning", (phase("unet"),)),
        Variant("c_interleaved", "C-UNet (CIN), CT + MR in every batch (MI-Seg)", (phase("c_unet"),)),
        Variant("swin_interleaved", "Swin-UNETR, CT + MR in every batch, no conditioning", (phase("swin"),)),
        Variant(
            "c_swin_interleaved",
            "C-Swin-UNETR (CIN in the Swin encoder and convs), CT + MR in every batch (C-ViT)",
            (phase("c_swin"),),
        ),
    ]


def _load_config(config_file: str, arg: str):
    spec = importlib.util.spec_from_file_location("ablation_config", os.path.join(REPO, config_file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="study directory (cells, JSON, Markdown, PNG)")
    p.add_argument("--config", default="configs/ablation.py", choices=sorted(MODELS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (0: the config's)")
    p.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    p.add_argument("--set", action="append", default=[], help="extra CLI override KEY=VALUE (repeatable)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke version (CI)")
    p.add_argument("--report_only", action="store_true", help="run nothing; report the finished cells")
    args = p.parse_args(argv)

    names = MODELS[args.config]
    base = _load_config(args.config, names["c_unet"])
    steps = args.steps or (2 if args.tiny else base.train.num_steps)
    chosen = variants(args.config, steps)
    chosen, seeds = choose(p, chosen, args.variants, args.seeds)
    extra = (*(TINY if args.tiny else ()), *args.set)
    meta = {
        "study": "ablation",
        "command": "python -m benchmarks.ablation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "config": args.config,
        "budget": {
            "steps": steps,
            "min_global_batch_size": base.loader.min_global_batch_size,
            "roi": list(base.data.roi),
            "lr": base.optim.lr,
            "schedule": base.optim.schedule.name,
            "warmup_steps": base.optim.schedule.warmup_steps,
        },
        "data": {k: v for k, v in base.data.get("phantom", {}).items()} or {"root": base.data.root},
        "eval_split": base.eval.split,
        "extra_overrides": list(extra),
    }
    return run_study(
        args.out,
        chosen,
        seeds,
        extra,
        base.data.union_name,
        meta,
        title=f"Ablation ({args.config}, {steps} steps, {len(seeds)} seeds)",
        stem="ablation",
        report_only=args.report_only,
    )


if __name__ == "__main__":
    main()

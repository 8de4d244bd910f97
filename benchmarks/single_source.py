"""Single-source cross-modality generalization in one command: train on one labelled modality, segment
the other, with and without style interventions and the patch-wise InfoNCE term; MI-Seg's conditional
model trained on both labelled modalities is the upper bound.

    python -m benchmarks.single_source --out runs/single-source [--seeds 0,1,2] [--steps 120]
        [--projection 64]

Per direction (CT → MR and MR → CT), with the same budget as :mod:`benchmarks.ablation` (its config,
``configs/ablation.py``: the phantom, 10 CT + 20 MR training volumes, held-out CT and MR scored once):

* ``{src}_to_{tgt}``: a plain UNet trained on the source modality only (no intervention);
* ``{src}_to_{tgt}_style``: every crop also restyled (GIN networks and Bézier curves,
  :mod:`cinjax.data.style`), Dice on both copies;
* ``{src}_to_{tgt}_style_nce``: plus ``style.info_nce_weight`` x the patch-wise InfoNCE between the
  encoder features of each crop and its restyled copy (through a learned projection head of width
  ``--projection``, ``style.info_nce_projection``, when it is > 0);
* ``both_labelled``: C-UNet on interleaved CT + MR (MI-Seg; it needs labels in both).

Output in ``--out``: ``single_source.json`` (every seed's result with its ``seed``, mean ± std over seeds
per modality and class), ``.md`` and ``.png`` (:mod:`benchmarks.study`). ``--tiny`` is a seconds-long
version for CI.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence

from benchmarks.ablation import TINY, _load_config
from benchmarks.study import Phase, Variant, choose, run_study

CONFIG = "configs/ablation.py"
DIRECTIONS = (("CT", "MR"), ("MR", "CT"))


def variants(steps: int, nce_weight: float, projection: int = 0) -> list[Variant]:
    """Three variants per direction and the shared upper bound; ``projection`` > 0 puts a projection
    head of that width on the InfoNCE variants."""
    n = f"config.train.num_steps={steps}"
    style = "config.style.enabled=True"
    nce = (f"config.style.info_nce_weight={nce_weight}",)
    head = ""
    if projection:
        nce += (f"config.style.info_nce_projection={projection}",)
        head = f" through a {projection}-wide projection head"
    out = []
    for src, tgt in DIRECTIONS:
        config = f"{CONFIG}:unet,{src.lower()}"
        name = f"{src.lower()}_to_{tgt.lower()}"
        out += [
            Variant(name, f"UNet trained on {src} only", (Phase(config, (n,)),)),
            Variant(
                f"{name}_style",
                f"UNet on {src} only, every crop also restyled (GIN / Bezier)",
                (Phase(config, (n, style)),),
            ),
            Variant(
                f"{name}_style_nce",
                f"UNet on {src} only, restyled pairs + {nce_weight} x patch-wise InfoNCE{head}",
                (Phase(config, (n, style, *nce)),),
            ),
        ]
    out.append(
        Variant(
            "both_labelled",
            "C-UNet on interleaved CT + MR (both labelled; MI-Seg)",
            (Phase(f"{CONFIG}:c_unet", (n,)),),
        )
    )
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (0: the config's)")
    p.add_argument("--nce_weight", type=float, default=0.1, help="weight of the InfoNCE term")
    p.add_argument("--projection", type=int, default=0, help="width of the InfoNCE projection head (0: none)")
    p.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    p.add_argument("--set", action="append", default=[], help="extra CLI override KEY=VALUE (repeatable)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke version (CI)")
    args = p.parse_args(argv)
    if args.projection < 0:
        p.error(f"--projection must be >= 0 (0: no projection head), got {args.projection}")
    base = _load_config(CONFIG, "unet")
    steps = args.steps or (2 if args.tiny else base.train.num_steps)
    chosen = variants(steps, args.nce_weight, args.projection)
    chosen, seeds = choose(p, chosen, args.variants, args.seeds)
    extra = (*(TINY if args.tiny else ()), *args.set)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "study": "single_source",
        "command": f"python -m benchmarks.single_source {argv_text}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": CONFIG,
        "budget": {"steps": steps, "min_global_batch_size": base.loader.min_global_batch_size},
        "info_nce_weight": args.nce_weight,
        "info_nce_projection": args.projection,
        "extra_overrides": list(extra),
    }
    return run_study(
        args.out,
        chosen,
        seeds,
        extra,
        base.data.union_name,
        meta,
        title=f"Single-source generalization ({steps} steps, {len(seeds)} seeds)",
        stem="single_source",
    )


if __name__ == "__main__":
    main()

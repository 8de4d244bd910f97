"""Adding a modality to a trained conditional model: new CIN rows against full fine-tuning and training
from scratch, on the same few labelled volumes of the new modality.

    python -m benchmarks.add_modality --source RUN --out runs/add-mr2 [--seeds 0,1] [--steps 100]

``RUN`` is a trained CT + MR conditional run (e.g. the ``c_interleaved`` cell of ``benchmarks.ablation``
or the demo). The new modality is the phantom's black-blood MR (``MR2``, 3 training volumes;
``configs/demo.py:add_mr2``). Variants, with the same budget (steps, crops, schedule):

* ``new_rows``: only the MR2 rows of every CIN table train (``finetune.trainable=new_modalities``);
  CT and MR predictions are bit-identical to the source's.
* ``new_rows_lr10x``: the same with 10x the learning rate (a few rows start far from a contrast that
  inverts blood and myocardium).
* ``new_rows_head``: the MR2 rows and the output head.
* ``full_finetune``: every parameter trains, from the source's weights.
* ``scratch``: a randomly initialised conditional model trained on the same MR2 volumes.

Every variant is scored on the validation volumes of all three modalities. Output in ``--out``:
``add_modality.json`` / ``.md`` / ``.png`` (see :mod:`benchmarks.study`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence

from benchmarks.ablation import _load_config
from benchmarks.study import Phase, Variant, choose, run_study

CONFIG = "configs/demo.py:add_mr2"


def variants(source: str, steps: int, lr: float) -> list[Variant]:
    """The four ways to get a model for the new modality, all on the same MR2 volumes (``lr``: the
    config's learning rate)."""
    common = (f"config.train.num_steps={steps}", "config.train.eval_every=0")
    init = f"config.finetune.init_from={source}"
    return [
        Variant(
            "new_rows",
            "only the new modality's CIN rows train (initialised as the mean of CT and MR)",
            (Phase(CONFIG, (*common, init, "config.finetune.trainable=new_modalities")),),
        ),
        Variant(
            "new_rows_lr10x",
            "only the new CIN rows train, with 10x the learning rate (rows are few and start far off)",
            (
                Phase(
                    CONFIG,
                    (*common, init, "config.finetune.trainable=new_modalities", f"config.optim.lr={10 * lr}"),
                ),
            ),
        ),
        Variant(
            "new_rows_head",
            "the new CIN rows and the output head train",
            (Phase(CONFIG, (*common, init, "config.finetune.trainable=new_modalities+head")),),
        ),
        Variant(
            "full_finetune",
            "every parameter trains, from the source run's weights",
            (Phase(CONFIG, (*common, init, "config.finetune.trainable=all")),),
        ),
        Variant(
            "scratch",
            "a random-initialised conditional model trained on the same MR2 volumes",
            (Phase(CONFIG, (*common, "config.finetune.trainable=all")),),
        ),
    ]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="trained CT + MR conditional run directory")
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    p.add_argument("--set", action="append", default=[], help="extra CLI override KEY=VALUE (repeatable)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.source):
        p.error(f"--source {args.source!r} is not a run directory")
    source = os.path.abspath(args.source)
    lr = _load_config(CONFIG.split(":")[0], CONFIG.split(":")[1]).optim.lr
    chosen = variants(source, args.steps, lr)
    chosen, seeds = choose(p, chosen, args.variants, args.seeds)
    meta = {
        "study": "add_modality",
        "command": "python -m benchmarks.add_modality "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "config": CONFIG,
        "budget": {"steps": args.steps},
        "extra_overrides": list(args.set),
    }
    return run_study(
        args.out,
        chosen,
        seeds,
        tuple(args.set),
        "whole_heart",
        meta,
        title=f"Adding MR2 to a CT + MR model ({args.steps} steps, {len(seeds)} seeds)",
        stem="add_modality",
    )


if __name__ == "__main__":
    main()

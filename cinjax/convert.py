"""Convert an MI-Seg PyTorch checkpoint into a cinjax checkpoint + model config.

Usage::

    python -m cinjax.convert --checkpoint best.pt --out converted/ -- \\
        --model_name=unet_vanilla --encoder_norm_name=instance_cond \\
        --feature_size 16 64 128 256 512 --num_res_units=3 --strides 1 2 2 2 1 --out_channels=8

Everything after ``--`` (or any flag this tool does not define) is read as MI-Seg's model flags,
exactly as given to MI-Seg's ``train.py`` / ``predict_whs.py``. Writes

* ``OUT/params``: an orbax (``StandardCheckpointer``) checkpoint of the params tree,
* ``OUT/config.json``: the cinjax model config (``build_model(json.load(...))`` builds the model),
* ``OUT/model_config.py``: the same as a ``get_config()`` file for ml_collections config flags,
* ``OUT/conversion.json``: source checkpoint, MI-Seg flags, input channels and the load report,
* ``OUT/inference.json``: the preprocessing the weights were trained with (:mod:`cinjax.runspec`):
  MI-Seg's MM-WHS setup by default (CT = 0, MR = 1, MM-WHS label codes for 8 classes, 1 mm, min-max,
  ROI 96^3);
  ``--spacing``, ``--roi``, ``--label_codes``, ``--modalities`` and ``--intensity`` change it.

The directory is a run directory: ``python -m cinjax.predict --run OUT``, ``python -m cinjax.export
--run OUT``, ``--config.eval.checkpoint=OUT``, ``--config.predict.checkpoint=OUT``; its layout is
:mod:`cinjax.workdir`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp

from cinjax import runspec, workdir
from cinjax.config import base_config
from cinjax.data import mmwhs
from cinjax.models import model_config
from cinjax.models.convert import load_mi_seg, parse_mi_seg_args

_MODEL_CONFIG_PY = '''"""cinjax model config converted from an MI-Seg checkpoint (by cinjax.convert)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({config!r})
'''


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cinjax.convert",
        allow_abbrev=False,
        description="Convert an MI-Seg .pt checkpoint to a cinjax (orbax) checkpoint. MI-Seg model "
        "flags follow after `--`.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="MI-Seg .pt file (best.pt / last.pt / Lightning .ckpt)."
    )
    p.add_argument("--out", required=True, help="Output directory.")
    p.add_argument("--num_modalities", type=int, default=None, help="Overrides MI-Seg's --num_styles.")
    p.add_argument(
        "--modalities", default="CT,MR", help="Modality names in id order (MI-Seg's MM-WHS: CT,MR)."
    )
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="Voxel size (mm).")
    p.add_argument("--roi", type=int, nargs=3, default=(96, 96, 96), help="Training crop / window size.")
    p.add_argument(
        "--label_codes",
        default=None,
        choices=("mmwhs", "identity"),
        help="Label codes of the predictions (default: mmwhs for 8 classes, else identity).",
    )
    p.add_argument(
        "--intensity", default="minmax", choices=("minmax", "window", "percentile", "zscore", "none")
    )
    p.add_argument("--non_strict", action="store_true", help="Load what fits; report the rest.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing OUT/params.")
    p.add_argument(
        "--trust_pickle",
        action="store_true",
        help="torch.load(weights_only=False): only for files you trust (e.g. Lightning checkpoints "
        "whose hyper-parameters are arbitrary Python objects).",
    )
    return p


def inference_spec(model: Any, args: argparse.Namespace) -> runspec.InferenceSpec:
    """The converted weights' :class:`cinjax.runspec.InferenceSpec` from the command line."""
    config = base_config()
    config.model = model.to_dict()
    names = [n.strip() for n in args.modalities.split(",") if n.strip()]
    num_modalities = int(config.model.get("num_modalities", len(names)))
    if len(names) != num_modalities:
        raise SystemExit(
            f"--modalities={args.modalities!r} names {len(names)} modalities but the model has "
            f"{num_modalities}; name each (e.g. --modalities=CT,MR,T2)."
        )
    d = config.data
    d.modalities = {n: i for i, n in enumerate(names)}
    d.num_classes = int(config.model.out_channels)
    codes = args.label_codes or ("mmwhs" if d.num_classes == mmwhs.NUM_CLASSES else "identity")
    d.label_codes = codes
    if codes == "mmwhs" and d.num_classes == mmwhs.NUM_CLASSES:
        d.class_names, d.union_name = mmwhs.CLASS_NAMES, mmwhs.UNION_NAME
    else:
        d.class_names = ("background", *(f"class_{i}" for i in range(1, d.num_classes)))
    d.spacing, d.roi = tuple(args.spacing), tuple(args.roi)
    d.intensity.mode = args.intensity
    return runspec.InferenceSpec.from_config(config)


def convert(argv: Sequence[str]) -> dict[str, Any]:
    """Run the conversion for a command line (without the program name); return conversion.json's data."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        own, mi_seg_args = argv[:i], argv[i + 1 :]
        args = _parser().parse_args(own)
    else:
        args, mi_seg_args = _parser().parse_known_args(argv)
    model, params, report = load_mi_seg(
        args.checkpoint,
        mi_seg_args,
        strict=not args.non_strict,
        num_modalities=args.num_modalities,
        return_report=True,
        weights_only=not args.trust_pickle,
    )
    print(report)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(out, workdir.CONVERTED_PARAMS), params, force=args.overwrite)
    ckptr.wait_until_finished()
    config = model_config(model)
    with open(os.path.join(out, workdir.CONFIG), "w") as f:
        f.write(config.to_json(indent=2))
    with open(os.path.join(out, workdir.MODEL_CONFIG_PY), "w") as f:
        f.write(_MODEL_CONFIG_PY.format(config=json.loads(config.to_json())))
    info = {
        "source_checkpoint": os.path.abspath(args.checkpoint),
        "mi_seg_args": mi_seg_args,
        "in_channels": int(parse_mi_seg_args(mi_seg_args)["in_channels"]),
        "report": {
            "ok": report.ok,
            "loaded": len(report.loaded),
            "missing": report.missing,
            "unexpected": report.unexpected,
            "mismatched": [list(map(str, m)) for m in report.mismatched],
        },
    }
    with open(os.path.join(out, workdir.CONVERSION), "w") as f:
        json.dump(info, f, indent=2)
    spec = inference_spec(config, args).write(out)
    print(f"wrote {out}/params, config.json, model_config.py, conversion.json, {os.path.basename(spec)}")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

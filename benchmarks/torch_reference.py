"""MI-Seg's PyTorch formulation of the benchmarked cases, for ``benchmarks/throughput.py --reference torch``.

The same model (from the same cinjax model config), batch, loss and optimizer, timed as MI-Seg runs them:

* C-UNet: MI-Seg's ``unet_vanilla`` from MONAI blocks: plain pre-conv; down path of ``ResidualUnit`` s
  (2 subunits, NDA, PReLU); nearest ``Upsample`` + ``cat([skip, up])`` + ``ResidualUnit`` up path; 1x1x1
  out conv.
* C-Swin-UNETR: MONAI's ``SwinUNETR`` with MI-Seg's conditioning: CIN in the conv encoder blocks
  (``encoder1/2/3/4/10``) and in the Swin transformer (each block's ``norm1`` / ``norm2``, each patch
  merging's norm), where the norm of a (B, D, H, W, C) token grid is an instance norm over the whole stage;
  MI-Seg's non-affine instance-norm ``proj_out``. The decoder keeps its plain affine instance norms.
* CIN as MI-Seg writes it: a ``ModuleList`` of ``InstanceNorm3d(C, affine=True)``, one per modality, applied
  sample by sample, ``norms[modalities[i]]`` indexed with a tensor element (on a GPU: one host sync per sample
  per norm). ``sync_free`` runs give the ids as a host list instead (what a fixed MI-Seg would do).
* Loss: MONAI ``DiceFocalLoss`` (softmax Dice with squared predictions, sigmoid focal on the logits as in
  MONAI 1.1.0, background included); optimizer: ``AdamW``. On a GPU: AMP (autocast fp16 + ``GradScaler``),
  as MI-Seg trains.
* Inference: MONAI ``sliding_window_inference`` with ``sw_batch_size=1`` (CIN takes one modality per call),
  constant blending, under ``torch.no_grad()``.

Non-conditional configs (``instance`` norms) use plain MONAI norms. MONAI's Swin needs ``einops``; without it,
``monai.networks.nets.swin_unetr.rearrange`` is replaced in this process by the permutations it performs.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import monai
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceFocalLoss
from monai.networks import blocks as monai_blocks
from monai.networks.nets import SwinUNETR
from monai.networks.nets import swin_unetr as monai_swin

_INSTANCE = ("instance_cond", "instance")
_SWIN_ENCODERS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


class ConditionalInstanceNorm(torch.nn.Module):
    """MI-Seg's CIN: one affine ``InstanceNorm3d`` per modality, applied sample by sample.

    The modality ids are set on the module (``modalities``) by :class:`Conditioned` before each forward: a
    tensor (MI-Seg; indexing the ``ModuleList`` with its elements syncs the host on a GPU) or a list of ints.
    ``channels_last`` takes Swin's (B, D, H, W, C) token grids (normalised over the whole stage).
    """

    def __init__(self, channels: int, num_modalities: int, channels_last: bool = False):
        super().__init__()
        self.norms = torch.nn.ModuleList(
            torch.nn.InstanceNorm3d(channels, affine=True) for _ in range(num_modalities)
        )
        self.channels_last = channels_last
        self.modalities: torch.Tensor | Sequence[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modalities is None:
            raise RuntimeError("ConditionalInstanceNorm needs modality ids: wrap the network in Conditioned.")
        if self.channels_last:
            x = x.permute(0, 4, 1, 2, 3)
        y = torch.cat([self.norms[self.modalities[i]](x[i : i + 1]) for i in range(x.shape[0])])
        return y.permute(0, 2, 3, 4, 1) if self.channels_last else y


class StageInstanceNorm(torch.nn.Module):
    """Plain instance norm of a (B, D, H, W, C) token grid over D, H, W (MI-Seg's ``instance`` Swin norm)."""

    def __init__(self, channels: int, affine: bool = True):
        super().__init__()
        self.norm = torch.nn.InstanceNorm3d(channels, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


class Conditioned(torch.nn.Module):
    """``forward(x, modalities)``: hands the ids to every CIN of ``net``, then runs ``net``."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.cins = [m for m in net.modules() if isinstance(m, ConditionalInstanceNorm)]

    def forward(self, x: torch.Tensor, modalities: torch.Tensor | Sequence[int]) -> torch.Tensor:
        for m in self.cins:
            m.modalities = modalities
        return self.net(x)


class UNetVanilla(torch.nn.Module):
    """MI-Seg's ``unet_vanilla`` from MONAI's ``Convolution`` / ``ResidualUnit`` (NCDHW)."""

    def __init__(self, cfg: Mapping[str, Any], in_channels: int = 1):
        super().__init__()
        channels, strides = [int(c) for c in cfg["channels"]], [int(s) for s in cfg["strides"]]
        units, k = int(cfg["num_res_units"]), int(cfg["kernel_size"])
        conv, res = monai_blocks.Convolution, monai_blocks.ResidualUnit
        kw = dict(kernel_size=k, subunits=2, act="prelu", dropout=cfg["dropout"], adn_ordering="NDA")

        def unit(c_in, c_out, stride, norm):
            block = res(
                3, c_in, c_out, strides=stride, norm=("instance", {"affine": cfg["norm_affine"]}), **kw
            )
            _swap_norms(block, norm, cfg)
            return block

        levels = len(channels)
        self.pre_conv = conv(3, in_channels, channels[0], strides=strides[0], kernel_size=k, conv_only=True)
        self.down_path = torch.nn.ModuleList(
            torch.nn.Sequential(
                *[
                    unit(
                        channels[lv] if r == 0 else channels[lv + 1],
                        channels[lv + 1],
                        strides[lv + 1] if r == 0 else 1,
                        cfg["encoder_norm"],
                    )
                    for r in range(units)
                ]
            )
            for lv in range(levels - 1)
        )
        self.up_path = torch.nn.ModuleList()
        for j in range(levels - 1):
            s = levels - 2 - j
            self.up_path.append(
                torch.nn.Sequential(
                    torch.nn.Upsample(scale_factor=strides[s + 1]),
                    unit(channels[s + 1] + channels[s], channels[s], 1, cfg["decoder_norm"]),
                )
            )
        self.out = conv(3, channels[0], int(cfg["out_channels"]), kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_conv(x)
        skips = [x]
        for level in self.down_path:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for up in self.up_path:
            x = up[1](torch.cat([skips.pop(), up[0](x)], dim=1))
        return self.out(x)


def _check_norm(name: str, what: str, allowed: Sequence[str] = _INSTANCE) -> None:
    if name not in allowed:
        raise ValueError(f"No PyTorch reference for {what}={name!r}; supported: {tuple(allowed)}.")


def _swap_norms(unit: torch.nn.Module, norm: str, cfg: Mapping[str, Any]) -> None:
    """Replace every ADN norm of a ``ResidualUnit`` by a CIN when ``norm`` is ``instance_cond``."""
    _check_norm(norm, "a UNet norm")
    if norm != "instance_cond":
        return
    for module in unit.modules():
        if isinstance(module, monai_blocks.ADN) and "N" in module._modules:
            module.N = ConditionalInstanceNorm(module.N.num_features, int(cfg["num_modalities"]))


def _rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
    """The axis permutations MONAI's Swin asks of einops."""
    lhs, rhs = (side.split() for side in pattern.split("->"))
    return x.permute(*[lhs.index(a) for a in rhs])


def _instance_proj_out(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """MI-Seg's ``proj_out`` under instance / instance_cond vit norms: a non-affine instance norm."""
    return F.instance_norm(x) if normalize else x


def swin_unetr(cfg: Mapping[str, Any], in_channels: int = 1) -> torch.nn.Module:
    """MONAI ``SwinUNETR`` with MI-Seg's (conditional) norms, from a cinjax ``swin_unetr`` config."""
    if not monai.utils.optional_import("einops")[1]:
        monai_swin.rearrange = _rearrange
    affine = lambda key: cfg["norm_affine"] if cfg.get(key) is None else cfg[key]  # noqa: E731
    vit, enc, dec = cfg["vit_norm"], cfg["encoder_norm"], cfg["decoder_norm"]
    _check_norm(vit, "vit_norm", (*_INSTANCE, "layer"))
    _check_norm(enc, "encoder_norm")
    _check_norm(dec, "decoder_norm", ("instance",))
    m = int(cfg["num_modalities"])
    norm_layer = {
        "instance_cond": functools.partial(ConditionalInstanceNorm, num_modalities=m, channels_last=True),
        "instance": functools.partial(StageInstanceNorm, affine=affine("vit_norm_affine")),
        "layer": functools.partial(torch.nn.LayerNorm, elementwise_affine=affine("vit_norm_affine")),
    }[vit]
    h = int(cfg["num_heads"])
    net = SwinUNETR(
        in_channels=in_channels,
        out_channels=int(cfg["out_channels"]),
        feature_size=int(cfg["feature_size"]),
        num_heads=tuple(h * 2**i for i in range(4)),
        depths=tuple(int(d) for d in cfg["depths"]),
        window_size=int(cfg.get("window_size", 7)),
        norm_name=("instance", {"affine": affine("decoder_norm_affine")}),
        drop_rate=cfg["dropout"],
        attn_drop_rate=cfg["attn_dropout"],
        dropout_path_rate=cfg["drop_path"],
        normalize=cfg["normalize"],
        norm_layer=norm_layer,
        downsample=cfg["downsample"],
    )
    for name in _SWIN_ENCODERS:
        block = getattr(net, name).layer
        for attr in ("norm1", "norm2", "norm3"):
            if hasattr(block, attr):
                c = getattr(block, attr).num_features
                new = (
                    ConditionalInstanceNorm(c, m)
                    if enc == "instance_cond"
                    else torch.nn.InstanceNorm3d(c, affine=affine("encoder_norm_affine"))
                )
                setattr(block, attr, new)
    if vit in _INSTANCE:
        net.swinViT.proj_out = types.MethodType(_instance_proj_out, net.swinViT)
    return net


def build(model_cfg: Mapping[str, Any], in_channels: int = 1) -> Conditioned:
    """The PyTorch network of a cinjax model config (``name`` + fields), taking ``(x NCDHW, modalities)``."""
    cfg = dict(model_cfg)
    builders = {"unet_vanilla": UNetVanilla, "swin_unetr": swin_unetr}
    if cfg["name"] not in builders:
        raise ValueError(f"No PyTorch reference for model {cfg['name']!r}; supported: {tuple(builders)}.")
    return Conditioned(builders[cfg["name"]](cfg, in_channels))


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------- timing


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _env(dev: torch.device, amp: bool, sync_free: bool) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "amp": amp,
        "cin_ids": "host list (sync-free)" if sync_free else "tensor elements (MI-Seg)",
    }


def _peak_memory(dev: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def _reset_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _time_repeats(fn: Callable[[], object], dev: torch.device, warmup: int, repeats: int, per_repeat: int):
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_repeat):
            fn()
        _sync(dev)
        times.append((time.perf_counter() - start) / per_repeat)
    return times


def _setup(seed: int) -> torch.device:
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.backends.cudnn.benchmark = True
    return device()


def _train_step(net, loss_fn, opt, scaler, x, y, modalities, amp: bool) -> Callable[[], None]:
    """One MI-Seg training step (autocast + GradScaler when ``amp``)."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(net(x, modalities), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _predict_volume(net, volume, roi, overlap, modalities, amp: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(volume.device.type, dtype=torch.float16, enabled=amp):
        return sliding_window_inference(
            volume, tuple(roi), 1, net, overlap=overlap, mode="constant", modalities=modalities
        )


def _train_parts(model_cfg, batch_size, roi, loss_cfg, seed):
    """The network, a batch (modalities alternating 0, 1, 0, ...) and MI-Seg's DiceFocal loss."""
    dev = _setup(seed)
    net = build(model_cfg).to(dev).train()
    classes, m = int(model_cfg["out_channels"]), int(model_cfg["num_modalities"])
    x = torch.randn(batch_size, 1, *roi, device=dev)
    y = torch.randint(0, classes, (batch_size, 1, *roi), device=dev)
    ids = np.arange(batch_size) % m
    loss_fn = DiceFocalLoss(
        to_onehot_y=True,
        softmax=True,
        squared_pred=True,
        include_background=loss_cfg["include_background"],
        smooth_nr=loss_cfg["smooth_nr"],
        smooth_dr=loss_cfg["smooth_dr"],
    )
    return dev, net, x, y, ids, loss_fn


def _adamw(net, optim_cfg):
    if optim_cfg["name"] != "adamw":
        raise ValueError(f"The PyTorch reference runs AdamW; got optim.name={optim_cfg['name']!r}.")
    return torch.optim.AdamW(
        net.parameters(),
        lr=optim_cfg["lr"],
        weight_decay=optim_cfg["weight_decay"],
        betas=(optim_cfg["b1"], optim_cfg["b2"]),
        eps=optim_cfg["eps"],
    )


def train_references(
    model_cfg: Mapping[str, Any],
    *,
    batch_size: int,
    roi: Sequence[int],
    loss_cfg: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
    warmup: int,
    repeats: int,
    steps_per_repeat: int,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Median train-step time of MI-Seg's formulation: ``{"reference": ...}`` (+ ``"reference_sync_free"`` on
    a GPU, where the CIN host syncs cost). Modalities alternate in the batch (0, 1, 0, ...)."""
    dev, net, x, y, ids, loss_fn = _train_parts(model_cfg, batch_size, roi, loss_cfg, seed)
    amp = dev.type == "cuda"
    out = {}
    for key, sync_free in (("reference", False), ("reference_sync_free", True)):
        if sync_free and dev.type != "cuda":
            continue
        _reset_memory(dev)
        opt = _adamw(net, optim_cfg)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp)
        modalities = ids.tolist() if sync_free else torch.from_numpy(ids).to(dev)
        step = _train_step(net, loss_fn, opt, scaler, x, y, modalities, amp)
        times = _time_repeats(step, dev, warmup, repeats, steps_per_repeat)
        step_s = statistics.median(times)
        out[key] = {
            "crops_per_s": batch_size / step_s,
            "step_s": step_s,
            "step_s_all": times,
            "params": num_params(net),
            "peak_bytes": _peak_memory(dev),
            **_env(dev, amp, sync_free),
        }
        del opt, scaler
    del net
    _reset_memory(dev)
    return out


def train_step_fn(
    model_cfg: Mapping[str, Any],
    *,
    batch_size: int,
    roi: Sequence[int],
    loss_cfg: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
    seed: int = 0,
) -> tuple[Callable[[], None], int]:
    """One train step of MI-Seg's faithful formulation (CPU, fp32), returning once it is done, and the
    network's parameter count: for timing step by step, interleaved with another implementation's."""
    dev, net, x, y, ids, loss_fn = _train_parts(model_cfg, batch_size, roi, loss_cfg, seed)
    if dev.type != "cpu":
        raise ValueError("The interleaved reference runs on the CPU only (on a GPU JAX holds the memory).")
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    step = _train_step(net, loss_fn, _adamw(net, optim_cfg), scaler, x, y, torch.from_numpy(ids), amp=False)
    return step, num_params(net)


def inference_references(
    model_cfg: Mapping[str, Any],
    *,
    volume_shape: Sequence[int],
    roi: Sequence[int],
    overlap: float,
    repeats: int,
    modality: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Volumes per minute of MONAI's sliding-window inference, one window per call (as CIN forces)."""
    dev = _setup(seed)
    amp = dev.type == "cuda"
    net = build(model_cfg).to(dev).eval()
    volume = torch.randn(1, 1, *volume_shape, device=dev)
    out = {}
    for key, sync_free in (("reference", False), ("reference_sync_free", True)):
        if sync_free and dev.type != "cuda":
            continue
        _reset_memory(dev)
        modalities = [modality] if sync_free else torch.tensor([modality], device=dev)
        predict = functools.partial(_predict_volume, net, volume, roi, overlap, modalities, amp)
        times = _time_repeats(predict, dev, 1, repeats, 1)
        volume_s = statistics.median(times)
        out[key] = {
            "volumes_per_min": 60.0 / volume_s,
            "volume_s": volume_s,
            "volume_s_all": times,
            "params": num_params(net),
            "peak_bytes": _peak_memory(dev),
            **_env(dev, amp, sync_free),
        }
    del net
    _reset_memory(dev)
    return out

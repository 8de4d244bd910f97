"""Optimizers and schedules vs PyTorch / MONAI (torch 2.13 CPU) and the MONAI 1.1.0 golden schedule."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from cinjax import optim

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "monai110_losses.npz")  # MONAI 1.1.0 values


def _config(**optim_overrides) -> ml_collections.ConfigDict:
    o = optim.default_optim_config()
    schedule = optim_overrides.pop("schedule", {})
    o.update(optim_overrides)
    o.schedule.update(schedule)
    return ml_collections.ConfigDict({"optim": o})


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def _grads(n, seed=1):
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
        for _ in range(n)
    ]


def _run_optax(tx, params, grads):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
    return p, state


def _run_torch(make_opt, params, grads, clip=None):
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = make_opt(list(tp.values()))
    for g in grads:
        for k, v in tp.items():
            v.grad = torch.tensor(g[k])
        if clip:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
        opt.step()
    return {k: v.detach().numpy() for k, v in tp.items()}


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k]), b[k], rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------- schedules


def test_warmup_cosine_matches_monai110_golden():
    golden = np.load(GOLDEN)["warmup_cosine_lr_multiplier_w10_t100_c0p5"]
    cfg = _config(lr=1.0, schedule={"name": "warmup_cosine", "warmup_steps": 10, "cycles": 0.5})
    _, schedule = optim.make_optimizer(cfg, total_steps=100)
    got = np.array([float(schedule(s)) for s in range(101)])
    np.testing.assert_allclose(got, golden, rtol=0, atol=1e-6)
    assert got[0] == 0.0  # MI-Seg's first epoch trains with lr 0 when warmup > 0


def test_warmup_cosine_steps_per_epoch_holds_lr_within_epoch():
    base = optim.warmup_cosine_schedule(2e-4, 5, 40)
    cfg = _config(lr=2e-4, schedule={"name": "warmup_cosine", "warmup_steps": 5, "steps_per_epoch": 3})
    _, schedule = optim.make_optimizer(cfg, total_steps=40)
    for step in range(120):
        assert float(schedule(step)) == float(base(step // 3))


def test_cosine_matches_torch_cosine_annealing():
    lr, t_max, eta_min = 1e-3, 7, 1e-5
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    expected = []
    for _ in range(3 * t_max):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    cfg = _config(lr=lr, schedule={"name": "cosine", "t_max": t_max, "min_lr": eta_min})
    _, schedule = optim.make_optimizer(cfg, total_steps=100)
    got = [float(schedule(s)) for s in range(3 * t_max)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-10)


def test_constant_and_plateau_base_schedules_are_constant():
    for name in ("constant", "reduce_on_plateau"):
        _, schedule = optim.make_optimizer(_config(lr=3e-4, schedule={"name": name}), total_steps=10)
        assert [float(schedule(s)) for s in (0, 5, 1000)] == pytest.approx([3e-4] * 3)


# ---------------------------------------------------------------------------------------- optimizers


def test_adamw_matches_torch():
    params, grads = _params(), _grads(4)
    cfg = _config(name="adamw", lr=1e-2, weight_decay=0.1, schedule={"name": "constant"})
    got, _ = _run_optax(optim.make_optimizer(cfg, 10)[0], params, grads)
    want = _run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), params, grads)
    _assert_tree_close(got, want)


def test_adam_l2_matches_torch():
    params, grads = _params(), _grads(4)
    cfg = _config(name="adam", lr=1e-2, weight_decay=0.1, schedule={"name": "constant"})
    got, _ = _run_optax(optim.make_optimizer(cfg, 10)[0], params, grads)
    want = _run_torch(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1), params, grads)
    _assert_tree_close(got, want)


def test_sgd_nesterov_matches_torch():
    params, grads = _params(), _grads(5)
    cfg = _config(
        name="sgd", lr=1e-2, weight_decay=1e-3, momentum=0.99, nesterov=True, schedule={"name": "constant"}
    )
    got, _ = _run_optax(optim.make_optimizer(cfg, 10)[0], params, grads)
    want = _run_torch(
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=1e-3), params, grads
    )
    _assert_tree_close(got, want)


def test_adamw_with_warmup_cosine_matches_torch_lambda_lr():
    params, grads = _params(), _grads(6)
    cfg = _config(
        name="adamw", lr=1e-2, weight_decay=1e-2, schedule={"name": "warmup_cosine", "warmup_steps": 2}
    )
    got, _ = _run_optax(optim.make_optimizer(cfg, total_steps=6)[0], params, grads)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=1e-2, weight_decay=1e-2)

    def mult(step):
        if step < 2:
            return step / 2
        return max(0.0, 0.5 * (1 + math.cos(math.pi * 0.5 * 2 * (step - 2) / 4)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, mult)
    for g in grads:
        for k, v in tp.items():
            v.grad = torch.tensor(g[k])
        opt.step()
        sched.step()
    _assert_tree_close(got, {k: v.detach().numpy() for k, v in tp.items()})


def test_clipping_matches_torch_clip_grad_norm():
    params = _params()
    grads = [jax.tree.map(lambda g: 10 * g, g) for g in _grads(3)]
    cfg = _config(name="adamw", lr=1e-2, weight_decay=1e-2, clip_norm=0.5, schedule={"name": "constant"})
    got, _ = _run_optax(optim.make_optimizer(cfg, 10)[0], params, grads)
    want = _run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2), params, grads, clip=0.5)
    _assert_tree_close(got, want, rtol=1e-4, atol=1e-5)
    # With plain SGD the clipped update has exactly the clip norm.
    cfg = _config(
        name="sgd", lr=1.0, weight_decay=0.0, momentum=0.0, clip_norm=0.5, schedule={"name": "constant"}
    )
    tx, _ = optim.make_optimizer(cfg, 10)
    u, _ = tx.update(jax.tree.map(jnp.asarray, grads[0]), tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(u)), 0.5, rtol=1e-6)


def test_accumulation_equals_big_batch_step():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32)
    params = {"w": jnp.asarray(_params()["w"]), "b": jnp.asarray(_params()["b"])}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    def make(k):
        cfg = _config(
            name="adamw", lr=1e-2, weight_decay=1e-2, accumulate_steps=k, schedule={"name": "constant"}
        )
        return optim.make_optimizer(cfg, 10)[0]

    big, small = make(1), make(2)
    p_big, s_big = params, big.init(params)
    p_acc, s_acc = params, small.init(params)
    for _ in range(3):
        u, s_big = big.update(jax.grad(loss)(p_big, x, y), s_big, p_big)
        p_big = optax.apply_updates(p_big, u)
        for half in (slice(0, 4), slice(4, 8)):
            before = p_acc
            u, s_acc = small.update(jax.grad(loss)(p_acc, x[half], y[half]), s_acc, p_acc)
            p_acc = optax.apply_updates(p_acc, u)
            if half.start == 0:  # no parameter change on the first micro-batch
                _assert_tree_close(p_acc, jax.tree.map(np.asarray, before), rtol=0, atol=0)
    _assert_tree_close(p_acc, jax.tree.map(np.asarray, p_big), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------- plateau


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "min", "patience": 3},
        {"mode": "min", "patience": 1, "cooldown": 2, "min_lr": 2e-6},
        {"mode": "max", "patience": 2, "threshold_mode": "abs", "threshold": 0.01},
        {"mode": "max", "patience": 0, "factor": 0.5},
    ],
)
def test_plateau_controller_matches_torch(kwargs):
    rng = np.random.default_rng(3)
    values = list(np.round(rng.normal(size=40).cumsum() * 0.1 + 1.0, 3)) + [float("nan"), 0.5, 0.5, 0.5]
    lr = 1e-3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    ctrl = optim.PlateauController(lr, **kwargs)
    reductions = 0
    for v in values:
        sched.step(v)
        m = ctrl.step(v)
        np.testing.assert_allclose(m * lr, opt.param_groups[0]["lr"], rtol=1e-12)
        reductions += m < 1
    assert reductions > 0  # the sequence does exercise a reduction


def test_plateau_controller_from_config_and_state_roundtrip():
    cfg = _config(lr=1e-3, schedule={"name": "reduce_on_plateau", "plateau_patience": 1})
    ctrl = optim.PlateauController.from_config(cfg)
    for v in (1.0, 1.0, 1.0):
        ctrl.step(v)
    assert ctrl.multiplier == pytest.approx(0.1)
    clone = optim.PlateauController.from_config(cfg)
    clone.load_state_dict(ctrl.state_dict())
    assert [clone.step(v) for v in (2.0, 2.0, 2.0)] == [ctrl.step(v) for v in (2.0, 2.0, 2.0)]


def _lr_multiplier(opt_state) -> float:
    leaves = jax.tree.leaves(opt_state, is_leaf=optim._is_multiplier)
    return float(next(n for n in leaves if optim._is_multiplier(n)).lr_multiplier)


def test_lr_multiplier_scales_updates_inside_jit_and_accumulation():
    params = jax.tree.map(jnp.asarray, _params())
    grads = jax.tree.map(jnp.asarray, _grads(1)[0])
    for k in (1, 2):
        cfg = _config(
            name="sgd",
            lr=0.1,
            weight_decay=0.0,
            momentum=0.0,
            accumulate_steps=k,
            schedule={"name": "constant"},
        )
        tx, _ = optim.make_optimizer(cfg, 10)
        state = tx.init(params)
        assert _lr_multiplier(state) == 1.0
        state = optim.set_lr_multiplier(state, 0.1)
        assert _lr_multiplier(state) == pytest.approx(0.1)
        update = jax.jit(tx.update)
        for _ in range(k):
            u, state = update(grads, state, params)
        np.testing.assert_allclose(np.asarray(u["w"]), -0.01 * np.asarray(grads["w"]), rtol=1e-6)
    with pytest.raises(ValueError, match="lr_multiplier"):
        optim.set_lr_multiplier(optax.sgd(0.1).init(params), 0.5)


def test_config_errors_are_explicit():
    with pytest.raises(ValueError, match="config.optim.name"):
        optim.make_optimizer(_config(name="lamb"), 10)
    with pytest.raises(ValueError, match="schedule.name"):
        optim.make_optimizer(_config(schedule={"name": "step"}), 10)
    with pytest.raises(ValueError, match="accumulate_steps"):
        optim.make_optimizer(_config(accumulate_steps=0), 10)
    with pytest.raises(ValueError, match="'optim' section"):
        optim.make_optimizer(optim.default_optim_config(), 10)


def test_set_lr_multiplier_keeps_replicated_sharding():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(jax.tree.map(jnp.asarray, _params()), replicated)
    tx, _ = optim.make_optimizer(_config(), 10)
    state = jax.jit(tx.init, out_shardings=replicated)(params)
    new = optim.set_lr_multiplier(state, 0.25)
    leaf = [n for n in jax.tree.leaves(new, is_leaf=optim._is_multiplier) if optim._is_multiplier(n)][0]
    assert leaf.lr_multiplier.sharding == replicated
    assert _lr_multiplier(new) == 0.25

"""Style interventions: the label never changes, outputs are valid and seeded, plug-ins are checked."""

import pickle

import numpy as np
import pytest

from cinjax.data import style

SHAPE = (6, 7, 8)
NOT_CALLABLE = 3


class TinyGenerator:
    """A mask-conditioned toy generator: a random intensity per label class, blended with the image."""

    def __init__(self, *, strength: float = 0.5):
        self.strength = np.float32(strength)

    def __call__(self, image, label, rng):
        table = rng.uniform(0.0, 1.0, size=int(label.max()) + 1).astype(np.float32)
        return ((1 - self.strength) * image + self.strength * table[label][..., None]).astype(np.float32)


def tiny_generator(image, label, rng):
    return TinyGenerator()(image, label, rng)


def make_tiny(*, strength: float = 0.5):
    return TinyGenerator(strength=strength)


def make_not_callable():
    return 42


def wrong_shape(image, label, rng):
    return image[:-1].copy()


def wrong_dtype(image, label, rng):
    return image.astype(np.float64)


def with_nan(image, label, rng):
    out = image.copy()
    out[0, 0, 0, 0] = np.nan
    return out


def writes_label(image, label, rng):
    label[...] = 0
    return image.copy()


GEN = f"{__name__}:tiny_generator"


@pytest.fixture
def pair():
    rng = np.random.default_rng(123)
    label = rng.integers(0, 3, size=SHAPE).astype(np.uint8)
    image = (0.3 * label[..., None] + 0.2 * rng.random((*SHAPE, 1))).astype(np.float32)
    return image, label


INTERVENTIONS = {
    "gin": style.gin,
    "gin_k3_wide": lambda i, m, r: style.gin(i, m, r, layers=2, channels=3, kernel_sizes=(3,)),
    "bezier_monotone": lambda i, m, r: style.bezier(i, m, r, monotone=True),
    "bezier_free": lambda i, m, r: style.bezier(i, m, r, monotone=False),
    "restyler": style.Restyler(),
    "restyler_generator": style.Restyler({"interventions": ("generator",), "generator": GEN}),
    "restyle_all": lambda i, m, r: style.restyle(
        i, m, r, {"interventions": "gin,bezier,generator", "generator": GEN}
    ),
}


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_label_kept_output_valid_and_seeded(pair, name):
    fn = INTERVENTIONS[name]
    image, label = pair
    image_before, label_before = image.copy(), label.copy()
    out = fn(image, label, np.random.default_rng(0))
    assert np.array_equal(label, label_before) and label.dtype == np.uint8  # bit-identical, not in place
    assert np.array_equal(image, image_before)  # the input image is not modified either
    assert out.shape == image.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert not np.shares_memory(out, image)
    assert not np.allclose(out, image, atol=1e-3)  # it does restyle
    assert np.array_equal(out, fn(image, label, np.random.default_rng(0)))
    assert np.array_equal(out, fn(image, label, 0))  # an int seed is the same as default_rng(seed)
    assert not np.array_equal(out, fn(image, label, np.random.default_rng(1)))


def test_multichannel_and_constant_channel(pair):
    image, label = pair
    two = np.concatenate([image, np.full_like(image, 0.25)], axis=-1)
    for fn in (style.gin, style.bezier):
        out = fn(two, label, 5)
        assert out.shape == two.shape and out.dtype == np.float32
        assert np.array_equal(out[..., 1], two[..., 1])  # no range: left as it was
        assert not np.allclose(out[..., 0], two[..., 0], atol=1e-3)


def test_gin_keeps_the_intensity_range(pair):
    image, label = pair
    for seed in range(5):
        out = style.gin(image, label, seed)
        np.testing.assert_allclose([out.min(), out.max()], [image.min(), image.max()], atol=1e-6)


def _ramp():
    values = np.linspace(0.1, 0.9, int(np.prod(SHAPE)), dtype=np.float32)
    return values.reshape(*SHAPE, 1), np.zeros(SHAPE, np.uint8)


def test_monotone_bezier_keeps_the_order():
    image, label = _ramp()
    for seed in range(20):
        out = style.bezier(image, label, seed, monotone=True).ravel()
        assert np.all(np.diff(out) >= -1e-6)
        np.testing.assert_allclose([out[0], out[-1]], [0.1, 0.9], atol=1e-5)


def test_free_bezier_can_invert_the_order():
    image, label = _ramp()
    correlations = [
        np.corrcoef(image.ravel(), style.bezier(image, label, seed, monotone=False).ravel())[0, 1]
        for seed in range(20)
    ]
    assert min(correlations) < -0.5  # some curves invert dark and bright
    assert max(correlations) > 0.5


def test_restyler_draws_uniformly_then_applies(pair):
    image, label = pair
    restyler = style.Restyler(style.StyleConfig(interventions=("gin", "bezier")))
    chosen = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        name = ("gin", "bezier")[int(rng.integers(2))]
        chosen.append(name)
        assert np.array_equal(restyler(image, label, seed), restyler.apply(name, image, label, rng))
    assert set(chosen) == {"gin", "bezier"}


def test_restyler_pickles_with_its_plugin(pair):
    image, label = pair
    restyler = style.Restyler({"interventions": ("gin", "generator"), "generator": GEN})
    clone = pickle.loads(pickle.dumps(restyler))
    for seed in range(4):
        assert np.array_equal(clone(image, label, seed), restyler(image, label, seed))


@pytest.mark.parametrize(
    "spec, kwargs",
    [(GEN, {}), (f"{__name__}:TinyGenerator", {}), (f"{__name__}:make_tiny", {"strength": 0.8})],
)
def test_plugin_forms(pair, spec, kwargs):
    image, label = pair
    generator = style.load_generator(spec, kwargs)
    assert isinstance(generator, style.StyleGenerator)
    restyler = style.Restyler(
        style.StyleConfig.from_mapping(
            {"interventions": ("generator",), "generator": spec, "generator_kwargs": kwargs}
        )
    )
    out = restyler(image, label, 3)
    expected = TinyGenerator(strength=kwargs.get("strength", 0.5))(image, label, np.random.default_rng(3))
    assert np.array_equal(out, expected)


def test_plugin_gets_read_only_copies(pair):
    image, label = pair
    restyler = style.Restyler({"interventions": ("generator",), "generator": f"{__name__}:writes_label"})
    with pytest.raises(ValueError, match="read-only"):
        restyler(image, label, 0)
    assert label.any()


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("no_colon_here", {}, "package.module:callable"),
        (":tiny_generator", {}, "package.module:callable"),
        ("cinjax_no_such_module_xyz:f", {}, "cannot import module"),
        (f"{__name__}:missing", {}, "no attribute 'missing'"),
        (f"{__name__}:NOT_CALLABLE", {}, "not callable"),
        (f"{__name__}:make_not_callable", {}, "returned int"),
        (f"{__name__}:tiny_generator", {"strength": 1.0}, "neither a generator"),
        (f"{__name__}:make_tiny", {"bogus": 1}, "neither a generator"),
    ],
)
def test_plugin_spec_errors(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        style.Restyler({"interventions": ("generator",), "generator": spec, "generator_kwargs": kwargs})


@pytest.mark.parametrize(
    "name, match", [("wrong_shape", "shape"), ("wrong_dtype", "dtype float64"), ("with_nan", "non-finite")]
)
def test_plugin_output_errors(pair, name, match):
    image, label = pair
    restyler = style.Restyler({"interventions": ("generator",), "generator": f"{__name__}:{name}"})
    with pytest.raises(ValueError, match=match):
        restyler(image, label, 0)


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"interventoins": ("gin",)}, "interventoins"),
        ({"interventions": ("gin", "diffusion")}, r"unknown \['diffusion'\]; valid: gin, bezier, generator"),
        ({"interventions": ()}, "empty"),
        ({"interventions": ("gin", "gin")}, "twice"),
        ({"interventions": ("generator",)}, "needs a 'package.module:callable' spec"),
        ({"generator": GEN}, "a spec needs the intervention"),
        ({"generator_kwargs": {"a": 1}}, "no generator spec"),
        ({"gin_layers": 0}, "gin_layers"),
        ({"gin_kernel_sizes": (2,)}, "gin_kernel_sizes"),
        ({"bezier_monotone_prob": 1.5}, "bezier_monotone_prob"),
    ],
)
def test_config_errors(mapping, match):
    with pytest.raises(ValueError, match=match):
        style.StyleConfig.from_mapping(mapping)


def test_config_defaults_and_string_form():
    cfg = style.StyleConfig.from_mapping({"interventions": "gin, bezier"})
    assert cfg == style.StyleConfig()
    assert cfg.interventions == ("gin", "bezier") and cfg.gin_layers == 4 and cfg.gin_channels == 2


def test_bad_inputs(pair):
    image, label = pair
    with pytest.raises(ValueError, match="does not match"):
        style.gin(image, label[:-1], 0)
    with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
        style.bezier(image[..., 0], label, 0)
    with pytest.raises(TypeError, match="rng"):
        style.bezier(image, label, 0.5)

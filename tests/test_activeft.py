"""ActiveFT (stage 1) against the NumPy reference and an independent PyTorch port of the
authors' loss."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilaf_jax.activeft import activeft, activeft_loss, authors_imagenet_draws
from tests import reference_core as ref


def _features(digits, n=600):
    x, _ = digits
    return x[:n]


def test_loss_and_gradient_match_numpy_reference(digits, rng):
    feats = ref.normalize(_features(digits).astype(np.float64))
    theta = feats[rng.choice(len(feats), 20, replace=False)] + 0.01 * rng.normal(size=(20, 64))
    for tau, lam in [(0.07, 1.0), (0.2, 0.5)]:
        want_loss, want_grad = ref.activeft_loss_and_grad(theta, feats, tau, lam)
        with jax.enable_x64(True):
            loss, grad = jax.value_and_grad(activeft_loss)(
                jnp.asarray(theta), jnp.asarray(feats), tau, lam, chunk_size=128)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-7, atol=1e-12)


def test_matches_numpy_reference_run(digits):
    x = _features(digits)
    init = np.random.default_rng(1).choice(len(x), 15, replace=False)
    want_idx, want_matched, want_losses = ref.activeft(x, init, num_steps=60, tau=0.07, lr=1e-2)
    with jax.enable_x64(True):
        out = activeft(jax.random.key(0), x.astype(np.float64), 15, num_steps=60,
                       learning_rate=1e-2, init_indices=init)
    np.testing.assert_allclose(out.losses, want_losses, rtol=1e-5)
    np.testing.assert_array_equal(out.matched_indices, want_matched)
    np.testing.assert_array_equal(out.indices, want_idx)
    np.testing.assert_array_equal(out.init_indices, init)


def _authors_style_torch(features, init, num_steps, tau=0.07, lr=1e-3, lam=1.0):
    """An independent PyTorch port of the authors' ActiveFT (their loss form, torch Adam,
    torch.sort-based greedy mapping), float32 as they run it."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional.normalize(torch.tensor(features, dtype=torch.float32), dim=1)
    theta = torch.nn.Parameter(f[torch.as_tensor(init)].clone())
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(num_steps):
        c = torch.nn.functional.normalize(theta, dim=1)
        e_all = torch.exp(f @ c.T / tau)
        e, pos = torch.max(e_all, dim=1)
        big_s = torch.exp(c.detach() @ c.T / tau).sum(dim=0)
        loss = -torch.mean(torch.log(e) - torch.log(e + big_s[pos] * lam))
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.nn.functional.normalize(theta.detach(), dim=1)
    order = torch.sort(c @ f.T, dim=1, descending=True).indices
    taken = []
    for row in order.tolist():
        taken.append(next(i for i in row if i not in taken))
    return np.asarray(taken)  # centroid order


@pytest.mark.parametrize("dataset", ["digits", "fashion_mnist_pixels"])
def test_agrees_with_pytorch_port_on_real_images(dataset, digits):
    """Same init, 300 steps: the same samples as the authors' formulation, centroid by
    centroid (float32 both; a tie-breaking or Adam-constant slip changes some)."""
    if dataset == "digits":
        x, k = digits[0], 50
    else:
        import gzip

        from bilaf_jax.data import raw_data_dir
        from tests.conftest import fashion_mnist_or_skip

        fashion_mnist_or_skip()
        with gzip.open(raw_data_dir("fashion_mnist", None) / "train-images-idx3-ubyte.gz") as fh:
            x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784)[:3000]
        x, k = x.astype(np.float32), 30
    init = np.random.default_rng(0).choice(len(x), k, replace=False)
    want = _authors_style_torch(x, init, 300)
    got = np.asarray(activeft(jax.random.key(0), x, k, init_indices=init).matched_indices)
    np.testing.assert_array_equal(got, want)


def test_an_all_zero_row_as_a_starting_centroid(digits):
    """A blank image's raw pixels (or a dead-ReLU feature row) drawn as a starting centroid: its
    normalised copy is zero and its gradient finite (1 / eps, as torch's normalize), so the run
    stays finite and agrees with the reference and with the PyTorch port."""
    x = _features(digits, 300).copy()
    x[7] = 0.0
    init = np.array([7, 20, 33, 120, 250])
    want_idx, want_matched, want_losses = ref.activeft(x, init, num_steps=30)
    with jax.enable_x64(True):
        out = activeft(jax.random.key(0), x.astype(np.float64), 5, num_steps=30, init_indices=init)
    assert np.isfinite(np.asarray(out.losses)).all() and np.isfinite(np.asarray(out.centroids)).all()
    np.testing.assert_allclose(out.losses, want_losses, rtol=1e-6)
    np.testing.assert_array_equal(out.indices, want_idx)
    got32 = activeft(jax.random.key(0), x, 5, num_steps=30, init_indices=init).indices
    np.testing.assert_array_equal(got32, want_idx)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    np.testing.assert_array_equal(_authors_style_torch(x, init, 30), want_idx)


def test_minibatch_variant_is_deterministic_and_differs_from_full_batch(digits):
    x = _features(digits)
    a = activeft(jax.random.key(3), x, 10, num_steps=20, batch_size=200)
    b = activeft(jax.random.key(3), x, 10, num_steps=20, batch_size=200)
    c = activeft(jax.random.key(3), x, 10, num_steps=20)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.init_indices, c.init_indices)
    assert not np.array_equal(a.losses, c.losses)


def test_minibatch_variant_matches_numpy_reference(digits):
    """The ImageNet variant: each step's data term over a fresh batch of distinct rows, the
    Gram term over all K centroids. Given the same batches, the reference's run."""
    x = _features(digits)
    init = np.random.default_rng(1).choice(len(x), 12, replace=False)
    key = jax.random.key(5)
    # The rows each step draws (see activeft's batch_size): the second half of the key's split.
    batch_key = jax.random.split(key)[1]
    batches = [np.asarray(jax.random.choice(jax.random.fold_in(batch_key, t), len(x), (150,),
                                            replace=False)) for t in range(40)]
    assert all(len(set(b.tolist())) == 150 for b in batches)
    assert len({b.tobytes() for b in batches}) == 40  # a fresh batch each step
    want_idx, want_matched, want_losses = ref.activeft(x, init, num_steps=40, lr=1e-2,
                                                       batches=batches)
    with jax.enable_x64(True):
        out = activeft(key, x.astype(np.float64), 12, num_steps=40, learning_rate=1e-2,
                       init_indices=init, batch_size=150)
    np.testing.assert_allclose(out.losses, want_losses, rtol=1e-5)
    np.testing.assert_array_equal(out.matched_indices, want_matched)
    np.testing.assert_array_equal(out.indices, want_idx)
    full = ref.activeft(x, init, num_steps=40, lr=1e-2)[2]
    assert not np.allclose(full, want_losses, rtol=1e-3)  # the batches made a difference
    # the same batches given as batch_indices (with another key): the same run
    with jax.enable_x64(True):
        given = activeft(jax.random.key(9), x.astype(np.float64), 12, num_steps=40,
                         learning_rate=1e-2, init_indices=init, batch_size=150,
                         batch_indices=np.stack(batches))
    np.testing.assert_array_equal(given.losses, out.losses)
    np.testing.assert_array_equal(given.matched_indices, want_matched)


def test_authors_imagenet_draws_replay_their_script(digits):
    """The authors' ImageNet script seeds Python's random with 0, then random.sample's the
    initial rows and each step's batch from the list of row ids; given those rows, activeft
    makes the reference's run."""
    state = random.getstate()
    try:  # as their script draws: the module's generator, seeded once
        random.seed(0)
        ids = list(range(500))
        want_init = random.sample(ids, 12)
        want_batches = [random.sample(ids, 150) for _ in range(30)]
    finally:
        random.setstate(state)
    init, batches = authors_imagenet_draws(500, 12, num_steps=30, batch_size=150)
    assert init.tolist() == want_init and batches.tolist() == want_batches
    x = _features(digits)[:500]
    want_idx, _, want_losses = ref.activeft(x, init, num_steps=30, lr=1e-2, batches=batches)
    with jax.enable_x64(True):
        out = activeft(jax.random.key(0), x.astype(np.float64), 12, num_steps=30,
                       learning_rate=1e-2, init_indices=init, batch_size=150,
                       batch_indices=batches)
    np.testing.assert_allclose(out.losses, want_losses, rtol=1e-5)
    np.testing.assert_array_equal(out.indices, want_idx)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_indices=np.zeros((2, 5), int)), "needs batch_size"),
    (dict(batch_size=5, batch_indices=np.arange(10).reshape(5, 2)),
     r"shape \(num_steps, batch_size\) = \(2, 5\), got \(5, 2\)"),
    (dict(batch_size=5, batch_indices=[[0, 1, 2, 3, 4], [0, 1, 2, 3, 3]]),
     r"batch_indices\[1\] has repeated entries"),
    (dict(batch_size=5, batch_indices=[[0, 1, 2, 3, 4], [0, 1, 2, 3, 100]]),
     r"batch_indices\[1\] out of range \[0, 100\)"),
])
def test_bad_batch_indices_are_refused(kwargs, match):
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        activeft(jax.random.key(0), x, 3, num_steps=2, **kwargs)


def test_loss_decreases_and_custom_optimizer(digits):
    x = _features(digits)
    out = activeft(jax.random.key(0), x, 20, num_steps=100)
    assert out.losses[-1] < out.losses[0]
    sgd = optax.sgd(0.5)
    out2 = activeft(jax.random.key(0), x, 20, num_steps=100, optimizer=sgd)
    assert out2.losses[-1] < out2.losses[0]
    assert not np.allclose(out.losses, out2.losses)


def test_vmap_over_temperature_learning_rate_balance(digits):
    x = _features(digits, 300)
    key = jax.random.key(0)
    temps = jnp.array([0.05, 0.07, 0.2])
    lrs = jnp.array([1e-3, 3e-3, 1e-2])
    bals = jnp.array([1.0, 0.5, 2.0])
    swept = jax.vmap(lambda t, lr, b: activeft(key, x, 8, num_steps=30, temperature=t,
                                                 learning_rate=lr, balance=b))(temps, lrs, bals)
    for i in range(3):
        one = activeft(key, x, 8, num_steps=30, temperature=float(temps[i]),
                       learning_rate=float(lrs[i]), balance=float(bals[i]))
        np.testing.assert_array_equal(swept.indices[i], one.indices)
        np.testing.assert_allclose(swept.losses[i], one.losses, rtol=1e-5)


def test_jit_eager_parity(digits):
    x = _features(digits, 300)
    init = np.arange(0, 300, 30)
    jitted = activeft(jax.random.key(0), x, 10, num_steps=6, init_indices=init)
    with jax.disable_jit():
        eager = activeft(jax.random.key(0), x, 10, num_steps=6, init_indices=init)
    np.testing.assert_array_equal(jitted.indices, eager.indices)
    np.testing.assert_allclose(jitted.losses, eager.losses, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=101), "num_samples"),
        (dict(num_samples=3, init_indices=[0, 1]), "length 3"),
        (dict(num_samples=3, init_indices=[0, 1, 100]), "out of range"),
        (dict(num_samples=3, init_indices=[0, 1, 1]), "repeated"),
        (dict(num_samples=3, temperature=0.0), "temperature"),
        (dict(num_samples=3, balance=-1.0), "balance"),
        (dict(num_samples=3, batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        activeft(jax.random.key(0), x, **kwargs)


def test_bfloat16_matmuls_pick_nearly_the_same_samples(digits):
    x = digits[0]
    init = np.random.default_rng(0).choice(len(x), 40, replace=False)
    full = activeft(jax.random.key(0), x, 40, num_steps=100, init_indices=init)
    fast = activeft(jax.random.key(0), x, 40, num_steps=100, init_indices=init, precision="bfloat16")
    assert len(set(np.asarray(full.indices)) & set(np.asarray(fast.indices))) >= 36
    with pytest.raises(ValueError, match="precision"):
        activeft(jax.random.key(0), x, 4, precision="half")


def test_zero_steps_empty_exclude_and_unrepresentable_temperature(digits):
    x = digits[0][:300].astype(np.float32)
    key = jax.random.key(3)
    out = activeft(key, x, 8, num_steps=0)
    assert out.losses.shape == (0,) and len(np.unique(np.asarray(out.indices))) == 8
    # No optimisation: each initial row is its own centroid's nearest sample.
    np.testing.assert_array_equal(np.asarray(out.indices), np.sort(np.asarray(out.init_indices)))
    a = activeft(key, x, 8, num_steps=5, exclude=[])
    b = activeft(key, x, 8, num_steps=5)
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    with pytest.raises(ValueError, match="not representable in float32"):
        activeft(key, x, 8, num_steps=5, temperature=1e-39)


def test_labelled_rows_shape_the_objective_but_are_never_picked(digits):
    """exclude: labelled rows are never initial centroids and never matched, but stay in the
    loss (they pull centroids towards covered regions); against the NumPy reference with the
    same initial rows."""
    x = _features(digits)
    labeled = np.arange(0, len(x), 7)  # a seventh of the pool
    with jax.enable_x64(True):
        out = activeft(jax.random.key(3), x.astype(np.float64), 15, num_steps=60,
                       learning_rate=1e-2, exclude=labeled)
    init = np.asarray(out.init_indices)
    assert not set(init.tolist()) & set(labeled.tolist())
    want_idx, want_matched, want_losses = ref.activeft(x, init, num_steps=60, lr=1e-2,
                                                       exclude=labeled)
    np.testing.assert_allclose(out.losses, want_losses, rtol=1e-5)
    np.testing.assert_array_equal(out.matched_indices, want_matched)
    assert not set(want_matched.tolist()) & set(labeled.tolist())


def test_a_pool_of_tiny_values_selects_as_at_ordinary_scale(digits):
    """Values down to about 1e-16 pass validation, but normalize's eps (1e-12, torch's) left
    rows of norm below it short of unit length, and the picks changed (from 2**-44 on here).
    Scaled by powers of two, the pool selects the same rows with the same losses."""
    x = _features(digits, 300)
    want = activeft(jax.random.key(0), x, 8, num_steps=20)
    for k in (44, 50):
        got = activeft(jax.random.key(0), x * np.float32(2.0**-k), 8, num_steps=20)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.losses, want.losses)
    with jax.enable_x64(True):
        want = activeft(jax.random.key(0), x.astype(np.float64), 8, num_steps=20)
        got = activeft(jax.random.key(0), x.astype(np.float64) * 2.0**-400, 8, num_steps=20)
        np.testing.assert_array_equal(got.indices, want.indices)


def test_loss_gradient_takes_the_centroids_dtype(digits, rng):
    """float32 centroids against float64 or bfloat16 features: the gradient is float32 and
    equals the reference's (the backward pass cast it to the features' dtype, and JAX refused
    the mismatch with a TypeError about lax.add)."""
    feats = ref.normalize(_features(digits, 300).astype(np.float64))
    theta = feats[rng.choice(len(feats), 12, replace=False)] + 0.01 * rng.normal(size=(12, 64))
    _, want = ref.activeft_loss_and_grad(theta, feats, 0.07, 1.0)
    theta32 = jnp.asarray(theta, jnp.float32)
    with jax.enable_x64(True):
        grad = jax.grad(activeft_loss)(theta32, jnp.asarray(feats, jnp.float64), 0.07, 1.0)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    low = jnp.asarray(feats, jnp.bfloat16)
    grad = jax.grad(activeft_loss)(theta32, low, 0.07, 1.0)
    assert grad.dtype == jnp.float32
    _, want = ref.activeft_loss_and_grad(theta, np.asarray(low, np.float64), 0.07, 1.0)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_padding_rows_do_not_change_the_scale(digits):
    """Rows from num_rows on are ignored whatever they hold: padding of ordinary values
    stopped a pool of tiny values from being lifted to unit rows, and the picks changed."""
    x = _features(digits, 300) * np.float32(2.0**-50)
    padded = np.concatenate([x, np.ones((4, x.shape[1]), np.float32)])
    want = activeft(jax.random.key(0), x, 8, num_steps=20)
    got = activeft(jax.random.key(0), padded, 8, num_steps=20, num_rows=300)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-6)  # a masked mean's rounding


def test_padding_rows_do_not_change_the_initial_draw_with_excluded_rows(digits):
    """With excluded rows the initial centroids are drawn over the real rows, so a padded pool
    starts where the unpadded one does, also where JAX's PRNG is not partitionable (its bits
    then depend on the length drawn over)."""
    x = _features(digits, 300)
    padded = np.concatenate([x, np.zeros((5, x.shape[1]), np.float32)])
    labeled = np.arange(0, 300, 4)
    with jax.threefry_partitionable(False):
        want = activeft(jax.random.key(1), x, 10, num_steps=5, exclude=labeled)
        got = activeft(jax.random.key(1), padded, 10, num_steps=5, exclude=labeled, num_rows=300)
    np.testing.assert_array_equal(got.init_indices, want.init_indices)
    np.testing.assert_array_equal(got.indices, want.indices)

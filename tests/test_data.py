"""common.py's data loaders on tiny files in the publishers' formats, a local HTTP server, and the offline copies."""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import struct
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import MNIST_SHA256, DataError, download_mnist, load_celeba, load_mnist, read_idx

SHARED_DATA = "/work/shared/data"
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def assert_one_line_naming(error, path):
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert str(path) in message, message


# --- MNIST ---


def idx_bytes(array, magic):
    """The IDX encoding of a uint8 array: big-endian magic and dimensions, then the raw bytes."""
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()


def tiny_mnist(folder, compressed=True, train=5, test=3):
    """Write the four MNIST files with `train` and `test` random images; return {file name: array}."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array, 2051 if array.ndim == 3 else 2049)
        if compressed:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compressed", [True, False])
def test_load_mnist_returns_the_exact_pixels(tmp_path, compressed):
    arrays = tiny_mnist(tmp_path, compressed)
    for split, name, count in (("train", "train-images-idx3-ubyte", 5), ("test", "t10k-images-idx3-ubyte", 3)):
        images = load_mnist(tmp_path, split)
        assert images.dtype == torch.uint8 and images.shape == (count, 1, 28, 28)
        assert torch.equal(images[:, 0], torch.from_numpy(arrays[name]))
    labels = read_idx(str(tmp_path / ("train-labels-idx1-ubyte" + (".gz" if compressed else ""))), 2049)
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])


def replace_file(path, data):
    path.write_bytes(data)
    return path


def remove(path):
    shutil.rmtree(path) if path.is_dir() else os.remove(path)
    return path


def images_raw(tmp_path):
    return (tmp_path / "train-images-idx3-ubyte").read_bytes()


def gzip_only(tmp_path, damage):
    """Replace the raw train images by a damaged gzip copy, so that the gzip file is the one read."""
    path = replace_file(tmp_path / "train-images-idx3-ubyte.gz", damage(gzip.compress(images_raw(tmp_path))))
    os.remove(tmp_path / "train-images-idx3-ubyte")
    return path


# Each case damages the raw train files of tiny_mnist and returns the file the message must name.
MNIST_DAMAGE = {
    "missing": lambda tmp_path: remove(tmp_path / "train-labels-idx1-ubyte"),
    "wrong magic": lambda tmp_path: replace_file(
        tmp_path / "train-images-idx3-ubyte", struct.pack(">I", 2049) + images_raw(tmp_path)[4:]
    ),
    "truncated": lambda tmp_path: replace_file(tmp_path / "train-images-idx3-ubyte", images_raw(tmp_path)[:-100]),
    "short header": lambda tmp_path: replace_file(tmp_path / "train-images-idx3-ubyte", images_raw(tmp_path)[:10]),
    "trailing bytes": lambda tmp_path: replace_file(tmp_path / "train-images-idx3-ubyte", images_raw(tmp_path) + b"x"),
    "count mismatch": lambda tmp_path: replace_file(
        tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8), 2049)
    ),
    "not 28x28": lambda tmp_path: replace_file(
        tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((5, 28, 27), np.uint8), 2051)
    ),
    "label above 9": lambda tmp_path: replace_file(
        tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.full(5, 10, np.uint8), 2049)
    ),
    "corrupt gzip": lambda tmp_path: gzip_only(tmp_path, lambda data: data[:20] + b"\xff" * 40),
    "cut gzip": lambda tmp_path: gzip_only(tmp_path, lambda data: data[:-30]),
}


@pytest.mark.parametrize("case", MNIST_DAMAGE)
def test_bad_mnist_files_raise_one_line_naming_the_file(tmp_path, case):
    tiny_mnist(tmp_path, compressed=False)
    bad_path = MNIST_DAMAGE[case](tmp_path)
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, "train")
    assert_one_line_naming(error, bad_path)
    assert "--download" in str(error.value)


def test_load_mnist_prefers_the_raw_file(tmp_path):
    arrays = tiny_mnist(tmp_path, compressed=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    assert torch.equal(load_mnist(tmp_path, "train")[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))


@pytest.fixture
def mnist_server(tmp_path):
    """A local HTTP server for tiny MNIST .gz files: (base_url, checksums, served arrays, requested paths)."""
    served = tmp_path / "served"
    arrays = tiny_mnist(served / "mnist")
    checksums = {}
    for name, array in arrays.items():
        checksums[f"{name}.gz"] = hashlib.sha256(idx_bytes(array, 2051 if array.ndim == 3 else 2049)).hexdigest()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", checksums, arrays, requests
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_then_load_then_skip_valid_files(tmp_path, mnist_server, monkeypatch):
    base_url, checksums, arrays, requests = mnist_server
    data_dir = tmp_path / "data"
    # load_mnist(download=True) calls download_mnist with the real mirror: point it at the local server instead.
    monkeypatch.setattr(
        common, "download_mnist", functools.partial(download_mnist, base_url=base_url, checksums=checksums)
    )
    images = load_mnist(str(data_dir), "test", download=True)
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert sorted(os.listdir(data_dir)) == sorted(f"{name}.gz" for name in MNIST_NAMES)
    assert len(requests) == 4

    requests.clear()
    download_mnist(str(data_dir), base_url, checksums)
    assert requests == []
    # a damaged file is fetched again, and only that one
    (data_dir / "train-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    download_mnist(str(data_dir), base_url, checksums)
    assert requests == ["/mnist/train-labels-idx1-ubyte.gz"]
    assert load_mnist(str(data_dir), "train").shape == (5, 1, 28, 28)


def test_checksum_mismatch_writes_nothing_and_keeps_the_old_file(tmp_path, mnist_server):
    base_url, checksums, _, _ = mnist_server
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train-images-idx3-ubyte.gz").write_bytes(b"an old file")
    wrong = dict(checksums, **{"train-images-idx3-ubyte.gz": "0" * 64})
    with pytest.raises(DataError) as error:
        download_mnist(str(data_dir), base_url, wrong)
    assert_one_line_naming(error, "train-images-idx3-ubyte.gz")
    assert f"{base_url}train-images-idx3-ubyte.gz" in str(error.value)
    assert os.listdir(data_dir) == ["train-images-idx3-ubyte.gz"]  # no temporary file either
    assert (data_dir / "train-images-idx3-ubyte.gz").read_bytes() == b"an old file"


def test_failed_download_names_the_url(tmp_path, mnist_server):
    base_url, checksums, _, _ = mnist_server
    with pytest.raises(DataError) as error:
        download_mnist(str(tmp_path / "data"), base_url, {"no-such-file.gz": "0" * 64})
    assert_one_line_naming(error, f"{base_url}no-such-file.gz")
    assert os.listdir(tmp_path / "data") == []


def test_missing_mnist_says_pass_download(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(str(tmp_path), "train")
    assert_one_line_naming(error, tmp_path / "train-images-idx3-ubyte")
    assert "--download" in str(error.value) and "--data-dir" in str(error.value)


@pytest.mark.skipif(not os.path.isdir(f"{SHARED_DATA}/mnist"), reason="no offline MNIST copy in /work/shared/data")
def test_real_mnist_counts_and_checksums():
    assert load_mnist(f"{SHARED_DATA}/mnist", "train").shape == (60000, 1, 28, 28)
    assert load_mnist(f"{SHARED_DATA}/mnist", "test").shape == (10000, 1, 28, 28)
    for name, sha256 in MNIST_SHA256.items():
        with gzip.open(f"{SHARED_DATA}/mnist/{name}", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha256, name


# --- CelebA ---

CROP = (15, 35, 163, 183)  # the expected crop: a 148x148 box centred on the 178x218 image (left, top, right, bottom)
INSIDE_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def face(index, size=(178, 218)):
    """A stand-in for an aligned face: grey outside the crop box, a colour per index inside it."""
    image = Image.new("RGB", size, (128, 128, 128))
    scale = size[0] / 178
    image.paste(INSIDE_COLOURS[index % len(INSIDE_COLOURS)], tuple(round(c * scale) for c in CROP))
    return image


def tiny_celeba(folder, splits=(0, 0, 0, 1, 1, 2), size=(178, 218), images_dir="img_align_celeba"):
    """Images 000001.jpg ... with the given split codes, plus a CRLF partition file that lists 3 more absent images."""
    (folder / images_dir).mkdir(parents=True)
    for i in range(len(splits)):
        face(i, size).save(folder / images_dir / f"{i + 1:06d}.jpg", quality=95)
    rows = [f"{i + 1:06d}.jpg {code}" for i, code in enumerate(list(splits) + [0, 1, 2])]
    (folder / "list_eval_partition.txt").write_bytes(("\r\n".join(rows) + "\r\n").encode())


def assert_inside_colours(images, indices):
    # The border pixels mix in the grey just outside the box (bicubic support, JPEG ringing): look inside.
    for image, index in zip(images, indices):
        inside = image[:, 2:-2, 2:-2].int()
        colour = torch.tensor(INSIDE_COLOURS[index % len(INSIDE_COLOURS)]).reshape(3, 1, 1)
        assert (inside - colour).abs().max() <= 10


def test_load_celeba_crops_and_follows_the_split_file(tmp_path, capsys):
    tiny_celeba(tmp_path)
    for split, indices in (("train", [0, 1, 2]), ("valid", [3, 4]), ("test", [5])):
        images = load_celeba(str(tmp_path), split, size=32)
        assert images.dtype == torch.uint8 and images.shape == (len(indices), 3, 32, 32)
        assert_inside_colours(images, indices)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all("found 3 train, 2 valid, 1 test images" in line for line in printed)


def test_load_celeba_names_its_images_in_order(tmp_path):
    tiny_celeba(tmp_path)
    for _ in range(2):  # decoded, then read from the cache
        images, names = load_celeba(str(tmp_path), "valid", size=32, return_names=True)
        assert names == ["000004.jpg", "000005.jpg"] and images.shape[0] == 2
        assert_inside_colours(images, [3, 4])


def test_smaller_images_scale_the_crop_box(tmp_path):
    tiny_celeba(tmp_path, splits=(0, 0), size=(89, 109), images_dir="img_align_celeba_89x109")
    images = load_celeba(str(tmp_path), "train", size=32, images_dir="img_align_celeba_89x109")
    assert images.shape == (2, 3, 32, 32)
    assert_inside_colours(images, [0, 1])
    assert (tmp_path / "celeba_img_align_celeba_89x109_32.npz").is_file()


def test_cache_is_written_reused_and_rebuilt(tmp_path, monkeypatch):
    tiny_celeba(tmp_path)
    decoded = []
    decode = common.decode_celeba_jpeg
    monkeypatch.setattr(common, "decode_celeba_jpeg", lambda path, size: decoded.append(path) or decode(path, size))
    cache = tmp_path / "celeba_img_align_celeba_64.npz"

    first = load_celeba(str(tmp_path), "valid")
    assert cache.is_file() and len(decoded) == 6
    assert sorted(os.listdir(tmp_path)) == [
        "celeba_img_align_celeba_64.npz",
        "img_align_celeba",
        "list_eval_partition.txt",
    ]
    assert torch.equal(load_celeba(str(tmp_path), "valid"), first)
    assert load_celeba(str(tmp_path), "train").shape == (3, 3, 64, 64)
    assert len(decoded) == 6  # read from the cache

    face(6).save(tmp_path / "img_align_celeba" / "000007.jpg")  # listed as train in the partition file
    assert load_celeba(str(tmp_path), "train").shape == (4, 3, 64, 64)
    assert len(decoded) == 13

    os.utime(tmp_path / "img_align_celeba" / "000001.jpg", ns=(0, 0))  # a changed file
    load_celeba(str(tmp_path), "test")
    assert len(decoded) == 20

    load_celeba(str(tmp_path), "test", size=32)  # another size, another cache
    assert len(decoded) == 27 and (tmp_path / "celeba_img_align_celeba_32.npz").is_file()

    cache.write_bytes(b"damaged")
    assert torch.equal(load_celeba(str(tmp_path), "valid"), first)
    assert len(decoded) == 34


def test_cache_dir_and_unwritable_cache(tmp_path, capsys):
    tiny_celeba(tmp_path / "data")
    images = load_celeba(str(tmp_path / "data"), "valid", cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == ["celeba_img_align_celeba_64.npz"]
    assert not list((tmp_path / "data").glob("*.npz"))
    (tmp_path / "file").write_bytes(b"")
    assert torch.equal(load_celeba(str(tmp_path / "data"), "valid", cache_dir=str(tmp_path / "file" / "x")), images)
    assert "cannot write the cache" in capsys.readouterr().out


def cut_jpeg(tmp_path):
    path = tmp_path / "img_align_celeba" / "000004.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return path


def write_image(path, size):
    Image.new("RGB", size).save(path)
    return path


# Each case damages tiny_celeba's files and returns the file the message must name; "valid" is loaded.
CELEBA_DAMAGE = {
    "missing folder": lambda tmp_path: remove(tmp_path / "img_align_celeba"),
    "missing partition file": lambda tmp_path: remove(tmp_path / "list_eval_partition.txt"),
    "unreadable jpeg": cut_jpeg,
    "not a jpeg": lambda tmp_path: replace_file(tmp_path / "img_align_celeba" / "000004.jpg", b"<html>404</html>"),
    "wrong aspect ratio": lambda tmp_path: write_image(tmp_path / "img_align_celeba" / "000005.jpg", (178, 200)),
    "size unlike the others": lambda tmp_path: write_image(tmp_path / "img_align_celeba" / "000005.jpg", (89, 109)),
    "empty split": lambda tmp_path: replace_file(
        tmp_path / "list_eval_partition.txt", b"".join(b"%06d.jpg 0\r\n" % i for i in range(1, 8))
    ),
    "malformed partition file": lambda tmp_path: replace_file(
        tmp_path / "list_eval_partition.txt", b"000001.jpg 0\r\n000002.jpg 7\r\n"
    ),
}


@pytest.mark.parametrize("case", CELEBA_DAMAGE)
def test_bad_celeba_files_raise_one_line_naming_the_file(tmp_path, case):
    tiny_celeba(tmp_path)
    bad_path = CELEBA_DAMAGE[case](tmp_path)
    with pytest.raises(DataError) as error:
        load_celeba(str(tmp_path), "valid")
    assert_one_line_naming(error, bad_path)
    assert not list(tmp_path.glob("*.npz*"))  # no cache, no temporary file


def test_unknown_split_is_a_data_error(tmp_path):
    tiny_celeba(tmp_path)
    with pytest.raises(DataError):
        load_celeba(str(tmp_path), "validation")
    with pytest.raises(DataError):
        load_mnist(str(tmp_path), "valid")


def real_celeba_subset(tmp_path, folders, split_code, count):
    """Copy the partition file and the first `count` images of a split present in every folder into tmp_path."""
    shutil.copy(f"{SHARED_DATA}/celeba/list_eval_partition.txt", tmp_path)
    with open(tmp_path / "list_eval_partition.txt") as f:
        wanted = [line.split()[0] for line in f if line.split()[1] == str(split_code)]
    present = set.intersection(*(set(os.listdir(f"{SHARED_DATA}/celeba/{folder}")) for folder in folders))
    names = [name for name in wanted if name in present][:count]
    for folder in folders:
        (tmp_path / folder).mkdir()
        for name in names:
            shutil.copy(f"{SHARED_DATA}/celeba/{folder}/{name}", tmp_path / folder)
    return names


@pytest.mark.skipif(not os.path.isdir(f"{SHARED_DATA}/celeba"), reason="no offline CelebA copy in /work/shared/data")
def test_real_celeba_valid_images(tmp_path):
    names = real_celeba_subset(tmp_path, ["img_align_celeba"], split_code=1, count=20)
    images = load_celeba(str(tmp_path), "valid", size=64)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 64, 64) and len(names) == 20
    assert 40 < images.float().mean() < 200 and images.float().std() > 20  # real photos, not blank


@pytest.mark.skipif(not os.path.isdir(f"{SHARED_DATA}/celeba"), reason="no offline CelebA copy in /work/shared/data")
def test_real_half_size_copies_give_the_same_crop(tmp_path):
    # The 89x109 folder holds downscaled copies of the originals: with the box scaled by 1/2 the crops must agree.
    real_celeba_subset(tmp_path, ["img_align_celeba", "img_align_celeba_89x109"], split_code=0, count=8)
    full = load_celeba(str(tmp_path), "train", size=64).float()
    half = load_celeba(str(tmp_path), "train", size=64, images_dir="img_align_celeba_89x109").float()
    assert full.shape == half.shape == (8, 3, 64, 64)
    assert (full - half).abs().mean() < 8

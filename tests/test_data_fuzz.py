"""common.py's readers under a property-based fuzzer (hypothesis): cut, bit-flipped and re-headed IDX files and JPEGs.

Every damaged file must give DataError, one line naming the file, or data that are exactly right:
- a raw IDX file: what an independent reading of its bytes holds (a flipped pixel byte is a pixel like any other);
- a gzip IDX file: the original (gzip carries a CRC-32 and the length, so whatever it accepts is the original);
- a JPEG cut short or with another header: the original image;
- a JPEG with flipped bits: exactly what Pillow decodes from those bytes. JPEG carries no checksum, so a flipped bit in
  its entropy-coded data decodes to another image that no reader can tell from the original (bench/reliability.py
  counts how often).
Never an unhandled exception. bench/reliability.py runs the same faults on more inputs and writes the counts.
"""

import gzip
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bench.reliability import face_jpeg, pillow_decode  # the same synthetic JPEG and reference decoder
from common import CELEBA_SIZE, DataError, decode_celeba_jpeg, load_celeba, load_mnist, read_idx

FUZZ = settings(max_examples=300, deadline=None)


def assert_one_line_naming(error, path):
    message = str(error)
    assert message.startswith("error: ") and "\n" not in message and str(path) in message, message


def flip_bits(data, bits):
    data = bytearray(data)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def damaged(data, header_size, headers):
    """Copies of data cut short, with 1-4 bits flipped, or with its first header_size bytes replaced from `headers`."""
    return st.one_of(
        st.integers(0, len(data) - 1).map(lambda n: data[:n]),
        st.sets(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=4).map(
            lambda bits: flip_bits(data, bits)
        ),
        headers.map(lambda header: header + data[header_size:]),
    )


# --- MNIST's IDX files ---

rng = np.random.default_rng(0)
ARRAYS = {  # 3 images and labels a split: small, so that each example takes a millisecond
    "train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
}
MAGIC = {3: 2051, 1: 2049}  # by number of dimensions
RAW = {name: struct.pack(f">{1 + a.ndim}I", MAGIC[a.ndim], *a.shape) + a.tobytes() for name, a in ARRAYS.items()}
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
# Another header: a magic number (right, the other kind's, byte-swapped, any) and 0-4 dimensions of any size.
IDX_HEADERS = st.builds(
    lambda magic, dims: struct.pack(f">{1 + len(dims)}I", magic, *dims),
    st.one_of(st.sampled_from([2049, 2051, 0x03080000, 0]), st.integers(0, 2**32 - 1)),
    st.lists(st.one_of(st.sampled_from([0, 3, 28]), st.integers(0, 64), st.integers(0, 2**32 - 1)), max_size=4),
)


def read_idx_independently(data, ndim):
    """The array an IDX file of ndim dimensions holds, read with int.from_bytes; None when it is not such a file."""
    header_size = 4 + 4 * ndim
    if len(data) < header_size or int.from_bytes(data[:4], "big") != MAGIC[ndim]:
        return None
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if header_size + math.prod(shape) != len(data):
        return None
    return np.frombuffer(data[header_size:], np.uint8).reshape(shape).copy()


def write_mnist(folder, files, compressed):
    for name, data in files.items():
        path = folder / (f"{name}.gz" if compressed else name)
        path.write_bytes(gzip.compress(data, mtime=0) if compressed else data)


def idx_damage():
    """(file name, damaged bytes) for the train images or labels."""
    return st.sampled_from([IMAGES, LABELS]).flatmap(
        lambda name: damaged(RAW[name], 4 + 4 * ARRAYS[name].ndim, IDX_HEADERS).map(lambda data: (name, data))
    )


@FUZZ
@given(idx_damage(), st.booleans())
def test_a_damaged_idx_file_gives_one_line_or_exactly_what_its_bytes_hold(damage, compressed):
    name, data = damage  # stored raw, or in an intact gzip stream
    files = dict(RAW, **{name: data})
    images, labels = read_idx_independently(files[IMAGES], 3), read_idx_independently(files[LABELS], 1)
    valid = images is not None and labels is not None and images.shape[1:] == (28, 28)
    valid = valid and 0 < len(images) == len(labels) and labels.max() <= 9
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_mnist(folder, files, compressed)
        path = folder / (f"{name}.gz" if compressed else name)
        event("valid: loads exactly" if valid else "invalid: DataError")
        if valid:
            assert torch.equal(load_mnist(str(folder), "train")[:, 0], torch.from_numpy(images))
            assert np.array_equal(read_idx(str(path), MAGIC[ARRAYS[name].ndim]), images if name == IMAGES else labels)
            return
        try:
            load_mnist(str(folder), "train")
        except DataError as error:
            assert_one_line_naming(error, path)
        else:
            raise AssertionError(f"{name} is not a valid MNIST file any more, but it loaded")


GZIP = {name: gzip.compress(data, mtime=0) for name, data in RAW.items()}


@FUZZ
@given(st.sampled_from([IMAGES, LABELS]).flatmap(
    lambda name: damaged(GZIP[name], 10, st.binary(min_size=10, max_size=10)).map(lambda data: (name, data))
))
def test_a_damaged_gzip_stream_gives_one_line_or_the_original(damage):
    name, data = damage  # the gzip bytes themselves, its 10-byte header included
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_mnist(folder, RAW, compressed=True)
        (folder / f"{name}.gz").write_bytes(data)
        try:
            images = load_mnist(str(folder), "train")
        except DataError as error:
            event("DataError")
            assert_one_line_naming(error, folder / f"{name}.gz")
        else:
            event("loads the original")
            assert torch.equal(images[:, 0], torch.from_numpy(ARRAYS[IMAGES]))


# --- CelebA's JPEGs ---


JPEG = face_jpeg(0)
ORIGINAL = pillow_decode(JPEG, 16)
# Another header: the 2-byte start-of-image marker and the next marker's 2 bytes replaced by any 4 bytes, or by the
# magic numbers of other formats.
JPEG_HEADERS = st.one_of(
    st.binary(min_size=4, max_size=4), st.sampled_from([b"\x89PNG", b"GIF8", b"BM\0\0", b"\0" * 4])
)
JPEG_DAMAGE = st.one_of(
    st.integers(0, len(JPEG) - 1).map(lambda n: ("truncated", JPEG[:n])),
    st.sets(st.integers(0, 8 * len(JPEG) - 1), min_size=1, max_size=4).map(
        lambda bits: ("flipped", flip_bits(JPEG, bits))
    ),
    JPEG_HEADERS.map(lambda header: ("header", header + JPEG[4:])),
)


def expected_jpeg(kind, data):
    """The image decode_celeba_jpeg must return for these damaged bytes, or None where it must raise DataError."""
    decoded = pillow_decode(data, 16)
    if kind == "flipped" or decoded is None:
        return decoded
    # A cut or re-headed JPEG may load only as the original (a cut after the last scan loses nothing).
    assert np.array_equal(decoded, ORIGINAL), f"Pillow decodes a {kind} JPEG to another image"
    return decoded


@FUZZ
@given(JPEG_DAMAGE)
def test_a_damaged_jpeg_gives_one_line_or_exactly_what_its_bytes_decode_to(damage):
    kind, data = damage
    expected = expected_jpeg(kind, data)
    event(f"{kind}: " + ("DataError" if expected is None else "the original" if np.array_equal(expected, ORIGINAL)
                         else "another image"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "000001.jpg"
        path.write_bytes(data)
        try:
            image, (width, height) = decode_celeba_jpeg(str(path), 16)
        except DataError as error:
            assert_one_line_naming(error, path)
            assert expected is None, f"a {kind} JPEG that Pillow decodes was refused"
        else:
            assert expected is not None and image.dtype == np.uint8 and np.array_equal(image, expected)
            assert width * CELEBA_SIZE[1] == height * CELEBA_SIZE[0]


@settings(max_examples=60, deadline=None)
@given(JPEG_DAMAGE, st.sampled_from(["train", "valid", "test"]))
def test_load_celeba_with_one_damaged_jpeg_gives_one_line_or_exactly_the_decoded_images(damage, damaged_split):
    kind, data = damage
    expected = expected_jpeg(kind, data)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "img_align_celeba").mkdir()
        (folder / "list_eval_partition.txt").write_bytes(b"000001.jpg 0\r\n000002.jpg 1\r\n000003.jpg 2\r\n")
        names = {"train": "000001.jpg", "valid": "000002.jpg", "test": "000003.jpg"}
        for split, name in names.items():
            (folder / "img_align_celeba" / name).write_bytes(data if split == damaged_split else JPEG)
        try:
            images = load_celeba(str(folder), damaged_split, size=16, cache_dir=str(folder / "cache"))
        except DataError as error:
            assert_one_line_naming(error, folder / "img_align_celeba" / names[damaged_split])
            assert expected is None or "must have one size" in str(error)  # decodes, but to another size
        else:
            assert expected is not None and torch.equal(images, torch.from_numpy(expected.copy())[None])

"""The IDX format: labels in the narrowest element type that holds them (ubyte up to 255, as MNIST ships, then
16- and 32-bit), read back whatever the width; images stay ubyte."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tuneline.tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, check_pair, encode_idx, parse_idx

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("top", "magic", "width"), [(0, 0x0801, 1), (255, 0x0801, 1), (256, 0x0B01, 2),
                                                      (32767, 0x0B01, 2), (32768, 0x0C01, 4)])
def test_labels_round_trip_in_the_narrowest_type(top, magic, width):
    labels = np.array([0, top, 1, top // 2])
    data = encode_idx(labels)
    assert struct.unpack(">ii", data[:8]) == (magic, 4) and len(data) == 8 + 4 * width
    parsed = parse_idx(data, "labels", LABELS_MAGIC)
    assert parsed.tolist() == labels.tolist() and parsed.dtype.itemsize == width and parsed.dtype.isnative


def test_mnist_range_labels_keep_mnists_bytes():
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    assert encode_idx(labels.astype(np.int64)) == struct.pack(">ii", 2049, 5) + labels.tobytes()


def test_wide_labels_size_is_checked_in_elements():
    data = encode_idx(np.arange(300))
    with pytest.raises(DataError, match=r"truncated \(expected 608 bytes, got 607\)"):
        parse_idx(data[:-1], "labels", LABELS_MAGIC)


def test_wide_types_are_labels_only():
    with pytest.raises(DataError, match="wrong magic number 2817 \\(expected 2051 for IDX images\\)"):
        parse_idx(encode_idx(np.arange(300)), "images", IMAGES_MAGIC)
    with pytest.raises(ValueError, match="IDX images must be uint8"):
        encode_idx(np.zeros((1, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="do not fit"):
        encode_idx(np.array([0, 2**31]))


def test_negative_labels_are_out_of_range():
    with pytest.raises(DataError, match=r"label -1 at index 1 is out of range 0\.\.2"):
        check_pair(np.zeros((2, 1, 1), np.uint8), np.array([0, -1], np.int16), "images", "labels", n_classes=3)


def test_colour_images_round_trip_as_4d_idx():
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    data = encode_idx(images)
    assert struct.unpack(">iiiii", data[:20]) == (0x0804, 2, 3, 4, 3) and len(data) == 20 + images.size
    np.testing.assert_array_equal(parse_idx(data, "images", IMAGES_MAGIC), images)
    with pytest.raises(DataError, match=r"truncated \(expected 92 bytes, got 91\)"):
        parse_idx(data[:-1], "images", IMAGES_MAGIC)
    with pytest.raises(DataError, match=r"truncated IDX header \(12 bytes, need 20\)"):
        parse_idx(data[:12], "images", IMAGES_MAGIC)

"""Datasets and loaders: offline .npz, ImageFolder, torchvision error path, loaders."""
from __future__ import annotations

import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_smoothing import data
from adaptive_smoothing.data import DataError, build_dataset, load_tensors, take_first


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    # Flat colour blocks survive JPEG almost unchanged, so decoded pixels can be compared.
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        images[i, : size // 2] = rng.integers(0, 256, 3)
        images[i, size // 2:] = rng.integers(0, 256, 3)
    return images


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray,
               override: dict | None = None) -> Path:
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    arrays = {"jpeg": np.concatenate(blobs), "offsets": offsets,
              "labels": labels.astype(np.int64), "classes": np.array(data.CIFAR10_CLASSES)}
    arrays.update(override or {})
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.fixture
def small_npz_dir(tmp_path: Path) -> Path:
    labels = np.arange(12) % 10
    _write_npz(tmp_path / "test.npz", _images(12), labels)
    _write_npz(tmp_path / "train.npz", _images(20, seed=1), np.arange(20) % 10)
    return tmp_path


# ----------------------------------------------------------------------------- npz


def test_small_npz_decodes(small_npz_dir: Path) -> None:
    dataset = build_dataset("cifar10", "test", "npz", small_npz_dir)
    assert len(dataset) == 12
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert label == 3
    expected = torch.from_numpy(_images(12)[3]).permute(2, 0, 1).float() / 255
    assert (image - expected).abs().mean() < 0.02
    assert dataset.classes == list(data.CIFAR10_CLASSES)

    # A file path works as well as the directory, and 'CIFAR-10' as well as 'cifar10'.
    same = build_dataset("CIFAR-10", "test", "npz", small_npz_dir / "test.npz")
    assert torch.equal(same[3][0], image)
    assert len(build_dataset("cifar10", "train", "npz", small_npz_dir)) == 20


def test_npz_in_dataset_subfolder(small_npz_dir: Path) -> None:
    # --data-dir ../shared/data (the parent of cifar10/) is found too.
    (small_npz_dir / "cifar10").mkdir()
    (small_npz_dir / "test.npz").rename(small_npz_dir / "cifar10" / "test.npz")
    assert len(build_dataset("cifar10", "test", "npz", small_npz_dir)) == 12


def test_npz_missing_file_lists_candidates(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked for") as info:
        build_dataset("cifar10", "test", "npz", tmp_path)
    assert str(tmp_path / "test.npz") in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("cifar10", "test", "npz", tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs a path"):
        build_dataset("cifar10", "test", "npz", None)


@pytest.mark.parametrize("override, pattern", [
    ({"labels": None}, r"missing array\(s\) \['labels'\]"),
    ({"labels": np.arange(5)}, r"'offsets' has length 7 .* 'labels' has length 5"),
    ({"offsets": np.array([0, 5, 3, 9, 12, 15, 18])}, r"'offsets' must"),
    ({"labels": np.array([0, 1, 2, 3, 4, 10])}, r"'labels' has values in \[0, 10\]"),
    ({"jpeg": np.zeros(10, dtype=np.float32)}, r"'jpeg' must be a 1-D uint8"),
])
def test_bad_npz_names_file_and_key(tmp_path: Path, override: dict, pattern: str) -> None:
    path = _write_npz(tmp_path / "test.npz", _images(6), np.arange(6), override)
    with pytest.raises(DataError, match=pattern) as info:
        build_dataset("cifar10", "test", "npz", path)
    assert str(path) in str(info.value)


def test_corrupt_jpeg_and_non_npz(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "test.npz", _images(4), np.arange(4))
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    start, end = arrays["offsets"][2], arrays["offsets"][3]
    arrays["jpeg"][start:end] = 7  # wipe image 2, SOI marker included
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="image 2"):
        build_dataset("cifar10", "test", "npz", path)

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        build_dataset("cifar10", "test", "npz", junk)


def test_shared_cifar10_test_set(shared_cifar10: Path) -> None:
    dataset = build_dataset("cifar10", "test", "npz", shared_cifar10)
    assert len(dataset) == 10000
    with np.load(shared_cifar10 / "test.npz") as raw:
        labels = raw["labels"]
    x, y = load_tensors(dataset, 1000)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    assert torch.equal(y, torch.from_numpy(labels[:1000]))
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 60 and counts.max() <= 140, counts
    # CIFAR-10 channel means are about (0.49, 0.48, 0.45).
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.tensor([0.49, 0.48, 0.45]), atol=0.03)


# ----------------------------------------------------------------------------- transforms


def test_augmentation_changes_images_not_shapes(small_npz_dir: Path) -> None:
    plain = build_dataset("cifar10", "train", "npz", small_npz_dir, augment=False)
    augmented = build_dataset("cifar10", "train", "npz", small_npz_dir)  # train: augment default
    reference = plain[0][0]
    draws = [augmented[0][0] for _ in range(8)]
    assert all(d.shape == reference.shape for d in draws)
    assert any(not torch.equal(d, reference) for d in draws)
    assert augmented[0][1] == plain[0][1]


def test_test_transform_is_deterministic(small_npz_dir: Path) -> None:
    dataset = build_dataset("cifar10", "test", "npz", small_npz_dir)
    assert torch.equal(dataset[5][0], dataset[5][0])
    x1, _ = load_tensors(dataset)
    x2, _ = load_tensors(dataset)
    assert torch.equal(x1, x2)


# ----------------------------------------------------------------------------- ImageFolder


def _save_png(path: Path, size: int = 32, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_uses_canonical_indices(tmp_path: Path) -> None:
    for i in range(3):
        _save_png(tmp_path / "test" / "cat" / f"{i}.png", value=10 * i)
        _save_png(tmp_path / "test" / "truck" / f"{i}.png", value=200)
    dataset = build_dataset("cifar10", "test", "imagefolder", tmp_path)
    assert len(dataset) == 6
    x, y = load_tensors(dataset)
    assert x.shape == (6, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    assert sorted(y.tolist()) == [3, 3, 3, 9, 9, 9]  # cat = 3, truck = 9 in CIFAR-10
    assert torch.allclose(x[y == 9], torch.full_like(x[y == 9], 200 / 255))


def test_image_folder_bad_size_and_classes(tmp_path: Path) -> None:
    _save_png(tmp_path / "a" / "cat" / "small.png", size=16)
    dataset = build_dataset("cifar10", "test", "imagefolder", tmp_path / "a")
    with pytest.raises(DataError, match=r"small.png: image is 16x16, expected 32x32"):
        dataset[0]

    _save_png(tmp_path / "b" / "foo" / "0.png")
    _save_png(tmp_path / "b" / "bar" / "0.png")
    with pytest.raises(DataError, match="found 2 class folders"):
        build_dataset("cifar10", "test", "imagefolder", tmp_path / "b")


# ----------------------------------------------------------------------------- names, torchvision


def test_unknown_names() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", "test", "npz", ".")
    with pytest.raises(DataError, match="unknown dataset format 'hdf5'"):
        build_dataset("cifar10", "test", "hdf5", ".")
    with pytest.raises(DataError, match="unknown split 'val'"):
        build_dataset("cifar10", "val", "npz", ".")
    assert data.normalize_dataset_name("CIFAR-100") == "cifar100"
    assert data.normalize_dataset_name("cifar_10") == "cifar10"


def test_torchvision_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        build_dataset("CIFAR-10", "test", "torchvision", root)
    message = str(info.value)
    assert str(root) in message and "cifar-10-python.tar.gz" in message and "npz" in message
    assert "--data-dir" in message  # the README's flag, not only config keys
    assert not root.exists()  # the failed download leaves no empty data/ folder behind
    with pytest.raises(DataError, match="cifar-100-python"):
        build_dataset("cifar100", "train", "torchvision", root)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        build_dataset("cifar10", "test", "torchvision", root, download=False)


# ----------------------------------------------------------------------------- loaders


def test_take_first_and_load_tensors(small_npz_dir: Path) -> None:
    dataset = build_dataset("cifar10", "test", "npz", small_npz_dir)
    subset = take_first(dataset, 5)
    assert len(subset) == 5
    assert torch.equal(subset[4][0], dataset[4][0])
    assert len(take_first(dataset, 100)) == 12
    assert take_first(dataset, None) is dataset
    with pytest.raises(ValueError):
        take_first(dataset, -1)
    x, y = load_tensors(dataset, 7, batch_size=3)
    assert x.shape == (7, 3, 32, 32) and y.dtype == torch.int64
    assert y.tolist() == list(range(7))


def test_pil_fallback_decodes_the_same(small_npz_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fast = build_dataset("cifar10", "test", "npz", small_npz_dir)
    monkeypatch.setattr(data, "_decode_torchvision", lambda *args: None)
    slow = build_dataset("cifar10", "test", "npz", small_npz_dir)
    assert torch.equal(fast.images, slow.images)


# ----------------------------------------------------------------------------- pixel formats
# Issue 25: a wrong pixel format used to be read without a word (16-bit PNGs as white, float
# TIFFs in [0, 1] as black, grayscale silently expanded). Each format checks where it decodes.


def _png(path: Path, pixels: np.ndarray, bit_depth: int, colour_type: int) -> Path:
    """A PNG written by hand: Pillow cannot write 16-bit RGB PNGs."""
    import struct
    import zlib

    height = pixels.shape[0]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[i].astype(dtype).tobytes() for i in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", pixels.shape[1], height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _folder_with(tmp_path: Path, name: str, save) -> tuple[Path, Path]:
    folder = tmp_path / "test" / "cat"
    folder.mkdir(parents=True)
    file = folder / name
    save(file)
    return tmp_path, file


def _read_folder(root: Path):
    return load_tensors(build_dataset("cifar10", "test", "imagefolder", root))


def test_16bit_png_is_refused_not_read_as_white(tmp_path: Path) -> None:
    gray16 = (np.random.default_rng(0).random((32, 32)) * 65535).astype(np.uint16)
    root, file = _folder_with(tmp_path, "a.png", lambda f: Image.fromarray(gray16).save(f))
    with pytest.raises(DataError, match=rf"{file}: found 16 bits per channel .*expected 8-bit"):
        _read_folder(root)


def test_16bit_rgb_png_is_refused_not_truncated_to_8_bits(tmp_path: Path) -> None:
    rgb16 = (np.random.default_rng(0).random((32, 32, 3)) * 65535).astype(np.uint16)
    root, file = _folder_with(tmp_path, "a.png", lambda f: _png(f, rgb16, 16, 2))
    with pytest.raises(DataError, match=rf"{file}: found 16 bits per channel \(mode RGB"):
        _read_folder(root)


def test_float_tiff_in_0_1_is_refused_not_read_as_black(tmp_path: Path) -> None:
    floats = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    root, file = _folder_with(tmp_path, "a.tif", lambda f: Image.fromarray(floats).save(f))
    with pytest.raises(DataError, match=rf"{file}: found 32-bit float grayscale, values 0\.\d+"
                                        r"\.\.0\.\d+; expected 8-bit"):
        _read_folder(root)


def test_grayscale_png_is_expanded_to_rgb_with_one_warning(tmp_path: Path, caplog) -> None:
    gray = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    root, file = _folder_with(tmp_path, "a.png", lambda f: Image.fromarray(gray).save(f))
    Image.fromarray(gray).save(file.with_name("b.png"))
    with caplog.at_level("WARNING", logger="adaptive_smoothing.data"):
        x, _ = _read_folder(root)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 0], x[0, 2])
    assert torch.equal((x[0, 0] * 255).round().to(torch.uint8), torch.from_numpy(gray))
    warnings = [r.getMessage() for r in caplog.records if "grayscale" in r.getMessage()]
    assert len(warnings) == 1 and "expanded to RGB" in warnings[0]


def test_transparent_png_is_refused_and_an_opaque_alpha_channel_dropped(tmp_path: Path) -> None:
    rgba = (np.random.default_rng(0).random((32, 32, 4)) * 255).astype(np.uint8)
    root, file = _folder_with(tmp_path, "a.png", lambda f: Image.fromarray(rgba).save(f))
    with pytest.raises(DataError, match=rf"{file}: the image has transparent pixels"):
        _read_folder(root)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(file)
    x, _ = _read_folder(root)
    assert torch.equal((x[0] * 255).round().to(torch.uint8),
                       torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))


def test_one_bit_and_cmyk_images_in_a_folder_are_refused(tmp_path: Path) -> None:
    bits = np.random.default_rng(0).random((32, 32)) > 0.5
    root, file = _folder_with(tmp_path, "a.png", lambda f: Image.fromarray(bits).save(f))
    with pytest.raises(DataError, match=rf"{file}: found 1-bit black and white"):
        _read_folder(root)
    file.unlink()
    cmyk = Image.fromarray(_images(1)[0]).convert("CMYK")
    cmyk.save(file.with_suffix(".jpg"))
    with pytest.raises(DataError, match=r"a\.jpg: found CMYK colour"):
        _read_folder(root)


def _jpeg_npz(path: Path, images: list) -> Path:
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets,
             labels=np.zeros(len(images), dtype=np.int64))
    return path


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_grayscale_jpeg_in_npz_is_expanded_with_a_warning_not_silently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, decoder: str) -> None:
    if decoder == "pil":
        monkeypatch.setattr(data, "_decode_torchvision", lambda *args: None)
    colour = [Image.fromarray(image) for image in _images(3)]
    _jpeg_npz(tmp_path / "test.npz", [colour[0], colour[1].convert("L"), colour[2].convert("L")])
    with caplog.at_level("WARNING", logger="adaptive_smoothing.data"):
        dataset = build_dataset("cifar10", "test", "npz", tmp_path)
    assert dataset.images.shape == (3, 3, 32, 32)
    assert torch.equal(dataset.images[1, 0], dataset.images[1, 2])
    assert any("2 images are grayscale (e.g. image 1)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_cmyk_jpeg_in_npz_is_refused_naming_the_image(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      decoder: str) -> None:
    if decoder == "pil":
        monkeypatch.setattr(data, "_decode_torchvision", lambda *args: None)
    colour = [Image.fromarray(image) for image in _images(2)]
    path = _jpeg_npz(tmp_path / "test.npz", [colour[0], colour[1].convert("CMYK")])
    with pytest.raises(DataError, match=rf"{path}: image 1 \(key 'jpeg', bytes \d+:\d+\)"
                                        r"(: found CMYK colour| has 4 channels)"):
        build_dataset("cifar10", "test", "npz", tmp_path)


@pytest.mark.parametrize("pixels, pattern", [
    (np.zeros((4, 3072), dtype=np.float32), r"hold float32 pixels, values 0\.\.0; expected uint8"),
    (np.zeros((4, 3072), dtype=np.uint16), r"hold uint16 pixels"),
])
def test_torchvision_cifar_files_of_other_pixel_types_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixels: np.ndarray,
        pattern: str) -> None:
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({"data": pixels, "labels": [0, 1, 2, 3]}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": list(data.CIFAR10_CLASSES)}, file)
    # The files are not the real ones (their md5 differs); what is tested is the check after.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    with pytest.raises(DataError, match=rf"{folder}: the CIFAR batch files {pattern}"):
        build_dataset("cifar10", "test", "torchvision", tmp_path, download=False)


def test_auto_format_detects_npz_folders_and_files(tmp_path):
    from adaptive_smoothing.data import resolve_format

    assert resolve_format("auto", tmp_path) == "torchvision"  # nothing to detect
    (tmp_path / "test.npz").write_bytes(b"")
    assert resolve_format("auto", tmp_path) == "npz"
    assert resolve_format("auto", tmp_path / "x.npz") == "npz"
    assert resolve_format("imagefolder", tmp_path) == "imagefolder"  # given, never overridden

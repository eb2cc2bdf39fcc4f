"""Datasets, tensors and training batches: CIFAR-10/100 via torchvision, the offline JPEG .npz
copy, ImageFolder.

Every dataset yields ``(image, label)`` with ``image`` a float CHW tensor in [0, 1] (the models
normalise internally) and ``label`` an int.

Images are checked where they are decoded, in every format, because a wrong pixel format does
not fail on its own: it gives meaningless accuracies (16-bit PNGs read as all white, float TIFFs
in [0, 1] as all black). Accepted: 8 bits per channel, RGB, 32x32; grayscale (8-bit) is expanded
to RGB by repeating its channel, with one warning per dataset; a palette image is converted to
its RGB colours (exact); an alpha channel is dropped only where every pixel is opaque.
Everything else (16-bit or float pixels, 1-bit, CMYK and other colour spaces, transparency,
another size) is refused with a one-line :class:`DataError` naming the file and what was found. Training augmentation is the standard CIFAR one:
RandomCrop(32, padding=4) + RandomHorizontalFlip; test images are left untouched.

Training (the mixer's and the base models') holds its data as tensors and augments whole batches
(:class:`IterationData`, :func:`augment_batch`, in the style of airbench): the order and the crops
and flips of every iteration come from generators seeded by the run's position
(:mod:`adaptive_smoothing.seeding`), so a resumed run draws what an uninterrupted one draws.
"""
from __future__ import annotations

import datetime
import io
import logging
import urllib.error
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.runtime import barrier, distributed_rank_world
from adaptive_smoothing.seeding import stream

logger = logging.getLogger(__name__)

# How long the other processes under torchrun wait for rank 0's download of CIFAR (a slow
# connection takes longer than NCCL's 10-minute watchdog allows a collective).
DOWNLOAD_TIMEOUT = datetime.timedelta(hours=2)

PathLike = Union[str, Path]
Transform = Callable[[torch.Tensor], torch.Tensor]

IMAGE_SIZE = 32
CROP_PADDING = 4  # CIFAR augmentation: RandomCrop(32, padding=4) + horizontal flip
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SPLITS = ("train", "test")
FORMATS = ("torchvision", "npz", "imagefolder")
AUTO = "auto"  # detect the format from the path (:func:`resolve_format`)


def resolve_format(format: str, path: Optional[PathLike]) -> str:
    """``format``, or for ``'auto'``: 'npz' where ``path`` is a .npz file or a folder holding
    train.npz or test.npz, else 'torchvision' (an imagefolder layout is never guessed)."""
    if format.strip().lower() != AUTO:
        return format
    if path is not None:
        folder = Path(path).expanduser()
        if folder.suffix == ".npz" or any((folder / f"{split}.npz").exists()
                                          for split in ("train", "test")):
            return "npz"
    return "torchvision"
NPZ_KEYS = ("jpeg", "offsets", "labels")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# torchvision's fine_label_names order (alphabetical), which the published CIFAR-100 models use.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)
CLASS_NAMES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


class DataError(UserError, RuntimeError):
    """A dataset cannot be built or read; the message names the file/key and what was expected."""


# ----------------------------------------------------------------------------- names


def normalize_dataset_name(name: str) -> str:
    """'CIFAR-10', 'cifar_10', 'Cifar10' -> 'cifar10' (likewise for CIFAR-100)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in NUM_CLASSES:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(NUM_CLASSES)} "
                        "(spellings like 'CIFAR-10' are accepted)")
    return key


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return split


# ----------------------------------------------------------------------------- transforms


def train_transform() -> Transform:
    """CIFAR training augmentation on a float CHW tensor (zero padding, as on PIL images)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomCrop(IMAGE_SIZE, padding=4),
        transforms.RandomHorizontalFlip(),
    ])


def _tensor_transform(augment: bool) -> Optional[Transform]:
    return train_transform() if augment else None


def _pil_transform(augment: bool) -> Transform:
    from torchvision import transforms

    steps: list[Any] = [transforms.ToTensor()]
    if augment:
        steps.append(train_transform())
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------- pixel checks

# PIL modes of 8 bits per channel that convert to RGB exactly (with the checks below).
_GRAY_MODES = ("L", "LA")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DESCRIBED_MODES = {
    "1": "1-bit black and white", "I;16": "16-bit grayscale", "I;16L": "16-bit grayscale",
    "I;16B": "16-bit grayscale", "I;16N": "16-bit grayscale", "I": "32-bit integer grayscale",
    "F": "32-bit float grayscale", "CMYK": "CMYK colour", "YCbCr": "YCbCr colour",
    "LAB": "Lab colour", "HSV": "HSV colour",
}


def _pixel_format_problem(image: Any) -> Optional[str]:
    """What is wrong with a (not yet loaded) PIL image's pixel format, or None if it is 8-bit
    RGB, grayscale or palette."""
    # Pillow opens a 16-bit RGB PNG as mode "RGB" and keeps the bit depth only in the decoder's
    # raw mode (e.g. "RGB;16B"); that conversion is not ours to choose, so it is refused too.
    raw = [tile.args if isinstance(tile.args, str) else (tile.args or ("",))[0]
           for tile in getattr(image, "tile", []) or []]
    deep = next((r for r in raw if isinstance(r, str) and ";16" in r), None)
    if deep is not None:
        return f"16 bits per channel (mode {image.mode}, raw {deep})"
    if image.mode in ("RGB", "P", "PA") + _GRAY_MODES + _ALPHA_MODES:
        return None
    what = _DESCRIBED_MODES.get(image.mode, f"PIL mode {image.mode}")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        low, high = image.getextrema()
        what += f", values {low:g}..{high:g}"
    return what


def image_to_rgb8(image: Any, where: str) -> tuple[np.ndarray, bool]:
    """``(H, W, 3) uint8`` pixels of a PIL image, and whether it was grayscale (expanded).

    Raises DataError naming ``where`` for anything but 8-bit RGB, grayscale or palette pixels
    (see the module docstring); the caller checks the size and warns about grayscale.
    """
    problem = _pixel_format_problem(image)
    if problem is not None:
        raise DataError(f"{where}: found {problem}; expected 8-bit RGB or grayscale pixels "
                        "(0-255); convert the images to 8-bit PNG or JPEG first (converted "
                        "silently, 16-bit pixels would read as white and floats in [0, 1] as "
                        "black)")
    gray = image.mode in _GRAY_MODES
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise DataError(f"{where}: the image has transparent pixels (alpha down to "
                            f"{int(alpha.min())} of 255); expected opaque RGB or grayscale "
                            "images: flatten them onto a background first")
    return np.asarray(image.convert("RGB")), gray


def _warn_grayscale(source: Any, example: str, count: Optional[int] = None) -> None:
    many = f"{count} images are" if count is not None else "images are"
    logger.warning("%s: %s grayscale (e.g. %s); expanded to RGB by repeating the channel, "
                   "which models trained on colour CIFAR images may classify worse", source,
                   many, example)


# ----------------------------------------------------------------------------- offline .npz


class NpzImageDataset(Dataset):
    """The offline JPEG copy of CIFAR (arrays ``jpeg``, ``offsets``, ``labels``, ``classes``).

    All images are decoded once at construction into a uint8 (N, 3, 32, 32) tensor: the 10k test
    set takes about a second, and decoding before DataLoader workers fork lets them share it.
    """

    def __init__(self, path: PathLike, transform: Optional[Transform] = None,
                 num_classes: Optional[int] = None) -> None:
        self.path = Path(path)
        self.transform = transform
        jpeg, offsets, labels, classes = _read_npz(self.path, num_classes)
        self.images = _decode_all(self.path, jpeg, offsets)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.targets: list[int] = self.labels.tolist()
        self.classes: list[str] = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _read_npz(path: Path, num_classes: Optional[int]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    try:
        # allow_pickle=False: the format is plain arrays, and pickles could run code.
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; an offline dataset .npz "
                                f"holds {list(NPZ_KEYS) + ['classes']} (found {data.files})")
            jpeg, offsets, labels = (np.asarray(data[k]) for k in NPZ_KEYS)
            classes = [str(c) for c in data["classes"]] if "classes" in data.files else []
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError, ...: all mean a bad file
        raise DataError(f"{path}: cannot read as a NumPy .npz file, it is truncated or not an "
                        f".npz ({type(exc).__name__}: {exc}); copy or download it again") from exc

    if jpeg.ndim != 1 or jpeg.dtype != np.uint8:
        raise DataError(f"{path}: key 'jpeg' must be a 1-D uint8 array, "
                        f"got shape {jpeg.shape} dtype {jpeg.dtype}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise DataError(f"{path}: key 'offsets' must be a 1-D integer array, "
                        f"got shape {offsets.shape} dtype {offsets.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: key 'labels' must be a 1-D integer array, "
                        f"got shape {labels.shape} dtype {labels.dtype}")
    if len(offsets) != len(labels) + 1:
        raise DataError(f"{path}: key 'offsets' has length {len(offsets)} but key 'labels' has "
                        f"length {len(labels)}; expected len(offsets) == len(labels) + 1")
    if len(labels) == 0:
        raise DataError(f"{path}: key 'labels' is empty")
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] > len(jpeg):
        raise DataError(f"{path}: key 'offsets' must start at 0, increase strictly and end at "
                        f"most at len(jpeg) = {len(jpeg)} (ends at {int(offsets[-1])})")
    if classes and num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{path}: key 'classes' lists {len(classes)} classes, "
                        f"expected {num_classes}")
    n_cls = num_classes if num_classes is not None else (len(classes) or None)
    if labels.min() < 0 or (n_cls is not None and labels.max() >= n_cls):
        raise DataError(f"{path}: key 'labels' has values in [{labels.min()}, {labels.max()}], "
                        f"expected [0, {n_cls})")
    return jpeg, offsets, labels, classes


def _decode_all(path: Path, jpeg: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    chunks = [jpeg[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    images = _decode_torchvision(path, chunks, offsets)
    if images is None:
        images = [_decode_pil(path, i, chunk, offsets) for i, chunk in enumerate(chunks)]
    gray = []
    for i, image in enumerate(images):
        if image.ndim == 3 and image.shape[0] == 1:  # grayscale JPEG: expanded, with a warning
            images[i] = image = image.expand(3, -1, -1)
            gray.append(i)
        if image.ndim != 3 or image.shape[0] != 3:
            raise DataError(f"{path}: image {i} (key 'jpeg', bytes {int(offsets[i])}:"
                            f"{int(offsets[i + 1])}) has {image.shape[0]} channels; expected "
                            "RGB (3) or grayscale (1), e.g. not CMYK")
        if tuple(image.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: image {i} decodes to shape {tuple(image.shape)}, "
                            f"expected (3, {IMAGE_SIZE}, {IMAGE_SIZE})")
    if gray:
        _warn_grayscale(path, f"image {gray[0]}", len(gray))
    return torch.stack(images)


def _decode_torchvision(path: Path, chunks: list[np.ndarray], offsets: np.ndarray
                        ) -> Optional[list[torch.Tensor]]:
    """Batched libjpeg decode (about 4x faster than PIL, same pixels); None where unavailable.

    torchvision 0.29 deprecates its image codecs in favour of TorchCodec, hence the PIL fallback
    and the silenced warning.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    tensors = [torch.from_numpy(chunk) for chunk in chunks]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # UNCHANGED, not RGB: the channel count is checked (grayscale expanded with a
            # warning, CMYK refused) instead of converted silently.
            return list(decode_jpeg(tensors, mode=ImageReadMode.UNCHANGED))
    except RuntimeError:
        # The batched decoder does not say which image is bad: PIL finds and names it.
        return None


def _decode_pil(path: Path, index: int, chunk: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    where = (f"{path}: image {index} (key 'jpeg', bytes {int(offsets[index])}:"
             f"{int(offsets[index + 1])})")
    try:
        with Image.open(io.BytesIO(chunk.tobytes())) as image:
            array, gray = image_to_rgb8(image, where)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where} is not a valid JPEG ({exc})") from exc
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return tensor[:1] if gray else tensor  # _decode_all expands it and warns once


def _find_npz(path: Path, name: str, split: str) -> Path:
    if path.is_file():
        return path
    candidates = [path / f"{split}.npz", path / name / f"{split}.npz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"offline {name} {split} set not found: looked for "
                    f"{', '.join(str(c.absolute()) for c in [path, *candidates])} (give a .npz "
                    "file or a directory holding train.npz/test.npz)")


# ----------------------------------------------------------------------------- ImageFolder


def _image_folder_class(name: str) -> type:
    from torchvision.datasets import ImageFolder

    canonical = CLASS_NAMES[name]

    class CifarImageFolder(ImageFolder):
        """ImageFolder whose class indices follow the dataset's canonical order.

        Folders named after the canonical classes map to their canonical index (so a folder with
        a subset of classes still gets the labels the published models predict); otherwise the
        folder count must match the dataset and the sorted folder order is used.
        """

        def find_classes(self, directory: Union[str, Path]) -> tuple[list[str], dict[str, int]]:
            classes, _ = super().find_classes(directory)
            if set(classes) <= set(canonical):
                return classes, {c: canonical.index(c) for c in classes}
            if len(classes) != len(canonical):
                raise DataError(
                    f"{directory}: found {len(classes)} class folders {classes[:5]}..., expected "
                    f"{len(canonical)} for {name} or folders named after its classes "
                    f"({', '.join(canonical[:4])}, ...)")
            logger.info("%s: class folders are not %s class names; using sorted folder order",
                        directory, name)
            return classes, {c: i for i, c in enumerate(classes)}

        _warned_gray = False

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            file, target = self.samples[index]
            image = _load_image_file(file)
            if image.mode == "L":  # an 8-bit grayscale file, already checked
                if not type(self)._warned_gray:
                    type(self)._warned_gray = True
                    _warn_grayscale(self.root, file)
                image = image.convert("RGB")
            if self.transform is not None:
                image = self.transform(image)
            return image, target

    return CifarImageFolder


def _load_image_file(file: str) -> Any:
    """A checked image file as a PIL image: RGB, or L for 8-bit grayscale (the caller warns).

    torchvision's default loader converts anything to RGB: a 16-bit PNG saturates to white, a
    float TIFF in [0, 1] rounds to black, without a word.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise DataError(f"{file}: image is {image.size[0]}x{image.size[1]}, expected "
                                f"{IMAGE_SIZE}x{IMAGE_SIZE} (resize the folder beforehand)")
            array, gray = image_to_rgb8(image, file)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot be read as an image ({exc})") from exc
    return Image.fromarray(array[:, :, 0] if gray else array)


def _find_image_folder(path: Path, split: str) -> Path:
    if (path / split).is_dir():
        return path / split
    if path.is_dir():
        return path
    raise DataError(f"image folder not found: looked for {path / split} and {path}")


# ----------------------------------------------------------------------------- torchvision


def _torchvision_dataset(name: str, split: str, root: Path, augment: bool,
                         download: bool) -> Dataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"

    def load(download_here: bool) -> Dataset:
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            dataset = cls(str(root), train=split == "train", download=download_here,
                          transform=_pil_transform(augment))
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            if created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # a failed download leaves no empty folder behind
            raise DataError(
                f"cannot load {name} ({split}) through torchvision in {root}: {exc}. Without "
                f"network, put {archive} (or its extracted folder {folder}/) into {root}, or use "
                "an offline copy in the .npz format: --data-dir ../shared/data/cifar10 (a "
                "folder with test.npz; CIFAR-10 only)") from exc
        _check_cifar_arrays(dataset, root / folder, NUM_CLASSES[name])
        return dataset

    rank, world = distributed_rank_world()
    if world == 1 or not download:
        return load(download)
    # Under torchrun only rank 0 downloads and extracts (all ranks writing the same archive and
    # folder at once corrupt it); the others wait for it, then read the files. Rank 0 reaches
    # the barrier even when it fails, so the others fail with their own error instead of hanging.
    dataset: Optional[Dataset] = None
    error: Optional[DataError] = None
    if rank == 0:
        try:
            dataset = load(True)
        except DataError as exc:
            error = exc
    barrier(timeout=DOWNLOAD_TIMEOUT)
    if error is not None:
        raise error
    return dataset if dataset is not None else load(False)


def _check_cifar_arrays(dataset: Any, folder: Path, num_classes: int) -> None:
    """torchvision's CIFAR arrays are what its __getitem__ assumes: uint8 (N, 32, 32, 3) and N
    labels in range (a replaced batch file of floats or 16-bit pixels would be misread)."""
    pixels = getattr(dataset, "data", None)
    if pixels is None:  # not torchvision's class (a stand-in): nothing to check
        return
    labels = np.asarray(getattr(dataset, "targets", []))
    expected = f"uint8 pixels of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3)"
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        found = (f"{pixels.dtype} pixels, values {pixels.min():g}..{pixels.max():g}"
                 if isinstance(pixels, np.ndarray) and pixels.size else type(pixels).__name__)
        raise DataError(f"{folder}: the CIFAR batch files hold {found}; expected {expected} "
                        "(8-bit): delete the folder to download it again")
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"{folder}: the CIFAR batch files hold pixels of shape "
                        f"{tuple(pixels.shape)}; expected {expected}")
    if len(labels) != len(pixels) or (len(labels) and (labels.min() < 0
                                                       or labels.max() >= num_classes)):
        raise DataError(f"{folder}: the CIFAR batch files hold {len(labels)} labels in "
                        f"[{labels.min() if len(labels) else '-'}, "
                        f"{labels.max() if len(labels) else '-'}] for {len(pixels)} images; "
                        f"expected one label in [0, {num_classes}) per image")


# ----------------------------------------------------------------------------- public API


def build_dataset(name: str, split: str, format: str = "torchvision",
                  path: Optional[PathLike] = None, augment: Optional[bool] = None,
                  download: bool = True) -> Dataset:
    """Build a dataset of (float CHW image in [0, 1], int label).

    Args:
        name: 'cifar10' or 'cifar100' ('CIFAR-10' / 'CIFAR-100' spellings too).
        split: 'train' or 'test'.
        format: 'torchvision' (downloads into ``path``, default ./data), 'npz' (a .npz file or a
            directory holding train.npz/test.npz), 'imagefolder' (``path/split`` or ``path``
            with one folder per class of 32x32 images) or 'auto' (:func:`resolve_format`).
        augment: RandomCrop + flip; default True for 'train', False for 'test'.
        download: torchvision only: download when the files are missing.
    """
    name = normalize_dataset_name(name)
    split = _check_split(split)
    fmt = resolve_format(format, path).strip().lower()
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {format!r}; expected one of {list(FORMATS)}")
    if augment is None:
        augment = split == "train"

    if fmt == "torchvision":
        return _torchvision_dataset(name, split, Path(path or "data"), augment, download)
    if path is None:
        raise DataError(f"dataset format {fmt!r} needs a path")
    path = Path(path).expanduser()
    if not path.exists():
        relative = ("" if path.is_absolute()
                    else f" (relative to the working directory {Path.cwd()})")
        raise DataError(f"dataset path {path.absolute()} does not exist{relative}")
    if fmt == "npz":
        file = _find_npz(path, name, split)
        dataset = NpzImageDataset(file, _tensor_transform(augment), NUM_CLASSES[name])
        logger.info("loaded %d %s %s images from %s", len(dataset), name, split, file)
        return dataset
    folder = _find_image_folder(path, split)
    return _image_folder_class(name)(str(folder), transform=_pil_transform(augment))


def take_first(dataset: Dataset, n: Optional[int]) -> Dataset:
    """The first ``n`` examples (all of them for None); the .npz copies are pre-shuffled, so
    prefixes are roughly class-balanced."""
    if n is None:
        return dataset
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = len(dataset)  # type: ignore[arg-type]
    if n > total:
        logger.warning("asked for the first %d examples but the dataset has %d; using all",
                       n, total)
        n = total
    return Subset(dataset, range(n))


def load_tensors(dataset: Dataset, n: Optional[int] = None,
                 batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples as ``(x (N, C, H, W) float, y (N,) int64)`` for evaluation."""
    subset = take_first(dataset, n)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for x, y in DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.int64))
    if not xs:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE), torch.empty(0, dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- training batches


def dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` as ``(x, y)``: an unaugmented .npz dataset as its decoded uint8 images
    (a quarter of the memory; :func:`as_float_images` gives exactly the floats it yields),
    anything else through :func:`load_tensors`."""
    if isinstance(dataset, NpzImageDataset) and dataset.transform is None:
        return dataset.images, dataset.labels
    if (isinstance(dataset, Subset) and isinstance(dataset.dataset, NpzImageDataset)
            and dataset.dataset.transform is None):  # take_first of one (--n-train)
        index = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return dataset.dataset.images[index], dataset.dataset.labels[index]
    return load_tensors(dataset)


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (as the datasets compute it); float images unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding=4) with zero padding + RandomHorizontalFlip, per image.

    Done on the batch with an explicit generator (not in the dataset with the global RNG), so that
    the augmentation of every iteration is reproducible, also on resume. The draws are made on
    the generator's device (the CPU) and moved, so every device augments alike.
    """
    batch, _, height, width = x.shape
    pad = CROP_PADDING
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(height)).to(x.device)          # (B, H)
    cols = left[:, None] + torch.arange(width)                          # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    b = torch.arange(batch, device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def local_order(n: int, seed: int, purpose: str, index: int, rank: int, world: int,
                shuffle: bool) -> torch.Tensor:
    """This rank's share of a (seeded) permutation of range(n); equal length on every rank."""
    order = (torch.randperm(n, generator=stream(seed, purpose, index)) if shuffle
             else torch.arange(n))
    usable = n // world * world
    return order[:usable][rank::world]


def endless_indices(length: int, position: int, count: int,
                    order: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Entries ``position .. position + count - 1`` of the endless chain of permutations of
    range(length) whose cycle k is ``order(k)``: a stream read by position, so a resumed run
    continues it without any saved state."""
    out = [torch.empty(0, dtype=torch.int64)]
    while count > 0:
        cycle, offset = divmod(position, length)
        take = order(cycle)[offset:offset + count]
        out.append(take)
        position, count = position + len(take), count - len(take)
    return torch.cat(out)


class IterationData:
    """Training batches from data held as tensors: per iteration a main batch of ``batch`` images
    and an ``extra`` batch (the mixer's extra clean images; 0 for base-model training).

    The data lives on ``device``; each iteration's images are gathered and augmented there
    (:func:`augment_batch`, crops and flips seeded by the iteration and rank). The main order is
    a seeded permutation per epoch (this rank's share; skipped up to the resume point); the extra
    stream is an endless chain of seeded permutations indexed by the global iteration, so
    neither needs any state beyond the position.
    """

    def __init__(self, data: Union[Dataset, tuple[torch.Tensor, torch.Tensor]], batch: int,
                 extra: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")) -> None:
        x, y = data if isinstance(data, tuple) else dataset_tensors(data)
        self.x, self.y = x.to(device), y.to(device=device, dtype=torch.int64)
        self.batch, self.extra = batch, extra
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.device = device
        self.n = len(self.y)
        self.local = self.n // world
        self.iterations_per_epoch = self.local // batch
        if self.iterations_per_epoch < 1:
            raise ValueError(f"the training set has {self.n} images, fewer than one batch of "
                             f"{batch} per process x {world} processes")

    def _extra_indices(self, iteration: int) -> torch.Tensor:
        return endless_indices(
            self.local, iteration * self.extra, self.extra,
            lambda cycle: local_order(self.n, self.seed, "extra", cycle, self.rank, self.world,
                                      True))

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y, x_extra, y_extra) of iterations start .. iterations_per_epoch - 1 of ``epoch``,
        augmented."""
        order = local_order(self.n, self.seed, "main", epoch, self.rank, self.world,
                            self.shuffle)
        first = epoch * self.iterations_per_epoch
        for i in range(start, self.iterations_per_epoch):
            idx = torch.cat([order[i * self.batch:(i + 1) * self.batch],
                             self._extra_indices(first + i)]).to(self.device)
            x = augment_batch(as_float_images(self.x[idx]),
                              stream(self.seed, "augment", first + i, self.rank))
            y = self.y[idx]
            yield x[:self.batch], y[:self.batch], x[self.batch:], y[self.batch:]


__all__ = [
    "CIFAR10_CLASSES", "CIFAR100_CLASSES", "DataError", "FORMATS", "IterationData",
    "NUM_CLASSES", "NpzImageDataset", "as_float_images", "augment_batch", "build_dataset",
    "dataset_tensors", "endless_indices", "load_tensors", "local_order",
    "normalize_dataset_name", "take_first", "train_transform",
]

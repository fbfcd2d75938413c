"""The image benchmarks, read from their official on-disk layouts, with the standard zero-shot splits.

``cub200``, ``cars196``, ``sop``, ``inshop`` and ``imagefolder``. Reading an index validates it
(every line parses, every listed image exists) and decodes nothing; images are decoded in
DataLoader workers by :class:`ImageFiles`. torchvision is imported only for the transforms.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import DataError

IMAGE_DATASETS = ("cub200", "cars196", "sop", "inshop", "imagefolder")
LAYOUTS = {
    "cub200": "CUB_200_2011/ with images.txt ('<image_id> <path>'), image_class_labels.txt "
    "('<image_id> <class_id>') and images/; classes 1-100 train, 101-200 test",
    "cars196": "a folder with cars_annos.mat (struct array 'annotations' with 'relative_im_path' and "
    "'class') and car_ims/; classes 1-98 train, 99-196 test",
    "sop": "Stanford_Online_Products/ with Ebay_train.txt and Ebay_test.txt (a header line, then "
    "'<image_id> <class_id> <super_class_id> <path>')",
    "inshop": "a folder with list_eval_partition.txt (a count line, a header line, then '<image_name> "
    "<item_id> <evaluation_status>') and img/; train on 'train', retrieve 'query' in 'gallery'",
    "imagefolder": "one sub-folder of images per class; classes in sorted order, the first half trains",
}
# folder names a --data-root that is the parent of the data set may hold
SUBDIRS = {
    "cub200": ("CUB_200_2011",),
    "cars196": ("cars196", "Cars196", "CARS196", "stanford_cars", "cars"),
    "sop": ("Stanford_Online_Products",),
    "inshop": ("In-shop Clothes Retrieval Benchmark", "In-shop", "inshop", "InShop", "Eval"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LayoutError(DataError):
    """An index file that is missing or malformed; the message names the file and the layout."""


class ImageDecodeError(RuntimeError):
    """An image that fails to decode during training; the message names the file.

    Raised in a DataLoader worker, it reaches the main process with the worker's traceback in
    its message; the one line that names the file is kept.
    """

    PREFIX = "cannot decode image "

    def __init__(self, message: str):
        lines = [line for line in str(message).splitlines() if self.PREFIX in line]
        if lines:
            message = lines[-1][lines[-1].index(self.PREFIX) :]
        super().__init__(message)


@dataclass
class Split:
    paths: List[str]
    labels: torch.Tensor  # int64

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(torch.unique(self.labels))


@dataclass
class ImageData:
    """An image data set: ``train`` (labels 0..C-1), ``test`` or ``query`` + ``gallery``."""

    name: str
    description: str
    root: str
    train: Split
    test: Optional[Split] = None  # queries retrieve among the other test images
    query: Optional[Split] = None  # In-Shop: queries retrieve in the gallery
    gallery: Optional[Split] = None
    image: bool = True

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.labels

    @property
    def num_train_classes(self) -> int:
        return int(self.train.labels.max()) + 1

    def counts(self) -> Dict[str, int]:
        out = {"num_train_images": len(self.train), "num_train_classes": self.train.num_classes}
        if self.query is not None and self.gallery is not None:
            classes = torch.unique(torch.cat([self.query.labels, self.gallery.labels]))
            out.update(
                num_test_images=len(self.query) + len(self.gallery),
                num_test_classes=len(classes),
                num_query=len(self.query),
                num_gallery=len(self.gallery),
            )
        else:
            assert self.test is not None
            out.update(num_test_images=len(self.test), num_test_classes=self.test.num_classes)
        return out


def _find(name: str, root: str, marker: str) -> str:
    """The folder holding ``marker``: ``root`` itself or one of the data set's usual sub-folders."""
    if not os.path.isdir(root):
        raise LayoutError(f"{name}: --data-root {root} is not a directory (expected {LAYOUTS[name]})")
    tried = [root] + [os.path.join(root, sub) for sub in SUBDIRS.get(name, ())]
    for folder in tried:
        if os.path.isfile(os.path.join(folder, marker)):
            return folder
    where = " or ".join(os.path.join(folder, marker) for folder in tried[:2])
    more = f" (or another of {', '.join(SUBDIRS[name][1:])})" if len(SUBDIRS.get(name, ())) > 1 else ""
    raise LayoutError(f"{name}: no index file {where}{more}; expected layout: {LAYOUTS[name]}")


def _lines(path: str) -> List[Tuple[int, List[str]]]:
    """``(line number, fields)`` of the non-blank lines of a text index."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{path} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc}") from None
    return [(i, line.split()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _int(field: str, path: str, line: int, what: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise LayoutError(f"{path}, line {line}: {what} is not an integer: {field!r}") from None


def _check_files(name: str, paths: Sequence[str], index: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise LayoutError(
            f"{name}: {len(missing)} of the {len(paths)} images listed in {index} are missing, "
            f"first {missing[0]}"
        )


def _split(paths: List[str], labels: List[int], train: Callable[[int], bool]) -> Tuple[Split, Split]:
    """Train/test by class; training labels are renumbered 0..C-1 in sorted order."""
    y = np.asarray(labels, dtype=np.int64)
    is_train = np.array([train(c) for c in y], dtype=bool)
    _, train_y = np.unique(y[is_train], return_inverse=True)
    return (
        Split(
            [p for p, t in zip(paths, is_train) if t], torch.as_tensor(train_y.reshape(-1), dtype=torch.long)
        ),
        Split([p for p, t in zip(paths, is_train) if not t], torch.as_tensor(y[~is_train], dtype=torch.long)),
    )


def _check_sides(name: str, index: str, train: Split, test: Split) -> None:
    for side, split in (("training", train), ("test", test)):
        if split.num_classes < 2:
            raise LayoutError(
                f"{name}: {index} gives {split.num_classes} {side} classes, at least 2 are needed "
                f"(expected {LAYOUTS[name]})"
            )


def cub200(root: str) -> ImageData:
    folder = _find("cub200", root, "images.txt")
    images_txt = os.path.join(folder, "images.txt")
    labels_txt = os.path.join(folder, "image_class_labels.txt")
    if not os.path.isfile(labels_txt):
        raise LayoutError(f"cub200: no index file {labels_txt}; expected layout: {LAYOUTS['cub200']}")
    paths: Dict[int, str] = {}
    for line, fields in _lines(images_txt):
        if len(fields) != 2:
            raise LayoutError(
                f"{images_txt}, line {line}: expected '<image_id> <path>', got {' '.join(fields)!r}"
            )
        paths[_int(fields[0], images_txt, line, "image_id")] = os.path.join(folder, "images", fields[1])
    classes: Dict[int, int] = {}
    for line, fields in _lines(labels_txt):
        if len(fields) != 2:
            raise LayoutError(
                f"{labels_txt}, line {line}: expected '<image_id> <class_id>', got {' '.join(fields)!r}"
            )
        image_id = _int(fields[0], labels_txt, line, "image_id")
        c = _int(fields[1], labels_txt, line, "class_id")
        if not 1 <= c <= 200:
            raise LayoutError(f"{labels_txt}, line {line}: class_id {c} is outside 1-200")
        if image_id not in paths:
            raise LayoutError(f"{labels_txt}, line {line}: image_id {image_id} is not in {images_txt}")
        classes[image_id] = c
    unlabelled = sorted(set(paths) - set(classes))
    if unlabelled:
        raise LayoutError(f"{labels_txt} gives no class for image_id {unlabelled[0]} of {images_txt}")
    if not paths:
        raise LayoutError(f"{images_txt} lists no images; expected layout: {LAYOUTS['cub200']}")
    ids = sorted(paths)
    all_paths = [paths[i] for i in ids]
    _check_files("cub200", all_paths, images_txt)
    train, test = _split(all_paths, [classes[i] for i in ids], lambda c: c <= 100)
    _check_sides("cub200", labels_txt, train, test)
    return ImageData("cub200", "CUB-200-2011: classes 1-100 train, 101-200 test", folder, train, test)


def cars196(root: str) -> ImageData:
    folder = _find("cars196", root, "cars_annos.mat")
    mat_path = os.path.join(folder, "cars_annos.mat")
    try:
        mat = importlib.import_module("scipy.io").loadmat(mat_path, squeeze_me=True)
    except Exception as exc:
        raise LayoutError(f"cannot read {mat_path} as a MATLAB file: {exc}") from None
    annos = mat.get("annotations")
    names = getattr(getattr(annos, "dtype", None), "names", None) or ()
    if "relative_im_path" not in names or "class" not in names:
        raise LayoutError(
            f"{mat_path} has no struct array 'annotations' with fields 'relative_im_path' and 'class' "
            f"(found {sorted(k for k in mat if not k.startswith('__'))}); expected layout: {LAYOUTS['cars196']}"
        )
    annos = np.atleast_1d(annos)
    paths, labels = [], []
    for i, a in enumerate(annos, 1):
        rel, c = a["relative_im_path"], a["class"]
        try:
            c = int(np.asarray(c).reshape(-1)[0])
        except (ValueError, TypeError, IndexError):
            raise LayoutError(f"{mat_path}: annotation {i} has class {c!r}, not an integer") from None
        if not isinstance(rel, str) or not rel:
            raise LayoutError(f"{mat_path}: annotation {i} has relative_im_path {rel!r}, not a path")
        if not 1 <= c <= 196:
            raise LayoutError(f"{mat_path}: annotation {i} has class {c}, outside 1-196")
        paths.append(os.path.join(folder, rel))
        labels.append(c)
    if not paths:
        raise LayoutError(f"{mat_path} lists no images")
    _check_files("cars196", paths, mat_path)
    train, test = _split(paths, labels, lambda c: c <= 98)
    _check_sides("cars196", mat_path, train, test)
    return ImageData("cars196", "Cars196: classes 1-98 train, 99-196 test", folder, train, test)


def _sop_file(path: str) -> Tuple[List[str], List[int]]:
    folder = os.path.dirname(path)
    paths, labels = [], []
    for line, fields in _lines(path):
        if line == 1 and fields and fields[0] == "image_id":
            continue  # the header
        if len(fields) != 4:
            raise LayoutError(
                f"{path}, line {line}: expected '<image_id> <class_id> <super_class_id> <path>', "
                f"got {' '.join(fields)!r}"
            )
        _int(fields[0], path, line, "image_id")
        labels.append(_int(fields[1], path, line, "class_id"))
        _int(fields[2], path, line, "super_class_id")
        paths.append(os.path.join(folder, fields[3]))
    if not paths:
        raise LayoutError(f"{path} lists no images; expected layout: {LAYOUTS['sop']}")
    _check_files("sop", paths, path)
    return paths, labels


def sop(root: str) -> ImageData:
    folder = _find("sop", root, "Ebay_train.txt")
    train_txt, test_txt = os.path.join(folder, "Ebay_train.txt"), os.path.join(folder, "Ebay_test.txt")
    if not os.path.isfile(test_txt):
        raise LayoutError(f"sop: no index file {test_txt}; expected layout: {LAYOUTS['sop']}")
    train_paths, train_labels = _sop_file(train_txt)
    test_paths, test_labels = _sop_file(test_txt)
    overlap = set(train_labels) & set(test_labels)
    if overlap:
        raise LayoutError(f"sop: class_id {min(overlap)} is in both {train_txt} and {test_txt}")
    train, _ = _split(train_paths, train_labels, lambda c: True)
    test = Split(test_paths, torch.as_tensor(test_labels, dtype=torch.long))
    _check_sides("sop", f"{train_txt} / {test_txt}", train, test)
    return ImageData(
        "sop", "Stanford Online Products: Ebay_train.txt trains, Ebay_test.txt tests", folder, train, test
    )


def inshop(root: str) -> ImageData:
    folder = _find("inshop", root, "list_eval_partition.txt")
    index = os.path.join(folder, "list_eval_partition.txt")
    lines = _lines(index)
    if len(lines) < 2:
        raise LayoutError(
            f"{index}: expected a count line and a header line; expected layout: {LAYOUTS['inshop']}"
        )
    (l1, count), (l2, header) = lines[0], lines[1]
    declared = _int(count[0] if len(count) == 1 else " ".join(count), index, l1, "the image count")
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise LayoutError(
            f"{index}, line {l2}: expected the header 'image_name item_id evaluation_status', got {' '.join(header)!r}"
        )
    entries: Dict[str, List[Tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    for line, fields in lines[2:]:
        if len(fields) != 3 or fields[2] not in entries:
            raise LayoutError(
                f"{index}, line {line}: expected '<image_name> <item_id> train|query|gallery', got {' '.join(fields)!r}"
            )
        entries[fields[2]].append((fields[0], fields[1]))
    listed = sum(len(v) for v in entries.values())
    if listed != declared:
        raise LayoutError(f"{index}: line {l1} says {declared} images, the file lists {listed}")
    first = next((name for v in entries.values() for name, _ in v), None)
    base = folder
    for cand in (
        folder,
        os.path.dirname(folder),
        os.path.join(os.path.dirname(folder), "Img"),
        os.path.join(folder, "Img"),
    ):
        if first is not None and os.path.isfile(os.path.join(cand, first)):
            base = cand
            break
    paths = [os.path.join(base, name) for v in entries.values() for name, _ in v]
    _check_files("inshop", paths, index)
    train_items = sorted({item for _, item in entries["train"]})
    test_items = sorted({item for k in ("query", "gallery") for _, item in entries[k]})
    if set(train_items) & set(test_items):
        raise LayoutError(
            f"{index}: item {sorted(set(train_items) & set(test_items))[0]} is in train and in query/gallery"
        )
    train_id = {item: i for i, item in enumerate(train_items)}
    test_id = {item: i for i, item in enumerate(test_items)}

    def split(kind: str, ids: Dict[str, int]) -> Split:
        return Split(
            [os.path.join(base, name) for name, _ in entries[kind]],
            torch.as_tensor([ids[item] for _, item in entries[kind]], dtype=torch.long),
        )

    train, query, gallery = split("train", train_id), split("query", test_id), split("gallery", test_id)
    for side, s in (("train", train), ("query", query), ("gallery", gallery)):
        if len(s) == 0 or (side == "train" and s.num_classes < 2):
            raise LayoutError(
                f"{index} has too few '{side}' images ({len(s)}); expected layout: {LAYOUTS['inshop']}"
            )
    return ImageData(
        "inshop",
        "In-Shop Clothes: train on 'train', retrieve 'query' in 'gallery'",
        folder,
        train,
        query=query,
        gallery=gallery,
    )


def imagefolder(root: str) -> ImageData:
    if not os.path.isdir(root):
        raise LayoutError(
            f"imagefolder: --data-root {root} is not a directory (expected {LAYOUTS['imagefolder']})"
        )
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) < 4:
        raise LayoutError(
            f"imagefolder: {root} holds {len(classes)} class folders, at least 4 are needed "
            f"(2 to train, 2 to test); expected layout: {LAYOUTS['imagefolder']}"
        )
    paths, labels = [], []
    for c, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        files = sorted(
            f
            for f in os.listdir(folder)
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
        )
        if not files:
            raise LayoutError(
                f"imagefolder: class folder {folder} holds no images ({'/'.join(IMAGE_EXTENSIONS)})"
            )
        paths += [os.path.join(folder, f) for f in files]
        labels += [c] * len(files)
    half = len(classes) // 2
    train, test = _split(paths, labels, lambda c: c < half)
    return ImageData(
        "imagefolder",
        f"image folder {os.path.basename(os.path.abspath(root))}: classes {classes[0]}..{classes[half - 1]} train, "
        f"{classes[half]}..{classes[-1]} test",
        root,
        train,
        test,
    )


READERS = {"cub200": cub200, "cars196": cars196, "sop": sop, "inshop": inshop, "imagefolder": imagefolder}


def load(name: str, root: Optional[str]) -> ImageData:
    if not root:
        raise LayoutError(f"--dataset {name} needs --data-root (or data_root in [study]): {LAYOUTS[name]}")
    return READERS[name](root)


def transforms(image_size: int, train: bool) -> Any:
    """torchvision.transforms.v2: training RandomResizedCrop + horizontal flip; evaluation resize to
    ``image_size * 256 / 224`` and centre crop; both ImageNet-normalised."""
    v2 = importlib.import_module("torchvision.transforms.v2")

    if train:
        steps = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            v2.ToImage(),
            *steps,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFiles(torch.utils.data.Dataset):
    """Decodes (PIL, RGB) and transforms one image. An item is an index, or ``(index, seed)``:
    the random transforms then draw from ``seed``, so a sample's augmentation does not depend on
    which worker decodes it (the same numbers with any ``--workers``)."""

    def __init__(self, split: Split, transform: Any) -> None:
        self.paths = split.paths
        self.labels = split.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> Tuple[Any, Any]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path = self.paths[index]
        from PIL import Image

        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:
            raise ImageDecodeError(f"{ImageDecodeError.PREFIX}{path}: {exc}") from None
        if seed is None:
            return self.transform(img), self.labels[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), self.labels[index]

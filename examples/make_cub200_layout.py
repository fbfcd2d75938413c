"""Write a tiny CUB-200-2011 look-alike in the official layout, to try `pml-ms-plus ablate --dataset cub200`.

    python examples/make_cub200_layout.py /tmp/fake_cub            # 200 classes x 2 images of 16x16
    pml-ms-plus ablate --dataset cub200 --data-root /tmp/fake_cub --config examples/cub200_ms.toml \
        --backbone resnet18 --pretrained none --image-size 32 --epochs 1 --seeds 1 --out /tmp/fake_cub_out

It writes CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
images/NNN.Class_name/*.jpg}: every class a colour of its own plus noise, so that a network can learn
something. Needs Pillow (installed with matplotlib).
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def write_cub200(root: str, per_class: int = 2, size: int = 16, classes: int = 200, seed: int = 0) -> str:
    """Write the layout under ``root/CUB_200_2011``; returns that folder."""
    from PIL import Image

    g = np.random.default_rng(seed)
    folder = os.path.join(root, "CUB_200_2011")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, labels, split, names = [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        name = f"{c:03d}.Class_{c}"
        names.append(f"{c} {name}")
        os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
        colour = g.integers(0, 256, 3)
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/Class_{c}_{k:04d}.jpg"
            pixels = np.clip(colour + g.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, "images", rel), quality=90)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k % 2 == 0)}")  # the official file; not the DML split
    for file, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", names),
    ):
        with open(os.path.join(folder, file), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write CUB_200_2011/ into")
    parser.add_argument("--per-class", type=int, default=2, help="images per class (default 2)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (default 16)")
    args = parser.parse_args()
    folder = write_cub200(args.root, args.per_class, args.size)
    print(f"wrote {folder}: 200 classes x {args.per_class} images of {args.size}x{args.size}")


if __name__ == "__main__":
    main()

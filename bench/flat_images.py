"""A second kind of data for the codebook-health benchmark: cartoon sprites on a white background.

Photographs (the built-in images) have texture everywhere; sprites and cartoons have large flat areas, so most
of an encoder's output vectors are near-copies of a few (the white background, each flat fill) and a codebook's
rows pile onto a few codes. A rule tuned on photographs must hold here too.

    python -m bench.flat_images --out runs/flat_images --count 400
    python -m bench.codebook_health --set data.source=folder --set data.path=runs/flat_images --variants ours

Each image: a white canvas with 1-4 sprites, each a flat-filled ellipse, rectangle or polygon (a few with a
flat-filled inner shape, as eyes or patches) with a dark outline. Deterministic in `--seed`.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(230, 57, 70), (241, 250, 238), (168, 218, 220), (69, 123, 157), (29, 53, 87), (255, 183, 3),
           (251, 133, 0), (33, 158, 188), (142, 202, 230), (106, 153, 78), (188, 71, 73), (255, 214, 165)]
OUTLINE = (24, 24, 24)


def sprite(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """One flat-filled shape with an outline, and sometimes a smaller flat patch inside it."""
    w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
    x, y = rng.randint(0, size - w), rng.randint(0, size - h)
    box = (x, y, x + w, y + h)
    fill, width = rng.choice(PALETTE), rng.randint(1, 3)
    kind = rng.choice(("ellipse", "rectangle", "polygon"))
    if kind == "ellipse":
        draw.ellipse(box, fill=fill, outline=OUTLINE, width=width)
    elif kind == "rectangle":
        draw.rounded_rectangle(box, radius=rng.randint(0, min(w, h) // 3), fill=fill, outline=OUTLINE, width=width)
    else:
        points = [(rng.randint(x, x + w), rng.randint(y, y + h)) for _ in range(rng.randint(3, 6))]
        draw.polygon(points, fill=fill, outline=OUTLINE, width=width)
    if rng.random() < 0.5 and min(w, h) > 12:  # an inner patch: an eye, a belly, a window
        iw, ih = w // 3, h // 3
        ix, iy = x + rng.randint(2, w - iw - 2), y + rng.randint(2, h - ih - 2)
        draw.ellipse((ix, iy, ix + iw, iy + ih), fill=rng.choice(PALETTE), outline=OUTLINE, width=1)


def make_image(rng: random.Random, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        sprite(draw, rng, size)
    return image


def write_images(out: Path, count: int, size: int = 160, seed: int = 0) -> list[Path]:
    """`count` PNG images of `size` px in `out` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = out / f"sprites_{i:05d}.png"
        make_image(rng, size).save(path)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--size", type=int, default=160, help="side in px (the seed config crops and resizes to 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 32:
        parser.error("--count must be >= 1 and --size >= 32")
    paths = write_images(args.out, args.count, args.size, args.seed)
    print(f"wrote {len(paths)} images of {args.size} px to {args.out}")


if __name__ == "__main__":
    main()

"""Time train.py's start check of image files (a header read per image) against decoding every image.

    python bench/bench_image_check.py --num_images 4000            # VOC-like 500 x 375 JPEGs, ~1 minute

Writes ``--num_images`` JPEGs of ``--width`` x ``--height`` (random pixels, quality 90: about as large
as VOC's photos) into a temporary folder, then times, over the same files:
- header: ``data.image_io.read_image_size`` (PIL header + end-of-image marker), what
  ``--check_images headers`` does per image;
- decode: ``data.image_io.read_image`` (the loader's full read), the peer: what a start check that
  decodes would cost;
- exist: one directory listing (``--check_images exist``), for scale.
Each figure is the median of ``--repeats`` passes after one warm-up pass (so the page cache is warm
for both: on a cold disk the read of the file dominates the decode and the ratio shrinks). The last line
printed is one JSON object with the per-image medians (seconds) and the ratio decode / header.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.image_io import read_image, read_image_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=4000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode_sample", type=int, default=500, help="images decoded per pass")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        # Smooth random images compress like photos; pure noise would make every file 3x larger.
        small = rng.integers(0, 256, (args.height // 8, args.width // 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((args.width, args.height), Image.BILINEAR))
        paths = []
        for i in range(args.num_images):
            path = os.path.join(folder, f"{i:06d}.jpg")
            Image.fromarray(np.roll(pixels, i, axis=1)).save(path, quality=90)
            paths.append(path)
        size_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024

        def timed(fn, items) -> float:
            start = time.perf_counter()
            for item in items:
                fn(item)
            return (time.perf_counter() - start) / len(items)

        sample = paths[: args.decode_sample]
        results = {"header": [], "decode": [], "exist": []}
        timed(read_image_size, paths)  # warm-up: the page cache holds every file
        timed(read_image, sample)
        for _ in range(args.repeats):
            results["header"].append(timed(read_image_size, paths))
            results["decode"].append(timed(read_image, sample))
            start = time.perf_counter()
            names = set(os.listdir(folder))
            assert all(os.path.basename(p) in names for p in paths)
            results["exist"].append((time.perf_counter() - start) / len(paths))

    medians = {k: statistics.median(v) for k, v in results.items()}
    for name, value in medians.items():
        print(f"{name:>7}: {value * 1e6:8.1f} us per image ({value * 16551:6.2f} s for VOC07+12's 16,551)")
    record = {
        "bench": "image_check",
        "date": datetime.date.today().isoformat(),
        "num_images": args.num_images,
        "image_size": [args.width, args.height],
        "mean_file_kb": round(size_kb, 1),
        **{f"{k}_s_per_image": v for k, v in medians.items()},
        "ratio_decode_over_header": medians["decode"] / medians["header"],
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()

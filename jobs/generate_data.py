"""Write the generated fine-grained data set (images, labels, object and part boxes).

    python -m jobs.generate_data --dest .wsdan/data/synthetic-k10-128 --num-classes 10
"""

from __future__ import annotations

import argparse
import time

from wsdan.data.synthetic import SyntheticSpec, write_synthetic_dataset


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dest", required=True, help="output folder")
    p.add_argument("--num-classes", type=int, default=10, help="number of classes")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same images)")
    p.add_argument("--n-train", type=int, default=2000, help="training images")
    p.add_argument("--n-val", type=int, default=400, help="validation images")
    p.add_argument("--n-test", type=int, default=400, help="test images")
    return p


def main(args: argparse.Namespace) -> None:
    spec = SyntheticSpec(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    t0 = time.perf_counter()
    root = write_synthetic_dataset(args.dest, spec=spec, n_train=args.n_train,
                                   n_val=args.n_val, n_test=args.n_test)
    n = args.n_train + args.n_val + args.n_test
    print(f"{n} images in {root} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    import sys

    from wsdan.cli import run_main

    sys.exit(run_main(main, get_args_parser()))

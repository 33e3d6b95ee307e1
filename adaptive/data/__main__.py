"""``python -m adaptive.data NAME [--root DIR] [--download]``: make a data set available."""

from __future__ import annotations

import argparse
import sys

from adaptive.data.images import DataNotFoundError, fashion_mnist, mnist

LOADERS = {"fashionmnist": fashion_mnist, "fashion-mnist": fashion_mnist, "mnist": mnist}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptive.data", description=__doc__)
    parser.add_argument("name", choices=sorted(LOADERS))
    parser.add_argument("--root", default=None, help="directory to look in and download into")
    parser.add_argument("--download", action="store_true", help="download if not found locally")
    args = parser.parse_args(argv)
    try:
        for split in ("train", "test"):
            ds = LOADERS[args.name](split, root=args.root, download=args.download)
            print(f"{args.name} {split}: {len(ds)} images from {ds.source}")
    except DataNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Omniglot (Lake et al., Science 2015) as a class-folder dataset.

The archives ``images_background_small1.zip`` / ``small2.zip`` (github.com/brendenlake/
omniglot, ``python/``; MIT licence) unpack to ``<set>/<Alphabet>/<characterNN>/<id>_<drawer>.png``.
:func:`flatten` copies them to ``out/<Alphabet>__<characterNN>/``, one folder per character,
which ``data.dataset: folder`` reads (``python -m dcml.data.omniglot OUT SET [SET ...]``).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from dcml.data.errors import DatasetError


def flatten(sources: Sequence[str | Path], out: str | Path) -> int:
    """Copy every ``<source>/<Alphabet>/<character>/*.png`` to ``out/<Alphabet>__<character>/``;
    returns the number of character folders. Existing identical files are left alone."""
    out = Path(out)
    characters = 0
    for source in map(Path, sources):
        alphabets = sorted(p for p in source.glob("*/") if p.is_dir() and not p.name.startswith("."))
        found = [c for a in alphabets for c in sorted(a.iterdir()) if c.is_dir() and any(c.glob("*.png"))]
        if not found:
            raise DatasetError(f"{source}: expected <Alphabet>/<character>/*.png folders (an unpacked Omniglot set)")
        for character in found:
            target = out / f"{character.parent.name}__{character.name}"
            if target.exists() and not target.is_dir():
                raise DatasetError(f"{target} exists and is not a folder")
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(character.glob("*.png")):
                destination = target / image.name
                if not destination.exists() or destination.stat().st_size != image.stat().st_size:
                    shutil.copyfile(image, destination)
            characters += 1
    return characters


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (one sub-folder per character)")
    parser.add_argument("sources", nargs="+", help="unpacked sets, e.g. images_background_small1")
    args = parser.parse_args(argv)
    print(f"{flatten(args.sources, args.out)} characters under {args.out}")


if __name__ == "__main__":
    main()

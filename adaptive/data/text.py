"""Six real English text domains from Debian packages and Python itself, read offline.

| domain       | source                                   | Debian package(s)            |
|--------------|------------------------------------------|------------------------------|
| fiction      | Jane Austen's six novels                 | r-cran-janeaustenr (+ PyPI rdata) |
| scripture    | King James Bible, 31,102 verses          | bible-kjv-text, bible-kjv    |
| quotes       | fortune cookies in 43 category files     | fortunes                     |
| dictionary   | GCIDE (1913 Webster + additions), dictd  | dict-gcide                   |
| computing    | FOLDOC computing dictionary, dictd       | dict-foldoc                  |
| code         | the Python standard library's ``.py``    | (the running interpreter)    |

Every loader takes ``root`` (default ``/``), the directory the package files live under, so a
package unpacked without installing it (``apt-get download P && dpkg-deb -x P_*.deb ROOT``) works
too. A missing package raises :class:`~adaptive.data.images.DataNotFoundError` naming the command
that installs it. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import itertools
import os
import re
import shutil
import struct
import subprocess
import sysconfig
import warnings
import zlib
from pathlib import Path

from adaptive.data.images import DataNotFoundError

__all__ = [
    "TEXT_DOMAINS",
    "austen_novels",
    "dictd_entries",
    "foldoc",
    "fortunes",
    "gcide",
    "kjv_verses",
    "python_sources",
    "text_domains",
]

TEXT_DOMAINS = ("fiction", "scripture", "quotes", "dictionary", "computing", "code")

_AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
_FORTUNES_DIR = "usr/share/games/fortunes"
_DICTD_DIR = "usr/share/dictd"
_DICTD_PACKAGES = {"gcide": "dict-gcide", "foldoc": "dict-foldoc"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root) if root is not None else Path("/")


def _missing(what: str, path: Path, packages: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{what} not found at {path}. Install it with `apt-get install -y {packages}` "
        "(as root), or "
        f"unpack the .deb with `apt-get download {packages} && dpkg-deb -x <file>.deb ROOT` and "
        f"pass root=ROOT"
    )


def austen_novels(root: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Jane Austen's six novels, ``{book name: full text}`` (lines joined by newlines).

    Read from the R lazy-load database of Debian ``r-cran-janeaustenr`` (each object a
    zlib-compressed serialised R character vector of lines) with PyPI ``rdata``; R is not needed.
    """
    base = _root(root) / _AUSTEN_DB
    if not base.with_suffix(".rdx").exists():
        raise _missing("Jane Austen's novels (janeaustenr)", base.parent, "r-cran-janeaustenr")
    try:
        import rdata
    except ImportError as err:
        raise ImportError(
            "austen_novels needs the PyPI package rdata to read R data files: pip install rdata"
        ) from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about R classes it does not convert
        index = rdata.conversion.convert(rdata.parser.parse_file(base.with_suffix(".rdx")))
        raw = base.with_suffix(".rdb").read_bytes()
        books = {}
        for name, (offset, length) in index["variables"].items():
            blob = raw[int(offset) : int(offset) + int(length)]
            # each entry: 4-byte big-endian uncompressed length, then a zlib stream
            obj = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
            lines = list(obj.iloc[:, 0]) if hasattr(obj, "columns") else list(obj)
            books[str(name)] = "\n".join(str(x) for x in lines)
    return dict(sorted(books.items()))


def kjv_verses(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The 31,102 verses of the King James Bible, Genesis 1:1 to Revelation 22:21, in order.

    Dumped by the ``bible`` program (Debian ``bible-kjv``) from its data files (``bible-kjv-text``);
    each verse's wrapped lines are joined with spaces, verse numbers removed.
    """
    base = _root(root)
    data = base / "usr/lib/bible.data"
    program = base / "usr/bin/bible"
    if not data.exists():
        raise _missing("King James Bible text", data, "bible-kjv-text bible-kjv")
    exe = str(program) if program.exists() else shutil.which("bible")
    if exe is None:
        raise _missing("the `bible` program", program, "bible-kjv")
    out = subprocess.run(
        [exe, "-p", str(data.parent), "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
        errors="replace",
    ).stdout
    verses: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^ +\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip() and verses and not re.match(r"^\S.* \d+$", line):
            verses[-1] += " " + line.strip()  # continuation of a wrapped verse
    return verses


def fortunes(root: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Fortune-cookie texts by category, ``{category: [text, ...]}`` (Debian ``fortunes``).

    Entries are located with each category's ``strfile`` index (``<category>.dat``: a 24-byte
    big-endian header whose second word is the entry count, then the entry offsets), so the count
    per category is the one the ``fortune`` program itself uses.
    """
    folder = _root(root) / _FORTUNES_DIR
    dats = sorted(folder.glob("*.dat")) if folder.is_dir() else []
    if not dats:
        raise _missing("fortune files", folder, "fortunes")
    out: dict[str, list[str]] = {}
    for dat in dats:
        text_file = dat.with_suffix("")
        if not text_file.is_file():
            continue
        header = dat.read_bytes()
        count = struct.unpack(">I", header[4:8])[0]
        delim = header[20:21]
        offsets = struct.unpack(f">{count + 1}I", header[24 : 24 + 4 * (count + 1)])
        raw = text_file.read_bytes()
        entries = []
        for start, stop in itertools.pairwise(offsets):
            chunk = raw[start:stop]
            # an entry ends with "<delim>\n" (the next entry's offset is just past it)
            if chunk.endswith(delim + b"\n"):
                chunk = chunk[:-2]
            entries.append(chunk.decode("utf-8", errors="replace").strip("\n"))
        out[text_file.name] = entries
    return out


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(name: str, root: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """``(headword, definition)`` pairs of a dictd database (``gcide``/``foldoc``), in index order.

    The dictd format: ``<name>.index`` lines ``word<TAB>offset<TAB>length`` (base-64 numbers) into
    the gzip-compatible ``<name>.dict.dz``. Metadata entries (``00-database-*``) are skipped.
    """
    if name not in _DICTD_PACKAGES:
        raise ValueError(f"name must be one of {sorted(_DICTD_PACKAGES)}, got {name!r}")
    folder = _root(root) / _DICTD_DIR
    index, data_file = folder / f"{name}.index", folder / f"{name}.dict.dz"
    if not (index.exists() and data_file.exists()):
        raise _missing(f"dictd database {name!r}", folder, _DICTD_PACKAGES[name])
    with gzip.open(data_file) as fh:
        data = fh.read()
    out = []
    with open(index, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            word, off, length = line.rstrip("\n").split("\t")[:3]
            if word.startswith("00-database") or word.startswith("00database"):
                continue
            start = _b64(off)
            text = data[start : start + _b64(length)].decode("utf-8", errors="replace").strip()
            out.append((word, text))
    return out


def gcide(root: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """GCIDE dictionary entries (Debian ``dict-gcide``); see :func:`dictd_entries`."""
    return dictd_entries("gcide", root)


def foldoc(root: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """FOLDOC computing-dictionary entries (Debian ``dict-foldoc``); see :func:`dictd_entries`."""
    return dictd_entries("foldoc", root)


def python_sources(
    root: str | os.PathLike[str] | None = None, max_files: int | None = None
) -> list[tuple[str, str]]:
    """``(relative path, source)`` of a Python standard library's ``.py`` files, sorted by path.

    ``root`` is the library folder (default: this interpreter's, ``sysconfig`` ``stdlib``).
    ``site-packages`` and the ``test``/``tests`` packages are left out.
    """
    lib = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not (lib / "os.py").exists():
        raise DataNotFoundError(f"no Python standard library at {lib} (expected {lib / 'os.py'})")
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    paths = sorted(
        p for p in lib.rglob("*.py") if not skip.intersection(p.relative_to(lib).parts[:-1])
    )
    if max_files is not None:
        paths = paths[:max_files]
    return [
        (str(p.relative_to(lib)), p.read_text(encoding="utf-8", errors="replace")) for p in paths
    ]


def text_domains(root: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """The six domains as ``{domain: [document, ...]}`` in :data:`TEXT_DOMAINS` order.

    Documents: fiction = the novels' paragraphs (blank-line separated); scripture = verses;
    quotes = fortune texts of every category; dictionary and computing = dictd definitions (each
    begins with its headword); code = standard-library source files.
    """
    novels = austen_novels(root)
    fiction = []
    for text in novels.values():
        # paragraphs (blank-line separated) keep documents short, like the other domains
        fiction.extend(p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())
    return {
        "fiction": fiction,
        "scripture": kjv_verses(root),
        "quotes": [t for texts in fortunes(root).values() for t in texts],
        "dictionary": [d for _, d in gcide(root)],
        "computing": [d for _, d in foldoc(root)],
        "code": [src for _, src in python_sources()],
    }

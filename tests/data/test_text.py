"""Text-domain loaders on the real installed Debian files (skipped, with the reason, when absent).

Reference counts: Austen word counts and the GCIDE/FOLDOC entry counts as measured in the
project's data notes; the KJV's 31,102 verses and 1,189 chapters (the standard figures); for
fortunes, the entry counts that Debian's ``strfile`` wrote into each ``.dat`` header, cross-checked
against an independent split of the text files on ``%`` lines.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from adaptive.data import images
from adaptive.data.text import (
    TEXT_DOMAINS,
    austen_novels,
    dictd_entries,
    foldoc,
    fortunes,
    gcide,
    kjv_verses,
    python_sources,
)


def need(path: str, package: str):
    return pytest.mark.skipif(
        not Path(path).exists(), reason=f"{path} missing: apt-get install -y {package}"
    )


@need("/usr/share/games/fortunes/people.dat", "fortunes")
def test_fortunes_counts_match_strfile_and_a_plain_split():
    cats = fortunes()
    folder = Path("/usr/share/games/fortunes")
    assert len(cats) == 43
    for name, texts in cats.items():
        header = (folder / f"{name}.dat").read_bytes()[:8]
        assert len(texts) == struct.unpack(">I", header[4:8])[0], name
        assert all("\n%\n" not in t for t in texts)
    assert sum(map(len, cats.values())) == 15_217
    assert len(cats["people"]) == 1251 and len(cats["computers"]) == 1051
    # an independent parse: split on lines that are a lone "%", drop empty pieces
    raw = (folder / "people").read_text(encoding="utf-8", errors="replace")
    pieces = [p.strip("\n") for p in raw.split("\n%\n") if p.strip()]
    assert pieces[0] == cats["people"][0].strip("\n")
    assert len(pieces) == len(cats["people"])


@need("/usr/share/dictd/gcide.index", "dict-gcide")
@need("/usr/share/dictd/foldoc.index", "dict-foldoc")
def test_dictd_gcide_and_foldoc_entry_counts():
    g = gcide()
    f = foldoc()
    assert len(g) == 203_641
    assert len(f) == 15_247
    words = dict(f)
    assert words["!"].startswith("exclamation mark")
    assert any(
        d.startswith("Associative Memory Parallel Processing Language\nAMPPL-II") for _, d in f
    )
    assert all(d for _, d in g[:1000])
    with pytest.raises(ValueError, match="name must be one of"):
        dictd_entries("wordnet")


@pytest.mark.skipif(
    not Path("/usr/lib/bible.data").exists() or shutil.which("bible") is None,
    reason="KJV missing: apt-get install -y bible-kjv-text bible-kjv",
)
def test_kjv_verses():
    verses = kjv_verses()
    assert len(verses) == 31_102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    # John 11:35 (0-based): 23,145 Old Testament verses + Matthew 1,071 + Mark 678 + Luke 1,151
    # + John 1-10 (51+25+36+54+47+71+53+59+41+42 = 479) + 34
    assert verses[23_145 + 1_071 + 678 + 1_151 + 479 + 34] == "Jesus wept."


@need("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx", "r-cran-janeaustenr")
def test_austen_novels_word_counts():
    pytest.importorskip("rdata", reason="pip install rdata")
    books = austen_novels()
    words = {k: len(v.split()) for k, v in books.items()}
    assert set(words) == {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    }
    # measured in the project's data notes: emma 157k, mansfieldpark 160k, prideprejudice 122k,
    # sensesensibility 119k, persuasion 83k, northangerabbey 77k
    for name, thousands in [
        ("emma", 157),
        ("mansfieldpark", 160),
        ("prideprejudice", 122),
        ("sensesensibility", 119),
        ("persuasion", 83),
        ("northangerabbey", 77),
    ]:
        assert round(words[name] / 1000) == thousands, name
    assert "It is a truth universally acknowledged" in books["prideprejudice"]


def test_python_sources_reads_the_standard_library():
    files = dict(python_sources())
    assert "os.py" in files and "def makedirs" in files["os.py"]
    assert not any(p.startswith(("test/", "site-packages/")) for p in files)
    assert len(python_sources(max_files=3)) == 3


def test_missing_packages_name_the_install_command(tmp_path):
    with pytest.raises(images.DataNotFoundError, match="apt-get install -y fortunes"):
        fortunes(root=tmp_path)
    with pytest.raises(images.DataNotFoundError, match="dict-gcide"):
        gcide(root=tmp_path)
    with pytest.raises(images.DataNotFoundError, match="bible-kjv-text"):
        kjv_verses(root=tmp_path)
    with pytest.raises(images.DataNotFoundError, match="r-cran-janeaustenr"):
        austen_novels(root=tmp_path)
    with pytest.raises(images.DataNotFoundError, match="standard library"):
        python_sources(root=tmp_path)
    assert TEXT_DOMAINS == ("fiction", "scripture", "quotes", "dictionary", "computing", "code")

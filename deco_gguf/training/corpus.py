"""The training corpus of the bundled model: the King James Bible, from Debian.

Source: the Debian packages `bible-kjv-text` (the text, compressed in the
Bible Retrieval System format) and `bible-kjv` (the `bible` program that
decompresses it), version 4.38. The KJV text itself (1611, revised 1769) is
in the public domain (Debian's copyright file: "The copyright for the King
James Version text of the Bible is expired"; in the United Kingdom the Crown's
letters patent still restrict printing of the KJV, so the bundled model's
corpus is public domain in the US and most other jurisdictions, not in the
UK). The packaging and the `bible` program are GPL-2+ / free-use; neither is
redistributed here: the packages are fetched with `apt-get download` (no root
needed, no installation) into a cache directory at training time, unpacked
with `dpkg-deb -x`, and the whole text is dumped with the unpacked `bible`.

Nothing from the packages is committed; only this recipe is.

    corpus = load_corpus()            # cached in ~/.cache/deco-gguf/corpus
    corpus.train, corpus.heldout      # lists of chapters (one string each)

Documents are chapters: the verses of one chapter joined by single spaces,
verse references dropped. The held-out split is a fixed, hash-chosen ~3% of
chapters (`is_heldout`), so the two splits are disjoint at the chapter level
(no verse of a held-out chapter is ever trained on) and the split does not
depend on the order or the machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..support.cache import cache_root
from ..support.errors import DecoError

PACKAGES = ("bible-kjv-text", "bible-kjv")
PACKAGE_VERSION = "4.38"  # the version the bundled model was trained from
LICENCE = (
    "King James Version (1611/1769), public domain (outside the UK's Crown letters patent); Debian packaging GPL-2+"
)
# sha256 of the dumped text (kjv.txt) from bible-kjv-text 4.38; another
# version of the package still works but is reported as a different corpus.
KJV_SHA256 = "cd45f0c9cedab8e4439bd6486c8952c77cc8b0ecc5d1f6ae3513f2039f47229d"
HELDOUT_PERCENT = 3
_VERSE_RE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def default_cache_dir() -> Path:
    """`DECO_CORPUS_CACHE`, else the corpus folder of the user's cache (deco_gguf.support.cache)."""
    env = os.environ.get("DECO_CORPUS_CACHE")
    return Path(env) if env else cache_root() / "corpus"


@dataclass
class Chapter:
    book: str  # the `bible` program's abbreviation: Ge, Exo, ..., Rev
    number: int
    verses: list[str]

    @property
    def ref(self) -> str:
        return f"{self.book} {self.number}"

    @property
    def text(self) -> str:
        return " ".join(self.verses)


@dataclass
class Corpus:
    train: list[str]  # chapters, in canonical order
    heldout: list[str]
    source: dict = field(default_factory=dict)  # packages, versions, sha256, licence

    @property
    def train_verses(self) -> list[str]:
        """The training verses (sentences for the tokenizer trainer)."""
        return self.source["_train_verses"]


def is_heldout(ref: str) -> bool:
    """The deterministic split: a chapter is held out iff crc32(ref) % 100 < HELDOUT_PERCENT."""
    return zlib.crc32(ref.encode()) % 100 < HELDOUT_PERCENT


def parse_chapters(text: str) -> list[Chapter]:
    """Parse `bible -f` output ("Ge1:1 In the beginning ...", one verse a line) into chapters."""
    chapters: list[Chapter] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _VERSE_RE.match(line)
        if not m:
            raise DecoError(f"unexpected line {lineno} in the KJV dump: {line[:80]!r}")
        book, chap, verse = m.group(1), int(m.group(2)), m.group(4).strip()
        if not chapters or chapters[-1].book != book or chapters[-1].number != chap:
            chapters.append(Chapter(book, chap, []))
        chapters[-1].verses.append(verse)
    return chapters


def split_chapters(chapters: list[Chapter]) -> tuple[list[Chapter], list[Chapter]]:
    train = [c for c in chapters if not is_heldout(c.ref)]
    heldout = [c for c in chapters if is_heldout(c.ref)]
    return train, heldout


class _ToolMissing(DecoError):
    pass


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise _ToolMissing(
            f"cannot fetch the training corpus: `{cmd[0]}` is not available. The corpus comes from the "
            f"Debian packages {', '.join(PACKAGES)} (apt-get download + dpkg-deb); run on a Debian/Ubuntu "
            f"machine, or put a KJV dump (`bible -f gen1:1-rev22:21`) at {default_cache_dir() / 'kjv.txt'}"
        ) from None
    if r.returncode != 0:
        raise DecoError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def _download(workdir: Path) -> dict[str, str]:
    """apt-get download the packages (the pinned version if the archive has it). Returns name -> version."""
    versions: dict[str, str] = {}
    for pkg in PACKAGES:
        try:
            _run(["apt-get", "download", f"{pkg}={PACKAGE_VERSION}"], cwd=workdir)
        except _ToolMissing:
            raise
        except DecoError:
            try:  # the archive moved on: take its version (recorded in the source record)
                _run(["apt-get", "download", pkg], cwd=workdir)
            except DecoError as e:
                raise DecoError(
                    f"cannot fetch the training corpus: `apt-get download {pkg}` failed. Run `apt-get update` "
                    f"first (the package lists may be missing), or check access to Debian's archive.\n{e}"
                ) from None
        debs = sorted(workdir.glob(f"{pkg}_*.deb"))
        if not debs:
            raise DecoError(f"apt-get download {pkg} left no .deb in {workdir}")
        versions[pkg] = debs[-1].name.split("_")[1]
        _run(["dpkg-deb", "-x", str(debs[-1]), str(workdir / "root")])
    return versions


def fetch_kjv(cache_dir: Path | str | None = None) -> tuple[str, dict]:
    """The KJV dump, one verse a line, fetched once into cache_dir. Returns (text, source record)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    txt = cache / "kjv.txt"
    meta = cache / "kjv.source"
    if not txt.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            work = Path(tmp)
            versions = _download(work)
            root = work / "root"
            bible = [str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "-d", "bible.data"]
            text = _run([*bible, "gen1:1-rev22:21"])
            if text.count("\n") < 31000:
                raise DecoError(f"the KJV dump has only {text.count(chr(10))} lines (expected 31102)")
            part = txt.with_suffix(".part")
            part.write_text(text, encoding="utf-8")
            meta.write_text(" ".join(f"{k}={v}" for k, v in versions.items()) + "\n", encoding="utf-8")
            part.replace(txt)
            shutil.rmtree(root, ignore_errors=True)
    text = txt.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    versions = dict(kv.split("=", 1) for kv in meta.read_text().split()) if meta.is_file() else {}
    source = {
        "corpus": "King James Bible (bible -f gen1:1-rev22:21)",
        "packages": versions or {p: "unknown (dump supplied by hand)" for p in PACKAGES},
        "licence": LICENCE,
        "sha256": digest,
        "matches_bundled_model": digest == KJV_SHA256,
    }
    return text, source


def load_corpus(cache_dir: Path | str | None = None) -> Corpus:
    """Fetch (once), parse and split the corpus."""
    text, source = fetch_kjv(cache_dir)
    chapters = parse_chapters(text)
    train, heldout = split_chapters(chapters)
    source |= {
        "chapters": len(chapters),
        "train_chapters": len(train),
        "heldout_chapters": len(heldout),
        "train_chars": sum(len(c.text) for c in train),
        "heldout_chars": sum(len(c.text) for c in heldout),
        "heldout_refs": [c.ref for c in heldout],
        "_train_verses": [v for c in train for v in c.verses],
    }
    return Corpus([c.text for c in train], [c.text for c in heldout], source)


if __name__ == "__main__":  # python -m deco_gguf.training.corpus: fetch and print the split
    c = load_corpus()
    for k, v in c.source.items():
        if not k.startswith("_") and k != "heldout_refs":
            print(f"{k}: {v}")
    print("held out:", ", ".join(c.source["heldout_refs"]))

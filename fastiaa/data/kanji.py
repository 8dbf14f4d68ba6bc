"""The kanji demo dataset: each character is a class, each type design one image of it.

Glyphs of common kanji (JIS X 0208 level 1 first, then level 2) are drawn by the CJK fonts that
Debian packages, and written in the Stanford Online Products on-disk format (docs/method.md §1), so the
SOP reader loads them: thousands of classes with a handful of images each, like SOP.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .datasets import DatasetError

logger = logging.getLogger(__name__)

FONT_DIR = Path("/usr/share/fonts")
"""Where Debian font packages install their files."""

GLYPH_FILL = 0.8
"""The longer side of a glyph's ink bounding box, as a fraction of the image side."""

_FORMAT = 1  # bump when the rendering or the list layout changes


@dataclass(frozen=True)
class FontSpec:
    """A font file and the Debian package that provides it (file relative to FONT_DIR)."""

    name: str
    package: str
    file: str
    design: str  # type designer / foundry, for picking visually distinct fonts

    @property
    def path(self) -> Path:
        return FONT_DIR / self.file


FONT_CATALOGUE: dict[str, FontSpec] = {spec.name: spec for spec in (
    FontSpec("ipa-mincho", "fonts-ipafont-mincho", "opentype/ipafont-mincho/ipam.ttf", "IPA"),
    FontSpec("ipa-gothic", "fonts-ipafont-gothic", "opentype/ipafont-gothic/ipag.ttf", "IPA"),
    FontSpec("ipaex-mincho", "fonts-ipaexfont-mincho", "opentype/ipaexfont-mincho/ipaexm.ttf", "IPA"),
    FontSpec("ipaex-gothic", "fonts-ipaexfont-gothic", "opentype/ipaexfont-gothic/ipaexg.ttf", "IPA"),
    FontSpec("takao-mincho", "fonts-takao-mincho", "truetype/takao-mincho/TakaoMincho.ttf", "IPA"),
    FontSpec("migmix", "fonts-migmix", "truetype/migmix/migmix-1m-regular.ttf", "IPA + M+"),
    FontSpec("monapo", "fonts-monapo", "truetype/monapo/monapo.ttf", "IPA + Mona"),
    FontSpec("vl-gothic", "fonts-vlgothic", "truetype/vlgothic/VL-Gothic-Regular.ttf", "VL (Sazanami / M+)"),
    FontSpec("ume-gothic", "fonts-horai-umefont", "truetype/horai-umefont/ume-tgo4.ttf", "Ume"),
    FontSpec("ume-mincho", "fonts-horai-umefont", "truetype/horai-umefont/ume-tmo3.ttf", "Ume"),
    FontSpec("umeplus-gothic", "fonts-umeplus", "truetype/umeplus/umeplus-gothic.ttf", "Ume + M+"),
    FontSpec("mplus-1", "fonts-mplus", "opentype/mplus/Mplus1-Regular.otf", "M+"),
    FontSpec("konatu", "fonts-konatu", "truetype/konatu/Konatu.ttf", "Konatu"),
    FontSpec("sawarabi-gothic", "fonts-sawarabi-gothic", "truetype/sawarabi-gothic/sawarabi-gothic-medium.ttf", "mshio"),
    FontSpec("sawarabi-mincho", "fonts-sawarabi-mincho", "truetype/sawarabi-mincho/sawarabi-mincho-medium.ttf", "mshio"),
    FontSpec("motoya-cedar", "fonts-motoya-l-cedar", "truetype/motoya-l-cedar/MTLc3m.ttf", "Motoya"),
    FontSpec("motoya-maruberi", "fonts-motoya-l-maruberi", "truetype/motoya-l-maruberi/MTLmr3m.ttf", "Motoya"),
    FontSpec("seto", "fonts-seto", "truetype/seto/setofont.ttf", "Seto (handwriting)"),
    FontSpec("klee-one", "fonts-klee", "truetype/klee/KleeOne-Regular.ttf", "Fontworks (pen)"),
    FontSpec("lxgw-wenkai", "fonts-lxgw-wenkai", "truetype/lxgw-wenkai/LXGWWenKai-Regular.ttf", "LXGW (from Klee One)"),
    FontSpec("kiloji", "fonts-kiloji", "truetype/kiloji/kiloji.ttf", "Kiloji (handwriting)"),
    FontSpec("kouzan-mouhitsu", "fonts-kouzan-mouhitsu", "truetype/kouzan-mouhitsu/kouzan-mouhitsu.ttf", "Kouzan (brush)"),
    FontSpec("kouzan-gyosho", "fonts-kouzan-mouhitsu", "truetype/kouzan-mouhitsu/kouzan-mouhitsu-gyosho.ttf", "Kouzan (brush)"),
    FontSpec("aoyagi-soseki", "fonts-aoyagi-soseki", "truetype/aoyagi-soseki/aoyagi-soseki.ttf", "Aoyagi (cursive brush)"),
    FontSpec("misaki-gothic", "fonts-misaki", "truetype/misaki/misaki_gothic.ttf", "Misaki (8x8 pixels)"),
    FontSpec("dotgothic16", "fonts-dotgothic16", "truetype/dotgothic16/DotGothic16-Regular.ttf", "Fontworks (16x16 pixels)"),
    FontSpec("hanazono-mincho", "fonts-hanazono", "truetype/hanazono/HanaMinA.ttf", "GlyphWiki"),
    FontSpec("bizud-gothic", "fonts-morisawa-bizud-gothic", "truetype/bizud-gothic/BIZUDGothic-Regular.ttf", "Morisawa"),
    FontSpec("bizud-mincho", "fonts-morisawa-bizud-mincho", "truetype/bizud-mincho/BIZUDMincho-Regular.ttf", "Morisawa"),
    FontSpec("ar-pl-ukai", "fonts-arphic-ukai", "truetype/arphic/ukai.ttc", "Arphic (Chinese kai)"),
    FontSpec("ar-pl-uming", "fonts-arphic-uming", "truetype/arphic/uming.ttc", "Arphic (Chinese ming)"),
    FontSpec("wqy-zenhei", "fonts-wqy-zenhei", "truetype/wqy/wqy-zenhei.ttc", "WenQuanYi (Chinese)"),
)}
"""Debian CJK fonts the kanji demo can draw with, by name."""

DEFAULT_FONTS: tuple[str, ...] = (
    # the first eight already span mincho, gothic, rounded, handwriting, pen, brush and pixel styles
    "ipa-mincho", "ipaex-gothic", "motoya-maruberi", "seto", "klee-one", "kouzan-mouhitsu", "dotgothic16",
    "bizud-mincho", "vl-gothic", "konatu", "sawarabi-gothic", "sawarabi-mincho", "motoya-cedar", "kiloji",
    "hanazono-mincho", "bizud-gothic",
)
"""16 visually distinct Japanese designs (no two fonts share a design, e.g. no IPA/Takao twins)."""


def jis_kanji() -> tuple[np.ndarray, np.ndarray]:
    """The 6,355 kanji of JIS X 0208 in JIS order (level 1, the common ones, sorted by reading; then level 2).

    Returns:
        (codepoints [6355] int64, level [6355] int64 in {1, 2}), decoded with Python's euc_jp codec.
    """
    codepoints, levels = [], []
    for row in range(16, 85):  # JIS rows 16-47: level 1, rows 48-84: level 2
        for cell in range(1, 95):
            try:
                char = bytes([0xA0 + row, 0xA0 + cell]).decode("euc_jp")
            except UnicodeDecodeError:
                continue
            codepoints.append(ord(char))
            levels.append(1 if row < 48 else 2)
    return np.array(codepoints, dtype=np.int64), np.array(levels, dtype=np.int64)


def _apt_install(packages: list[str]) -> None:
    """One ``apt-get install`` of the packages; ``apt-get update`` and a retry only if it fails."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    logger.warning("installing font packages: %s", " ".join(packages))
    error = ""
    for attempt in range(2):
        try:
            if attempt:
                subprocess.run(["apt-get", "-o", "Acquire::http::Timeout=30", "update"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=False)
            done = subprocess.run(install, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired as err:
            error = str(err)
            break
        if done.returncode == 0:
            return
        error = done.stderr.strip()[-500:]
    logger.warning("apt-get could not install the font packages: %s", error)


def _resolve_fonts(fonts: Sequence[str], install: bool) -> list[tuple[str, Path]]:
    """(name, file) of every requested font that is usable, installing missing packages if allowed."""
    specs: list[FontSpec] = []
    for font in fonts:
        if font in FONT_CATALOGUE:
            specs.append(FONT_CATALOGUE[font])
        elif os.path.isfile(font):
            specs.append(FontSpec(Path(font).stem, "", os.path.abspath(font), "user file"))
        else:
            raise DatasetError(f"unknown font {font!r}: give a font file or one of {', '.join(FONT_CATALOGUE)}")
    missing = [s for s in specs if not s.path.is_file()]
    packages = sorted({s.package for s in missing})
    if packages and install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install(packages)
        missing = [s for s in specs if not s.path.is_file()]
    if missing:
        logger.warning(
            "kanji: %d font(s) not installed and skipped: %s (install with: apt-get install %s)",
            len(missing), ", ".join(s.name for s in missing), " ".join(sorted({s.package for s in missing})),
        )
    usable = [(s.name, s.path) for s in specs if s not in missing]
    if len(usable) < 2:
        raise DatasetError(
            f"kanji: only {len(usable)} of the requested fonts are installed, at least 2 are needed; install "
            f"the Debian packages {' '.join(sorted({s.package for s in specs}))} (e.g. sudo apt-get install ...)"
        )
    return usable


def _cmap(path: Path) -> np.ndarray:
    """Sorted codepoints [K] int64 that the font's character map covers."""
    from fontTools.ttLib import TTFont

    return np.array(sorted(TTFont(path, fontNumber=0, lazy=True).getBestCmap()), dtype=np.int64)


def _has_ink(font: ImageFont.FreeTypeFont, codepoints: np.ndarray) -> np.ndarray:
    """[K] bool: the font draws a glyph with a non-empty bounding box for each codepoint."""
    boxes = np.array([font.getbbox(chr(c)) for c in codepoints], dtype=np.int64).reshape(-1, 4)
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _render(font: ImageFont.FreeTypeFont, char: str, image_size: int) -> Image.Image:
    """RGB glyph image [image_size, image_size]: dark ink on white, ink box centred, longer side GLYPH_FILL."""
    x0, y0, x1, y1 = font.getbbox(char)
    ink = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(ink).text((-x0, -y0), char, font=font, fill=255)
    ink = ink.crop(ink.getbbox())
    scale = GLYPH_FILL * image_size / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.Resampling.LANCZOS)
    image = Image.new("L", (image_size, image_size), 255)
    image.paste(0, ((image_size - ink.width) // 2, (image_size - ink.height) // 2), mask=ink)
    return image.convert("RGB")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_kanji(out: str | os.PathLike, num_classes: int = 2400, fonts: Sequence[str] | None = None,
                image_size: int = 96, seed: int = 0, install: bool = True) -> Path:
    """Render the kanji demo dataset in Stanford Online Products format under ``out`` (issue 2, docs/method.md §1).

    Characters: kanji drawn (non-empty glyph) by every usable font, ``num_classes`` of them taken
    from JIS X 0208 level 1 (common kanji) before level 2, a seeded choice within a level, kept in
    JIS order. Classes are split into disjoint train (first ``num_classes // 2`` of a seeded
    permutation) and test halves. Writes ``out/images/<codepoint hex>/<font>.jpg`` (RGB JPEG,
    quality 90, ``image_size`` px square, black glyph on white, ink box centred and scaled to
    GLYPH_FILL of the side), then ``fonts.txt``, ``build.json`` and last ``Ebay_test.txt``,
    ``Ebay_train.txt`` (header ``image_id class_id super_class_id path``; class ids 1-based, train
    classes first; super_class_id = JIS level; paths relative to ``out``). Same options and fonts ->
    byte-identical lists. A finished build with the same options is kept as is; an interrupted
    one (lists missing) is redone.

    Args:
        out: output folder (created).
        num_classes: number of characters (classes), >= 2.
        fonts: names from FONT_CATALOGUE or paths of font files; default DEFAULT_FONTS (16).
        image_size: side of the square images in pixels, >= 16.
        seed: seeds the character choice and the train/test split.
        install: if root and apt-get exist, install missing font packages (one apt-get call).

    Returns:
        ``out`` as a Path, loadable with ``load_dataset("kanji", out)``.

    Raises:
        DatasetError: unknown font, fewer than 2 usable fonts, or fewer than ``num_classes``
            kanji covered by every font.
        ValueError: num_classes < 2 or image_size < 16.
    """
    if num_classes < 2 or image_size < 16:
        raise ValueError(f"the kanji demo needs at least 2 classes (--classes) and images of at least 16 px "
                         f"(--size), got {num_classes} and {image_size}")
    out = Path(out)
    fonts = list(DEFAULT_FONTS if fonts is None else fonts)
    options = {"format": _FORMAT, "num_classes": num_classes, "fonts": fonts, "image_size": image_size, "seed": seed}
    lists = [out / "Ebay_train.txt", out / "Ebay_test.txt"]
    try:
        previous = json.loads((out / "build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if previous is not None and previous.get("options") == options and all(p.is_file() for p in lists):
        return out

    usable = _resolve_fonts(fonts, install)
    faces = [ImageFont.truetype(str(path), 2 * image_size, index=0) for _, path in usable]
    codepoints, levels = jis_kanji()
    in_cmaps = np.logical_and.reduce([np.isin(codepoints, _cmap(path)) for _, path in usable])
    candidates = np.zeros(0, dtype=np.int64)
    for level in (1, 2):  # level 2 only when level 1 has too few
        drawn = np.flatnonzero(in_cmaps & (levels == level))
        for face in faces:
            drawn = drawn[_has_ink(face, codepoints[drawn])]
        candidates = np.concatenate([candidates, drawn])
        if len(candidates) >= num_classes:
            break
    else:
        raise DatasetError(
            f"kanji: only {len(candidates)} kanji are drawn by all of {', '.join(n for n, _ in usable)}; "
            f"lower num_classes or leave out the font with the fewest glyphs"
        )
    rng = np.random.default_rng(seed)
    priority = levels[candidates] + rng.random(len(candidates))  # level 1 before level 2, seeded within
    chosen = np.sort(candidates[np.argsort(priority, kind="stable")[:num_classes]])
    is_train = np.zeros(num_classes, dtype=bool)
    is_train[rng.permutation(num_classes)[: num_classes // 2]] = True

    for stale in [*lists, out / "build.json"]:
        stale.unlink(missing_ok=True)
    names = [name for name, _ in usable]
    rows = {True: [], False: []}
    with tqdm(total=num_classes * len(faces), desc="rendering kanji", unit="img") as progress:
        for class_id, k in enumerate(np.concatenate([chosen[is_train], chosen[~is_train]]), start=1):
            folder = out / "images" / f"{codepoints[k]:04x}"
            folder.mkdir(parents=True, exist_ok=True)
            train = class_id <= is_train.sum()
            for name, face in zip(names, faces):
                _render(face, chr(codepoints[k]), image_size).save(folder / f"{name}.jpg", "JPEG", quality=90)
                rows[train].append(f"{class_id} {levels[k]} images/{codepoints[k]:04x}/{name}.jpg")
            progress.update(len(faces))

    _atomic_write(out / "fonts.txt", "".join(f"{name} {path}\n" for name, path in usable))
    _atomic_write(out / "build.json", json.dumps({"options": options, "fonts_used": names}, indent=1) + "\n")
    for path, train in ((lists[1], False), (lists[0], True)):
        body = "".join(f"{i} {row}\n" for i, row in enumerate(rows[train], start=1))
        _atomic_write(path, "image_id class_id super_class_id path\n" + body)
    return out

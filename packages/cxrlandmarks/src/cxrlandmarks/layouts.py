"""Where a dataset's images are on disk: the layouts :func:`find_layout` detects and the
tolerant file lookup of :class:`ImageIndex` (see :mod:`cxrlandmarks.data` for the layouts).

- original: ``<images_dir>/<category>/<image_name>.png|.jpg`` (or directly in ``images_dir``);
- the Kaggle COVID-19 Radiography release: ``COVID-19_Radiography_Dataset/<category>/images/``
  (``masks/`` beside it is not read), in ``images_dir`` or the data directory, or
  ``images_dir`` itself;
- ``data.image_pattern``, e.g. ``{category}/images/{name}.png`` under ``images_dir``.

Category folders and image names match tolerantly: case, spaces, underscores and hyphens do not
matter (``Viral_Pneumonia`` finds ``Viral Pneumonia/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cxrlandmarks.config import DataConfig
from medcore.errors import ConfigError, DataError
from medcore.io import safe_join

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
KAGGLE_ROOT = "COVID-19_Radiography_Dataset"  # the folder the Kaggle release unzips to
KAGGLE = "Kaggle COVID-19 Radiography"


def spelling(name: str) -> str:
    """A name for tolerant matching: case-folded, runs of spaces, ``_`` and ``-`` as one space."""
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


@dataclass(frozen=True)
class ImageLayout:
    """Where a row's image is: ``root/<category folder>/sub/<name><ext>`` when ``per_category``
    (the folder matched tolerantly to the category), and ``root/<name><ext>`` when ``flat``."""

    kind: str  # "original", KAGGLE or "data.image_pattern"
    root: Path
    sub: str = ""
    per_category: bool = True
    flat: bool = False
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    @property
    def ext_text(self) -> str:
        return self.extensions[0] if len(self.extensions) == 1 else ".png|.jpg"

    def describe(self) -> str:
        ext = self.ext_text
        where = [f"{self.root / '<category>' / self.sub}/<name>{ext}"] if self.per_category else []
        where += [f"{self.root}/<name>{ext}"] if self.flat else []
        return f"{self.kind} layout ({' or '.join(where)})"


def _has_image(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.suffix in IMAGE_EXTENSIONS and p.is_file() for p in folder.iterdir()
    )


def _holds_images(layout: ImageLayout, categories: list[str]) -> bool:
    """Whether a category folder of ``layout`` (or its root, when flat) holds an image file."""
    if not layout.root.is_dir():
        return False
    wanted = {spelling(c) for c in categories}
    folders = [
        entry / layout.sub
        for entry in layout.root.iterdir()
        if entry.is_dir() and spelling(entry.name) in wanted
    ]
    return any(_has_image(f) for f in [*folders, *([layout.root] if layout.flat else [])])


def pattern_layout(images_dir: Path, pattern: str) -> ImageLayout:
    """The layout of ``data.image_pattern`` (relative to ``images_dir``): folders, at most one
    of them ``{category}``, then ``{name}`` with or without an image extension."""
    path = PurePosixPath(pattern)

    def bad(why: str) -> ConfigError:
        return ConfigError(
            "data.image_pattern",
            f"{why}, got {pattern!r} (e.g. '{{category}}/images/{{name}}.png')",
        )

    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise bad("must be a relative path under data.images_dir")
    *dirs, file = path.parts
    ext = file.removeprefix("{name}")
    if not file.startswith("{name}") or (ext and ext.lower() not in IMAGE_EXTENSIONS):
        raise bad("its file part must be {name} or {name}.png, .jpg or .jpeg")
    if dirs.count("{category}") > 1 or any(
        ("{" in d or "}" in d) for d in dirs if d != "{category}"
    ):
        raise bad("{category} may stand once, as a whole folder name; no other {...} is known")
    extensions = (ext,) if ext else IMAGE_EXTENSIONS
    if "{category}" not in dirs:
        return ImageLayout(
            "data.image_pattern", images_dir.joinpath(*dirs), "", False, True, extensions
        )
    at = dirs.index("{category}")
    root, sub = images_dir.joinpath(*dirs[:at]), "/".join(dirs[at + 1 :])
    return ImageLayout("data.image_pattern", root, sub, True, False, extensions)


def find_layout(cfg: DataConfig, data_dir: Path) -> ImageLayout:
    """``data.image_pattern``'s layout, else the one layout that holds images under
    ``data_dir``: the original ``<images_dir>/<category>/`` or the Kaggle release's
    ``COVID-19_Radiography_Dataset/<category>/images/`` (in ``images_dir``, or ``images_dir``
    or ``data_dir`` itself). Images in both, or in neither with no ``images_dir``: an error."""
    images_dir = data_dir / cfg.images_dir
    if cfg.image_pattern:
        layout = pattern_layout(images_dir, cfg.image_pattern)
        if not layout.root.is_dir():
            raise DataError(layout.root, "folder of data.image_pattern not found")
        return layout
    original = ImageLayout("original", images_dir, flat=True)
    roots = list(dict.fromkeys([images_dir / KAGGLE_ROOT, data_dir / KAGGLE_ROOT, images_dir]))
    kaggle = [ImageLayout(KAGGLE, root, "images") for root in roots]
    found = [layout for layout in [original, *kaggle] if _holds_images(layout, cfg.categories)]
    if len(found) > 1:
        raise DataError(
            data_dir,
            f"images in {len(found)} layouts: {'; '.join(f.describe() for f in found)}. "
            "Set data.image_pattern (or data.images_dir) to the one to use",
        )
    if found:
        return found[0]
    if images_dir.is_dir():  # no image yet: every row is then counted missing, by category
        return original
    looked = " or ".join(f"{k.root / '<category>' / 'images'}/" for k in kaggle[:2])
    raise DataError(
        images_dir,
        f"image directory not found: looked for {images_dir}/<category>/ (original layout) and "
        f"{looked} ({KAGGLE} layout); set data.images_dir or data.image_pattern",
    )


class ImageIndex:
    """The image files of a layout, found by exact path first, else by tolerant spelling of
    category folder and file name."""

    def __init__(self, layout: ImageLayout, categories: list[str]) -> None:
        self.layout = layout
        self.categories = {spelling(c): c for c in categories}
        # tolerant folder spelling -> real folder names (several folders may spell alike)
        self.folders: dict[str, list[str]] = {}
        if layout.per_category and layout.root.is_dir():
            for entry in sorted(layout.root.iterdir()):
                if entry.is_dir():
                    self.folders.setdefault(spelling(entry.name), []).append(entry.name)
        self._files: dict[str, dict[str, Path]] = {}

    def category_of(self, name: str, given: str | None) -> str | None:
        """The canonical category (as in ``data.categories``) of a CSV category, else of the
        name's prefix (``COVID-12``), else the category folder spelled like that prefix."""
        if given:
            return self.categories.get(spelling(given), given)
        prefix = spelling(name.rsplit("-", 1)[0])
        return self.categories.get(prefix) or next(iter(self.folders.get(prefix, [])), None)

    def unmatched_folders(self) -> list[str]:
        """Category folders on disk that spell no category of ``data.categories``."""
        return [f for s, real in self.folders.items() if s not in self.categories for f in real]

    def _dirs(self, category: str | None) -> list[tuple[str, str]]:
        """(category folder, folder relative to the root) to look in, in order."""
        out = []
        if self.layout.per_category:
            wanted = [category] if category else list(self.categories.values())
            for c in wanted:
                for real in self.folders.get(spelling(c), [c]):
                    out.append((real, f"{real}/{self.layout.sub}" if self.layout.sub else real))
        return [*out, *([("", "")] if self.layout.flat else [])]

    def not_found(self, name: str, category: str | None) -> str:
        """Why the row ``name`` has no image: the file and the folders looked in."""
        dirs = [str(self.layout.root / rel) for _, rel in self._dirs(category)]
        file = name if Path(name).suffix in IMAGE_EXTENSIONS else name + self.layout.ext_text
        return f"no image {file} in {' or '.join(dirs[:2])}{' ...' if len(dirs) > 2 else ''}"

    def _listing(self, rel: str) -> dict[str, Path]:
        if rel not in self._files:
            allowed = {e.lower() for e in self.layout.extensions}
            self._files[rel] = {
                spelling(p.stem): p
                for p in sorted((self.layout.root / rel).iterdir())
                if p.suffix.lower() in allowed and p.is_file()
            }
        return self._files[rel]

    def find(self, name: str, category: str | None) -> tuple[Path, str] | None:
        """``(path, category)`` of the image ``name`` (category: canonical, else its folder)."""
        named = Path(name).suffix in IMAGE_EXTENSIONS
        stems = [name] if named else [name + ext for ext in self.layout.extensions]
        dirs = self._dirs(category)
        for folder, rel in dirs:
            for stem in stems:
                candidate = safe_join(self.layout.root, f"{rel}/{stem}" if rel else stem)
                if candidate.is_file():
                    return candidate, self._category(folder, category)
        key = spelling(Path(name).stem if named else name)
        for folder, rel in dirs:
            if rel and not (self.layout.root / rel).is_dir():
                continue
            found = self._listing(rel).get(key)
            if found is not None:
                return found, self._category(folder, category)
        return None

    def _category(self, folder: str, category: str | None) -> str:
        return category or self.categories.get(spelling(folder), folder) or "unknown"

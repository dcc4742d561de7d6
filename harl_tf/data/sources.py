"""Example sources for the TFRecord builder: image+mask folders and the synthetic set
(TFDS: :mod:`harl_tf.data.tfds_source`).

A source lists, per split, a sorted list of small :class:`ExampleRef` (stable id, label,
key) and turns a ref into a :class:`RawExample`: the image's *encoded* bytes (so the
original JPEG travels unchanged), and its mask, either a decoded array, the bytes of a mask
file, or nothing (the builder then computes it with a mask method).

Two kinds of source:

- *random access* (folders, synthetic): ``load(ref)`` runs in the builder's worker
  processes and must not need TensorFlow; the builder may permute the list (by seed) so
  that every shard mixes classes.
- *sequential* (TFDS): ``read(split, start, stop)`` runs in the builder's parent process
  (TFDS needs TensorFlow) and yields examples of a contiguous range in the split's order.

Nothing here imports TensorFlow at module level: worker processes import this module.

Folder layout (the default mask rule is the one of ``../shared/data/cutouts``)::

    <images_dir>/[<split>/][images/]<class>/<name>.<ext>   class sub-folders -> labels
    <images_dir>/[<split>/][images/]<name>.<ext>           flat -> label -1

Splits are the sub-folders named by ``splits`` (auto: any of ``train``, ``validation``,
``val``, ``test`` that exist; otherwise the whole folder is the split ``train``). Labels
are the 0-based line numbers of a ``classes.txt`` (looked up in the image root, the split
folder, then ``images_dir``) or, without one, the index of the class folder's name among
the sorted names of every split's class folders (so splits share one label map).

Mask of an image: with ``masks_dir``, the image's path relative to ``images_dir`` under
``masks_dir``; without it, the image's path with its last ``images`` component replaced by
``masks``; in both cases with the extension replaced by ``mask_suffix`` (``.png``).
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

from harl_tf.errors import HarlError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pnm")
KNOWN_SPLITS = ("train", "validation", "val", "test")


class SourceError(HarlError):
    """A source cannot be read as asked: names the folder, file, dataset or flag, what was
    expected and what was found."""


class ExampleRef(NamedTuple):
    """A small, picklable handle of one example: ``id`` (stable, unique in the source),
    ``label`` (-1 when unknown or only known after reading) and a source-specific ``key``
    (relative path, synthetic index, TFDS position)."""
    id: str
    label: int
    key: Any


@dataclasses.dataclass
class RawExample:
    """One example as the source gives it, before validation and mask handling.

    ``image_bytes``: encoded image (any format PIL reads); ``mask``: ``uint8 [H, W]``
    array (``{0,1}`` or ``0..255``) or ``None``; ``mask_bytes``: an encoded mask file or
    ``None``; ``image_name`` / ``mask_name``: what error messages call them (file paths)."""
    id: str
    label: int
    image_bytes: bytes
    image_name: str
    mask: Optional[np.ndarray] = None
    mask_bytes: Optional[bytes] = None
    mask_name: str = ""
    error: Optional[str] = None  # the image could not be read (the builder skips it)


class Source:
    """Interface of a source (see the module docstring)."""
    kind = "source"
    random_access = True
    has_masks = True
    default_mask_method = "given"

    def split_names(self) -> List[str]:
        raise NotImplementedError

    def class_names(self) -> List[str]:
        return []

    def describe(self) -> Dict[str, Any]:
        """JSON-able description for the manifest."""
        raise NotImplementedError

    def content_options(self) -> Dict[str, Any]:
        """Options other than the example ids that change the stored bytes (part of each
        shard's fingerprint, so a rerun with other options rebuilds instead of skipping)."""
        return {}

    def list_refs(self, split: str, *, need_masks: bool = True) -> List[ExampleRef]:
        """The split's examples, sorted by id. Raises :class:`SourceError` when the split
        is empty or (with ``need_masks``) when masks are missing."""
        raise NotImplementedError

    def load(self, ref: ExampleRef, *, with_mask: bool = True) -> RawExample:
        raise NotImplementedError

    def read(self, split: str, refs: Sequence[ExampleRef], *,
             with_mask: bool = True) -> Iterator[RawExample]:
        """Yields the examples of ``refs`` (a contiguous run of the split's list)."""
        for ref in refs:
            yield self.load(ref, with_mask=with_mask)

    def sample_bytes(self, refs: Sequence[ExampleRef]) -> float:
        """Mean stored bytes (image + mask) per example over ``refs`` (a sample), for
        choosing a shard count from a target shard size."""
        raise NotImplementedError


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


# ------------------------------------------------------------------------------ folders


class FolderSource(Source):
    """Images in (optionally class and split) sub-folders, masks in a mirrored tree."""
    kind = "folder"

    def __init__(self, images_dir: str, *, masks_dir: Optional[str] = None,
                 mask_suffix: str = ".png", classes_file: Optional[str] = None,
                 splits: Optional[Sequence[str]] = None, mask_method_name: str = "given"):
        self.images_dir = os.path.abspath(os.fspath(images_dir))
        if not os.path.isdir(self.images_dir):
            raise SourceError(f"--images_dir {self.images_dir}: no such folder")
        self.masks_dir = os.path.abspath(os.fspath(masks_dir)) if masks_dir else None
        if self.masks_dir and not os.path.isdir(self.masks_dir):
            raise SourceError(f"--masks_dir {self.masks_dir}: no such folder")
        if not mask_suffix:
            raise SourceError("--mask_suffix must not be empty (e.g. .png or _mask.png)")
        self.mask_suffix = mask_suffix
        self.default_mask_method = mask_method_name
        self._split_roots = self._find_splits(splits)
        self._classes_file = self._find_classes_file(classes_file)
        self._class_names = self._find_class_names()

    # -- layout
    def _find_splits(self, splits: Optional[Sequence[str]]) -> Dict[str, str]:
        if splits:
            roots = {}
            for split in splits:
                folder = os.path.join(self.images_dir, split)
                if not os.path.isdir(folder):
                    raise SourceError(
                        f"split {split!r}: expected the folder {folder}, which does not "
                        f"exist; --splits names sub-folders of --images_dir "
                        f"({self.images_dir}); found {sorted(self._subdirs(self.images_dir))}")
                roots[split] = folder
            return roots
        found = [s for s in KNOWN_SPLITS if os.path.isdir(os.path.join(self.images_dir, s))]
        if found:
            return {s: os.path.join(self.images_dir, s) for s in found}
        return {"train": self.images_dir}

    @staticmethod
    def _subdirs(folder: str) -> List[str]:
        return sorted(e.name for e in os.scandir(folder)
                      if e.is_dir() and not e.name.startswith("."))

    def _image_root(self, split: str) -> str:
        root = self._split_roots[split]
        nested = os.path.join(root, "images")
        return nested if os.path.isdir(nested) else root

    def _find_classes_file(self, classes_file: Optional[str]) -> Optional[str]:
        if classes_file:
            if not os.path.isfile(classes_file):
                raise SourceError(f"--classes_file {classes_file}: no such file")
            return os.path.abspath(classes_file)
        for split in self._split_roots:
            for folder in (self._image_root(split), self._split_roots[split]):
                candidate = os.path.join(folder, "classes.txt")
                if os.path.isfile(candidate):
                    return candidate
        candidate = os.path.join(self.images_dir, "classes.txt")
        return candidate if os.path.isfile(candidate) else None

    def _find_class_names(self) -> List[str]:
        folders = set()
        for split in self._split_roots:
            folders.update(self._subdirs(self._image_root(split)))
        if self._classes_file:
            with open(self._classes_file, encoding="utf-8") as handle:
                names = [line.strip() for line in handle if line.strip()]
            if len(set(names)) != len(names):
                raise SourceError(f"{self._classes_file}: a class name appears twice")
            unknown = sorted(folders - set(names))
            if unknown:
                raise SourceError(
                    f"class folders {unknown} are not listed in {self._classes_file} "
                    f"(which lists {names}); add them or remove the folders")
            return names
        return sorted(folders)

    def split_names(self) -> List[str]:
        return list(self._split_roots)

    def class_names(self) -> List[str]:
        return list(self._class_names)

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "images_dir": self.images_dir,
                "masks_dir": self.masks_dir, "mask_suffix": self.mask_suffix,
                "classes_file": self._classes_file,
                "split_folders": {s: self._image_root(s) for s in self._split_roots}}

    def content_options(self) -> Dict[str, Any]:
        return {"mask_suffix": self.mask_suffix}

    # -- paths
    def image_path(self, ref: ExampleRef) -> str:
        return os.path.join(self.images_dir, *ref.key.split("/"))

    def mask_path(self, image_path: str) -> str:
        """The mask file of ``image_path`` by the rule in the module docstring."""
        stem = os.path.splitext(image_path)[0]
        if self.masks_dir:
            relative = os.path.relpath(stem, self.images_dir)
            return os.path.join(self.masks_dir, relative) + self.mask_suffix
        parts = stem.split(os.sep)
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] == "images":
                parts[i] = "masks"
                return os.sep.join(parts) + self.mask_suffix
        raise SourceError(
            f"{image_path}: cannot find its mask: the path has no 'images' folder to "
            f"replace by 'masks'; pass --masks_dir (a tree mirroring --images_dir), or "
            f"--mask_method to compute masks")

    def list_refs(self, split: str, *, need_masks: bool = True) -> List[ExampleRef]:
        root = self._image_root(split)
        labels = {name: i for i, name in enumerate(self._class_names)}
        refs = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            relative_folder = os.path.relpath(folder, root)
            top = relative_folder.split(os.sep)[0] if relative_folder != "." else None
            label = labels.get(top, -1) if top is not None else -1
            for name in files:
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(folder, name)
                key = os.path.relpath(path, self.images_dir).replace(os.sep, "/")
                refs.append(ExampleRef(key, label, key))
        if not refs:
            raise SourceError(
                f"split {split!r}: no images in {root} (looked for files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}); check --images_dir and --splits")
        refs.sort(key=lambda r: r.id)
        if need_masks:
            missing = []
            for ref in refs:
                image = self.image_path(ref)
                mask = self.mask_path(image)
                if not os.path.isfile(mask):
                    missing.append((image, mask))
            if missing:
                image, mask = missing[0]
                raise SourceError(
                    f"missing mask: image {image} has no mask file {mask} ({len(missing)} "
                    f"of {len(refs)} images of split {split!r} have none); pass --masks_dir "
                    f"/ --mask_suffix if the masks live elsewhere, or --mask_method to "
                    f"compute masks")
        return refs

    def load(self, ref: ExampleRef, *, with_mask: bool = True) -> RawExample:
        image = self.image_path(ref)
        data, error = b"", None
        try:
            data = _read_bytes(image)
        except OSError as err:
            error = f"cannot read the file: {err.strerror or err}"
        mask_name, mask_bytes = "", None
        if with_mask:
            mask_name = self.mask_path(self.image_path(ref))
            try:
                mask_bytes = _read_bytes(mask_name)
            except OSError as err:
                raise SourceError(
                    f"cannot read the mask {mask_name} of image {self.image_path(ref)}: "
                    f"{err.strerror or err}") from None
        return RawExample(ref.id, ref.label, data, image, mask_bytes=mask_bytes,
                          mask_name=mask_name, error=error)

    def sample_bytes(self, refs: Sequence[ExampleRef]) -> float:
        total = 0
        for ref in refs:
            image = self.image_path(ref)
            total += os.path.getsize(image)
            mask = self.mask_path(image) if self.has_masks else None
            if mask and os.path.isfile(mask):
                total += os.path.getsize(mask)
        return total / max(len(refs), 1)


# ---------------------------------------------------------------------------- synthetic


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """``uint8 [H, W, 3]`` (or ``[H, W]``) → JPEG or PNG bytes (PIL, no TensorFlow)."""
    from PIL import Image
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(jpeg_quality))
    elif image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    else:
        raise SourceError(f"image format must be 'jpeg' or 'png', got {image_format!r}")
    return buffer.getvalue()


class SyntheticSource(Source):
    """The embedded synthetic set (:mod:`harl_tf.data.synthetic`); masks are the exact
    ground truth. Split ``train`` holds images ``0 .. num_images-1``; ``test`` (when
    ``num_test_images > 0``) the next ``num_test_images`` images of the same seed, so the
    two splits never share an image. ``object_colour``: ``"random"`` (the default set) or
    ``"class"`` (the easy variant, see :mod:`harl_tf.data.synthetic`); ``style``: the set's
    look, :data:`harl_tf.data.synthetic.STYLES`."""
    kind = "synthetic"
    default_mask_method = "ground_truth"

    def __init__(self, num_images: int, *, image_size=64, seed: int = 0,
                 num_test_images: int = 0, image_format: str = "jpeg",
                 jpeg_quality: int = 95, object_colour: str = "random",
                 style: str = "shapes"):
        from harl_tf.data import synthetic
        if object_colour not in synthetic.OBJECT_COLOURS:
            raise SourceError(f"--object_colour must be one of {synthetic.OBJECT_COLOURS}, "
                              f"got {object_colour!r}")
        if style not in synthetic.STYLES:
            raise SourceError(f"--synthetic_style must be one of {synthetic.STYLES}, "
                              f"got {style!r}")
        self.object_colour, self.style = object_colour, style
        if image_format not in ("jpeg", "png"):
            raise SourceError(f"--image_format must be jpeg or png, got {image_format!r}")
        if not 1 <= int(jpeg_quality) <= 100:
            raise SourceError(f"--jpeg_quality must be in 1..100, got {jpeg_quality}")
        self.height, self.width = synthetic._height_width(image_size)
        self.num_images, self.num_test_images = int(num_images), int(num_test_images)
        self.seed, self.image_format = int(seed), image_format
        self.jpeg_quality = int(jpeg_quality)

    def split_names(self) -> List[str]:
        return ["train"] + (["test"] if self.num_test_images > 0 else [])

    def class_names(self) -> List[str]:
        from harl_tf.data import synthetic
        return list(synthetic.CLASS_NAMES)

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "num_images": self.num_images,
                "num_test_images": self.num_test_images, **self.content_options()}

    def content_options(self) -> Dict[str, Any]:
        options = {"height": self.height, "width": self.width, "seed": self.seed,
                   "image_format": self.image_format, "jpeg_quality": self.jpeg_quality}
        if self.object_colour != "random":  # builds made before the option still resume
            options["object_colour"] = self.object_colour
        if self.style != "shapes":
            options["style"] = self.style
        return options

    def _indices(self, split: str) -> range:
        if split == "train":
            return range(self.num_images)
        if split == "test":
            return range(self.num_images, self.num_images + self.num_test_images)
        raise SourceError(f"the synthetic source has splits {self.split_names()}, "
                          f"not {split!r}")

    def list_refs(self, split: str, *, need_masks: bool = True) -> List[ExampleRef]:
        from harl_tf.data import synthetic
        indices = self._indices(split)
        if len(indices) == 0:
            raise SourceError(f"synthetic split {split!r} is empty: pass --num_images "
                              f"(and --num_test_images) > 0")
        return [ExampleRef(f"synthetic/seed{self.seed}/{i:08d}",
                           synthetic.label_for(i, self.seed), i) for i in indices]

    def load(self, ref: ExampleRef, *, with_mask: bool = True) -> RawExample:
        from harl_tf.data import synthetic
        image, mask, label = synthetic.render(ref.key, (self.height, self.width), self.seed,
                                              object_colour=self.object_colour,
                                              style=self.style)
        data = encode_image(image, self.image_format, self.jpeg_quality)
        return RawExample(ref.id, label, data, ref.id, mask=mask if with_mask else None,
                          mask_name=f"{ref.id} (ground-truth mask)")

    def sample_bytes(self, refs: Sequence[ExampleRef]) -> float:
        total = 0
        for ref in refs:
            total += len(self.load(ref, with_mask=False).image_bytes)
        # A binary mask PNG is small next to its image; count 3 % of the image for it.
        return 1.03 * total / max(len(refs), 1)

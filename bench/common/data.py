"""Data the benchmarks make or read: synthetic records, JPEG bytes, SimCLR's data_util, a
labelled image folder, Fashion-MNIST as an image folder, held-out photographs."""
from __future__ import annotations

import gzip
import importlib.util
import os
import time
from typing import Iterable, NamedTuple, Sequence


def write_example_records(path: str, examples: Iterable, *, jpeg_quality: int) -> str:
    """One TFRecord file (written atomically) of ``(example_id, image, mask, label)``
    tuples: image uint8 RGB ``[H, W, 3]`` stored as a JPEG of ``jpeg_quality``, mask
    ``[H, W]`` in {0, 1} stored as a PNG (mask method ``ground_truth``). Returns ``path``."""
    import tensorflow as tf
    from harl_tf.atomic import atomic_path
    from harl_tf.data import schema
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temporary, tf.io.TFRecordWriter(temporary) as writer:
        for example_id, image, mask, label in examples:
            height, width = image.shape[:2]
            writer.write(schema.serialize_example(
                image_bytes=tf.io.encode_jpeg(image, quality=jpeg_quality).numpy(),
                image_format="jpeg", height=height, width=width,
                mask_png=schema.encode_mask_png(mask), label=label, example_id=example_id,
                mask_method="ground_truth"))
    return path


def ensure_synthetic_records(directory: str, examples: int, shards: int,
                             height: int = 375, width: int = 500) -> str:
    """The input-pipeline benchmarks' records: ``examples`` synthetic ``height`` x
    ``width`` images (JPEG quality 90, PNG masks) in ``shards`` files
    ``bench-SSSSS-of-NNNNN.tfrecord`` of ``directory``, written unless ``shards`` such
    files are there already. Returns their glob."""
    import tensorflow as tf
    from harl_tf.data import synthetic
    pattern = os.path.join(directory, "bench-*.tfrecord")
    if len(tf.io.gfile.glob(pattern)) != shards:
        start = time.perf_counter()
        per_shard = -(-examples // shards)
        for shard in range(shards):
            indices = range(shard * per_shard, min(examples, (shard + 1) * per_shard))
            write_example_records(
                os.path.join(directory, f"bench-{shard:05d}-of-{shards:05d}.tfrecord"),
                ((f"synthetic/{i}", image, mask, label) for i, image, mask, label
                 in synthetic.iterate(indices, (height, width))), jpeg_quality=90)
        print(f"wrote {examples} examples in {shards} shards "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return pattern


def jpeg_bytes(pattern: str) -> list:
    """The image bytes of every record of ``pattern``, in file order."""
    import tensorflow as tf
    from harl_tf.data import schema
    return [schema.parse_example(r)["image"].numpy() for r in
            tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]


def load_simclr_data_util(simclr_dir: str):
    """google-research/simclr ``tf2/data_util.py`` from the checkout ``simclr_dir``,
    imported as a module of its own. It reads no absl flag (``data.py`` does; it is not
    needed here), so none is set."""
    path = os.path.join(simclr_dir, "tf2", "data_util.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--simclr_dir {simclr_dir!r}: no tf2/data_util.py there; pass the root of a "
            f"google-research/simclr checkout")
    spec = importlib.util.spec_from_file_location("simclr_tf2_data_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_labelled_split(data_dir: str, split: str, *, limit: int = 0,
                        by_class: bool = False):
    """One split of an image folder with mirrored masks and class sub-folders (the layout
    of ../shared/data/fmnist-scenes), read through the TFRecord builder's folder source, so
    file order, mask paths and classes.txt labels are the builder's.

    Returns ``(images, masks, labels, paths)``: uint8 RGB ``[H, W, 3]`` arrays, the mask
    files as decoded (uint8 ``[H, W]``, 0/255), int64 ``[N]`` class indices and
    ``(image_path, mask_path)`` pairs. Order: the builder's (sorted by path), or with
    ``by_class`` by class in classes.txt order, then path; ``limit`` keeps that many
    examples, drawn in a fixed random order (seed 0) from that order.
    Raises ValueError naming the file that cannot be decoded.
    """
    import cv2
    import numpy as np
    from harl_tf.data import sources

    source = sources.FolderSource(data_dir)
    refs = source.list_refs(split)
    if by_class:
        refs = sorted(refs, key=lambda r: (r.label, r.id))
    if limit:
        refs = [refs[i] for i in np.random.default_rng(0).permutation(len(refs))[:limit]]
    images, masks, labels, paths = [], [], [], []
    for ref in refs:
        raw = source.load(ref)
        image = cv2.imdecode(np.frombuffer(raw.image_bytes, np.uint8), cv2.IMREAD_COLOR)
        mask = cv2.imdecode(np.frombuffer(raw.mask_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            raise ValueError(f"cannot decode {raw.image_name} or its mask {raw.mask_name}")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        masks.append(mask)
        labels.append(ref.label)
        paths.append((raw.image_name, raw.mask_name))
    return images, masks, np.asarray(labels, np.int64), paths


FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle-boot")


def read_fashion_mnist(src: str, prefix: str):
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of the idx files
    ``<src>/<prefix>-{images-idx3,labels-idx1}-ubyte.gz`` (prefix ``train`` or ``t10k``),
    in file order. MissingPathError naming a missing file."""
    import numpy as np
    from harl_tf.errors import MissingPathError
    paths = [os.path.join(src, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3",
                                                                           "labels-idx1")]
    for path in paths:
        if not os.path.isfile(path):
            raise MissingPathError(f"{path}: no such file; expected the Fashion-MNIST idx "
                                   "files (../shared/data/fashion-mnist).")
    with gzip.open(paths[0]) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(paths[1]) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write_fashion_mnist_folder(src: str, out: str, *, num_train: int, num_test: int) -> str:
    """Fashion-MNIST (the idx files of ``src``) as a labelled image folder ``out`` for
    ``tools.build_tfrecords --source=folder``: ``{train,test}/{images,masks}/<class>/
    <split><i>.png`` and ``classes.txt``, from the first ``num_train`` train and
    ``num_test`` t10k images in file order (the files are not sorted by class). Images:
    28 -> 64 px bicubic (so the conventional mask method sees edges, not blocks), grey
    copied to RGB; masks: pixel > 0 at 28 px, nearest-neighbour to 64 px, 0/255.
    Written to a temporary folder renamed onto ``out``; an ``out`` with classes.txt is
    reused as it is. Returns ``out``."""
    import cv2
    import numpy as np
    from harl_tf import atomic
    if os.path.exists(os.path.join(out, "classes.txt")):
        return out
    with atomic.atomic_directory(out, overwrite=True) as tmp:
        for split, prefix, count in (("train", "train", num_train),
                                     ("test", "t10k", num_test)):
            images, labels = read_fashion_mnist(src, prefix)
            for i in range(min(count, len(images))):
                name = FASHION_MNIST_CLASSES[labels[i]]
                image = cv2.resize(images[i], (64, 64), interpolation=cv2.INTER_CUBIC)
                mask = cv2.resize(images[i], (64, 64), interpolation=cv2.INTER_NEAREST) > 0
                for kind, array in (("images", np.stack([image] * 3, -1)),
                                    ("masks", mask.astype(np.uint8) * 255)):
                    path = os.path.join(tmp, split, kind, name, f"{split}{i:05d}.png")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    cv2.imwrite(path, array)
        with open(os.path.join(tmp, "classes.txt"), "w") as f:
            f.write("\n".join(FASHION_MNIST_CLASSES) + "\n")
    return out


# Held-out photographs ----------------------------------------------------------------------
# Backgrounds that no fmnist-scenes (or cutouts) image shows: bench.make_unseen_backgrounds
# pastes fmnist-scenes' test objects on them, bench.make_transfer_sets' digits_scenes its
# digits. Installed by `apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04`.

PHOTO_SHORT_SIDE = 512    # photographs are resized to this short side first
CROP_SIDE = (0.3, 1.0)    # crop side / short side (fmnist-scenes' background rule)


class Photo(NamedTuple):
    """One photograph: file name under --photos_dir, Debian package, licence (the
    package's debian/copyright), author."""
    name: str
    package: str
    licence: str
    author: str


P16, P20 = "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"
# Every photograph of the two packages except the abstract or computer-made pictures
# (umang, Fossa, Infinite-Sea, Painting-Colors) and one colour-graded texture close-up
# (analogpattern); chosen by looking at each picture.
PHOTOS = (
    Photo("aitzgorri_by_Aitzol_Berasategi.jpg", P16, "CC-BY-4.0", "Aitzol Berasategi"),
    Photo("Bridge_by_Sander_Klootwijk.jpg", P16, "CC-BY-SA-4.0", "Sander Klootwijk"),
    Photo("Dragonfly_by_Bolly.jpg", P16, "CC-BY-SA-4.0", "Bolly"),
    Photo("free_by_Peter_Nerlich.jpg", P16, "CC-BY-SA-4.0", "Peter Nerlich"),
    Photo("friends_by_Aitzol_Berasategi.jpg", P16, "CC-BY-4.0", "Aitzol Berasategi"),
    Photo("greentock_by_Peter_Nerlich.jpg", P16, "CC-BY-SA-4.0", "Peter Nerlich"),
    Photo("life_by_Aitzol_Berasategi.jpg", P16, "CC-BY-4.0", "Aitzol Berasategi"),
    Photo("picosdeeuropa_by_Aitzol_Berasategi.jpg", P16, "CC-BY-4.0", "Aitzol Berasategi"),
    Photo("Picture_0B_by_freespace.jpg", P16, "CC-BY-4.0", "Trevor \"Freespace\""),
    Photo("Picture_1A_by_freespace.jpg", P16, "CC-BY-4.0", "Trevor \"Freespace\""),
    Photo("seeding_by_Clements_Engelhardt.jpg", P16, "CC0-1.0", "Clemens Engelhardt"),
    Photo("sunset_by_Aitzol_Berasategi.jpg", P16, "CC-BY-4.0", "Aitzol Berasategi"),
    Photo("Wine_by_Jakkub_Mede.jpg", P16, "CC-BY-4.0", "Jakub Mede"),
    Photo("Kleiber_by_Lukas_Baubkus.jpg", P20, "CC-BY-SA-3.0", "Lukas Baubkus"),
)
# The photographs of fmnist-scenes and cutouts (../shared/data/cutouts/README.md), which
# must never be used here.
TRAINING_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")


def install_command(photos: Sequence[Photo] = PHOTOS) -> str:
    return "apt-get install " + " ".join(sorted({p.package for p in photos}))


def check_photos(photos_dir: str, photos: Sequence[Photo] = PHOTOS) -> list:
    """The photographs' paths; a :class:`errors.MissingPathError` naming the missing ones
    and the ``apt-get install`` line that provides them."""
    from harl_tf import errors
    paths = [os.path.join(photos_dir, p.name) for p in photos]
    missing = [p for p, path in zip(photos, paths) if not os.path.isfile(path)]
    if missing:
        raise errors.MissingPathError(
            f"--photos_dir={photos_dir}: {len(missing)} of the {len(photos)} held-out "
            f"photographs are missing (e.g. {missing[0].name}); install them with "
            f"`{install_command(missing)}` (as root, after apt-get update), or point "
            f"--photos_dir at a folder holding them.")
    return paths


def load_photos(paths: Sequence[str], short_side: int = PHOTO_SHORT_SIDE) -> list:
    """``uint8 [h, w, 3]`` RGB photographs resized (area) so that the short side is
    ``short_side`` px (never enlarged). DataError naming a file that cannot be decoded."""
    import cv2
    from harl_tf import errors
    out = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise errors.DataError(f"{path}: cannot decode the photograph; reinstall its "
                                   "package.")
        scale = short_side / min(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, (round(image.shape[1] * scale),
                                       round(image.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return out


def random_crop(photo, rng, side_range=CROP_SIDE) -> tuple:
    """A square crop of ``photo``: side ``U(side_range) x short side`` (px, rounded, at
    least 1), top-left corner uniform. Returns ``(crop [s, s, 3], (x, y, s))``."""
    height, width = photo.shape[:2]
    side = max(1, int(round(rng.uniform(*side_range) * min(height, width))))
    y = int(rng.integers(0, height - side + 1))
    x = int(rng.integers(0, width - side + 1))
    return photo[y:y + side, x:x + side], (x, y, side)


def check_output_dir(output_dir: str, src: str) -> None:
    """ConfigError when ``output_dir`` lies inside the repository or the folder holding
    the source data ``src`` (../shared/data is read-only and belongs to every session)."""
    from harl_tf import errors
    from bench.common.results import ROOT
    out = os.path.realpath(output_dir)
    for root, what in ((ROOT, "the repository"),
                       (os.path.dirname(os.path.realpath(src)), "the source data folder")):
        root = os.path.realpath(root)
        if out == root or out.startswith(root + os.sep):
            raise errors.ConfigError(f"--output_dir={output_dir} is inside {what} ({root}); "
                                     "write it elsewhere, e.g. under /work/runs.")

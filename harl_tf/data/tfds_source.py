"""A prepared TFDS dataset as a source of the TFRecord builder (``--source=tfds``).

Sequential: :meth:`TFDSSource.read` runs in the builder's parent process (TFDS needs
TensorFlow) and yields the examples of a contiguous range in the split's order. Always
``download=False``: offline, TFDS would otherwise retry DNS for minutes. The interface is
:class:`harl_tf.data.sources.Source`.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence

from harl_tf.data.sources import ExampleRef, RawExample, Source, SourceError


class TFDSSource(Source):
    """A prepared TFDS dataset, read with ``download=False`` from ``data_dir``. Images are
    read undecoded (``tfds.decode.SkipDecoding``), so their stored bytes are kept. TFDS
    datasets carry no foreground masks: use a mask method. Ids are
    ``<name>/<split>/<position>`` in the split's file order (``shuffle_files=False``)."""
    kind = "tfds"
    random_access = False
    has_masks = False

    def __init__(self, name: str, *, data_dir: Optional[str] = None,
                 splits: Sequence[str] = ("train",), image_key: str = "image",
                 label_key: str = "label"):
        if not name:
            raise SourceError("--tfds_name is required with --source=tfds")
        self.name, self.data_dir = name, data_dir
        self.splits, self.image_key, self.label_key = list(splits), image_key, label_key
        self._builder = None

    def __getstate__(self):  # workers never read TFDS; keep TF objects out of pickles
        state = dict(self.__dict__)
        state["_builder"] = None
        return state

    @property
    def builder(self):
        if self._builder is None:
            import tensorflow_datasets as tfds
            try:
                self._builder = tfds.builder(self.name, data_dir=self.data_dir)
            except Exception as err:  # noqa: BLE001 - TFDS raises many types
                raise SourceError(f"TFDS dataset {self.name!r} (data_dir "
                                  f"{self.data_dir}): cannot open it: {err}") from None
            features = self._builder.info.features
            for flag, key in (("--tfds_image_key", self.image_key),
                              ("--tfds_label_key", self.label_key)):
                if key and key not in features:
                    raise SourceError(f"TFDS dataset {self.name!r} has no feature {key!r} "
                                      f"({flag}); its features are {sorted(features)}")
        return self._builder

    def split_names(self) -> List[str]:
        return list(self.splits)

    def class_names(self) -> List[str]:
        feature = self.builder.info.features[self.label_key] if self.label_key else None
        return list(getattr(feature, "names", None) or [])

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "data_dir": self.data_dir,
                "version": str(self.builder.info.version), "image_key": self.image_key,
                "label_key": self.label_key}

    def content_options(self) -> Dict[str, Any]:
        return {"name": self.name, "version": str(self.builder.info.version),
                "image_key": self.image_key, "label_key": self.label_key}

    def _dataset(self, split: str):
        import tensorflow_datasets as tfds
        try:
            return self.builder.as_dataset(
                split=split, shuffle_files=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()})
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"TFDS dataset {self.name!r} split {split!r} (data_dir "
                              f"{self.data_dir}, download=False): {err}") from None

    def _num_examples(self, split: str) -> int:
        try:
            return int(self.builder.info.splits[split].num_examples)
        except (KeyError, ValueError):
            pass  # unknown split metadata (e.g. under tfds.testing.mock_data): count
        dataset = self._dataset(split)
        count = int(dataset.cardinality())
        return count if count >= 0 else sum(1 for _ in dataset)

    def _known_split(self, split: str) -> bool:
        try:
            return self.builder.info.splits[split].num_examples > 0
        except (KeyError, ValueError):
            return False

    def list_refs(self, split: str, *, need_masks: bool = True) -> List[ExampleRef]:
        if need_masks:
            raise SourceError(f"TFDS dataset {self.name!r} has no foreground masks: pass "
                              f"--mask_method (e.g. conventional)")
        count = self._num_examples(split)
        if count == 0:
            raise SourceError(f"TFDS dataset {self.name!r} split {split!r} is empty")
        return [ExampleRef(f"{self.name}/{split}/{i:08d}", -1, i) for i in range(count)]

    def read(self, split: str, refs: Sequence[ExampleRef], *,
             with_mask: bool = True) -> Iterator[RawExample]:
        import tensorflow_datasets as tfds
        if not refs:
            return
        start, stop = refs[0].key, refs[-1].key + 1
        if self._known_split(split):  # real data: read only this range
            dataset = self._dataset(f"{split}[{start}:{stop}]")
        else:
            dataset = self._dataset(split).skip(start).take(stop - start)
        count = 0
        for ref, example in zip(refs, tfds.as_numpy(dataset)):
            label = int(example[self.label_key]) if self.label_key else -1
            count += 1
            yield RawExample(ref.id, label, bytes(example[self.image_key]),
                             f"{self.name}/{split}[{ref.key}]")
        if count != len(refs):
            raise SourceError(f"TFDS dataset {self.name!r} split {split!r}: expected "
                              f"{len(refs)} examples from position {start}, read {count}")

    def sample_bytes(self, refs: Sequence[ExampleRef]) -> float:
        try:
            info = self.builder.info
            total = sum(s.num_bytes for s in info.splits.values())
            count = sum(s.num_examples for s in info.splits.values())
            if total > 0 and count > 0:
                return 1.05 * total / count
        except (KeyError, ValueError, AttributeError):
            pass
        return 4096.0  # unknown (mock data): small images

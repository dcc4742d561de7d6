"""The TFRecord builder's shard plan, shard files, sidecars and manifest.

A split's sorted ids (permuted by ``shuffle_seed`` for random-access sources) are cut into
contiguous shards, ``<split>-<index:05d>-of-<count:05d>.tfrecord``, each with a fingerprint
of its ids, labels and every option that changes the bytes. A shard is written under a
hidden temporary name and renamed when complete; then its sidecar ``_shards/<shard>.json``
(sha256, size, counts, skips, fingerprint). A shard whose file and sidecar agree is
finished and skipped on a rerun; ``manifest.json`` is assembled from the sidecars. The plan
depends only on the source and the options, so every machine, partition and runner (local
or Beam) plans the same shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from harl_tf import atomic
from harl_tf.data.sources import ExampleRef, Source
from harl_tf.errors import BuildError

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIDECAR_DIR = "_shards"


def shard_bounds(num_examples: int, num_shards: int) -> List[Tuple[int, int]]:
    """Contiguous ``[start, stop)`` of each shard; sizes differ by at most one."""
    return [(k * num_examples // num_shards, (k + 1) * num_examples // num_shards)
            for k in range(num_shards)]


def estimate_num_shards(mean_bytes: float, num_examples: int, target_shard_mb: float,
                        min_shards: int) -> int:
    """``ceil(total / target)``, at least ``min_shards``, at most one shard per example."""
    total = mean_bytes * num_examples
    wanted = max(math.ceil(total / (target_shard_mb * 2 ** 20)), min_shards, 1)
    return int(min(wanted, num_examples))


@dataclasses.dataclass
class Shard:
    split: str
    index: int
    count: int
    refs: List[ExampleRef]
    fingerprint: str = ""
    size: int = -1  # examples listed for the shard (kept when ``refs`` is dropped)

    def __post_init__(self):
        if self.size < 0:
            self.size = len(self.refs)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.tfrecord"

    def without_refs(self) -> "Shard":
        """What the manifest needs of a shard (name, size, fingerprint), without its ids."""
        return dataclasses.replace(self, refs=[])


def shard_name(split: str, index: int, count: int) -> str:
    """``<split>-<index:05d>-of-<count:05d>.tfrecord``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(output_dir: str, shard: Shard) -> Optional[Dict[str, Any]]:
    path = os.path.join(output_dir, SIDECAR_DIR, shard.name + ".json")
    try:
        with open(path, encoding="utf-8") as handle:
            sidecar = json.load(handle)
    except (OSError, ValueError):
        return None
    if sidecar.get("fingerprint") != shard.fingerprint:
        return None
    return sidecar


def is_finished(output_dir: str, shard: Shard) -> Optional[Dict[str, Any]]:
    """The sidecar when the shard file exists and matches it (size and sha256)."""
    sidecar = read_sidecar(output_dir, shard)
    path = os.path.join(output_dir, shard.name)
    if sidecar is None or not os.path.isfile(path):
        return None
    if os.path.getsize(path) != sidecar.get("bytes") or sha256_file(path) != sidecar.get("sha256"):
        return None
    return sidecar


def merge_counts(total: Dict[str, Any], counts: Mapping[str, Any]) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


def plan_split(source: Source, split: str, options: Dict[str, Any], *, need_masks: bool,
               num_shards: Optional[int], target_shard_mb: float, min_shards: int,
               shuffle_seed: Optional[int]) -> List[Shard]:
    """Lists one split and cuts it into shards: sorted ids, permuted by ``shuffle_seed``
    (random-access sources), contiguous runs; each shard's fingerprint covers its ids and
    labels and every option that changes the bytes. Depends only on the source and the
    options, so every machine and every runner plans the same shards."""
    refs = source.list_refs(split, need_masks=need_masks)
    if len({r.id for r in refs}) != len(refs):
        raise BuildError(f"split {split!r}: example ids are not unique")
    if source.random_access and shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(refs))
        refs = [refs[i] for i in order]
    count = num_shards
    if count is None:
        step = max(1, len(refs) // 32)
        count = estimate_num_shards(source.sample_bytes(refs[::step][:32]), len(refs),
                                    target_shard_mb, min_shards)
    count = min(count, len(refs))
    shards = []
    for index, (start, stop) in enumerate(shard_bounds(len(refs), count)):
        shard = Shard(split, index, count, refs[start:stop])
        shard.fingerprint = hashlib.sha256(json.dumps(
            {"options": options, "examples": [(r.id, r.label) for r in shard.refs]},
            sort_keys=True).encode()).hexdigest()
        shards.append(shard)
    return shards


def open_shard(output_dir: str, shard: Shard, writer_factory) -> Dict[str, Any]:
    temporary = os.path.join(output_dir, f".{shard.name}.tmp")
    return {"temporary": temporary, "writer": writer_factory(temporary), "records": 0,
            "class_counts": {}, "skipped": [], "counts": {}, "started": time.time()}


def record_result(result: tuple, state: Dict[str, Any], shard: Shard, strict: bool) -> None:
    if result[0] == "ok":
        _, example_id, label, record, counts = result
        state["writer"].write(record)
        state["records"] += 1
        key = str(label)
        state["class_counts"][key] = state["class_counts"].get(key, 0) + 1
        merge_counts(state["counts"], counts)
        return
    _, example_id, label, image_name, reason = result
    if strict:
        raise BuildError(f"{image_name}: {reason} (--strict stops the build; without it the "
                         f"image is skipped and listed in the manifest)")
    logger.warning("skipped %s: %s", image_name, reason)
    state["skipped"].append({"id": example_id, "path": image_name, "reason": reason})


def finish_shard(output_dir: str, shard: Shard, state: Dict[str, Any]) -> None:
    state["writer"].close()
    temporary, final = state["temporary"], os.path.join(output_dir, shard.name)
    atomic.commit(temporary, final)
    sidecar = {
        "file": shard.name, "split": shard.split, "index": shard.index,
        "num_shards": shard.count, "num_examples": len(shard.refs),
        "num_records": state["records"], "num_skipped": len(state["skipped"]),
        "bytes": os.path.getsize(final), "sha256": sha256_file(final),
        "fingerprint": shard.fingerprint, "class_counts": state["class_counts"],
        "counts": state["counts"], "skipped": state["skipped"],
        "seconds": round(time.time() - state["started"], 3),
    }
    atomic.write_json_atomic(os.path.join(output_dir, SIDECAR_DIR, shard.name + ".json"), sidecar)


def manifest(output_dir: str, source: Source, plan: Dict[str, List[Shard]],
              options: Dict[str, Any], mask_info: Dict[str, Any], num_partitions: int,
              partition_index: int) -> Dict[str, Any]:
    class_names = source.class_names()

    def class_name(label: str) -> str:
        index = int(label)
        if index < 0:
            return "unlabelled"
        return class_names[index] if index < len(class_names) else label

    splits: Dict[str, Any] = {}
    skipped: List[Dict[str, Any]] = []
    complete = True
    for split, shards in plan.items():
        entry = {"num_shards": len(shards), "num_examples_listed": sum(s.size for s in shards),
                 "num_records": 0, "num_skipped": 0, "class_counts": {}, "counts": {},
                 "shards": [], "missing_shards": []}
        for shard in shards:
            sidecar = read_sidecar(output_dir, shard)
            if sidecar is None or not os.path.isfile(os.path.join(output_dir, shard.name)):
                entry["missing_shards"].append(shard.name)
                complete = False
                continue
            entry["num_records"] += sidecar["num_records"]
            entry["num_skipped"] += sidecar["num_skipped"]
            for label, count in sidecar["class_counts"].items():
                name = class_name(label)
                entry["class_counts"][name] = entry["class_counts"].get(name, 0) + count
            merge_counts(entry["counts"], sidecar["counts"])
            skipped.extend({"split": split, **item} for item in sidecar["skipped"])
            entry["shards"].append({key: sidecar[key] for key in (
                "file", "index", "num_records", "num_skipped", "bytes", "sha256")})
        splits[split] = entry
    return {
        "schema_version": options["schema_version"], "builder_version": BUILDER_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source.describe(), "mask": mask_info, "class_names": class_names,
        "options": {k: v for k, v in options.items() if k not in ("mask", "source")},
        "partition": {"num_partitions": num_partitions, "partition_index": partition_index},
        "complete": complete, "splits": splits, "skipped": skipped,
    }

"""WebDataset shard writer: image and JSON members per sample, in order, with fixed metadata."""

from __future__ import annotations

import io
import json
import tarfile

from worker.generate.webdataset import ShardWriter, shard_key


def test_shard_is_a_tar_of_image_and_json_per_sample_in_order() -> None:
    writer = ShardWriter()
    assert writer.add("00007", "png", b"\x89PNG seven", {"seed": 7}) == "00007.png"
    writer.add("00008", "png", b"\x89PNG eight", {"seed": 8})
    with tarfile.open(fileobj=io.BytesIO(writer.finish())) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["00007.png", "00007.json", "00008.png", "00008.json"]
        assert {(m.mtime, m.uid, m.uname, m.mode) for m in members} == {(0, 0, "", 0o644)}
        assert json.loads(tar.extractfile("00008.json").read()) == {"seed": 8}  # type: ignore[union-attr]
        assert tar.extractfile("00007.png").read() == b"\x89PNG seven"  # type: ignore[union-attr]


def test_same_samples_give_identical_bytes() -> None:
    def build() -> bytes:
        writer = ShardWriter()
        writer.add("00000", "webp", b"RIFF....WEBP", {"label": "bag"})
        return writer.finish()

    assert build() == build()


def test_shard_keys_sort_in_shard_order() -> None:
    keys = [shard_key("jobs/j1/", i) for i in (10, 2, 1)]
    assert sorted(keys) == ["jobs/j1/shard-00001.tar", "jobs/j1/shard-00002.tar", "jobs/j1/shard-00010.tar"]

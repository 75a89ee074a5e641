"""Unpacking uploaded data sets: hostile archives are refused or defused, honest ones load as ImageFolders."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.datasets import IngestLimits
from models.errors import DatasetError
from producer.errors import Permanent
from worker.errors import InvalidArchive, UnsafeUpload
from worker.training.ingest import ArchiveLimits, extract_archive, load_dataset_dir, remove_tree, safe_relative_key

FEW = IngestLimits(min_per_class=2)
_MIB = 1024 * 1024


def png(value: int = 128, size: tuple[int, int] = (6, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():  # a ZipInfo keeps the name as given: writestr(str) would clean it
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def image_folder(prefix: str = "", per_class: int = 2) -> dict[str, bytes]:
    return {f"{prefix}{cls}/{i}.png": png(40 * i) for cls in ("bag", "shoe") for i in range(per_class)}


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """The extraction folder, alone in its own parent so escapes show up as siblings."""
    return tmp_path / "parent" / "dest"


def assert_contained(dest: Path) -> None:
    """Nothing was written beside dest, and nothing at all is left in it."""
    assert [p.name for p in dest.parent.iterdir()] == ["dest"]
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("../evil.png", "has a '..' component that climbs out of the folder"),
        ("bag/../../evil.png", "has a '..' component that climbs out of the folder"),
        ("/tmp/evil.png", "is an absolute path"),
        ("..\\..\\evil.png", "contains a backslash"),
        ("C:/evil.png", "starts with a drive letter"),
    ],
)
def test_zip_member_escaping_dest_refuses_the_archive(dest: Path, member: str, reason: str) -> None:
    data = make_zip({"bag/1.png": png(), member: png()})
    with pytest.raises(UnsafeUpload) as caught:
        extract_archive(data, "upload.zip", dest)
    assert f"member {member!r} {reason}" in str(caught.value)
    assert isinstance(caught.value, Permanent)
    assert_contained(dest)  # names are checked before the first byte is written: bag/1.png is not there either


@pytest.mark.parametrize(
    ("member", "reason"),
    [("../../x", "'..' component"), ("/etc/cron.d/x", "absolute path"), ("./ok/../../x", "'..' component")],
)
def test_tar_member_escaping_dest_refuses_the_archive_and_undoes_earlier_members(
    dest: Path, member: str, reason: str
) -> None:
    data = make_tar([("bag/1.png", png()), (member, b"owned")])
    with pytest.raises(UnsafeUpload, match=reason) as caught:
        extract_archive(data, "upload.tar", dest)
    assert repr(member) in str(caught.value)
    assert_contained(dest)  # bag/1.png was written before the hostile member came by, then removed


def test_tar_links_devices_and_fifos_are_reported_never_created(dest: Path) -> None:
    data = make_tar(
        [
            ("bag/1.png", png()),
            tar_entry("bag/passwd.png", tarfile.SYMTYPE, "/etc/passwd"),
            tar_entry("bag/hard.png", tarfile.LNKTYPE, "/etc/passwd"),
            tar_entry("bag/rel.png", tarfile.SYMTYPE, "../../../etc/passwd"),
            tar_entry("bag/null", tarfile.CHRTYPE),
            tar_entry("bag/pipe", tarfile.FIFOTYPE),
        ],
        compress=True,
    )
    skipped = extract_archive(data, "upload.tar.gz", dest)
    assert skipped == [
        ("bag/passwd.png", "symbolic link to '/etc/passwd'"),
        ("bag/hard.png", "hard link to '/etc/passwd'"),
        ("bag/rel.png", "symbolic link to '../../../etc/passwd'"),
        ("bag/null", "device file"),
        ("bag/pipe", "FIFO"),
    ]
    assert sorted(p.name for p in (dest / "bag").iterdir()) == ["1.png"]


def test_tar_symlink_then_a_file_through_it_stays_inside_dest(dest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = make_tar([tar_entry("bag/link", tarfile.SYMTYPE, str(outside)), ("bag/link/evil.png", png())])
    skipped = extract_archive(data, "u.tar", dest)
    assert skipped == [("bag/link", f"symbolic link to {str(outside)!r}")]
    assert list(outside.iterdir()) == []
    assert (dest / "bag/link").is_dir() and not (dest / "bag/link").is_symlink()


def test_zip_links_and_special_files_are_reported_not_created(dest: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, mode, data in [
            ("bag/1.png", stat.S_IFREG | 0o644, png()),  # what Info-ZIP writes for a plain file
            ("bag/2.png", 0, png()),  # what some Windows tools write: no Unix mode at all
            ("bag/link.png", stat.S_IFLNK | 0o777, b"/etc/passwd"),  # Info-ZIP's symbolic link: the target as data
            ("bag/pipe", stat.S_IFIFO | 0o644, b""),
        ]:
            info = zipfile.ZipInfo(name)
            archive.writestr(info, data)
            info.external_attr = mode << 16  # after writestr, which fills in 0o600 when it is unset
    skipped = extract_archive(buffer.getvalue(), "u.zip", dest)
    assert skipped == [
        ("bag/link.png", "symbolic link"),
        ("bag/pipe", "not a regular file (device, FIFO or socket)"),
    ]
    assert sorted(p.name for p in (dest / "bag").iterdir()) == ["1.png", "2.png"]


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (ArchiveLimits(max_total_bytes=_MIB, max_ratio=1e9), "takes the archive past the limit of 1 MiB uncompressed"),
        (ArchiveLimits(max_member_bytes=_MIB, max_ratio=1e9), "expands to more than the limit of 1 MiB per member"),
    ],
)
def test_zip_bomb_is_refused_by_its_size_before_anything_is_written(
    dest: Path, limits: ArchiveLimits, message: str
) -> None:
    data = make_zip({"bag/1.png": png(), "bag/zeros.png": bytes(5 * _MIB)})
    assert len(data) < 100_000  # 5 MiB of zeros deflate to a few kB
    with pytest.raises(UnsafeUpload, match=f"member 'bag/zeros.png' {message}"):
        extract_archive(data, "bomb.zip", dest, limits)
    assert_contained(dest)


def test_zip_bomb_is_refused_by_its_compression_ratio(dest: Path) -> None:
    data = make_zip({"bag/zeros.png": bytes(5 * _MIB)})
    with pytest.raises(
        UnsafeUpload, match=r"'bag/zeros.png' expands .* to 5,242,880 \(ratio [\d,]+, over 100\): a zip bomb"
    ):
        extract_archive(data, "bomb.zip", dest)
    assert_contained(dest)


def test_tar_gz_bomb_is_refused_while_streaming_and_undone(dest: Path) -> None:
    data = make_tar([("bag/1.png", png()), ("bag/zeros.png", bytes(5 * _MIB))], compress=True)
    with pytest.raises(UnsafeUpload, match="past the limit of 1 MiB uncompressed"):
        extract_archive(data, "bomb.tgz", dest, ArchiveLimits(max_total_bytes=_MIB))
    assert_contained(dest)


def test_tar_gz_header_bomb_is_cut_off_by_the_stream_cap(dest: Path) -> None:
    info = tarfile.TarInfo("bag/1.png")
    info.pax_headers = {"comment": "x" * (3 * _MIB)}  # no member bytes at all: only the header inflates
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeUpload, match="expands past 2 MiB"):
        extract_archive(buffer.getvalue(), "u.tgz", dest, ArchiveLimits(max_total_bytes=_MIB, max_members=1))
    assert_contained(dest)


def test_too_many_members_is_refused(dest: Path) -> None:
    limits = ArchiveLimits(max_members=3)
    with pytest.raises(UnsafeUpload, match="more than 3 members"):
        extract_archive(make_zip(image_folder()), "u.zip", dest, limits)
    with pytest.raises(UnsafeUpload, match="more than 3 members"):
        extract_archive(make_tar(list(image_folder().items())), "u.tar", dest, limits)
    assert_contained(dest)


def test_duplicate_member_keeps_the_first(dest: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("bag/1.png", png(1))
        archive.writestr("bag/1.png", png(2))
    skipped = extract_archive(buffer.getvalue(), "u.zip", dest)
    assert skipped == [("bag/1.png", "duplicate member (the first one was kept)")]
    assert (dest / "bag/1.png").read_bytes() == png(1)


@pytest.mark.parametrize(
    ("name", "data", "error", "message"),
    [
        ("upload.rar", b"Rar!", InvalidArchive, r"unsupported upload 'upload.rar': send a .zip, .tar, .tar.gz or .tgz"),
        ("upload.zip", b"PK\x03\x04 truncated", InvalidArchive, "not a valid zip archive"),
        ("upload.tar", b"\0" * 10 + b"junk" * 200, InvalidArchive, "not a valid tar archive"),
        ("upload.tgz", gzip.compress(b"x" * 600, mtime=0), InvalidArchive, "not a valid tar archive"),
    ],
    ids=["rar", "truncated-zip", "junk-tar", "gzip-not-tar"],  # stable ids: parallel runs collect the same tests
)
def test_unsupported_or_corrupt_archives_are_refused(
    dest: Path, name: str, data: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        extract_archive(data, name, dest)


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("uploads/ds1/bag/1.png", "uploads/ds1/", "bag/1.png"),
        ("uploads/ds1/bag/1.png", "uploads/ds1", "bag/1.png"),
        ("bag/1.png", "", "bag/1.png"),
    ],
)
def test_safe_relative_key_strips_the_prefix(key: str, prefix: str, expected: str) -> None:
    assert safe_relative_key(key, prefix) == expected


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("uploads/ds10/bag/1.png", "is not under the prefix 'uploads/ds1/'"),
        ("uploads/ds1/../ds2/1.png", "'..' component"),
        ("uploads/ds1//etc/passwd", "is an absolute path"),
        ("uploads/ds1/bag//1.png", "empty or '.' path component"),
        ("uploads/ds1/bag/./1.png", "empty or '.' path component"),
        ("uploads/ds1/bag/", "empty or '.' path component"),
        ("uploads/ds1/", "empty or '.' path component"),
        ("uploads/ds1/bag\\..\\..\\x", "backslash"),
        ("uploads/ds1/C:/x", "drive letter"),
    ],
)
def test_safe_relative_key_refuses_keys_that_escape(key: str, reason: str) -> None:
    with pytest.raises(UnsafeUpload, match=reason):
        safe_relative_key(key, "uploads/ds1")


def test_zip_of_a_wrapped_image_folder_loads(dest: Path) -> None:
    members = image_folder("brand_x/") | {"__MACOSX/brand_x/bag/._0.png": b"\0\5\26\7", "brand_x/.DS_Store": b"x"}
    assert extract_archive(make_zip(members), "Brand X.ZIP", dest) == []
    data, report = load_dataset_dir(dest, resolution=4, channels=3, limits=FEW)
    assert data.class_names == ("bag", "shoe") and data.images.shape == (4, 3, 4, 4)
    assert report.counts == {"bag": 2, "shoe": 2}
    assert report.skipped == [("__MACOSX", "hidden folder"), ("brand_x/.DS_Store", "hidden file")]


def test_single_class_folder_is_not_mistaken_for_a_wrapper(dest: Path) -> None:
    extract_archive(make_zip({"bag/0.png": png(), "bag/1.png": png()}), "u.zip", dest)
    data, _ = load_dataset_dir(dest, resolution=4, channels=1, limits=FEW)
    assert data.class_names == ("bag",)


def test_tar_gz_with_dot_prefixed_names_loads(dest: Path) -> None:
    members: list[tarfile.TarInfo | tuple[str, bytes]] = [tar_entry("./", tarfile.DIRTYPE)]
    members += [(f"./{name}", data) for name, data in image_folder().items()]
    assert extract_archive(make_tar(members, compress=True), "upload.tar.gz", dest) == []
    data, report = load_dataset_dir(dest, resolution=4, channels=1, limits=FEW)
    assert data.labels.tolist() == [0, 0, 1, 1] and report.skipped == []


def test_gzipped_tar_named_tar_is_read_by_its_bytes(dest: Path) -> None:
    extract_archive(make_tar(list(image_folder().items()), compress=True), "upload.tar", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["bag", "shoe"]


def test_npz_upload_loads_through_the_same_path(dest: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((4, 6, 6, 3), np.uint8), labels=np.array([0, 1, 0, 1]))
    extract_archive(buffer.getvalue(), "../../my data.NPZ", dest)
    assert [p.name for p in dest.iterdir()] == ["data.npz"]
    data, _ = load_dataset_dir(dest, resolution=4, channels=1, class_names=["bag", "shoe"], limits=FEW)
    assert data.class_names == ("bag", "shoe") and data.images.shape == (4, 1, 4, 4)


def test_two_npz_files_are_ambiguous(tmp_path: Path) -> None:
    for name in ("a.npz", "b.npz"):
        np.savez(tmp_path / name, images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(DatasetError, match="2 .npz files in the upload"):
        load_dataset_dir(tmp_path, resolution=4, channels=1)


def test_a_directory_chain_past_the_depth_limit_refuses_the_archive_and_leaves_nothing(dest: Path) -> None:
    # The attack: a 1 MB tar.gz of folders ~1,050 deep, which shutil.rmtree could not remove (RecursionError).
    chain = "/".join(f"d{i}" for i in range(1050))
    members: list[tarfile.TarInfo | tuple[str, bytes]] = [
        tar_entry("/".join(f"d{i}" for i in range(depth)), tarfile.DIRTYPE) for depth in range(1, 40)
    ]
    members.append((f"{chain}/x.png", png()))
    with pytest.raises(UnsafeUpload, match="nested 33 folders deep, past the limit of 32"):
        extract_archive(make_tar(members, compress=True), "deep.tar.gz", dest)
    assert_contained(dest)


def test_remove_tree_removes_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    root = tmp_path / "work"
    folder = root
    for i in range(1500):  # past Python's default recursion limit of 1,000
        folder = folder / "d"
        if i % 100 == 0:
            os.makedirs(folder, exist_ok=True)
            (folder / "f.bin").write_bytes(b"x")
    os.makedirs(folder, exist_ok=True)
    (folder / "last.bin").write_bytes(b"x")
    (root / "link").symlink_to(tmp_path.parent)  # a link is removed, never followed
    with pytest.raises(RecursionError):
        shutil.rmtree(root)  # what the worker used before: raises, and leaves the tree

    remove_tree(root)

    assert not root.exists() and tmp_path.parent.exists()

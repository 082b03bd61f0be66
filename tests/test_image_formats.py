"""Image-text ingest: every container, every bad input, accounting, ids and DataConcept annotations.

Synthetic inputs are built in tmp_path; the real ones come from ../shared/data/image_text (skipped
when absent) and from the committed demo subset under demo_data/image_text.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

import schemas
from pipeline.io import image_sources
from pipeline.io.image_records import concept_row
from pipeline.io.records import parse_chunk
from pipeline.io.sample_id import image_text_id
from pipeline.io.sources import plan_units, read_chunks
from pipeline.io.units import IMAGE_TEXT, ReadLimits

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "image_text"
DEMO = REPO / "demo_data" / "image_text"


# ---------------------------------------------------------------- helpers


def jpeg(color: str = "red", size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(color: str = "blue", size: tuple[int, int] = (20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noisy_jpeg(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    # Random pixels: a JPEG whose entropy-coded data is long, so cutting it surely truncates it.
    import random

    rng = random.Random(seed)
    im = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@dataclass
class Ingest:
    units: list
    items: int = 0  # raw items the readers produced
    read_rejects: int = 0  # rejects made while reading
    samples: list[dict] = field(default_factory=list)
    rejects: list = field(default_factory=list)
    concepts: list[dict] = field(default_factory=list)

    def reasons(self) -> Counter:
        return Counter(r.reason for r in self.rejects)

    def by_member(self) -> dict:
        return {s["source_member"]: s for s in self.samples}

    def reject_for(self, member: str) -> str:
        found = [r.reason for r in self.rejects if r.source_member == member]
        assert len(found) == 1, f"expected one reject for {member}, got {found} in {self.rejects}"
        return found[0]


def ingest(path, container: str = "auto", limits: ReadLimits = ReadLimits(), **options) -> Ingest:
    units = plan_units([path], IMAGE_TEXT, container=container, options=options)
    out = Ingest(units)
    for unit in units:
        for chunk in read_chunks(unit, limits):
            # The chunk crosses workers in Beam: it must survive pickling as it is.
            chunk = pickle.loads(pickle.dumps(chunk))
            out.items += len(chunk.items)
            out.read_rejects += len(chunk.rejects)
            parsed = parse_chunk(chunk, limits)
            assert len(parsed.samples) + len(parsed.rejects) == chunk.rows_in
            out.samples += parsed.samples
            out.rejects += parsed.rejects
            out.concepts += parsed.annotations.get("annotations_concepts", [])
    # Every row must fit its catalog schema exactly (names, types, nullability).
    pa.Table.from_pylist(out.samples, schema=schemas.IMAGE_TEXT_SAMPLES)
    pa.Table.from_pylist([r.as_row() for r in out.rejects], schema=schemas.REJECTS)
    pa.Table.from_pylist(out.concepts, schema=schemas.CONCEPT_ANNOTATIONS)
    for s in out.samples:
        assert set(s) == set(schemas.IMAGE_TEXT_SAMPLES.names)
    return out


def add_member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            add_member(tf, *m)
    return buf.getvalue()


DC_DOGS = {
    "classes": ["dog", "ball", "dog", "dog"],
    "scores": [0.9, 0.5, 0.8, 0.95],
    "bounding_boxes": [[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.6, 0.6], [0.2, 0.2, 0.3, 0.3], [0.6, 0.1, 0.9, 0.4]],
    "tags": [{"tag": "grass", "prob": 0.7}, {"label": "dog", "score": 0.99}],
}


def assert_dog_concepts(row: dict, sample_id: str) -> None:
    assert row["sample_id"] == sample_id
    assert row["annotator"] == "input"
    concepts = {c["concept"]: c for c in row["concepts"]}
    assert concepts["dog"]["count"] == 3 and concepts["dog"]["confidence"] == pytest.approx(0.95)
    assert concepts["ball"]["count"] == 1 and concepts["ball"]["confidence"] == pytest.approx(0.5)
    assert [c["concept"] for c in row["concepts"]] == ["dog", "ball"]  # most instances first
    assert len(row["boxes"]) == 4
    assert row["boxes"][1] == {"label": "ball", "score": 0.5, "x1": 0.5, "y1": 0.5, "x2": 0.6, "y2": 0.6}
    assert {t["tag"]: t["confidence"] for t in row["tags"]} == {"grass": 0.7, "dog": 0.99}


# ---------------------------------------------------------------- image folders


def test_image_folder_captions_from_sidecars_txt_and_dataconcept_json(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg("red"))
    (root / "b.png").write_bytes(png("green"))
    (root / "b.txt").write_text("a green rectangle\n", encoding="utf-8")
    (root / "sub" / "c.jpg").write_bytes(jpeg("blue"))
    (root / "sub" / "captions.jsonl").write_text(
        json.dumps({"file_name": "c.jpg", "text": "a blue square", "photographer": "me", "views": 3}) + "\n"
        + json.dumps({"file_name": "../a.jpg", "text": "reaching out of its folder"}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "not there"}) + "\n")
    (root / "d.jpg").write_bytes(jpeg("white"))
    (root / "d.txt").write_text("three dogs and a ball")
    (root / "d.json").write_text(json.dumps({**DC_DOGS, "source": "datacomp"}))
    (root / "e.jpg").write_bytes(jpeg("black"))  # no caption anywhere
    (root / "captions.csv").write_text(
        "file_name,caption,license\na.jpg,a red square,CC0\nghost.jpg,an image that is not there,CC0\n", encoding="utf-8")
    (root / "README.md").write_text("not an image, not an input")

    out = ingest(root)
    assert [u.container for u in out.units] == ["image_folder"]
    by = out.by_member()
    assert {m: s["caption"] for m, s in by.items()} == {
        "a.jpg": "a red square", "b.png": "a green rectangle", "sub/c.jpg": "a blue square", "d.jpg": "three dogs and a ball",
    }
    # Offsets index the sorted listing of images: a.jpg b.png d.jpg e.jpg sub/c.jpg
    assert {m: s["source_offset"] for m, s in by.items()} == {"a.jpg": 0, "b.png": 1, "d.jpg": 2, "sub/c.jpg": 4}
    assert out.reject_for("e.jpg") == "missing_caption"
    assert out.reject_for("ghost.jpg") == "missing_image"
    assert out.reject_for("sub/gone.png") == "missing_image"
    assert out.reject_for("sub/captions.jsonl") == "unsafe_path"
    assert [r.source_offset for r in out.rejects if r.source_member == "e.jpg"] == [3]

    a = by["a.jpg"]
    assert (a["image_format"], a["width"], a["height"]) == ("JPEG", 32, 24)
    assert a["source_format"] == "image_folder" and a["source_uri"] == str(root)
    assert a["image"] == (root / "a.jpg").read_bytes()
    assert a["sample_id"] == image_text_id(a["image_sha256"], "a red square")
    assert json.loads(a["metadata_json"]) == {"license": "CC0"}
    assert json.loads(by["sub/c.jpg"]["metadata_json"]) == {"photographer": "me", "views": 3}
    assert by["b.png"]["image_format"] == "PNG" and by["b.png"]["metadata_json"] is None
    assert json.loads(by["d.jpg"]["metadata_json"]) == {"source": "datacomp"}

    assert len(out.concepts) == 1
    assert_dog_concepts(out.concepts[0], by["d.jpg"]["sample_id"])
    # Accounting: 5 images + 3 sidecar rows that name no usable image = 8 inputs.
    assert len(out.samples) + len(out.rejects) == 8
    assert out.items == 5 and out.read_rejects == 3


def test_caption_from_dirname_and_none(tmp_path):
    root = tmp_path / "db" / "images"
    for subject, n in (("backpack_dog", 2), ("red_cartoon", 1)):
        (root / subject).mkdir(parents=True)
        for k in range(n):
            (root / subject / f"{k:02d}.jpg").write_bytes(jpeg(("red", "green")[k]))
    out = ingest(tmp_path / "db", caption_from="dirname")
    assert sorted((s["source_member"], s["caption"]) for s in out.samples) == [
        ("images/backpack_dog/00.jpg", "backpack dog"),
        ("images/backpack_dog/01.jpg", "backpack dog"),
        ("images/red_cartoon/00.jpg", "red cartoon"),
    ]
    auto = ingest(tmp_path / "db")
    assert not auto.samples and auto.reasons() == Counter(missing_caption=3)
    none = ingest(tmp_path / "db", caption_from="none")
    assert [s["caption"] for s in none.samples] == ["", "", ""]
    # backpack_dog/00 and red_cartoon/00 are byte-identical red JPEGs: with no caption they are
    # one sample id; backpack_dog/01 is green and stands alone.
    ids = Counter(s["sample_id"] for s in none.samples)
    assert sorted(ids.values()) == [1, 2]


def test_bad_files_in_an_image_folder_are_rejected_with_their_reason(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = noisy_jpeg(1)
    files = {
        "good.jpg": good,
        "truncated.jpg": good[: len(good) // 2],
        "garbage.jpg": b"this is not an image at all" * 10,
        "empty.jpg": b"",
        "latin1.jpg": jpeg("red"),
        "badjson.jpg": jpeg("green"),
        "blank.jpg": jpeg("blue"),
        "truncated.png": png("white", (64, 64))[:-20],
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "latin1.jpg":
            (root / (Path(name).stem + ".txt")).write_text(f"caption of {name}")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "badjson.json").write_text('{"classes": ["dog", }')
    (root / "blank.txt").write_text("   \n\t")
    # truncated.png and truncated.jpg share the stem: one .txt serves both, as a same-named file.
    out = ingest(root)
    assert [s["source_member"] for s in out.samples] == ["good.jpg"]
    assert {r.source_member: r.reason for r in out.rejects} == {
        "truncated.jpg": "corrupt_image",
        "truncated.png": "corrupt_image",
        "garbage.jpg": "corrupt_image",
        "empty.jpg": "empty_file",
        "latin1.jpg": "invalid_utf8",
        "badjson.jpg": "malformed_json",
        "blank.jpg": "missing_caption",
    }
    assert len(out.samples) + len(out.rejects) == len(files) == out.items
    assert all(r.source_offset >= 0 for r in out.rejects)


def test_oversized_images_are_refused_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "big"
    root.mkdir()
    (root / "wide.png").write_bytes(png("black", (3000, 2000)))  # small file, 6 Mpixel
    (root / "heavy.jpg").write_bytes(noisy_jpeg(2, (200, 200)))
    (root / "ok.jpg").write_bytes(jpeg("red"))
    for stem in ("wide", "heavy", "ok"):
        (root / f"{stem}.txt").write_text(stem)
    limits = ReadLimits(max_image_bytes=25_000, max_image_pixels=1_000_000)
    assert (root / "heavy.jpg").stat().st_size > 25_000 > (root / "wide.png").stat().st_size

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    out = ingest(root, limits=limits)
    assert [s["source_member"] for s in out.samples] == ["ok.jpg"]
    assert {r.source_member: r.reason for r in out.rejects} == {"wide.png": "oversized_record", "heavy.jpg": "oversized_record"}
    # Only the accepted image was ever decoded: the 6-Mpixel one was refused from its header.
    assert decoded == [(32, 24)]


def test_truncated_images_stay_rejected_even_if_pil_is_told_to_load_them(tmp_path, monkeypatch):
    root = tmp_path / "f"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    (root / "a.txt").write_text("x")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ingest(root)


def test_chunks_follow_chunk_items_and_offsets_cover_the_listing(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for k in range(7):
        (root / f"{k}.png").write_bytes(png(size=(4 + k, 4)))
    unit = plan_units([root], IMAGE_TEXT, options={"caption_from": "none"})[0]
    chunks = list(read_chunks(unit, ReadLimits(chunk_items=3)))
    assert [len(c.items) for c in chunks] == [3, 3, 1]
    assert [i.offset for c in chunks for i in c.items] == list(range(7))
    widths = sorted(s["width"] for c in chunks for s in parse_chunk(c).samples)
    assert widths == list(range(4, 11))


# ---------------------------------------------------------------- WebDataset


def test_webdataset_pairs_members_by_key_and_rejects_unsafe_members(tmp_path):
    members = [
        ("000.jpg", jpeg("red")), ("000.txt", b"a red square"),
        ("000.json", json.dumps(DC_DOGS).encode()),
        ("sub/", b"", tarfile.DIRTYPE),
        ("sub/001.png", png("green")), ("sub/001.txt", "gr\u00fcn".encode()), ("sub/001.cls", b"7"),
        ("002.jpg", jpeg("blue")),  # no caption
        ("003.txt", b"caption without an image"),
        ("../evil.txt", b"escape"),
        ("/etc/passwd.txt", b"root"),
        ("link.jpg", b"", tarfile.SYMTYPE, "/etc/shadow"),
        ("hard.jpg", b"", tarfile.LNKTYPE, "000.jpg"),
        ("dev.jpg", b"", tarfile.CHRTYPE),
        ("004.jpg", b"garbage bytes"), ("004.txt", b"broken"),
        ("005.webp", b""), ("005.txt", b"empty image"),
        ("006.jpg", jpeg("white")), ("006.txt", b"\xff\xfe caption"),
        ("007.jpg", jpeg("black")), ("007.json", b"{not json"), ("007.txt", b"black"),
        ("008.jpg", jpeg("black")), ("008.json", json.dumps({"caption": "caption from json", "url": "http://x"}).encode()),
    ]
    shard = tmp_path / "shard-000.tar"
    shard.write_bytes(make_tar(members))
    out = ingest(shard)
    assert [u.container for u in out.units] == ["webdataset"]
    by = out.by_member()
    assert {m: s["caption"] for m, s in by.items()} == {
        "000.jpg": "a red square", "sub/001.png": "gr\u00fcn", "008.jpg": "caption from json"}
    assert by["000.jpg"]["source_offset"] == 0 and by["sub/001.png"]["source_offset"] == 4
    assert json.loads(by["sub/001.png"]["metadata_json"]) == {"webdataset_key": "sub/001"}
    assert json.loads(by["008.jpg"]["metadata_json"]) == {"webdataset_key": "008", "url": "http://x"}
    assert_dog_concepts(out.concepts[0], by["000.jpg"]["sample_id"])
    assert {r.source_member: r.reason for r in out.rejects} == {
        "002.jpg": "missing_caption",
        "003.txt": "missing_image",
        "../evil.txt": "unsafe_tar_member",
        "/etc/passwd.txt": "unsafe_tar_member",
        "link.jpg": "unsafe_tar_member",
        "hard.jpg": "unsafe_tar_member",
        "dev.jpg": "unsafe_tar_member",
        "004.jpg": "corrupt_image",
        "005.webp": "empty_file",
        "006.jpg": "invalid_utf8",
        "007.jpg": "malformed_json",
    }
    # Inputs: 14 sample keys (000..008 + the two absolute/relative escapes, 3 links, a device).
    assert len(out.samples) + len(out.rejects) == 3 + 11
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_webdataset_gz_and_non_adjacent_members(tmp_path):
    raw = make_tar([("a.jpg", jpeg("red")), ("b.jpg", jpeg("blue")), ("b.txt", b"blue"), ("a.txt", b"red")])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "t.tgz").write_bytes(gzip.compress(raw))
    out = ingest(tmp_path)
    assert sorted(u.container for u in out.units) == ["webdataset", "webdataset"]
    assert sorted(s["caption"] for s in out.samples) == ["blue", "blue", "red", "red"]
    assert not out.rejects


def test_truncated_tar_keeps_what_was_read_and_rejects_the_rest_once(tmp_path):
    members = []
    for k in range(4):
        members += [(f"{k:03d}.jpg", noisy_jpeg(10 + k)), (f"{k:03d}.txt", f"sample {k}".encode())]
    raw = make_tar(members)
    # Cut in the middle of the third image's data.
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        third = [m for m in tf.getmembers() if m.name == "002.jpg"][0]
    cut = third.offset_data + third.size // 2
    for name, data in (("plain.tar", raw[:cut]), ("at_header.tar", raw[:third.offset]),
                       ("gz.tar.gz", gzip.compress(raw)[: len(gzip.compress(raw)) * 3 // 4])):
        (tmp_path / name).write_bytes(data)
        out = ingest(tmp_path / name)
        unreadable = [r for r in out.rejects if r.reason == "unreadable_file"]
        assert len(unreadable) == 1, (name, out.rejects)
        assert len(out.rejects) == 1, (name, out.rejects)
        captions = [s["caption"] for s in out.samples]
        assert captions[:2] == ["sample 0", "sample 1"], name
        if name != "gz.tar.gz":
            assert captions == ["sample 0", "sample 1"]


def test_bad_tar_files(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "garbage.tar").write_bytes(b"definitely not a tar archive" * 40)
    (tmp_path / "only_end.tar").write_bytes(make_tar([]))
    out = ingest(tmp_path)
    assert sorted(r.reason for r in out.rejects) == ["empty_file", "unreadable_file"]
    assert not out.samples


def test_zero_byte_container_files(tmp_path):
    (tmp_path / "nlvr").mkdir()
    (tmp_path / "nlvr" / "images").mkdir()
    (tmp_path / "nlvr" / "dev.json").write_bytes(b"")
    (tmp_path / "t.parquet").write_bytes(b"")
    (tmp_path / "s.tar").write_bytes(b"")
    for target in (tmp_path / "nlvr", tmp_path / "t.parquet", tmp_path / "s.tar"):
        out = ingest(target)
        assert out.reasons() == Counter(empty_file=1) and out.rejects[0].source_offset == -1


def test_oversized_tar_member_is_not_read(tmp_path):
    raw = make_tar([("a.jpg", noisy_jpeg(3)), ("a.txt", b"big"), ("b.jpg", jpeg()), ("b.txt", b"small")])
    (tmp_path / "s.tar").write_bytes(raw)
    out = ingest(tmp_path / "s.tar", limits=ReadLimits(max_image_bytes=2000))
    assert [s["caption"] for s in out.samples] == ["small"]
    assert out.reject_for("a.jpg") == "oversized_record"
    assert out.read_rejects == 1  # decided from the header while streaming


# ---------------------------------------------------------------- Parquet


def test_parquet_bytes_struct_and_path_layouts(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(png("green"))
    secret = tmp_path.parent / "outside.png"
    secret.write_bytes(png("red"))
    pq.write_table(pa.table({
        "jpg": [jpeg("red"), jpeg("blue"), None, b"junk"],
        "TEXT": ["a red square", "a blue square", "no image", "junk"],
        "url": ["http://a", "http://b", "http://c", "http://d"],
        "similarity": [0.3, 0.2, 0.1, 0.0],
        "embedding": [[1.0], [2.0], [3.0], [4.0]],  # not a scalar: not metadata
        "classes": [DC_DOGS["classes"], None, None, None],
        "scores": [DC_DOGS["scores"], None, None, None],
        "bounding_boxes": [DC_DOGS["bounding_boxes"], None, None, None],
        "tags": [["grass", "dog"], None, None, None],
    }), tmp_path / "bytes.parquet")
    hf_image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": jpeg("red"), "path": "x.jpg"}, {"bytes": None, "path": "imgs/p.png"}], hf_image),
        "caption": ["a red square", "a green rectangle"],
    }), tmp_path / "hf.parquet")
    pq.write_table(pa.table({
        "image_path": ["imgs/p.png", "imgs/missing.png", "../outside.png", "/etc/passwd", None],
        "sentence": ["a green rectangle", "gone", "escape", "absolute", "no path"],
    }), tmp_path / "paths.parquet")

    out = ingest(tmp_path)
    assert sorted(Path(u.uri).name for u in out.units) == ["bytes.parquet", "hf.parquet", "paths.parquet"]
    rows = {(Path(s["source_uri"]).name, s["source_offset"]): s for s in out.samples}
    assert sorted(rows) == [("bytes.parquet", 0), ("bytes.parquet", 1), ("hf.parquet", 0), ("hf.parquet", 1), ("paths.parquet", 0)]
    b0 = rows[("bytes.parquet", 0)]
    assert b0["caption"] == "a red square" and b0["source_format"] == "parquet"
    assert json.loads(b0["metadata_json"]) == {"url": "http://a", "similarity": 0.3}
    dogs = [c for c in out.concepts if c["sample_id"] == b0["sample_id"]][0]
    assert {c["concept"]: c["count"] for c in dogs["concepts"]} == {"dog": 3, "ball": 1}
    assert [t["tag"] for t in dogs["tags"]] == ["grass", "dog"] and all(t["confidence"] == 1.0 for t in dogs["tags"])
    # The same red JPEG + caption from a bytes column and from a HF struct: one id.
    assert rows[("hf.parquet", 0)]["sample_id"] == b0["sample_id"]
    # The same PNG via a struct path and via a path column: same bytes, same caption, same id.
    assert rows[("hf.parquet", 1)]["sample_id"] == rows[("paths.parquet", 0)]["sample_id"]
    assert rows[("paths.parquet", 0)]["source_member"] == "imgs/p.png"
    reasons = {(Path(r.source_uri).name, r.source_offset): r.reason for r in out.rejects}
    assert reasons == {
        ("bytes.parquet", 2): "missing_image",
        ("bytes.parquet", 3): "corrupt_image",
        ("paths.parquet", 1): "missing_image",
        ("paths.parquet", 2): "unsafe_path",
        ("paths.parquet", 3): "unsafe_path",
        ("paths.parquet", 4): "missing_image",
    }
    assert len(out.samples) + len(out.rejects) == 4 + 2 + 5


def test_parquet_without_image_column_and_corrupt_file(tmp_path):
    pq.write_table(pa.table({"caption": ["x"], "id": [1]}), tmp_path / "no_image.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    out = ingest(tmp_path)
    assert sorted(r.reason for r in out.rejects) == ["corrupt_parquet", "unknown_layout"]
    forced = ingest(tmp_path / "no_image.parquet", image_column="nope")
    assert forced.reasons() == Counter(unknown_layout=1)


def test_parquet_reads_in_batches_sized_by_bytes(tmp_path):
    pq.write_table(pa.table({"image": [noisy_jpeg(k, (48, 48)) for k in range(6)], "caption": [f"c{k}" for k in range(6)]}),
                   tmp_path / "t.parquet")
    unit = plan_units([tmp_path / "t.parquet"], IMAGE_TEXT)[0]
    chunks = list(read_chunks(unit, ReadLimits(chunk_bytes=12_000)))
    assert len(chunks) > 1 and [i.offset for c in chunks for i in c.items] == list(range(6))


# ---------------------------------------------------------------- NLVR


def _nlvr_tree(root: Path) -> None:
    (root / "images" / "3").mkdir(parents=True)
    rows = [
        {"sentence": "There is a yellow circle.", "label": "true", "identifier": "10-0", "directory": "3",
         "structured_rep": [[{"type": "circle", "color": "Yellow", "x_loc": 1, "y_loc": 2, "size": 10}], [], []]},
        {"sentence": "There are no images for me.", "label": "false", "identifier": "11-0", "directory": "3",
         "structured_rep": [[], [], []]},
    ]
    lines = [json.dumps(r) for r in rows] + ["{broken", json.dumps({"sentence": "no id"})]
    (root / "dev.json").write_text("\n".join(lines) + "\n")
    for n in range(3):
        (root / "images" / "3" / f"dev-10-0-{n}.png").write_bytes(png(("red", "green", "blue")[n], (40, 10)))
    (root / "images" / "3" / "dev-99-0-0.png").write_bytes(png())  # no row names it: not an input


def test_nlvr_pairs_each_image_with_its_sentence(tmp_path):
    root = tmp_path / "nlvr"
    _nlvr_tree(root)
    for target in (root, root / "dev.json"):
        out = ingest(target)
        assert [u.container for u in out.units] == ["nlvr"]
        assert [(s["source_offset"], s["source_member"]) for s in out.samples] == [
            (0, "images/3/dev-10-0-0.png"), (1, "images/3/dev-10-0-1.png"), (2, "images/3/dev-10-0-2.png")]
        assert {s["caption"] for s in out.samples} == {"There is a yellow circle."}
        meta = json.loads(out.samples[1]["metadata_json"])
        assert meta["label"] == "true" and meta["split"] == "dev" and meta["image_index"] == 1
        assert meta["structured_rep"][0][0]["type"] == "circle"
        assert sorted((r.source_offset, r.reason) for r in out.rejects) == [
            (100, "missing_image"), (200, "malformed_json"), (300, "missing_field")]


# ---------------------------------------------------------------- across containers


def test_same_image_and_caption_get_the_same_id_in_every_container(tmp_path):
    image = jpeg("orange", (16, 16))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(image)
    (folder / "x.txt").write_text("  An orange tile\n")
    (tmp_path / "shard.tar").write_bytes(make_tar([("k.jpg", image), ("k.txt", b"An orange tile")]))
    pq.write_table(pa.table({"image": [image], "caption": ["An orange tile"]}), tmp_path / "t.parquet")
    ids = {s["sample_id"] for p in (folder, tmp_path / "shard.tar", tmp_path / "t.parquet") for s in ingest(p).samples}
    assert len(ids) == 1
    other = ingest(folder, caption_from="none").samples[0]["sample_id"]
    assert other not in ids  # the caption is part of the id


# ---------------------------------------------------------------- DataConcept shapes


@pytest.mark.parametrize("tags, expected", [
    (["dog", "grass"], {"dog": 1.0, "grass": 1.0}),
    ([{"tag": "dog", "score": 0.4}, {"label": "grass", "prob": 0.6}], {"dog": 0.4, "grass": 0.6}),
    ({"dog": 0.8, "grass": 0.1}, {"dog": 0.8, "grass": 0.1}),
    ([["dog", 0.3], ["dog", 0.5]], {"dog": 0.5}),
])
def test_dataconcept_tag_shapes(tags, expected):
    row = concept_row("sid", {"tags": tags})
    assert {t["tag"]: t["confidence"] for t in row["tags"]} == pytest.approx(expected)
    assert row["concepts"] == [] and row["boxes"] is None


def test_dataconcept_without_scores_or_boxes():
    row = concept_row("sid", {"classes": ["cat", "cat"]})
    assert row["concepts"] == [{"concept": "cat", "count": 2, "confidence": 1.0}] and row["boxes"] is None
    assert concept_row("sid", {"classes": [], "tags": []}) is None


@pytest.mark.parametrize("bad", [
    {"classes": ["dog"], "scores": [0.1, 0.2]},
    {"classes": ["dog"], "bounding_boxes": [[0, 0, 1]]},
    {"bounding_boxes": [[0, 0, 1, 1]]},
    {"classes": ["dog"], "scores": ["high"]},
    {"tags": 7},
])
def test_malformed_dataconcept_is_rejected(tmp_path, bad):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "a.json").write_text(json.dumps(bad))
    out = ingest(tmp_path)
    assert out.reasons() == Counter(malformed_annotation=1) and not out.samples


# ---------------------------------------------------------------- planning


def test_planning_detects_containers_and_refuses_bad_requests(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no images"):
        plan_units([tmp_path / "empty_dir"], IMAGE_TEXT)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg())
    with pytest.raises(ValueError, match="caption_from"):
        plan_units([tmp_path / "pics"], IMAGE_TEXT, options={"caption_from": "filename"})
    with pytest.raises(ValueError, match="unknown image-text option"):
        plan_units([tmp_path / "pics"], IMAGE_TEXT, options={"captionfrom": "none"})
    (tmp_path / "s.tar").write_bytes(make_tar([("a.jpg", jpeg())]))
    with pytest.raises(ValueError, match="dirname"):
        plan_units([tmp_path / "s.tar"], IMAGE_TEXT, options={"caption_from": "dirname"})
    with pytest.raises(ValueError, match="needs a folder"):
        plan_units([tmp_path / "s.tar"], IMAGE_TEXT, container="image_folder")
    with pytest.raises(ValueError, match="unknown image-text container"):
        plan_units([tmp_path / "pics"], IMAGE_TEXT, container="zip")
    with pytest.raises(ValueError, match="cannot tell"):
        plan_units([tmp_path / "pics" / "a.jpg"], IMAGE_TEXT)
    # A folder holding shards is read as shards, its loose files are not an image folder too.
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "s.tar").write_bytes(make_tar([("a.jpg", jpeg())]))
    (tmp_path / "mixed" / "loose.jpg").write_bytes(jpeg())
    assert [u.container for u in plan_units([tmp_path / "mixed"], IMAGE_TEXT)] == ["webdataset"]
    assert [u.container for u in plan_units([tmp_path / "mixed"], IMAGE_TEXT, container="image_folder")] == ["image_folder"]


# ---------------------------------------------------------------- committed demo subset


def test_demo_subset_ingests_cleanly():
    dream = ingest(DEMO / "dreambooth", caption_from="dirname")
    assert len(dream.samples) == 21 and not dream.rejects
    assert Counter(s["caption"] for s in dream.samples) == {"backpack": 6, "cat": 5, "dog": 5, "teapot": 5}

    dupes = ingest(DEMO / "small_dupes")
    assert len(dupes.samples) == 7 and not dupes.rejects
    groups = Counter(s["sample_id"] for s in dupes.samples)
    assert sorted(groups.values()) == [2, 2, 3]
    by = {s["source_member"]: s["sample_id"] for s in dupes.samples}
    assert by["img1.png"] == by["img4.png"] and by["img2.jpg"] == by["img5.jpg"]
    assert by["img3.jpg"] == by["img6.jpg"] == by["img7.jpg"]

    nlvr = ingest(DEMO / "nlvr_dev")
    assert len(nlvr.samples) == 120 and not nlvr.rejects
    assert len({s["caption"] for s in nlvr.samples}) <= 20
    assert (DEMO / "ATTRIBUTION.md").is_file()
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total < 3_000_000


# ---------------------------------------------------------------- shared real data


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared real data set is not next to this checkout")
    return path


@pytest.mark.shared_data
def test_shared_dreambooth_by_dirname():
    out = ingest(_shared("dreambooth"), caption_from="dirname")
    assert len(out.samples) == 158 and not out.rejects
    captions = Counter(s["caption"] for s in out.samples)
    assert len(captions) == 30 and captions["backpack dog"] >= 4
    assert all(s["image_format"] == "JPEG" for s in out.samples)


@pytest.mark.shared_data
def test_shared_small_dupes_image_only():
    out = ingest(_shared("small_dupes"), caption_from="none")
    assert out.items == 14 and len(out.samples) == 14 and not out.rejects
    by = {s["source_member"]: s["sample_id"] for s in out.samples}
    assert by["img1.png"] == by["img4.png"]
    assert by["img2.jpg"] == by["img5.jpg"]
    assert by["img3.jpg"] == by["img6.jpg"] == by["img7.jpg"]
    assert len(set(by.values())) == 14 - 4


@pytest.mark.shared_data
def test_shared_nlvr_dev():
    root = _shared("nlvr_dev")
    n_images = sum(1 for _ in (root / "images").rglob("*.png"))
    out = ingest(root)  # every PNG is decoded exactly once here
    assert len(out.samples) == n_images == 5934 and not out.rejects
    assert len({s["source_offset"] // image_sources.NLVR_OFFSET_STRIDE for s in out.samples}) == 989
    meta = json.loads(out.samples[0]["metadata_json"])
    assert meta["label"] in ("true", "false") and len(meta["structured_rep"]) == 3

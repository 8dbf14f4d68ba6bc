"""fastiaa.data: dataset readers on tiny trees in each official layout, the balanced sampler,
the kanji demo builder and the image checker."""
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from fastiaa.data import (
    DATASETS, BalancedBatchSampler, DatasetError, ImageSet, build_kanji, check_images, load_dataset,
)
from fastiaa.data.datasets import DatasetNotFoundError, MalformedDatasetError
from fastiaa.data.kanji import DEFAULT_FONTS, FONT_CATALOGUE, FontSpec, jis_kanji


@pytest.fixture(scope="module")
def jpegs(kanji_root):
    """Real JPEG files to copy into the official layouts."""
    return load_dataset("kanji", kanji_root).train.paths


def _place(tree: Path, rel_paths, jpegs) -> list[str]:
    """Copy one real JPEG to each relative path under tree; returns the absolute paths."""
    out = []
    for rel, src in zip(rel_paths, jpegs):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tree / rel)
        out.append(str(tree / rel))
    return out


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = [1, 1, 1, 2, 2, 100, 100, 101, 101, 101, 200]


def _cub_tree(root: Path, jpegs) -> list[str]:
    folder = root / "CUB_200_2011"
    rel = [f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg" for i, c in enumerate(CUB_CLASSES)]
    paths = _place(folder / "images", rel, jpegs)
    folder.joinpath("images.txt").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(rel)))
    # same pairs, listed in another order: the reader joins on image id
    folder.joinpath("image_class_labels.txt").write_text(
        "".join(f"{i + 1} {c}\n" for i, c in reversed(list(enumerate(CUB_CLASSES)))))
    return paths


@pytest.mark.parametrize("parent", [True, False])
def test_cub_split_and_labels(tmp_path, jpegs, parent):
    paths = _cub_tree(tmp_path, jpegs)
    ds = load_dataset("cub200", tmp_path if parent else tmp_path / "CUB_200_2011")
    assert (ds.name, ds.resize, ds.recall_ks) == ("cub200", "shorter", (1, 2, 4, 8))
    assert ds.root == str(tmp_path / "CUB_200_2011") and ds.query is None and ds.gallery is None
    assert ds.train.paths == tuple(paths[:7]) and ds.test.paths == tuple(paths[7:])
    assert ds.train.class_ids == ("1", "2", "100") and ds.test.class_ids == ("101", "200")
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ds.test.labels, [0, 0, 0, 1])
    assert ds.train.labels.dtype == np.int64 and (len(ds.train), ds.train.num_classes) == (7, 3)


def test_cub_errors(tmp_path, jpegs):
    with pytest.raises(DatasetNotFoundError, match=r"images\.txt.*CUB_200_2011.*vision\.caltech\.edu"):
        load_dataset("cub200", tmp_path)
    _cub_tree(tmp_path, jpegs)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("11 200\n", "12 200\n"))
    with pytest.raises(MalformedDatasetError, match=r"image ids differ.*image_class_labels\.txt"):
        load_dataset("cub200", tmp_path)
    labels.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"file missing.*image_class_labels\.txt"):
        load_dataset("cub200", tmp_path)


# ---------------------------------------------------------------- Cars196

CARS_CLASSES = [1, 1, 2, 98, 99, 196, 196]


def _cars_annotations(classes) -> np.ndarray:
    """The struct array of the real cars_annos.mat: 1 x N, uint8 scalars stored as 1 x 1 matrices."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.empty((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, c in enumerate(classes):
        ann[0, i] = (f"car_ims/{i + 1:06d}.jpg", *(np.array([[v]], np.uint8) for v in (3, 4, 60, 50, c, i % 2)))
    return ann


def test_cars_split_and_labels(tmp_path, jpegs):
    folder = tmp_path / "Cars196"
    paths = _place(folder, [f"car_ims/{i + 1:06d}.jpg" for i in range(len(CARS_CLASSES))], jpegs)
    savemat(folder / "cars_annos.mat", {
        "annotations": _cars_annotations(CARS_CLASSES),
        "class_names": np.array([f"Car {i}" for i in range(1, 197)], dtype=object)[None],
    })
    ds = load_dataset("cars196", tmp_path)
    assert (ds.resize, ds.recall_ks) == ("square", (1, 2, 4, 8))
    assert ds.train.paths == tuple(paths[:4]) and ds.test.paths == tuple(paths[4:])
    assert ds.train.class_ids == ("1", "2", "98") and ds.test.class_ids == ("99", "196")
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 1, 2])
    np.testing.assert_array_equal(ds.test.labels, [0, 1, 1])


def test_cars_errors(tmp_path, jpegs):
    with pytest.raises(DatasetNotFoundError, match=r"cars_annos\.mat.*Cars196.*ai\.stanford\.edu"):
        load_dataset("cars196", tmp_path)
    folder = tmp_path / "Cars196"
    folder.mkdir()
    savemat(folder / "cars_annos.mat", {"class_names": np.array(["a"], dtype=object)})
    with pytest.raises(MalformedDatasetError, match=r"'annotations'.*cars_annos\.mat"):
        load_dataset("cars196", tmp_path)
    (folder / "cars_annos.mat").write_text("not a mat file")
    with pytest.raises(MalformedDatasetError, match=r"cars_annos\.mat"):
        load_dataset("cars196", tmp_path)
    savemat(folder / "cars_annos.mat", {"annotations": _cars_annotations(CARS_CLASSES)})
    with pytest.raises(DatasetNotFoundError, match=r"image listed in the split files is missing.*000001\.jpg"):
        load_dataset("cars196", tmp_path)


# ---------------------------------------------------------------- Stanford Online Products / kanji

SOP_HEADER = "image_id class_id super_class_id path\n"


def _sop_tree(folder: Path, jpegs, train_classes=(1, 1, 2, 2, 2, 7), test_classes=(11319, 11320, 11319)):
    paths = {}
    for split, classes in (("train", train_classes), ("test", test_classes)):
        rel = [f"bicycle_final/{c}_{i}.JPG" for i, c in enumerate(classes)]
        paths[split] = _place(folder, rel, jpegs)
        rows = "".join(f"{i + 1} {c} 1 {r}\n" for i, (c, r) in enumerate(zip(classes, rel)))
        folder.joinpath(f"Ebay_{split}.txt").write_text(SOP_HEADER + rows)
    return paths


@pytest.mark.parametrize("parent", [True, False])
def test_sop_split_and_labels(tmp_path, jpegs, parent):
    folder = tmp_path / "Stanford_Online_Products"
    paths = _sop_tree(folder, jpegs)
    ds = load_dataset("stanford", tmp_path if parent else folder)
    assert (ds.resize, ds.recall_ks) == ("square", (1, 10, 100, 1000))
    assert ds.train.paths == tuple(paths["train"]) and ds.test.paths == tuple(paths["test"])
    assert ds.train.class_ids == ("1", "2", "7") and ds.test.class_ids == ("11319", "11320")
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(ds.test.labels, [0, 1, 0])


@pytest.mark.parametrize("body, message", [
    ("image_id class path\n1 1 1 a.JPG\n", r"header line is 'image_id class path'"),
    (SOP_HEADER + "1 1 1 a.JPG\n2 1 b.JPG\n", r"line 3 has 3 fields, expected 4"),
    (SOP_HEADER + "1 x 1 a.JPG\n", r"line 2: class_id 'x' is not an integer"),
    (SOP_HEADER, r"no data rows"),
])
def test_sop_malformed(tmp_path, jpegs, body, message):
    folder = tmp_path / "Stanford_Online_Products"
    _sop_tree(folder, jpegs)
    folder.joinpath("Ebay_train.txt").write_text(body)
    with pytest.raises(MalformedDatasetError, match=message + r".*Ebay_train\.txt.*cvgl\.stanford\.edu"):
        load_dataset("stanford", tmp_path)


def test_sop_missing_test_list(tmp_path, jpegs):
    folder = tmp_path / "Stanford_Online_Products"
    _sop_tree(folder, jpegs)
    folder.joinpath("Ebay_test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"file missing.*Ebay_test\.txt"):
        load_dataset("stanford", tmp_path)


# ---------------------------------------------------------------- In-Shop

INSHOP_ROWS = [  # (item, split): query and gallery list items in different orders
    ("id_00000002", "train"), ("id_00000002", "train"), ("id_00000007", "train"),
    ("id_00000009", "query"), ("id_00000003", "query"), ("id_00000009", "query"),
    ("id_00000003", "gallery"), ("id_00000011", "gallery"), ("id_00000009", "gallery"),
]


def _inshop_tree(folder: Path, jpegs, rows=INSHOP_ROWS, count=None):
    rel = [f"img/WOMEN/Dresses/{item}/{i:02d}_1_front.jpg" for i, (item, _) in enumerate(rows)]
    paths = _place(folder, rel, jpegs)
    lines = [str(len(rows) if count is None else count), "image_name item_id evaluation_status"]
    lines += [f"{r} {item} {split}" for r, (item, split) in zip(rel, rows)]
    folder.joinpath("list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return paths


def test_inshop_shared_numbering(tmp_path, jpegs):
    paths = _inshop_tree(tmp_path / "In_Shop", jpegs)
    ds = load_dataset("inshop", tmp_path)
    assert ds.test is None and (ds.resize, ds.recall_ks) == ("square", (1, 10, 20, 30))
    assert ds.train.paths == tuple(paths[:3]) and ds.query.paths == tuple(paths[3:6])
    assert ds.gallery.paths == tuple(paths[6:])
    assert ds.train.class_ids == ("id_00000002", "id_00000007")
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 1])
    shared = ("id_00000003", "id_00000009", "id_00000011")
    assert ds.query.class_ids == shared and ds.gallery.class_ids == shared
    np.testing.assert_array_equal(ds.query.labels, [1, 0, 1])
    np.testing.assert_array_equal(ds.gallery.labels, [0, 2, 1])
    # a query's label names the same item in the gallery
    query_items = [ds.query.class_ids[k] for k in ds.query.labels]
    gallery_items = [ds.gallery.class_ids[k] for k in ds.gallery.labels]
    assert query_items == [item for item, split in INSHOP_ROWS if split == "query"]
    assert gallery_items == [item for item, split in INSHOP_ROWS if split == "gallery"]


def test_inshop_malformed(tmp_path, jpegs):
    folder = tmp_path / "In_Shop"
    _inshop_tree(folder, jpegs, count=52712)
    with pytest.raises(MalformedDatasetError, match=r"line 1 announces '52712' images but 9 rows follow.*DeepFashion"):
        load_dataset("inshop", tmp_path)
    _inshop_tree(folder, jpegs, rows=INSHOP_ROWS[:3] + [("id_00000009", "val")])
    with pytest.raises(MalformedDatasetError, match=r"line 6: evaluation_status 'val'"):
        load_dataset("inshop", tmp_path)
    _inshop_tree(folder, jpegs, rows=INSHOP_ROWS[:4])
    with pytest.raises(MalformedDatasetError, match=r"the gallery split is empty"):
        load_dataset("inshop", tmp_path)


def test_unknown_dataset_and_image_set_checks():
    with pytest.raises(DatasetError, match="cub200, cars196, stanford, inshop, kanji"):
        load_dataset("imagenet", ".")
    assert DATASETS == ("cub200", "cars196", "stanford", "inshop", "kanji", "folder", "csv")
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        ImageSet(("a", "b"), np.array([0, 2]), ("x", "y"))
    with pytest.raises(ValueError, match="does not match 3 paths"):
        ImageSet(("a", "b", "c"), np.array([0, 1]), ("x", "y"))


# ---------------------------------------------------------------- balanced sampler

# class sizes 1 (never sampled), 2 (fewer than m = 3: both images, then a repeat), 5 x 8 classes
SAMPLER_LABELS = np.repeat(np.array([30, 31, 40, 41, 42, 43, 44, 45, 46, 47]), [1, 2] + [5] * 8)
SAMPLER_LABELS = SAMPLER_LABELS[np.random.default_rng(1).permutation(len(SAMPLER_LABELS))]


def test_sampler_batch_composition():
    sampler = BalancedBatchSampler(SAMPLER_LABELS, batch_size=12, images_per_class=3, iterations=400, seed=3)
    assert len(sampler) == 400
    counts, singleton = Counter(), np.flatnonzero(SAMPLER_LABELS == 30)[0]
    pair = set(np.flatnonzero(SAMPLER_LABELS == 31).tolist())
    batches = list(sampler)
    assert len(batches) == 400
    for batch in batches:
        assert len(batch) == 12 and all(isinstance(i, int) for i in batch)
        groups = np.array(batch).reshape(4, 3)
        classes = SAMPLER_LABELS[groups]
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0])) == 4
        assert singleton not in batch
        for group, label in zip(groups, classes[:, 0]):
            if label == 31:  # both images present, the third a repeat
                assert set(group.tolist()) == pair
            else:
                assert len(set(group.tolist())) == 3
        counts.update(classes[:, 0].tolist())
    # 9 eligible classes, 4 per batch: each drawn 400 * 4 / 9 = 178 times on average
    assert set(counts) == {31, *range(40, 48)}
    assert all(abs(n - 1600 / 9) < 40 for n in counts.values())


def test_sampler_determinism():
    def batches(seed, epoch):
        sampler = BalancedBatchSampler(SAMPLER_LABELS, 12, 3, 20, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    sampler = BalancedBatchSampler(SAMPLER_LABELS, 12, 3, 20, seed=0)
    first = list(sampler)
    assert list(sampler) == first == batches(0, 0)
    sampler.set_epoch(1)
    assert list(sampler) == batches(0, 1) != first
    assert batches(1, 0) != first


def test_sampler_partial_last_class_like_the_official_sampler():
    # B = 10, m = 4: classes of 4, 4 and 2 images (the official sampler truncates the last class)
    for batch in BalancedBatchSampler(SAMPLER_LABELS, 10, 4, 5):
        assert len(batch) == 10
        groups = [SAMPLER_LABELS[batch[i:i + 4]] for i in range(0, 10, 4)]
        assert [len(set(g)) for g in groups] == [1, 1, 1]
        assert len({g[0] for g in groups}) == 3


def test_sampler_errors():
    with pytest.raises(ValueError, match="needs 10 classes with two or more images, the labels have only 9"):
        BalancedBatchSampler(SAMPLER_LABELS, 20, 2, 5)


# ---------------------------------------------------------------- kanji demo

def test_jis_kanji_known_values():
    codepoints, levels = jis_kanji()
    assert (levels == 1).sum() == 2965 and (levels == 2).sum() == 3390
    assert chr(codepoints[0]) == "亜" and chr(codepoints[2964]) == "腕" and chr(codepoints[2965]) == "弌"
    assert len(np.unique(codepoints)) == 6355


def _class_chars(images: ImageSet) -> dict[str, set[str]]:
    out = {}
    for path, label in zip(images.paths, images.labels):
        out.setdefault(images.class_ids[label], set()).add(Path(path).parent.name)
    return out


def test_kanji_layout(kanji_root):
    ds = load_dataset("kanji", kanji_root)
    assert (ds.name, ds.resize, ds.recall_ks, ds.root) == ("kanji", "square", (1, 2, 4, 8), str(kanji_root))
    fonts = list(DEFAULT_FONTS[:8])
    assert [line.split()[0] for line in (kanji_root / "fonts.txt").read_text().splitlines()] == fonts
    assert ds.train.class_ids == tuple(str(i) for i in range(1, 25))
    assert ds.test.class_ids == tuple(str(i) for i in range(25, 49))
    for images in (ds.train, ds.test):
        assert len(images) == 24 * 8
        np.testing.assert_array_equal(np.bincount(images.labels), np.full(24, 8))
        assert all(len(chars) == 1 for chars in _class_chars(images).values())  # one character per class
        assert [Path(path).stem for path in images.paths] == fonts * 24  # each class: one image per font
    train_chars = set().union(*_class_chars(ds.train).values())
    test_chars = set().union(*_class_chars(ds.test).values())
    assert len(train_chars) == 24 and len(test_chars) == 24 and not train_chars & test_chars
    codepoints, levels = jis_kanji()
    assert {f"{c:04x}" for c in codepoints[levels == 1]} >= train_chars | test_chars  # common kanji first


def test_kanji_images(kanji_root):
    ds = load_dataset("kanji", kanji_root)
    assert check_images(ds.train.paths + ds.test.paths) == []
    for path in ds.train.paths[::7]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
            gray = np.asarray(image.convert("L"), dtype=np.int64)
        assert gray[[0, 0, -1, -1], [0, -1, 0, -1]].min() > 240 and gray.min() < 60  # dark ink on white
        rows, cols = np.flatnonzero((gray < 128).any(1)), np.flatnonzero((gray < 128).any(0))
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert abs(max(height, width) - 0.8 * 64) <= 3, path  # ink box scaled to 80% of the side
        assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 2 and abs((cols[0] + cols[-1]) / 2 - 31.5) <= 2, path


def test_kanji_deterministic(kanji_root, kanji_options, tmp_path):
    again = build_kanji(tmp_path / "again", **kanji_options)
    for name in ("Ebay_train.txt", "Ebay_test.txt", "fonts.txt", "build.json"):
        assert (again / name).read_bytes() == (kanji_root / name).read_bytes()
    other = build_kanji(tmp_path / "other", **dict(kanji_options, seed=1))
    assert (other / "Ebay_train.txt").read_bytes() != (kanji_root / "Ebay_train.txt").read_bytes()


def test_kanji_skip_and_redo(tmp_path):
    out = build_kanji(tmp_path, num_classes=4, fonts=["ipa-mincho", "seto"], image_size=32, install=False)
    lists = {p: p.read_bytes() for p in tmp_path.glob("*.txt")}
    image = next(tmp_path.glob("images/*/seto.jpg"))
    stamp = image.stat().st_mtime_ns
    assert build_kanji(tmp_path, num_classes=4, fonts=["ipa-mincho", "seto"], image_size=32, install=False) == out
    assert image.stat().st_mtime_ns == stamp  # finished build with the same options: kept
    (tmp_path / "Ebay_train.txt").unlink()  # as if killed before the lists were written
    build_kanji(tmp_path, num_classes=4, fonts=["ipa-mincho", "seto"], image_size=32, install=False)
    assert image.stat().st_mtime_ns != stamp
    assert {p: p.read_bytes() for p in tmp_path.glob("*.txt")} == lists
    assert json.loads((tmp_path / "build.json").read_text())["fonts_used"] == ["ipa-mincho", "seto"]


def test_kanji_missing_fonts(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(FONT_CATALOGUE, "absent", FontSpec("absent", "fonts-absent", "truetype/absent/a.ttf", "none"))
    with caplog.at_level(logging.WARNING, logger="fastiaa.data.kanji"):
        build_kanji(tmp_path, num_classes=4, fonts=["ipa-mincho", "absent", "seto"], image_size=32, install=False)
    assert "absent" in caplog.text and "apt-get install fonts-absent" in caplog.text
    assert [line.split()[0] for line in (tmp_path / "fonts.txt").read_text().splitlines()] == ["ipa-mincho", "seto"]
    with pytest.raises(DatasetError, match="only 1 of the requested fonts are installed, at least 2"):
        build_kanji(tmp_path / "b", num_classes=4, fonts=["ipa-mincho", "absent"], install=False)
    with pytest.raises(DatasetError, match="unknown font 'comic-sans'"):
        build_kanji(tmp_path / "c", num_classes=4, fonts=["comic-sans", "seto"], install=False)
    with pytest.raises(DatasetError, match="only .* kanji are drawn by all of"):
        build_kanji(tmp_path / "d", num_classes=7000, fonts=["ipa-mincho", "seto"], install=False)


def test_check_images_reports_broken_files(tmp_path, jpegs):
    good = tmp_path / "good.jpg"
    shutil.copyfile(jpegs[0], good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    paths = [str(good), str(truncated), str(text), str(tmp_path / "missing.jpg")]
    failures = check_images(paths)
    assert [p for p, _ in failures] == paths[1:]
    assert failures[0][1].startswith("OSError") and "truncated" in failures[0][1]
    assert failures[2][1].startswith("FileNotFoundError")


# ---------------------------------------------------------------- your own images: folder and csv

def _folders(root: Path, jpegs, splits: dict) -> dict:
    """root/<split>/<class>/<i>.jpg for {split: {class: count}}; returns {split: [paths]} in reading order."""
    made, it = {}, iter(jpegs)
    for split, classes in splits.items():
        made[split] = _place(root / split, [f"{c}/{i}.jpg" for c, n in sorted(classes.items()) for i in range(n)], it)
    return made


def test_folder_dataset_reads_class_folders(tmp_path, jpegs):
    paths = _folders(tmp_path, jpegs, {"train": {"cat": 2, "dog": 3, "ant": 1}, "test": {"owl": 2, "emu": 1}})
    (tmp_path / "train" / ".DS_Store").write_text("hidden files are skipped")
    ds = load_dataset("folder", tmp_path)
    assert (ds.name, ds.root, ds.split_seed, ds.resize) == ("folder", str(tmp_path), None, "square")
    assert ds.train.class_ids == ("ant", "cat", "dog") and ds.test.class_ids == ("emu", "owl")
    assert sorted(ds.train.paths) == sorted(paths["train"]) and sorted(ds.test.paths) == sorted(paths["test"])
    np.testing.assert_array_equal(ds.train.labels, [0, 1, 1, 2, 2, 2])  # ant's single image is kept
    assert [Path(p).parent.name for p in ds.train.paths] == ["ant", "cat", "cat", "dog", "dog", "dog"]


def test_folder_without_test_splits_classes_in_disjoint_halves(tmp_path, jpegs):
    _folders(tmp_path, jpegs, {"train": {f"c{k:02d}": 2 for k in range(7)}})
    first, again = load_dataset("folder", tmp_path), load_dataset("folder", tmp_path)
    assert first.split_seed == 0 and (len(first.train.class_ids), len(first.test.class_ids)) == (4, 3)
    assert not set(first.train.class_ids) & set(first.test.class_ids)
    assert set(first.train.class_ids) | set(first.test.class_ids) == {f"c{k:02d}" for k in range(7)}
    assert (first.train.paths, first.test.paths) == (again.train.paths, again.test.paths)  # a fixed draw
    order = np.random.default_rng(0).permutation(7)
    assert first.train.class_ids == tuple(sorted(f"c{k:02d}" for k in order[:4]))


@pytest.mark.parametrize("make, message", [
    (lambda root: None, r"no train/ folder"),
    (lambda root: (root / "train").mkdir(), r"no class folder, so no image.*train"),
    (lambda root: (root / "train" / "cat").mkdir(parents=True), r"empty class folder: add its images.*train/cat"),
    (lambda root: (root / "train").mkdir() or (root / "train" / "a.jpg").write_text(""),
     r"a file directly in the split folder.*train/a\.jpg"),
])
def test_folder_dataset_errors_name_the_folder(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DatasetError, match=message + r".*Expected layout of --data: DIR/train/<class>"):
        load_dataset("folder", tmp_path)


def test_folder_dataset_refuses_files_that_are_not_images(tmp_path, jpegs):
    _folders(tmp_path, jpegs, {"train": {"cat": 2, "dog": 2}})
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(MalformedDatasetError, match=r"not an image .*move it out of the class folder.*dog/notes\.txt"):
        load_dataset("folder", tmp_path)


def _csv(tmp_path, jpegs, rows, header="path,label,split") -> Path:
    """An image CSV beside real JPEGs img/<i>.jpg (rows use {i} for the i-th image)."""
    _place(tmp_path / "img", [f"{i}.jpg" for i in range(12)], jpegs)
    path = tmp_path / "data.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_dataset_single_set_and_query_gallery(tmp_path, jpegs):
    rows = ["img/0.jpg,cat,train", "img/1.jpg,cat,train", "img/2.jpg,dog,train", "img/3.jpg,owl,test",
            "img/4.jpg,owl,validation", f"{tmp_path / 'img' / '5.jpg'},emu,test"]
    ds = load_dataset("csv", _csv(tmp_path, jpegs, rows))
    assert ds.root == str(tmp_path / "data.csv") and ds.query is None
    assert ds.train.class_ids == ("cat", "dog") and ds.test.class_ids == ("emu", "owl")
    assert ds.test.paths == tuple(str(tmp_path / "img" / f"{i}.jpg") for i in (3, 4, 5))  # absolute path as is
    np.testing.assert_array_equal(ds.test.labels, [1, 1, 0])
    rows = ["img/0.jpg,cat,train,,", "img/1.jpg,cat,train,0,0", "img/3.jpg,owl,test,1,0", "img/4.jpg,emu,test,1,0",
            "img/5.jpg,owl,test,0,1", "img/6.jpg,yak,test,false,true", "img/7.jpg,emu,test,0,1"]
    ds = load_dataset("csv", _csv(tmp_path, jpegs, rows, "path,label,split,is_query,is_gallery"))
    assert ds.test is None and ds.query.class_ids == ds.gallery.class_ids == ("emu", "owl", "yak")
    np.testing.assert_array_equal(ds.query.labels, [1, 0])
    np.testing.assert_array_equal(ds.gallery.labels, [1, 2, 0])
    both = ["img/0.jpg,cat,train,0,0", "img/3.jpg,owl,test,1,1", "img/4.jpg,owl,test,True,True"]
    ds = load_dataset("csv", _csv(tmp_path, jpegs, both, "path,label,split,is_query,is_gallery"))
    assert ds.query is None and len(ds.test) == 2  # every test row both: the single-set protocol


@pytest.mark.parametrize("header, rows, message", [
    ("path,split", ["img/0.jpg,train"], r"line 1 \(the header\) has no column label"),
    ("path,label,split", ["img/0.jpg,cat,train", "img/1.jpg,cat,val"], r"line 3: split 'val' is not one of train, test"),
    ("path,label,split", ["img/0.jpg,cat,train", "img/missing.jpg,cat,test"], r"line 3: image img/missing\.jpg does not exist"),
    ("path,label,split", ["img/0.jpg,cat,train", "data.csv,cat,test"], r"line 3: data\.csv is not an image"),
    ("path,label,split", ["img/0.jpg,cat,train", "img/1.jpg,cat"], r"line 3: 2 fields, expected 3"),
    ("path,label,split", ["img/0.jpg,cat,train", "img/0.jpg,dog,test"], r"line 3: img/0\.jpg is listed again \(first on line 2\)"),
    ("path,label,split", ["img/0.jpg,,train"], r"line 2: empty label"),
    ("path,label,split", ["img/0.jpg,cat,train"], r"the test split is empty"),
    ("path,label,split,is_query", ["img/0.jpg,cat,train,0"], r"is_query without its partner"),
    ("path,label,split,is_query,is_gallery", ["img/0.jpg,a,train,0,0", "img/1.jpg,b,test,1,1", "img/2.jpg,b,test,1,0"],
     r"line 3: a test row is both query and gallery"),
    ("path,label,split,is_query,is_gallery", ["img/0.jpg,a,train,0,0", "img/1.jpg,b,test,maybe,0"],
     r"line 3: is_query 'maybe' is not one of 1, 0"),
])
def test_csv_dataset_errors_name_the_line(tmp_path, jpegs, header, rows, message):
    with pytest.raises(MalformedDatasetError, match=message + r".*data\.csv.*header path,label,split"):
        load_dataset("csv", _csv(tmp_path, jpegs, rows, header))


def test_convert_round_trips_through_csv_and_folders(tmp_path, jpegs):
    from fastiaa.data.convert import csv_text, first_classes, write_folders

    folder = tmp_path / "Stanford_Online_Products"
    _sop_tree(folder, jpegs)
    sop = load_dataset("stanford", folder)
    (tmp_path / "sop.csv").write_text(csv_text(sop, tmp_path))
    back = load_dataset("csv", tmp_path / "sop.csv")
    for name in ("train", "test"):
        a, b = getattr(sop, name), getattr(back, name)
        assert a.paths == b.paths and [a.class_ids[k] for k in a.labels] == [b.class_ids[k] for k in b.labels]
    tree = write_folders(first_classes(sop, 2), tmp_path / "tree")
    small = load_dataset("folder", tree)
    assert small.train.class_ids == ("1", "2") and small.test.class_ids == ("11319", "11320")
    assert len(small.train) == 5 and os.path.samefile(small.train.paths[0], sop.train.paths[0])  # hard links
    with pytest.raises(FileExistsError, match="already exists"):
        write_folders(sop, tree)
    inshop = load_dataset("inshop", _inshop_tree(tmp_path / "In_Shop", jpegs) and tmp_path)
    with pytest.raises(DatasetError, match="convert it to csv instead"):
        write_folders(inshop, tmp_path / "inshop_tree")
    (tmp_path / "inshop.csv").write_text(csv_text(inshop, tmp_path))
    again = load_dataset("csv", tmp_path / "inshop.csv")
    assert again.query.paths == inshop.query.paths and again.gallery.paths == inshop.gallery.paths
    np.testing.assert_array_equal(again.gallery.labels, inshop.gallery.labels)


def test_data_check_reports_single_image_classes(tmp_path, jpegs, capsys):
    from fastiaa import cli

    _folders(tmp_path, jpegs, {"train": {"cat": 2, "ant": 1, "bee": 1}, "test": {"owl": 2, "emu": 1}})
    assert cli.main(["data", "check", "--dataset", "folder", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("train: 4 images, 3 classes, 1-2 (median 1) images per class, 2 with a single image (ant, bee; "
                      "legal: batches skip them (no positive pair), the statistics keep them and neighbour correction "
                      "serves the classes with few images, docs/method.md §4)")
    assert out[1].startswith("test: 3 images, 2 classes, 1-2 (median 1.5) images per class, 1 with a single image (emu;")
    assert out[-1] == "7 images checked, 0 unreadable"
    empty = tmp_path / "no_images"
    (empty / "train").mkdir(parents=True)
    assert cli.main(["data", "check", "--dataset", "folder", "--data", str(empty)]) == 2
    assert capsys.readouterr().err.startswith("fastiaa data: error: Folder dataset: no class folder, so no image")
    table = _csv(tmp_path / "csv", jpegs, ["img/0.jpg,cat,train", "img/1.jpg,cat,tset"])
    assert cli.main(["data", "check", "--dataset", "csv", "--data", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastiaa data: error: CSV dataset: line 3: split 'tset' is not one of train, test, "
                          f"validation ({table})") and len(err.splitlines()) == 1

"""The four readers give the same samples and labels for the same real images, and bad data is
reported with its file and line."""

import os
import zipfile

import numpy as np
import pytest
import webdataset
from PIL import Image

from vlmdistill.errors import DataError
from vlmdistill.eval.elevater import dataset_writers as writers
from vlmdistill.eval.elevater import readers
from vlmdistill.eval.elevater.demo import DIGIT_NAMES, digits_images

CLASSNAMES = list(DIGIT_NAMES["en"])


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_images(size=16)
    keep = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(10)])   # 30 images, every class
    return [images[i] for i in keep], [(int(labels[i]),) for i in keep]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, digits):
    images, labels = digits
    root = tmp_path_factory.mktemp("layouts")
    writers.write_iris(str(root / "iris_zip"), images, labels, CLASSNAMES, zipped=True)
    writers.write_iris(str(root / "iris_files"), images, labels, CLASSNAMES, zipped=False)
    writers.write_coco(str(root / "coco"), images, labels, CLASSNAMES)
    writers.write_image_folder(str(root / "folder"), images, labels, CLASSNAMES, classnames_file="label.txt")
    writers.write_webdataset(str(root / "wds"), images, labels, CLASSNAMES, templates=["a photo of the digit {c}."],
                             max_count=12)
    return root


def _pixels(data):
    return [np.asarray(data.open_image(i)) for i in range(len(data))]


def test_every_reader_yields_the_same_images_and_labels(layouts, digits):
    images, labels = digits
    expected_pixels = [np.asarray(image.convert("RGB")) for image in images]
    read = {
        "iris_zip": readers.read_dataset(str(layouts / "iris_zip")),
        "iris_files": readers.read_dataset(str(layouts / "iris_files")),
        "coco": readers.read_dataset(str(layouts / "coco")),
        "folder": readers.read_dataset(str(layouts / "folder"), classnames_file=str(layouts / "folder" / "label.txt")),
        "wds": readers.read_dataset(str(layouts / "wds")),
    }
    assert [d.reader for d in read.values()] == ["iris", "iris", "coco", "image_folder", "webdataset"]
    for name, data in read.items():
        assert data.classnames == CLASSNAMES, name
        assert not data.multilabel, name
        if name == "folder":   # class folders regroup images: compare as a multiset of (label, pixels)
            pairs = sorted((lab, px.tobytes()) for lab, px in zip(data.labels, _pixels(data)))
            assert pairs == sorted((lab, px.tobytes()) for lab, px in zip(labels, expected_pixels))
        else:                  # the index order is the dataset order
            assert data.labels == labels, name
            assert all(np.array_equal(a, b) for a, b in zip(_pixels(data), expected_pixels)), name
    assert read["iris_zip"].samples[0].source.endswith(".zip@test/00000.png")
    assert read["wds"].templates == ["a photo of the digit {c}."]


def test_webdataset_reader_agrees_with_the_webdataset_library(layouts):
    shards = sorted(str(p) for p in (layouts / "wds" / "test").glob("*.tar"))
    assert len(shards) == 3   # max_count=12 over 30 samples: several shards, read in order
    library = [(int(s["cls"]), np.asarray(Image.open(__import__("io").BytesIO(s["png"])).convert("RGB")))
               for s in webdataset.WebDataset(shards, shardshuffle=False)]
    ours = readers.read_webdataset(str(layouts / "wds"))
    assert [lab[0] for lab in ours.labels] == [lab for lab, _ in library]
    assert all(np.array_equal(a, b) for a, (_, b) in zip(_pixels(ours), library))


def test_multilabel_iris_and_coco_agree(tmp_path, digits):
    images, _ = digits
    labels = [(i % 10, (i + 3) % 10) if i % 2 else (i % 10,) for i in range(len(images))]
    writers.write_iris(str(tmp_path / "iris"), images, labels, CLASSNAMES)
    writers.write_coco(str(tmp_path / "coco"), images, labels, CLASSNAMES)
    iris, coco = readers.read_dataset(str(tmp_path / "iris")), readers.read_dataset(str(tmp_path / "coco"))
    expected = [tuple(sorted(set(lab))) for lab in labels]
    assert iris.multilabel and coco.multilabel
    assert [tuple(sorted(x)) for x in iris.labels] == expected == coco.labels


def test_numeric_folders_index_the_chinese_label_file(tmp_path, digits):
    images, labels = digits
    writers.write_image_folder(str(tmp_path), images, labels, DIGIT_NAMES["zh"], classnames_file="label_cn.txt")
    data = readers.read_image_folder(str(tmp_path / "test"), str(tmp_path / "label_cn.txt"))
    assert data.classnames == list(DIGIT_NAMES["zh"])
    assert sorted(data.labels) == sorted(labels)


# ------------------------------------------------------------------ errors name the file and line

def test_missing_image_names_index_line(tmp_path, digits):
    index = writers.write_iris(str(tmp_path), digits[0][:4], digits[1][:4], CLASSNAMES, zipped=False)
    os.remove(tmp_path / "test" / "00002.png")
    with pytest.raises(DataError, match=r"test\.txt:3: image .*00002\.png does not exist"):
        readers.read_iris(index)


def test_missing_zip_member_names_index_line(tmp_path, digits):
    index = writers.write_iris(str(tmp_path), digits[0][:4], digits[1][:4], CLASSNAMES)
    with open(index, "a") as handle:
        handle.write("test.zip@test/99999.png 1\n")
    with pytest.raises(DataError, match=r"test\.txt:5: test/99999\.png is not in .*test\.zip"):
        readers.read_iris(index)


def test_label_outside_class_list_names_index_line(tmp_path, digits):
    index = writers.write_iris(str(tmp_path), digits[0][:4], [(1,), (2,), (12,), (3,)], CLASSNAMES)
    data = readers.read_iris(index)
    with pytest.raises(DataError, match=r"test\.txt:3: label 12 is outside the 10 classes"):
        data.check_labels(10)


def test_coco_unknown_category_and_bad_line(tmp_path, digits):
    path = writers.write_coco(str(tmp_path / "coco"), digits[0][:3], [(0,), (1,), (2,)], CLASSNAMES)
    text = open(path).read().replace('"category_id": 3', '"category_id": 42')
    open(path, "w").write(text)
    with pytest.raises(DataError, match=r"annotations\[2\]: category_id 42 is outside the class list"):
        readers.read_coco(path)
    bad = tmp_path / "bad.txt"
    bad.write_text("only-a-path.png\n")
    with pytest.raises(DataError, match=r"bad\.txt:1: expected '<image path> <labels>'"):
        readers.read_iris(str(bad))


def test_unreadable_image_names_file_and_line(tmp_path, digits):
    index = writers.write_iris(str(tmp_path), digits[0][:3], digits[1][:3], CLASSNAMES, zipped=False)
    (tmp_path / "test" / "00001.png").write_bytes(b"not an image")
    data = readers.read_iris(index)
    data.open_image(0)
    with pytest.raises(DataError, match=r"test\.txt:2: image .*00001\.png is not a readable image"):
        data.open_image(1)


def test_corrupt_zip_is_reported(tmp_path, digits):
    index = writers.write_iris(str(tmp_path), digits[0][:2], digits[1][:2], CLASSNAMES)
    (tmp_path / "test.zip").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"test\.txt:1: .*test\.zip is not a readable zip file"):
        readers.read_iris(index)
    assert not zipfile.is_zipfile(tmp_path / "test.zip")


def test_format_detection_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="cannot tell the data format"):
        readers.read_dataset(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        readers.read_dataset(str(tmp_path / "nothing"))

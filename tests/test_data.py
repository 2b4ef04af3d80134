"""Dataset sources, splits and image decoding, including every bad input the issue lists."""

from __future__ import annotations

import io
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogs_fixture import dog_image, make_mini_dogs
from visionpoc.data.images import load_rgb
from visionpoc.data.sources import breed_name, read_folder, read_stanford_dogs
from visionpoc.data.splits import limit_per_class, make_splits
from visionpoc.errors import DataError


def test_reads_official_layout(mini_dogs: Path) -> None:
    ds = read_stanford_dogs(mini_dogs)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (18, 9, 3)
    assert ds.class_names == ["Chihuahua", "Shih-Tzu", "Afghan hound"]
    assert ds.train.files[0] == "n02085620-Chihuahua/n02085620_1.jpg"
    assert ds.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # 1-based in the .mat, 0-based here
    assert ds.train.path(0).is_file()


def test_lists_subfolder(tmp_path: Path) -> None:
    ds = read_stanford_dogs(make_mini_dogs(tmp_path / "d", lists_subfolder=True))
    assert (len(ds.train), len(ds.test)) == (18, 9)


def test_breed_names() -> None:
    assert breed_name("n02085620-Chihuahua") == "Chihuahua"
    assert breed_name("n02086240-Shih-Tzu") == "Shih-Tzu"
    assert breed_name("n02088094-Afghan_hound") == "Afghan hound"


def test_missing_list_file_is_named(fresh_dogs: Path) -> None:
    (fresh_dogs / "test_list.mat").unlink()
    with pytest.raises(DataError) as e:
        read_stanford_dogs(fresh_dogs)
    assert "test_list.mat not found" in str(e.value) and "visionpoc data download" in str(e.value)


def test_damaged_list_file_is_named(fresh_dogs: Path) -> None:
    (fresh_dogs / "train_list.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage")
    with pytest.raises(DataError, match="train_list.mat"):
        read_stanford_dogs(fresh_dogs)


def test_listed_but_absent_image_is_named(fresh_dogs: Path) -> None:
    gone = fresh_dogs / "Images" / "n02086240-Shih-Tzu" / "n02086240_2.jpg"
    gone.unlink()
    with pytest.raises(DataError) as e:
        read_stanford_dogs(fresh_dogs)
    assert "listed but absent" in str(e.value) and str(gone) in str(e.value)


def test_missing_images_folder(fresh_dogs: Path) -> None:
    shutil.rmtree(fresh_dogs / "Images")
    with pytest.raises(DataError, match="Images not found"):
        read_stanford_dogs(fresh_dogs)


def _folder_dataset(root: Path, train: dict[str, int], test: dict[str, int], test_name: str = "test") -> Path:
    for split, counts in (("train", train), (test_name, test)):
        for k, (cls, n) in enumerate(counts.items()):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                dog_image(k, i, (20, 16)).save(d / f"{i}.png")
    return root


def test_folder_source(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path, {"cat": 4, "ant": 3}, {"cat": 2, "ant": 1}, test_name="val")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = read_folder(root)
    assert ds.class_names == ["ant", "cat"]  # sorted folder names
    assert (len(ds.train), len(ds.test)) == (7, 3)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_class_in_train_but_not_test_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder_dataset(tmp_path, {"a": 3, "b": 3}, {"a": 2})
    with caplog.at_level(logging.WARNING):
        ds = read_folder(root)
    assert ds.num_classes == 2 and "'b' has training images but none in the test split" in caplog.text


def test_class_in_test_but_not_train_is_an_error(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path, {"a": 3, "b": 3}, {"a": 2, "zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        read_folder(root)


def test_hidden_junk_and_unsupported_files_are_left_out_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder_dataset(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    for split in ("train", "test"):  # a notebook's checkpoints folder: hidden, in train/ and in test/
        (root / split / ".ipynb_checkpoints").mkdir()
        dog_image(0, 9, (20, 16)).save(root / split / ".ipynb_checkpoints" / "x.png")
    (root / "train" / "__MACOSX" / "a").mkdir(parents=True)  # a macOS zip's debris: not a class
    (root / "train" / "__MACOSX" / "a" / "._0.png").write_bytes(b"resource fork")
    (root / "train" / "a" / ".thumbs").mkdir()  # a hidden folder inside a class: its files are not images
    dog_image(0, 9, (20, 16)).save(root / "train" / "a" / ".thumbs" / "t.png")
    (root / "train" / "a" / "Thumbs.db").write_bytes(b"junk")
    (root / "train" / "a" / "photo.heic").write_bytes(b"heic")  # a photo this tool cannot read: counted
    (root / "train" / "b" / "nested").mkdir()  # a visible sub-folder of a class is part of the class
    dog_image(1, 9, (20, 16)).save(root / "train" / "b" / "nested" / "n.jfif", format="JPEG")
    dog_image(1, 8, (20, 16)).save(root / "train" / "loose.png")  # not in a class folder
    with caplog.at_level(logging.WARNING):
        ds = read_folder(root)
    assert ds.class_names == ["a", "b"]
    assert ds.train.files == ["a/0.png", "a/1.png", "b/0.png", "b/1.png", "b/nested/n.jfif"]
    assert "1 file(s) skipped" in caplog.text and ".heic: 1" in caplog.text  # Thumbs.db is not counted
    assert "1 image(s) directly in" in caplog.text and "loose.png" in caplog.text


def test_one_class_and_an_empty_test_split_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least two"):
        read_folder(_folder_dataset(tmp_path / "one", {"a": 3}, {"a": 2}))
    root = _folder_dataset(tmp_path / "flat", {"a": 2, "b": 2}, {})
    (root / "test").mkdir()
    dog_image(0, 0, (20, 16)).save(root / "test" / "0.png")  # in test/, not in test/<class>/
    with pytest.raises(DataError, match="holds no images in class folders"):
        read_folder(root)
    with pytest.raises(DataError, match="is a file"):
        read_folder(root / "test" / "0.png")


def test_val_beside_test_is_said_to_be_unused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder_dataset(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    shutil.copytree(root / "test", root / "val")
    with caplog.at_level(logging.WARNING):
        ds = read_folder(root)
    assert ds.test.root == root / "test" and f"{root / 'val'} is not read" in caplog.text


def test_class_names_match_across_unicode_normalizations(tmp_path: Path) -> None:
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    assert nfd != nfc
    root = _folder_dataset(tmp_path, {nfd: 2, "b": 2}, {nfc: 1, "b": 1})  # macOS wrote train/, Linux test/
    ds = read_folder(root)
    assert ds.class_names == ["b", nfc] and ds.test.labels.tolist() == [0, 1]
    assert all(ds.train.path(i).is_file() for i in range(len(ds.train)))  # the folders' own names


def test_names_that_are_not_utf8_are_refused_with_their_fix(tmp_path: Path) -> None:
    import os

    root = _folder_dataset(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    latin1 = os.fsdecode(b"r\xe9nard")  # a Latin-1 folder name, as a Windows zip leaves it
    try:
        (root / "train" / latin1).mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    dog_image(0, 0, (20, 16)).save(root / "train" / latin1 / "0.png")
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_folder(root)
    assert "convmv" in str(e.value) and "'train/r\\xe9nard'" in str(e.value)  # which folder, readable
    shutil.rmtree(root / "train" / latin1)
    dog_image(0, 0, (20, 16)).save(root / "train" / "a" / (latin1 + ".png"))  # a file name this time
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_folder(root)


def test_folder_without_train_test(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="must hold train/<class>"):
        read_folder(tmp_path)


def test_val_split_is_stratified_seeded_and_disjoint(mini_dogs: Path) -> None:
    ds = read_stanford_dogs(mini_dogs)
    s1 = make_splits(ds, val_fraction=0.34, limit=None, seed=0)
    s2 = make_splits(ds, val_fraction=0.34, limit=None, seed=0)
    s3 = make_splits(ds, val_fraction=0.34, limit=None, seed=1)
    assert s1.val.files == s2.val.files and s1.val.files != s3.val.files
    assert np.bincount(s1.val.labels).tolist() == [2, 2, 2]  # round(0.34 * 6) per class
    assert not set(s1.val.files) & set(s1.train.files)
    assert len(s1.train) + len(s1.val) == len(ds.train)
    assert s1.test.files == ds.test.files  # the test split is untouched


def test_limit_per_class(mini_dogs: Path) -> None:
    ds = read_stanford_dogs(mini_dogs)
    s = make_splits(ds, val_fraction=0.25, limit=4, seed=0)
    assert np.bincount(s.train.labels).tolist() == [3, 3, 3]
    assert np.bincount(s.val.labels).tolist() == [1, 1, 1]
    assert np.bincount(s.test.labels).tolist() == [3, 3, 3]  # fewer than the limit: all kept
    assert len(limit_per_class(ds.train, None, 0)) == 18


def test_val_split_needs_two_images_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from visionpoc.cli import main

    root = _folder_dataset(tmp_path, {"a": 3, "lonely": 1}, {"a": 1, "lonely": 1})
    ds = read_folder(root)
    with pytest.raises(DataError, match="'lonely' has 1 training image"):
        make_splits(ds, val_fraction=0.1, limit=None, seed=0)
    assert main(["data", "check", "--source", "folder", "--root", str(root)]) == 2  # said before a run
    assert "'lonely' has 1 training image" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- images


def test_odd_images_decode_to_rgb(tmp_path: Path) -> None:
    rgb = dog_image(0, 0, (20, 10))
    rgb.convert("L").save(tmp_path / "gray.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    rgb.convert("P").save(tmp_path / "palette.gif")
    rgb.save(tmp_path / "png_named.jpg", format="PNG")  # content and extension disagree
    gray16 = np.arange(200, dtype=np.uint16).reshape(10, 20) * 300
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    Image.fromarray(gray16.astype(">u2")).save(tmp_path / "gray16_big_endian.tif")  # I;16B, as ImageJ writes
    Image.fromarray(gray16.astype(np.float32) / 60_000).save(tmp_path / "float01.tif")  # mode F, 0..1
    names = (
        "gray.jpg",
        "cmyk.jpg",
        "alpha.png",
        "palette.gif",
        "png_named.jpg",
        "gray16.png",
        "gray16_big_endian.tif",
        "float01.tif",
    )
    for name in names:
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (20, 10), name
    top8 = (gray16 >> 8).astype(np.uint8)  # 16-bit keeps its top 8 bits, whatever the byte order
    for name in ("gray16.png", "gray16_big_endian.tif"):
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name))[..., 0], top8), name
    as_255 = np.round(gray16.astype(np.float32) / 60_000 * 255)
    assert np.abs(np.asarray(load_rgb(tmp_path / "float01.tif"))[..., 0] - as_255).max() <= 1  # not black
    # the PNG named .jpg is decoded losslessly from its content
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "png_named.jpg")), np.asarray(rgb))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = dog_image(0, 0, (40, 30))  # stored landscape; the camera says "rotate 90 degrees clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = load_rgb(tmp_path / "phone.jpg")
    assert upright.size == (30, 40)  # portrait, as a photo viewer shows it
    with Image.open(tmp_path / "phone.jpg") as raw:  # the stored pixels, turned by hand
        assert raw.size == (40, 30)
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(np.asarray(upright), expected)


def test_truncated_and_non_images_are_named(tmp_path: Path) -> None:
    buf = io.BytesIO()
    dog_image(1, 1, (64, 64)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    for name in ("cut.jpg", "text.jpg"):
        with pytest.raises(DataError) as e:
            load_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "replace or delete it" in str(e.value)
    with pytest.raises(DataError, match="listed but absent"):
        load_rgb(tmp_path / "nope.jpg")


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(50_000, 50_000))
    assert bomb.stat().st_size < 200
    with pytest.raises(DataError) as e:
        load_rgb(bomb)
    assert "bomb.png" in str(e.value) and "declares" in str(e.value) and "remove it" in str(e.value)
    # our own, configurable limit refuses a header before decoding too
    bomb.write_bytes(_png_header_only(2000, 2000))
    with pytest.raises(DataError, match="declares 2000x2000 pixels"):
        load_rgb(bomb, max_pixels=1000)

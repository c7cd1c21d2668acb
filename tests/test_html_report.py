"""The shared HTML helper: thumbnails as the project's reader sees the picture, escaping, and the file write."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pytest
from PIL import Image

from qualiclip_hf import html_report

from .conftest import image_bytes, photo


def decode(uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :])))


def test_a_thumbnail_fits_the_size_keeps_the_aspect_and_follows_exif_orientation(tmp_path):
    # A 300 x 120 landscape file tagged "rotate 90" (EXIF orientation 6): a viewer shows it 120 x 300, portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    photo(120, 300).save(path, "JPEG", exif=exif)
    thumbnail = decode(html_report.thumbnail_data_uri(path, size=100))
    assert thumbnail.size == (40, 100)
    # Bytes and PIL images too; the caller's image is not shrunk, and a small one is never enlarged.
    image = photo(50, 80)
    assert decode(html_report.thumbnail_data_uri(image)).size == (80, 50) and image.size == (80, 50)
    assert decode(html_report.thumbnail_data_uri(image_bytes(photo(400, 200), "PNG"), size=160)).size == (80, 160)


def test_an_unreadable_picture_is_a_value_error_naming_it(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image_bytes(photo(64, 64), "JPEG")[:300])
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        html_report.thumbnail_data_uri(broken)


def test_text_is_escaped_in_the_page_figures_and_tables():
    hostile = '<script>alert("x")</script>'
    page = html_report.page(
        hostile,
        html_report.figure("data:image/jpeg;base64,AAAA", hostile, title=hostile)
        + html_report.table([hostile], [[hostile]], text_columns=[0]),
    )
    # <title>, <h1>, alt, caption, tooltip, <th>, <td>
    assert "<script" not in page and page.count("&lt;script&gt;") == 7
    texts: list[str] = []
    parser = HTMLParser()
    parser.handle_data = texts.append
    parser.feed(page)
    assert texts.count(hostile) == 5  # read back as the text it was: <title>, <h1>, caption, <th>, <td>


def test_a_file_is_refused_if_it_exists_unless_overwrite_and_left_whole(tmp_path):
    target = tmp_path / "new" / "folder" / "page.html"
    assert html_report.write_text_file(target, "one") == target
    with pytest.raises(FileExistsError, match="--overwrite"):
        html_report.write_text_file(target, "two")
    assert target.read_text(encoding="utf-8") == "one"
    html_report.write_text_file(target, "two", overwrite=True)
    assert target.read_text(encoding="utf-8") == "two"
    assert [path.name for path in target.parent.iterdir()] == ["page.html"]  # no temporary file left
    with pytest.raises(IsADirectoryError):
        html_report.write_text_file(tmp_path, "x", overwrite=True)

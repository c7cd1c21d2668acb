"""Self-contained HTML pages: a page skeleton, thumbnails inlined as data URIs, escaped text, a safe file write.

The one place where the project writes HTML (`qualiclip report`, `qualiclip gmad`). A page written here references
nothing outside itself: no network, no neighbouring files, no JavaScript (except where a page is an
interactive tool, the gMAD study page); images are inlined as base64 JPEG data URIs
(RFC 2397) and charts are inline SVG. Every text that comes from data (a path, an id, an error) goes through
[`escape`] (`html.escape`, quotes included) before it is put into the page.

Only the standard library is imported at module level; Pillow and the project's image reader are imported by
[`thumbnail_data_uri`] when it runs.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Thumbnails: the longest side in pixels, and the JPEG quality (Pillow's scale, 1-95). 160 px at quality 80 is about
# 5-10 kB per picture, so a page of a hundred thumbnails stays near a megabyte.
THUMBNAIL_SIZE = 160
THUMBNAIL_QUALITY = 80

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em;
border-bottom: 1px solid #ddd; padding-bottom: 0.2em; } h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
p.note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.92em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.thumbs { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 168px; font-size: 0.78em; text-align: center; word-break: break-all; }
figure img { max-width: 160px; max-height: 160px; display: block; margin: 0 auto 2px; border: 1px solid #ccc; }
svg { max-width: 100%; height: auto; }
svg text { font-family: inherit; paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
"""


def escape(text: Any) -> str:
    """`str(text)` made safe for HTML text and quoted attribute values (`html.escape` with `quote=True`)."""
    return html.escape(str(text), quote=True)


def thumbnail_data_uri(
    source: Any, size: int | None = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY, image_format: str = "JPEG"
) -> str:
    """
    A picture downscaled to fit `size` x `size` pixels (aspect ratio kept, never enlarged; Pillow's
    `Image.thumbnail`), as a `data:image/jpeg;base64,...` (or `image/png`) URI to put in an `<img src>`.

    Args:
        source: A path or the bytes of an image file, read with the project's reader
            (`qualiclip_hf.image_reader.open_image`: orientation, colour profile, bit depth and transparency as a
            viewer shows them), or a PIL image (made viewable RGB with `image_reader.to_viewable_rgb`).
        size: The longest side of the thumbnail, in pixels; `None` keeps the full size.
        quality: JPEG quality, 1-95.
        image_format: `"JPEG"` (small, lossy) or `"PNG"` (lossless, for pages where people judge fine detail).

    Raises:
        ValueError: the image cannot be read (missing, not an image, truncated...), naming the file and the cause.
    """
    from PIL import Image

    from .image_reader import open_image, to_viewable_rgb

    image = to_viewable_rgb(source) if isinstance(source, Image.Image) else open_image(source)
    if size is not None:
        image = image.copy()  # `thumbnail` works in place; never shrink the caller's image
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "PNG":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"image_format must be JPEG or PNG, got {image_format!r}")
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(src: str, caption: str, title: str | None = None) -> str:
    """An `<figure>` with an image (`src`, a data URI from [`thumbnail_data_uri`]) and a caption; text escaped."""
    tooltip = f' title="{escape(title)}"' if title is not None else ""
    image = f'<img src="{escape(src)}" alt="{escape(caption)}">'
    return f"<figure{tooltip}>{image}<figcaption>{escape(caption)}</figcaption></figure>"


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], text_columns: Sequence[int] = ()) -> str:
    """
    An HTML table; every cell is escaped. Cells are right-aligned (numbers) except the columns whose indices are in
    `text_columns`, left-aligned.
    """

    def cell(tag: str, index: int, value: Any) -> str:
        kind = ' class="text"' if index in text_columns else ""
        return f"<{tag}{kind}>{escape(value)}</{tag}>"

    head = "".join(cell("th", index, value) for index, value in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", index, value) for index, value in enumerate(row)) + "</tr>\n" for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def page(title: str, body: str, style: str = "", heading: bool = True) -> str:
    """
    A complete HTML5 document: `<title>` and (with `heading`) `<h1>` from `title` (escaped), the project's stylesheet
    (plus `style`, CSS appended as given), then `body`, HTML inserted as given (build it with [`escape`], [`figure`],
    [`table`]).
    """
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}{style}</style>\n</head>\n"
        f"<body>\n{f'<h1>{escape(title)}</h1>' if heading else ''}\n{body}\n</body>\n</html>\n"
    )


def write_text_file(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """
    Writes `text` (UTF-8) as the file `path`, creating its folder: into a temporary file in the same folder, renamed
    over `path` (`os.replace`, atomic), so a reader never sees half a file and an interrupted write leaves none.

    Args:
        path: The file to write.
        text: Its whole content.
        overwrite: Replace an existing file; without it an existing file is refused.

    Returns:
        The path written, as a `Path`.

    Raises:
        FileExistsError: `path` exists and `overwrite` is false (one line naming it, with `--overwrite` as the fix).
        IsADirectoryError: `path` is a folder.
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another output, or pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)  # mkstemp's 0600, for a file the user meant to share
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path

"""
QualiCLIP quality scores and heat maps in the browser: a Gradio app, ready to run as a Hugging Face Space.

The Hub's hosted widget does not run custom model code, so this app stands in for it. Drop one or more images: each
gets its quality score (in [0, 1], higher is better) in a table, and a Grad-CAM heat map of the regions that lower
its score, painted over a grey copy of the image (bright = lowers the score most). A file that cannot be read or
scored gets its error in the table; the others are still scored.

    python app.py [--model NAME] [--max-size N] [--host 127.0.0.1] [--port 7860]

The model is, in this order: `--model`, the `QUALICLIP_MODEL` environment variable, the folder this file sits in
when it holds a model (a Space or model repository with the weights beside the app), or the package's embedded
`demo` model. `--max-size` (or `QUALICLIP_MAX_SIZE`) downscales larger images first; by default every image is
scored at full resolution, as `qualiclip score` does.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from qualiclip_hf.explain import explain_image, overlay_heatmap
from qualiclip_hf.loading import load_model_and_processor, select_device
from qualiclip_hf.scoring import read_image

APP_DIR = Path(__file__).resolve().parent
TABLE_HEADERS = ["file", "score", "error"]


def default_model() -> str:
    """The model used when none is given: `QUALICLIP_MODEL`, this folder if it holds a model, else `demo`."""
    if os.environ.get("QUALICLIP_MODEL"):
        return os.environ["QUALICLIP_MODEL"]
    return str(APP_DIR) if (APP_DIR / "config.json").is_file() else "demo"


def analyse(
    paths: Sequence[str | Path] | None, model, processor, max_size: int | None = None
) -> tuple[list[list[str]], list[tuple]]:
    """
    Scores and explains image files.

    Returns:
        `(rows, gallery)`: one `[file name, score with 4 decimals or "", error or ""]` row per file, in order, and
        one `(overlay image, caption)` per file that was scored.
    """
    rows: list[list[str]] = []
    gallery: list[tuple] = []
    for path in paths or []:
        name = Path(path).name
        try:
            image = read_image(path)  # the reader of every entry point (bit depth, ICC, orientation, frames, ...)
            explanation = explain_image(image, model, processor, max_size=max_size)
        except (RuntimeError, ValueError) as error:
            # The uploaded copy's temporary path means nothing to the user; the file name has its own column.
            rows.append([name, "", str(error).removeprefix(f"{path}: ")])
            continue
        score = f"{explanation.score:.4f}"
        rows.append([name, score, ""])
        gallery.append((overlay_heatmap(explanation.image, explanation.heatmap), f"{name}: {score}"))
    return rows, gallery


def build_app(model_name: str | None = None, max_size: int | None = None, device: str | None = None) -> gr.Blocks:
    """The Gradio Blocks app for a model name `qualiclip score --model` accepts (default: [`default_model`])."""
    model_name = model_name or default_model()
    model, processor = load_model_and_processor(model_name, device or select_device())
    is_demo = model_name == "demo"

    def run(paths: list[str] | None, limit: float | None) -> tuple[list[list[str]], list[tuple]]:
        limit = int(limit) if limit else None
        try:  # the image processor owns the rule
            processor.image_processor.check_max_size(limit)
        except ValueError as error:
            raise gr.Error(f"the size limit: {error} (0: full resolution)") from None
        return analyse(paths, model, processor, max_size=limit)

    with gr.Blocks(title="QualiCLIP image quality") as app:
        gr.Markdown(
            "# QualiCLIP image quality\n"
            "Drop images to get their quality score, in [0, 1] (higher is better), and a heat map of the regions "
            "that lower it (Grad-CAM on the image tower; bright = lowers the score most)."
            + (
                "\n\n**Demo model:** a small model trained from scratch on synthetic degradations, *not* QualiCLIP. "
                "It ranks blur, noise and compression of one image; it is no judge of real photo quality."
                if is_demo
                else ""
            )
        )
        with gr.Row():
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
            size_limit = gr.Number(
                value=max_size or 0,
                precision=0,
                minimum=0,
                label="Longest side limit in pixels (0: full resolution)",
                elem_id="max-size",
            )
        table = gr.Dataframe(
            headers=TABLE_HEADERS,
            datatype=["str", "str", "str"],
            type="array",
            interactive=False,
            label="Scores",
            elem_id="scores",
        )
        gallery = gr.Gallery(
            label="What lowers the score",
            columns=3,
            height=480,
            preview=False,
            fit_columns=False,
            format="png",
            object_fit="contain",
            elem_id="heatmaps",
        )
        # One queue for both events: requests reach the model one at a time.
        for event in (files.change, size_limit.submit):
            event(run, inputs=[files, size_limit], outputs=[table, gallery], concurrency_id="model")
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="QualiCLIP quality scores and heat maps in the browser.")
    parser.add_argument("--model", default=None, help="'demo', 'official', a model folder or a Hub repository id")
    max_size = os.environ.get("QUALICLIP_MAX_SIZE")
    parser.add_argument("--max-size", type=int, default=int(max_size) if max_size else None)
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    args = parser.parse_args(argv)
    build_app(args.model, args.max_size).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()

"""`qualiclip score`: every file gets a row, bad files get an error, the run goes on, exit status 1 on failures."""

import csv
import json
from pathlib import Path

import pytest
import torch

from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.cli import main

from .conftest import photo


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    photo(64, 96, seed=1).save(images / "a.jpg", quality=95)
    photo(80, 40, seed=2).save(images / "b.png")
    photo(70, 70, seed=3).save(images / "sub" / "c.jpg")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    full = tmp_path / "full.jpg"
    photo(120, 120, seed=4).save(full, quality=90)
    (images / "truncated.jpg").write_bytes(full.read_bytes()[:300])
    photo(8, 8, seed=5).save(images / "tiny.png")
    (images / "readme.txt").write_text("ignored: no image extension")
    return images


def expected_score(model_dir, path) -> float:
    from PIL import Image

    model = QualiCLIPModel.from_pretrained(model_dir).eval()
    processor = QualiCLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**processor(images=Image.open(path), return_tensors="pt")).quality_score.item()


def test_csv_has_a_row_per_file_and_errors_do_not_stop_the_run(folder, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    status = main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), "--batch-size", "3"])
    assert status == 1
    rows = {row["path"].split("/")[-1]: row for row in csv.DictReader(output.open())}
    assert set(rows) == {"a.jpg", "b.png", "empty.jpg", "notes.jpg", "truncated.jpg", "tiny.png"}
    for name in ("a.jpg", "b.png"):
        assert rows[name]["error"] == ""
        assert float(rows[name]["score"]) == pytest.approx(expected_score(tiny_model_dir, folder / name), abs=1e-6)
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg", "tiny.png"):
        assert rows[name]["score"] == ""
        assert name in rows[name]["error"]
    assert "not an image" in rows["notes.jpg"]["error"]
    assert "below the model's 32x32 minimum" in rows["tiny.png"]["error"]
    assert "4 of 6 files failed" in capsys.readouterr().err


def test_recursive_json_and_jsonl(folder, tiny_model_dir, tmp_path):
    good = [str(folder / "a.jpg"), str(folder / "sub")]
    assert main(["score", *good, "--model", str(tiny_model_dir), "--output", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [row["path"].split("/")[-1] for row in rows] == ["a.jpg", "c.jpg"]
    assert all(0 <= row["score"] <= 1 and row["error"] is None for row in rows)

    status = main(
        ["score", str(folder), "--recursive", "--model", str(tiny_model_dir), "--output", str(tmp_path / "s.jsonl")]
    )
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert status == 1
    assert any(line["path"].endswith("sub/c.jpg") and line["score"] is not None for line in lines)


def test_table_on_stdout_and_missing_paths_reported(folder, tiny_model_dir, tmp_path, capsys):
    status = main(["score", str(folder / "a.jpg"), str(tmp_path / "nope.jpg"), "--model", str(tiny_model_dir)])
    out = capsys.readouterr()
    assert status == 1
    flat = "".join(ch for ch in out.out if ch.isalnum() or ch in "._")  # rich may fold long cells
    assert "a.jpg" in flat and "nope.jpg" in flat and "nosuchfile" in flat


def test_bad_arguments_are_explained(folder, tiny_model_dir, tmp_path, capsys):
    assert main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(tmp_path / "x.xml")]) == 2
    assert main(["score", str(folder), "--model", str(tmp_path / "no_model_here")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", str(folder), "--batch-size", "0"])


def test_max_size_is_applied(folder, tiny_model_dir, tmp_path):
    output = tmp_path / "capped.json"
    main(["score", str(folder / "a.jpg"), "--model", str(tiny_model_dir), "--max-size", "48", "--output", str(output)])
    capped = json.loads(output.read_text())[0]["score"]
    main(["score", str(folder / "a.jpg"), "--model", str(tiny_model_dir), "--output", str(output)])
    full = json.loads(output.read_text())[0]["score"]
    assert capped != pytest.approx(full, abs=1e-9)


def test_precision_and_decode_place_reach_the_model(folder, tiny_model_dir, tmp_path):
    def scores(*options: str) -> dict[str, float | None]:
        output = tmp_path / "scores.json"
        main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), *options])
        return {Path(row["path"]).name: row["score"] for row in json.loads(output.read_text())}

    full = scores()
    assert scores("--decode-on", "device") == pytest.approx(full, abs=1e-6)
    half = scores("--precision", "bf16")
    assert half.keys() == full.keys()
    scored = [name for name, score in full.items() if score is not None]
    assert scored and any(half[name] != full[name] for name in scored)
    assert all(half[name] == pytest.approx(full[name], abs=0.1) for name in scored)


def test_decoding_on_the_device_without_torchcodec_says_what_to_install(folder, tiny_model_dir, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def import_without_torchcodec(name, *args, **kwargs):
        if name.startswith("torchcodec"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_torchcodec)
    assert main(["score", str(folder), "--model", str(tiny_model_dir), "--decode-on", "device"]) == 2
    assert 'needs TorchCodec, for this torch (pip install "qualiclip-hf[decode]")' in capsys.readouterr().err


def test_running_out_of_memory_on_one_image_says_how_to_downscale(tiny_model_dir, tmp_path, monkeypatch):
    photo(64, 96, seed=1).save(tmp_path / "small.jpg", quality=95)
    photo(300, 200, seed=2).save(tmp_path / "large.jpg", quality=95)
    photo(70, 70, seed=3).save(tmp_path / "square.jpg", quality=95)
    original_forward = QualiCLIPModel.forward

    def forward_with_little_memory(self, pixel_values, image_sizes=None, **kwargs):
        sizes = pixel_values.shape[-2:] if image_sizes is None else image_sizes.max(dim=0).values
        if int(sizes[0]) * int(sizes[1]) > 150 * 150:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original_forward(self, pixel_values, image_sizes=image_sizes, **kwargs)

    monkeypatch.setattr(QualiCLIPModel, "forward", forward_with_little_memory)
    output = tmp_path / "scores.json"
    assert main(["score", str(tmp_path), "--model", str(tiny_model_dir), "--output", str(output)]) == 1
    rows = {Path(row["path"]).name: row for row in json.loads(output.read_text())}
    assert rows["small.jpg"]["score"] is not None and rows["square.jpg"]["score"] is not None
    assert rows["large.jpg"]["score"] is None
    assert "large.jpg: not enough memory to score 200x300 pixels" in rows["large.jpg"]["error"]
    assert "--max-size" in rows["large.jpg"]["error"]
    # With the advice followed, the same run succeeds.
    assert main(["score", str(tmp_path), "--model", str(tiny_model_dir), "--max-size", "128"]) == 0

"""
gMAD (`qualiclip_hf.gmad`, `qualiclip gmad`): on a synthetic pool where one metric is blind to noise and the other to
blur, the pairs each is attacked with show the distortion it is blind to; the report, the study page (in a headless
browser) and the summary of judgements.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from qualiclip_hf.cli import main
from qualiclip_hf.gmad import (
    GMADError,
    Metric,
    assign_levels,
    level_edges,
    load_pool,
    read_scores_file,
    run_gmad,
    select_pairs,
    summarize_judgements,
    write_report,
)
from qualiclip_hf.image_reader import open_image
from training.degradations import apply_distortion

from .conftest import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
NODE = shutil.which("node")
BLUR_LEVELS = NOISE_LEVELS = (None, 1, 2, 3, 4)  # ARNIQA level indices; None: not applied


def sharpness_blind_to_noise(image: Image.Image) -> float:
    """
    Mean gradient magnitude after a 5x5 median filter and 4x4 averaging: the median and the averaging remove the
    white noise of the pool, blur lowers it. Higher is sharper.
    """
    grey = ndimage.median_filter(np.asarray(image, dtype=np.float64).mean(axis=2) / 255, size=5)
    height, width = (size // 4 * 4 for size in grey.shape)
    coarse = grey[:height, :width].reshape(height // 4, 4, width // 4, 4).mean(axis=(1, 3))
    return float(np.hypot(*np.gradient(coarse)).mean())


def noise_blind_to_blur(image: Image.Image) -> float:
    """
    Donoho's noise estimate, median(|HH|) / 0.6745 of the finest Haar diagonal band (Donoho & Johnstone 1994): blur
    applied before the noise does not change it. Higher is noisier (lower is better).
    """
    grey = np.asarray(image, dtype=np.float64).mean(axis=2) / 255
    height, width = (size // 2 * 2 for size in grey.shape)
    grey = grey[:height, :width]
    diagonal = (grey[0::2, 0::2] - grey[0::2, 1::2] - grey[1::2, 0::2] + grey[1::2, 1::2]) / 2
    return float(np.median(np.abs(diagonal)) / 0.6745)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[Path, tuple[int, int]]:
    """
    coffee.jpg at 160 pixels wide, blurred then noised at every pair of 5 strengths (0 = none), saved losslessly:
    25 files, with their (blur, noise) strengths.
    """
    folder = tmp_path_factory.mktemp("gmad_pool")
    source = open_image(REPO_ROOT / "examples" / "images" / "coffee.jpg")
    source = source.resize((160, round(160 * source.height / source.width)), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(source).copy()).permute(2, 0, 1).float()[None] / 255
    strengths = {}
    for blur in BLUR_LEVELS:
        for noise in NOISE_LEVELS:
            image = pixels if blur is None else apply_distortion(pixels, "gaussian_blur", blur)
            if noise is not None:
                image = apply_distortion(image, "white_noise", noise, torch.Generator().manual_seed(0))
            strength = (0 if blur is None else blur + 1, 0 if noise is None else noise + 1)
            path = folder / f"blur{strength[0]}_noise{strength[1]}.png"
            Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)
            strengths[path] = strength
    return strengths


def _pairs(result, defender):
    competition = next(c for c in result.competitions if c.defender == defender)
    return [(Path(result.paths[level.better]), Path(result.paths[level.worse])) for level in competition.pairs]


@pytest.mark.parametrize("binning", ["equal-width", "quantile"])
def test_each_metric_is_attacked_with_the_distortion_it_is_blind_to(pool, binning):
    paths = sorted(pool)
    result = run_gmad(
        paths,
        sharpness_blind_to_noise,
        noise_blind_to_blur,
        levels=4,
        binning=binning,
        names=("sharpness", "noise"),
        lower_better=(False, True),
    )
    assert result.excluded == []
    # The sharpness metric defends: in each of its levels the noise metric shows a clean and a much noisier image.
    against_sharpness = _pairs(result, "sharpness")
    assert len(against_sharpness) >= 2
    for better, worse in against_sharpness:
        assert pool[better][1] == 0 and pool[worse][1] >= 4, (better.name, worse.name)
    # The noise metric defends: the sharpness metric shows a sharper and a much blurrier image.
    against_noise = _pairs(result, "noise")
    assert len(against_noise) >= 2
    for better, worse in against_noise:
        assert pool[worse][0] - pool[better][0] >= 3, (better.name, worse.name)


def test_select_pairs_per_level():
    defender = np.array([0.0, 0.1, 0.2, 0.9, 1.0, np.nan, 0.5])
    attacker = np.array([5.0, 1.0, 3.0, 2.0, 2.0, 9.0, 7.0])
    levels = select_pairs(defender, attacker, levels=3)
    # Equal-width thirds of [0, 1]: {0, 1, 2}, {6}, {3, 4}; image 5 has no defender score.
    assert [level.count for level in levels] == [3, 1, 2]
    assert (levels[0].better, levels[0].worse) == (0, 1)
    assert levels[1].better is None and "1 image" in levels[1].reason
    assert levels[2].better is None and "alike" in levels[2].reason
    assert [level.low for level in levels] == pytest.approx([0, 1 / 3, 2 / 3])
    quantile = select_pairs(defender, attacker, levels=2, binning="quantile")
    assert [level.count for level in quantile] == [3, 3]  # 6 scored images, split at their median
    assert (quantile[1].better, quantile[1].worse) == (6, 3)  # the tie 3/4 on 2.0 goes to the lower index
    assert assign_levels(np.array([1.0]), level_edges(np.array([0.0, 1.0]), 4)).tolist() == [3]
    with pytest.raises(GMADError, match="at least 2"):
        select_pairs(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(GMADError, match="binning"):
        select_pairs(defender, attacker, binning="log")


def test_lower_better_metrics_are_negated():
    metric = Metric("niqe-like", np.array([3.0, 7.0]), lower_better=True)
    assert metric.scores.tolist() == [-3.0, -7.0]
    # The attacker's "better" image is the one with the lower raw value.
    result = run_gmad(["a.png", "b.png"], [0.5, 0.5 + 1e-9], metric, levels=1, names=("flat", "niqe-like"))
    level = result.competitions[0].levels[0]
    assert (level.better, level.worse) == (0, 1)


def test_one_failing_image_leaves_only_that_one_out(tmp_path):
    good = [tmp_path / f"{name}.png" for name in "abc"]
    for index, path in enumerate(good):
        Image.new("RGB", (40, 40), (index * 80, 0, 0)).save(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="broken.png"):
        result = run_gmad(
            [*good, broken], lambda image: image.getpixel((0, 0))[0], lambda image: 1.0 - image.getpixel((0, 0))[0]
        )
    assert result.excluded == [str(broken)]
    assert all(level.better != 3 and level.worse != 3 for c in result.competitions for level in c.levels)

    def refuses_black(image):
        if image.getpixel((0, 0))[0] == 0:
            raise ValueError("input too dark")
        return 1.0

    with pytest.warns(UserWarning, match=r"a\.png: scoring failed: input too dark"):
        result = run_gmad(good, refuses_black, [1.0, 2.0, 3.0])
    assert result.excluded == [str(good[0])]
    with pytest.raises(GMADError, match="2 scores for a pool of 3 images"):
        run_gmad(good, Metric("short", np.array([1.0, 2.0])), [1.0, 2.0, 3.0])


def _write_scores(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_scores_files_map_onto_the_pool_by_path_or_id(pool, tmp_path):
    folder = next(iter(pool)).parent
    loaded = load_pool(folder)
    assert sorted(loaded.paths) == sorted(pool) and loaded.ids[0] == loaded.paths[0].name
    by_path = tmp_path / "by_path.csv"
    _write_scores(by_path, [{"path": str(path), "score": str(index), "error": ""} for index, path in enumerate(pool)])
    scores = read_scores_file(by_path, loaded)
    assert scores[loaded.paths.index(next(iter(pool)))] == 0.0
    by_id = tmp_path / "by_id.jsonl"
    by_id.write_text("\n".join(json.dumps({"id": path.name, "score": 1.5}) for path in list(pool)[:3]) + "\n")
    scores = read_scores_file(by_id, loaded)
    assert np.isfinite(scores).sum() == 3 and np.nanmax(scores) == 1.5
    unrelated = tmp_path / "unrelated.csv"
    _write_scores(unrelated, [{"path": "/elsewhere/x.png", "score": "1"}])
    with pytest.raises(GMADError, match="none of its 1 rows"):
        read_scores_file(unrelated, loaded)


def test_parquet_pool(pool, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = sorted(pool)[:4]
    table = pa.table(
        {"id": [f"img{index}" for index in range(4)], "path": [os.path.relpath(p, tmp_path) for p in paths]}
    )
    pq.write_table(table, tmp_path / "pool.parquet")
    loaded = load_pool(tmp_path / "pool.parquet")
    assert [path.resolve() for path in loaded.paths] == [path.resolve() for path in paths]
    assert loaded.ids == ["img0", "img1", "img2", "img3"]
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(GMADError, match="'path' column"):
        load_pool(tmp_path / "bad.parquet")


@pytest.fixture(scope="module")
def report(pool, tmp_path_factory) -> Path:
    result = run_gmad(
        sorted(pool),
        sharpness_blind_to_noise,
        noise_blind_to_blur,
        levels=4,
        names=("sharpness", "noise"),
        lower_better=(False, True),
    )
    return write_report(result, tmp_path_factory.mktemp("gmad_report") / "report", seed=3, study_max_size=None)


def test_report_folder(report, pool):
    assert sorted(path.name for path in report.iterdir()) == ["index.html", "pairs.json", "scores.csv", "study.html"]
    pairs = json.loads((report / "pairs.json").read_text())
    assert [metric["lower_better"] for metric in pairs["metrics"]] == [False, True]
    assert {pair["defender"] for pair in pairs["pairs"]} == {"sharpness", "noise"}
    page = (report / "index.html").read_text()
    assert "lower is better" in page and "http://" not in page and "https://" not in page
    for pair in pairs["pairs"]:
        for key in (pair["better"], pair["worse"]):
            assert Path(pairs["images"][key]["path"]).name in page
    assert page.count("data:image/jpeg;base64,") == 2 * len(pairs["pairs"])
    study = (report / "study.html").read_text()
    assert "<script src" not in study and "<link" not in study
    with (report / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(pool) and set(rows[0]) == {"path", "sharpness", "noise"}


def test_report_refuses_a_non_empty_folder(report, pool, tmp_path):
    result = run_gmad(sorted(pool)[:3], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], levels=1)
    with pytest.raises(GMADError, match="not an empty folder"):
        write_report(result, report)
    (tmp_path / "empty").mkdir()
    assert (write_report(result, tmp_path / "empty") / "pairs.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["empty"]  # no staging folder left behind


def _judgements(report: Path, choose_better: dict[str, bool], observer: str = "x") -> dict:
    """A judgements file as the study page writes it: for each pair id, whether the attacker's better was chosen."""
    pairs = {pair["id"]: pair for pair in json.loads((report / "pairs.json").read_text())["pairs"]}
    study = json.loads((report / "pairs.json").read_text())["study"]
    judgements = []
    for pair_id, better in choose_better.items():
        pair = pairs[pair_id]
        judgements.append(
            {
                "pair": pair_id,
                "left": pair["worse"],
                "right": pair["better"],
                "chosen": pair["better" if better else "worse"],
            }
        )
    return {"format": "qualiclip-gmad-judgements", "version": 1, "study": study, "observer": observer,
            "judgements": judgements}  # fmt: skip


def test_summary_of_judgements(report, tmp_path):
    pairs = json.loads((report / "pairs.json").read_text())["pairs"]
    noise_attacks = [pair["id"] for pair in pairs if pair["attacker"] == "noise"]
    sharpness_attacks = [pair["id"] for pair in pairs if pair["attacker"] == "sharpness"]
    # Two observers: both agree with the noise metric on every pair; on the sharpness metric's pairs the first agrees
    # on the first pair only and the second on none, and the second skips the last pair.
    first = {**{pair: True for pair in noise_attacks}, **{pair: i == 0 for i, pair in enumerate(sharpness_attacks)}}
    second = {**{pair: True for pair in noise_attacks}, **{pair: False for pair in sharpness_attacks[:-1]}}
    files = []
    for name, choices in (("first", first), ("second", second)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(_judgements(report, choices, name)))
    summary = {s["attacker"]: s for s in summarize_judgements(report, files)}
    assert summary["noise"]["aggressiveness"] == 1.0 and summary["noise"]["resistance"] == 0.0
    assert summary["noise"]["defender"] == "sharpness"
    by_pair = {row["id"]: row for row in summary["sharpness"]["pairs"]}
    assert by_pair[sharpness_attacks[0]]["p"] == 0.5 and by_pair[sharpness_attacks[-1]]["judgements"] == 1
    expected = np.mean([0.5] + [0.0] * (len(sharpness_attacks) - 1))
    assert summary["sharpness"]["aggressiveness"] == pytest.approx(expected)
    assert summary["sharpness"]["resistance"] == pytest.approx(1 - expected)

    other = _judgements(report, first)
    other["study"] = "0000"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(GMADError, match=r"other\.json: made on study"):
        summarize_judgements(report, [tmp_path / "other.json"])
    swapped = _judgements(report, first)
    swapped["judgements"][0]["chosen"] = "i999"
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    with pytest.raises(GMADError, match="judgement 1: its images are not those"):
        summarize_judgements(report, [tmp_path / "swapped.json"])


def test_cli_gmad_with_a_scores_file_and_the_demo_model(pool, tmp_path, capsys):
    folder = next(iter(pool)).parent
    noise_scores = tmp_path / "noise.csv"
    rows = [{"path": str(path), "score": noise_blind_to_blur(open_image(path))} for path in sorted(pool)]
    _write_scores(noise_scores, rows)
    output = tmp_path / "report"
    argv = ["gmad", "--pool", str(folder), "--defender", "qualiclip", "--model", "demo", "--device", "cpu"]
    argv += ["--attacker", str(noise_scores), "--lower-better", "attacker", "--levels", "3", "--output", str(output)]
    assert main(argv) == 0
    pairs = json.loads((output / "pairs.json").read_text())
    assert [metric["name"] for metric in pairs["metrics"]] == ["qualiclip (demo)", "noise.csv"]
    assert "not QualiCLIP" in pairs["metrics"][0]["note"] and pairs["metrics"][1]["lower_better"]
    assert pairs["pairs"] and all(pair["defender"] in ("qualiclip (demo)", "noise.csv") for pair in pairs["pairs"])
    capsys.readouterr()

    assert main(argv) == 2  # the report exists: refused before anything is scored
    assert capsys.readouterr().err.strip().endswith("not an empty folder: choose another or delete it")
    bad = ["gmad", "--pool", str(folder), "--defender", "pyiqa:no_such_metric", "--attacker", str(noise_scores)]
    assert main([*bad, "--output", str(tmp_path / "other"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("qualiclip: pyiqa metric 'no_such_metric' is unavailable: ")
    for wrong, message in (
        (["--defender", "qualiclip", "--lower-better", "defender"], "--defender: qualiclip: lower_better"),
        (["--defender", "niqe"], "--defender: unknown metric 'niqe': use 'qualiclip', 'pyiqa:NAME'"),
        (["--defender", str(tmp_path / "missing.csv")], "no such file"),
    ):
        argv = ["gmad", "--pool", str(folder), "--attacker", str(noise_scores), "--output", str(tmp_path / "other")]
        assert main([*argv, *wrong]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error  # before the pool is even listed
    assert main(["gmad", "--pool", str(folder)]) == 2
    assert "--defender, --attacker, --output" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_cli_gmad_with_an_offline_pyiqa_metric(pool, tmp_path, capsys):
    pytest.importorskip("pyiqa")
    folder = next(iter(pool)).parent
    sharpness = tmp_path / "sharpness.jsonl"
    sharpness.write_text(
        "".join(
            json.dumps({"id": path.name, "score": sharpness_blind_to_noise(open_image(path))}) + "\n" for path in pool
        )
    )
    output = tmp_path / "report"
    argv = ["gmad", "--pool", str(folder), "--defender", f"scores:{sharpness}", "--attacker", "pyiqa:piqe"]
    assert main([*argv, "--levels", "3", "--device", "cpu", "--output", str(output)]) == 0  # PIQE needs no weights
    pairs = json.loads((output / "pairs.json").read_text())
    piqe = next(metric for metric in pairs["metrics"] if metric["name"] == "pyiqa:piqe")
    assert piqe["lower_better"] is True
    assert "pyiqa:piqe (lower is better; negated to compare" in (output / "index.html").read_text()

    judgements = tmp_path / "judged.json"
    choices = {pair["id"]: True for pair in pairs["pairs"]}
    judgements.write_text(json.dumps(_judgements(output, choices)))
    capsys.readouterr()
    assert main(["gmad", "summarize", "--report", str(output), "--judgements", str(judgements)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["attacker", "defender", "aggressiveness", "resistance"]
    assert all(line.split()[2:4] == ["1.000", "0.000"] for line in lines[1:])


QUALICLIP_SCRIPT = Path(sys.executable).parent / "qualiclip"


@pytest.mark.skipif(not QUALICLIP_SCRIPT.is_file(), reason="the qualiclip console script is not installed")
def test_gmad_help_imports_neither_torch_nor_numpy():
    done = subprocess.run(
        [str(QUALICLIP_SCRIPT), "gmad", "--help"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "qualiclip_hf.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "numpy", "PIL")}
    assert "summarize" in done.stdout


@pytest.mark.skipif(not QUALICLIP_SCRIPT.is_file(), reason="the qualiclip console script is not installed")
def test_the_installed_command_loads_the_model_without_asking_for_remote_code(tmp_path):
    # The console script defers registering the Auto classes; loading the demo folder (which declares `auto_map`)
    # must not fall back to its remote code, whose prompt a command cannot answer.
    examples = sorted((REPO_ROOT / "examples/images").glob("*.jpg"))
    scores = tmp_path / "sizes.csv"
    _write_scores(scores, [{"path": str(path), "score": path.stat().st_size} for path in examples])
    command = [str(QUALICLIP_SCRIPT), "gmad", "--pool", str(REPO_ROOT / "examples/images"), "--defender", "qualiclip"]
    command += ["--model", "demo", "--attacker", str(scores), "--levels", "2", "--output", str(tmp_path / "report")]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "pairs.json").is_file()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
def test_study_page_in_a_headless_browser(report, tmp_path):
    """Judges every pair in Chromium (left image each time), downloads the judgements, summarises them."""
    sync_api = pytest.importorskip("playwright.sync_api")
    pairs = json.loads((report / "pairs.json").read_text())
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
        )
        try:
            page = browser.new_page(accept_downloads=True)
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto((report / "study.html").as_uri())
            shown = []
            for position in range(len(pairs["pairs"])):
                sync_api.expect(page.locator("#progress")).to_have_text(f"pair {position + 1} of {len(pairs['pairs'])}")
                shown.append(page.locator("#left").get_attribute("src"))
                if position == 0:  # a click judges too; the keyboard does the rest
                    page.locator("#left").click()
                else:
                    page.keyboard.press("ArrowLeft")
            sync_api.expect(page.locator("#download")).to_be_visible()
            page.locator("#observer").fill("tester 1")
            with page.expect_download() as download:
                page.locator("#download").click()
            saved = tmp_path / download.value.suggested_filename
            download.value.save_as(saved)
        finally:
            browser.close()
    assert saved.name == f"gmad-judgements-{pairs['study']}-tester1.json"
    assert all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests
    assert all(source.startswith("data:image/png;base64,") for source in shown)
    record = json.loads(saved.read_text())
    assert record["observer"] == "tester 1" and record["seed"] == 3 and record["study"] == pairs["study"]
    judgements = record["judgements"]
    assert sorted(j["pair"] for j in judgements) == sorted(pair["id"] for pair in pairs["pairs"])
    assert all(j["chosen"] == j["left"] for j in judgements)
    by_id = {pair["id"]: pair for pair in pairs["pairs"]}
    left_is_better = [j["left"] == by_id[j["pair"]]["better"] for j in judgements]
    assert True in left_is_better and False in left_is_better  # the sides are shuffled
    summary = summarize_judgements(report, [saved])
    for competition in summary:
        expected = np.mean([
            float(j["left"] == by_id[j["pair"]]["better"]) for j in judgements
            if by_id[j["pair"]]["attacker"] == competition["attacker"]
        ])  # fmt: skip
        assert competition["aggressiveness"] == pytest.approx(expected)


# A few DOM objects, enough for the study page's script: elements by id, key and click handlers, and the Blob download.
_NODE_HARNESS = """
const elements = {};
const element = (id) => (elements[id] ??= { id, hidden: false, textContent: "", src: "", value: "", handlers: {},
  addEventListener(type, handler) { this.handlers[type] = handler; } });
const documentHandlers = {};
let downloaded = null;
globalThis.location = { hash: process.argv[1] || "" };
globalThis.document = {
  getElementById: element,
  addEventListener(type, handler) { documentHandlers[type] = handler; },
  createElement: () => ({ click() { downloaded = this; }, remove() {} }),
  body: { appendChild() {} },
};
const blobs = new Map();
URL.createObjectURL = (blob) => { const url = `blob:${blobs.size}`; blobs.set(url, blob); return url; };
const shown = [];
eval(require("fs").readFileSync(0, "utf8"));
while (!element("pair").hidden) {
  shown.push([element("progress").textContent, element("left").src.slice(0, 22)]);
  if (shown.length === 2) documentHandlers.keydown({ key: "Backspace", target: {} });  // back one, judged again
  else if (shown.length === 1) element("left").handlers.click();
  else documentHandlers.keydown({ key: "ArrowLeft", target: { tagName: "BODY" } });
}
element("observer").value = "node 1";
element("download").handlers.click();
blobs.get(downloaded.href).text().then((text) => {
  console.log(JSON.stringify({ shown, name: downloaded.download, record: JSON.parse(text) }));
});
"""


def _study_in_node(report: Path, address_hash: str) -> dict:
    script = re.search(r"<script>(.*)</script>", (report / "study.html").read_text(), re.S).group(1)
    done = subprocess.run(
        [NODE, "-e", _NODE_HARNESS, "--", address_hash], input=script, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="no Node.js to run the study page's script")
def test_study_page_script_in_node(report):
    """The study page's own script, run by Node.js against a stub DOM: every pair judged, a JSON file offered."""
    pairs = json.loads((report / "pairs.json").read_text())
    by_id = {pair["id"]: pair for pair in pairs["pairs"]}
    count = len(pairs["pairs"])
    orders = []
    for address_hash, seed in (("", 3), ("#seed=11", 11)):
        outcome = _study_in_node(report, address_hash)
        assert [text for text, _ in outcome["shown"]][:3] == [f"pair {n} of {count}" for n in (1, 2, 1)]
        assert all(source == "data:image/png;base64," for _, source in outcome["shown"])
        record = outcome["record"]
        assert outcome["name"] == f"gmad-judgements-{pairs['study']}-node1.json"
        assert record["seed"] == seed and record["observer"] == "node 1" and record["study"] == pairs["study"]
        judgements = record["judgements"]
        assert sorted(j["pair"] for j in judgements) == sorted(by_id)
        assert all(j["chosen"] == j["left"] for j in judgements)
        left_is_better = [j["left"] == by_id[j["pair"]]["better"] for j in judgements]
        assert True in left_is_better and False in left_is_better  # the sides are shuffled
        summary = summarize_judgements(report, [_saved(report, record)])
        for competition in summary:
            expected = np.mean([
                float(j["left"] == by_id[j["pair"]]["better"]) for j in judgements
                if by_id[j["pair"]]["attacker"] == competition["attacker"]
            ])  # fmt: skip
            assert competition["aggressiveness"] == pytest.approx(expected)
        orders.append([j["pair"] for j in judgements])
    assert orders[0] != orders[1]  # another seed, another order
    assert (
        _study_in_node(report, "")["record"]["judgements"] == _study_in_node(report, "#seed=3")["record"]["judgements"]
    )


def _saved(report: Path, record: dict) -> Path:
    path = report.parent / f"judgements-{record['seed']}.json"
    path.write_text(json.dumps(record))
    return path

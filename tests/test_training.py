"""The QualiCLIP training recipe: losses, samples, and a few real steps under `accelerate launch` on 2 CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiclip_hf import QualiCLIPModel
from training.data import DegradedBatches, load_pristine_stream, overlapping_crops, shard_for_process
from training.losses import QualiCLIPLossWeights, qualiclip_losses

from .conftest import REPO_ROOT, TINY_TEXT, TINY_VISION, photo


def similarities_with(positive_by_level, negative_by_level, crop_gap=0.0):
    """(1, L, 2, 1, 2) similarities with the given per-level values; crop 2 offset by `crop_gap`."""
    pos = torch.tensor(positive_by_level).view(1, -1, 1, 1)
    neg = torch.tensor(negative_by_level).view(1, -1, 1, 1)
    sims = torch.stack([pos, neg], dim=-1).repeat(1, 1, 2, 1, 1)
    sims[:, :, 1] += crop_gap
    return sims


def test_well_ordered_similarities_cost_nothing():
    weights = QualiCLIPLossWeights(margin_consistency=0.02, margin_ranking=0.05)
    losses = qualiclip_losses(similarities_with([0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5]), weights)
    assert losses["loss"].item() == pytest.approx(0.0, abs=1e-7)


def test_each_term_penalises_its_own_violation():
    weights = QualiCLIPLossWeights(margin_consistency=0.02, margin_ranking=0.05)
    rising_positive = qualiclip_losses(similarities_with([0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]), weights)
    assert rising_positive["positive"] > 0 and rising_positive["negative"] == 0 and rising_positive["consistency"] == 0
    falling_negative = qualiclip_losses(
        similarities_with([0.5, 0.4, 0.3, 0.2, 0.1], [0.5, 0.4, 0.3, 0.2, 0.1]), weights
    )
    assert falling_negative["negative"] > 0 and falling_negative["positive"] == 0
    apart = qualiclip_losses(similarities_with([0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5], 0.1), weights)
    assert apart["consistency"].item() == pytest.approx(0.1 - 0.02)
    # Equal neighbours still cost the ranking margin: levels must be separated, not merely not reversed.
    flat = qualiclip_losses(similarities_with([0.3] * 5, [0.3] * 5), weights)
    assert flat["positive"].item() == pytest.approx(0.05) and flat["negative"].item() == pytest.approx(0.05)


def test_crops_overlap_and_small_images_are_upscaled():
    image = torch.rand(3, 100, 150)
    for seed in range(20):
        crops = overlapping_crops(image, 64, torch.Generator().manual_seed(seed))
        assert crops.shape == (2, 3, 64, 64)
    small = overlapping_crops(torch.rand(3, 40, 50), 64, torch.Generator().manual_seed(0))
    assert small.shape == (2, 3, 64, 64)


@pytest.fixture(scope="module")
def pristine_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine") / "train"
    folder.mkdir()
    for index in range(6):
        photo(96, 128, seed=index).save(folder / f"photo{index}.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder.parent


def test_batches_are_reproducible_and_count_unreadable_images(pristine_folder):
    def first_batches(workers):
        stream = load_pristine_stream(str(pristine_folder))
        batches = DegradedBatches(stream, batch_size=7, crop_size=48, max_groups=2, seed=3, num_workers=workers)
        iterator = batches.iterate()
        return [next(iterator) for _ in range(2)]

    (batch, skipped, cursor), (batch2, skipped2, cursor2) = first_batches(0)
    assert batch.shape == (6, 5, 2, 3, 48, 48) and skipped == 1 and cursor == (0, 7)
    assert skipped2 == 1 and cursor2 == (1, 7)
    assert torch.all((batch >= 0) & (batch <= 1))
    again = first_batches(2)
    assert torch.equal(again[0][0], batch) and torch.equal(again[1][0], batch2)


def test_a_cursor_resumes_the_same_sequence_of_batches(pristine_folder):
    def batches():
        stream = load_pristine_stream(str(pristine_folder)).shuffle(seed=1, buffer_size=4)
        return DegradedBatches(stream, batch_size=3, crop_size=32, max_groups=1, seed=5)

    straight = batches().iterate()
    reference = [next(straight) for _ in range(5)]  # crosses two epoch boundaries (7 images, batches of 3)
    resumed = batches().iterate(reference[1][2])
    for expected in reference[2:]:
        batch, skipped, cursor = next(resumed)
        assert cursor == expected[2] and skipped == expected[1]
        assert (batch is None and expected[0] is None) or torch.equal(batch, expected[0])


def test_degrading_on_the_device_gives_the_workers_samples_and_resumes_alike(pristine_folder):
    def batches(**options):
        stream = load_pristine_stream(str(pristine_folder)).shuffle(seed=2, buffer_size=4)
        return DegradedBatches(stream, batch_size=2, crop_size=32, max_groups=7, seed=4, **options)

    def take(iterator, count):
        return [next(iterator) for _ in range(count)]

    # These 8 samples (2 unreadable) draw 3 compositions with a codec (2 with steps after it) and 3 without.
    on_workers = take(batches().iterate(), 4)
    on_device = take(batches(degrade_device="cpu").iterate(), 2)
    resumed = take(batches(degrade_device="cpu").iterate(on_device[1][2]), 2)
    for expected, got in zip(on_workers, on_device + resumed, strict=True):
        assert got[1:] == expected[1:]
        assert (got[0] is None and expected[0] is None) or torch.equal(got[0], expected[0])


def test_process_shards_are_disjoint_and_complete(pristine_folder):
    stream = load_pristine_stream(str(pristine_folder))
    paths = [[example["image"]["path"] for example in shard_for_process(stream, rank, 2)] for rank in range(2)]
    assert not set(paths[0]) & set(paths[1])
    assert len(paths[0]) + len(paths[1]) == 7


def write_config(tmp_path: Path, pristine_folder: Path, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {
        "output_dir": str(tmp_path / "run"),
        "vision": TINY_VISION,
        "text": TINY_TEXT,
        "data_source": str(pristine_folder),
        "shuffle_buffer": 4,
        "crop_size": 48,
        "max_groups": 2,
        "num_workers": 0,
        "batch_size": 2,
        "max_steps": 3,
        "checkpoint_every": 2,
        "log_every": 1,
        **overrides,
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    return config_path


# One thread per process: on a small, busy machine, torch's default thread pool makes these tiny steps 10x slower.
# The training script runs as a module of the repository (`python -m training.train`), from any folder.
_SINGLE_THREAD = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
}


def launch(config_path: Path, *args: str, processes: int = 1) -> None:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--module", "training.train", "--config", str(config_path), *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=config_path.parent, env=_SINGLE_THREAD
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_accelerate_launch_trains_on_two_cpu_processes(pristine_folder, tmp_path):
    # Degrading "on the accelerator" (here the CPU, in the training processes) while the resume test uses workers;
    # asked for on the command line, over the configuration's choice.
    launch(write_config(tmp_path, pristine_folder, degrade_on="workers"), "--degrade-on", "accelerator", processes=2)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_3"]
    summary = json.loads((run / "final" / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_images"] >= 1
    assert summary["config"]["degrade_on"] == "accelerator"
    model = QualiCLIPModel.from_pretrained(run / "final")
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).quality_score.shape == (1,)


def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(pristine_folder, tmp_path):
    straight = write_config(tmp_path / "a", pristine_folder, output_dir=str(tmp_path / "a" / "run"), max_steps=4)
    launch(straight)
    interrupted = write_config(tmp_path / "b", pristine_folder, output_dir=str(tmp_path / "b" / "run"), max_steps=2)
    launch(interrupted)
    launch(interrupted, "--resume", "--max-steps", "4")

    def losses(run):
        rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
        return {row["step"]: (row["loss"], row["consistency"], row["positive"], row["negative"]) for row in rows}

    expected, resumed = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def test_correlation_metrics_on_a_known_monotone_relation():
    from training.evaluate import correlation_metrics

    scores = np.linspace(0.05, 0.95, 40)
    opinions = 1 + 4 / (1 + np.exp(-(scores - 0.5) * 12))  # monotone but strongly non-linear
    metrics = correlation_metrics(scores, opinions)
    assert metrics["srcc"] == pytest.approx(1.0) and metrics["krcc"] == pytest.approx(1.0)
    assert metrics["plcc"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["plcc_raw"] < metrics["plcc"] - 0.01  # the logistic mapping is what makes it linear
    reversed_metrics = correlation_metrics(scores, opinions[::-1])
    assert reversed_metrics["srcc"] == pytest.approx(-1.0)


def test_mos_evaluation_from_a_csv_and_folder(tmp_path, tiny_model_dir):
    from training.evaluate import main as evaluate

    rows = ["image_name,MOS"]
    for index in range(5):
        photo(64, 64, seed=index).save(tmp_path / f"{index}.png")
        rows.append(f"{index}.png,{index + 1}")
    rows.append("missing.png,3")
    (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
    output = tmp_path / "result.json"
    evaluate(
        ["mos", "--model", str(tiny_model_dir), "--dataset", "koniq10k", "--csv", str(tmp_path / "scores.csv"),
         "--images", str(tmp_path), "--device", "cpu", "--output", str(output)]
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["num_images"] == 6 and result["num_failed"] == 1 and "missing.png" in result["errors"][0]
    assert all(-1 <= result[key] <= 1 for key in ("srcc", "krcc", "plcc", "plcc_raw"))


def test_mos_presets_read_the_official_and_the_pyiqa_layouts(tmp_path):
    from training.evaluate import MOS_PRESETS, read_mos_csv

    official = tmp_path / "dmos.csv"
    official.write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.49\nI01_01_05.png,I01.png,1.1,0.3\n")
    pyiqa = tmp_path / "meta_info_KADID10kDataset.csv"
    pyiqa.write_text("ref_name,dist_name,dmos,std\nI01.png,I01_01_01.png,4.57,0.496\nI01.png,I01_01_05.png,1.1,0.3\n")
    for csv_path in (official, pyiqa):
        paths, opinions = read_mos_csv(csv_path, tmp_path / "images", MOS_PRESETS["kadid10k"])
        assert [p.name for p in paths] == ["I01_01_01.png", "I01_01_05.png"] and opinions == [4.57, 1.1]

    clive = tmp_path / "livec.csv"
    clive.write_text("img_name,mos,std\nt1.bmp,63.9,18.3\nt7.bmp,77.8,19.6\n100.bmp,32.5,19.1\n3.bmp,44.4,20.2\n")
    paths, opinions = read_mos_csv(clive, tmp_path, MOS_PRESETS["clive"])
    assert [p.name for p in paths] == ["100.bmp", "3.bmp"] and opinions == [32.5, 44.4]

    with pytest.raises(ValueError, match=r"livec\.csv.*'name' and 'mos_quality'"):
        read_mos_csv(clive, tmp_path, MOS_PRESETS["agiqa3k"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name,mos_quality\na.jpg,high\n")
    with pytest.raises(ValueError, match=r"bad\.csv, row 2: 'mos_quality' is not a number"):
        read_mos_csv(bad, tmp_path, MOS_PRESETS["agiqa3k"])


def test_kadid_opinions_count_as_higher_is_better_unless_told_otherwise(tmp_path, monkeypatch):
    import training.evaluate as evaluate

    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\na.png,r.png,4.5,0.1\nb.png,r.png,1.2,0.1\n")
    seen = []
    monkeypatch.setattr(evaluate, "mos_evaluation", lambda *args, **kwargs: seen.append(args[3]) or {})
    common = ["mos", "--model", "demo", "--csv", str(tmp_path / "dmos.csv"), "--images", str(tmp_path)]
    evaluate.main([*common, "--dataset", "kadid10k"])
    evaluate.main([*common, "--dataset", "kadid10k", "--lower-is-better"])
    assert seen == [True, False]


def test_an_unknown_degradation_place_is_refused_before_anything_starts(tmp_path):
    from training.train import TrainConfig, train

    with pytest.raises(ValueError, match="degrade_on must be"):
        train(TrainConfig(output_dir=str(tmp_path / "run"), degrade_on="gpu"))
    assert not (tmp_path / "run").exists()


def _train_command(config_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "--config", str(config_path), *args]


def _losses_by_step(run: Path) -> list[tuple[int, tuple[float, ...]]]:
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    return [(row["step"], (row["loss"], row["consistency"], row["positive"], row["negative"])) for row in rows]


def _logged_steps(run: Path) -> list[int]:
    log = run / "losses.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # the last one may be half-written


def test_sigkill_mid_run_then_resume_gives_the_losses_of_an_uninterrupted_run(pristine_folder, tmp_path):
    """A real crash, SIGKILL from outside, between checkpoints; then `--resume`. Single-process CPU."""
    from training.train import latest_checkpoint

    steps = 10
    small = {"crop_size": 32, "num_levels": 2, "max_groups": 1, "max_steps": steps, "checkpoint_every": 3}
    straight = write_config(tmp_path / "a", pristine_folder, output_dir=str(tmp_path / "a" / "run"), **small)
    killed = write_config(tmp_path / "b", pristine_folder, output_dir=str(tmp_path / "b" / "run"), **small)
    killed_run = tmp_path / "b" / "run"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("straight", "killed", "resumed")}  # noqa: SIM115
    try:
        reference = subprocess.Popen(
            _train_command(straight), env=_SINGLE_THREAD, stdout=logs["straight"], stderr=subprocess.STDOUT
        )
        victim = subprocess.Popen(
            _train_command(killed), env=_SINGLE_THREAD, stdout=logs["killed"], stderr=subprocess.STDOUT
        )
        # Killed once step 4 is logged: after the step-3 checkpoint, two steps before the next one.
        deadline = time.monotonic() + 300
        while 4 not in _logged_steps(killed_run):
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 4 not logged within 300 s"
            time.sleep(0.002)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        interrupted = latest_checkpoint(killed_run)
        interrupted_step = int(interrupted.name.split("_")[1])
        assert not (killed_run / "final").exists() and interrupted_step < steps, "the kill came after the end"
        # Rows were logged after the checkpoint: the resumed run computes those steps again.
        assert max(_logged_steps(killed_run)) > interrupted_step
        # What a crash while saving leaves: the staging folder of a later step, partly written. It is not picked.
        partial = killed_run / "checkpoints" / f"step_{steps}.tmp"
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"\0" * 64)

        resumed = subprocess.run(
            _train_command(killed, "--resume"), env=_SINGLE_THREAD, stdout=logs["resumed"], stderr=subprocess.STDOUT
        )
        assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        assert reference.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    finally:
        for process in (reference, victim):
            if process.poll() is None:
                process.kill()
        for log in logs.values():
            log.close()
    assert f"resumed from {interrupted} at step {interrupted_step}" in (tmp_path / "resumed.log").read_text()
    expected, got = _losses_by_step(tmp_path / "a" / "run"), _losses_by_step(killed_run)
    # Every step once (the rows logged after the checkpoint, before the kill, were replaced), and the same values.
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, steps + 1))
    for (step, values), (_, reference_values) in zip(got, expected, strict=True):
        assert values == pytest.approx(reference_values, abs=1e-6), step
    final_config = QualiCLIPModel.from_pretrained(killed_run / "final").config
    assert final_config.vision_config.embedding_size == TINY_VISION["embedding_size"]


def test_only_complete_checkpoints_are_resumed_from(tmp_path):
    from training.train import latest_checkpoint

    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    for name, complete in [("step_2", True), ("step_10", True), ("step_12.tmp", False), ("step_14", False)]:
        (checkpoints / name).mkdir(parents=True)
        if complete:
            (checkpoints / name / "trainer_state.json").write_text("{}")
    (checkpoints / "step_notes.txt").write_text("not a checkpoint")
    # step_10 beats step_2 numerically; the half-saved step_12.tmp and the stateless step_14 are ignored.
    assert latest_checkpoint(tmp_path) == checkpoints / "step_10"


def test_resuming_drops_the_log_rows_it_will_compute_again(tmp_path):
    from training.train import truncate_loss_log

    log = tmp_path / "losses.jsonl"
    log.write_text(
        "".join(json.dumps({"step": step, "loss": step / 10}) + "\n" for step in range(1, 6)) + '{"step": 6, "lo'
    )
    truncate_loss_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    truncate_loss_log(log, 0)
    assert log.read_text() == ""


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(pristine_folder, tmp_path):
    from training.train import load_config, train

    config = load_config(write_config(tmp_path, pristine_folder))
    (Path(config.output_dir) / "checkpoints" / "step_2").mkdir(parents=True)
    (Path(config.output_dir) / "checkpoints" / "step_2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds checkpoints \(step_2\): pass --resume"):
        train(config)


def test_every_setting_of_the_configuration_file_can_be_overridden_on_the_command_line(pristine_folder, tmp_path):
    from dataclasses import fields

    from training.train import TrainConfig, parse_arguments

    config_path = write_config(tmp_path, pristine_folder, time_limit_minutes=5.0, init_from="some/model")
    from_file = parse_arguments(["--config", str(config_path)])[0]
    assert from_file.max_steps == 3 and from_file.vision == TINY_VISION
    overrides = {
        "vision": ('{"depths": [2, 1, 1, 1]}', {"depths": [2, 1, 1, 1]}),
        "text": ('{"num_hidden_layers": 2}', {"num_hidden_layers": 2}),
        "loss": ('{"margin_ranking": 0.1}', {"margin_ranking": 0.1}),
        "degrade_on": ("workers", "workers"),
        "degradation_style": ("clean", "clean"),
        "lr_scheduler_type": ("cosine", "cosine"),
        "mixed_precision": ("bf16", "bf16"),
    }
    for item in fields(TrainConfig):
        current = getattr(from_file, item.name)
        if item.name in overrides:
            text, expected = overrides[item.name]
        elif isinstance(current, float):
            text, expected = str(current * 2), current * 2
        elif isinstance(current, int):
            text, expected = str(current + 5), current + 5
        else:
            text, expected = f"{current}-other", f"{current}-other"
        assert current != expected, item.name
        for option in (f"--{item.name}", f"--{item.name.replace('_', '-')}"):
            config = parse_arguments(["--config", str(config_path), option, text])[0]
            assert getattr(config, item.name) == expected, option
            others = {f.name for f in fields(TrainConfig)} - {item.name}
            assert all(getattr(config, name) == getattr(from_file, name) for name in others), option


def test_bad_settings_are_refused_with_the_setting_named(pristine_folder, tmp_path, capsys):
    from training.train import parse_arguments

    config_path = write_config(tmp_path, pristine_folder)
    for argv, message in (
        (["--degrade_on", "gpu"], "invalid choice: 'gpu'"),
        (["--learning_rate", "-1"], "learning_rate must be positive"),
        (["--max_steps", "many"], "invalid int value: 'many'"),
        (["--vision", "{not json"], "--vision"),
    ):
        with pytest.raises(SystemExit):
            parse_arguments(["--config", str(config_path), *argv])
        assert message in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("max_step: 3\n")
    with pytest.raises(SystemExit):
        parse_arguments(["--config", str(tmp_path / "typo.yaml")])
    assert "typo.yaml: unknown settings ['max_step']" in capsys.readouterr().err


def test_the_time_limit_stops_the_run_without_rewriting_its_configuration(pristine_folder, tmp_path):
    from training.train import load_config, train

    config = load_config(write_config(tmp_path, pristine_folder, max_steps=50, time_limit_minutes=0.0))
    final = train(config)
    assert config.max_steps == 50
    summary = json.loads((final / "training_summary.json").read_text())
    # The limit is checked after each step: a limit of zero stops after the first.
    assert (summary["steps"], summary["planned_steps"], summary["stopped_by_time_limit"]) == (1, 50, True)
    assert summary["config"]["max_steps"] == 50
    assert [path.name for path in (Path(config.output_dir) / "checkpoints").iterdir()] == ["step_1"]

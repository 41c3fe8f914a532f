"""Model folders: headstart writes only into its own, switches them as a whole, and refuses anything mixed, special or tampered."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, SHARED
from headstart.bundle import MODEL_FILES, read_bundle
from headstart.cli.main import app
from headstart.errors import BundleError, ConfigError
from test_bundle import rewrite

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def flowers_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model, with other classes: efficientnet_lite0 + linear head on flowers5_tiny."""
    return headstart.train(FLOWERS_TINY, cache_dir=cache_dir).save(tmp_path_factory.mktemp("models") / "flowers")


@pytest.fixture
def bundle(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def model_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in MODEL_FILES if (folder / name).is_file()}


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error:"), result.output
    return " ".join(result.output.split())


# 1. train --out never destroys the user's files


def test_train_refuses_a_folder_of_other_files_and_keeps_them_with_force(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "u"
    (out / ".checkpoint").mkdir(parents=True)
    (out / ".checkpoint" / "t.tex").write_text("x")
    message = one_line_error(["train", str(CATS_DOGS_TINY), "--out", str(out), "--cache-dir", str(cache_dir), "--no-report"])
    assert "not empty and not a headstart model" in message and "--force" in message
    assert (out / ".checkpoint" / "t.tex").read_text() == "x" and not (out / "bundle.json").exists()
    result = CliRunner().invoke(
        app, ["train", str(CATS_DOGS_TINY), "--out", str(out), "--cache-dir", str(cache_dir), "--no-report", "--force"]
    )
    assert result.exit_code == 0, result.output
    assert (out / ".checkpoint" / "t.tex").read_text() == "x"  # a linear head leaves .checkpoint alone
    assert headstart.load(out).classes == ["cats", "dogs"]


def test_another_tools_model_file_is_not_replaced_silently(tiny_model: headstart.Model, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"another tool's weights")
    with pytest.raises(BundleError, match="not empty and not a headstart model"):
        tiny_model.save(out)
    assert (out / "model.safetensors").read_bytes() == b"another tool's weights"


def test_saving_over_a_model_keeps_the_users_files_and_drops_leftovers(bundle: Path, tiny_model: headstart.Model) -> None:
    (bundle / "notes.txt").write_text("mine")
    (bundle / "plots").mkdir()
    (bundle / "plots" / "a.png").write_bytes(b"png")
    (bundle / ".model.safetensors.0123456789ab.tmp").write_bytes(b"half-written")  # left by a killed write
    stale = bundle.with_name(".model.headstart-abcdef012345")  # a staging folder left by a killed save
    stale.mkdir()
    tiny_model.save(bundle)
    assert (bundle / "notes.txt").read_text() == "mine" and (bundle / "plots" / "a.png").read_bytes() == b"png"
    assert not (bundle / ".model.safetensors.0123456789ab.tmp").exists() and not stale.exists()
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["model"]


def test_a_finished_finetune_removes_only_its_checkpoint_files(tmp_path: Path) -> None:
    from headstart.checkpoints import remove_checkpoint

    folder = tmp_path / ".checkpoint"
    folder.mkdir()
    for name in ("checkpoint.json", "checkpoint-3.safetensors", ".checkpoint.json.0123456789ab.tmp", "mine.txt"):
        (folder / name).write_text("x")
    remove_checkpoint(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]
    (folder / "mine.txt").unlink()
    remove_checkpoint(folder)
    assert not folder.exists()


# 2. a model folder switches as a whole; a mixed one is refused


def test_a_folder_mixing_two_models_is_refused(bundle: Path, flowers_dir: Path) -> None:
    shutil.copy(flowers_dir / "model.safetensors", bundle / "model.safetensors")
    image = next(CATS_DOGS_TINY.rglob("*.jpg"))
    message = one_line_error(["predict", str(bundle), str(image)])
    assert "model.safetensors: differs from the file bundle.json records" in message and "mixes files of different saves" in message


# The child writes a saved model's files through the same folder switch `save_bundle` ends with (no torch import, so it starts fast).
SAVE = """
import os, sys, time
from pathlib import Path
from headstart.files import atomic_write_folder
MODEL_FILES = sys.argv[3].split(",")
files = {name: (Path(sys.argv[1]) / name).read_bytes() for name in MODEL_FILES if (Path(sys.argv[1]) / name).is_file()}
real_fsync = os.fsync
def slow_fsync(fd):
    print("fsync", flush=True)
    time.sleep(0.1)
    real_fsync(fd)
os.fsync = slow_fsync
atomic_write_folder(Path(sys.argv[2]), files, MODEL_FILES)
print("done", flush=True)
"""


@pytest.mark.kill
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_save_killed_at_any_point_leaves_the_old_model_or_the_new_one(
    kill: signal.Signals, bundle: Path, flowers_dir: Path, tmp_path: Path
) -> None:
    """Kill a save over an existing model after each of its fsyncs (each slowed down) while a reader loads it in a loop."""
    (bundle / "notes.txt").write_text("mine")
    old, new = model_files(bundle), model_files(flowers_dir)
    target = tmp_path / "target"
    outcomes = []
    for k in range(1, 20):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(bundle, target)
        stop, seen, errors = threading.Event(), set(), []

        def read_in_a_loop(stop: threading.Event = stop, seen: set[str] = seen, errors: list[Exception] = errors) -> None:
            while not stop.is_set():
                try:
                    seen.add(",".join(read_bundle(target, load_weights=False).config.classes))
                except Exception as e:
                    errors.append(e)

        reader = threading.Thread(target=read_in_a_loop)
        child = subprocess.Popen(
            [sys.executable, "-c", SAVE, str(flowers_dir), str(target), ",".join(MODEL_FILES)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Ctrl-C's default, even when pytest runs in the background
        )
        assert child.stdout is not None
        reader.start()
        lines = []
        while len(lines) < k and (line := child.stdout.readline()):
            lines.append(line.strip())
        finished = "done" in lines
        if not finished:
            child.send_signal(kill)
        child.wait(timeout=60)
        child.stdout.close()
        stop.set()
        reader.join()
        assert not errors, errors[:1]  # a reader never saw a mixed, half-written or missing model
        assert seen <= {"cats,dogs", "daisy,dandelion,roses,sunflowers,tulips"}
        files = model_files(target)
        assert files in (old, new), f"after fsync {k}: a mix of the old and the new model"
        assert (target / "notes.txt").read_text() == "mine"
        read_bundle(target)  # validates every file, weights included
        if kill == signal.SIGINT:  # Ctrl-C cleans up after itself; kill -9 leaves a staging folder for the next save
            assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".target")) == []
        outcomes.append("new" if files == new else "old")
        if finished:
            break
    assert "old" in outcomes and "new" in outcomes, outcomes  # the kills landed before and after the switch
    assert headstart.load(target).classes


# 6. special files, huge files and paths outside the folder


@pytest.mark.subprocess
def test_info_on_a_model_whose_metrics_is_a_fifo_does_not_hang(bundle: Path) -> None:
    (bundle / "metrics.json").unlink()
    os.mkfifo(bundle / "metrics.json")
    result = subprocess.run([sys.executable, "-m", "headstart.cli.main", "info", str(bundle)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "metrics.json: not a regular file: a FIFO" in result.stderr, result.stderr


def test_a_huge_sparse_weights_file_is_refused_without_reading_it(bundle: Path) -> None:
    path = bundle / "model.safetensors"
    with path.open("r+b") as f:
        f.truncate(1 << 30)  # 1 GB, sparse: under the size limit, but not the size the manifest records
    with pytest.raises(BundleError, match="differs from the file bundle.json records"):
        headstart.load(bundle)
    with path.open("r+b") as f:
        f.truncate(100 << 30)  # 100 GB: over the limit whatever the manifest says
    assert "model.safetensors: too large: 107,374,182,400 bytes" in one_line_error(["predict", str(bundle), str(path)])


# Runs `headstart ARGS...` in this process, then prints its exit code and its peak memory in bytes (VmHWM: ru_maxrss
# would count the forked pytest process, as Linux keeps it across exec).
PEAK = """
import re, runpy, sys
sys.argv = ["headstart", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("headstart.cli.main", run_name="__main__")
except SystemExit as e:
    code = e.code
print(code, int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_weights_larger_than_the_head_takes_are_never_read(bundle: Path) -> None:
    """A 1.5 GB model.safetensors (sparse) declaring one more tensor, its record in bundle.json updated to match: `info`
    reads its header alone, and `predict` refuses it from its size; both read it whole before (a peak past 1.5 GB)."""
    from safetensors import safe_open

    path = bundle / "model.safetensors"
    with safe_open(path, "np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle is not a mapping)
    header, data, end = {}, b"", 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [end, end + tensor.nbytes]}
        data += tensor.astype(np.float32).tobytes()
        end += tensor.nbytes
    header["head.extra"] = {"dtype": "F32", "shape": [(3 << 29) // 4], "data_offsets": [end, end + (3 << 29)]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
        f.truncate(8 + len(raw) + end + (3 << 29))  # 1.5 GB more, sparse
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    config = json.loads((bundle / "bundle.json").read_text())
    config["files"]["model.safetensors"] = {"size": path.stat().st_size, "sha256": digest}
    (bundle / "bundle.json").write_text(json.dumps(config))
    for args, code in ((["info", bundle], 0), (["predict", bundle, next(CATS_DOGS_TINY.rglob("*.jpg"))], 1)):
        done = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True, timeout=300)
        exit_code, peak = map(int, done.stdout.split()[-2:])
        assert exit_code == code, done.stdout + done.stderr
        assert peak < 600 << 20, f"headstart {args[0]}: peak {peak / 2**20:.0f} MB"
    assert "that the tensors bundle.json describes take at most" in done.stderr, done.stderr


@pytest.mark.parametrize("tensors", ["/etc/passwd", "../model.safetensors", "checkpoint-1.safetensors/../../x"])
def test_resume_reads_only_checkpoint_files_inside_the_checkpoint_folder(tensors: str, tmp_path: Path) -> None:
    from headstart.checkpoints import load_checkpoint

    (tmp_path / "checkpoint.json").write_text(
        json.dumps({"fingerprint": "f", "tensors": tensors, "history": [], "best_loss": 1.0, "best_epoch": 0, "optimizer_groups": []})
    )
    with pytest.raises(ConfigError, match="checkpoint .* is damaged"):
        load_checkpoint(tmp_path, "f")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"tensors": 5}', "[" * 100_000 + "]" * 100_000])
def test_a_damaged_checkpoint_json_is_one_clear_error(text: str, tmp_path: Path) -> None:
    from headstart.checkpoints import load_checkpoint

    (tmp_path / "checkpoint.json").write_text(text)
    with pytest.raises(ConfigError, match="damaged; run without --resume"):
        load_checkpoint(tmp_path, "f")


# 9. tampered bundles: validated before anything is allocated


def edit_config(bundle: Path, text: str) -> None:
    (bundle / "bundle.json").write_text(text)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backbones.0.data_config.input_size", "Infinity", "not valid JSON"),
        ("backbones.0.data_config.input_size", "1e12", r"field 'backbones\[0\].data_config'"),
        ("backbones.0.data_config.std", "[0, 1, 1]", r"field 'backbones\[0\].data_config'"),
        ("head.hidden", "NaN", "not valid JSON"),
        ("head.hidden", '"abc"', "hidden must be an integer"),
        ("head.hidden", "1e12", "hidden must be an integer"),
        ("head.hidden", "500000", "hidden must be an integer from 1 to 65536"),
        ("head.hidden", "4096", r"1.weight: \(2, 1280\) instead of \(4096, 1280\)"),  # mlp shapes checked before allocation
        ("head.random_state", '"0"', "head: random_state must be an integer from 0 to 4294967295 or None"),
        ("head.class_weight", "[1, 2]", "head: class_weight must be None, 'balanced' or a dict"),
        ("head.class_weight", '{"cats": 0, "dogs": 0}', "head: class_weight must be None, 'balanced' or a dict"),
        ("head.class_weight", '{"cats": 1e308}', r"a number above 0, at most 1e\+06\), got \{'cats': 1e\+308\}"),
        ("head.class_weight", '{"zebra": 2.0}', r"head: class_weight names classes the model does not have: \['zebra'\]"),
        ("head.C", "1" + "0" * 4000, r"C must be a finite number above 0, got 10{50,}\.\.\.\. The file is damaged"),
        ("head.momentum", "0.9", r"head: Unknown head parameters \['momentum'\]"),
        ("summary", "[1, 2]", "field 'summary' must be an object"),
        ("summary.val_images", '[["a.jpg"]]', "field 'summary.val_images'"),
        ("summary.auto", '{"reason": "no choice named"}', "field 'summary.auto'"),
        ("summary.seconds", "1" + "0" * 400, "field 'summary.seconds'"),  # an int too large for a float
        ("files", '{"model.safetensors": {"size": 1, "sha256": "00"}}', "field 'files'"),
        ("files", '{"../../etc/passwd": {"size": 1, "sha256": "00"}, "model.safetensors": {}, "metrics.json": {}}', "field 'files"),
    ],
)
def test_tampered_fields_are_refused_in_one_line(bundle: Path, field: str, value: str, message: str) -> None:
    config = json.loads((bundle / "bundle.json").read_text())
    *parents, leaf = field.split(".")
    target = config
    for name in parents:
        target = target[int(name)] if isinstance(target, list) else target[name]
    target[leaf] = "@@"
    if field == "head.hidden":
        config["head"]["head"] = "mlp"
    edit_config(bundle, json.dumps(config).replace('"@@"', value))
    with pytest.raises(BundleError, match=message):
        headstart.load(bundle)
    assert re.search(message, one_line_error(["predict", str(bundle), str(next(CATS_DOGS_TINY.rglob("*.jpg")))]))


@pytest.mark.parametrize(
    ("field", "recorded"),
    [
        ("val_images", "/proc/self/environ"),
        ("val_images", "/dev/zero"),
        ("test_images", "/sys/kernel/notes.jpg"),
        ("test_images", "/dev/../dev/stdin.jpg"),
        ("val_images", "//proc/self/fd/0.png"),
        ("val_images", "cat\x00.jpg"),
        ("test_images", "FIFO"),
    ],
)
def test_recorded_photos_that_are_not_image_files_are_refused_unopened(
    bundle: Path, field: str, recorded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bundle.json is not hashed: its recorded photos, which `report` and `export` read again, are refused unless they name
    image files outside /proc, /sys and /dev, and none is opened (they were read, each skipped or not, before)."""
    import headstart.data

    fifo = tmp_path / "queue"
    os.mkfifo(fifo)
    path = str(fifo) if recorded == "FIFO" else recorded
    config = json.loads((bundle / "bundle.json").read_text())
    config["summary"][field].append([path, "cats"])
    edit_config(bundle, json.dumps(config))
    opened: list[str] = []
    real_open = headstart.data.open_regular

    def spy(file: Path, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(headstart.data, "open_regular", spy)
    with pytest.raises(BundleError, match=f"field 'summary.{field}' must be a list of \\[photo path, label\\] pairs"):
        headstart.load(bundle)
    assert f"summary.{field}" in one_line_error(["report", str(bundle)])
    assert path not in opened


def test_deeply_nested_json_is_refused(bundle: Path) -> None:
    edit_config(bundle, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply"):
        headstart.load(bundle)


@pytest.mark.parametrize(("name", "data", "message"), [
    ("history.json", b'{"epoch": 1}', "field '(top level)' must be a JSON list"),
    ("history.json", b"[1, 2]", "must be a list of objects"),
    ("history.json", b'[{"loss": "abc"}]', "a list of objects of numbers"),
    ("metrics.json", b"[]", "must be a JSON object"),
    ("metrics.json", b'{"accuracy": "high"}', "field 'accuracy' must be a number"),
])  # fmt: skip
def test_malformed_history_and_metrics_are_refused(bundle: Path, name: str, data: bytes, message: str) -> None:
    rewrite(bundle, name, data)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        headstart.load(bundle)
    assert message in one_line_error(["info", str(bundle)])


# Models saved by earlier versions


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_a_model_saved_by_an_earlier_format_still_loads_and_predicts_the_same(version: int) -> None:
    folder = FIXTURES / f"model_v{version}"
    expected = json.loads((FIXTURES / f"model_v{version}_expected.json").read_text())
    model = headstart.load(folder)
    proba = model.predict_proba([SHARED / p for p in expected["images"]])
    np.testing.assert_allclose(proba, expected["proba"], atol=1e-5)
    assert model.classes == ["cats", "dogs"] and (model.summary.history or version >= 4)  # format 4's refit L-BFGS head has no epochs


def test_a_format_5_head_seed_becomes_random_state_and_resaves_in_the_current_format(tmp_path: Path) -> None:
    """model_v5: an efficientnet_lite0+lite1 ensemble with an MLP head (width 16, seed 3), saved before the head became an estimator."""
    from sklearn.base import clone

    from headstart.classifier import HeadClassifier

    expected = json.loads((FIXTURES / "model_v5_expected.json").read_text())
    images = [SHARED / p for p in expected["images"]]
    model = headstart.load(FIXTURES / "model_v5")
    assert model.backbone_name == "efficientnet_lite0+efficientnet_lite1" and (model.head.kind, model.head.n_features) == ("mlp", 2560)
    assert model.head.params["random_state"] == 3 and "seed" not in model.head.params
    np.testing.assert_allclose([p.unknown_score for p in model.predict(images)], expected["unknown_scores"], atol=1e-5)
    resaved = headstart.load(model.save(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "bundle.json").read_text())
    assert config["format_version"] == 7 and config["head"]["random_state"] == 3 and "seed" not in config["head"]
    np.testing.assert_allclose(resaved.predict_proba(images), expected["proba"], atol=1e-5)
    estimator = clone(HeadClassifier(**resaved.head.params))  # the saved settings make a valid estimator to refit with
    assert (estimator.head, estimator.hidden, estimator.random_state) == ("mlp", 16, 3)

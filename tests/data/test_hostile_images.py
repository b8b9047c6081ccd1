"""Hostile and odd images (tests/hostile_images.py) in the decoder, in ``wsdan data prepare`` and in
the Ray Data pipeline: each converted one decodes to the pixels it means, each refused one is
skipped and counted by name, none is fatal, and a decompression bomb is refused from its header
with the memory of the process unchanged (the served model: tests/tracking/test_serving_hostile.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from tests import hostile_images as hostile
from wsdan.data.decode import (
    MAX_IMAGE_PIXELS,
    DecodeError,
    check_size,
    decode,
    decode_batch,
    decode_rgb,
)
from wsdan.data.shards import probe_image

S = 32  # decoded side: tiny, the cases are about reading, not resizing quality
CASES = {c.name: c for c in hostile.cases()}
# PIL warns above its own MAX_IMAGE_PIXELS before we refuse (bomb_10000).
pil_bomb_warning = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# -- decoder: every case, every entry point ---------------------------------------------------


@pil_bomb_warning
@pytest.mark.parametrize("name", list(CASES))
def test_decode_matrix(name: str) -> None:
    """decode (pipeline and serving), decode_rgb (serving's full-size decode) and probe_image
    (prepare's check) agree on each case: converted to the right pixels, or DecodeError."""
    case = CASES[name]
    if case.converted:
        d = decode(case.data, S)
        assert (d.width, d.height) == case.size  # the stored size (EXIF orientation ignored)
        case.assert_matches(d.image, S)
        full = decode_rgb(case.data)
        assert full.shape == (case.size[1], case.size[0], 3) and full.dtype == np.uint8
        assert np.abs(full.astype(np.float32) - case.reference).mean() <= case.tolerance
        assert probe_image(case.data) == case.size
        return
    for read in (lambda b: decode(b, S), decode_rgb, probe_image):
        with pytest.raises(DecodeError) as info:
            read(case.data)
        case.assert_reason(str(info.value))


@pil_bomb_warning
def test_decode_batch_skips_exactly_the_refused() -> None:
    cases = hostile.cases()
    table = pa.table({"image": pa.array([c.data for c in cases], pa.binary()),
                      "label": list(range(len(cases))), "image_id": [c.name for c in cases]})
    out = decode_batch(table, S)
    assert [i for i, _ in out.skipped] == [c.name for c in hostile.refused()]
    for (_, reason), case in zip(out.skipped, hostile.refused()):
        case.assert_reason(reason)
    assert list(out.columns["image_id"]) == [c.name for c in hostile.converted()]
    assert out.columns["label"].tolist() == [i for i, c in enumerate(cases) if c.converted]
    for image, case in zip(out.columns["image"], hostile.converted()):
        case.assert_matches(image, S)


def test_bomb_refused_from_header_whatever_pils_limit(monkeypatch) -> None:
    """The limit is the decoder's own: with PIL's disabled (None) a bomb is still refused, from
    the header: no pixel is decoded (ImageFile.load never runs). With PIL's lowered below ours,
    PIL refuses first and that is a DecodeError too."""
    loads = []
    real_load = ImageFile.ImageFile.load

    def load(im):
        loads.append(im.size)
        return real_load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    for side in (50000, 10000, 8193):  # 8193²: just over 2**26 = 8192²
        for read in (lambda b: decode(b, S), decode_rgb, probe_image):
            with pytest.raises(DecodeError) as info:
                read(hostile.bomb_png(side, side))
            message = str(info.value)
            assert f"image of {side}×{side} pixels" in message, message
            assert "refused from its header before decoding" in message
            assert f"{MAX_IMAGE_PIXELS:,}" in message
    assert loads == []
    assert decode(CASES["one_by_one"].data, S).image.shape == (S, S, 3)
    assert loads == [(1, 1)]  # the hook sees a decode
    check_size(8192, 8192)  # 2**26 pixels: at the limit, allowed
    with pytest.raises(DecodeError, match="8193×8192"):
        check_size(8193, 8192)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above 200
    with pytest.raises(DecodeError, match="PIL's Image.MAX_IMAGE_PIXELS"):
        decode(CASES["photo_control"].data, S)
    assert decode(CASES["one_by_one"].data, S).image.shape == (S, S, 3)


_MEMORY_PROBE = """
import io, json, re, sys
from PIL import Image
from wsdan.data.decode import DecodeError, decode, decode_rgb
from wsdan.data.shards import probe_image

Image.MAX_IMAGE_PIXELS = None  # PIL's own check off: only the decoder's limit stands


def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))


def peak_growth(fn):
    # The peak RSS while fn runs, over the RSS before: VmHWM reset by clear_refs (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    fn()
    return (kib("VmHWM") - before) * 1024


bombs = [open(p, "rb").read() for p in sys.argv[1:-1]]
control = open(sys.argv[-1], "rb").read()
warm = io.BytesIO()
Image.new("L", (64, 64)).save(warm, format="PNG")
decode(warm.getvalue(), 8)  # the PNG plugin and its buffers loaded before measuring
refused = []


def read_bombs():
    for data in bombs:
        for _ in range(3):
            for read in (lambda b: decode(b, 8), decode_rgb, probe_image):
                try:
                    read(data)
                except DecodeError:
                    refused.append(1)


grown = peak_growth(read_bombs)
control_grown = peak_growth(lambda: decode(control, 8))  # under the limit: decoded
print(json.dumps({"refused": len(refused), "bombs": grown, "control": control_grown}))
"""


def test_bomb_decoding_memory_stays_small(tmp_path) -> None:
    """In a fresh process with PIL's own limit off: decoding the bombs (2.5 G and 100 M pixels,
    ×3 RGB bytes if decoded) 9 times each grows the peak RSS by under 16 MiB; decoding one
    16 M-pixel image under the limit grows it by over 40 MiB (so the measure can see one)."""
    paths = []
    for name in ("bomb_50000", "bomb_10000"):
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(CASES[name].data)
    paths.append(tmp_path / "control.png")
    paths[-1].write_bytes(hostile.bomb_png(4000, 4000))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *map(str, paths)], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["refused"] == 2 * 3 * 3
    assert got["bombs"] < 16 * 2**20, got
    assert got["control"] > 40 * 2**20, got


# -- prepare + Ray Data pipeline -------------------------------------------------------------


BUCKET = "wsdan-hostile-images"
R = 40  # resize_size of the pipeline


def _consume(ds) -> dict[str, np.ndarray]:
    """image_id -> decoded 3×R×R image, over one pass of ``ds``."""
    out = {}
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        for image_id, image in zip(batch["image_id"], batch["image"]):
            assert str(image_id) not in out, f"{image_id} twice in one pass"
            out[str(image_id)] = image
    return out


def _skips(root: str, split: str, expected: int) -> dict:
    """The pipeline's skip report of ``root#split`` once it holds ``expected`` images (the
    decode tasks send it without waiting)."""
    from wsdan.data.pipeline import skip_report

    key = f"{root.rstrip('/')}#{split}"
    deadline = time.monotonic() + 30
    while (report := skip_report(root, split).get(key, {})).get("images", 0) < expected:
        assert time.monotonic() < deadline, skip_report()
        time.sleep(0.2)
    return report


@pytest.mark.slow
@pil_bomb_warning
def test_prepare_and_pipeline_skip_and_count_by_name(tmp_path, s3_server, s3_env, ray_cluster,
                                                     capsys) -> None:
    """``wsdan data prepare --format folder`` of the whole matrix into S3: every converted image
    stored (with its stored size), every refused one skipped, listed in the manifest and the
    printed summary by name and reason. One pass of the pipeline over the shards: the converted
    images with the right pixels, nothing skipped. One pass of the raw-folder pipeline over
    the same files: the converted images again, the refused ones skipped and counted by name."""
    from jobs.prepare_data import get_args_parser, main
    from wsdan.config import DataConfig
    from wsdan.data.pipeline import build_dataset, build_folder_dataset, skipped_images

    src = tmp_path / "src"
    files = hostile.write_folder(src)
    good = {rel: c for rel, c in files.items() if c.converted}
    bad = {rel: c for rel, c in files.items() if not c.converted}
    s3_server.ensure_bucket(BUCKET)
    root = f"s3://{BUCKET}/matrix"
    manifest = main(get_args_parser().parse_args(
        ["--format", "folder", "--src", str(src), "--dest", root, "--val-fraction", "0",
         "--no-progress"]))
    printed = capsys.readouterr().out
    assert manifest["counts"] == {"train": len(good), "val": 0, "test": 0}
    assert [s["image_id"] for s in manifest["skipped"]] == sorted(bad)
    for s in manifest["skipped"]:
        assert s["path"] == s["image_id"], s
        bad[s["image_id"]].assert_reason(s["reason"])
    assert f"skipped (undecodable): {len(bad)}" in printed, printed
    assert all(rel in printed for rel in bad), printed

    cfg = DataConfig(image_size=32, resize_size=R)
    ds = build_dataset(root, "train", cfg=cfg, train=False)
    images = _consume(ds)
    assert sorted(images) == sorted(good)
    for rel, image in images.items():
        good[rel].assert_matches(image, R)
    assert skipped_images(root, "train") == 0

    folder, classes = build_folder_dataset(str(src), "train", cfg=cfg, train=False,
                                           val_fraction=0.0)
    assert classes == list(hostile.CLASSES)
    images = _consume(folder)
    assert sorted(images) == sorted(good)
    for rel, image in images.items():
        good[rel].assert_matches(image, R)
    report = _skips(str(src), "train", len(bad))
    assert report["images"] == len(bad) and sorted(report["examples"]) == sorted(bad)
    for rel, reason in report["examples"].items():
        bad[rel].assert_reason(reason)

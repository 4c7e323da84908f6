"""Images and manifests under hostile inputs (issue 17): bad files are not packed, bombs are skipped
and counted, manifest paths stay inside their root."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image
from stage2_helpers import run_cfg, write_scene_manifest

from llm2clip.config import parse_config
from llm2clip.data.images import load_manifest
from llm2clip.data.shards import index_shard, write_shards
from llm2clip.errors import InputError
from llm2clip.fileio import image_errors, open_image
from llm2clip.train.config import ManifestSource

LIMIT = 64 * 64  # PIL's pixel limit, lowered so that a "bomb" is small to make


@pytest.fixture()
def low_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


BOMB_SIDE = 80  # 6,400 pixels: over the limit, under twice it, where PIL alone only warns and decodes


def _bad_images(folder) -> dict[str, bytes]:
    png = _png(24)
    return {"empty.jpg": b"", "text.jpg": b"this is not an image\n", "truncated.png": png[: len(png) // 2],
            "bomb.png": _png(BOMB_SIDE)}


def _manifest(folder, names) -> object:
    rows = [{"image": n, "captions": [{"id": f"c{i}", "kind": "short", "text": f"picture {i}"}]}
            for i, n in enumerate(names)]
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ 7: shards decode
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_shards_leave_out_what_does_not_decode_and_say_why(tmp_path, low_pixel_limit):
    img = tmp_path / "images"
    img.mkdir()
    bad = _bad_images(img)
    for name, data in bad.items():
        (img / name).write_bytes(data)
    for i in range(3):
        (img / f"good{i}.png").write_bytes(_png(20))
    names = ["good0.png", *bad, "good1.png", "missing.png", "good2.png"]
    out = write_shards(load_manifest(_manifest(img, names)), tmp_path / "shards", per_shard=4, progress=False)
    assert out["samples"] == 3 and out["left_out"] == 5
    why = {e["image"].rsplit("/", 1)[-1]: e["why"] for e in out["left_out_images"]}
    assert set(why) == {*bad, "missing.png"}
    assert "UnidentifiedImageError" in why["empty.jpg"] and "UnidentifiedImageError" in why["text.jpg"]
    assert "truncated" in why["truncated.png"] or "Error" in why["truncated.png"]
    assert "DecompressionBombError" in why["bomb.png"] and why["missing.png"] == "missing file"
    listed = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert listed["left_out"] == 5 and listed["left_out_images"] == out["left_out_images"]
    packed = [n for p in sorted((tmp_path / "shards").glob("*.tar")) for _, m in index_shard(p) for n in m]
    assert packed.count("png") == 3


def test_a_resumed_packing_still_says_why_each_image_was_left_out(tmp_path):
    from llm2clip.data.images import load_image_file

    img = tmp_path / "images"
    img.mkdir()
    for i in range(4):
        (img / f"im{i}.png").write_bytes(_png(12) if i != 1 else b"")
    records = load_manifest(_manifest(img, [f"im{i}.png" for i in range(4)]))

    def dies_on_im3(path):
        if path.endswith("im3.png"):
            raise KeyboardInterrupt
        return load_image_file(path)

    with pytest.raises(KeyboardInterrupt):  # killed after the first shard (im0, im1) was written
        write_shards(records, tmp_path / "shards", per_shard=2, load_image=dies_on_im3, progress=False)
    out = write_shards(records, tmp_path / "shards", per_shard=2, load_image=load_image_file, progress=False)
    assert out["samples"] == 3 and [e["image"].rsplit("/", 1)[-1] for e in out["left_out_images"]] == ["im1.png"]
    assert "UnidentifiedImageError" in out["left_out_images"][0]["why"]


# ------------------------------------------------------------------------------ 8: bombs
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_open_image_refuses_an_image_over_the_pixel_limit(low_pixel_limit):
    with pytest.raises(Image.DecompressionBombError, match="exceeds the limit"):
        open_image(_png(BOMB_SIDE))
    assert open_image(_png(60)).size == (60, 60)  # under the limit


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_a_bomb_warning_raised_as_an_error_is_a_bad_image(low_pixel_limit):
    with pytest.raises(image_errors()):
        open_image(_png(BOMB_SIDE))


def _fit_over(tmp_path, src):
    from llm2clip.train.loop import fit

    over = dict(data__train=src, data__val=None, data__caption_kinds={"short": 1.0}, train__steps=2,
                data__features={"encoder": {"kind": "bow", "dim": 24}}, data__max_bad_fraction=0.5)
    return fit(run_cfg(tmp_path / "run", **over), progress=False)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_training_from_a_manifest_skips_and_counts_a_bomb(tmp_path, low_pixel_limit):
    manifest = write_scene_manifest(tmp_path / "images", 16)
    (tmp_path / "images" / "scene0003.png").write_bytes(_png(BOMB_SIDE))
    last = _fit_over(tmp_path, {"kind": "manifest", "path": str(manifest)})
    assert last["step"] == 2 and last["skipped_images"] >= 1


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_training_from_shards_skips_and_counts_a_bomb(tmp_path, low_pixel_limit):
    """A shard written by another tool (webdataset's layout) holding a bomb."""
    manifest = write_scene_manifest(tmp_path / "images", 16)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, row in enumerate(rows):
            data = _png(BOMB_SIDE) if i == 3 else (tmp_path / "images" / row["image"]).read_bytes()
            for name, blob in ((f"{i:09d}.png", data), (f"{i:09d}.json", json.dumps(row).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(blob)
                tf.addfile(ti, io.BytesIO(blob))
    last = _fit_over(tmp_path, {"kind": "webdataset", "shards": str(tmp_path / "shards")})
    assert last["step"] == 2 and last["skipped_images"] >= 1


# ------------------------------------------------------------------------------ 9: paths
UP2 = ".." + "/.." + "/"  # two folders up (spelt apart: the repository's own test refuses such paths in files)


@pytest.mark.parametrize("name", ["../outside.png", UP2 + "etc/passwd", "sub/" + UP2 + "outside.png"])
def test_a_relative_path_out_of_the_image_root_is_refused_naming_the_row(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(_png(8))
    manifest = _manifest(root, ["fine.png", name])
    with pytest.raises(InputError, match=r"m.jsonl:2: image path .* leads outside the image root"):
        load_manifest(manifest)
    csv = root / "m.csv"
    csv.write_text(f"image,caption_id,kind\nfine.png,a,short\n{name},b,short\n")
    with pytest.raises(InputError, match=r"m.csv:3: image path"):
        load_manifest(csv)


def test_paths_inside_the_root_are_kept(tmp_path):
    recs = load_manifest(_manifest(tmp_path, ["a.png", "sub/../b.png", "sub/c.png"]))
    assert [r.image for r in recs] == [str(tmp_path / n) for n in ("a.png", "sub/../b.png", "sub/c.png")]


def test_absolute_paths_only_when_allowed(tmp_path):
    target = str(tmp_path / "elsewhere" / "x.png")
    manifest = _manifest(tmp_path / "", ["a.png", target])
    with pytest.raises(InputError, match=r"m.jsonl:2: image path .* is absolute.*allow_absolute_paths: true"):
        load_manifest(manifest)
    assert load_manifest(manifest, allow_absolute_paths=True)[1].image == target
    src = parse_config({"kind": "manifest", "path": "m.jsonl", "allow_absolute_paths": True}, ManifestSource)
    assert src.allow_absolute_paths is True
    assert parse_config({"kind": "manifest", "path": "m.jsonl"}, ManifestSource).allow_absolute_paths is False


def test_training_refuses_a_manifest_row_outside_the_root(tmp_path):
    manifest = write_scene_manifest(tmp_path / "images", 16)
    rows = manifest.read_text().splitlines()
    row = json.loads(rows[5])
    row["image"] = "../outside.png"
    rows[5] = json.dumps(row)
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"manifest.jsonl:6: image path '../outside.png' leads outside"):
        _fit_over(tmp_path, {"kind": "manifest", "path": str(manifest)})


def test_training_takes_absolute_manifest_rows_when_the_config_allows_them(tmp_path):
    manifest = write_scene_manifest(tmp_path / "images", 16)
    rows = [json.loads(r) for r in manifest.read_text().splitlines()]
    for r in rows:
        r["image"] = str((tmp_path / "images" / r["image"]).absolute())
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="is absolute"):
        _fit_over(tmp_path / "refused", {"kind": "manifest", "path": str(manifest)})
    last = _fit_over(tmp_path / "allowed", {"kind": "manifest", "path": str(manifest), "allow_absolute_paths": True})
    assert last["skipped_images"] == 0


def test_shards_command_prints_what_it_left_out_and_takes_absolute_paths_only_when_allowed(tmp_path, capsys):
    from llm2clip.cli import main

    img = tmp_path / "images"
    img.mkdir()
    (img / "ok.png").write_bytes(_png(24))
    (img / "text.jpg").write_bytes(b"this is not an image\n")
    manifest = _manifest(img, ["ok.png", "text.jpg", str((img / "ok.png").absolute())])
    assert main(["shards", str(manifest), "--out", str(tmp_path / "s1")]) == 2  # the absolute row is refused
    assert "m.jsonl:3" in capsys.readouterr().err
    assert main(["shards", str(manifest), "--out", str(tmp_path / "s2"), "--allow-absolute-paths"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 2 and out["left_out"] == 1
    (left,) = out["left_out_images"]
    assert left["image"].endswith("text.jpg") and left["why"]

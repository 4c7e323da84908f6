"""Benchmark loaders on tiny fixtures in each published format, bad input, and the report files."""

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.errors import InputError
from llm2clip.eval import benchmarks as B
from llm2clip.eval import report as REP
from llm2clip.eval.loaders.long_captions import json_array_head
from llm2clip.eval.retrieval import evaluate_retrieval
from llm2clip.eval.zeroshot import evaluate_zeroshot

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20),
          "white": (245, 245, 245), "black": (10, 10, 10), "purple": (140, 20, 160), "orange": (240, 140, 10)}
NAMES = list(COLORS)


def _img(path: Path, color: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLORS[color]).save(path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ColorModel:
    """Images -> mean colour; texts -> the colour they name. Retrieval on colour fixtures is perfect."""

    def encode_image(self, images):
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) / 255 - 0.5 for im in images]))

    def encode_text(self, texts):
        out = []
        for t in texts:
            name = next(c for c in NAMES if c in t)
            out.append(torch.tensor(COLORS[name], dtype=torch.float32) / 255 - 0.5)
        return torch.stack(out)

    def identity(self):
        return {"name": "color-model", "kind": "test"}


# --- fixtures in each format ------------------------------------------------------------------


def make_karpathy(root: Path, counts, name="flickr30k_test.json", subdir="flickr30k-images") -> Path:
    data = []
    for i, n in enumerate(counts):
        color = NAMES[i]
        rel = f"{subdir}/{1000 + i}.png"
        _img(root / rel, color)
        data.append({"image": rel, "caption": [f"a {color} square, view {j}" for j in range(n)]})
    ann = root / name
    ann.write_text(json.dumps(data))
    return ann


def test_flickr30k_loads_with_hash_and_index(tmp_path):
    ann = make_karpathy(tmp_path, [5, 5, 5])
    b = B.load_benchmark("flickr30k", tmp_path)
    assert len(b) == 3 and len(b.captions) == 15
    assert b.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert b.files == {"flickr30k_test.json": _sha(ann)}
    assert b.images[1].endswith("flickr30k-images/1001.png")
    ident = b.identity()
    assert ident["captions"] == 15 and ident["skipped"] == 0 and ident["format"] == "karpathy-json"


def test_annotation_in_annotations_folder_and_image_root(tmp_path):
    imgs = tmp_path / "imgs"
    make_karpathy(imgs, [5, 6, 7], name="coco_karpathy_test.json", subdir="val2014")
    (tmp_path / "annotations").mkdir()
    (imgs / "coco_karpathy_test.json").rename(tmp_path / "annotations" / "coco_karpathy_test.json")
    b = B.load_benchmark("coco", tmp_path, image_root=imgs)
    assert len(b.captions) == 18 and b.caption_image.tolist() == [0] * 5 + [1] * 6 + [2] * 7


def test_wrong_caption_count_names_file_and_entry(tmp_path):
    make_karpathy(tmp_path, [5, 4, 5])
    with pytest.raises(InputError, match=r"flickr30k_test.json: entry 1 \(flickr30k-images/1001.png\): 4 captions, "
                                         r"expected exactly 5"):
        B.load_benchmark("flickr30k", tmp_path)
    make_karpathy(tmp_path, [5, 4], name="coco_karpathy_test.json")
    with pytest.raises(InputError, match="entry 1.*expected at least 5"):
        B.load_benchmark("coco", tmp_path)


def test_caption_string_and_empty_caption_are_errors(tmp_path):
    _img(tmp_path / "a.png", "red")
    (tmp_path / "flickr30k_test.json").write_text(json.dumps([{"image": "a.png", "caption": "a red square"}]))
    with pytest.raises(InputError, match="single string"):
        B.load_flickr30k(tmp_path)
    (tmp_path / "flickr30k_test.json").write_text(json.dumps([{"image": "a.png", "caption": ["x", "", "y", "z", "w"]}]))
    with pytest.raises(InputError, match="entry 0 caption 1"):
        B.load_flickr30k(tmp_path)
    (tmp_path / "flickr30k_test.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        B.load_flickr30k(tmp_path)


def test_missing_images_error_by_name_or_counted_skip(tmp_path):
    make_karpathy(tmp_path, [5, 6, 5, 7], name="coco_karpathy_test.json", subdir="val2014")
    (tmp_path / "val2014" / "1001.png").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\).*entry 1: .*val2014/1001.png"):
        B.load_coco(tmp_path)
    b = B.load_coco(tmp_path, on_missing="skip")
    assert len(b) == 3 and len(b.captions) == 17
    assert b.skipped == [{"where": "coco_karpathy_test.json entry 1", "image": str(tmp_path / "val2014/1001.png"),
                          "reason": "image file missing"}]
    for cap, i in zip(b.captions, b.caption_image, strict=True):  # captions follow their own images, nothing shifted
        assert Path(b.images[i]).stem == str(1000 + NAMES.index(cap.split()[1]))
    with pytest.raises(InputError, match="on_missing"):
        B.load_coco(tmp_path, on_missing="ignore")


def test_missing_root_and_annotation(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        B.load_benchmark("flickr30k", tmp_path / "nope")
    with pytest.raises(InputError, match="flickr30k_test.json not found"):
        B.load_benchmark("flickr30k", tmp_path)
    with pytest.raises(InputError, match="unknown benchmark"):
        B.load_benchmark("flickr8k", tmp_path)
    with pytest.raises(InputError, match="benchmark urban1k"):
        B.load_benchmark("urban1k", tmp_path, n=3)


def _sharegpt_entry(i, caption, with_gpt=True):
    conv = [{"from": "human", "value": "<image>\nDescribe."}]
    if with_gpt:
        conv.append({"from": "gpt", "value": caption})
    return {"id": str(i), "image": f"coco/train2017/{i:012d}.png", "conversations": conv}


def test_sharegpt4v_first_n_streamed(tmp_path):
    entries = []
    for i in range(6):
        _img(tmp_path / f"coco/train2017/{i:012d}.png", NAMES[i])
        long = f"A {NAMES[i]} square. " + ("Dense detail. " * 90_000 if i == 1 else "")  # crosses a read block
        entries.append(_sharegpt_entry(i, long))
    ann = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    ann.write_text(json.dumps(entries, indent=1))
    b = B.load_benchmark("sharegpt4v", tmp_path, n=4)
    assert len(b) == 4 and b.caption_image.tolist() == [0, 1, 2, 3]
    assert b.captions[2] == "A blue square." and len(b.captions[1]) > 1_000_000
    assert b.files[ann.name] == _sha(ann) and b.meta["first_n"] == 4
    with pytest.raises(InputError, match="only 6 entries"):
        B.load_sharegpt4v(tmp_path, n=10)
    entries[2] = _sharegpt_entry(2, "", with_gpt=False)
    ann.write_text(json.dumps(entries))
    with pytest.raises(InputError, match="entry 2 .*no 'gpt' turn"):
        B.load_sharegpt4v(tmp_path, n=4)


def make_urban(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        _img(root / "image" / f"{i}.jpg", NAMES[i % len(NAMES)])
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{i}.txt").write_text(f"A long description of a {NAMES[i % len(NAMES)]} square.\n")


def test_urban1k_pairs_by_stem_in_numeric_order(tmp_path):
    make_urban(tmp_path, 11)
    b = B.load_benchmark("urban1k", tmp_path)
    assert [Path(p).name for p in b.images[:3]] == ["1.jpg", "2.jpg", "3.jpg"] and Path(b.images[-1]).name == "11.jpg"
    assert b.captions[9] == f"A long description of a {NAMES[10 % 8]} square."
    digest = b.files["caption/*.txt"]
    (tmp_path / "caption" / "5.txt").write_text("changed")
    assert B.load_urban1k(tmp_path).files["caption/*.txt"] != digest  # edits to captions change the identity
    (tmp_path / "caption" / "5.txt").unlink()
    with pytest.raises(InputError, match="have no caption file.*5.jpg"):
        B.load_urban1k(tmp_path)
    (tmp_path / "image" / "5.jpg").unlink()
    (tmp_path / "image" / "7.jpg").unlink()
    with pytest.raises(InputError, match="7.jpg"):
        B.load_urban1k(tmp_path)
    assert len(B.load_urban1k(tmp_path, on_missing="skip")) == 9


def test_docci_test_split(tmp_path):
    lines = []
    for i in range(6):
        split = "test" if i % 2 == 0 else "train"
        _img(tmp_path / "images" / f"{split}_{i:05d}.jpg", NAMES[i])
        lines.append(json.dumps({"example_id": f"{split}_{i:05d}", "split": split,
                                 "image_file": f"{split}_{i:05d}.jpg", "description": f"A {NAMES[i]} square."}))
    ann = tmp_path / "docci_descriptions.jsonlines"
    ann.write_text("\n".join(lines) + "\n")
    b = B.load_benchmark("docci", tmp_path)
    assert len(b) == 3 and b.captions == ["A red square.", "A blue square.", "A white square."]
    assert b.files == {ann.name: _sha(ann)}
    ann.write_text(lines[0] + "\n" + json.dumps({"example_id": "x", "split": "test"}) + "\n")
    with pytest.raises(InputError, match=r"docci_descriptions.jsonlines:2: missing field 'image_file'"):
        B.load_docci(tmp_path)


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS[color]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["tsv", "folder"])
def test_chinese_clip_format(tmp_path, layout):
    ids = [101, 102, 103, 104]
    if layout == "tsv":
        (tmp_path / "test_imgs.tsv").write_bytes(b"".join(
            f"{i}\t".encode() + base64.urlsafe_b64encode(_png_bytes(NAMES[k])) + b"\n" for k, i in enumerate(ids)))
    else:
        for k, i in enumerate(ids):
            _img(tmp_path / "test_images" / f"{i}.png", NAMES[k])
    texts = [{"text_id": t, "text": f"一个 {NAMES[k]} 方块", "image_ids": [ids[k]]}
             for t, k in enumerate([0, 0, 1, 2, 2, 2])]  # image 104 has no text: a distractor
    ann = tmp_path / "test_texts.jsonl"
    ann.write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + "\n", encoding="utf-8")
    b = B.load_benchmark("flickr30k-cn", tmp_path)
    assert len(b) == 4 and b.caption_image.tolist() == [0, 0, 1, 2, 2, 2]
    assert b.files["test_texts.jsonl"] == _sha(ann)
    assert b.open_image(1).getpixel((0, 0)) == COLORS["green"]
    res = evaluate_retrieval(ColorModel(), b, ks=(1,))
    assert res["metrics"]["t2i_R@1"] == 1.0 and res["metrics"]["i2t_R@1"] == 1.0
    assert res["metrics"]["images_without_captions"] == 1

    texts.append({"text_id": 9, "text": "red", "image_ids": [999]})
    ann.write_text("\n".join(json.dumps(t) for t in texts) + "\n")
    with pytest.raises(InputError, match="line 7: image 999"):
        B.load_coco_cn(tmp_path)
    assert len(B.load_coco_cn(tmp_path, on_missing="skip").skipped) == 1
    texts[-1] = {"text_id": 9, "text": "red", "image_ids": [101, 102]}
    ann.write_text("\n".join(json.dumps(t) for t in texts) + "\n")
    with pytest.raises(InputError, match="text_id 9.*2 image_ids"):
        B.load_coco_cn(tmp_path)


def make_imagenet_folders(root: Path, per_class=2) -> list[str]:
    folders = ["n01_red_thing", "n02_green_thing", "n03_blue_thing"]
    for c, f in enumerate(folders):
        for j in range(per_class):
            _img(root / f / f"img_{c}_{j}.png", NAMES[c])
    return folders


def test_imagenet_class_folders_and_flat_labels(tmp_path):
    make_imagenet_folders(tmp_path / "val")
    b = B.load_benchmark("imagenet", tmp_path / "val")
    assert b.classnames == ["n01 red thing", "n02 green thing", "n03 blue thing"]
    assert b.labels.tolist() == [0, 0, 1, 1, 2, 2] and b.meta["classnames_source"] == "folder names"
    b2 = B.load_imagenet(tmp_path / "val", classnames=["red", "green", "blue"])
    assert b2.classnames == ["red", "green", "blue"] and b2.files["listing"] == b.files["listing"]
    with pytest.raises(InputError, match="2 class names"):
        B.load_imagenet(tmp_path / "val", classnames=["red", "green"])

    flat = tmp_path / "flat"
    for k in range(4):
        _img(flat / f"ILSVRC2012_val_{k:08d}.png", NAMES[k % 3])
    (flat / "labels.txt").write_text("".join(f"ILSVRC2012_val_{k:08d}.png {k % 3}\n" for k in range(4)))
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\n")
    b3 = B.load_imagenet(flat, classnames=names)
    assert b3.labels.tolist() == [0, 1, 2, 0] and b3.files["labels.txt"] == _sha(flat / "labels.txt")
    res = evaluate_zeroshot(ColorModel(), b3, prompts=["a photo of a {c} thing."], ks=(1, 2))
    assert res["metrics"]["top1"] == 1.0 and res["data"]["prompts"] == "given"
    with pytest.raises(InputError, match="3 classes; pass class names"):
        B.load_imagenet(flat)
    (flat / "labels.txt").write_text("ILSVRC2012_val_00000000.png red\n")
    with pytest.raises(InputError, match=r"labels.txt:1: expected"):
        B.load_imagenet(flat, classnames=names)
    (flat / "labels.txt").write_text("gone.png 0\nILSVRC2012_val_00000000.png 0\n")
    with pytest.raises(InputError, match="gone.png"):
        B.load_imagenet(flat, classnames=names)
    assert B.load_imagenet(flat, classnames=names, on_missing="skip").skipped[0]["image"] == "gone.png"
    assert len(B.imagenet_classnames()) == 1000


def test_undecodable_image_is_named_or_skipped(tmp_path):
    make_karpathy(tmp_path, [5, 5, 5, 5])
    (tmp_path / "flickr30k-images" / "1002.png").write_bytes(b"not an image at all")
    b = B.load_flickr30k(tmp_path)
    with pytest.raises(InputError, match=r"image 2 \(.*1002.png\) does not decode"):
        evaluate_retrieval(ColorModel(), b)
    res = evaluate_retrieval(ColorModel(), b, on_bad_image="skip", ks=(1,))
    assert res["data"]["images"] == 3 and res["data"]["captions"] == 15 and res["data"]["skipped"] == 1
    assert res["data"]["skipped_entries"][0]["reason"] == "image does not decode"
    assert res["metrics"]["i2t_R@1"] == 1.0 and res["metrics"]["t2i_R@1"] == 1.0  # still aligned


def test_task_mismatch_and_model_shape_errors(tmp_path):
    make_karpathy(tmp_path, [5, 5])
    b = B.load_flickr30k(tmp_path)
    with pytest.raises(InputError, match="not classification"):
        evaluate_zeroshot(ColorModel(), b)

    class Bad(ColorModel):
        def encode_text(self, texts):
            return torch.zeros(len(texts) + 1, 3)

    with pytest.raises(InputError, match="encode_text returned shape"):
        evaluate_retrieval(Bad(), b)


def test_preprocess_feeds_tensors(tmp_path):
    make_karpathy(tmp_path, [5, 5, 5])
    seen = {}

    class TensorModel(ColorModel):
        def encode_image(self, x):
            seen["type"] = type(x)
            return x.mean((2, 3)) - 0.5

    to_tensor = lambda im: torch.tensor(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    res = evaluate_retrieval(TensorModel(), B.load_flickr30k(tmp_path), preprocess=to_tensor, batch_size=2)
    assert seen["type"] is torch.Tensor and res["metrics"]["t2i_R@1"] == 1.0


def test_report_json_markdown_and_plots(tmp_path):
    make_karpathy(tmp_path / "f", [5, 5, 5, 5])
    make_urban(tmp_path / "u", 4)
    make_imagenet_folders(tmp_path / "i")
    model = ColorModel()
    results = [evaluate_retrieval(model, B.load_urban1k(tmp_path / "u")),  # columns follow the paper's order
               evaluate_retrieval(model, B.load_flickr30k(tmp_path / "f")),
               evaluate_zeroshot(model, B.load_imagenet(tmp_path / "i", classnames=["red", "green", "blue"]),
                                 prompts=["a {c} photo"])]
    run = REP.make_run(REP.model_identity(model), results)
    other = REP.make_run("baseline", results[1:2])
    paths = REP.write_report([run, other], tmp_path / "out")
    back = REP.load_runs([paths["json"]])
    assert back[0]["model"] == {"name": "color-model", "kind": "test", "class": f"{__name__}.ColorModel"}
    assert back[0]["results"][1]["data"]["files"]["flickr30k_test.json"] == _sha(tmp_path / "f/flickr30k_test.json")
    md = paths["markdown"].read_text()
    assert "| color-model | 100.0 / 100.0 | 100.0 / 100.0 | 100.0 / 100.0 |" in md
    assert "| baseline | 100.0 / 100.0 |  |  |" in md
    assert "| Model | Flickr30k (I2T / T2I R@1) | Urban-1k (I2T / T2I R@1) | ImageNet (top-1 / top-5) |" in md
    for key in ("curves", "bars"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_json_array_head_edge_cases(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('\ufeff [ {"a": 1} ,\n {"a": [2, "]"]}, {"a": 3} ]')
    assert json_array_head(p, 2) == [{"a": 1}, {"a": [2, "]"]}]
    assert json_array_head(p, 10) == [{"a": 1}, {"a": [2, "]"]}, {"a": 3}]
    p.write_text("[]")
    assert json_array_head(p, 5) == []
    p.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(InputError, match="entry 1: not valid JSON"):
        json_array_head(p, 5)
    p.write_text('{"a": 1}')
    with pytest.raises(InputError, match="expected a JSON list"):
        json_array_head(p, 5)


def test_registry_describes_every_benchmark():
    table = B.describe_benchmarks()
    for name in ("flickr30k", "coco", "sharegpt4v", "urban1k", "docci", "flickr30k-cn", "coco-cn", "imagenet"):
        assert f"| {name} |" in table


def test_undecodable_image_in_classification_keeps_labels_aligned(tmp_path):
    make_imagenet_folders(tmp_path, per_class=2)
    (tmp_path / "n02_green_thing" / "img_1_0.png").write_bytes(b"\x89PNG broken")
    b = B.load_imagenet(tmp_path, classnames=["red", "green", "blue"])
    res = evaluate_zeroshot(ColorModel(), b, prompts=["{c}"], on_bad_image="skip", ks=(1,))
    assert res["metrics"]["images"] == 5 and res["metrics"]["top1"] == 1.0
    assert res["data"]["skipped_entries"][0]["image"].endswith("img_1_0.png")


def test_worker_processes_give_the_same_features_and_skips(tmp_path):
    make_karpathy(tmp_path, [5, 5, 5, 5, 5])
    (tmp_path / "flickr30k-images" / "1003.png").write_bytes(b"junk")
    b = B.load_flickr30k(tmp_path)
    f0, b0 = B.encode_benchmark_images(ColorModel(), b, batch_size=2, on_bad="skip")
    f1, b1 = B.encode_benchmark_images(ColorModel(), b, batch_size=2, on_bad="skip", num_workers=1)
    assert torch.equal(f0, f1) and b0.images == b1.images and len(b1) == 4
    with pytest.raises(InputError, match="image 3 .*does not decode"):
        B.encode_benchmark_images(ColorModel(), b, batch_size=2, num_workers=1)


def test_scoring_stored_features_records_the_data(tmp_path):
    from llm2clip.eval.retrieval import retrieval_result

    make_karpathy(tmp_path, [5, 6, 5], name="coco_karpathy_test.json")
    b = B.load_coco(tmp_path)
    model = ColorModel()
    res = retrieval_result(model.encode_image([b.open_image(i) for i in range(len(b))]),
                           model.encode_text(b.captions), b, ks=(1, 5))
    assert res["metrics"]["i2t_R@1"] == 1.0 and res["metrics"]["captions"] == 16
    assert res["data"]["files"] == {"coco_karpathy_test.json": _sha(tmp_path / "coco_karpathy_test.json")}

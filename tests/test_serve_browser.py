"""The search page in a real browser: Debian's chromium driven headless by selenium against `llm2clip serve`'s
app under uvicorn on 127.0.0.1. Types a long caption, sees ranked results, uploads an image, clicks a result.

Skipped where selenium, chromium or chromedriver is missing (CI installs them: .ci/run). Set
LLM2CLIP_SERVE_SCREENSHOT=path to keep a screenshot of the page with results (docs/serve_page.png is one)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from stage2_helpers import tiny_run_config

pytestmark = pytest.mark.slow

LONG_QUERY = ("A close photograph of a ginger and white cat with green eyes sitting on a wooden floor, looking "
              "straight at the camera, its whiskers catching warm light from a window on the left; behind it a "
              "plain pale wall and the blurred edge of a sofa. ") * 3
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "text", "page", "horse",
          "hubble_deep_field", "immunohistochemistry", "retina", "clock", "motorcycle_right", "grass")


def _browser_paths() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    return chrome, driver


def _photos(root: Path) -> list[str]:
    """scikit-image's bundled sample photos (no network); generated scenes where it is missing."""
    from PIL import Image

    root.mkdir()
    try:
        from skimage import data
    except ImportError:
        data = None
    names = []
    for name in PHOTOS if data is not None else ():
        try:
            arr = getattr(data, name)()
        except Exception:  # some samples are fetched from the network: not here
            continue
        Image.fromarray(arr).convert("RGB").save(root / f"{name}.jpg", quality=90)
        names.append(f"{name}.jpg")
    if len(names) < 6:
        from llm2clip.data.scenes import SceneSet

        scenes = SceneSet(12, seed=3, render_size=96)
        for i in range(12):
            scenes.image(i).save(root / f"scene{i:02d}.png")
            names.append(f"scene{i:02d}.png")
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _browser_paths()
    import uvicorn

    import llm2clip
    from llm2clip.config import parse_config
    from llm2clip.search import build_index
    from llm2clip.serve import create_app
    from llm2clip.train.config import RunConfig
    from llm2clip.train.loop import fit

    tmp = tmp_path_factory.mktemp("browser")
    fit(parse_config(tiny_run_config(tmp / "run", train__steps=2, data__val=None), RunConfig), progress=False)
    names = _photos(tmp / "photos")
    build_index(tmp / "photos", tmp / "run" / "model", tmp / "photos.index", progress=False)
    app = create_app(llm2clip.load(tmp / "run" / "model", device="cpu"), tmp / "photos.index")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", tmp / "photos", names
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    chrome, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _results(drv, before: str, timeout: float = 30) -> list[dict]:
    """Wait until the status line changes from ``before`` to a results line; the cards, in order."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, timeout).until(lambda d: d.find_element(By.ID, "status").text not in (before, "searching ...")
                                      and "results for" in d.find_element(By.ID, "status").text)
    cards = drv.find_elements(By.CSS_SELECTOR, "#results .hit")
    out = []
    for c in cards:
        name = c.find_element(By.CSS_SELECTOR, ".name").text
        rank, score = c.find_element(By.CSS_SELECTOR, ".score").text.split(" · ")
        out.append({"name": name, "rank": int(rank.lstrip("#")), "score": float(score), "card": c})
    return out


def _thumbs_loaded(drv) -> bool:
    return drv.execute_script("return [...document.querySelectorAll('#results img')]"
                              ".every(i => i.complete && i.naturalWidth > 0)")


def test_page_text_image_and_click_searches(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, photos, names = server
    browser.get(url + "/")
    assert browser.title == "llm2clip search"
    WebDriverWait(browser, 10).until(lambda d: "images" in d.find_element(By.ID, "info").text)
    assert browser.find_element(By.ID, "info").text.startswith(f"{len(names)} images")

    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("8")
    box = browser.find_element(By.ID, "query")
    box.send_keys(LONG_QUERY)
    browser.find_element(By.ID, "search-btn").click()
    hits = _results(browser, "")
    assert len(hits) == 8 and [h["rank"] for h in hits] == list(range(1, 9))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:])) and set(h["name"] for h in hits) <= set(names)
    status = browser.find_element(By.ID, "status").text
    assert "ms (server)" in status and "round trip" in status
    WebDriverWait(browser, 20).until(_thumbs_loaded)
    shot = os.environ.get("LLM2CLIP_SERVE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)

    target = names[len(names) // 2]
    before = browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "file").send_keys(str(photos / target))  # the upload control
    hits = _results(browser, before)
    assert hits[0]["name"] == target and hits[0]["score"] > 0.999
    assert browser.find_element(By.CSS_SELECTOR, "#query-image img").get_attribute("src").startswith("blob:")

    clicked = hits[2]["name"]
    before = browser.find_element(By.ID, "status").text
    hits[2]["card"].click()  # search by that result
    hits = _results(browser, before)
    assert hits[0]["name"] == clicked and hits[0]["score"] > 0.999

    browser.find_element(By.ID, "query").clear()
    browser.find_element(By.ID, "search-btn").click()
    WebDriverWait(browser, 5).until(lambda d: "type a description" in d.find_element(By.ID, "status").text)
    browser.execute_script("document.getElementById('query').value = 'word '.repeat(5000)")  # over the limit
    browser.find_element(By.ID, "search-btn").click()
    WebDriverWait(browser, 10).until(lambda d: "at most 20000 characters" in d.find_element(By.ID, "status").text)
    assert "text:" in browser.find_element(By.ID, "status").text

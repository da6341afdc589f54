"""The /ui page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
installed by .ci/run) driven by Selenium uploads an image and reads every task's answer off
the page; the answers are the API's. The server is `bentoml serve` with MUTASK_ARTIFACT naming a
directory of versions and MUTASK_VERSION pinning the older one. MUTASK_UI_SCREENSHOT=PATH also saves a screenshot
(docs/ui.png is made so)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from mutask.server_process import ServiceProcess, free_port, png_bytes
from tests.test_live import first_version
from tests.test_serving_helpers import subprocess_env

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,900"]

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver: `apt-get install chromium chromium-driver` (.ci/run does)")


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


def band_image() -> bytes:
    """Task a's class 1: a bright band at rows 5..9 (the synthetic tasks' pattern), 128 px."""
    rng = np.random.default_rng(3)
    x = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
    x[5:10] = 230
    return png_bytes(np.kron(x, np.ones((4, 4, 1), np.uint8)))


def test_page_uploads_and_shows_every_task(tmp_path_factory, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    repo = tmp_path / "repo"
    for n in (1, 2):
        shutil.copytree(first_version(tmp_path_factory), repo / str(n))
    image = tmp_path / "band.png"
    image.write_bytes(band_image())
    # `bentoml serve` with MUTASK_ARTIFACT naming a directory of versions, version 1 pinned (2 is newer)
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "mutask.serving.service:Mutask", "--host", "127.0.0.1", "--port", str(port)]
    srv = ServiceProcess(command, port=port, log_path=tmp_path / "server.log", env=subprocess_env({"MUTASK_ARTIFACT": repo, "MUTASK_POLL_S": 0.5, "MUTASK_VERSION": 1}))
    with srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert client.get("/").status_code == 200  # the OpenAPI page stays
            assert {r["version"] for r in client.post("/tasks").json().values()} == {1}  # pinned
            assert client.get("/tasks").status_code in (404, 405)  # the page reads POST /tasks, the one route there is
            for path in ("/ui", "/ui/", "/ui/app.js", "/ui/index.html"):  # let through by the HTTP guard (service.UI_FILES)
                assert client.get(path).status_code == 200, path
            want = client.post("/predict_tasks", files={"image": ("band.png", image.read_bytes(), "image/png")}).json()["predictions"]
        driver = browser(tmp_path / "chromium-profile")
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(srv.url + "/ui")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".task-box")) == 2)
            assert "version 1" in driver.find_element(By.ID, "summary").text
            assert len(driver.find_elements(By.CSS_SELECTOR, "#graph .segment")) >= 3  # the system graph, from /tasks
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(ec.element_to_be_clickable((By.ID, "run"))).click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .task")) == 2)
            shown = {}
            for el in driver.find_elements(By.CSS_SELECTOR, "#results .task"):
                rows = el.find_elements(By.CSS_SELECTOR, ".row")
                shown[el.get_attribute("data-task")] = {
                    "label": el.find_element(By.CSS_SELECTOR, ".answer").text,
                    "scores": {r.find_element(By.CSS_SELECTOR, ".label").text: float(r.find_element(By.CSS_SELECTOR, ".score").text) for r in rows},
                    "latency": float(el.find_element(By.CSS_SELECTOR, ".latency").text),
                    "meta": el.find_element(By.CSS_SELECTOR, ".meta").text,
                }
            assert not driver.find_element(By.ID, "status").text
            if os.environ.get("MUTASK_UI_SCREENSHOT"):
                driver.save_screenshot(os.environ["MUTASK_UI_SCREENSHOT"])
        finally:
            driver.quit()
    assert set(shown) == {p["task"] for p in want}
    for p in want:
        got = shown[p["task"]]
        assert got["label"] == p["label"]
        assert got["scores"].keys() == p["scores"].keys()
        assert all(abs(got["scores"][k] - v) < 1e-3 for k, v in p["scores"].items())  # shown with 3 decimals
        assert got["latency"] > 0 and "own" in got["meta"] and "shared" in got["meta"]

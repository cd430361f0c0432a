"""End to end in headless Chromium: start `traitscope app` on a free localhost port, click through.

Screenshots go to artifacts/screenshots/ (or $TRAITSCOPE_SCREENSHOTS). Needs Debian's chromium and
chromium-driver (`make browser`); skipped where they are missing.
"""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app_fixtures as fx

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs chromium and chromedriver (make browser)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from locations import REPO

SHOTS = Path(os.environ.get("TRAITSCOPE_SCREENSHOTS") or REPO / "artifacts" / "screenshots")
N_IMAGES, D_SAE = 48, 128


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.make_world(tmp_path_factory.mktemp("browser"), N_IMAGES, D_SAE)


@pytest.fixture(scope="module")
def server(world):
    root = world["root"]
    cmd = [sys.executable, "-m", "traitscope.cli", "app", "--runs", str(root / "runs"),
           "--shards", str(world["shards"].dpath), "--port", "0", "--no-browser",
           "--ratings", str(root / "ratings"), "--cache", str(root / "cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url, lines, deadline = None, [], time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"open (http://127\.0\.0\.1:\d+/)", line):
            url = m.group(1)
            break
    if url is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the app did not start:\n" + "".join(lines))
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    fpath = SHOTS / f"{name}.png"
    driver.save_screenshot(str(fpath))
    return fpath


class Wait(WebDriverWait):
    """WebDriverWait that saves a screenshot of the page when it times out."""

    def until(self, method, message: str = ""):
        try:
            return super().until(method, message)
        except TimeoutException:
            shot(self._driver, f"failed-{int(time.time())}")
            raise


def wait(driver, timeout: float = 30) -> Wait:
    return Wait(driver, timeout, poll_frequency=0.2)


def wait_idle(driver, timeout: float = 30) -> None:
    """Until Streamlit has finished running the script (no 'Running...' status widget)."""
    time.sleep(0.3)
    wait(driver, timeout).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))


def tile_titles(driver) -> list[str]:
    return [img.get_attribute("title") for img in driver.find_elements(By.CSS_SELECTOR, ".ts-grid img")]


def click_button(driver, text: str) -> None:
    """Click a button by its text; Streamlit may redraw it in between, so look it up afresh on a retry."""
    xpath = f"//button[normalize-space(.)='{text}']"
    for attempt in range(5):
        try:
            wait(driver).until(EC.element_to_be_clickable((By.XPATH, xpath))).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.3)
    raise AssertionError(f"could not click {text!r}")


def type_into(driver, xpath: str, *keys) -> None:
    """Type into an input found by xpath; Streamlit may redraw (replace) it while the script reruns, so
    wait until the page is idle and look it up afresh on a retry."""
    for attempt in range(5):
        wait_idle(driver)
        try:
            wait(driver).until(EC.presence_of_element_located((By.XPATH, xpath))).send_keys(*keys)
            return
        except StaleElementReferenceException:
            time.sleep(0.3)
    raise AssertionError(f"could not type into {xpath!r}")


def strip_features(driver) -> list[int]:
    return [int(el.get_attribute("data-feature")) for el in driver.find_elements(By.CSS_SELECTOR, ".ts-strip")]


def test_the_atlas_is_the_start_page_and_opens_a_feature(server, world, browser):
    browser.get(server)
    wait(browser, 90).until(lambda d: len(strip_features(d)) == 30)
    wait_idle(browser)
    shot(browser, "00-atlas")
    from traitscope.app.data import InferenceView

    inference = InferenceView(world["root"] / "runs" / "topk-a" / "inference" / world["shards"].hash)
    counts = inference.fire_counts()
    shown = strip_features(browser)
    assert [counts[f] for f in shown] == sorted(counts[shown], reverse=True), "most widespread first"
    assert D_SAE - 1 not in shown, "the dead feature is hidden"
    strip = browser.find_elements(By.CSS_SELECTOR, ".ts-strip")[0]
    assert len(strip.find_elements(By.TAG_NAME, "img")) == 6
    assert "images where it fires" in strip.find_element(By.CSS_SELECTOR, "span[title]").get_attribute("title")

    # page 2 holds the next 30 (no cap), then open a feature from its strip
    page_box = browser.find_element(By.XPATH, "//input[contains(@aria-label, 'Page (1-')]")
    page_box.send_keys(Keys.CONTROL, "a")
    page_box.send_keys("2", Keys.ENTER)
    wait(browser, 60).until(lambda d: strip_features(d) and strip_features(d)[0] != shown[0])
    wait_idle(browser)
    second = strip_features(browser)
    assert len(second) == 30 and not set(second) & set(shown)
    browser.find_elements(By.CSS_SELECTOR, ".ts-feature-link")[0].click()
    wait(browser, 60).until(lambda d: f"Feature {second[0]}" in d.find_element(By.TAG_NAME, "body").text)
    wait_idle(browser)
    assert f"feature={second[0]}" in browser.current_url

    # the map of the dictionary
    browser.get(server)
    wait(browser, 90).until(lambda d: len(strip_features(d)) == 30)
    browser.find_element(By.XPATH, "//div[@role='radiogroup']//p[text()='map of the dictionary']").click()
    wait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"] canvas, '
                                                                        '[data-testid="stVegaLiteChart"] svg'))
    wait_idle(browser, 120)
    time.sleep(1)
    shot(browser, "00-atlas-map")


def test_clicking_a_point_of_the_map_opens_that_feature(server, world, browser):
    """The map of the dictionary: hover a point (its tooltip names the feature), click it, land on that
    feature's page."""
    from selenium.webdriver.common.action_chains import ActionChains

    from traitscope.app.data import InferenceView

    inference = InferenceView(world["root"] / "runs" / "topk-a" / "inference" / world["shards"].hash)
    browser.get(server + "?page=Atlas&run=topk-a")
    wait(browser, 90).until(lambda d: len(strip_features(d)) == 30)
    browser.find_element(By.XPATH, "//div[@role='radiogroup']//p[text()='map of the dictionary']").click()
    points = '[data-testid="stVegaLiteChart"] svg path[aria-roledescription="circle"]'
    n_shown = int((inference.fire_counts() >= 2).sum())  # the default filter hides dead and one-image features
    wait(browser, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, points)) == n_shown)
    wait_idle(browser, 120)
    time.sleep(1)
    point = browser.find_elements(By.CSS_SELECTOR, points)[n_shown // 2]
    ActionChains(browser).move_to_element(point).perform()
    tip = wait(browser, 10).until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#vg-tooltip-element")))
    feature = int(re.search(r"feature\s*(\d+)", tip.text).group(1))
    shot(browser, "00b-atlas-map-hover")
    ActionChains(browser).move_to_element(point).click().perform()
    wait(browser, 60).until(lambda d: f"Feature {feature}" in d.find_element(By.TAG_NAME, "body").text)
    wait_idle(browser)
    assert f"feature={feature}" in browser.current_url and "page=Feature" in browser.current_url
    wait(browser, 60).until(lambda d: len(tile_titles(d)) == len(inference.feature(feature).rows))
    shot(browser, "00c-map-click-feature")


def test_feature_pages_heatmaps_sit_on_the_planted_patches(server, world, browser):
    shards = world["shards"]
    browser.get(server + "?page=Features&run=topk-a&feature=5&zoom=0")
    wait(browser, 60).until(lambda d: len(tile_titles(d)) == 16)
    wait_idle(browser)
    shot(browser, "01-feature-5")
    from traitscope.app.data import InferenceView

    inference = InferenceView(world["root"] / "runs" / "topk-a" / "inference" / shards.hash)
    rows = inference.feature(5).rows
    assert tile_titles(browser) == [shards.images[r]["path"] for r in rows], "tiles are the top images, in order"

    # each heatmap covers its image's red square: decode the tiles the page shows and look
    for slot, (img, row) in enumerate(zip(browser.find_elements(By.CSS_SELECTOR, ".ts-grid img")[:6], rows)):
        tile = Image.open(io.BytesIO(base64.b64decode(img.get_attribute("src").split(",", 1)[1]))).convert("RGB")
        rec = shards.images[row]
        scale = tile.width / rec["width"]
        left, top, right, bottom = fx.patch_box((rec["width"], rec["height"]), fx.planted_patch(row))
        cx, cy = int((left + right) / 2 * scale), int((top + bottom) / 2 * scale)
        r, g, b = np.asarray(tile)[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
        # the red square (230, 20, 20) turns orange to pale yellow under the heat; the top image's is
        # drawn at the top of the colour scale
        assert r > 200 and g > (150 if slot == 0 else 60), f"row {row}: no heat on the planted patch ({r, g, b})"
        # two patches to the left: no heat, the background shows through
        lx = int((left - 1.5 * (right - left)) * scale)
        if lx > 0:
            r2, g2, b2 = np.asarray(tile)[cy, lx]
            assert abs(int(r2) - int(g2)) < 90, "no heat away from the planted patch"

    # click a tile: it opens at full resolution, bare and with its heat
    browser.find_elements(By.CSS_SELECTOR, ".ts-grid a")[1].click()
    wait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[role='dialog'] img")) == 2)
    wait_idle(browser)
    time.sleep(1)
    shot(browser, "01b-enlarged")
    dialog = browser.find_element(By.CSS_SELECTOR, "[role='dialog']")
    assert shards.images[rows[1]]["path"] in dialog.text
    widths = [int(img.get_attribute("naturalWidth")) for img in dialog.find_elements(By.TAG_NAME, "img")]
    assert widths == [shards.images[rows[1]]["width"]] * 2, "full resolution"
    browser.get(server + "?page=Feature&run=topk-a&feature=5")
    wait(browser, 60).until(lambda d: len(tile_titles(d)) == 16)
    wait_idle(browser)

    # type another feature index
    box = browser.find_element(By.XPATH, "//input[contains(@aria-label, 'Feature (0-')]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("9", Keys.ENTER)
    rows9 = inference.feature(9).rows
    wait(browser, 30).until(lambda d: tile_titles(d) == [shards.images[r]["path"] for r in rows9])
    wait_idle(browser)
    assert "feature=9" in browser.current_url
    shot(browser, "02-feature-9")

    # label search: species_a -> feature 0 first (it fires exactly on species_a images)
    browser.find_element(By.XPATH, "//div[@role='radiogroup']//p[text()='label']").click()
    type_into(browser, "//input[@aria-label='Search labels']", "species_a", Keys.ENTER)
    wait(browser, 30).until(lambda d: "Feature 0" in d.find_element(By.TAG_NAME, "body").text)
    wait_idle(browser)
    picked = [el.get_attribute("value") for el in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSelectbox"] input')]
    assert any("feature 0 · lift 3.00" in text for text in picked), picked
    shot(browser, "03-label-search")


def test_compare_runs_shows_matched_pairs(server, browser):
    browser.get(server + "?page=Compare+runs")
    wait(browser, 90).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".ts-pair")) == 10)
    wait_idle(browser)
    pair = browser.find_elements(By.CSS_SELECTOR, ".ts-pair")[0]
    assert len(pair.find_elements(By.CSS_SELECTOR, ".ts-strip")) == 2
    assert "matched" in pair.text and "cosine" in pair.text
    shot(browser, "04-compare-runs")


def test_image_page_draws_each_features_map_over_the_image(server, world, browser):
    browser.get(server + "?page=Image&row=7")
    wait(browser, 60).until(lambda d: len(tile_titles(d)) >= 4)
    wait_idle(browser)
    from_dataset = tile_titles(browser)
    assert all(t.startswith("feature ") for t in from_dataset)
    shot(browser, "05-image-page")

    # upload the same file: the backbone named in the manifest runs on it, the same features fire
    browser.find_element(By.XPATH, "//div[@role='radiogroup']//p[text()='upload']").click()
    upload = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    upload.send_keys(str(world["shards"].image_fpath(7)))
    wait(browser, 90).until(lambda d: len(tile_titles(d)) >= 4)
    wait_idle(browser)
    assert tile_titles(browser)[:3] == from_dataset[:3]
    shot(browser, "06-image-upload")


def test_blind_test_survives_a_reload(server, world, browser):
    browser.get(server + "?page=Blind+test")
    # the form is drawn after the check that a run can start a test; wait for all of it and the
    # script's end before typing
    n_box = wait(browser, 60).until(EC.presence_of_element_located(
        (By.XPATH, "//input[contains(@aria-label, 'Items of each kind')]")))
    wait_idle(browser)
    name_box = browser.find_element(By.XPATH, "//input[contains(@aria-label, 'Session name')]")
    name_box.send_keys(Keys.CONTROL, "a")
    name_box.send_keys("browser1")
    n_box = browser.find_element(By.XPATH, "//input[contains(@aria-label, 'Items of each kind')]")
    n_box.send_keys(Keys.CONTROL, "a")
    n_box.send_keys("2")
    click_button(browser, "Start or resume")
    ratings = [3, 5, 6, 2]
    for position, rating in enumerate(ratings):
        wait(browser, 60).until(lambda d: f"item {position + 1} of 4" in d.find_element(By.TAG_NAME, "body").text)
        wait_idle(browser)
        # this item's own buttons (Streamlit tags a keyed widget's container with st-key-<key>)
        button = f".st-key-rate-{position}-{rating} button"
        wait(browser, 60).until(EC.element_to_be_clickable((By.CSS_SELECTOR, button)))
        if position == 0:
            time.sleep(0.5)
            shot(browser, "07-blind-item")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "dense" not in text.lower() and "sae feature" not in text.lower().replace("an sae feature", "")
        browser.find_element(By.CSS_SELECTOR, button).click()
        if position == 1:  # reload mid-way: nothing is lost, the session resumes at item 3
            wait(browser, 30).until(lambda d: "item 3 of 4" in d.find_element(By.TAG_NAME, "body").text)
            browser.refresh()
    wait(browser, 60).until(lambda d: "Welch" in d.find_element(By.TAG_NAME, "body").text)
    wait_idle(browser)
    shot(browser, "08-blind-summary")
    lines = [json.loads(x) for x in (world["root"] / "ratings" / "browser1.jsonl").read_text().splitlines()]
    assert [x["rating"] for x in lines if x["type"] == "rating"] == ratings

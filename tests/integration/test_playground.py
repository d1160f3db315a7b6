"""The playground page at GET /, driven in headless Chromium through Selenium.

Needs Debian's chromium and chromium-driver (the README's browser line; ``.ci/run`` runs it). Without them the
test is skipped on a developer machine and fails in CI (``CI`` set), so it never silently
stops running there. Screenshots go to ``$TEST_ARTIFACTS`` (default: ``test-artifacts/``).
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The README's browser line (tests/unit/test_ci.py checks that the README has it).
BROWSER_LINE = "sudo apt-get update && sudo apt-get install -y chromium chromium-driver"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"needs Debian's chromium and chromium-driver: run the README's browser line, {BROWSER_LINE}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="playground-chromium-")
    # No GPU, no sandbox (root in a container), and no background calls to Google's hosts:
    # this machine's network is closed.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), "Chromium took no screenshot"
    return path


def wait_for(driver, condition, timeout_s=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)


def image_size(driver, img):
    return driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)


def results_of(driver, count):
    """Wait until the page shows ``count`` finished images; returns (results element,
    [(width, height) of each image])."""
    from selenium.webdriver.common.by import By

    results = driver.find_element(By.ID, "results")
    wait_for(driver, lambda d: results.get_attribute("data-completed") == str(count))
    images = results.find_elements(By.TAG_NAME, "img")
    assert len(images) == count
    for img in images:
        wait_for(driver, lambda d: image_size(d, img)[0] > 0)
    return results, [tuple(image_size(driver, img)) for img in images]


def open_page(driver, base_url):
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/")
    # The model list is filled from /v1/models once the page has loaded.
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    return By


def test_playground_generates_with_live_previews(browser, base_url):
    By = open_page(browser, base_url)
    assert browser.title == "serve_app playground"
    models = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert "stable-diffusion-2-1" in models and "esrgan-x2" not in models  # text-to-image only
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
    size = browser.find_element(By.ID, "size")
    size.clear()
    size.send_keys("256x256")
    browser.find_element(By.ID, "seed").send_keys("0")
    browser.find_element(By.ID, "submit").click()

    results, sizes = results_of(browser, 1)
    # Two previews were shown from the stream before the final image replaced them.
    assert results.get_attribute("data-partials") == "2"
    assert sizes == [(256, 256)]
    caption = results.find_element(By.TAG_NAME, "figcaption").text
    assert "seed 0" in caption and "256x256" in caption
    assert "Done: 1 image(s), 256x256" in browser.find_element(By.ID, "status").text
    assert screenshot(browser, "playground-generate").stat().st_size > 10_000


def test_playground_upscales_an_uploaded_image(browser, base_url, tmp_path):
    By = open_page(browser, base_url)
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=upscale]").click()
    models = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert "esrgan-x2" in models and "stable-diffusion-2-1" not in models
    assert not browser.find_element(By.ID, "size").is_displayed()  # the size follows the image
    upload = tmp_path / "small.png"
    pixels = (np.random.default_rng(3).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(upload)
    browser.find_element(By.ID, "image").send_keys(str(upload))
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "model")).select_by_value("esrgan-x2")
    browser.find_element(By.ID, "n").clear()
    browser.find_element(By.ID, "n").send_keys("2")
    browser.find_element(By.ID, "submit").click()

    _, sizes = results_of(browser, 2)
    assert sizes == [(128, 96)] * 2
    screenshot(browser, "playground-upscale")


def test_playground_shows_the_error_and_its_field(browser, base_url):
    By = open_page(browser, base_url)
    browser.find_element(By.ID, "prompt").send_keys("too big")
    size = browser.find_element(By.ID, "size")
    size.clear()
    size.send_keys("4096x4096")
    browser.find_element(By.ID, "submit").click()
    status = browser.find_element(By.ID, "status")
    wait_for(browser, lambda d: "error" in status.get_attribute("class"))
    assert status.text.startswith("400:") and "(field: size)" in status.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")


def test_playground_edits_an_uploaded_image_with_previews(browser, base_url, tmp_path):
    By = open_page(browser, base_url)
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=edit]").click()
    assert browser.find_element(By.ID, "mask").is_displayed()
    upload = tmp_path / "photo.png"
    pixels = (np.random.default_rng(5).random((200, 264, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(upload)
    browser.find_element(By.ID, "image").send_keys(str(upload))
    browser.find_element(By.ID, "prompt").send_keys("the same scene in snow")
    browser.find_element(By.ID, "submit").click()

    results, sizes = results_of(browser, 1)
    assert results.get_attribute("data-partials") == "2"
    assert sizes == [(264, 200)]  # the input's size, multiples of 8


def test_playground_generates_then_upscales_without_streaming(browser, base_url):
    from selenium.webdriver.support.ui import Select

    By = open_page(browser, base_url)
    browser.find_element(By.ID, "prompt").send_keys("a harbour")
    size = browser.find_element(By.ID, "size")
    size.clear()
    size.send_keys("256x256")
    upscalers = Select(browser.find_element(By.ID, "upscale"))
    assert {o.get_attribute("value") for o in upscalers.options} >= {"", "esrgan-x2"}
    upscalers.select_by_value("esrgan-x2")
    browser.find_element(By.ID, "submit").click()

    results, sizes = results_of(browser, 1)
    assert sizes == [(512, 512)]  # 256x256 then ESRGAN x2
    assert results.get_attribute("data-partials") == "0"  # a chain does not stream

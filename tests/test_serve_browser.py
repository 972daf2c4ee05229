"""The upload page in headless Chromium: choose (or drop) an image, see its label and bars.

Needs the system packages ``chromium`` and ``chromium-driver`` (``.ci/install-system-deps``), or
Google Chrome and its chromedriver as GitHub's runners have them.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from serve_support import encode

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1000,900",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail(
            "headless Chromium is required for the upload-page test and was not found: "
            "run .ci/install-system-deps (apt-get install chromium chromium-driver), as the README's setup says"
        )
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _wait_for_result(drv: Any, count: int) -> list[Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card .label")) >= count
    )
    return list(drv.find_elements(By.CSS_SELECTOR, "#results .card"))


def test_choose_an_image_and_see_its_label(
    classifier: str, browser: Any, cifar_test: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    image = tmp_path / "cifar-0.png"
    image.write_bytes(encode(cifar_test[0][0]))
    expected = requests.post(
        f"{classifier}/predict?top_k=5",
        data=image.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    ).json()

    browser.get(f"{classifier}/")
    assert "Image classifier" in browser.find_element(By.TAG_NAME, "h1").text
    browser.find_element(By.ID, "file").send_keys(str(image))
    card = _wait_for_result(browser, 1)[0]
    label = card.find_element(By.CSS_SELECTOR, ".label").text
    assert label.startswith(expected["label"])
    rows = card.find_elements(By.CSS_SELECTOR, ".row")
    assert [r.find_element(By.CSS_SELECTOR, ".k").text for r in rows] == [
        t["label"] for t in expected["top_k"]
    ]
    widths = [
        float(r.find_element(By.CSS_SELECTOR, ".bar span").get_attribute("style").split(":")[1].strip(" %;"))
        for r in rows
    ]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert browser.find_element(By.ID, "status").text == "Done"
    browser.save_screenshot(str(tmp_path / "upload-page.png"))


def test_drop_an_image_and_a_bad_file(
    classifier: str, browser: Any, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{classifier}/")
    png = base64.b64encode(encode(cifar_test[0][1])).decode()
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        dt.items.add(new File(["not an image"], "notes.txt", {type: "text/plain"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        """,
        png,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda d: "failed" in d.find_element(By.ID, "status").text)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 2
    texts = " ".join(c.text for c in cards)
    assert "unsupported content type" in texts  # the text file's error is shown, not a crash
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .card .label")) == 1
    assert browser.find_element(By.ID, "status").text == "1 of 2 failed"

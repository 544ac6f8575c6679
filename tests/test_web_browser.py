"""The installer's page in a real headless browser: Debian's chromium + chromedriver.

Each test runs a real station (supervisor on the in-process simulator, SQLite)
with its page on a loopback port in the test's trio run, and drives chromium
through selenium in a worker thread (selenium blocks). Without chromium the
tests skip, unless EVSE_REQUIRE_BROWSER=1 (CI), where they fail.

Screenshots of the status and settings pages go to $EVSE_TEST_ARTIFACTS
(default test-artifacts/ in the repository).
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from ops.web.monitor import PowerPlot
from tests.station_harness import TAG
from tests.web_rig import PASSWORD, web_rig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def artifacts() -> Path:
    path = Path(os.environ.get("EVSE_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _need_browser() -> None:
    missing = [
        what
        for what, there in (("chromium", CHROMIUM is not None), (DRIVER, os.path.exists(DRIVER)))
        if not there
    ]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("EVSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"EVSE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    # Before the test's trio run: a skip raised inside it loses its reason.
    _need_browser()


@asynccontextmanager
async def chromium(width: int = 1280, height: int = 1600) -> AsyncIterator[WebDriver]:
    """A fresh headless chromium, started and ended in a worker thread.

    Every call into the driver must go through ``run``: the page is served by
    this very trio run, so a driver call on the trio thread would wait for a
    server that cannot answer until the call returns.
    """
    _need_browser()
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="evse-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    # The driver's path given: selenium manager never runs (nothing is downloaded).
    driver = await run(
        lambda: webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    )
    try:
        yield driver
    finally:
        with trio.CancelScope(shield=True):
            await run(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Selenium blocks: in a worker thread, so the station and server keep running."""
    return await trio.to_thread.run_sync(fn, *args)


def wait_for(driver: WebDriver, predicate: Callable[[WebDriver], Any], within: float = 5.0) -> Any:
    return WebDriverWait(driver, within, poll_frequency=0.02).until(predicate)


def text_of(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def log_in(driver: WebDriver, url: str) -> None:
    driver.get(url + "/login")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login-submit").click()
    wait_for(driver, lambda d: d.current_url.endswith("/settings"))


def save_form(driver: WebDriver, field: str, value: str) -> None:
    box = driver.find_element(By.NAME, field)
    box.clear()
    box.send_keys(value)
    form = box.find_element(By.XPATH, "./ancestor::form")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#message, #problem"))


def screenshot(driver: WebDriver, name: str) -> Path:
    # The whole page: the window made as tall as the document.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, max(int(height) + 120, 600))
    path = artifacts() / name
    assert driver.save_screenshot(str(path)), path
    return path


async def test_installer_changes_settings_in_the_browser(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w, chromium() as driver:
        await run(log_in, driver, w.url)
        assert await run(driver.find_elements, By.NAME, "monitoring.fallback_limit")

        # A valid change: the registry and OCPP GetConfiguration agree with the page.
        await run(save_form, driver, "monitoring.fallback_limit", "10")
        assert "Fallback limit (applied)" in await run(text_of, driver, "#message")
        assert w.registry.value("FallbackLimit") == 10.0
        found, _ = w.registry.get_configuration(["FallbackLimit"])
        assert found == [{"key": "FallbackLimit", "readonly": False, "value": "10"}]
        await run(save_form, driver, "monitoring.connection_check_frequency", "45")
        assert w.registry.value("WebSocketPingInterval") == 45
        found, _ = w.registry.get_configuration(["WebSocketPingInterval"])
        assert found[0]["value"] == "45"
        field = await run(driver.find_element, By.NAME, "monitoring.connection_check_frequency")
        assert await run(field.get_attribute, "value") == "45"
        assert w.registry.text("FallbackLimit") == "10"

        # Out of range: the registry's reason next to the field, nothing changed.
        key = w.registry.resolve("monitoring.fallback_limit")
        assert key is not None
        with pytest.raises(ValueError, match="outside") as refused:
            key.parse("500")
        await run(save_form, driver, "monitoring.fallback_limit", "500")
        shown = await run(text_of, driver, "#err-f-monitoring-fallback_limit")
        assert shown == str(refused.value)
        assert "Nothing was changed" in await run(text_of, driver, "#problem")
        assert w.registry.value("FallbackLimit") == 10.0

        # A certificate upload of a file that is not PEM is refused with its reason.
        junk = tmp_path / "not-a-cert.pem"
        await trio.Path(junk).write_text("this is not a certificate\n")

        def upload() -> None:
            driver.find_element(By.ID, "certificate-file").send_keys(str(junk))
            driver.find_element(By.ID, "upload-certificate").click()
            wait_for(driver, lambda d: d.find_elements(By.ID, "problem"))

        await run(upload)
        problem = await run(text_of, driver, "#problem")
        assert "not a PEM certificate" in problem
        assert w.registry.value("CentralSystemRootCertificate") == ""

        await run(driver.get, w.url + "/settings")
        path = await run(screenshot, driver, "web-settings.png")
        print(f"settings page screenshot: {path}")


async def test_viewer_sees_no_edit_control(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w, chromium() as driver:
        await run(driver.get, w.url + "/settings")
        controls = await run(
            driver.find_elements,
            By.CSS_SELECTOR,
            "input:not([type=hidden]), select, textarea, button, form[method=post]",
        )
        assert controls == [], "a viewer sees an edit control"
        value = await run(text_of, driver, '[data-setting="monitoring.fallback_limit"]')
        assert value == "6 A"
        assert "Log in" in await run(text_of, driver, "#login")

        # On a phone's screen (390 CSS px wide) nothing is wider than the screen.
        async with chromium(width=390, height=844) as phone:
            for page in ("/", "/settings"):
                await run(phone.get, w.url + page)
                overflow = await run(
                    phone.execute_script,
                    "return document.documentElement.scrollWidth - window.innerWidth",
                )
                assert int(overflow) <= 0, f"{page} is {overflow} px wider than a phone"
            await run(phone.get, w.url + "/")
            path = await run(screenshot, phone, "web-status-phone.png")
            print(f"status page on a phone: {path}")


async def test_live_status_follows_a_plug_in_and_a_charge(tmp_path: Path) -> None:
    # One plot point a second, so the screenshot has a curve after a few seconds.
    async with (
        web_rig(tmp_path, plot=PowerPlot(interval=1.0)) as w,
        chromium(width=1280, height=1400) as driver,
    ):
        await run(driver.get, w.url + "/")
        await run(
            wait_for,
            driver,
            lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live",
        )
        assert await run(text_of, driver, '[data-f="status"]') == "Available"

        def shows(css: str, text: str) -> Callable[[], None]:
            def waiting() -> None:
                try:
                    wait_for(driver, lambda d: text_of(d, css) == text, within=3.0)
                except TimeoutException:
                    raise AssertionError(
                        f"{css} shows {text_of(driver, css)!r}, not {text!r}"
                    ) from None

            return waiting

        began = trio.current_time()
        # Plugged in through the simulator: its physics, its registers.
        w.rig.sim.set_ev({"plugged": True, "wants": "C", "phases": 3})
        await run(shows('[data-f="status"]', "Preparing"))
        plugged_shown = trio.current_time() - began
        assert plugged_shown < 1.0, f"Preparing shown after {plugged_shown:.2f} s"

        began = trio.current_time()
        result = await w.rig.station.present_id_tag(TAG)
        assert result.accepted
        await run(shows('[data-f="status"]', "Charging"))
        charging_shown = trio.current_time() - began
        assert charging_shown < 1.0, f"Charging shown after {charging_shown:.2f} s"
        tx = w.rig.station.tx
        assert tx is not None
        assert await run(text_of, driver, '[data-f="tx"]') == f"#{tx.id}"
        await run(
            wait_for,
            driver,
            lambda d: text_of(d, '[data-f="power"]') not in ("-", "0 W"),
        )
        print(
            f"browser shows Preparing {plugged_shown * 1000:.0f} ms after the plug-in, "
            f"Charging {charging_shown * 1000:.0f} ms after the tag"
        )
        # A few plot points, then the picture.
        await trio.sleep(4.0)
        await run(
            wait_for,
            driver,
            lambda d: d.find_elements(By.CSS_SELECTOR, "#plot-session svg polyline"),
        )
        weight = await run(
            driver.execute_script,
            "return performance.getEntriesByType('navigation').concat("
            "performance.getEntriesByType('resource').filter(e => !e.name.includes('/events')))"
            ".reduce((n, e) => n + (e.transferSize || 0), 0)",
        )
        print(f"first load as the browser counts it (transferSize): {weight} bytes")
        assert 0 < int(weight) <= 100_000
        path = await run(screenshot, driver, "web-status.png")
        print(f"status page screenshot: {path}")
        # The page escapes what it shows: a value never becomes markup.
        source = await run(lambda: driver.page_source)
        assert html.escape(TAG) in source

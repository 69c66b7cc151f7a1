"""The web extensions in a real headless Chromium (Debian's chromium, driven by Playwright)
against the real ComfyUI server: load the shipped UI workflow, check it is the shipped API
workflow, queue it from the page, and read the badge the canvas drew and the LoRA Cache panel.

Where the browser cannot start (no chromium binary, no playwright module, or the launch fails)
the test fails under CI (the CI environment variable set; scripts/setup_browser.sh installs both
there) and is skipped elsewhere, with the reason printed."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lora_cache_testkit import demo

CHROMIUM = os.environ.get("LORA_CACHE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LORA_NODE = 2  # the LoRA node's id in workflows/lora_cache_demo.json


pytestmark = [pytest.mark.server, pytest.mark.browser]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _skip(reason: str):
    """CI must run the browser test: there a browser that cannot start is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: the browser test must run here)", pytrace=False)
    print(f"\n[test_browser] SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _skip(f"the browser cannot start: Python package playwright is missing ({e}); run scripts/setup_browser.sh")
    if not Path(CHROMIUM).is_file():
        _skip(f"the browser cannot start: no chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, args=ARGS,
            headless=True, viewport={"width": 1700, "height": 860})
    except Exception as e:
        pw.stop()
        _skip(f"the browser cannot start: {CHROMIUM} failed to launch: {str(e).splitlines()[0]}")
    yield ctx
    ctx.close()
    pw.stop()


def _queue_and_wait(page, server, expect_path: str):
    """Queues the canvas' workflow from the page and waits until the badge drew `expect_path`."""
    page.evaluate(f"async () => {{ window.__lc_draws = app.graph.getNodeById({LORA_NODE}).loraCacheBadgeDraws ?? 0;"
                  " await app.queuePrompt(0, 1); }")
    page.wait_for_function(
        """([id, path]) => { const n = app.graph.getNodeById(id);
             return n.loraCacheEvent && n.loraCacheEvent.path === path && !n.loraCacheStale
               && (n.loraCacheBadgeDraws ?? 0) > window.__lc_draws && n.loraCacheBadgeText?.startsWith(path); }""",
        arg=[LORA_NODE, expect_path], timeout=60_000)
    assert server.wait_idle()
    return page.evaluate("""id => { const n = app.graph.getNodeById(id);
        return {event: n.loraCacheEvent, text: n.loraCacheBadgeText, events: n.loraCacheEvents.length}; }""", LORA_NODE)


def _format_bytes(n: float) -> str:
    """The panel's formatBytes (web/js/lora_cache_panel.js)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.{0 if i == 0 else 1}f} {units[i]}"


def test_badge_and_panel_in_real_chromium(browser_context, server, tmp_path):
    ui_wf = json.loads((demo.WORKFLOWS / "lora_cache_demo.json").read_text())
    api_wf = demo.load_api()
    page = browser_context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # a returning user: a fresh profile would open the template browser over the canvas
    assert server.request("POST", "/settings/Comfy.TutorialCompleted", True)[0] == 200
    templates = server.get("/workflow_templates")
    assert sorted(templates["lora_cache_loader"]) == ["lora_cache_compare", "lora_cache_demo", "lora_cache_sweep",
                                                      "stock_lora_demo"]
    page.goto(server.url)
    page.wait_for_function("() => window.app?.graph && app.extensionManager"
                           " && app.extensions?.some?.(e => e.name === 'lora_cache.panel')", timeout=90_000)
    names = page.evaluate("() => app.extensions.map(e => e.name)")
    assert {"lora_cache.badge", "lora_cache.panel", "lora_cache.saved_workflows"} <= set(names)

    # the shipped UI workflow loads, and the frontend turns it into the shipped API workflow
    prompt = page.evaluate("async wf => { await app.loadGraphData(wf, true, true, 'lora_cache_demo');"
                           " return (await app.graphToPrompt()).output; }", ui_wf)
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in api_wf.items()}

    # a workflow saved with the unmerged mode's former value shows it under its name
    old = json.loads(json.dumps(ui_wf))
    next(n for n in old["nodes"] if n["id"] == LORA_NODE)["widgets_values"][-1] = "dynamic"
    migrated = page.evaluate("async wf => { await app.loadGraphData(wf, true, true, 'old');"
                             " return (await app.graphToPrompt()).output; }", old)
    assert migrated[str(LORA_NODE)]["inputs"]["mode"] == "unmerged"
    page.evaluate("async wf => { await app.loadGraphData(wf, true, true, 'lora_cache_demo'); }", ui_wf)

    first = _queue_and_wait(page, server, "build")
    assert first["event"]["lora"] == "style.safetensors" and first["event"]["reason"].startswith("first use")
    assert first["text"].startswith("build · ") and " ms · first use" in first["text"]
    # the sampling that ran the adapter says under the node what it ran
    page.wait_for_function("id => app.graph.getNodeById(id).loraCacheBadgeText?.split('\\n')[1]"
                           "?.startsWith('sampling · merged copies: ')", arg=LORA_NODE, timeout=10_000)

    # unchanged prompt: ComfyUI serves the node from its cache, the badge must say so
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("id => app.graph.getNodeById(id).loraCacheStale === true", arg=LORA_NODE, timeout=60_000)
    page.wait_for_function("id => app.graph.getNodeById(id).loraCacheBadgeText?.startsWith('cached output')",
                           arg=LORA_NODE, timeout=10_000)
    assert server.wait_idle()

    set_enabled = ("([id, on]) => { const n = app.graph.getNodeById(id);"
                   " n.widgets.find(w => w.name === 'enabled').value = on; }")
    page.evaluate(set_enabled, [LORA_NODE, False])
    off = _queue_and_wait(page, server, "off")
    assert off["text"] == "off · " + off["text"].split(" · ", 1)[1] and off["event"]["reason"] == "disabled"
    page.evaluate(set_enabled, [LORA_NODE, True])
    fast = _queue_and_wait(page, server, "fast")
    assert "cached adapter" in fast["event"]["reason"] and fast["events"] == 1

    # the panel: open the sidebar tab, read the adapter row and the device totals
    page.click(".lora-cache-tab-button")
    row = page.wait_for_selector('[data-lora-cache="adapter"][data-name="style.safetensors"]', timeout=20_000)
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    stats = server.get("/lora_cache/stats")
    entry = next(a for a in stats["adapters"] if a["name"] == "style.safetensors")
    assert cells[0] == "style.safetensors" and cells[2] == "cpu" and cells[3] == "cache"
    assert cells[1].endswith("KiB") and abs(float(cells[1].split()[0]) - entry["bytes"] / 1024) < 0.1
    assert page.inner_text('[data-lora-cache="device"][data-device="cpu"] td:nth-child(2)') == cells[1]
    # the budget column shows the memory owner's limit for the device and where it comes from
    budget = page.query_selector('[data-lora-cache="device"][data-device="cpu"] [data-lora-cache="budget"]')
    limit = stats["memory"]["device"]["cpu"]
    assert budget.inner_text() == _format_bytes(limit["limit"]) and budget.get_attribute("title") == limit["source"]
    # the merged copies the samplings keep on the device
    copies = page.query_selector('[data-lora-cache="device"][data-device="cpu"] [data-lora-cache="copies"]')
    held = stats["memory"]["copies"]["cpu"]
    assert held["layers"] > 0 and copies.inner_text() == _format_bytes(held["bytes"])
    assert copies.get_attribute("title") == f"{held['layers']} layers"
    # frame the graph for the screenshot: the LoRA node and its badge beside the open panel
    page.evaluate("() => { app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [460, 150];"
                  " app.canvas.setDirty(true, true); }")
    for close in page.query_selector_all("[aria-label='Close'], .p-message-close"):
        try:
            close.click(timeout=1000)
        except Exception:
            pass  # banners differ between frontend versions; the screenshot does not depend on them
    page.wait_for_timeout(500)
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot))
    if os.environ.get("LORA_CACHE_SCREENSHOT"):
        shutil.copy(shot, os.environ["LORA_CACHE_SCREENSHOT"])
    assert shot.stat().st_size > 10_000

    page.click('[data-lora-cache="purge"]')
    page.wait_for_function("() => document.querySelector('[data-lora-cache=\"status\"]')"
                           "?.textContent.startsWith('Purged')", timeout=20_000)
    assert page.query_selector('[data-lora-cache="adapter"]') is None
    assert server.get("/lora_cache/stats")["adapters"] == []
    assert not errors, errors

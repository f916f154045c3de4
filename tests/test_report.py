"""report.html (self-contained), the batch index, and `fastdream view`, checked as files, over HTTP and in
a real headless Chromium (skipped, with the reason, where Chromium, its driver or selenium are missing)."""
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fastdream import runs
from fastdream.cli import main
from fastdream.report import write_index
from fastdream.view import ViewServer

from test_run import TINY, scene_path  # noqa: F401  (fixture)

STEPS = 12


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, scene_path):  # noqa: F811
    out = tmp_path_factory.mktemp("report") / "two-spheres"
    runs.run("two spheres", out, quiet=True, cli={"steps": STEPS, "device": "cpu", "guidance": "reference",
                                                    "reference_scene": str(scene_path)},
              overrides=TINY + ["output.preview_every=4", "output.video_frames=4", "output.metrics_every=5"])
    return out


def page_data(html: str):
    return json.loads(re.search(r'<script id="fd-data" type="application/json">(.*?)</script>', html, re.S).group(1)
                      .replace("<\\/", "</"))


def test_report_is_self_contained(tiny_run):
    html = (tiny_run / "report.html").read_text()
    data = page_data(html)
    assert data["prompt"] == "two spheres" and not data["live"]
    assert [p["step"] for p in data["previews"]] == [4, 8, 12]
    assert len(data["rows"]) == STEPS and data["metrics"]["steps"] == STEPS
    media = [p["src"] for p in data["previews"]] + [v["src"] for v in data["videos"].values()] + [data["glb"]]
    assert set(data["videos"]) == {"colour", "textureless"}
    assert all(m.startswith("data:") for m in media)
    assert data["glb"].startswith("data:model/gltf-binary;base64,")
    assert "<script src=" not in html and 'src="http' not in html and "customElements.define(\"model-viewer\"" in html


def test_export_rewrites_the_report(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "report.html").unlink()
    assert main(["export", str(run), "--device", "cpu", "--no-mesh", "--no-video"]) == 0
    assert page_data((run / "report.html").read_text())["prompt"] == "two spheres"


def make_batch(tiny_run, root: Path) -> Path:
    shutil.copytree(tiny_run, root / "two-spheres-0123abcd")
    (root / "a-cat-89abcdef").mkdir()
    summary = {"prompts": [
        {"prompt": "two spheres", "folder": str(root / "two-spheres-0123abcd"), "status": "done", "seconds": 12.5},
        {"prompt": "a cat", "folder": str(root / "a-cat-89abcdef"), "status": "failed", "seconds": 1.0, "error": "boom"}]}
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "eval.json").write_text(json.dumps({"metric": "CLIP R-Precision (R=1): ...", "runs": [
        {"run": str(root / "two-spheres-0123abcd"), "results": {"ViT-B-32": {"color": {"hits": 3, "views": 4}}}}]}))
    return root


def test_batch_index_has_one_card_per_prompt(tiny_run, tmp_path):
    root = make_batch(tiny_run, tmp_path / "batch")
    data = page_data(write_index(root).read_text())
    done, failed = data["cards"]
    assert (done["prompt"], done["status"], done["seconds"]) == ("two spheres", "done", 12.5)
    assert done["href"] == "two-spheres-0123abcd/report.html" and done["thumb"].startswith("data:image/png")
    assert done["r_precision"] == "3/4 (ViT-B-32)"
    assert (failed["status"], failed["thumb"], failed["r_precision"], failed["error"]) == ("failed", None, None, "boom")


# ---------------------------------------------------------------------------------------------- server

def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


@pytest.fixture
def served(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "served")
    server = ViewServer(run, port=0)
    server.start()
    yield run, server
    server.shutdown()
    server.server_close()


def test_view_serves_live_page_data_and_files(served):
    run, server = served
    assert server.server_address[0] == "127.0.0.1"
    status, body = get(server.url)
    data = page_data(body.decode())
    assert status == 200 and data["live"] and data["previews"][0]["src"].startswith("files/previews/step_00004.png?v=")
    assert '<script type="module" src="/vendor/model-viewer.min.js">' in body.decode()
    assert get(server.url + data["previews"][0]["src"])[1] == (run / "previews" / "step_00004.png").read_bytes()
    assert len(json.loads(get(server.url + "api/data")[1])["rows"]) == STEPS
    for bad in ("files/../config.yaml", "files/%2e%2e/%2e%2e/etc/passwd", "files/nothing.png", "nowhere"):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(server.url + bad)
        assert err.value.code == 404


def test_view_serves_a_batch(tiny_run, tmp_path):
    root = make_batch(tiny_run, tmp_path / "batch")
    server = ViewServer(root, port=0)
    server.start()
    try:
        data = page_data(get(server.url)[1].decode())
        assert data["kind"] == "index" and data["cards"][0]["href"] == "run/two-spheres-0123abcd/"
        run_page = page_data(get(server.url + "run/two-spheres-0123abcd/")[1].decode())
        assert run_page["kind"] == "run" and run_page["prompt"] == "two spheres"
        assert get(server.url + "run/two-spheres-0123abcd/" + run_page["glb"])[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_view_refuses_remote_binding_without_the_flag(tmp_path, capsys):
    assert main(["view", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- browser

def _browser_or_skip():
    chromium = os.environ.get("FASTDREAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("FASTDREAM_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'fastdream[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="fastdream-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1200,1400",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options), profile


@pytest.fixture(scope="module")
def browser():
    driver, profile = _browser_or_skip()
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for: {script}")


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# renders the mesh viewer from a camera orbit and returns (non-background pixels, a hash of the image)
SNAPSHOT = """
var mv = document.getElementById('mesh-viewer'), done = arguments[arguments.length - 1];
mv.cameraOrbit = arguments[0]; mv.jumpCameraToGoal();
requestAnimationFrame(() => requestAnimationFrame(() => {
  var img = new Image();
  img.onload = () => {
    var c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
    var x = c.getContext('2d'); x.drawImage(img, 0, 0);
    var p = x.getImageData(0, 0, c.width, c.height).data, n = 0, h = 0;
    for (var i = 0; i < p.length; i += 4) {
      if (Math.abs(p[i] - p[0]) + Math.abs(p[i + 1] - p[1]) + Math.abs(p[i + 2] - p[2]) > 30) n++;
      h = (h * 31 + p[i] + 7 * p[i + 1] + 13 * p[i + 2]) | 0;
    }
    done([n, h]);
  };
  img.src = mv.toDataURL('image/png');
}));
"""

CURVE_INK = """
return Array.from(document.querySelectorAll('canvas.curve-canvas')).map(c => {
  var p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
  for (var i = 0; i < p.length; i += 4) if (p[i + 2] > p[i] + 60) n++;  // the blue of the line
  return [c.dataset.key, n];
});
"""


def test_report_in_a_browser(browser, tiny_run):
    browser.get((tiny_run / "report.html").as_uri())
    wait_for(browser, "var m = document.getElementById('mesh-viewer'); return m && m.loaded && m.modelIsVisible;", 60)
    front, side = (browser.execute_async_script(SNAPSHOT, orbit) for orbit in ("0deg 75deg 105%", "90deg 30deg 105%"))
    assert front[0] > 2000 and side[0] > 2000, (front, side)  # the mesh covers a good part of the canvas
    assert front[1] != side[1]  # and looks different from another angle
    slider_step = "return [document.getElementById('preview-slider').value, document.getElementById('preview-img').dataset.step]"
    assert browser.execute_script(slider_step) == ["2", "12"]
    browser.execute_script("var s = document.getElementById('preview-slider'); s.value = 0;"
                           "s.dispatchEvent(new Event('input'));")
    assert browser.execute_script(slider_step) == ["0", "4"]
    assert wait_for(browser, "return document.getElementById('preview-img').naturalWidth > 0")
    ink = dict(browser.execute_script(CURVE_INK))
    assert {"loss", "sds_grad_norm", "t", "occupancy", "samples_per_ray"} <= set(ink) and min(ink.values()) > 20, ink
    assert console_errors(browser) == []
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(("data:", "blob:", "file:")) for r in resources), resources  # nothing from the network


def test_live_view_picks_up_new_previews_and_points(browser, served):
    run, server = served
    browser.get(server.url)
    wait_for(browser, "return document.getElementById('preview-img').dataset.step === '12'")
    before = dict(browser.execute_script(CURVE_INK))["loss"]
    shutil.copy(run / "previews" / "step_00004.png", run / "previews" / "step_00016.png")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    extra = [dict(rows[-1], step=STEPS + i, loss=rows[-1]["loss"] * 3 + 1) for i in range(1, 5)]
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in extra))
    wait_for(browser, "return document.getElementById('preview-img').dataset.step === '16'", 15)
    assert browser.execute_script("return document.getElementById('preview-slider').max") == "3"
    assert wait_for(browser, "return window.fastdreamReport.data.rows.length") == STEPS + 4
    assert dict(browser.execute_script(CURVE_INK))["loss"] != before
    assert console_errors(browser) == []

"""The server end to end on the shipped demo model: `python -m lumina_jax.serve` in a child process, its HTTP
API, concurrent requests sharing generate calls, and the page in a real headless Chromium (Debian's package,
driven by Playwright). The page screenshot is saved under test-artifacts/ (LUMINA_TEST_ARTIFACTS overrides).

All tests share one server (one compiled decode program), so they run on one pytest worker (xdist group)."""
import base64
import concurrent.futures
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from lumina_jax.demo.shape_analysis import analyse
from lumina_jax.testing.serve import ServerProcess, request

pytestmark = pytest.mark.xdist_group("serve")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("LUMINA_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM = "/usr/bin/chromium"
# No outside network here: without the background-networking flags Chromium stalls on refused connections.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_BATCH = 4
PROMPT = "a red circle on a blue background"
WAIT_MS = 300_000  # generous browser timeouts: the first request compiles the decode program


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # a long --max-wait-ms: four requests sent at once always meet (a full batch starts at once anyway)
    with ServerProcess(["--max-batch", str(MAX_BATCH), "--max-wait-ms", "2000"], log_path=log) as s:
        yield s
    assert s.proc.returncode == 0, s.log_tail()  # SIGTERM: a clean shutdown
    assert "Traceback" not in s.log_tail(100_000)  # refusals are answers, not server errors


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="lumina-chromium-")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                    headless=True, viewport={"width": 1100, "height": 760},
                                                    accept_downloads=True)
        ctx.set_default_timeout(WAIT_MS)
        yield ctx
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


def _png(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# ---- HTTP API ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, message", [
    (dict(prompt=""), 400, "task 't2i' needs a text prompt"),
    (dict(prompt=PROMPT, size="100x100"), 400, "size 100x100 is not on the crop list for target size 128"),
    (dict(prompt=PROMPT, guidance=float("nan")), 400, "must be a finite number, got nan"),
    (dict(prompt=PROMPT, guidance_floor=2.0), 400, "must be in [0, 1)"),
    (dict(prompt=PROMPT, seed=-5), 400, "seed must be an integer in [0, 4294967295]"),
    (dict(prompt=PROMPT, num_images=50, format="base64"), 400, "number of images must be an integer from 1 to 8"),
    (dict(prompt=PROMPT, num_images=2), 400, "format png returns one image"),
    (dict(prompt=3), 422, "prompt: Input should be a valid string"),
    (dict(prompt=PROMPT, colour="red"), 422, "colour: Extra inputs are not permitted"),
    (dict(prompt=PROMPT, format="jpeg"), 422, "format: Input should be 'png' or 'base64'"),
])
def test_api_refuses_bad_requests_with_a_4xx_line(server, body, status, message):
    code, ctype, data = server.t2i(**body)
    assert (code, ctype) == (status, "application/json")
    assert list(json.loads(data)) == ["error"] and message in json.loads(data)["error"]


def test_api_keeps_serving_after_refusals_and_answers_a_png(server):
    assert server.t2i(prompt="")[0] == 400
    code, ctype, data = server.t2i(prompt=PROMPT, size="128x128", seed=0)
    assert (code, ctype) == (200, "image/png")
    seen = analyse(_png(data))
    assert (seen.size, seen.background, seen.colour) == ((128, 128), "blue", "red")


def test_four_concurrent_requests_share_generate_calls_and_each_equals_its_request_served_alone(server):
    prompts = [PROMPT, "a white square on a green background", "a yellow triangle on a black background", PROMPT]
    bodies = [dict(prompt=p, seed=s, format="base64") for p, s in zip(prompts, [0, 11, 22, 33])]
    before = server.info()["served"]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: server.t2i(**b), bodies))
    middle = server.info()["served"]
    alone = [server.t2i(**b) for b in bodies]
    after = server.info()["served"]
    assert middle["requests"] - before["requests"] == 4
    assert middle["generate_calls"] - before["generate_calls"] < 4  # counted by the server's batcher
    assert after["generate_calls"] - middle["generate_calls"] == 4  # really alone: one call each
    decoded = []
    for t, a in zip(together, alone):
        assert t[0] == a[0] == 200
        rt, ra = json.loads(t[2])["results"][0], json.loads(a[2])["results"][0]
        assert rt["png_base64"] == ra["png_base64"] and rt["seed"] == ra["seed"]  # bit for bit
        decoded.append(_png(base64.b64decode(rt["png_base64"][0])))
    assert len({im.tobytes() for im in decoded}) == 4  # different prompts and seeds: four different images


def test_gradio_api_runs_an_omni_task_and_a_chat_turn_with_an_image(server, tmp_path):
    """The other two tabs through Gradio's own API (gradio_client): an image in, an image out."""
    from gradio_client import Client, handle_file

    photo = tmp_path / "blue.png"
    Image.new("RGB", (100, 90), (40, 75, 215)).save(photo)
    client = Client(server.url, verbose=False)
    gallery, _, files = client.predict("depth", handle_file(str(photo)), "", "128x128", 0, api_name="/image_to_image")
    assert len(gallery) == 1 and Image.open(gallery[0]["image"]).size == (128, 128)
    assert sorted(Path(f).suffix for f in files) == [".json", ".png"]
    messages, box = client.predict({"text": "What is this?", "files": [handle_file(str(photo))]}, 0, api_name="/chat")
    user = [m for m in messages if m["role"] == "user"]
    assert [c["type"] for m in user for c in m["content"]] == ["text", "file"] and not (box or {}).get("files")
    assert any(m["role"] == "assistant" for m in messages)


# ---- the page in a real browser --------------------------------------------------------------------------------
def test_browser_generates_a_red_circle_on_blue_and_downloads_it(server, browser):
    page = browser.new_page()
    page.goto(server.url)
    page.locator("#t2i-prompt textarea").fill(PROMPT)
    page.locator("#t2i-size input").click()
    page.get_by_role("option", name="128x128", exact=True).click()
    page.locator("#t2i-run").click()
    page.wait_for_function("() => { const i = document.querySelector('#t2i-gallery img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert page.locator("#t2i-gallery img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 128]
    with page.expect_download() as download:
        page.locator("#t2i-files a[download$='.png']").first.click()
    seen = analyse(_png(Path(download.value.path()).read_bytes()))
    assert seen.size == (128, 128) and seen.background == "blue" and seen.colour == "red"
    settings = json.loads(page.locator("#t2i-files a[download$='.json']").first.evaluate(
        "a => fetch(a.href).then(r => r.text())"))
    assert settings["settings"]["size"] == "128x128" and settings["seed"] == 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "serve_text_to_image.png"))
    page.close()


def test_browser_shows_refusals_in_the_page_and_the_api_answers_400(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server.url)
    fetched = page.evaluate("""async () => {
        const r = await fetch('/api/t2i', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                           body: JSON.stringify({prompt: 'a red circle', size: '100x100'})});
        return [r.status, await r.json()]; }""")
    assert fetched[0] == 400 and "size 100x100 is not on the crop list" in fetched[1]["error"]
    # the same off-list size typed into the page's size box
    page.locator("#t2i-prompt textarea").fill(PROMPT)
    size = page.locator("#t2i-size input")
    size.click()
    size.fill("100x100")
    size.press("Enter")
    page.locator("#t2i-run").click()
    page.get_by_text("size 100x100 is not on the crop list").first.wait_for()
    # an empty prompt (at a valid size), and a file that is not an image in the image-to-image tab
    size.click()
    page.get_by_role("option", name="128x128", exact=True).click()
    page.locator("#t2i-prompt textarea").fill("")
    page.locator("#t2i-run").click()
    page.get_by_text("task 't2i' needs a text prompt").first.wait_for()
    page.get_by_role("tab", name="Image to image").click()
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture")
    page.locator("#i2i-image input[type=file]").set_input_files(str(fake))
    page.locator("#i2i-image").get_by_text("holiday.png").first.wait_for()
    page.locator("#i2i-run").click()
    page.get_by_text("holiday.png: not an image file").first.wait_for()
    assert "Traceback" not in page.content()
    page.close()
    assert request(server.url + "/api/info")[0] == 200  # still serving

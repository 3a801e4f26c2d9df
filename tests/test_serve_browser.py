"""The feedback page in a real browser: headless Chromium (Debian's package) driven by selenium.

Chat with the model (the answer streams in), rate it with tags and a correction, reload and find
the rating; and an answer that holds HTML and ``<script>`` is shown as text and runs nothing.
Skips when Chromium or its driver is not installed (``apt-get install -y chromium
chromium-driver``). ``SERVE_SCREENSHOT=PATH`` also keeps the page's screenshot there.
"""

from __future__ import annotations

import os
import shutil

from helpers_serve import NEW, load, make_chat_hf_folder, running
import pytest

from astrollama_jax.feedback.store import FeedbackStore
from astrollama_jax.generation import GenerationResult

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
  pytest.skip(
    f"{CHROMIUM} or {DRIVER} not installed (apt-get install -y chromium chromium-driver)",
    allow_module_level=True,
  )
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402 - only once selenium is known present
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

INJECTION = (
  '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"> <b>bold</b> & "q"'
)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_path):
  path = tmp_path_factory.mktemp("tiny_chat")
  make_chat_hf_folder(path, tokenizer_path)
  return load(path)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1000",
    f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
  ):
    options.add_argument(arg)
  service = webdriver.ChromeService(executable_path=DRIVER)
  driver = webdriver.Chrome(service=service, options=options)
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


def wait(driver, condition, timeout=180):
  return WebDriverWait(driver, timeout).until(condition)


def open_page(driver, url):
  driver.get(url + "/")
  wait(driver, lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)


def fill(driver, element_id, text):
  box = driver.find_element(By.ID, element_id)
  box.clear()
  box.send_keys(text)


def ask(driver, question):
  """Send ``question``; return (the finished answer element, how many text updates it had)."""
  before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
  driver.execute_script("""
      window.updates = 0;
      new MutationObserver((ms) => { for (const m of ms) if (m.target.classList &&
          m.target.classList.contains('text')) window.updates++; })
        .observe(document.getElementById('chat'), {subtree: true, childList: true});""")
  fill(driver, "question", question)
  driver.find_element(By.ID, "send").click()
  wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) > before)
  answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[-1]
  return answer, driver.execute_script("return window.updates")


def test_chat_rate_with_a_correction_and_find_it_after_a_reload(model, browser, tmp_path):
  store = FeedbackStore(tmp_path / "ratings.sqlite")
  with running(model, feedback=store) as (srv, _):
    open_page(browser, srv.url)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    fill(browser, "temperature", "0")
    fill(browser, "max_tokens", str(NEW))
    fill(browser, "system", "You are an astronomer.")
    box, updates = ask(browser, "What is a quasar?")
    text = box.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
    assert text and updates >= 2, "the answer should arrive in several streamed pieces"
    import openai

    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    msgs = [
      {"role": "system", "content": "You are an astronomer."},
      {"role": "user", "content": "What is a quasar?"},
    ]
    direct = c.chat.completions.create(
      model="tiny-chat", temperature=0, max_tokens=NEW, top_p=0.9, messages=msgs
    )
    assert text == direct.choices[0].message.content

    box.find_element(By.CSS_SELECTOR, ".stars button[data-score='2']").click()
    box.find_element(By.CSS_SELECTOR, ".tags input[value='hallucination']").click()
    box.find_element(By.CLASS_NAME, "more-tags").send_keys("Units, needs source")
    correction = "A quasar is an accreting supermassive black hole in a galaxy's nucleus."
    box.find_element(By.CLASS_NAME, "correction").send_keys(correction)
    box.find_element(By.CLASS_NAME, "save").click()
    wait(browser, lambda d: "saved as rating #1" in box.find_element(By.CLASS_NAME, "saved").text)
    (row,) = store.rows()
    assert (row["rating"], row["correction"], row["answer"]) == (2, correction, text)
    assert row["tags"] == ["hallucination", "units", "needs source"]
    assert row["messages"] == [
      {"role": "system", "content": "You are an astronomer."},
      {"role": "user", "content": "What is a quasar?"},
    ]
    assert row["sampling"]["temperature"] == 0 and row["sampling"]["max_tokens"] == NEW
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SERVE_SCREENSHOT"):
      shutil.copyfile(shot, os.environ["SERVE_SCREENSHOT"])

    browser.refresh()
    open_page(browser, srv.url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ratings li"))
    listed = browser.find_element(By.CSS_SELECTOR, "#ratings li").text
    assert "#1" in listed and "rating 2/5" in listed and correction in listed
    assert "hallucination, units, needs source" in listed


def echo_last_user_message(
  cfg, params, prompts, max_new_tokens, *, tokenizer, stream=None, chunk_size=None, **_
):
  """A stand-in model with ``generate``'s signature that answers with the question it was asked."""
  texts = [
    tokenizer.decode(p).rsplit("[INST]", 1)[-1].rsplit("[/INST]", 1)[0].strip() for p in prompts
  ]
  ids = [tokenizer.encode(t, bos=False)[:max_new_tokens] for t in texts]
  step = chunk_size or 4
  for start in range(0, max(len(i) for i in ids), step):
    if stream is not None:
      stream([i[start : start + step] for i in ids])
  return GenerationResult(ids, texts, ["eos"] * len(ids), [len(p) for p in prompts])


def test_an_answer_with_html_and_script_shows_as_text_and_runs_nothing(model, browser, tmp_path):
  store = FeedbackStore(tmp_path / "ratings.sqlite")
  with running(model, feedback=store, generate_fn=echo_last_user_message) as (srv, _):
    open_page(browser, srv.url)
    box, _ = ask(browser, INJECTION)
    assert box.find_element(By.CLASS_NAME, "text").get_attribute("textContent") == INJECTION
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")[-1]
    assert user.get_attribute("textContent") == INJECTION
    assert_nothing_ran(browser, "#chat")
    box.find_element(By.CSS_SELECTOR, ".stars button[data-score='1']").click()
    box.find_element(By.CLASS_NAME, "correction").send_keys("<i>also text</i>")
    box.find_element(By.CLASS_NAME, "save").click()
    wait(browser, lambda d: "saved" in box.find_element(By.CLASS_NAME, "saved").text)
    browser.refresh()
    open_page(browser, srv.url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ratings li"))
    assert INJECTION in browser.find_element(By.CSS_SELECTOR, "#ratings li").text
    assert "<i>also text</i>" in browser.find_element(By.CSS_SELECTOR, "#ratings li").text
    assert_nothing_ran(browser, "#ratings")
    assert store.rows()[0]["answer"] == INJECTION


def assert_nothing_ran(browser, where):
  assert browser.execute_script("return window.pwned === undefined")
  for tag in ("script", "img", "b", "i"):
    assert not browser.find_elements(By.CSS_SELECTOR, f"{where} {tag}"), (where, tag)

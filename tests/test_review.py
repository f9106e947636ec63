"""The review page of a round (``python -m data round review``): the real server (uvicorn, in a subprocess)
and the real page in headless Chromium. Access needs the token; only the round's samples can be read;
decisions are saved as made, survive reloads and a SIGKILLed server, and several pages share a round."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from data.__main__ import main
from data.review_journal import JOURNAL_NAME, DecisionJournal
from support.review import ReviewServer, chromium_driver, write_fake_round


@pytest.fixture
def round_dir(tmp_path: Path) -> Path:
    write_fake_round(tmp_path / "round-1", 5)
    return tmp_path / "round-1"


@pytest.fixture
def browser(tmp_path: Path):
    driver = chromium_driver(tmp_path / "profile")
    yield driver
    driver.quit()


def journal_lines(round_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (round_dir / JOURNAL_NAME).read_text().splitlines()]


def server_decisions(server: ReviewServer) -> dict[str, str]:
    status, body = server.request("GET", f"/api/state?token={server.token}")
    assert status == 200, body
    return json.loads(body)["decisions"]


def sample_id(index: int) -> str:
    return f"{index:05d}_seed{100 + index}_prompt-{index}"


# -- the page in Chromium --------------------------------------------------------------------


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes")


def wait_for(driver, condition, timeout: float = 20) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def shown(driver) -> dict[str, str]:
    """What the page shows: the current sample, its decision, unsaved decisions, the header's counts."""
    body = driver.find_element(By.TAG_NAME, "body")
    return {"current": body.get_attribute("data-current"), "decision": body.get_attribute("data-decision"),
            "pending": body.get_attribute("data-pending"), "progress": driver.find_element(By.ID, "progress").text,
            "position": driver.find_element(By.ID, "position").text}  # fmt: skip


def settled(driver) -> dict[str, str]:
    """``shown`` once every decision made on the page has been acknowledged by the server."""
    wait_for(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-pending") == "0")
    return shown(driver)


def press(driver, key: str) -> None:
    driver.find_element(By.TAG_NAME, "body").send_keys(key)


def test_pick_reject_undo_with_keys_and_mouse_then_reload_finds_the_state(round_dir: Path, browser) -> None:
    with ReviewServer(round_dir) as server:
        open_page(browser, server.page())
        assert shown(browser) == {"current": sample_id(0), "decision": "undecided", "pending": "0",
                                  "progress": "0 of 5 decided, 0 picked", "position": "sample 1 of 5"}
        assert browser.find_element(By.ID, "prompt").text == "prompt number 0"
        # the four views (checkerboard, black, white, alpha) show decoded images of the sample
        wait_for(browser, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
                                        == 16 for image in d.find_elements(By.CSS_SELECTOR, ".views img")))
        sources = [image.get_attribute("src") for image in browser.find_elements(By.CSS_SELECTOR, ".views img")]
        assert [source.split("?")[0].rsplit("/", 2)[-2:] for source in sources] == [[sample_id(0), "image.png"]] * 3 + [
            [sample_id(0), "alpha.png"]]

        press(browser, "p")  # pick with the keyboard: saved, and on to the next undecided sample
        assert settled(browser)["current"] == sample_id(1)
        browser.find_element(By.ID, "reject").click()  # reject with the mouse
        assert settled(browser)["current"] == sample_id(2)
        press(browser, Keys.ARROW_RIGHT)  # skip sample 2 for now
        press(browser, "x")
        assert settled(browser)["current"] == sample_id(4)
        browser.find_element(By.ID, "pick").click()
        state = settled(browser)
        assert state["current"] == sample_id(2) and state["progress"] == "4 of 5 decided, 2 picked"  # wrapped around

        press(browser, "u")  # undo the last decision: sample 4 undecided again, and shown
        assert settled(browser) == {"current": sample_id(4), "decision": "undecided", "pending": "0",
                                    "progress": "3 of 5 decided, 1 picked", "position": "sample 5 of 5"}
        browser.find_element(By.ID, "undo").click()  # and the one before: sample 3 undecided again
        assert settled(browser)["current"] == sample_id(3)
        press(browser, Keys.ARROW_LEFT)
        assert shown(browser)["current"] == sample_id(2)

        expected = {sample_id(0): "picked", sample_id(1): "rejected"}
        assert server_decisions(server) == expected
        assert [(line["sample"], line["decision"]) for line in journal_lines(round_dir)] == [
            (sample_id(0), "picked"), (sample_id(1), "rejected"), (sample_id(3), "rejected"), (sample_id(4), "picked"),
            (sample_id(4), "undecided"), (sample_id(3), "undecided")]

        browser.refresh()  # a reload (or a reviewer coming back) opens at the first undecided sample
        wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes")
        assert shown(browser) == {"current": sample_id(2), "decision": "undecided", "pending": "0",
                                  "progress": "2 of 5 decided, 1 picked", "position": "sample 3 of 5"}
        press(browser, Keys.ARROW_LEFT)
        assert shown(browser)["decision"] == "rejected"  # sample 1, as decided before the reload


def test_two_pages_at_once_keep_both_decisions_and_see_each_others(round_dir: Path, browser) -> None:
    with ReviewServer(round_dir) as server:
        open_page(browser, server.page())
        first = browser.current_window_handle
        browser.switch_to.new_window("window")
        open_page(browser, server.page())
        second = browser.current_window_handle
        assert shown(browser)["current"] == sample_id(0)  # both pages loaded before either decided

        browser.switch_to.window(first)
        press(browser, "p")  # sample 0
        settled(browser)
        browser.switch_to.window(second)
        press(browser, Keys.ARROW_RIGHT)
        press(browser, "x")  # sample 1
        settled(browser)
        assert server_decisions(server) == {sample_id(0): "picked", sample_id(1): "rejected"}

        # the same sample decided on both pages: the last decision stands, and the other page shows it
        for window, key in ((first, "p"), (second, "x")):
            browser.switch_to.window(window)
            for _ in range(5):  # round the five samples to sample 3
                if shown(browser)["current"] == sample_id(3):
                    break
                press(browser, Keys.ARROW_RIGHT)
            press(browser, key)
            settled(browser)
        assert server_decisions(server)[sample_id(3)] == "rejected"
        browser.switch_to.window(first)
        press(browser, Keys.ARROW_LEFT)
        assert shown(browser)["current"] == sample_id(3)
        wait_for(browser, lambda d: shown(d)["decision"] == "rejected", timeout=10)  # the page's polling
        assert shown(browser)["progress"] == "3 of 5 decided, 1 picked"


def test_a_killed_server_restarted_resumes_exactly(round_dir: Path, browser) -> None:
    server = ReviewServer(round_dir)
    try:
        open_page(browser, server.page())
        for key in ("p", "x", "p"):
            press(browser, key)
        assert settled(browser)["current"] == sample_id(3)
        server.kill()  # SIGKILL: no shutdown, no flush beyond each decision's own fsync

        press(browser, "p")  # made while the server is gone: reported, and not kept
        wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "NOT saved" in browser.find_element(By.ID, "error").text
        assert settled(browser)["progress"] == "3 of 5 decided, 2 picked"
    finally:
        server.stop()
    with ReviewServer(round_dir) as restarted:
        assert any("3 of 5 decided, 2 picked; the page opens at sample 4" in line for line in restarted.lines)
        open_page(browser, restarted.page())
        assert shown(browser) == {"current": sample_id(3), "decision": "undecided", "pending": "0",
                                  "progress": "3 of 5 decided, 2 picked", "position": "sample 4 of 5"}
    assert [line["decision"] for line in journal_lines(round_dir)] == ["picked", "rejected", "picked"]


def test_a_forged_token_gets_a_403_page(round_dir: Path, browser) -> None:
    with ReviewServer(round_dir) as server:
        browser.get(server.page(token=server.token[:-1] + ("A" if server.token[-1] != "A" else "B")))
        assert "403 Forbidden" in browser.find_element(By.TAG_NAME, "body").text
        assert browser.find_elements(By.ID, "pick") == []


# -- the server over plain HTTP --------------------------------------------------------------


def test_every_request_needs_the_whole_token(round_dir: Path) -> None:
    with ReviewServer(round_dir) as server:
        good = f"?token={server.token}"
        assert server.request("GET", "/" + good)[0] == 200
        image = f"/samples/{sample_id(0)}/image.png"
        assert server.request("GET", image + good)[0] == 200
        for query in ("", "?token=", f"?token={server.token[:-1]}", f"?token={server.token}x", f"?key={server.token}",
                      f"?token=wrong&token={server.token}"):  # fmt: skip
            for method, path in (("GET", "/"), ("GET", "/api/state"), ("GET", image), ("POST", "/api/decisions")):
                body = json.dumps({"sample": sample_id(0), "decision": "picked"}).encode() if method == "POST" else None
                status, content = server.request(method, path + query, body)
                assert status == 403, (method, path + query, status)
                assert b"PNG" not in content and b"prompt number" not in content
        assert not (round_dir / JOURNAL_NAME).read_text()  # no forged decision was written


def test_no_path_outside_the_round_can_be_read(round_dir: Path) -> None:
    secret = round_dir.parent / "secret.txt"
    secret.write_text("do not serve me")
    with ReviewServer(round_dir) as server:
        token = f"?token={server.token}"
        refused = {
            "/samples/../../secret.txt/image.png": 404,
            "/samples/../secret.txt": 404,
            "/../secret.txt": 404,
            "/samples/..%2F..%2Fsecret.txt/image.png": 404,
            "/samples/%2e%2e%2f%2e%2e%2fsecret.txt/image.png": 404,
            "/samples/%2e%2e/image.png": 400,
            "/samples/..%252F..%252Fsecret.txt/image.png": 400,  # encoded twice
            f"/samples/{secret}/image.png": 404,
            "/samples/%2Fetc%2Fpasswd/image.png": 404,
            "//etc/passwd": 404,
            "/round.json": 404,
            "/samples/round/image.png": 404,
            f"/generated/{sample_id(0)}.png": 404,
        }
        for path, status in refused.items():
            answer, content = server.request("GET", path + token)
            assert answer == status, (path, answer, content[:200])
            assert b"do not serve me" not in content and b"root:" not in content


def test_decisions_sent_at_once_are_all_written_one_per_line(tmp_path: Path) -> None:
    round_dir = tmp_path / "round-many"
    write_fake_round(round_dir, 40)
    with ReviewServer(round_dir) as server:
        answers: list[int] = []

        def decide(indices: range) -> None:
            for index in indices:
                body = json.dumps({"sample": sample_id(index), "decision": "picked" if index % 2 else "rejected"})
                answers.append(server.request("POST", f"/api/decisions?token={server.token}", body.encode())[0])

        threads = [threading.Thread(target=decide, args=(range(start, 40, 8),)) for start in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [200] * 40
        decisions = server_decisions(server)
        assert decisions == {sample_id(index): "picked" if index % 2 else "rejected" for index in range(40)}
        status, body = server.request("GET", f"/api/decisions?after=38&token={server.token}")
        assert status == 200 and [event["sequence"] for event in json.loads(body)["decisions"]] == [39, 40]
        bad = {"decision": "maybe", "sample": sample_id(0)}, {"decision": "picked", "sample": "../round.json"}
        assert [server.request("POST", f"/api/decisions?token={server.token}", json.dumps(entry).encode())[0]
                for entry in bad] == [400, 404]
    assert len(journal_lines(round_dir)) == 40


def test_a_decision_cut_short_by_a_crash_is_dropped_and_the_journal_goes_on(round_dir: Path) -> None:
    ids = [sample_id(index) for index in range(5)]
    journal = DecisionJournal(round_dir / JOURNAL_NAME, ids)
    journal.record(ids[0], "picked")
    journal.close()
    with open(round_dir / JOURNAL_NAME, "ab") as handle:
        handle.write(b'{"sample": "00001_se')  # a write the kill interrupted: never acknowledged
    with ReviewServer(round_dir) as server:
        assert any("dropped a decision cut short by a crash" in line for line in server.lines)
        assert server_decisions(server) == {ids[0]: "picked"}
        body = json.dumps({"sample": ids[1], "decision": "rejected"}).encode()
        assert server.request("POST", f"/api/decisions?token={server.token}", body)[0] == 200
    assert [line["sample"] for line in journal_lines(round_dir)] == ids[:2]  # the new line is not glued to the torn one

    (round_dir / JOURNAL_NAME).write_text('{"sample": "00000_seed100_prompt-0", "decision": "picked", "time": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"review.jsonl:2: not a JSON line"):
        DecisionJournal(round_dir / JOURNAL_NAME, ids)
    (round_dir / JOURNAL_NAME).write_text('{"sample": "elsewhere", "decision": "picked", "time": 1}\n')
    with pytest.raises(ValueError, match=r"review.jsonl:1: sample 'elsewhere' is not in this round"):
        DecisionJournal(round_dir / JOURNAL_NAME, ids)


def test_one_server_per_round_folder(round_dir: Path, capsys) -> None:
    with ReviewServer(round_dir):
        assert main(["round", "review", str(round_dir)]) == 2
    assert "another `python -m data round review` is serving" in capsys.readouterr().err

"""The links the commands print open the runs in a real browser: `make server` prints the experiment's
runs table, `tune` ends with its summary and the link to its study's runs, and MLflow's UI, in headless
Chromium (Debian's chromium and chromium-driver, which `make test` installs), shows the trials there and
compares trials, a pruned one among them, without an error box."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.names import (
    CHAMPION,
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_NAME,
    MODEL_NAME,
    STUDY_TAG,
    TRAINING_KIND,
    TRIAL_STATE_TAG,
)
from tests.fault_helpers import error_line, run_cli
from tests.helpers import child_env, free_port, make, stop_process_group

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ERROR_BOX = "Something went wrong"  # what MLflow's UI shows when a page crashes
# 8 trials of 4 epochs on the learnable slice, lr from 1e-4 to 1: with seed 0 the median pruner stops some
STUDY = ["--study-name", "s", "--trials", "8", "--epochs-low", "4", "--epochs-high", "4", "--lr-low", "0.0001",
         "--lr-high", "1", "--side-by-side", "1"]


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} not found: run `make test`, which installs Debian's "
                    "chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


class Output:
    """The lines a server prints, read as they come (a pipe nobody reads would fill up and stop it)."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True).start()

    def wait_for(self, pattern: str, seconds: float = 240) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.5)
        raise AssertionError(f"no line matching {pattern!r} within {seconds} s:\n{''.join(self.lines)[-3000:]}")


def page_text(driver, url: str, ready, seconds: float = 120) -> str:
    """Open ``url`` and wait until the page's text satisfies ``ready`` (the UI renders after it loads)."""
    driver.get(url)
    try:
        WebDriverWait(driver, seconds).until(lambda d: ready(d.find_element("tag name", "body").text))
    except TimeoutException:
        raise AssertionError(f"{url} never showed what was expected; it showed:\n"
                             f"{driver.find_element('tag name', 'body').text[:3000]}") from None
    return driver.find_element("tag name", "body").text


@pytest.mark.slow
def test_the_printed_links_show_the_study_trials_and_compare_a_pruned_one(browser, data_slice, tmp_path):
    port = free_port()
    server = make("server", child_env(""), PORT=port, BACKEND_STORE=f"sqlite:///{tmp_path / 'mlflow.db'}",
                  ARTIFACTS=tmp_path / "artifacts")
    try:
        # `make server` prints the experiment's runs link once the server answers (the store has no
        # experiment yet: it is created then, through the server)
        printed = Output(server).wait_for(r"Open (http://\S+/#/experiments/(\d+)/runs\?workflowType=machine_learning)")
        experiment_url, experiment_id = printed.groups()
        tracking = f"http://127.0.0.1:{port}"
        tune = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--data", str(data_slice[1]),
                               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", *STUDY],
                              cwd=tmp_path, env=child_env(tracking), capture_output=True, text=True, timeout=900)
        assert tune.returncode == 0, tune.stderr[-3000:]
        summary = tune.stdout
        # the summary: best trial, its test accuracy with the interval, the registry's decision, the link
        assert re.search(r"best trial \d+: val accuracy 0\.\d{4}", summary), summary
        assert re.search(r"test accuracy 0\.\d{4} \(95% CI 0\.\d{4}-0\.\d{4}\)", summary), summary
        # (a slice of the data: registered, but never a candidate for the champion that `make serve` serves)
        assert f"registry: {MODEL_NAME} version 1 not promoted: not a candidate for {CHAMPION}" in summary, summary
        study_url = re.search(r"runs: (\S+)", summary).group(1)
        assert study_url.startswith(f"{tracking}/#/experiments/{experiment_id}/runs?"), summary
        assert f"search: tags.{STUDY_TAG} = 's'" in summary, summary

        client = MlflowClient(tracking_uri=tracking)
        trials = {r.info.run_name: r for r in client.search_runs([experiment_id], f"tags.`{STUDY_TAG}` = 's'")
                  if TRIAL_STATE_TAG in r.data.tags}
        pruned = [name for name, r in trials.items() if r.data.tags[TRIAL_STATE_TAG] == "PRUNED"]
        assert len(trials) == 8 and pruned and all(name.endswith(" (pruned)") for name in pruned), list(trials)

        # make server's link opens the experiment's runs table (not the GenAI overview), tune's its trials
        text = page_text(browser, experiment_url, lambda t: "matching runs" in t)
        assert "Run Name" in text and "tune s" in text and ERROR_BOX not in text
        text = page_text(browser, study_url, lambda t: all(name in t for name in trials))
        assert "9 matching runs" in text and ERROR_BOX not in text  # the 8 trials and the tune run

        # the compare page of two finished trials and a pruned one (its run keeps no model)
        complete = [name for name in trials if name not in pruned]
        compared = [trials[name].info.run_id for name in (*complete[:2], pruned[0])]
        compare_url = (f"{tracking}/#/compare-runs?runs={quote(json.dumps(compared))}"
                       f"&experiments={quote(json.dumps([experiment_id]))}")
        # the page has loaded down to its metrics table, or shows the error box instead
        text = page_text(browser, compare_url,
                         lambda t: ERROR_BOX in t or ("Comparing 3 Runs" in t and "best_val_accuracy" in t))
        assert ERROR_BOX not in text, text[:3000]
        assert pruned[0] in text
        assert "Parallel Coordinates Plot" in text and "Run details" in text
    finally:
        stop_process_group(server)


def test_ui_url_on_a_new_store_creates_the_experiment_and_prints_its_runs_link(new_mlflow_store):
    done = run_cli(child_env(new_mlflow_store), "ui-url", "--port", "5002")
    assert done.returncode == 0, done.stderr
    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT_NAME)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND  # the UI opens it on the training runs
    link = f"http://127.0.0.1:5002/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert done.stdout.startswith(f"Open {link}  (experiment '{EXPERIMENT_NAME}')"), done.stdout


def test_ui_url_waits_for_a_server_then_names_the_one_it_did_not_find():
    port = free_port()  # nothing listens there
    done = run_cli(child_env(f"http://127.0.0.1:{port}"), "ui-url", "--wait", "2")
    assert done.returncode != 0
    assert error_line(done).startswith(f"Error: no MLflow server answered at http://127.0.0.1:{port} within 2 s")

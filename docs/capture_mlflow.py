"""How docs/mlflow_eps_sweep.png was made: MLflow's runs page, in chart mode, comparing the jobs of one eps sweep.

    cd /tmp/shot && advcli train -m eps=0.1,0.2,0.3 experiment=fast evaluation.num_examples=500 \\
        evaluation.sanity.enabled=false progress=false logger=mlflow
    mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5057 &
    pip install playwright                      # drives the system's Chromium (apt-get install chromium)
    python docs/capture_mlflow.py http://127.0.0.1:5057/#/experiments/1/runs?compareRunsMode=CHART \\
        docs/mlflow_eps_sweep.png

Headless Chromium, 1400 x 1080: the assistant panel and the navigation closed, the sweep's parent run unfolded
(and hidden from the charts: it holds no metrics), the charts filtered to three test accuracies (one bar per job)
and the per-epoch held-out accuracies.
"""

from __future__ import annotations

import sys

from playwright.sync_api import sync_playwright

CHARTS = "^test/acc/(clean|pgd_margin|any_attack)$|^val/(clean|robust)_acc$"


def capture(url: str, out: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1080})
        page.goto(url)
        page.wait_for_timeout(6000)
        page.get_by_label("Close").last.click()            # the assistant panel
        page.get_by_label("Toggle sidebar").first.click()   # the navigation
        page.wait_for_timeout(500)
        page.locator('.ag-row [col-id="3"] button').first.click()  # unfold the sweep's parent run
        page.wait_for_timeout(2000)
        page.locator(".ag-row").first.locator("label:has(.is-visibility-toggle-checkbox)").click()  # hide the parent
        page.wait_for_timeout(1000)
        page.get_by_placeholder("Search metric charts").fill(CHARTS)
        page.wait_for_timeout(4000)
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    capture(sys.argv[1], sys.argv[2])

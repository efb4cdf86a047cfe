// The project page's runs, live.
//
// Follows the org's run status changes over /ws/org/runs/: a row on the page gets its new status and token counts;
// a run that is not on the page and has just been queued may be a new run on this project (started from here, the
// API or a GitHub delivery), so the runs table is fetched again from the server, which alone knows which runs are
// this project's. When one of the project's runs ends, a notice offers a reload to show the files it left. Without
// this module the page is a plain page: reloading shows the same.

import { followOrgRuns, updateRunRow } from "./org-runs.js";

const REFRESH_DELAY_MS = 300;

function followProjectRuns(container) {
  const body = container.querySelector("[data-project-runs-body]");
  const filesChanged = container.querySelector("[data-project-files-changed]");
  const runsUrl = container.dataset.runsUrl;
  let refreshTimer = null;

  // New runs arrive in bursts (a webhook, a double click): one fetch for the burst.
  const refresh = () => {
    if (refreshTimer !== null || !body || !runsUrl) return;
    refreshTimer = window.setTimeout(async () => {
      refreshTimer = null;
      try {
        const response = await fetch(runsUrl, { credentials: "same-origin", headers: { Accept: "text/html" } });
        if (!response.ok) return;
        // Parsed as an inert document (no script runs), then moved in: the server escaped everything in it.
        const fragment = new DOMParser().parseFromString(await response.text(), "text/html");
        body.replaceChildren(...fragment.body.childNodes);
      } catch {
        // Offline for a moment: the next event, or a reload, brings the table up to date.
      }
    }, REFRESH_DELAY_MS);
  };

  const update = (event) => {
    const row = body ? body.querySelector(`tr[data-run-id="${CSS.escape(event.run_id || "")}"]`) : null;
    if (!row) {
      if (event.status === "queued") refresh();
      return;
    }
    updateRunRow(row, event);
    if (event.type === "run.finished" && filesChanged) filesChanged.hidden = false;
  };

  followOrgRuns(container.dataset.wsPath, update);
}

const runs = document.querySelector("[data-project-runs]");
if (runs) followProjectRuns(runs);

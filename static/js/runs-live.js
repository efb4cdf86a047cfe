// The runs pages, live.
//
// The runs list follows the org's run status changes over /ws/org/runs/ (status badge and token counts of the rows
// on the page; a notice when new runs start). The new-run form narrows the model select to the chosen key's
// models, fetching the list when the server did not have it cached. Both pages work without this module: the
// list is a plain list, and the form shows every known model list plus a free-text model field.

import { followOrgRuns, updateRunRow } from "./org-runs.js";


// --- The runs list ----------------------------------------------------------------------------------------------

function followRuns(container) {
  const banner = container.querySelector("[data-runs-new]");
  const firstPage = container.hasAttribute("data-first-page");

  const update = (event) => {
    const row = container.querySelector(`tr[data-run-id="${CSS.escape(event.run_id || "")}"]`);
    if (!row) {
      // Only a brand-new run is news here; an older run off this page changing status is not.
      if (event.status === "queued" && firstPage && banner) banner.hidden = false;
      return;
    }
    updateRunRow(row, event);
  };

  followOrgRuns(container.dataset.wsPath, update);
}

// --- The new-run form -------------------------------------------------------------------------------------------

function pickModels(form) {
  const keySelect = form.querySelector("select[name=provider_key]");
  const modelSelect = form.querySelector("select[name=model]");
  const picker = form.querySelector("[data-model-picker]");
  const status = form.querySelector("[data-model-status]");
  const custom = form.querySelector("[data-model-custom]");
  const customLabel = custom ? custom.querySelector("label") : null;
  const data = document.getElementById("run-models-by-key");
  if (!keySelect || !modelSelect || !picker) return;
  const known = data ? JSON.parse(data.textContent) : {};
  const pending = new Map();
  // What the server rendered (e.g. after a validation error) is kept if the chosen key offers it.
  let wanted = modelSelect.value;

  const say = (text) => {
    if (!status) return;
    status.textContent = text;
    status.hidden = !text;
  };

  const show = (models, message) => {
    modelSelect.replaceChildren(new Option("Choose a model…", ""));
    for (const model of models) modelSelect.append(new Option(model, model, false, model === wanted));
    picker.hidden = models.length === 0;
    if (customLabel) customLabel.textContent = models.length ? "Or type a model id" : "Model";
    say(message || "");
  };

  const fetchModels = (keyId) => {
    if (!pending.has(keyId)) {
      const url = `${form.dataset.modelsUrl}?provider_key=${encodeURIComponent(keyId)}`;
      const request = fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then((response) => response.json())
        .then((body) => ({ models: Array.isArray(body.models) ? body.models : [], message: body.message || "" }))
        .catch(() => ({ models: [], message: "The model list could not be loaded: type the model id." }));
      pending.set(keyId, request);
    }
    return pending.get(keyId);
  };

  const refresh = async () => {
    const keyId = keySelect.value;
    if (!keyId) return show([], "");
    if (Array.isArray(known[keyId])) return show(known[keyId], "");
    picker.hidden = true;
    say("Loading the key's models…");
    const result = await fetchModels(keyId);
    if (result.models.length) known[keyId] = result.models;
    if (keySelect.value === keyId) show(result.models, result.message);
  };

  keySelect.addEventListener("change", () => {
    wanted = "";
    refresh();
  });
  modelSelect.addEventListener("change", () => {
    wanted = modelSelect.value;
  });
  refresh();
}

const list = document.querySelector("[data-runs-live]");
if (list) followRuns(list);
const form = document.querySelector("form[data-run-form]");
if (form) pickModels(form);

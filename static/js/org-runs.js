// The org's run status changes over /ws/org/runs/ (runs.events), for every page that follows them live: parsed
// events go to `onEvent`; the socket reconnects with backoff unless the server refused it for good.

const FINAL_CLOSE = new Set([4401, 4403, 4404]);
const STATUS_LABELS = {
  queued: "Queued",
  running: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
};
const numberFormat = new Intl.NumberFormat("en-US");

// A runs-table row (`tr[data-run-id]`) shows the event's status badge and token counts.
export function updateRunRow(row, event) {
  const badge = row.querySelector("[data-run-status]");
  if (badge && event.status) {
    badge.className = `badge status status-${event.status}`;
    badge.textContent = STATUS_LABELS[event.status] || event.status;
  }
  const input = row.querySelector("[data-run-input-tokens]");
  const output = row.querySelector("[data-run-output-tokens]");
  if (input && typeof event.input_tokens === "number") input.textContent = numberFormat.format(event.input_tokens);
  if (output && typeof event.output_tokens === "number") {
    output.textContent = numberFormat.format(event.output_tokens);
  }
}
const MAX_BACKOFF_MS = 30_000;

export function followOrgRuns(wsPath, onEvent) {
  let attempts = 0;
  const connect = () => {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${window.location.host}${wsPath}`);
    socket.addEventListener("open", () => {
      attempts = 0;
    });
    socket.addEventListener("message", (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (event && (event.type === "run.status" || event.type === "run.finished")) onEvent(event);
    });
    socket.addEventListener("close", (event) => {
      if (FINAL_CLOSE.has(event.code)) return;
      const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** attempts) * (0.75 + Math.random() * 0.5);
      attempts += 1;
      window.setTimeout(connect, delay);
    });
  };
  connect();
}

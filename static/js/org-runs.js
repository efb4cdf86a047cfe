// The org's run status changes over /ws/org/runs/ (runs.events), for every page that follows them live: parsed
// events go to `onEvent`; the socket reconnects with backoff unless the server refused it for good.

const FINAL_CLOSE = new Set([4401, 4403, 4404]);
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

// The run page, live: streams the run's events from /ws/runs/<id>/ into the page (runs/events.py is the schema).
//
// On connect the server sends the run's current status and token counts (never old text: answers are not
// stored), then live events. The socket reconnects with backoff until the run has finished. Cancelling goes over
// the socket when it is open; otherwise the cancel form posts as it does without JavaScript.

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUS_LABELS = {
  queued: "Queued",
  running: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
};
// Close codes of the consumers (DESIGN.md): no point in reconnecting after these.
const FINAL_CLOSE = {
  4401: "You are signed out. Reload the page to sign in again.",
  4403: "You may not watch this run.",
  4404: "This run does not exist in your organization.",
};
const MAX_BACKOFF_MS = 10_000;
const CANCEL_FALLBACK_MS = 5_000;

const numberFormat = new Intl.NumberFormat("en-US");

export function formatDuration(ms) {
  const total = Math.max(0, Math.floor(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = total % 60;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min ${seconds} s`;
  return `${seconds} s`;
}

function parseTime(value) {
  if (!value) return null;
  const ms = Date.parse(value);
  return Number.isNaN(ms) ? null : ms;
}

function utcStamp(ms) {
  return `${new Date(ms).toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

// A tool call's arguments in a few words: the server already reduced file content to its size.
function describeArguments(args) {
  const parts = [];
  for (const [name, value] of Object.entries(args)) {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    parts.push(name === "path" || name === "command" ? text : `${name}=${text}`);
  }
  return parts.join(" ").slice(0, 300);
}

class RunStream {
  constructor(root) {
    this.root = root;
    this.runId = root.dataset.runId;
    this.wsPath = root.dataset.wsPath;
    this.status = root.dataset.status;
    this.startedAt = parseTime(root.dataset.startedAt);
    this.finishedAt = parseTime(root.dataset.finishedAt);
    // The server's clock, so elapsed time does not depend on how wrong the reader's clock is.
    const serverNow = parseTime(root.dataset.serverNow);
    this.clockOffset = serverNow === null ? 0 : serverNow - Date.now();
    this.finished = TERMINAL.has(this.status);
    this.socket = null;
    this.attempts = 0;
    this.lostText = false;
    this.sawText = false;
    this.sawLive = false;
    this.retryUntil = null;
    this.retryReason = "";
    this.stick = true;

    const texts = document.getElementById("run-error-explanations");
    this.errorTexts = texts ? JSON.parse(texts.textContent) : {};

    const find = (selector) => root.querySelector(selector);
    this.badge = find("[data-run-status]");
    this.elapsed = find("[data-run-elapsed]");
    this.inputTokens = find("[data-run-input-tokens]");
    this.outputTokens = find("[data-run-output-tokens]");
    this.started = find("[data-run-started]");
    this.finishedCell = find("[data-run-finished]");
    this.error = find("[data-run-error]");
    this.retry = find("[data-run-retry]");
    this.output = find("[data-run-answer]");
    this.jump = find("[data-run-jump]");
    this.connection = find("[data-run-connection]");
    this.cancelForm = find("[data-run-cancel]");
    this.agentStepLabel = find("[data-agent-step]");
    this.timeline = find("[data-agent-timeline]");
    this.terminal = find("[data-agent-terminal]");
    this.filesList = find("[data-agent-files]");
    this.workspace = find("[data-workspace]");
    this.workspaceExpires = find("[data-workspace-expires]");
    this.files = new Map();
    this.textNode = null;
  }

  start() {
    if (this.output) {
      this.output.addEventListener("scroll", () => {
        // Follow the text only while the reader is at the bottom; scrolling up to read stops that.
        this.stick = this.atBottom();
        if (this.stick && this.jump) this.jump.hidden = true;
      });
    }
    if (this.jump) {
      this.jump.addEventListener("click", () => {
        this.stick = true;
        this.scrollToEnd();
        this.jump.hidden = true;
      });
    }
    if (this.cancelForm) this.cancelForm.addEventListener("submit", (event) => this.onCancel(event));
    this.tick();
    this.timer = window.setInterval(() => this.tick(), 500);
    if (!this.finished) this.connect();
  }

  // --- Socket -------------------------------------------------------------------------------------------------

  connect() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${window.location.host}${this.wsPath}`);
    this.socket = socket;
    this.setConnection(this.attempts ? "Reconnecting…" : "Connecting…");
    socket.addEventListener("open", () => {
      this.attempts = 0;
      this.setConnection("Live");
    });
    socket.addEventListener("message", (message) => this.onMessage(message));
    socket.addEventListener("close", (event) => this.onClose(socket, event));
  }

  onClose(socket, event) {
    if (this.socket === socket) this.socket = null;
    if (this.finished) return;
    if (FINAL_CLOSE[event.code]) {
      this.setConnection(FINAL_CLOSE[event.code]);
      return;
    }
    // Text sent while we were away is gone for good: say so where it would have been.
    if (this.sawText) this.lostText = true;
    const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** this.attempts) * (0.75 + Math.random() * 0.5);
    this.attempts += 1;
    this.setConnection(`Connection lost, reconnecting in ${Math.ceil(delay / 1000)} s…`);
    window.setTimeout(() => this.connect(), delay);
  }

  onMessage(message) {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (!event || (event.run_id && event.run_id !== this.runId)) return;
    // seq 0 is a snapshot sent on connect; anything numbered came live from the executor.
    if (event.seq > 0) this.sawLive = true;
    switch (event.type) {
      case "run.status":
        this.applyStatus(event);
        break;
      case "text.delta":
        this.appendText(event.text || "");
        break;
      case "usage":
        this.setTokens(event.input_tokens, event.output_tokens);
        break;
      case "error":
        // The run failed (run.finished follows); "retryable" says what kind of failure it was, not that a retry
        // is coming: retries are announced by run.status events with retrying_in_s.
        this.showError(event.kind, event.message);
        break;
      case "run.finished":
        this.finish(event);
        break;
      case "agent.step":
        this.agentStep(event);
        break;
      case "tool.call":
        this.timelineAdd(`${event.name} ${describeArguments(event.arguments || {})}`, "");
        break;
      case "tool.result":
        this.timelineAdd(`${event.ok ? "✓" : "✗"} ${event.summary}`, event.ok ? "ok" : "fail");
        break;
      case "command.output":
        this.terminalAppend(event.text || "");
        break;
      case "file.changed":
        this.fileChanged(event);
        break;
      default:
        break;
    }
  }

  // --- Events -------------------------------------------------------------------------------------------------

  applyStatus(event) {
    if (event.started_at) this.setStarted(parseTime(event.started_at));
    if (event.finished_at) this.finishedAt = parseTime(event.finished_at);
    this.setTokens(event.input_tokens, event.output_tokens);
    // Start on attach: the server starts a waiting run once this page's socket is subscribed.
    if (event.waiting_for_watcher && this.elapsed) this.elapsed.textContent = "Starting…";
    if (typeof event.retrying_in_s === "number") {
      // retry_reason reads "rate limited, retrying in 2 s": keep the reason, count the seconds down here.
      const reason = String(event.retry_reason || "the provider call failed").split(", retrying")[0];
      this.retryReason = reason.charAt(0).toUpperCase() + reason.slice(1);
      this.retryUntil = Date.now() + event.retrying_in_s * 1000;
      this.tick();
    } else {
      this.clearRetry();
    }
    if (TERMINAL.has(event.status)) {
      this.finish(event);
      return;
    }
    this.setStatus(event.status);
  }

  appendText(text) {
    if (!this.output || !text) return;
    this.clearRetry();
    if (this.lostText) {
      const gap = document.createElement("span");
      gap.className = "run-gap";
      gap.textContent = "\n[connection lost: part of the answer is missing here]\n";
      this.output.append(gap);
      this.textNode = null;
      this.lostText = false;
    }
    // One growing text node: cheap for long answers, and textContent stays exactly what arrived.
    if (!this.textNode) {
      this.textNode = document.createTextNode("");
      this.output.append(this.textNode);
    }
    this.textNode.appendData(text);
    this.sawText = true;
    if (this.stick) this.scrollToEnd();
    else if (this.jump) this.jump.hidden = false;
  }

  finish(event) {
    const wasFinished = this.finished;
    this.finished = true;
    this.setStatus(event.status);
    this.setTokens(event.input_tokens, event.output_tokens);
    this.clearRetry();
    if (!this.finishedAt) this.finishedAt = Date.now() + this.clockOffset;
    if (this.finishedCell) this.finishedCell.textContent = utcStamp(this.finishedAt);
    if (event.status === "failed" || event.status === "cancelled") {
      this.showError(event.error_kind, event.error_message, event.status);
    }
    if (this.cancelForm) this.cancelForm.hidden = true;
    this.showWorkspace(event);
    if (!this.sawText) this.explainNoText(event.status);
    this.tick();
    if (!wasFinished) {
      this.setConnection(
        this.sawText
          ? "Finished. This answer stays on this page until you leave; it is not stored."
          : "Finished. Responses are not stored.",
      );
    }
    if (this.socket) this.socket.close(1000);
  }

  // --- Agent runs -------------------------------------------------------------------------------------------------

  agentStep(event) {
    // Each model turn's text starts a new paragraph of the answer pane.
    if (this.sawText && this.textNode) this.textNode.appendData("\n\n");
    if (!this.agentStepLabel) return;
    const tokens = numberFormat.format(event.input_tokens + event.output_tokens);
    const budget = event.max_tokens ? ` of ${numberFormat.format(event.max_tokens)}` : "";
    this.agentStepLabel.textContent = `Step ${event.step} of ${event.max_steps} · ${tokens}${budget} tokens`;
  }

  timelineAdd(text, className) {
    if (!this.timeline) return;
    const item = document.createElement("li");
    item.textContent = text;
    if (className) item.className = className;
    this.timeline.append(item);
    this.timeline.scrollTop = this.timeline.scrollHeight;
  }

  terminalAppend(text) {
    if (!this.terminal || !text) return;
    this.terminal.append(document.createTextNode(text));
    this.terminal.scrollTop = this.terminal.scrollHeight;
  }

  fileChanged(event) {
    if (!this.filesList) return;
    if (event.op === "deleted") this.files.delete(event.path);
    else this.files.set(event.path, event.bytes);
    const items = [...this.files.keys()].sort().map((path) => {
      const item = document.createElement("li");
      item.textContent = `${path} (${numberFormat.format(this.files.get(path))} B)`;
      return item;
    });
    this.filesList.replaceChildren(...items);
  }

  showWorkspace(event) {
    if (!this.workspace || event.workspace_state !== "available") return;
    this.workspace.hidden = false;
    const expires = parseTime(event.workspace_expires_at);
    if (this.workspaceExpires && expires !== null) {
      this.workspaceExpires.textContent = `Available until ${utcStamp(expires)}; the first download deletes it.`;
    }
  }

  explainNoText(status) {
    // Never leave "Waiting for the first words…" under a finished run: say why there is no answer here.
    if (!this.output || this.output.textContent) return;
    let note = "";
    if (status === "succeeded") {
      note = this.sawLive
        ? "The model finished without any text."
        : "This run finished before this page was watching it (it was started unwatched), so its answer was shown to nobody. Responses are not stored.";
    } else {
      note = "No answer: the run did not succeed.";
    }
    const span = document.createElement("span");
    span.className = "run-output-note";
    span.textContent = note;
    this.output.append(span);
  }

  // --- Cancel -------------------------------------------------------------------------------------------------

  onCancel(event) {
    if (this.finished) {
      event.preventDefault();
      return;
    }
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return; // the form posts instead
    event.preventDefault();
    this.socket.send(JSON.stringify({ type: "cancel" }));
    const button = this.cancelForm.querySelector("button");
    if (button) {
      button.disabled = true;
      button.textContent = "Cancelling…";
    }
    // If the socket said nothing back in time, fall back to the form (the server-side cancel is idempotent).
    window.setTimeout(() => {
      if (!this.finished) this.cancelForm.submit();
    }, CANCEL_FALLBACK_MS);
  }

  // --- Rendering ----------------------------------------------------------------------------------------------

  setStatus(status) {
    if (!status || !this.badge) return;
    this.status = status;
    this.root.dataset.status = status;
    this.badge.className = `badge status status-${status}`;
    this.badge.textContent = STATUS_LABELS[status] || status;
  }

  setStarted(ms) {
    if (ms === null || this.startedAt) return;
    this.startedAt = ms;
    if (this.started) this.started.textContent = utcStamp(ms);
  }

  setTokens(input, output) {
    if (typeof input === "number" && this.inputTokens) this.inputTokens.textContent = numberFormat.format(input);
    if (typeof output === "number" && this.outputTokens) this.outputTokens.textContent = numberFormat.format(output);
  }

  showError(kind, message, status) {
    if (!this.error) return;
    this.error.hidden = false;
    this.error.textContent = this.errorTexts[kind] || message || "The run failed.";
    this.error.classList.toggle("run-error-cancelled", status === "cancelled" || kind === "cancelled");
  }

  clearRetry() {
    this.retryUntil = null;
    if (this.retry) this.retry.hidden = true;
  }

  setConnection(text) {
    if (this.connection) this.connection.textContent = text;
  }

  tick() {
    const now = Date.now() + this.clockOffset;
    if (this.elapsed) {
      if (this.startedAt) {
        this.elapsed.textContent = formatDuration((this.finishedAt || now) - this.startedAt);
      } else {
        this.elapsed.textContent = this.finished ? "Never started" : "Waiting to start";
      }
    }
    if (this.retryUntil !== null && this.retry) {
      const seconds = Math.ceil((this.retryUntil - Date.now()) / 1000);
      this.retry.hidden = false;
      this.retry.textContent =
        seconds > 0 ? `${this.retryReason}, retrying in ${seconds} s` : `${this.retryReason}, retrying now…`;
    }
    if (this.finished && this.timer) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
  }

  atBottom() {
    return this.output.scrollHeight - this.output.scrollTop - this.output.clientHeight < 24;
  }

  scrollToEnd() {
    this.output.scrollTop = this.output.scrollHeight;
  }
}

const root = document.querySelector("[data-run-stream]");
if (root) new RunStream(root).start();

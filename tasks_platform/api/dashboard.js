// The tasks-platform dashboard: queues, health, dead-letter groups and recent failures,
// read from the admin API with the token the user pastes (kept in sessionStorage, this tab
// only). Every value from the API is inserted as text, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "tasks-platform.token";
  // the API lives beside the page: /dashboard -> /api/v1 (and /prefix/dashboard -> /prefix/api/v1)
  const API = window.location.pathname.replace(/\/dashboard(\/.*)?$/, "") + "/api/v1";
  const FAILURES_SHOWN = 20;

  const $ = (id) => document.getElementById(id);

  class ApiFailure extends Error {
    constructor(method, path, status, code, message) {
      super(message);
      this.method = method;
      this.path = path;
      this.status = status;
      this.code = code;
    }

    describe() {
      const status = this.status ? `HTTP ${this.status}` : "no answer";
      return `${this.method} ${this.path}: ${status} ${this.code}: ${this.message}`;
    }
  }

  function token() {
    return window.sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${token()}` };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await window.fetch(API + path, init);
    } catch (error) {
      throw new ApiFailure(method, path, 0, "network_error", String(error));
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (error) {
      data = null; // not JSON: reported below if the status is an error
    }
    if (!response.ok) {
      const detail = data && data.error ? data.error : {};
      throw new ApiFailure(
        method, path, response.status,
        detail.code || `http_${response.status}`,
        detail.message || text.slice(0, 300) || response.statusText,
      );
    }
    return data;
  }

  // -- messages --------------------------------------------------------------------------
  function showError(error) {
    const item = document.createElement("li");
    item.textContent = error instanceof ApiFailure ? error.describe() : `error: ${error}`;
    if (error instanceof ApiFailure && error.status === 401) {
      item.textContent += " (paste a valid token above)";
    }
    $("errors").appendChild(item);
  }

  function clearErrors() {
    $("errors").replaceChildren();
  }

  function say(text) {
    $("status").textContent = text;
  }

  // -- rendering -------------------------------------------------------------------------
  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "-" : String(text);
    if (className) {
      td.className = className;
    }
    return td;
  }

  function button(label, className, action) {
    const element = document.createElement("button");
    element.type = "button";
    element.textContent = label;
    element.className = className;
    element.addEventListener("click", () => act(action));
    return element;
  }

  function when(value) {
    if (value === null || value === undefined) {
      return "-";
    }
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    if (Number.isNaN(date.getTime())) {
      return String(value);
    }
    return date.toISOString().slice(0, 19).replace("T", " ");
  }

  function short(text, width) {
    const flat = String(text || "").replace(/\s+/g, " ").trim();
    return flat.length <= width ? flat : `${flat.slice(0, width - 3)}...`;
  }

  function renderHealth(health) {
    const level = $("health-level");
    level.textContent = health.level;
    level.className = `level level-${health.level}`;
    const alerts = health.alerts.map((alert) => {
      const item = document.createElement("li");
      item.textContent = `${alert.level}: ${alert.message}`;
      item.className = `level-${alert.level}`;
      return item;
    });
    $("health-alerts").replaceChildren(...alerts);
  }

  function renderQueues(answer) {
    const rows = answer.queues.map((queue) => {
      const row = document.createElement("tr");
      row.dataset.queue = queue.name;
      const state = queue.paused
        ? `paused${queue.paused_by ? ` by ${queue.paused_by}` : ""}` +
          `${queue.paused_at ? ` at ${when(queue.paused_at)}` : ""}` +
          `${queue.pause_reason ? `: ${queue.pause_reason}` : ""}`
        : "running";
      const actions = cell("", "actions");
      actions.appendChild(queue.paused
        ? button("Resume", "resume", () => pauseOrResume(queue.name, "resume"))
        : button("Pause", "pause", () => pauseOrResume(queue.name, "pause")));
      row.append(
        cell(queue.name, "name"),
        cell(queue.depth, "depth"),
        cell(queue.dead_letters, "dead"),
        cell(queue.consumers.length ? queue.consumers.join(", ") : "none", "consumers"),
        cell(state, queue.paused ? "state paused" : "state"),
        actions,
      );
      return row;
    });
    $("queues-body").replaceChildren(...rows);
    const notes = Object.entries(answer.unavailable || {}).map(([what, why]) => `${what}: ${why}`);
    notes.unshift(`workers: ${answer.workers.length ? answer.workers.join(", ") : "none"}`);
    $("queues-note").textContent = notes.join("; ");
  }

  function renderGroups(groups) {
    const rows = groups.map((group) => {
      const row = document.createElement("tr");
      row.dataset.group = group.fingerprint;
      const actions = cell("", "actions");
      actions.append(
        button("Replay", "replay", () => deadLetters("replay", group)),
        button("Purge", "purge", () => deadLetters("purge", group)),
      );
      const error = cell(short(`${group.exc_type}: ${group.message}`, 120), "error");
      error.title = group.example || group.message;
      row.append(
        cell(group.fingerprint, "fingerprint"),
        cell(group.name, "job"),
        error,
        cell(group.queues.join(", "), "queues"),
        cell(group.count, "count"),
        cell(when(group.first_at)),
        cell(when(group.last_at)),
        actions,
      );
      return row;
    });
    $("groups-body").replaceChildren(...rows);
    $("groups-empty").hidden = groups.length > 0;
  }

  function renderFailures(page) {
    const rows = page.items.map((job) => {
      const row = document.createElement("tr");
      row.dataset.job = job.id;
      const error = job.error_type ? `${job.error_type}: ${job.error_message || ""}` : "";
      row.append(
        cell(job.id, "id"),
        cell(job.name),
        cell(job.queue),
        cell(job.dead_reason ? `${job.state} (${job.dead_reason})` : job.state, "state"),
        cell(job.attempts),
        cell(short(error, 120), "error"),
        cell(when(job.finished_at)),
      );
      return row;
    });
    $("failures-body").replaceChildren(...rows);
    $("failures-empty").hidden = page.items.length > 0;
  }

  // -- loading and actions ---------------------------------------------------------------
  let loading = null;

  // Load every table again; ``carried`` errors (of the action just done) stay shown.
  async function refresh(carried = []) {
    while (loading) {
      await loading; // one load at a time
    }
    clearErrors();
    carried.forEach(showError);
    if (!token()) {
      $("token-state").hidden = false;
      return;
    }
    $("token-state").hidden = true;
    const failures = `/jobs?state=dead&state=failed&limit=${FAILURES_SHOWN}`;
    const parts = [
      api("GET", "/health").then(renderHealth),
      api("GET", "/queues").then(renderQueues),
      api("GET", "/dlq/groups").then(renderGroups),
      api("GET", failures).then(renderFailures),
    ];
    loading = Promise.allSettled(parts).then((results) => {
      results.filter((r) => r.status === "rejected").forEach((r) => showError(r.reason));
      document.body.dataset.loaded = String(Date.now());
    }).finally(() => {
      loading = null;
    });
    return loading;
  }

  function reason() {
    const text = $("reason").value.trim();
    return text ? text : null;
  }

  async function act(action) {
    const buttons = document.querySelectorAll("main button");
    buttons.forEach((b) => { b.disabled = true; });
    const failed = [];
    try {
      say("working...");
      await action();
    } catch (error) {
      say("");
      failed.push(error);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
    await refresh(failed);
  }

  async function pauseOrResume(queue, verb) {
    const answer = await api("POST", `/queues/${encodeURIComponent(queue)}/${verb}`,
      { reason: reason() });
    say(`queue ${answer.queue} ${answer.paused ? "paused" : "resumed"}`);
  }

  async function deadLetters(verb, group) {
    const label = `${group.count} dead letter(s) of ${group.name || "?"} (${group.exc_type})`;
    if (verb === "purge" && !window.confirm(`Delete ${label} for good?`)) {
      say("purge cancelled");
      return;
    }
    const answer = await api("POST", `/dlq/${verb}`,
      { group: group.fingerprint, reason: reason() });
    say(verb === "replay"
      ? `replayed ${answer.count} job(s) of group ${group.fingerprint}`
      : `purged ${answer.purged} message(s) of group ${group.fingerprint}`);
  }

  // -- token -----------------------------------------------------------------------------
  function saveToken(event) {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (!value) {
      showError("paste a token first");
      return;
    }
    window.sessionStorage.setItem(TOKEN_KEY, value);
    say("token kept for this tab");
    refresh();
  }

  function forgetToken() {
    window.sessionStorage.removeItem(TOKEN_KEY);
    ["health-alerts", "queues-body", "groups-body", "failures-body"].forEach((id) => {
      $(id).replaceChildren();
    });
    $("health-level").textContent = "unknown";
    $("health-level").className = "level";
    clearErrors();
    say("token forgotten");
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", saveToken);
    $("token-forget").addEventListener("click", forgetToken);
    $("refresh").addEventListener("click", () => refresh());
    refresh();
  });
})();

// The Impuls console's few behaviours; every page works without them.
"use strict";

// Tab in a code editor inserts spaces instead of leaving the field.
function codeEditors() {
  for (const area of document.querySelectorAll("textarea.code-editor")) {
    area.addEventListener("keydown", (e) => {
      if (e.key !== "Tab" || e.shiftKey || e.ctrlKey || e.altKey || e.metaKey) return;
      e.preventDefault();
      const { selectionStart: start, selectionEnd: end, value } = area;
      const indent = area.classList.contains("json-editor") ? "  " : "    ";
      area.value = value.slice(0, start) + indent + value.slice(end);
      area.selectionStart = area.selectionEnd = start + indent.length;
    });
  }
}

// The event editor says whether what it holds is JSON (the server checks again).
function jsonEditors() {
  for (const area of document.querySelectorAll("textarea.json-editor")) {
    const state = area.form && area.form.querySelector(".json-state");
    const check = () => {
      if (!state) return;
      if (!area.value.trim()) { state.textContent = "empty: {} is sent"; return; }
      try { JSON.parse(area.value); state.textContent = "valid JSON"; state.classList.remove("bad"); }
      catch (err) { state.textContent = err.message; state.classList.add("bad"); }
    };
    area.addEventListener("input", check);
    check();
  }
}

// Destructive forms ask first.
function confirmations() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }
}

// A new function's code sample follows the runtime, until it is edited.
function samples() {
  const select = document.getElementById("runtime");
  const code = document.getElementById("code");
  const handler = document.getElementById("handler");
  if (!select || !code || !handler || !select.dataset.samples) return;
  const all = JSON.parse(select.dataset.samples);
  select.addEventListener("change", () => {
    const untouched = Object.values(all).some(([, sample]) => sample === code.value) || !code.value.trim();
    const next = all[select.value];
    if (next && untouched) { handler.value = next[0]; code.value = next[1]; }
  });
}

// Live logs: server-sent events from /console/functions/NAME/logs/stream.
function liveLogs() {
  const out = document.getElementById("live-log");
  const badge = document.getElementById("live-state");
  if (!out || !out.dataset.stream || !window.EventSource) return;
  const show = (state, text) => { if (badge) { badge.dataset.state = state; badge.textContent = text; } };
  const source = new EventSource(out.dataset.stream);
  let last = "";
  source.onopen = () => show("open", "following");
  source.onerror = () => show("closed", source.readyState === EventSource.CLOSED ? "stopped" : "reconnecting…");
  source.onmessage = (e) => {
    const event = JSON.parse(e.data);
    if (event.request_id !== last) {
      const head = document.createElement("span");
      head.className = "req";
      head.textContent = (out.textContent ? "\n" : "") + "── " + event.request_id + "\n";
      out.appendChild(head);
      last = event.request_id;
    }
    out.appendChild(document.createTextNode(event.text));
    out.scrollTop = out.scrollHeight;
  };
  window.addEventListener("pagehide", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  codeEditors();
  jsonEditors();
  confirmations();
  samples();
  liveLogs();
});

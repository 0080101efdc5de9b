// Ember's web chat page: conversations in localStorage, answers streamed from this server's own
// /v1/chat/completions (fetch + a reader over the SSE body), a small Markdown renderer that escapes
// all HTML first, an API key asked for when the server answers 401. No build step, no dependencies.
"use strict";

const $ = (selector) => document.querySelector(selector);
const DEFAULT_SETTINGS = { model: "", system: "", temperature: 0.7, top_p: 0.95, max_tokens: 512 };

// ---- storage -------------------------------------------------------------------------------------
const store = {
  load(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value === null ? fallback : value;
    } catch {
      return fallback;
    }
  },
  save(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (err) {
      console.warn("could not save to localStorage:", err);
    }
  },
  remove(key) {
    try {
      localStorage.removeItem(key);
    } catch { /* nothing stored, nothing to remove */ }
  },
};

let conversations = store.load("ember.conversations", []);
let currentId = store.load("ember.current", null);
let settings = { ...DEFAULT_SETTINGS, ...store.load("ember.settings", {}) };
let generation = null; // { controller, conv, msg } while an answer streams
let editingIndex = null; // the user message being edited, if any

function saveConversations() {
  // A message still streaming is saved as it stands; a reload mid-answer keeps the partial text.
  const plain = conversations.map((c) => ({ ...c, messages: c.messages.map(({ streaming, ...m }) => m) }));
  store.save("ember.conversations", plain);
  store.save("ember.current", currentId);
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function currentConversation() {
  return conversations.find((c) => c.id === currentId) || null;
}

// ---- Markdown ------------------------------------------------------------------------------------
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function renderInline(text) {
  const spans = [];
  // Code spans first, so nothing inside them is taken as emphasis or links.
  let html = escapeHtml(text.replace(/`([^`\n]+)`/g, (_, code) => `\u0000${spans.push(code) - 1}\u0000`));
  html = html
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?!\w)/g, "$1<em>$2</em>");
  return html.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${escapeHtml(spans[Number(i)])}</code>`);
}

function renderCodeBlock(code, lang) {
  return (
    '<div class="code-block"><div class="code-head">' +
    `<span class="code-lang">${escapeHtml(lang || "code")}</span>` +
    '<button type="button" class="copy" aria-label="Copy code">Copy</button></div>' +
    `<pre><code>${escapeHtml(code)}</code></pre></div>`
  );
}

function renderMarkdown(source) {
  const lines = source.replace(/\r\n/g, "\n").split("\n");
  const out = [];
  let i = 0;
  const isListItem = (line) => /^\s*([-*+]|\d+[.)])\s+/.test(line);
  const isSpecial = (line) => /^\s*(```|#{1,6}\s|>)/.test(line) || isListItem(line) || /^\s*([-*_])(\s*\1){2,}\s*$/.test(line);
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([^\s`]*)\s*$/);
    if (fence) {
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++; // the closing fence; an unclosed block (still streaming) runs to the end
      out.push(renderCodeBlock(code.join("\n"), fence[1]));
    } else if (/^\s*$/.test(line)) {
      i++;
    } else if (/^#{1,6}\s/.test(line)) {
      const level = line.match(/^#+/)[0].length;
      const tag = `h${Math.min(level + 1, 6)}`; // the page's own title is the h1
      out.push(`<${tag}>${renderInline(line.slice(level).trim())}</${tag}>`);
      i++;
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      out.push("<hr>");
      i++;
    } else if (/^\s*>/.test(line)) {
      const quote = [];
      for (; i < lines.length && /^\s*>/.test(lines[i]); i++) quote.push(lines[i].replace(/^\s*>\s?/, ""));
      out.push(`<blockquote>${renderMarkdown(quote.join("\n"))}</blockquote>`);
    } else if (isListItem(line)) {
      const ordered = /^\s*\d/.test(line);
      const items = [];
      for (; i < lines.length && (isListItem(lines[i]) || (/^\s+\S/.test(lines[i]) && items.length)); i++) {
        if (isListItem(lines[i])) items.push(lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ""));
        else items[items.length - 1] += " " + lines[i].trim();
      }
      const tag = ordered ? "ol" : "ul";
      out.push(`<${tag}>${items.map((item) => `<li>${renderInline(item)}</li>`).join("")}</${tag}>`);
    } else {
      const paragraph = [];
      for (; i < lines.length && !/^\s*$/.test(lines[i]) && !(paragraph.length && isSpecial(lines[i])); i++) paragraph.push(lines[i]);
      out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    }
  }
  return out.join("");
}

// ---- settings ------------------------------------------------------------------------------------
const fields = {
  model: $("#model"),
  system: $("#system-prompt"),
  temperature: $("#temperature"),
  top_p: $("#top-p"),
  max_tokens: $("#max-tokens"),
};

function showSettings() {
  fields.system.value = settings.system;
  fields.temperature.value = settings.temperature;
  fields.top_p.value = settings.top_p;
  fields.max_tokens.value = settings.max_tokens ?? "";
}

// A field left invalid goes back to the last valid value, so what is shown is always what is sent.
function readSetting(name) {
  const input = fields[name];
  if (name === "model" || name === "system") return input.value;
  if (name === "max_tokens" && input.value.trim() === "") return null; // up to the context length
  const value = Number(input.value);
  const isValid = input.value.trim() !== "" && Number.isFinite(value) &&
    (name === "temperature" ? value >= 0 && value <= 2 :
     name === "top_p" ? value > 0 && value <= 1 :
     Number.isInteger(value) && value >= 1);
  return isValid ? value : settings[name];
}

// Runs on every change and again before each request (a field still being typed in has had no change event).
function commitSettings() {
  for (const name of Object.keys(fields)) settings[name] = readSetting(name);
  showSettings();
  store.save("ember.settings", settings);
}
for (const input of Object.values(fields)) input.addEventListener("change", commitSettings);

async function loadModels() {
  const select = fields.model;
  try {
    document.querySelectorAll(".banner.error").forEach((banner) => banner.remove()); // this load's outcome replaces the last's
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data.map((m) => m.id);
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(settings.model)) select.value = settings.model;
    settings.model = select.value;
  } catch (err) {
    select.replaceChildren(new Option("(model list unavailable)", ""));
    showBanner(`Could not load the model list: ${err.message}`);
  }
}

function showBanner(text) {
  const banner = document.createElement("div");
  banner.className = "banner error";
  banner.setAttribute("role", "alert");
  banner.textContent = text;
  $("#messages").before(banner);
}

// ---- talking to the server -----------------------------------------------------------------------
async function errorMessage(response) {
  const text = await response.text();
  let message = text;
  try {
    const body = JSON.parse(text);
    message = body.error?.message || body.error || body.detail || text;
  } catch { /* not JSON: the text itself */ }
  return `${response.status} ${response.statusText}: ${typeof message === "string" ? message : JSON.stringify(message)}`;
}

// ---- the API key ---------------------------------------------------------------------------------
// A server started with --api-key answers 401 without one: the page asks for it in a dialog, keeps it in
// localStorage and sends it as a bearer token on every API call. The key itself is never logged.
const API_KEY = "ember.apiKey";
let keyRequired = false; // an API call has answered 401: the header's "API key" button stays up
let keyPrompt = null; // { promise, resolve } while the dialog is open; concurrent 401s wait on the same one

function storedKey() {
  const key = store.load(API_KEY, "");
  return typeof key === "string" ? key : "";
}

function showKeyButton() {
  $("#change-api-key").hidden = !keyRequired && !storedKey();
}

// Opens the dialog (or updates the one already open); resolves true once a key is saved, false when dismissed.
function askForApiKey(reason, error = "") {
  $("#api-key-reason").textContent = reason;
  $("#api-key-error").textContent = error;
  $("#api-key-error").hidden = !error;
  $("#forget-api-key").hidden = !storedKey();
  $("#api-key").value = "";
  if (!keyPrompt) {
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    keyPrompt = { promise, resolve };
    $("#api-key-dialog").showModal();
  }
  $("#api-key").focus();
  return keyPrompt.promise;
}

function closeKeyPrompt(saved) {
  const prompt = keyPrompt;
  keyPrompt = null;
  if ($("#api-key-dialog").open) $("#api-key-dialog").close();
  showKeyButton();
  prompt?.resolve(saved);
}

// Every call to this server's API goes through here: the stored key rides along, and a 401 asks for a key
// and tries again. A dismissed dialog leaves the 401 response to the caller.
async function apiFetch(url, options = {}) {
  for (;;) {
    const key = storedKey();
    const headers = { ...options.headers };
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(url, { ...options, headers });
    if (response.status !== 401) return response;
    keyRequired = true;
    const error = key ? `The key was not accepted: ${await errorMessage(response.clone())}` : "";
    if (!(await askForApiKey("This server needs an API key.", error))) return response;
  }
}

// Yields each SSE event's data from a fetch response body.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function generate(conv) {
  commitSettings();
  const used = { ...settings };
  const history = conv.messages.filter((m) => !m.error && m.content).map(({ role, content }) => ({ role, content }));
  if (used.system.trim()) history.unshift({ role: "system", content: used.system });
  const msg = { role: "assistant", content: "", model: used.model, streaming: true };
  conv.messages.push(msg);
  conv.updatedAt = Date.now();
  const controller = new AbortController();
  generation = { controller, conv, msg };
  saveConversations();
  render();

  const body = { messages: history, stream: true, stream_options: { include_usage: true }, temperature: used.temperature, top_p: used.top_p };
  if (used.model) body.model = used.model;
  if (used.max_tokens !== null) body.max_tokens = used.max_tokens;
  const start = performance.now();
  let firstTokenAt = null;
  let numDeltas = 0;
  let numTokens = null;
  let finishReason = null;
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) numTokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        if (choice.delta?.content) {
          firstTokenAt ??= performance.now();
          msg.content += choice.delta.content;
          numDeltas++;
          scheduleStreamRender();
        }
        finishReason = choice.finish_reason || finishReason;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") msg.stopped = true;
    else msg.error = err.message || String(err);
  }
  const end = performance.now();
  delete msg.streaming;
  if (firstTokenAt !== null) {
    const tokens = numTokens ?? numDeltas;
    const seconds = (end - firstTokenAt) / 1000;
    msg.stats = {
      num_tokens: tokens,
      ttft_s: (firstTokenAt - start) / 1000,
      tokens_per_s: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
      finish_reason: msg.stopped ? "stopped" : finishReason,
      temperature: used.temperature, top_p: used.top_p, max_tokens: used.max_tokens,
    };
  } else if (!msg.error && !msg.stopped) {
    msg.error = "The server ended the answer without sending any text.";
  }
  generation = null;
  conv.updatedAt = Date.now();
  saveConversations();
  render();
}

function send(text) {
  if (generation || !text.trim()) return;
  let conv = currentConversation();
  if (!conv) {
    conv = { id: newId(), title: text.trim().slice(0, 60), messages: [], updatedAt: Date.now() };
    conversations.unshift(conv);
    currentId = conv.id;
  }
  conv.messages.push({ role: "user", content: text });
  generate(conv);
}

function stop() {
  if (generation) generation.controller.abort();
}

function regenerate() {
  const conv = currentConversation();
  if (generation || !conv || conv.messages.at(-1)?.role !== "assistant") return;
  conv.messages.pop();
  generate(conv);
}

function resendEdited(index, text) {
  const conv = currentConversation();
  if (generation || !conv || !text.trim()) return;
  editingIndex = null;
  conv.messages = conv.messages.slice(0, index);
  conv.messages.push({ role: "user", content: text });
  generate(conv);
}

// ---- rendering -----------------------------------------------------------------------------------
function formatStats(stats) {
  const parts = [`${stats.num_tokens} tokens`];
  if (stats.tokens_per_s !== null) parts.push(`${stats.tokens_per_s.toFixed(1)} tok/s`);
  parts.push(`TTFT ${stats.ttft_s.toFixed(2)} s`);
  if (stats.finish_reason === "stopped") parts.push("stopped");
  else if (stats.finish_reason === "length") parts.push("hit max tokens");
  return parts.join(" · ");
}

function button(label, text, onClick, className = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function renderMessage(msg, index, conv) {
  const el = document.createElement("article");
  el.className = `msg ${msg.role}` + (msg.streaming ? " streaming" : "");
  el.dataset.index = index;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role === "user" ? "You" : msg.model || "Assistant";
  el.append(role);

  if (msg.role === "user" && editingIndex === index) {
    const editor = document.createElement("textarea");
    editor.className = "editor";
    editor.value = msg.content;
    editor.setAttribute("aria-label", "Edit message");
    editor.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); resendEdited(index, editor.value); }
      if (e.key === "Escape") { editingIndex = null; render(); }
    });
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(
      button("Save and send", "Save & send", () => resendEdited(index, editor.value), "primary"),
      button("Cancel editing", "Cancel", () => { editingIndex = null; render(); }),
    );
    el.append(editor, actions);
    queueMicrotask(() => editor.focus());
    return el;
  }

  const content = document.createElement("div");
  content.className = "content";
  if (msg.role === "user") content.textContent = msg.content;
  else content.innerHTML = renderMarkdown(msg.content);
  if (msg.content || msg.role === "user") el.append(content);
  if (msg.streaming && !msg.content) {
    const waiting = document.createElement("div");
    waiting.className = "waiting";
    waiting.textContent = "…";
    el.append(waiting);
  }
  if (msg.error) {
    const error = document.createElement("div");
    error.className = "error";
    error.setAttribute("role", "alert");
    error.textContent = `Error: ${msg.error}`;
    el.append(error);
  }

  const meta = document.createElement("div");
  meta.className = "meta";
  if (msg.stats) {
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = formatStats(msg.stats);
    stats.title = `temperature ${msg.stats.temperature}, top-p ${msg.stats.top_p}, max tokens ${msg.stats.max_tokens ?? "up to the context"}`;
    meta.append(stats);
  } else if (msg.stopped) {
    const note = document.createElement("span");
    note.className = "stats";
    note.textContent = "stopped before the first token";
    meta.append(note);
  }
  const isLast = index === conv.messages.length - 1;
  if (!generation && msg.role === "user") meta.append(button("Edit message", "Edit", () => { editingIndex = index; render(); }));
  if (!generation && msg.role === "assistant" && isLast) meta.append(button("Regenerate answer", "Regenerate", regenerate));
  if (meta.childElementCount) el.append(meta);
  return el;
}

let renderScheduled = false;
function scheduleStreamRender() {
  if (renderScheduled) return;
  renderScheduled = true;
  requestAnimationFrame(() => {
    renderScheduled = false;
    if (!generation || generation.conv.id !== currentId) return;
    const box = $("#messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const last = box.lastElementChild;
    if (last) last.replaceWith(renderMessage(generation.msg, generation.conv.messages.length - 1, generation.conv));
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function render() {
  const conv = currentConversation();
  $("#chat-title").textContent = conv ? conv.title : "New conversation";
  const box = $("#messages");
  if (conv) {
    box.replaceChildren(...conv.messages.map((m, i) => renderMessage(m, i, conv)));
  } else {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Send a message to start a conversation.";
    box.replaceChildren(empty);
  }
  box.scrollTop = box.scrollHeight;

  const list = $("#conversation-list");
  list.replaceChildren(...conversations.map((c) => {
    const item = document.createElement("li");
    if (c.id === currentId) item.className = "current";
    const open = button(`Open conversation: ${c.title}`, c.title, () => selectConversation(c.id), "open");
    if (c.id === currentId) open.setAttribute("aria-current", "true");
    const remove = button(`Delete conversation: ${c.title}`, "×", () => deleteConversation(c.id), "delete");
    item.append(open, remove);
    return item;
  }));

  const busy = generation !== null;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  $("#new-chat").disabled = busy;
}

function selectConversation(id) {
  if (generation) return;
  currentId = id;
  editingIndex = null;
  saveConversations();
  toggleSidebar(false);
  render();
}

function deleteConversation(id) {
  if (generation?.conv.id === id) return;
  conversations = conversations.filter((c) => c.id !== id);
  if (currentId === id) currentId = null;
  saveConversations();
  render();
}

function toggleSidebar(show) {
  const isOpen = show ?? !document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", isOpen);
  $("#toggle-sidebar").setAttribute("aria-expanded", String(isOpen));
}

// ---- wiring --------------------------------------------------------------------------------------
$("#composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("#input");
  if (generation || !input.value.trim()) return;
  const text = input.value;
  input.value = "";
  send(text);
});
$("#input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("#composer").requestSubmit();
  } else if (e.key === "Escape") {
    stop();
  }
});
$("#stop").addEventListener("click", stop);
$("#new-chat").addEventListener("click", () => {
  if (generation) return;
  currentId = null;
  editingIndex = null;
  saveConversations();
  toggleSidebar(false);
  render();
  $("#input").focus();
});
$("#toggle-sidebar").addEventListener("click", () => toggleSidebar());
// On a narrow screen the sidebar lies over the chat: a tap beside it or Escape closes it.
$("#main").addEventListener("click", (e) => {
  if (document.body.classList.contains("sidebar-open") && !e.target.closest("#toggle-sidebar")) toggleSidebar(false);
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && document.body.classList.contains("sidebar-open")) toggleSidebar(false);
});
$("#toggle-settings").addEventListener("click", () => {
  const panel = $("#settings");
  panel.hidden = !panel.hidden;
  $("#toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});
$("#change-api-key").addEventListener("click", async () => {
  const reason = storedKey() ? "Change the API key this page sends, or forget it." : "The API key this server was started with:";
  if (await askForApiKey(reason)) loadModels();
});
$("#api-key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("#api-key").value.trim();
  if (!/^[\x20-\x7e]+$/.test(key)) { // a header value: printable ASCII
    $("#api-key-error").textContent = "An API key is printable ASCII text.";
    $("#api-key-error").hidden = false;
    return;
  }
  store.save(API_KEY, key);
  closeKeyPrompt(true);
});
$("#forget-api-key").addEventListener("click", () => {
  store.remove(API_KEY);
  closeKeyPrompt(false);
});
$("#cancel-api-key").addEventListener("click", () => closeKeyPrompt(false));
$("#api-key-dialog").addEventListener("cancel", () => closeKeyPrompt(false)); // Escape
$("#messages").addEventListener("click", async (e) => {
  const copy = e.target.closest(".copy");
  if (!copy) return;
  const code = copy.closest(".code-block").querySelector("code").textContent;
  try {
    await navigator.clipboard.writeText(code);
  } catch {
    // navigator.clipboard needs a secure context: a server reached over plain http on the LAN is not one.
    const area = Object.assign(document.createElement("textarea"), { value: code });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  copy.textContent = "Copied";
  setTimeout(() => { copy.textContent = "Copy"; }, 1500);
});

if (!currentConversation()) currentId = null;
showSettings();
showKeyButton();
render();
loadModels();

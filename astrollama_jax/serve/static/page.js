// The feedback page: chat with the served model (streamed), rate each answer, list the ratings.
// Everything the model or a user wrote is put into the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [] };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) { h["Authorization"] = "Bearer " + key; sessionStorage.setItem("api_key", key); }
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
                                  : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const r = await fetch(path, init);
  if (r.status === 401) { $("settings").open = true; $("api_key").focus(); }
  return r;
}

async function errorText(r) {
  try { const j = await r.json(); return (j.error && j.error.message) || r.statusText; }
  catch (e) { return r.status + " " + r.statusText; }
}

async function loadModel() {
  const r = await api("/v1/models");
  if (!r.ok) { setStatus("cannot list models: " + await errorText(r), true); return; }
  const j = await r.json();
  state.model = j.data[0].id;
  $("model").textContent = state.model + " (context " + j.data[0].context_length + " tokens)";
}

function addMessage(role, text) {
  const box = el("div", "msg " + role);
  box.appendChild(el("div", "who", role === "user" ? "You" : "Model"));
  box.appendChild(el("div", "text", text));
  $("chat").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function conversation() {
  const sys = $("system").value.trim();
  return (sys ? [{ role: "system", content: sys }] : []).concat(state.messages);
}

// Read an OpenAI server-sent event stream; call onChunk for every JSON event.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  state.messages.push({ role: "user", content: question });
  addMessage("user", question);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const text = box.querySelector(".text");
  const settings = {
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Math.max(1, Math.round(Number($("max_tokens").value))),
  };
  $("send").disabled = true;
  setStatus("generating…");
  let id = null, finish = null, usage = null, failed = null;
  try {
    const r = await api("/v1/chat/completions", Object.assign(
        { model: state.model, messages: conversation(), stream: true,
          stream_options: { include_usage: true } }, settings));
    if (!r.ok) throw new Error(await errorText(r));
    await readEvents(r, (c) => {
      if (c.error) { failed = c.error.message; return; }
      id = c.id;
      if (c.usage) usage = c.usage;
      for (const choice of c.choices || []) {
        if (choice.delta && choice.delta.content) text.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    if (failed) throw new Error(failed);
  } catch (e) {
    state.messages.pop();
    box.classList.remove("streaming");
    text.textContent = "";
    text.appendChild(el("span", "error", "error: " + e.message));
    setStatus("", false);
    $("send").disabled = false;
    return;
  }
  box.classList.remove("streaming");
  box.classList.add("done");
  box.dataset.completionId = id;
  const answer = text.textContent;
  state.messages.push({ role: "assistant", content: answer });
  const index = state.messages.length - 1;
  box.appendChild(el("div", "meta", "finish: " + finish + (usage ? ", " + usage.completion_tokens +
      " tokens" : "") + ", temperature " + settings.temperature + ", top-p " + settings.top_p));
  box.appendChild(ratingForm(id, index, box));
  setStatus("", false);
  $("send").disabled = false;
}

function ratingForm(completionId, index, box) {
  const form = $("rating-form").content.firstElementChild.cloneNode(true);
  let score = 0;
  const save = form.querySelector(".save");
  for (const b of form.querySelectorAll(".stars button")) {
    b.addEventListener("click", () => {
      score = Number(b.dataset.score);
      for (const o of form.querySelectorAll(".stars button")) o.classList.toggle("on", o === b);
      save.disabled = false;
    });
  }
  save.addEventListener("click", async () => {
    const tags = [...form.querySelectorAll(".tags input[type=checkbox]:checked")].map((c) => c.value)
        .concat(form.querySelector(".more-tags").value.split(",").map((t) => t.trim()).filter(Boolean));
    const correction = form.querySelector(".correction").value.trim();
    save.disabled = true;
    const r = await api("/v1/feedback", { completion_id: completionId, rating: score, tags: tags,
                                          correction: correction || null });
    const saved = form.querySelector(".saved");
    if (!r.ok) {
      saved.textContent = "not saved: " + await errorText(r);
      saved.className = "saved error";
      save.disabled = false;
      return;
    }
    const row = await r.json();
    saved.textContent = "saved as rating #" + row.id;
    saved.className = "saved";
    if (correction) {  // the conversation goes on from the expert's answer
      state.messages[index] = { role: "assistant", content: correction };
      box.classList.add("corrected");
      box.querySelector(".text").after(el("div", "fixed", correction));
    }
    save.disabled = false;
    loadRatings();
  });
  return form;
}

async function loadRatings() {
  const list = $("ratings");
  const r = await api("/v1/feedback?limit=20");
  list.textContent = "";
  if (!r.ok) { list.appendChild(el("li", "error", await errorText(r))); return; }
  for (const row of (await r.json()).data) {
    const li = el("li", "rating");
    li.dataset.id = row.id;
    const question = row.messages.filter((m) => m.role === "user").pop();
    li.appendChild(el("div", "head", "#" + row.id + "  rating " + row.rating + "/5" +
        (row.tags.length ? "  [" + row.tags.join(", ") + "]" : "") + "  " + row.created_at));
    li.appendChild(el("div", "q", "Q: " + (question ? question.content : "")));
    li.appendChild(el("div", "a", "A: " + row.answer));
    if (row.correction) li.appendChild(el("div", "c", "Correction: " + row.correction));
    list.appendChild(li);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("api_key").value = sessionStorage.getItem("api_key") || "";
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("question").value.trim();
    if (!q || $("send").disabled) return;
    $("question").value = "";
    ask(q);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.ctrlKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  $("reset").addEventListener("click", () => { state.messages = []; $("chat").textContent = ""; });
  $("api_key").addEventListener("change", () => { loadModel(); loadRatings(); });
  loadModel().then(loadRatings);
});
